#!/usr/bin/env python
"""Few-step students of a teacher that has learned something: which K, which teacher target, which cost,
and is the on-policy part worth it? A reproducible experiment, on the CPU or (much faster) one GPU.

1. A teacher worth distilling: a small SD3 transformer (the built-in tiny model's text encoders and
   tokenizers, a wider transformer) trained here by flow matching on drawn pictures of coloured
   shapes described by their prompts. Its "latents" are the pictures themselves, 2x average-pooled
   (RGB and grey), so every sample can be looked at directly.
2. A judge: a small classifier trained on drawn pictures, which reads shape, shape colour and
   background colour. It reads the teacher's own samples first (is the structure there to measure?).
3. The grid: for each K (the student's steps) and N (the teacher's substeps per student step,
   TEACHER_SUBSTEPS), the main script distils the teacher on-policy and off-policy (equal updates,
   equal teacher calls), for each seed, as separate processes, several at once (--jobs).
4. Each student is measured apart from its run, through diffusers' StableDiffusion3Pipeline, on 12
   held-out prompts x 8 fixed noises: the gap (latent MSE to the teacher's guided 28-step sample
   from the same noise), the Frechet distance of the judge's features to drawn pictures of the same
   prompts, and the judge's accuracy (prompt adherence). Beside them, at each K: the teacher
   unguided in K steps (the student before training), guided in K steps (the floor of N = 1), and
   guided with as many transformer passes as the student (equal cost).

    python scripts/experiment_onpolicy_vs_offpolicy.py --out outputs_colab/experiment --jobs 12

On one GPU the runs' processes overlap only under NVIDIA's MPS daemon: start it first
(nvidia-cuda-mps-control -d). Without it, 14 runs at once took 0.69 s per update each on an H200.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from distill_module import SD3_CONFIGS, load_distill  # noqa: E402  (the main script, imported as a module)
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
          "white": (245, 245, 245), "black": (20, 20, 20), "orange": (245, 140, 30), "purple": (140, 50, 180)}
DEFAULT_COLORS = 6  # the first six: 90 prompts; --colors 8 gives 168
SHAPES = ("circle", "square", "triangle")
# Settings of the main script for the distillation runs (more --NAME=VALUE on this command line are added).
# Deterministic rollouts: the on-policy states are then exactly those the student visits when it samples
# (as the evaluation and diffusers' pipeline do); the stochastic rollout's states lie beside them.
GUIDANCE = 3.0  # the teacher's guidance, distilled into the student and used for the reference (--guidance)
HELDOUT = 12  # the last 12 shape prompts are never trained on
REFERENCE_STEPS = 28  # the teacher's guided sampler that the final, pipeline-measured gap compares against
RUN_EVAL_NOISES = 8  # fixed noises per held-out prompt in the runs' own evaluation (the curves)
DISTILL_ARGS = ["--LEARNING_RATE=2e-4", "--LR_SCHEDULER=cosine", "--LR_WARMUP_STEPS=5", "--KL_WARMUP_STEPS=10",
                "--IMAGES_PER_STEP=32", "--BATCH_SIZE=8", "--STOCHASTIC_ROLLOUT=false", "--COMPILE=false",
                f"--TEACHER_EVAL_STEPS={REFERENCE_STEPS}"]
REAL_SIZE_ARGS = ["--IMAGE_SIZE=512", "--MAX_STEPS=60", "--IMAGES_PER_STEP=2", "--BATCH_SIZE=2", "--EVAL_EVERY=20",
                  "--HELDOUT_PROMPTS=4", "--NUM_PROMPTS=64", "--COMPILE=false", "--CHECKPOINT_EVERY=1000",
                  "--LR_WARMUP_STEPS=5", "--KL_WARMUP_STEPS=10"]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def shape_prompts(num_colors: int = DEFAULT_COLORS) -> list[dict]:
    """Every (shape colour, background colour, shape) with distinct colours of the first `num_colors`:
    3 n (n - 1) prompts, 90 for six colours."""
    colors, prompts = list(COLORS)[:num_colors], []
    for shape in SHAPES:
        for color in colors:
            for background in colors:
                if color != background:
                    text = f"{article(color)} {color} {shape} on {article(background)} {background} background"
                    prompts.append({"prompt": text, "shape": shape, "color": color, "background": background})
    random.Random(0).shuffle(prompts)
    return [{"id": i, **p, "category": p["shape"]} for i, p in enumerate(prompts)]


def draw(prompt: dict, rng: random.Random, size: int = 32):
    """The picture a prompt describes, with a random position and size."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), COLORS[prompt["background"]])
    d = ImageDraw.Draw(image)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    fill = COLORS[prompt["color"]]
    if prompt["shape"] == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif prompt["shape"] == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def to_latent(image):
    """Picture -> (4, 16, 16) 'latent': RGB and grey in [-1, 1], 2x average-pooled."""
    import numpy as np
    import torch

    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    x = torch.cat([x, x.mean(0, keepdim=True)])
    return torch.nn.functional.avg_pool2d(x[None], 2)[0]


