"""Whole runs of the script, as a user starts them: every output and its fields, learning, resume."""

import csv
import json
import re
import signal
import time

import pytest
import torch
from PIL import Image

from conftest import SCRIPT, MainProcess, run_main, run_process, run_script, tiny_args

TIMING = {"sec_per_step", "images_per_sec", "peak_mem_gb"}


def read_run(root, name):
    rows = [json.loads(line) for line in (root / "metrics" / name / "metrics.jsonl").read_text().splitlines()]
    with open(root / "metrics" / name / "metrics.csv") as f:
        csv_rows = list(csv.DictReader(f))
    summary = json.loads((root / "runs" / name / "train_summary.json").read_text())
    return rows, csv_rows, summary


@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_tiny_run_writes_every_output(tmp_path, distill, trainable):
    result = run_main(distill, *tiny_args(tmp_path, f"--TRAINABLE={trainable}", "--RUN_NAME=r", "--MAX_STEPS=12",
                                   "--CHECKPOINT_EVERY=5", "--EVAL_EVERY=6", "--LOG_EVERY=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows, csv_rows, summary = read_run(tmp_path, "r")
    columns = distill.metric_columns(4)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert all(list(r) == columns for r in rows) and list(csv_rows[0]) == columns
    assert [int(r["step"]) for r in csv_rows] == [2, 4, 6, 8, 10, 12]
    assert [r["eval_gap"] is not None for r in rows] == [False, False, True, False, False, True]
    for r in rows:
        for key in ("loss", "kl", "eps_mse", "latent_mse", "kl_weight", "lr", "grad_norm", "sec_per_step",
                    "images_per_sec", "kl_0", "latent_mse_3"):
            assert isinstance(r[key], float) and r[key] >= 0, key
    assert summary["status"] == "finished" and summary["step"] == 12 and summary["skipped_steps"] == 0
    assert summary["config"]["TRAINABLE"] == trainable and summary["shares_teacher_weights"] == (trainable == "lora")
    assert summary["final_metrics"]["step"] == 12 and summary["eval_gap_before"] > 0
    assert set(summary["timings"]) >= {"total_seconds", "model_load_seconds", "text_embedding_seconds"}
    checkpoints = tmp_path / "checkpoints" / "r"
    assert sorted(p.name for p in checkpoints.glob("*.pt")) == ["final.pt", "step_10.pt", "step_5.pt"]
    final = torch.load(checkpoints / "final.pt", weights_only=True)
    assert final["step"] == 12 and final["config"]["RUN_NAME"] == "r"
    assert set(final) >= {"student", "optimizer", "lr_scheduler", "config"}
    if trainable == "lora":
        assert final["student"] and all(".lora_" in name for name in final["student"])
    else:
        assert len(final["student"]) == sum(1 for _ in final["student"]) and "proj_out.weight" in final["student"]
    # the header's size of one checkpoint: its trained weights and two Adam moments in fp32
    one = float(re.search(r"checkpoints about ([0-9.]+) MB each, [0-9.]+ MB kept \(3 \+ final.pt\)",
                          result.stdout)[1]) / 1000
    # the file: those tensors, and names and settings of some 100 kB (which outweigh a tiny LoRA's few weights)
    assert 0 <= (checkpoints / "final.pt").stat().st_size - one * 1e9 < 200_000 or trainable == "lora"
    prompts = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 48 and set(prompts[0]) == {"id", "prompt", "category"}


def test_loss_and_heldout_gap_fall(tmp_path, distill):
    result = run_main(distill, *tiny_args(tmp_path, "--RUN_NAME=r", "--MAX_STEPS=60", "--KL_WARMUP_STEPS=0",
                                   "--EVAL_EVERY=60", "--CHECKPOINT_EVERY=100"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows, _, summary = read_run(tmp_path, "r")
    first, last = [r["loss"] for r in rows[:15]], [r["loss"] for r in rows[-15:]]
    assert sum(last) < 0.7 * sum(first), (sum(first), sum(last))
    assert summary["eval_gap_last"] < 0.7 * summary["eval_gap_before"]


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def start(args, env=None):
    """A run in a process of its own, as Popen gives it, for a test to kill mid-run (MainProcess)."""
    return MainProcess(args, env)


def wait_for_step(root, name, step, process, timeout=120):
    path = root / "metrics" / name / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.005)
    raise AssertionError("run did not reach the step in time")


def test_empty_run_name_continues_the_unfinished_run_of_the_same_config(tmp_path, distill):
    args = tiny_args(tmp_path, "--MAX_STEPS=12", "--CHECKPOINT_EVERY=5", "--CHECKPOINT_EVERY_MINUTES=0")
    process = start(args)
    wait_for_step(tmp_path, next_run_name(tmp_path, process), 7, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (name,) = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    result = run_main(distill, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"continuing run {name} (same config) from step 5 to 12" in result.stdout
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [name]
    # the same command again: the finished run is reported, nothing is trained
    again = run_main(distill, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"run {name} of this config already finished at step 12" in again.stdout
    assert "held-out gap" in again.stdout and str(tmp_path / "export" / name) in again.stdout
    assert "distill" not in again.stderr and [p.name for p in (tmp_path / "checkpoints").iterdir()] == [name]
    # a new run only when asked for
    time.sleep(1.1)
    fresh = run_main(distill, *args, "--RESUME=never")
    assert fresh.returncode == 0 and len(list((tmp_path / "checkpoints").iterdir())) == 2


def test_a_run_in_a_process_of_its_own_answers_as_a_fresh_interpreter_does(tmp_path):
    """MainProcess, forked from a process that has the libraries imported: bad input is answered as `python
    script` answers it, word for word, with its exit code; Ctrl-C mid-run saves and names the script to run again."""
    bad = tiny_args(tmp_path, "--MAX_STEPS=0")
    fresh, forked = run_script(*bad), run_process(*bad)
    assert fresh.returncode == 2 and "MAX_STEPS=0 must be a whole number" in fresh.stderr
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    process = start(tiny_args(tmp_path, "--RUN_NAME=r", "--MAX_STEPS=400"))
    wait_for_step(tmp_path, "r", 2, process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.poll() == 130, err[-2000:]
    assert "interrupted (Ctrl-C) at step" in out and f"To continue: python {SCRIPT} " in out


def next_run_name(root, process, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        folder = root / "metrics"
        if folder.exists() and list(folder.iterdir()):
            return next(folder.iterdir()).name
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.01)
    raise AssertionError("no run folder appeared")


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, distill):
    args = tiny_args(tmp_path, "--RUN_NAME=r", "--MAX_STEPS=20", "--CHECKPOINT_EVERY=5", "--KEEP_LAST_CHECKPOINTS=2")
    process = start(args)
    wait_for_step(tmp_path, "r", 12, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    newest = tmp_path / "checkpoints" / "r" / "step_10.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    result = run_main(distill, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step_10.pt is unreadable" in result.stdout and "resumed r from step_5.pt at step 5" in result.stdout
    rows, _, _ = read_run(tmp_path, "r")
    assert [r["step"] for r in rows] == list(range(1, 21))
    # the newest KEEP_LAST_CHECKPOINTS are kept (step_5 went once step_15 was in place), final.pt always
    folder = tmp_path / "checkpoints" / "r"
    assert sorted(p.name for p in folder.iterdir()) == ["final.pt", "latest.json", "step_10.pt", "step_15.pt"]
    assert json.loads((folder / "latest.json").read_text())["checkpoint"] == "final.pt"


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, distill):
    result = run_main(distill, *tiny_args(tmp_path, "--RUN_NAME=r", "--MAX_STEPS=30", "--LEARNING_RATE=1e30",
                                   "--LR_WARMUP_STEPS=0", "--CHECKPOINT_EVERY=1", "--MAX_CONSECUTIVE_SKIPS=3",
                                   "--MAX_GRAD_NORM=0"))
    assert result.returncode == 2
    assert "3 steps in a row had a non-finite loss or gradient" in result.stderr and "Traceback" not in result.stderr
    # which checkpoint came before the divergence, and that none is known good (not "the last good one is intact")
    before = re.search(r"The newest checkpoint written before the first of them is \S+step_(\d+).pt \(step (\d+)\)",
                       result.stderr)
    assert before and before[1] == before[2] and "none is known good" in result.stderr
    summary = json.loads((tmp_path / "runs" / "r" / "train_summary.json").read_text())
    assert summary["status"] == "failed" and summary["skipped_steps"] == 3
    last = json.loads((tmp_path / "checkpoints" / "r" / "latest.json").read_text())
    payload = torch.load(tmp_path / "checkpoints" / "r" / last["checkpoint"], weights_only=True)
    assert payload["step"] == last["step"]


def test_skipped_update_changes_nothing(distill, tiny_root):
    from accelerate import Accelerator

    config = distill.parse_args(["--preset", "tiny", f"--OUTPUT_ROOT={tiny_root}"])
    accelerator = Accelerator(cpu=True)
    models, _ = distill.load_models(config, accelerator.device)
    optimizer, lr_scheduler = distill.build_optimizer(models.trainable, config, accelerator.device, 1)
    models.student, optimizer, lr_scheduler = accelerator.prepare(models.student, optimizer, lr_scheduler)
    before = [p.detach().clone() for p in models.trainable]
    for p in models.trainable:
        p.grad = torch.ones_like(p)
    terms = torch.full((4, 4), float("nan"))
    _, finite = distill.apply_update(models, accelerator, optimizer, lr_scheduler, terms, torch.ones(4), config, "no")
    assert not finite and not optimizer.state_dict()["state"] and lr_scheduler.scheduler.last_epoch == 0
    assert all(torch.equal(a, b) for a, b in zip(before, models.trainable, strict=True))


def test_sample_grids_go_to_the_trackers_too(tmp_path, distill):
    """REPORT_TO='tensorboard': every row, and each evaluation's sample grid as an image (Colab has tensorboard;
    the requirements do not)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_main(distill, *tiny_args(tmp_path, "--RUN_NAME=r", "--MAX_STEPS=4", "--EVAL_EVERY=2",
                                          "--REPORT_TO=tensorboard"))
    assert result.returncode == 0, result.stderr[-2000:]
    log = EventAccumulator(str(tmp_path / "trackers" / "r"), size_guidance={"images": 0})  # (its config: a folder below)
    log.Reload()
    assert [e.step for e in log.Images("samples")] == [0, 2, 4]
    grid = Image.open(tmp_path / "samples" / "r" / "step_4.png")
    assert (log.Images("samples")[-1].width, log.Images("samples")[-1].height) == grid.size
    assert [e.step for e in log.Scalars("loss")] == [1, 2, 3, 4]
