"""A run that no fault or mistake corrupts. The fault matrix: a run stopped (SIGKILL, or Ctrl-C's SIGINT) at named
moments, then run again, ends with the same metrics and weights as a run left alone, bit for bit (CPU). The
mistakes: each is refused in one paragraph with exit 2, or handled with a line that says so, and nothing of another
run or of the user's is deleted or overwritten."""

import json
import os
import re
import resource
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, SCRIPT, run_main, run_process, tiny_args
from test_run import start, strip_timing, wait_for_step

COMMON = ["--RUN_NAME=r", "--LORA_RANK=4", "--MAX_STEPS=6", "--CHECKPOINT_EVERY=2", "--EVAL_EVERY=3",
          "--CHECKPOINT_EVERY_MINUTES=0"]
TOKEN = "hf_NEVER_WRITE_THIS_0123456789"


def args(root, tiny_path, *extra):
    return tiny_args(root, f"--TEACHER_ID={tiny_path}", f"--STUDENT_ID={tiny_path}", *COMMON, *extra)


def outcome(root):
    """What a run left: metrics and evaluation rows (without timings), final weights, exported weights, statuses."""
    from safetensors.torch import load_file

    metrics = [json.loads(line) for line in (root / "metrics" / "r" / "metrics.jsonl").read_text().splitlines()]
    evals = [{k: v for k, v in json.loads(line).items() if k != "time"}
             for line in (root / "metrics" / "r" / "eval.jsonl").read_text().splitlines()]
    checkpoint = torch.load(root / "checkpoints" / "r" / "final.pt", weights_only=True)
    final = {**checkpoint["student"], **{f"fake:{k}": v for k, v in (checkpoint.get("fake") or {}).items()},
             **{f"adv:{k}": v for k, v in (checkpoint.get("adv_head") or {}).items()},
             **{f"ema:{i}": v for i, v in enumerate((checkpoint.get("ema") or {}).get("shadow_params", []))}}
    lora = root / "export" / "r" / "pytorch_lora_weights.safetensors"
    exported = load_file(lora if lora.exists() else root / "export" / "r" / "transformer" / "diffusion_pytorch_model.safetensors")
    summary = json.loads((root / "runs" / "r" / "train_summary.json").read_text())
    latest = json.loads((root / "checkpoints" / "r" / "latest.json").read_text())
    return strip_timing(metrics), evals, final, exported, (summary["status"], summary["step"], latest["status"])


# SIGKILL with a student of all weights, Ctrl-C and SIGTERM with LoRA, each with DMD's fake score (on the separate
# teacher, on the shared base): both kinds of weights, the fake score and every optimizer state come back exactly.
# SIGKILL needs a process of its own; Ctrl-C and SIGTERM are handled by main() itself, which runs in the test's
# process (run_main: a second a run instead of five), as do the runs left alone and every run after a stop.
# The 1-2-step recipe's critics too: the adversarial head (both kinds), the staged start and the fake score on fresh
# samples (LoRA), so the head, its optimizer and the fresh draws resume bit for bit; and the EMA of the weights (LoRA).
DMD = ["--DMD_WEIGHT=1", "--FAKE_LORA_RANK=4", "--ADV_WEIGHT=0.5"]
TRAINABLE = {"KILL": ["--TRAINABLE=all", *DMD],
             "INT": ["--TRAINABLE=lora", *DMD, "--DISTRIBUTION_START_STEP=2", "--DISTRIBUTION_RAMP_STEPS=2",
                     "--FAKE_UPDATES_PER_STEP=2", "--FAKE_FRESH_SAMPLES=true", "--EMA_DECAY=0.9"]}
TRAINABLE["TERM"] = TRAINABLE["INT"]
EXIT_CODE = {"KILL": -signal.SIGKILL, "INT": 130, "TERM": 143}


def run_kind(distill, sig, *arguments, env=None):
    """(exit code, stdout, stderr) of a run of the kind of student `sig` tests, in a process of its own for SIGKILL."""
    result = run_process(*arguments, env=env) if sig == "KILL" else run_main(distill, *arguments, env=env)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="module")
def left_alone(tmp_path_factory, tiny_path, distill):
    """The runs left alone, one per kind of student; the Hub token in their environment."""
    runs = {}
    for sig in ("KILL", "INT"):
        root = tmp_path_factory.mktemp("left_alone")
        result = run_main(distill, *args(root, tiny_path, *TRAINABLE[sig]), env={"HF_TOKEN": TOKEN})
        code, out, err = result.returncode, result.stdout, result.stderr
        assert code == 0, err[-3000:]
        runs[sig] = (root, outcome(root), out + err)
    runs["TERM"] = runs["INT"]
    return runs


