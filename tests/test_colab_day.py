"""A Colab user's day: sample grids and the eval log, the exported student in diffusers, several processes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import REPO, SCRIPT, run_main, tiny_args


# The full student learns with DMD beside the regression (its fake score a LoRA adapter on the separate teacher); the
# LoRA student's alpha is not its rank, so its export must carry both.
EXTRA = {"all": ["--DMD_WEIGHT=1", "--FAKE_LORA_RANK=4", "--ADV_WEIGHT=0.5"], "lora": ["--LORA_ALPHA=16"]}


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, distill):
    """One full and one LoRA tiny run, shared by the export tests."""
    roots = {}
    for trainable in ("all", "lora"):
        root = tmp_path_factory.mktemp(trainable)
        result = run_main(distill, *tiny_args(root, "--RUN_NAME=r", f"--TRAINABLE={trainable}", "--MAX_STEPS=12",
                                              "--EVAL_EVERY=5", "--LORA_RANK=4", "--SAMPLER_SHIFT=2.0", "--EVAL_NOISES=2",
                                              *EXTRA[trainable]))
        assert result.returncode == 0, result.stderr[-3000:]
        roots[trainable] = root
    return roots


def test_dmd_runs_end_to_end_and_logs_its_terms(finished_runs):
    root = finished_runs["all"]
    rows = [json.loads(line) for line in (root / "metrics" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["dmd"] > 0 and r["fake_loss"] > 0 and all(r[f"dmd_{i}"] > 0 for i in range(4)) for r in rows)
    # the adversarial term acts at the last state only, and its head learns beside it (hinge loss near 2 at the start)
    assert all(r["adv_3"] != 0 and r["adv_0"] == 0 and 0 < r["disc_loss"] < 4 and r["adv_weight"] == 0.5 for r in rows)
    evals = [json.loads(line) for line in (root / "metrics" / "r" / "eval.jsonl").read_text().splitlines()]
    assert all(0 < r["eval_diversity"] < 3 for r in evals)  # two noises per prompt: the diversity ratio is read
    final = torch.load(root / "checkpoints" / "r" / "final.pt", weights_only=True)
    assert final["fake"] and all(".fake." in name for name in final["fake"]) and final["fake_optimizer"]["state"]


def test_eval_grids_and_gap_rows_at_the_evaluation_steps(finished_runs):
    root = finished_runs["all"]
    rows = [json.loads(line) for line in (root / "metrics" / "r" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 5, 10, 12]
    assert all(len(r["per_prompt"]) == 4 == len(r["prompts"]) for r in rows)
    assert all(r["eval_gap"] == pytest.approx(sum(r["per_prompt"]) / 4) for r in rows)
    metrics = [json.loads(line) for line in (root / "metrics" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert {m["step"]: m["eval_gap"] for m in metrics if m["eval_gap"] is not None} == {
        r["step"]: r["eval_gap"] for r in rows if r["step"]}
    grids = sorted(p.name for p in (root / "samples" / "r").iterdir())
    assert grids == ["step_0.png", "step_10.png", "step_12.png", "step_5.png"]
    with Image.open(root / "samples" / "r" / "step_12.png") as grid:
        assert grid.width == 2 * 160 and grid.height == 18 + 4 * (160 + 30)
    summary = json.loads((root / "runs" / "r" / "train_summary.json").read_text())
    assert summary["eval_gap_before"] == rows[0]["eval_gap"] and summary["eval_gap_last"] == rows[-1]["eval_gap"]


def test_heldout_gap_over_several_noises_equals_the_pipelines(tmp_path, distill):
    """EVAL_NOISES=3: the gap at step 0 (student = teacher, unguided, 4 steps) against the teacher's
    guided 8-step sample, recomputed by hand through diffusers' pipeline from the same noises."""
    from diffusers import StableDiffusion3Pipeline

    result = run_main(distill, *tiny_args(tmp_path, "--RUN_NAME=r", "--MAX_STEPS=1", "--EVAL_NOISES=3",
                                   "--SAVE_SAMPLE_GRIDS=false", "--EXPORT_DIFFUSERS=false"))
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads((tmp_path / "metrics" / "r" / "eval.jsonl").read_text().splitlines()[0])
    assert row["step"] == 0 and row["noises_per_prompt"] == 3 and len(row["per_prompt"]) == 4
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "cache" / "tiny-random-sd3")
    pipe.set_progress_bar_config(disable=True)
    prompts = row["prompts"] * 3
    noise = torch.randn((12, 4, 16, 16), generator=torch.Generator().manual_seed(0 + 12345))

    def sample(guidance, **steps):
        return pipe(prompts, guidance_scale=guidance, latents=noise, height=32, width=32, output_type="latent",
                    max_sequence_length=64, **steps).images

    # the student samples with the trailing spacing (the pipeline's `sigmas`), the teacher's reference with its own
    per_sample = (sample(1.0, sigmas=[1.0, 0.75, 0.5, 0.25]) - sample(3.0, num_inference_steps=8)).square().flatten(1).mean(1)
    expected = per_sample.view(3, 4).mean(0)
    assert row["per_prompt"] == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-7)
    assert row["eval_gap"] == pytest.approx(expected.mean().item(), rel=1e-4)


