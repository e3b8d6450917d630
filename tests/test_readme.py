"""The README's figures are the records': every number in a table that names its records (a `Record:` line under
it) is found in one of them, at the precision it is printed with (a percentage as a share, 77% = 0.77)."""

import json
import re

from conftest import REPO

FIGURE = re.compile(r"(?<![\w.\-])(\d+\.\d+|\d+%|\d{3,})(?![\w.])")


def record_numbers(value) -> list[float]:
    """Every number of a record but its curves (values along training, which a final figure is not)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        value = [item for key, item in value.items() if "curve" not in key]
    if isinstance(value, list):
        return [n for item in value for n in record_numbers(item)]
    return []


def found(figure: str, numbers: list[float]) -> bool:
    if figure.endswith("%"):
        return any(round(100 * n) == int(figure[:-1]) for n in numbers)
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    return any(abs(round(n, decimals) - float(figure)) < 1e-9 for n in numbers)


def checked_tables(text: str) -> dict[str, tuple[list[str], list[str]]]:
    """{section: (table rows, record paths)} for every table followed by its `Record:` line."""
    tables, section, rows = {}, "", []
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:]
        if line.startswith("|"):
            rows.append(line)
        elif rows and line.startswith("Record:"):
            tables.setdefault(section, ([], []))
            tables[section][0].extend(rows[2:])  # the data rows: no header, no rule
            tables[section][1].extend(re.findall(r"`([^`]+\.json)`", line))
            rows = []
        elif line.strip() and rows:
            rows = []
    return tables


def test_every_quality_and_speed_figure_in_the_readme_is_in_its_records():
    tables = checked_tables((REPO / "README.md").read_text())
    assert {"Does it work?", "Speed"} <= set(tables), sorted(tables)
    for section, (rows, records) in tables.items():
        numbers = []
        for path in records:
            numbers += record_numbers(json.loads((REPO / path).read_text()))
        figures = [f for row in rows for f in FIGURE.findall(re.sub(r"\d{4}-\d{2}-\d{2}|`[^`]*`", "", row))]
        assert figures, section
        missing = [f for f in figures if not found(f, numbers)]
        assert not missing, (section, missing, records)


def test_a_figure_not_in_the_record_is_caught():
    assert record_numbers({"gap": 0.0332, "curve_on_policy": [[25, 0.0333]], "ok": True}) == [0.0332]
    numbers = [0.0332, 0.77, 794.3]
    assert found("0.0332", numbers) and found("77%", numbers) and found("794", numbers)
    assert not found("0.0331", numbers) and not found("78%", numbers) and not found("795", numbers)