def test_the_token_is_never_written(left_alone):
    for root, _, output in left_alone.values():
        assert TOKEN not in output
        assert not [p for p in root.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]


# SIGTERM at every moment; Ctrl-C, which the same handler takes (Stopped is a KeyboardInterrupt), where its own
# message is read; SIGKILL, which leaves no chance to save, where it differs: mid-write, mid-export, after final.pt
STOPS = [("TERM", m) for m in ("write step_4.pt", "evaluation 3", "export", "after final.pt")] + [
    ("INT", "write step_4.pt"), ("INT", "evaluation 3"),
    ("KILL", "write step_4.pt"), ("KILL", "export"), ("KILL", "after final.pt")]


@pytest.mark.parametrize("sig, moment", STOPS)
def test_a_run_stopped_at_any_moment_ends_as_one_left_alone(tmp_path, tiny_path, distill, left_alone, moment, sig):
    code, out, err = run_kind(distill, sig, *args(tmp_path, tiny_path, *TRAINABLE[sig]),
                              env={"DISTILL_FAULT_AT": f"{moment}:{sig}"})
    assert code == EXIT_CODE[sig], err[-2000:]
    assert "Traceback" not in err
    if sig != "KILL" and moment in ("write step_4.pt", "evaluation 3"):  # in training: saved and marked
        summary = json.loads((tmp_path / "runs" / "r" / "train_summary.json").read_text())
        step = summary["step"]
        assert summary["status"] == "interrupted"
        assert f"interrupted ({'SIGTERM' if sig == 'TERM' else 'Ctrl-C'}) at step {step}: saved" in out
        assert "To continue: python" in out and "--RUN_NAME=r" in out
        payload = torch.load(tmp_path / "checkpoints" / "r" / f"step_{step}.pt", weights_only=True)
        assert payload["step"] == step and payload["fake"] and payload["fake_optimizer"]["state"]
        assert payload["adv_head"] and payload["adv_optimizer"]["state"]
    if moment == "evaluation 3" and sig != "KILL":  # the signal waits for the evaluation's row, grid and checkpoint
        rows = [json.loads(line)["step"] for line in (tmp_path / "metrics" / "r" / "metrics.jsonl").read_text().splitlines()]
        assert rows == [1, 2, 3] and (tmp_path / "samples" / "r" / "step_3.png").is_file()
    # the same command again (in this process: only the stop needs a process of its own), then exactly as left alone
    again = run_main(distill, *args(tmp_path, tiny_path, *TRAINABLE[sig]))
    code, out, err = again.returncode, again.stdout, again.stderr
    assert code == 0, err[-3000:]
    if moment in ("export", "after final.pt"):
        assert "finishing run r: trained to step 6" in out
    same_as(tmp_path, left_alone[sig][1])
    # the summary's training seconds count both processes': every logged window, by hand
    rows = [json.loads(line) for line in (tmp_path / "metrics" / "r" / "metrics.jsonl").read_text().splitlines()]
    by_hand = sum(r["sec_per_step"] * (r["step"] - before) for r, before in zip(rows, [0] + [r["step"] for r in rows]))
    summary = json.loads((tmp_path / "runs" / "r" / "train_summary.json").read_text())
    assert summary["timings"]["train_seconds_across_resumes"] == pytest.approx(by_hand) and by_hand > 0
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-") or p.name == "lock.json"]
    assert not leftovers


def test_a_finished_run_is_not_overwritten_or_mixed_with_other_settings(left_alone, tiny_path, distill):
    root = left_alone["INT"][0]
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    code, _, err = run_kind(distill, "INT", *args(root, tiny_path, *TRAINABLE["INT"], "--RESUME=never"))
    assert code == 2 and "RESUME='never' would overwrite them" in err
    code, _, err = run_kind(distill, "INT", *args(root, tiny_path, *TRAINABLE["INT"], "--LEARNING_RATE=0.5", "--GUIDANCE_SCALE=2"))
    assert code == 2 and "written with other settings" in err
    assert "GUIDANCE_SCALE=3.0 there, 2.0 now" in err and "LEARNING_RATE=0.001 there, 0.5 now" in err
    # a lower MAX_STEPS than the run has trained to is refused too, not a run cut back
    code, _, err = run_kind(distill, "INT", *args(root, tiny_path, *TRAINABLE["INT"], "--MAX_STEPS=4"))
    assert code == 2 and "has trained to step 6 (final.pt), past MAX_STEPS=4" in err and "MAX_STEPS to 6 or more" in err
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before


