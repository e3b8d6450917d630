"""The evidence, kept honest in CI: its measuring tools by hand, and its claims in a short CPU
configuration. (The full grid, several seeds and the GPU figures are in scripts/experiment_results/,
made by the commands in its README.)"""

import json
import random
import subprocess
import sys

import pytest
import torch
from conftest import REPO

EXPERIMENT = REPO / "scripts" / "experiment_onpolicy_vs_offpolicy.py"
sys.path.insert(0, str(REPO / "scripts"))
import experiment_onpolicy_vs_offpolicy as experiment  # noqa: E402


def test_shapes_are_drawn_as_their_prompts_say():
    prompts = experiment.shape_prompts()
    assert len(prompts) == 90 and len({p["prompt"] for p in prompts}) == 90
    prompt = next(p for p in prompts if p["prompt"] == "a red circle on a blue background")
    image = experiment.draw(prompt, random.Random(0))
    colours = {colour for _, colour in image.getcolors()}
    assert colours == {experiment.COLORS["red"], experiment.COLORS["blue"]}
    latent = experiment.to_latent(image)
    assert latent.shape == (4, 16, 16) and experiment.to_picture(latent).size == (64, 64)
    assert experiment.labels([prompt], 6).tolist() == [[0, 0, 2]]  # circle, red, blue
    # --colors 8: two more colours, 3 * 8 * 7 prompts, the six-colour ones among them
    more = experiment.shape_prompts(8)
    assert len(more) == 168 and {p["prompt"] for p in prompts} < {p["prompt"] for p in more}
    purple = next(p for p in more if p["prompt"] == "a purple square on an orange background")
    assert {c for _, c in experiment.draw(purple, random.Random(0)).getcolors()} == {
        experiment.COLORS["purple"], experiment.COLORS["orange"]}


def test_frechet_distance_of_two_gaussians_by_hand():
    # one dimension: (mu_a - mu_b)^2 + (s_a - s_b)^2
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200_000, 1, generator=generator) * 2 + 1
    b = torch.randn(200_000, 1, generator=generator) * 0.5 - 1
    assert experiment.frechet_distance(a, b) == pytest.approx(4 + 1.5**2, rel=0.02)
    assert experiment.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    # two independent dimensions add
    c = torch.cat([a, b], 1)
    d = torch.cat([b, a], 1)
    assert experiment.frechet_distance(c, d) == pytest.approx(2 * (4 + 1.5**2), rel=0.02)


def test_the_grid_in_a_short_configuration(tmp_path):
    """A weak teacher, 40 updates: distillation still lowers the gap, the teacher's solve over each step (N = 4)
    is a better target than its instantaneous velocity (N = 1), and at K = 1, whose only state is the noise
    itself, on- and off-policy are the same run."""
    result = subprocess.run([sys.executable, str(EXPERIMENT), "--out", str(tmp_path), "--teacher-steps", "300",
                             "--teacher-width", "64", "--teacher-layers", "4", "--teacher-batch", "48", "--judge-steps", "300", "--k", "1", "4",
                             "--n", "1", "4", "--seeds", "0", "--steps", "40", "--jobs", "2",
                             "--LEARNING_RATE=3e-4", "--LR_SCHEDULER=constant"],
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "results.json").read_text())
    assert "StableDiffusion3Pipeline" in summary["final_eval"]
    assert summary["judge_on_drawn_pictures"]["color"] > 0.9  # the judge reads what was drawn
    settings = {(e["rollout_steps"], e["teacher_substeps"]): e for e in summary["settings"]}
    assert set(settings) == {(1, 1), (1, 4), (4, 1), (4, 4)}
    for e in settings.values():
        for key in ("floor", "gap_no_training", "gap_on_policy", "gap_off_policy", "fd_on_policy", "fd_floor",
                    "adherence_on_policy", "adherence_reference", "equal_cost", "teacher_passes_per_update"):
            assert key in e, key
        assert set(e["adherence_on_policy"]) == {"shape", "color", "background"}
    four_1, four_4 = settings[(4, 1)], settings[(4, 4)]
    assert four_4["teacher_passes_per_update"] == 4 * four_1["teacher_passes_per_update"] == 8 * 4 * 4 * 2
    assert four_1["gap_on_policy"] < four_1["gap_no_training"] and four_4["gap_on_policy"] < four_4["gap_no_training"]
    assert four_4["gap_on_policy"] < four_1["gap_on_policy"], (four_4["gap_on_policy"], four_1["gap_on_policy"])
    # more guided steps are closer to the 28-step reference: the floor at K = 4 is below the 2-step equal-cost teacher
    assert four_1["floor"] < four_1["equal_cost"] and four_1["equal_cost_guided_steps"] == 2
    assert settings[(1, 4)]["gap_on_policy"] == settings[(1, 4)]["gap_off_policy"]
    assert (tmp_path / "samples.png").is_file()
    try:  # the cost plot needs matplotlib (Colab has it; the requirements do not)
        import matplotlib  # noqa: F401

        assert (tmp_path / "quality_vs_cost.png").is_file()
    except ImportError:
        assert "matplotlib is not installed" in result.stdout and not (tmp_path / "quality_vs_cost.png").exists()