def to_picture(latent, scale: int = 4):
    """The inverse for viewing: the RGB channels, enlarged."""
    import numpy as np
    from PIL import Image

    rgb = ((latent[:3].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(rgb)).resize((16 * scale, 16 * scale), Image.NEAREST)


def pipeline_latents(pipe, prompts: list[str], noise, steps: int, guidance: float):
    """Samples through diffusers' own StableDiffusion3Pipeline (not the main script's sampler): latents."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=noise, height=32, width=32,
                output_type="latent", max_sequence_length=32).images


def drawn_bank(prompts: list[dict], per_prompt: int, seed: int):
    """`per_prompt` drawn pictures of every prompt, as latents: a (P, per_prompt, 4, 16, 16) tensor."""
    import torch

    rng = random.Random(seed)
    return torch.stack([torch.stack([to_latent(draw(p, rng)) for _ in range(per_prompt)]) for p in prompts])


def device_for_helpers():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_teacher(distill, base_path: str, folder: Path, prompts: list[dict], steps: int, root: Path, width: int,
                  layers: int, batch: int) -> None:
    """Flow matching as SD3 is trained (x_t = (1-s) x0 + s eps, target v = eps - x0, logit-normal s),
    with 10% of prompts dropped to the empty one so that guidance works; saved as a diffusers folder.
    Pictures come from a bank drawn once (256 per prompt), so a GPU is not kept waiting on drawing."""
    import torch
    from diffusers import SD3Transformer2DModel

    device = device_for_helpers()
    config = distill.parse_args(["--preset", "tiny", f"--OUTPUT_ROOT={root}", "--T5_MAX_LENGTH=32"])
    text = distill.encode_prompts_cached([p["prompt"] for p in prompts], base_path, config, torch.device("cpu"),
                                         None, root / "cache")
    bank = drawn_bank(prompts, 256, seed=1).to(device)
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
                                  attention_head_dim=width // 4, num_attention_heads=4, joint_attention_dim=32,
                                  caption_projection_dim=width, pooled_projection_dim=64, pos_embed_max_size=32,
                                  qk_norm="rms_norm").to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100) * (1 - s / steps) + 0.05)
    generator = torch.Generator(device).manual_seed(0)
    for step in range(steps):
        chosen = torch.randint(len(prompts), (batch,), generator=generator, device=device)
        x0 = bank[chosen, torch.randint(bank.shape[1], (batch,), generator=generator, device=device)]
        embeds, pooled = text.batch(chosen.cpu(), device, torch.float32)
        drop = torch.rand(batch, generator=generator, device=device) < 0.1
        empty_embeds, empty_pooled = text.empty_batch(batch, device, torch.float32)
        embeds = torch.where(drop[:, None, None], empty_embeds, embeds)
        pooled = torch.where(drop[:, None], empty_pooled, pooled)
        sigma = torch.sigmoid(torch.randn(batch, generator=generator, device=device))[:, None, None, None]
        noise = torch.randn(x0.shape, generator=generator, device=device)
        x_t = (1 - sigma) * x0 + sigma * noise
        v = model(hidden_states=x_t, timestep=sigma.flatten() * 1000, encoder_hidden_states=embeds,
                  pooled_projections=pooled, return_dict=False)[0]
        loss = (v - (noise - x0)).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 500 == 0 or step == steps - 1:
            print(f"teacher step {step}: flow-matching loss {loss.item():.4f}", flush=True)
    shutil.copytree(base_path, folder, dirs_exist_ok=True)
    shutil.rmtree(folder / "transformer")
    model.cpu().save_pretrained(folder / "transformer")


def labels(prompts: list[dict], num_colors: int):
    """(shape, shape colour, background colour) indices of each prompt: the judge's three answers."""
    import torch

    colors = list(COLORS)[:num_colors]
    return torch.tensor([[SHAPES.index(p["shape"]), colors.index(p["color"]), colors.index(p["background"])]
                         for p in prompts])


def make_judge(num_colors: int):
    """A small classifier of latents: four conv layers, global average pooling to a 64-wide feature
    vector (the Frechet distance's features), and one head per answer (shape, shape colour, background)."""
    import torch

    nn = torch.nn

    class Judge(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(4, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.heads = nn.ModuleList([nn.Linear(64, len(SHAPES)), nn.Linear(64, num_colors), nn.Linear(64, num_colors)])

        def forward(self, x):
            f = self.features(x)
            return f, [head(f) for head in self.heads]

    return Judge()


def train_judge(prompts: list[dict], num_colors: int, path: Path, steps: int):
    """Trained on drawn pictures of every prompt (positions and sizes at random); kept at `path`."""
    import torch

    device = device_for_helpers()
    judge = make_judge(num_colors).to(device)
    if path.is_file():
        judge.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        return judge.eval()
    torch.manual_seed(0)
    bank, answers = drawn_bank(prompts, 64, seed=2).to(device), labels(prompts, num_colors).to(device)
    optimizer = torch.optim.Adam(judge.parameters(), lr=2e-3)
    for _ in range(steps):
        p = torch.randint(len(prompts), (256,), device=device)
        x = bank[p, torch.randint(bank.shape[1], (256,), device=device)]
        x = x + 0.05 * torch.randn_like(x)  # samples are never exactly flat colours
        _, logits = judge(x)
        loss = sum(torch.nn.functional.cross_entropy(lg, answers[p, k]) for k, lg in enumerate(logits))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.save(judge.state_dict(), path)
    return judge.eval()


def frechet_distance(a, b) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), in float64."""
    import torch

    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    c_a, c_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))
    vals, vecs = torch.linalg.eigh(c_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ c_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + torch.trace(c_a) + torch.trace(c_b) - 2 * cross)


@dataclasses.dataclass
class FinalEval:
    """What every final measurement shares, made once: the teacher's pipeline, every held-out prompt
    `noises_per_prompt` times with fixed noises (the same for every run, so settings compare pair by
    pair), the teacher's guided REFERENCE_STEPS-step samples from them, drawn pictures of the same
    prompts, and the judge."""

    teacher_pipe: object
    prompts: list  # texts, each held-out prompt noises_per_prompt times
    answers: object  # the judge's three answers for each
    noise: object
    reference: object
    drawn_features: object
    judge: object
    guidance: float

    def measure(self, latents) -> dict:
        """gap (latent MSE to the reference), Fréchet distance to the drawn pictures, the judge's accuracy."""
        import torch

        with torch.no_grad():
            features, logits = self.judge(latents.to(next(self.judge.parameters()).device))
        accuracy = {name: float((lg.argmax(1).cpu() == self.answers[:, k]).float().mean())
                    for k, (name, lg) in enumerate(zip(("shape", "color", "background"), logits, strict=True))}
        return {"gap": (latents.cpu() - self.reference).square().mean().item(),
                "fd": frechet_distance(features.cpu(), self.drawn_features), "adherence": accuracy}

    def teacher(self, steps: int, guidance: float) -> dict:
        return self.measure(pipeline_latents(self.teacher_pipe, self.prompts, self.noise, steps, guidance))

    def baselines(self, steps: int) -> dict:
        """At K steps: the teacher unguided (the student before training), guided (the floor of N = 1), and guided
        with as many transformer passes as a K-step student (K / 2 guided steps, at least one)."""
        equal = max(1, steps // 2)
        return {"no_training": self.teacher(steps, 1.0), "floor": self.teacher(steps, self.guidance),
                "equal_cost": self.teacher(equal, self.guidance), "equal_cost_steps": equal}

    def student(self, export: Path) -> dict:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(export).to(self.teacher_pipe.device)
        return self.measure(pipeline_latents(pipe, self.prompts, self.noise, pipe_steps(export), 1.0))


def pipe_steps(export: Path) -> int:
    return json.loads((export.parent.parent / "runs" / export.name / "config.json").read_text())["NUM_ROLLOUT_STEPS"]


def final_eval(teacher: Path, heldout: list[dict], noises_per_prompt: int, guidance: float, judge, num_colors: int):
    import torch
    from diffusers import StableDiffusion3Pipeline

    prompts = heldout * noises_per_prompt
    noise = torch.randn(len(prompts), 4, 16, 16, generator=torch.Generator().manual_seed(2026))
    teacher_pipe = StableDiffusion3Pipeline.from_pretrained(teacher).to(device_for_helpers())
    reference = pipeline_latents(teacher_pipe, [p["prompt"] for p in prompts], noise, REFERENCE_STEPS, guidance).cpu()
    rng = random.Random(3)
    drawn = torch.stack([to_latent(draw(p, rng)) for p in prompts]).to(device_for_helpers())
    with torch.no_grad():
        drawn_features = judge(drawn)[0].cpu()
    return FinalEval(teacher_pipe, [p["prompt"] for p in prompts], labels(prompts, num_colors), noise, reference,
                     drawn_features, judge, guidance)


def distill_run(root: Path, teacher: Path, prompts_path: Path, run: dict, steps: int, extra: list[str], env: dict):
    """One run of the main script (a fresh process, as a user starts it); raises with its error output."""
    args = ["--preset", "tiny", f"--OUTPUT_ROOT={root}", f"--TEACHER_ID={teacher}", f"--STUDENT_ID={teacher}",
            "--GENERATE_PROMPTS=false", f"--PROMPTS_JSONL={prompts_path}", f"--HELDOUT_PROMPTS={HELDOUT}",
            f"--RUN_NAME={run['name']}", f"--ON_POLICY_FRACTION={1.0 if run['regime'] == 'on_policy' else 0.0}",
            f"--SEED={run['seed']}", f"--MAX_STEPS={steps}", f"--NUM_ROLLOUT_STEPS={run['K']}",
            f"--TEACHER_SUBSTEPS={run['N']}", f"--SUPERVISED_STATES={run['M']}", "--EVAL_EVERY=25",
            f"--EVAL_NOISES={RUN_EVAL_NOISES}", "--LOG_EVERY=10", f"--CHECKPOINT_EVERY={steps}",
            "--SAVE_SAMPLE_GRIDS=false", "--T5_MAX_LENGTH=32", "--USE_T5=true", *extra]
    result = subprocess.run([sys.executable, str(HERE / "run_onpolicy_distill_colab.py"), *args],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"run {run['name']} failed:\n{result.stderr[-3000:]}")


def run_record(root: Path, run: dict, ev: FinalEval, batch: int) -> dict:
    """What one finished run measured: the final measurement, its own curve, its cost."""
    name = run["name"]
    summary = json.loads((root / "runs" / name / "train_summary.json").read_text())
    rows = [json.loads(line) for line in (root / "metrics" / name / "eval.jsonl").read_text().splitlines()]
    supervised = run["M"] or run["K"]
    return {**run, **ev.student(root / "export" / name),
            "curve": [(r["step"], r["eval_gap"]) for r in rows],
            "train_seconds": summary["timings"]["train_seconds"], "updates": summary["step"],
            # guided: two passes (conditional and unconditional) per substep, at every supervised state
            "teacher_passes_per_update": batch * supervised * run["N"] * 2}


def grid_runs(ks, ns, ms, seeds, regimes, tag: str) -> list[dict]:
    runs = []
    for K in ks:
        for N in ns:
            for M in ms:
                if M and M >= K:
                    continue  # M = K is the same as all states (0)
                for regime in regimes:
                    for seed in seeds:
                        name = f"K{K}-N{N}-M{M}{'-' + tag if tag else ''}-{regime}-seed{seed}"
                        runs.append({"name": name, "K": K, "N": N, "M": M, "tag": tag, "regime": regime, "seed": seed})
    return runs


def settings_table(records: list[dict], baselines: dict, reference: dict) -> list[dict]:
    """One entry per (K, N, M, tag): means over seeds of each regime beside that K's baselines."""
    groups = {}
    for r in records:
        groups.setdefault((r["K"], r["N"], r["M"], r["tag"]), []).append(r)
    entries = []
    for (K, N, M, tag), rs in sorted(groups.items()):
        base = baselines[K]
        entry = {"rollout_steps": K, "teacher_substeps": N, "supervised_states": M or K, "tag": tag,
                 "floor": base["floor"]["gap"], "equal_cost": base["equal_cost"]["gap"],
                 "equal_cost_guided_steps": base["equal_cost_steps"], "gap_no_training": base["no_training"]["gap"],
                 "fd_reference": reference["fd"], "fd_floor": base["floor"]["fd"],
                 "fd_equal_cost": base["equal_cost"]["fd"], "fd_no_training": base["no_training"]["fd"],
                 "adherence_reference": reference["adherence"], "adherence_floor": base["floor"]["adherence"],
                 "adherence_equal_cost": base["equal_cost"]["adherence"],
                 "adherence_no_training": base["no_training"]["adherence"],
                 "teacher_passes_per_update": rs[0]["teacher_passes_per_update"]}
        for regime in ("on_policy", "off_policy"):
            mine = sorted((r for r in rs if r["regime"] == regime), key=lambda r: r["seed"])
            if not mine:
                continue
            gaps = [r["gap"] for r in mine]
            entry.update({
                f"gap_{regime}": statistics.mean(gaps), f"gap_{regime}_per_seed": gaps,
                f"gap_{regime}_seed_std": statistics.stdev(gaps) if len(gaps) > 1 else None,
                f"fd_{regime}": statistics.mean(r["fd"] for r in mine),
                f"adherence_{regime}": {k: statistics.mean(r["adherence"][k] for r in mine)
                                        for k in ("shape", "color", "background")},
                f"train_seconds_{regime}": statistics.mean(r["train_seconds"] for r in mine),
                f"curve_{regime}": mean_curve([r["curve"] for r in mine])})
        entries.append(entry)
    return entries


def mean_curve(curves: list[list]) -> list:
    steps = [s for s, _ in curves[0]]
    return [(s, statistics.mean(c[i][1] for c in curves)) for i, s in enumerate(steps)]


def passes_to_reach(entry: dict, regime: str, target: float) -> int | None:
    """Teacher passes (per update times updates) until the run's own held-out gap first reaches `target`."""
    for step, gap in entry.get(f"curve_{regime}", []):
        if gap <= target:
            return step * entry["teacher_passes_per_update"]
    return None


def add_cost_to_reach(entries: list[dict]) -> None:
    """Which setting reaches a given quality first: at each K, the target is 0.6 x the better of the
    student's start and the floor (the issue's bar), and each on-policy setting gets the teacher passes
    its run spent until its own held-out gap (the curve's seed mean) first reached it, or None."""
    for e in entries:
        target = 0.6 * min(e["gap_no_training"], e["floor"])
        e["quality_target"] = target
        e["teacher_passes_to_reach_target"] = passes_to_reach(e, "on_policy", target)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs_colab/experiment")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400, help="student updates per run")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="K, the student's sampler steps")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 7], help="N, the teacher's substeps per step")
    parser.add_argument("--m", type=int, nargs="+", default=[0], help="supervised states per rollout (0 = all K)")
    parser.add_argument("--regimes", nargs="+", default=["on_policy", "off_policy"])
    parser.add_argument("--tag", default="", help="a name for this variant (with the settings passed through)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each a process; 12 suit one GPU)")
    parser.add_argument("--teacher-steps", type=int, default=6000)
    parser.add_argument("--teacher-width", type=int, default=128)
    parser.add_argument("--teacher-layers", type=int, default=6)
    parser.add_argument("--teacher-batch", type=int, default=128)
    parser.add_argument("--judge-steps", type=int, default=1000, help="training steps of the classifier")
    parser.add_argument("--guidance", type=float, default=GUIDANCE, help="the teacher's guidance scale")
    parser.add_argument("--colors", type=int, default=DEFAULT_COLORS, choices=range(3, len(COLORS) + 1),
                        help=f"colours of shape and background: 3 n (n - 1) prompts ({DEFAULT_COLORS}: 90, 8: 168)")
    parser.add_argument("--eval-noises", type=int, default=8, help="fixed noises per held-out prompt, final evaluation")
    parser.add_argument("--fp8-teacher", action="store_true", help="instead of the grid: the teacher with FP8 matmuls "
                        "(TEACHER_FP8) against itself, its samples measured as the students' are")
    parser.add_argument("--real-size", help="instead: a short run on a random model of this architecture "
                                             "(sd3-medium, sd3.5-medium, sd3.5-large), for a GPU")
    parser.add_argument("--real-size-layers", type=int, help=argparse.SUPPRESS)  # small smoke tests on a CPU
    args, passthrough = parser.parse_known_args(argv)  # the rest goes to the main script as --NAME=VALUE
    if args.real_size:
        return real_size_run(args, REAL_SIZE_ARGS + passthrough)

    import torch

    distill = load_distill()
    distill.quiet_libraries()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    prompts = shape_prompts(args.colors)
    prompts_path = root / "shape_prompts.jsonl"
    distill.write_prompts_jsonl(prompts_path, [{k: p[k] for k in ("id", "prompt", "category")} for p in prompts])
    base = distill.resolve_model_path(distill.TINY_MODEL_ID, str(root))
    teacher = root / (f"shape_teacher_{args.colors}colors_w{args.teacher_width}_l{args.teacher_layers}"
                      f"_s{args.teacher_steps}_b{args.teacher_batch}")
    started = time.time()
    if not (teacher / "transformer" / "config.json").is_file():
        train_teacher(distill, base, teacher, prompts, args.teacher_steps, root, args.teacher_width, args.teacher_layers,
                      args.teacher_batch)
    teacher_seconds = time.time() - started
    judge = train_judge(prompts, args.colors, root / f"judge_{args.colors}colors_s{args.judge_steps}.pt", args.judge_steps)
    ev = final_eval(teacher, prompts[-HELDOUT:], args.eval_noises, args.guidance, judge, args.colors)
    reference = ev.teacher(REFERENCE_STEPS, args.guidance)
    if args.fp8_teacher:
        return fp8_teacher_check(distill, ev, root, args.guidance)
    drawn = ev.measure(torch.stack([to_latent(draw(p, random.Random(4)))
                                    for p in prompts[-HELDOUT:] * args.eval_noises]))
    print(f"judge on drawn pictures: {drawn['adherence']}; on the teacher's {REFERENCE_STEPS}-step samples: "
          f"{reference['adherence']}, FD {reference['fd']:.3f}", flush=True)
    records_dir = root / "records"
    records_dir.mkdir(exist_ok=True)
    runs = grid_runs(args.k, args.n, args.m, args.seeds, args.regimes, args.tag)
    todo = [r for r in runs if not (records_dir / f"{r['name']}.json").is_file()]
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if args.jobs > 1 else {})}
    extra = [*DISTILL_ARGS, f"--GUIDANCE_SCALE={args.guidance}", *passthrough]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(distill_run, root, teacher, prompts_path, r, args.steps, extra, env): r for r in todo}
        for future in concurrent.futures.as_completed(futures):
            run = futures[future]
            future.result()
            record = run_record(root, run, ev, batch=8)
            (records_dir / f"{run['name']}.json").write_text(json.dumps(record))
            shutil.rmtree(root / "export" / run["name"])  # measured; the checkpoint keeps the weights
            print(f"{run['name']}: gap {record['gap']:.4f}, FD {record['fd']:.3f}, adherence {record['adherence']}, "
                  f"{record['train_seconds']:.0f} s", flush=True)
    # Every record in the folder, this command's and earlier ones' (other K, N, tags), makes the table.
    records = [json.loads(p.read_text()) for p in sorted(records_dir.glob("*.json"))]
    entries = settings_table(records, {K: ev.baselines(K) for K in {r["K"] for r in records}}, reference)
    add_cost_to_reach(entries)
    summary = {
        "command": "python scripts/experiment_onpolicy_vs_offpolicy.py " + " ".join(argv or sys.argv[1:]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d"), "student_updates": args.steps, "guidance": args.guidance,
        "teacher": {"folder": teacher.name, "train_seconds_this_command": teacher_seconds},
        "final_eval": f"{HELDOUT} held-out prompts x {args.eval_noises} fixed noises, through StableDiffusion3Pipeline; "
                      f"gap = latent MSE to the teacher's guided {REFERENCE_STEPS}-step sample",
        "judge_on_drawn_pictures": drawn["adherence"], "fd_drawn_vs_drawn": drawn["fd"],
        "reference": reference, "settings": entries,
    }
    (root / "results.json").write_text(json.dumps(summary, indent=2))
    print_table(entries, reference)
    plot_cost(entries, root / "quality_vs_cost.png")
    shown = [e for e in entries if "gap_on_policy" in e]
    shown = [e for e in shown if not e["tag"]] or shown  # the plain settings where they were run, else the variants
    shown = [e for e in shown if e["rollout_steps"] == 4] or shown  # the product's K where it was run
    if shown:
        pictures(root, ev.teacher_pipe, prompts, min(shown, key=lambda e: e["gap_on_policy"]), args.guidance)
    return summary


def fp8_teacher_check(distill, ev: FinalEval, root: Path, guidance: float) -> dict:
    """What TEACHER_FP8 does to the teacher the students learn from: its guided samples at 28 and 4 steps
    with the main script's FP8 matmuls against its own in full precision, from the same noises, measured
    as the students are (gap to the full-precision 28-step reference, FD, adherence), and the substep target
    of the default (K = 4, N = 4) at the states of the teacher's 4-step path, against full precision."""
    import torch

    pipe = ev.teacher_pipe
    full = pipe.transformer
    fp8 = distill.fp8_copy(full.requires_grad_(False))
    rows = {}
    for name, model in (("full precision", full), ("FP8", fp8)):
        pipe.transformer = model
        rows[name] = {f"guided_{steps}_steps": ev.teacher(steps, guidance) for steps in (REFERENCE_STEPS, 4)}
    pipe.transformer = full
    # The N = 4 substep target at K = 4: at the states of the full-precision teacher's own guided 4-step path.
    sigmas, timesteps = distill.sampler_sigmas(dict(pipe.scheduler.config), 4, None, 64)
    embeds, _, pooled, _ = pipe.encode_prompt(ev.prompts, ev.prompts, ev.prompts, max_sequence_length=32,
                                              do_classifier_free_guidance=False)
    empty = [""] * len(ev.prompts)
    uncond_embeds, _, uncond_pooled, _ = pipe.encode_prompt(empty, empty, empty, max_sequence_length=32,
                                                            do_classifier_free_guidance=False)
    device = pipe.device
    x, errors = ev.noise.to(device), []
    with torch.no_grad():
        for i in range(4):
            targets = [distill.teacher_target_velocity(
                lambda y, t, m=model: distill.teacher_velocity(m, y, t, (embeds, pooled), (uncond_embeds, uncond_pooled),
                                                               guidance, torch.float32), x, sigmas, i, 4, pipe.scheduler.config.shift)
                       for model in (full, fp8)]
            errors.append(float((targets[1] - targets[0]).square().mean() / targets[0].square().mean()))
            x = distill.euler_step(x, targets[0], float(sigmas[i]), float(sigmas[i + 1]))
    result = {"date": time.strftime("%Y-%m-%d"), "device": str(device), "teacher": {k: v for k, v in rows.items()},
              "substep_target_relative_mse_per_state": errors,
              "fp8_vs_full_28_step_sample_mse": rows["FP8"][f"guided_{REFERENCE_STEPS}_steps"]["gap"]}
    (root / "fp8_teacher.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


def print_table(entries: list[dict], reference: dict) -> None:
    print(f"\nteacher, {REFERENCE_STEPS} steps: adherence {fmt_adherence(reference['adherence'])}, FD {reference['fd']:.3f}")
    print("K  N  M  tag   | no training  floor  equal cost | on-policy (seed std)  off-policy | FD on / off / floor"
          " | adherence on-policy (shape/colour/background) | teacher passes/update")
    for e in entries:
        on, off = e.get("gap_on_policy"), e.get("gap_off_policy")
        print(f"{e['rollout_steps']}  {e['teacher_substeps']}  {e['supervised_states']}  {e['tag'] or '-':5} | "
              f"{e['gap_no_training']:.4f}  {e['floor']:.4f}  {e['equal_cost']:.4f} | "
              f"{on if on is None else f'{on:.4f}'} ({e.get('gap_on_policy_seed_std') or 0:.4f})  "
              f"{off if off is None else f'{off:.4f}'} | {e.get('fd_on_policy', float('nan')):.3f} / "
              f"{e.get('fd_off_policy', float('nan')):.3f} / {e['fd_floor']:.3f} | "
              f"{fmt_adherence(e.get('adherence_on_policy'))} | {e['teacher_passes_per_update']}")


def fmt_adherence(a: dict | None) -> str:
    return "-" if a is None else "/".join(f"{100 * a[k]:.0f}%" for k in ("shape", "color", "background"))


def plot_cost(entries: list[dict], path: Path) -> None:
    """Final on-policy gap against teacher passes per update, one colour per K."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; the numbers are in results.json")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for color, K in enumerate(sorted({e["rollout_steps"] for e in entries})):
        mine = [e for e in entries if e["rollout_steps"] == K and "gap_on_policy" in e and not e["tag"]]
        for e in mine:
            ax.scatter(e["teacher_passes_per_update"], e["gap_on_policy"], color=f"C{color}",
                       marker="o" if e["supervised_states"] == K else "s")
            ax.annotate(f"N={e['teacher_substeps']}" + ("" if e["supervised_states"] == K else f" M={e['supervised_states']}"),
                        (e["teacher_passes_per_update"], e["gap_on_policy"]), fontsize=7)
        if mine:
            ax.axhline(mine[0]["floor"], color=f"C{color}", ls=":", lw=1, label=f"K={K} (dotted: guided teacher, K steps)")
    ax.set(xlabel="teacher transformer passes per update", ylabel="held-out gap, on-policy (latent MSE)",
           xscale="log", yscale="log", title="few-step students: quality against teacher cost")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def pictures(root: Path, teacher_pipe, prompts: list[dict], entry: dict, guidance: float) -> None:
    """Held-out prompts: the teacher's guided sample, the teacher in K steps unguided and guided, and the
    first seed's students of the given setting (checkpoints loaded into the teacher's pipeline)."""
    import torch
    from PIL import Image, ImageDraw

    K, N, M, tag = entry["rollout_steps"], entry["teacher_substeps"], entry["supervised_states"], entry["tag"]
    heldout = [p["prompt"] for p in prompts[-6:]]
    columns = [("teacher", None, REFERENCE_STEPS, guidance), (f"{K} unguided", None, K, 1.0),
               (f"{K} guided", None, K, guidance)]
    for regime in ("off_policy", "on_policy"):
        name = f"K{K}-N{N}-M{0 if M == K else M}{'-' + tag if tag else ''}-{regime}-seed0"
        checkpoint = root / "checkpoints" / name / "final.pt"
        if checkpoint.is_file():
            columns.append((regime.replace("_policy", "-policy"), checkpoint, K, 1.0))
    cell = 64
    sheet = Image.new("RGB", (len(columns) * cell + 200, len(heldout) * cell + 30), "white")
    draw_on = ImageDraw.Draw(sheet)
    original = {k: v.clone() for k, v in teacher_pipe.transformer.state_dict().items()}
    for c, (title, checkpoint, num_steps, scale) in enumerate(columns):
        teacher_pipe.transformer.load_state_dict(original)
        if checkpoint is not None:
            teacher_pipe.transformer.load_state_dict(torch.load(checkpoint, weights_only=True)["student"], strict=False)
        draw_on.text((c * cell + 2, 2), title[:10], fill="black")
        noise = torch.randn(len(heldout), 4, 16, 16, generator=torch.Generator().manual_seed(7))
        for r, latent in enumerate(pipeline_latents(teacher_pipe, heldout, noise, num_steps, scale)):
            sheet.paste(to_picture(latent.cpu()), (c * cell, 30 + r * cell))
    teacher_pipe.transformer.load_state_dict(original)
    for r, text in enumerate(heldout):
        draw_on.text((len(columns) * cell + 4, 30 + r * cell + 24), text.replace(" background", "")[:32], fill="black")
    sheet.save(root / "samples.png")


def real_size_folder(distill, arch: str, path: Path, root: Path, num_layers: int | None = None) -> None:
    """A random-weights SD3 pipeline folder of a real architecture (the benchmark's public configs):
    the transformer at full size, CLIP-L and CLIP-G of the real widths (2 layers each: their weights
    are random anyway), the SD3 VAE's shape, no T5, the tiny model's tokenizers and scheduler."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    base = distill.resolve_model_path(distill.TINY_MODEL_ID, str(root))
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    def clip(hidden, heads):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
            num_attention_heads=heads, projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=16, norm_num_groups=32, scaling_factor=1.5305,
                        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    config = dict(SD3_CONFIGS[arch], **({"num_layers": num_layers} if num_layers else {}))
    with torch.device(device):
        transformer = SD3Transformer2DModel(**config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler"),
        vae=vae, text_encoder=clip(768, 12), tokenizer=tokenizer, text_encoder_2=clip(1280, 20), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(path)


def real_size_run(args, main_script_args: list[str]) -> dict:
    """The gap falls at real scale too: a short run of the main script on a random real-size model."""
    distill = load_distill()
    distill.quiet_libraries()
    root = Path(args.out)
    folder = root / f"random-{args.real_size}"
    if not (folder / "model_index.json").is_file():
        real_size_folder(distill, args.real_size, folder, root, args.real_size_layers)
    command = [sys.executable, str(HERE / "run_onpolicy_distill_colab.py"), f"--OUTPUT_ROOT={root}",
               f"--PROMPTS_JSONL={root}/prompts.jsonl", f"--TEACHER_ID={folder}", f"--STUDENT_ID={folder}",
               "--USE_T5=false", f"--RUN_NAME=real-{args.real_size}", "--RESUME=never", *main_script_args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    rows = [json.loads(line) for line in (root / "metrics" / f"real-{args.real_size}" / "eval.jsonl").read_text().splitlines()]
    summary = {"architecture": args.real_size, "command": " ".join(command[1:]),
               "gap": [(r["step"], r["eval_gap"]) for r in rows]}
    (root / f"real_size_{args.real_size}.json").write_text(json.dumps(summary, indent=2))
    print(f"{args.real_size}: held-out gap " + " ".join(f"{s}:{g:.4g}" for s, g in summary["gap"]))
    return summary


if __name__ == "__main__":
    main()