def test_ctrl_c_while_starting_says_nothing_is_lost(tmp_path, tiny_path, distill):
    result = run_main(distill, *args(tmp_path, tiny_path), env={"DISTILL_FAULT_AT": "startup:INT"})
    assert result.returncode == 130 and "Traceback" not in result.stderr
    assert "nothing is lost; the same command continues" in result.stderr
    assert not (tmp_path / "checkpoints" / "r" / "lock.json").exists()


@pytest.mark.parametrize("name", ["..", ".", "a/b", ".hidden"])
def test_a_run_name_is_one_plain_folder_name(tmp_path, tiny_path, name, distill):
    (tmp_path / "mine.txt").write_text("a file of the user's")
    (tmp_path / "export" / "other").mkdir(parents=True)
    (tmp_path / "export" / "other" / "weights").write_text("another run's export")
    result = run_main(distill, *tiny_args(tmp_path, f"--TEACHER_ID={tiny_path}", f"--STUDENT_ID={tiny_path}",
                                   f"--RUN_NAME={name}", "--MAX_STEPS=2"))
    assert result.returncode == 2 and "must be one plain folder name" in result.stderr
    assert (tmp_path / "mine.txt").read_text() == "a file of the user's"
    assert (tmp_path / "export" / "other" / "weights").read_text() == "another run's export"


def test_deleting_is_refused_outside_the_runs_own_folders(distill, tmp_path):
    paths = distill.RunPaths(tmp_path, "r")
    (tmp_path / "export" / "r").mkdir(parents=True)
    (tmp_path / "keep.txt").write_text("x")
    for outside in (tmp_path, tmp_path / "keep.txt", tmp_path / "export", tmp_path / "export" / "r2",
                    tmp_path / "export" / "r" / ".." / ".." / "keep.txt"):
        with pytest.raises(RuntimeError, match="not inside run 'r'"):
            paths.remove(outside)
    paths.remove(tmp_path / "export" / "r")
    assert not (tmp_path / "export" / "r").exists() and (tmp_path / "keep.txt").exists()


def test_a_users_prompts_file_is_never_overwritten(tmp_path, tiny_path, distill):
    mine = tmp_path / "mine.jsonl"
    text = "".join(json.dumps({"prompt": f"a red cube number {i}"}) + "\n" for i in range(8))
    mine.write_text(text)
    base = [f"--TEACHER_ID={tiny_path}", f"--STUDENT_ID={tiny_path}", "--RUN_NAME=r", "--MAX_STEPS=1"]
    refused = run_main(distill, "--preset", "tiny", f"--OUTPUT_ROOT={tmp_path}", f"--PROMPTS_JSONL={mine}", *base)
    assert refused.returncode == 2 and "is not the prompt list that GENERATE_PROMPTS makes" in refused.stderr
    assert "GENERATE_PROMPTS=False" in refused.stderr and mine.read_text() == text
    used = run_main(distill, "--preset", "tiny", f"--OUTPUT_ROOT={tmp_path}", f"--PROMPTS_JSONL={mine}",
                      "--GENERATE_PROMPTS=false", *base)
    assert used.returncode == 0, used.stderr[-2000:]
    assert mine.read_text() == text
    # the generated file is the script's; an edit to it is refused the same way, not lost at the next start
    generated = tmp_path / "prompts" / "generated-n48-seed0.jsonl"
    assert run_main(distill, "--preset", "tiny", f"--OUTPUT_ROOT={tmp_path}", *base[:2], "--RUN_NAME=g",
                      "--MAX_STEPS=1").returncode == 0
    generated.write_text(generated.read_text().replace("a ", "an edited ", 1))
    edited = generated.read_text()
    again = run_main(distill, "--preset", "tiny", f"--OUTPUT_ROOT={tmp_path}", *base[:2], "--RUN_NAME=g2", "--MAX_STEPS=1")
    assert again.returncode == 2 and generated.read_text() == edited