def test_exported_files_are_readable_by_others_as_the_rest(finished_runs):
    for trainable in ("all", "lora"):
        export = finished_runs[trainable] / "export" / "r"
        modes = {p.relative_to(export).as_posix(): p.stat().st_mode & 0o777 for p in export.rglob("*") if p.is_file()}
        assert any(name.endswith(".safetensors") for name in modes)
        umask = os.umask(0)
        os.umask(umask)
        assert set(modes.values()) == {0o666 & ~umask}, modes


def test_exported_student_loads_and_samples_in_diffusers(finished_runs):
    from diffusers import StableDiffusion3Pipeline

    root = finished_runs["all"]
    export = root / "export" / "r"
    pipe = StableDiffusion3Pipeline.from_pretrained(export)
    final = torch.load(root / "checkpoints" / "r" / "final.pt", weights_only=True)["student"]
    weights = dict(pipe.transformer.named_parameters())
    assert all(torch.equal(weights[name], value) for name, value in final.items())
    assert not [name for name in weights if "lora" in name or "fake" in name]  # the student only, no fake score
    assert pipe.scheduler.config.shift == 2.0
    image = pipe("a photo of a cat", sigmas=[1.0, 0.75, 0.5, 0.25], guidance_scale=1.0, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), max_sequence_length=64).images[0]
    assert image.size == (32, 32)
    card = (export / "README.md").read_text()  # the student's own (trailing) steps, as the pipeline's sigmas
    assert "4-step SD3 student" in card and "sigmas=[1.0, 0.75, 0.5, 0.25]" in card and "before" in card


def test_exported_lora_loads_onto_the_base_model(finished_runs):
    from diffusers import StableDiffusion3Pipeline

    root = finished_runs["lora"]
    export = root / "export" / "r"
    assert (export / "pytorch_lora_weights.safetensors").is_file()
    card = (export / "README.md").read_text()  # the base to load it onto: the built-in model's folder, which loads
    base_line = next(line for line in card.splitlines() if line.startswith("pipe = StableDiffusion3Pipeline.from_pretrained("))
    base_path = base_line.split("(", 1)[1].split(",")[0].rstrip(")").strip("'")
    # the card samples it as it was trained: T5 on (the tiny preset's USE_T5) and its own shift, which a LoRA file lacks
    assert "text_encoder_3=None" not in card and "shift=2.0)" in card
    shift_line = next(line for line in card.splitlines() if "shift=" in line)
    assert (root / "cache" / "tiny-random-sd3").samefile(base_path)
    pipe = StableDiffusion3Pipeline.from_pretrained(base_path)

    def sample():
        return pipe("a photo of a cat", sigmas=[1.0, 0.75, 0.5, 0.25], guidance_scale=1.0, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), max_sequence_length=64, output_type="latent").images

    base = sample()
    pipe.load_lora_weights(export)
    exec(shift_line, {"pipe": pipe, "FlowMatchEulerDiscreteScheduler": __import__("diffusers").FlowMatchEulerDiscreteScheduler})
    assert pipe.scheduler.config.shift == 2.0
    with_lora = sample()
    assert with_lora.shape == (1, 4, 16, 16) and not torch.allclose(base, with_lora)
    loaded = {n: p for n, p in pipe.transformer.named_parameters() if "lora" in n}
    final = torch.load(root / "checkpoints" / "r" / "final.pt", weights_only=True)["student"]
    assert len(loaded) == len(final)
    # trained with rank 4 and alpha 16: diffusers loads it at that strength, alpha / rank = 4, not at 1
    (config,) = pipe.transformer.peft_config.values()
    assert (config.r, config.lora_alpha) == (4, 16)
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert list(layer.scaling.values()) == [4.0]
    assert sorted(torch.sort(p.flatten())[0].sum().item() for p in loaded.values()) == pytest.approx(
        sorted(torch.sort(p.flatten())[0].sum().item() for p in final.values()))