def test_one_process_per_run(tmp_path, tiny_path, distill):
    long = args(tmp_path, tiny_path, "--MAX_STEPS=400")
    first = start(long)
    wait_for_step(tmp_path, "r", 3, first)
    second = run_main(distill, *long)
    assert second.returncode == 2 and "is being trained by another process" in second.stderr
    assert f"pid {first.pid} on {socket.gethostname()}" in second.stderr
    first.send_signal(signal.SIGKILL)  # gone without releasing its lock, as a disconnected runtime
    first.wait()
    last = json.loads((tmp_path / "checkpoints" / "r" / "latest.json").read_text())["step"]
    third = run_main(distill, *args(tmp_path, tiny_path, f"--MAX_STEPS={last + 2}"))
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"taking over run r from pid {first.pid}" in third.stdout and "no longer running" in third.stdout
    rows = [json.loads(line)["step"] for line in (tmp_path / "metrics" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, last + 3))  # one history, each step once


def test_a_lock_of_another_machine_is_kept_while_alive_and_taken_over_when_stale(tmp_path, tiny_path, distill):
    lock = tmp_path / "checkpoints" / "r" / "lock.json"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": "colab-runtime-1", "pid": 123, "token": "t", "time": time.time() - 20}))
    refused = run_main(distill, *args(tmp_path, tiny_path, "--MAX_STEPS=2"))
    assert refused.returncode == 2 and "pid 123 on colab-runtime-1, last alive 2" in refused.stderr
    lock.write_text(json.dumps({"host": "colab-runtime-1", "pid": 123, "token": "t", "time": time.time() - 600}))
    taken = run_main(distill, *args(tmp_path, tiny_path, "--MAX_STEPS=2"))
    assert taken.returncode == 0 and re.search(r"from pid 123 on colab-runtime-1 \(last alive 6\d\d s ago\)", taken.stdout)
    assert not lock.exists()


def test_new_run_names_are_unique_within_a_second(distill, tmp_path):
    config = distill.parse_args([f"--OUTPUT_ROOT={tmp_path}"])
    names = {distill.choose_run_name(config) for _ in range(20)}
    assert len(names) == 20


def test_speed_switches_resume_and_a_teacher_fp8_that_would_resolve_otherwise_is_refused(left_alone, tiny_path,
                                                                                        distill, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(left_alone["INT"][0], root)
    lora = TRAINABLE["INT"]
    # memory and speed only: the run trains on (to a larger MAX_STEPS) with checkpointing and another attention kernel
    code, out, err = run_kind(distill, "INT", *args(root, tiny_path, *lora, "--MAX_STEPS=7",
                                                   "--GRADIENT_CHECKPOINTING=true", "--ATTENTION_BACKEND=math"))
    assert code == 0 and "written with other settings" not in err, err[-2000:]
    # as if the run had trained on an H100 with TEACHER_FP8='auto': on this CPU 'auto' would switch it off
    final = root / "checkpoints" / "r" / "final.pt"
    payload = torch.load(final, weights_only=True)
    assert payload["teacher_fp8"] is False and payload["device_name"].startswith("cpu")
    torch.save({**payload, "teacher_fp8": True, "device_name": "NVIDIA H100 80GB HBM3"}, final)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    code, _, err = run_kind(distill, "INT", *args(root, tiny_path, *lora, "--MAX_STEPS=8"))
    assert code == 2 and "Traceback" not in err
    assert "ran its matmuls in FP8 (TEACHER_FP8='auto' on NVIDIA H100 80GB HBM3); cpu (" in err
    assert "TEACHER_FP8=False to continue with the bf16 teacher" in err
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    code, _, err = run_kind(distill, "INT", *args(root, tiny_path, *lora, "--MAX_STEPS=8", "--TEACHER_FP8=false"))
    assert code == 0, err[-2000:]  # the user's choice is followed


def test_a_broken_latest_json_falls_back_and_a_finished_run_trains_longer(tmp_path, tiny_path, distill):
    base = [a for a in args(tmp_path, tiny_path) if a != "--RUN_NAME=r"]
    assert run_main(distill, *base, "--MAX_STEPS=4").returncode == 0
    (name,) = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    (tmp_path / "checkpoints" / name / "latest.json").write_text("{garbage")
    longer = run_main(distill, *base, "--MAX_STEPS=6")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "latest.json is missing or unreadable" in longer.stdout
    assert f"continuing run {name} (same config) from step 4 to 6" in longer.stdout
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [name]
    rows = [json.loads(line)["step"] for line in (tmp_path / "metrics" / name / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "runs" / name / "train_summary.json").read_text())["step"] == 6


def test_a_run_with_no_readable_checkpoint_stops_and_keeps_its_history(tmp_path, tiny_path, distill):
    assert run_main(distill, *args(tmp_path, tiny_path, "--MAX_STEPS=4")).returncode == 0
    for checkpoint in (tmp_path / "checkpoints" / "r").glob("*.pt"):
        checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    metrics = (tmp_path / "metrics" / "r" / "metrics.jsonl").read_text()
    result = run_main(distill, *args(tmp_path, tiny_path, "--MAX_STEPS=6"))
    assert result.returncode == 2 and "no checkpoint that can be read" in result.stderr
    assert "Traceback" not in result.stderr and (tmp_path / "metrics" / "r" / "metrics.jsonl").read_text() == metrics


def test_non_finite_and_unknown_settings_are_refused_before_any_model(distill):
    config = distill.parse_args(["--preset", "tiny", "--LEARNING_RATE=inf", "--SAMPLER_ETA=nan",
                                 "--LR_SCHEDULER=bogus", "--REPORT_TO=bogus"])
    with pytest.raises(distill.UserError) as err:
        distill.validate_config(config)
    text = str(err.value)
    assert "LEARNING_RATE=inf must be a finite number" in text and "SAMPLER_ETA=nan" in text
    assert "LR_SCHEDULER='bogus': use one of constant" in text and "REPORT_TO='bogus': use ''" in text


def test_damaged_inputs_are_named_not_tracebacks(distill, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"prompt": "a cat"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(distill.UserError, match=r"p.jsonl:2: not UTF-8 text \(byte 0xe9\)"):
        distill.read_prompts_jsonl(prompts)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 1, "loss": 1.0}\nnull\n\xff\xfe\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert [r["step"] for r in distill.rows_through(metrics, 10)] == [1, 2]
    assert "3 line(s) that are not metrics rows" in capsys.readouterr().out


def test_a_non_finite_student_is_never_written_as_final(distill, tiny_root):
    config = distill.parse_args(["--preset", "tiny", f"--OUTPUT_ROOT={tiny_root}", "--TRAINABLE=lora"])
    models, _ = distill.load_models(config, torch.device("cpu"))
    distill.check_finite_weights(models, 3)
    with torch.no_grad():
        models.trainable[0][0] = float("nan")
    with pytest.raises(distill.UserError, match="not finite at step 3; it is not exported or marked finished"):
        distill.check_finite_weights(models, 3)


def test_training_longer_lays_the_schedule_out_over_the_new_length(distill):
    """A resumed schedule follows the new MAX_STEPS from the step reached (README, Resume and safety)."""
    import math

    def schedule(name, max_steps, state=None):
        config = {**distill.default_config(), "LR_SCHEDULER": name, "LR_WARMUP_STEPS": 0, "MAX_STEPS": max_steps,
                  "LEARNING_RATE": 1.0}
        _, lr_scheduler = distill.build_optimizer([torch.nn.Parameter(torch.zeros(1))], config, torch.device("cpu"), 1)
        if state:
            lr_scheduler.load_state_dict(state)
        return lr_scheduler

    short = schedule("cosine", 10)
    for _ in range(10):
        short.optimizer.step()
        short.step()
    assert short.get_last_lr()[0] == pytest.approx(0, abs=1e-9)
    longer = schedule("cosine", 20, short.state_dict())
    longer.optimizer.step()
    longer.step()  # the step reached was taken at the old schedule's rate; from the next, the new schedule's
    assert longer.last_epoch == 11 and longer.get_last_lr()[0] == pytest.approx(0.5 * (1 + math.cos(math.pi * 11 / 20)))
    constant = schedule("constant_with_warmup", 20, schedule("constant_with_warmup", 10).state_dict())
    assert constant.get_last_lr()[0] == 1.0


def same_as(root, reference):
    metrics, evals, final, exported, statuses = outcome(root)
    assert metrics == reference[0] and evals == reference[1]
    assert final.keys() == reference[2].keys() and all(torch.equal(final[k], reference[2][k]) for k in final)
    assert all(torch.equal(exported[k], reference[3][k]) for k in reference[3])
    assert statuses == ("finished", 6, "finished")


def test_the_export_holds_the_student_only(left_alone):
    """DMD's fake score and the adversarial head are saved in the checkpoints (resumed with the rest), never exported."""
    for sig in ("KILL", "INT"):
        _, (_, _, final, exported, _), _ = left_alone[sig]
        assert any(k.startswith("fake:") and ".fake." in k for k in final)
        assert any(k.startswith("adv:heads.") for k in final)
        assert exported and not [k for k in exported if "fake" in k or "heads." in k or "lora" in k and sig == "KILL"]
    # with EMA_DECAY the export is the average of the weights, not the last ones (in the order of the student's)
    _, (_, _, final, exported, _), _ = left_alone["INT"]
    student = {k: v for k, v in final.items() if ".lora_" in k and not k.startswith(("fake:", "ema:"))}
    average = dict(zip(student, (v for k, v in final.items() if k.startswith("ema:")), strict=True))
    as_exported = {name: "transformer." + name.replace(".default", "") for name in student}  # diffusers' LoRA names
    assert set(exported) == set(as_exported.values())
    assert all(torch.equal(exported[as_exported[name]], value) for name, value in average.items())
    assert any(not torch.equal(average[name], student[name]) for name in student)


def test_a_run_trained_longer_then_killed_resumes_from_its_newest_step_not_its_old_final(tmp_path, tiny_path, distill):
    assert run_main(distill, *args(tmp_path, tiny_path, "--MAX_STEPS=4")).returncode == 0  # final.pt at step 4
    longer = args(tmp_path, tiny_path, "--MAX_STEPS=14", "--CHECKPOINT_EVERY=5", "--EVAL_EVERY=12")
    killed = run_process(*longer, env={"DISTILL_FAULT_AT": "evaluation 12:KILL"})
    assert killed.returncode == -signal.SIGKILL and (tmp_path / "checkpoints" / "r" / "step_10.pt").is_file()
    code, out, err = run_kind(distill, "INT", *longer)
    assert code == 0, err[-2000:]
    assert "resumed r from step_10.pt at step 10" in out
    rows = [json.loads(line)["step"] for line in (tmp_path / "metrics" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 15))


def test_a_full_disk_is_one_paragraph_and_the_next_run_loses_nothing(tmp_path, tiny_path, distill, left_alone):
    """A file-size limit (`ulimit -f`, as a full disk) fails the first checkpoint's write: one paragraph, exit 2, no
    half-written file; the next run, with room, starts over and ends as the run left alone did, bit for bit."""
    shutil.copytree(left_alone["KILL"][0] / "cache", tmp_path / "cache")  # the text embeddings (the largest file)

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # an all-weights checkpoint is about 700 kB

    full = subprocess.run([sys.executable, str(SCRIPT), *args(tmp_path, tiny_path, *TRAINABLE["KILL"])],
                          capture_output=True, text=True, cwd=REPO, timeout=300, preexec_fn=limited)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-2000:]
    # torch.save meets the limit as a short write ("unexpected pos ..."), a plain write as EFBIG ("File too large")
    assert re.search(r"Could not write \S*step_2.pt \((File too large|.*unexpected pos.*)\); nothing was written there",
                     full.stderr), full.stderr[-1000:]
    assert "run the same command again" in full.stderr
    assert not list((tmp_path / "checkpoints" / "r").glob("*.pt"))
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-") or p.name == "lock.json"]
    again = run_main(distill, *args(tmp_path, tiny_path, *TRAINABLE["KILL"]))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "stopped before its first checkpoint; it starts again from step 0" in again.stdout
    same_as(tmp_path, left_alone["KILL"][1])