def test_two_processes_write_one_set_of_outputs(tmp_path, distill):
    # On GPUs: accelerate launch --num_processes 2 ...; on CPUs accelerate needs torch's launcher (its --cpu means one process).
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT),
               *tiny_args(tmp_path, "--MAX_STEPS=6", "--CHECKPOINT_EVERY=4", "--KEEP_LAST_CHECKPOINTS=2",
                          "--CHECKPOINT_EVERY_MINUTES=1e-6")]  # the main process's clock: due at every step
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (name,) = [p.name for p in (tmp_path / "metrics").iterdir()]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [name]
    rows = [json.loads(line) for line in (tmp_path / "metrics" / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((tmp_path / "runs" / name / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["step"] == 6
    assert rows[0]["images_per_sec"] > 0 and summary["final_metrics"]["step"] == 6
    assert sorted(p.name for p in (tmp_path / "checkpoints" / name).glob("*.pt")) == ["final.pt", "step_4.pt", "step_5.pt"]
    assert not (tmp_path / "checkpoints" / name / "lock.json").exists()  # the main process held it for both
    evals = [json.loads(line)["step"] for line in (tmp_path / "metrics" / name / "eval.jsonl").read_text().splitlines()]
    assert evals == [0, 6]  # evaluated once each time, by the main process alone
    # The prompt stream and the schedule are laid out per process: another process count is refused, not mixed.
    checkpoint = tmp_path / "checkpoints" / name / "step_4.pt"
    assert torch.load(checkpoint, weights_only=True)["num_processes"] == 2
    one = run_main(distill, *tiny_args(tmp_path, "--RUN_NAME=r1", "--MAX_STEPS=6", f"--RESUME={checkpoint}"))
    assert one.returncode == 2 and "Traceback" not in one.stderr
    assert "written by 2 process(es) and this run has 1" in one.stderr and "--num_processes 2" in one.stderr
    assert not (tmp_path / "checkpoints" / "r1").exists() or not list((tmp_path / "checkpoints" / "r1").iterdir())


def test_two_processes_wait_on_each_other_only_in_the_gradient_all_reduce(tmp_path):
    """Per optimizer step each process runs exactly one collective, the gradients' all-reduce (their accumulated
    rollouts and states skip it), and no broadcast of buffers before its forwards; metrics are reduced at log steps.
    (In the second step DDP broadcasts the bucket order once, as it rebuilds its buckets after the first.)"""
    harness = REPO / "tests" / "two_process_steps.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(harness), str(tmp_path / "out"),
               *tiny_args(tmp_path, "--RUN_NAME=r", "--TRAINABLE=lora", "--IMAGES_PER_STEP=4", "--BATCH_SIZE=2",
                          "--LOG_EVERY=1000")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        steps = json.loads((tmp_path / "out" / f"rank{rank}.json").read_text())
        assert [s["collectives"] for s in steps] == [{"gloo:all_reduce": 1}, {"gloo:all_reduce": 1, "gloo:broadcast": 2},
                                                     {"gloo:all_reduce": 1}], steps
        assert all(0 < s["seconds_in_collectives"] < s["step_seconds"] for s in steps)


def test_dep_install_installs_nothing_when_all_is_present(distill, capsys):
    assert distill.dep_install() == []
    assert "already installed" in capsys.readouterr().out