def test_a_damaged_export_is_made_again_from_final(tmp_path, left_alone, tiny_path, distill):
    root = tmp_path / "run"
    shutil.copytree(left_alone["INT"][0], root)
    weights = root / "export" / "r" / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, out, err = run_kind(distill, "INT", *args(root, tiny_path, *TRAINABLE["INT"]))
    assert code == 0, err[-2000:]
    assert "its export has pytorch_lora_weights.safetensors at 1,000 bytes, not the" in out
    assert "writing them again from final.pt" in out
    same_as(root, left_alone["INT"][1])
    assert "already finished at step 6" in run_main(distill, *args(root, tiny_path, *TRAINABLE["INT"])).stdout


@pytest.mark.skipif(not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tempfile.gettempdir()).st_dev,
                    reason="needs /dev/shm on another filesystem than the temp folder, as a mounted Drive is")
def test_a_kill_while_staging_on_another_filesystem_leaves_nothing_behind(tiny_path, distill, left_alone):
    """OUTPUT_ROOT on another filesystem (as Google Drive is): files are staged in the local temp folder first. A kill
    there leaves the staged checkpoint; the run's next start removes it, and the run ends as one left alone."""
    root = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        killed = run_process(*args(root, tiny_path, *TRAINABLE["KILL"]), env={"DISTILL_FAULT_AT": "write step_4.pt:KILL"})
        assert killed.returncode == -signal.SIGKILL
        staged = distill.staging_folder(root / "checkpoints" / "r")
        assert [p.name.split("-", 1)[1] for p in staged.iterdir()] == ["step_4.pt"]  # <pid>-step_4.pt
        again = run_main(distill, *args(root, tiny_path, *TRAINABLE["KILL"]))
        assert again.returncode == 0, again.stderr[-2000:]
        assert not staged.exists()
        same_as(root, left_alone["KILL"][1])
    finally:
        shutil.rmtree(root)


def test_a_second_ctrl_c_while_stopping_does_not_cut_the_checkpoint_short(distill):
    done = []
    with distill.held_signals(reraise=False):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        done.append(True)  # reached: neither signal interrupted the block, and none is raised after it
    assert done
    with pytest.raises(distill.Stopped), distill.held_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        done.append(True)
    assert len(done) == 2


def test_write_failures_of_torch_and_safetensors_are_named(distill, tmp_path):
    target = tmp_path / "step_2.pt"
    short = distill.write_failure(target, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2"))
    disk = distill.write_failure(target, Exception("No space left on device (os error 28)"))
    assert "Could not write" in str(short) and "unexpected pos" in str(short) and "os error 28" in str(disk)
    assert distill.write_failure(target, ValueError("a bug")) is None


def test_an_over_long_run_name_is_refused(distill):
    config = distill.parse_args(["--preset", "tiny", "--RUN_NAME=" + "a" * 300])
    with pytest.raises(distill.UserError, match="RUN_NAME is 300 characters long; at most 100"):
        distill.validate_config(config)


def mount_namespaces_work() -> bool:
    """Whether this machine lets the tests mount a tmpfs in a mount namespace of their own (root, as in CI)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not mount_namespaces_work(), reason="needs a mount namespace (root) to make a folder read-only")
def test_an_output_root_gone_read_only_mid_run_is_one_paragraph_and_the_run_goes_on_after(tmp_path, tiny_path):
    """OUTPUT_ROOT (a tmpfs, in a mount namespace of the test's own) turns read-only at step 3 of a long run: one
    paragraph naming the file, exit 2, no traceback; made writable again, the same command takes the left lock over
    and continues from the newest checkpoint, each step once."""
    root, out = tmp_path / "root", tmp_path / "out"
    root.mkdir()
    out.mkdir()
    run = " ".join(shlex.quote(a) for a in [sys.executable, str(SCRIPT), *args(root, tiny_path, "--MAX_STEPS=400")])
    again = " ".join(shlex.quote(a) for a in [sys.executable, str(SCRIPT), *args(root, tiny_path, "--MAX_STEPS=8")])
    script = f"""
mount -t tmpfs -o size=200m tmpfs {root}
{run} > {out}/stdout1 2> {out}/stderr1 &
pid=$!
i=0; until grep -qs '"step": 3,' {root}/metrics/r/metrics.jsonl || [ $i -gt 2400 ]; do sleep 0.05; i=$((i+1)); done
until mount -o remount,ro {root} 2>/dev/null; do sleep 0.05; done  # busy while a file is open for writing
wait $pid; echo $? > {out}/rc1
mount -o remount,rw {root}
{again} > {out}/stdout2 2> {out}/stderr2; echo $? > {out}/rc2
cp {root}/metrics/r/metrics.jsonl {out}/
"""
    subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, timeout=300, check=True,
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stderr1 = (out / "stderr1").read_text()
    assert (out / "rc1").read_text().strip() == "2", stderr1[-2000:]
    assert "Read-only file system" in stderr1 and "error: Could not write" in stderr1 and "Traceback" not in stderr1
    assert (out / "rc2").read_text().strip() == "0", (out / "stderr2").read_text()[-2000:]
    stdout2 = (out / "stdout2").read_text()
    assert "taking over run r from pid" in stdout2 and "resumed r from step_" in stdout2
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 9))
