#!/usr/bin/env python
"""Does on-policy distillation work, and is the on-policy part worth it? A reproducible CPU experiment.

1. A teacher worth distilling: a small SD3 transformer (the built-in tiny model's text encoders and
   tokenizers, a wider transformer) trained here by flow matching on procedurally drawn pictures of
   coloured shapes described by their prompts. Its "latents" are the pictures themselves, 2x
   average-pooled (RGB and grey), so every sample can be looked at directly.
2. The main script distils it into a few-step student (same architecture, initialised from the
   teacher), with the same seed, budget and held-out evaluation, in three regimes:
   on-policy (ON_POLICY_FRACTION=1), off-policy (0: states from the teacher's own trajectory) and
   no training (the student's starting point, the gap at step 0).
3. It reports the held-out teacher-student gap over steps for each regime and seed (the runs' own
   evaluation, 8 fixed noises per held-out prompt) and, measured apart through diffusers' pipeline
   from each exported student, the final gap: JSON, a table, (with matplotlib) a plot, and a picture
   of teacher and students on the held-out prompts.
4. Where the first seed's remaining gap comes from: the students' samples with the teacher's guided
   velocity in place of theirs at some rollout steps, how far their states drift from the teacher's,
   and the same final gap on prompts they trained on (fitting against generalising to new prompts).

    python scripts/experiment_onpolicy_vs_offpolicy.py --out outputs_colab/experiment
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_distill_step import SD3_CONFIGS, load_distill  # noqa: E402  (the main script, imported as a module)
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
                "--BATCH_SIZE=8", "--STOCHASTIC_ROLLOUT=false"]
REAL_SIZE_ARGS = ["--IMAGE_SIZE=512", "--MAX_STEPS=60", "--BATCH_SIZE=2", "--GRAD_ACCUM_STEPS=1", "--EVAL_EVERY=20",
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


def train_teacher(distill, base_path: str, folder: Path, prompts: list[dict], steps: int, root: Path) -> None:
    """Flow matching as SD3 is trained (x_t = (1-s) x0 + s eps, target v = eps - x0, logit-normal s),
    with 10% of prompts dropped to the empty one so that guidance works; saved as a diffusers folder."""
    import torch
    from diffusers import SD3Transformer2DModel

    config = distill.parse_args(["--preset", "tiny", f"--OUTPUT_ROOT={root}", "--T5_MAX_LENGTH=32"])
    text = distill.encode_prompts_cached([p["prompt"] for p in prompts], base_path, config, torch.device("cpu"),
                                         None, root / "cache")
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                  caption_projection_dim=64, pooled_projection_dim=64, pos_embed_max_size=32,
                                  qk_norm="rms_norm")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100) * (1 - s / steps) + 0.05)
    rng = random.Random(0)
    batch = 48
    for step in range(steps):
        chosen = [rng.randrange(len(prompts)) for _ in range(batch)]
        x0 = torch.stack([to_latent(draw(prompts[i], rng)) for i in chosen])
        embeds, pooled = text.batch(chosen, "cpu", torch.float32)
        drop = torch.rand(batch) < 0.1
        empty_embeds, empty_pooled = text.empty_batch(batch, "cpu", torch.float32)
        embeds = torch.where(drop[:, None, None], empty_embeds, embeds)
        pooled = torch.where(drop[:, None], empty_pooled, pooled)
        sigma = torch.sigmoid(torch.randn(batch))[:, None, None, None]
        noise = torch.randn_like(x0)
        x_t = (1 - sigma) * x0 + sigma * noise
        v = model(hidden_states=x_t, timestep=sigma.flatten() * 1000, encoder_hidden_states=embeds,
                  pooled_projections=pooled, return_dict=False)[0]
        loss = (v - (noise - x0)).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 200 == 0 or step == steps - 1:
            print(f"teacher step {step}: flow-matching loss {loss.item():.4f}", flush=True)
    shutil.copytree(base_path, folder, dirs_exist_ok=True)
    shutil.rmtree(folder / "transformer")
    model.save_pretrained(folder / "transformer")


def eval_rows(root: Path, name: str) -> list[dict]:
    """A run's held-out evaluation rows (its eval.jsonl)."""
    return [json.loads(line) for line in (root / "metrics" / name / "eval.jsonl").read_text().splitlines()]


def distill_run(root: Path, teacher: Path, prompts_path: Path, name: str, fraction: float, seed: int, steps: int,
                extra: list[str]) -> list[dict]:
    """One run of the main script; returns its eval.jsonl rows."""
    args = ["--preset", "tiny", f"--OUTPUT_ROOT={root}", f"--TEACHER_ID={teacher}", f"--STUDENT_ID={teacher}",
            "--GENERATE_PROMPTS=false", f"--PROMPTS_JSONL={prompts_path}", f"--HELDOUT_PROMPTS={HELDOUT}",
            f"--RUN_NAME={name}", f"--ON_POLICY_FRACTION={fraction}", f"--SEED={seed}", f"--MAX_STEPS={steps}",
            "--EVAL_EVERY=25", f"--EVAL_NOISES={RUN_EVAL_NOISES}", "--LOG_EVERY=10", f"--CHECKPOINT_EVERY={steps}",
            "--SAVE_SAMPLE_GRIDS=false", "--T5_MAX_LENGTH=32", "--USE_T5=true", *extra]
    result = subprocess.run([sys.executable, str(HERE / "run_onpolicy_distill_colab.py"), *args],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"run {name} failed:\n{result.stderr[-3000:]}")
    return eval_rows(root, name)


def pipeline_latents(pipe, prompts: list[str], noise, steps: int, guidance: float):
    """Samples through diffusers' own StableDiffusion3Pipeline (not the main script's sampler): latents."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=noise, height=32, width=32,
                output_type="latent", max_sequence_length=32).images


@dataclasses.dataclass
class FinalEval:
    """What every final measurement shares, made once: the teacher's pipeline, every held-out prompt
    `noises_per_prompt` times with fixed noises (the same for every run, so the regimes are compared
    pair by pair), and the teacher's guided REFERENCE_STEPS-step samples from them. For the
    measurements through the main script's own sampler: the prompts' encodings, the K-step
    sampler's sigmas and timesteps, and the teacher's guided path on it (its states x_0 ... x_K and
    the velocities that moved them)."""

    distill: object  # the main script, as a module
    teacher_pipe: object
    prompts: list
    noise: object
    reference: object
    guidance: float
    cond: tuple
    uncond: tuple
    sigmas: object
    timesteps: object
    teacher_path: list | None = None
    teacher_path_velocities: list | None = None

    @property
    def floor(self) -> float:
        """The teacher's own guided K-step sample against the reference: what per-state losses can reach."""
        return (self.teacher_path[-1] - self.reference).square().mean().item()


def final_eval(distill, teacher: Path, heldout: list[str], noises_per_prompt: int, guidance: float,
               steps: int) -> FinalEval:
    import torch
    from diffusers import StableDiffusion3Pipeline

    prompts = heldout * noises_per_prompt
    noise = torch.randn(len(prompts), 4, 16, 16, generator=torch.Generator().manual_seed(2026))
    teacher_pipe = StableDiffusion3Pipeline.from_pretrained(teacher)
    reference = pipeline_latents(teacher_pipe, prompts, noise, REFERENCE_STEPS, guidance)
    with torch.no_grad():
        cond_embeds, uncond_embeds, cond_pooled, uncond_pooled = teacher_pipe.encode_prompt(
            prompts, prompts, prompts, negative_prompt="", max_sequence_length=32)
    teacher_pipe.scheduler.set_timesteps(steps)
    ev = FinalEval(distill, teacher_pipe, prompts, noise, reference, guidance, (cond_embeds, cond_pooled),
                   (uncond_embeds, uncond_pooled), teacher_pipe.scheduler.sigmas.clone(),
                   teacher_pipe.scheduler.timesteps.clone())
    ev.teacher_path, ev.teacher_path_velocities = sampler_path(ev, None, set(range(steps)))
    return ev


def final_gaps(ev: FinalEval, root: Path, runs: list[str]) -> dict:
    """The final gap of each run on the evaluation's prompts (the held-out ones, unless told otherwise),
    measured apart from the run's own evaluation and with less noise, sampled through diffusers'
    pipeline from each exported student. "no_training" is the student's starting point: the teacher
    itself, unguided, in K steps."""
    from diffusers import StableDiffusion3Pipeline

    def gap(pipe) -> float:
        return (pipeline_latents(pipe, ev.prompts, ev.noise, len(ev.timesteps), 1.0) - ev.reference).square().mean().item()

    gaps = {"no_training": gap(ev.teacher_pipe)}
    for name in runs:
        gaps[name] = gap(StableDiffusion3Pipeline.from_pretrained(root / "export" / name))
    return gaps


def guided_teacher_velocity(ev: FinalEval, x, i: int):
    """The teacher's guided velocity at state x of the K-step sampler's step i (the main script's function)."""
    import torch

    return ev.distill.teacher_velocity(ev.teacher_pipe.transformer, x, ev.timesteps[i], ev.cond, ev.uncond,
                                       ev.guidance, torch.float32)


def student_velocity(ev: FinalEval, student, x, i: int):
    import torch

    return ev.distill.predict_velocity(student, x, ev.timesteps[i], *ev.cond, torch.float32)


def sampler_path(ev: FinalEval, student, teacher_at: set[int]) -> tuple[list, list]:
    """The K-step sampler's states from the evaluation's noises (x_0 = noise ... x_K = sample) and the
    velocity taken at each, the teacher's guided one at the steps in `teacher_at` and the student's at
    the others."""
    import torch

    xs, vs = [ev.noise.clone()], []
    with torch.no_grad():
        for i in range(len(ev.timesteps)):
            v = guided_teacher_velocity(ev, xs[-1], i) if i in teacher_at else student_velocity(ev, student, xs[-1], i)
            vs.append(v)
            xs.append(ev.distill.euler_step(xs[-1], v, float(ev.sigmas[i]), float(ev.sigmas[i + 1])))
    return xs, vs


def load_student(folder: Path):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer")


def teacher_substitution(ev: FinalEval, student_folder: Path) -> dict:
    """Where a student's remaining gap comes from: its K-step sample with the teacher's guided velocity
    put in place of its own at some rollout steps (one step at a time, the first half, the second
    half, all of them), on the final evaluation's prompts, noises and reference. With all steps
    substituted, the sample is the teacher's own guided K-step sample: the floor of per-state losses."""
    student, steps = load_student(student_folder), len(ev.timesteps)

    def gap(substituted: set[int]) -> float:
        return (sampler_path(ev, student, substituted)[0][-1] - ev.reference).square().mean().item()

    half = steps // 2
    result = {"student_alone": gap(set()), "sigmas": [round(float(v), 4) for v in ev.sigmas]}
    result["teacher_at_step"] = [gap({i}) for i in range(steps)]
    result["teacher_at_first_half"] = gap(set(range(half)))
    result["teacher_at_second_half"] = gap(set(range(half, steps)))
    result["teacher_at_every_step"] = ev.floor
    return result


def state_drift(ev: FinalEval, student_folder: Path) -> dict:
    """How far off-policy states are from on-policy ones, for one student: at each rollout step, the
    mean square distance of its own state (its K-step sampler from the evaluation's noises) from the
    teacher's guided K-step state from the same noise, and its velocity error (MSE to the teacher's
    guided velocity) at its own states and at the teacher's. State 0 is the noise itself for both."""
    import torch

    student, steps = load_student(student_folder), len(ev.timesteps)
    own, own_velocities = sampler_path(ev, student, set())
    teacher = ev.teacher_path
    with torch.no_grad():  # each path already holds its own sampler's velocities; only the other model's are new
        at_own = [(v - guided_teacher_velocity(ev, own[i], i)).square().mean().item() for i, v in enumerate(own_velocities)]
        at_teacher = [(student_velocity(ev, student, teacher[i], i) - v).square().mean().item()
                      for i, v in enumerate(ev.teacher_path_velocities)]
    return {"state_distance": [(a - b).square().mean().item() for a, b in zip(own[:steps], teacher[:steps])],
            "velocity_error_at_own_states": at_own, "velocity_error_at_teacher_states": at_teacher}


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs_colab/experiment")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400, help="student updates per run")
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--rollout-steps", type=int, default=8, help="K, the student's sampler steps")
    parser.add_argument("--guidance", type=float, default=GUIDANCE, help="the teacher's guidance scale")
    parser.add_argument("--colors", type=int, default=DEFAULT_COLORS, choices=range(3, len(COLORS) + 1),
                        help=f"colours of shape and background: 3 n (n - 1) prompts ({DEFAULT_COLORS}: 90, 8: 168)")
    parser.add_argument("--eval-noises", type=int, default=8, help="fixed noises per held-out prompt, final evaluation")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="read runs that already finished in --out (from this same command) instead of running them")
    parser.add_argument("--real-size", help="instead: a short run on a random model of this architecture "
                                             "(sd3-medium, sd3.5-medium, sd3.5-large), for a GPU")
    parser.add_argument("--real-size-layers", type=int, help=argparse.SUPPRESS)  # small smoke tests on a CPU
    args, passthrough = parser.parse_known_args(argv)  # the rest goes to the main script as --NAME=VALUE
    if args.real_size:
        return real_size_run(args, REAL_SIZE_ARGS + passthrough)

    distill = load_distill()
    distill.quiet_libraries()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    prompts = shape_prompts(args.colors)
    prompts_path = root / "shape_prompts.jsonl"
    distill.write_prompts_jsonl(prompts_path, [{k: p[k] for k in ("id", "prompt", "category")} for p in prompts])
    base = distill.resolve_model_path(distill.TINY_MODEL_ID, str(root))
    teacher = root / ("shape_teacher" if args.colors == DEFAULT_COLORS else f"shape_teacher_{args.colors}colors")
    if not (teacher / "transformer" / "config.json").is_file():
        train_teacher(distill, base, teacher, prompts, args.teacher_steps, root)

    curves, runs = {}, []
    for regime, fraction in (("on_policy", 1.0), ("off_policy", 0.0)):
        for seed in args.seeds:
            name = f"{regime}-seed{seed}"
            if args.reuse_runs and (root / "export" / name / "model_index.json").is_file():
                rows = eval_rows(root, name)
            else:
                rows = distill_run(root, teacher, prompts_path, name, fraction, seed, args.steps,
                                   [f"--NUM_ROLLOUT_STEPS={args.rollout_steps}", f"--GUIDANCE_SCALE={args.guidance}",
                                    *DISTILL_ARGS, *passthrough])
            curves[f"{regime}/seed{seed}"] = [(r["step"], r["eval_gap"]) for r in rows]
            runs.append(name)
            print(f"{regime} seed {seed}: gap " + " ".join(f"{s}:{g:.4g}" for s, g in curves[f'{regime}/seed{seed}']),
                  flush=True)

    heldout = [p["prompt"] for p in prompts[-HELDOUT:]]
    ev = final_eval(distill, teacher, heldout, args.eval_noises, args.guidance, args.rollout_steps)
    final = final_gaps(ev, root, runs)
    on = [final[f"on_policy-seed{s}"] for s in args.seeds]
    off = [final[f"off_policy-seed{s}"] for s in args.seeds]
    summary = {
        "command": "python scripts/experiment_onpolicy_vs_offpolicy.py " + " ".join(argv or sys.argv[1:]),
        "seeds": args.seeds, "student_updates": args.steps, "rollout_steps": args.rollout_steps, "guidance": args.guidance,
        "teacher_calls_per_update_equal": True,
        "final_eval": f"{HELDOUT} held-out prompts x {args.eval_noises} fixed noises, through StableDiffusion3Pipeline",
        "gap_no_training": final["no_training"], "gap_on_policy": statistics.mean(on),
        "gap_off_policy": statistics.mean(off),
        "per_seed": {"on_policy": on, "off_policy": off, "on_minus_off": [a - b for a, b in zip(on, off, strict=True)]},
        "curves_note": f"the runs' own evaluation (eval.jsonl): the same prompts, {RUN_EVAL_NOISES} other fixed noises "
                       f"each, against the teacher's guided {distill.PRESETS['tiny']['TEACHER_EVAL_STEPS']}-step sample "
                       f"(the tiny preset's TEACHER_EVAL_STEPS)",
        "curves": curves,
    }
    first = args.seeds[0]
    summary["teacher_substitution"] = {
        "note": f"seed {first}'s students, the final evaluation's prompts, noises and reference; the gap when the "
                f"teacher's guided velocity replaces the student's at the given rollout steps",
        **{regime: teacher_substitution(ev, root / "export" / f"{regime}-seed{first}")
           for regime in ("on_policy", "off_policy")}}
    summary["state_drift"] = {
        "note": f"seed {first}'s students and the teacher unguided (no training), the final evaluation's prompts and "
                f"noises: per rollout step, the distance of the student's own state from the teacher's guided {args.rollout_steps}"
                f"-step state (mean square), and the student's velocity error at its own states and at the teacher's",
        "no_training": state_drift(ev, teacher),
        **{regime: state_drift(ev, root / "export" / f"{regime}-seed{first}")
           for regime in ("on_policy", "off_policy")}}
    # The same measurement on prompts the students trained on tells fitting apart from generalising.
    trained_on = [p["prompt"] for p in prompts[:HELDOUT]]
    trained_ev = final_eval(distill, teacher, trained_on, args.eval_noises, args.guidance, args.rollout_steps)
    summary["training_prompts"] = {
        "note": f"seed {first}'s students, the first {HELDOUT} training prompts x {args.eval_noises} fixed noises (the "
                f"held-out evaluation's noises), the same measurement as the held-out gap; floor = the teacher's guided "
                f"{args.rollout_steps}-step sample",
        **final_gaps(trained_ev, root, [f"{regime}-seed{first}" for regime in ("on_policy", "off_policy")]),
        "floor": trained_ev.floor}
    summary["reduction_on_policy"] = summary["gap_no_training"] / summary["gap_on_policy"]
    summary["reduction_off_policy"] = summary["gap_no_training"] / summary["gap_off_policy"]
    (root / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"\nheld-out gap (latent MSE to the teacher's {REFERENCE_STEPS}-step guided sample), K={args.rollout_steps}, "
          f"{summary['final_eval']}, after {args.steps} updates:")
    print(f"  no training  {summary['gap_no_training']:.5f}")
    for regime, gaps in (("off-policy", off), ("on-policy", on)):
        print(f"  {regime:11}  {statistics.mean(gaps):.5f}  ({summary['gap_no_training'] / statistics.mean(gaps):.1f}x lower)"
              f"  per seed {' '.join(f'{g:.4f}' for g in gaps)}")
    for regime in ("on_policy", "off_policy"):
        sub = summary["teacher_substitution"][regime]
        print(f"  {regime} seed {first}, the teacher's velocity in place of the student's: at step "
              + " ".join(f"{i}:{g:.4f}" for i, g in enumerate(sub["teacher_at_step"]))
              + f"; first half {sub['teacher_at_first_half']:.4f}, second half {sub['teacher_at_second_half']:.4f},"
              f" every step {sub['teacher_at_every_step']:.4f} (student alone {sub['student_alone']:.4f})")
    for name in ("no_training", "on_policy", "off_policy"):
        drift = summary["state_drift"][name]
        print(f"  {name} seed {first}, per rollout step: state distance from the teacher's "
              + " ".join(f"{v:.4f}" for v in drift["state_distance"]) + "; velocity error at its own states "
              + " ".join(f"{v:.3f}" for v in drift["velocity_error_at_own_states"]) + ", at the teacher's "
              + " ".join(f"{v:.3f}" for v in drift["velocity_error_at_teacher_states"]))
    trained = summary["training_prompts"]
    print(f"  on training prompts (seed {first}): no training {trained['no_training']:.4f}, on-policy "
          f"{trained[f'on_policy-seed{first}']:.4f}, off-policy {trained[f'off_policy-seed{first}']:.4f}, "
          f"floor {trained['floor']:.4f}")
    plot(curves, root / "gap_curves.png")
    pictures(root, ev.teacher_pipe, prompts, args.seeds[0], args.rollout_steps, args.guidance)
    return summary


def plot(curves: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; the curves are in results.json")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    labelled = set()
    for key, points in curves.items():
        regime = key.split("/")[0]
        ax.plot(*zip(*points, strict=True), color="C0" if regime == "on_policy" else "C1", alpha=0.8,
                label=None if regime in labelled else regime)
        labelled.add(regime)
    ax.set(xlabel="student updates", ylabel="held-out gap (latent MSE)", yscale="log",
           title="on-policy vs off-policy distillation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def pictures(root: Path, teacher_pipe, prompts: list[dict], seed: int, steps: int, guidance: float) -> None:
    """Held-out prompts: the teacher's guided sample, and each student's K-step sample, same noise."""
    import torch
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image, ImageDraw

    heldout = [p["prompt"] for p in prompts[-6:]]
    # the teacher, guided, and the teacher unguided in K steps, which is the student before training
    columns = [("teacher", teacher_pipe, REFERENCE_STEPS, guidance), ("before", teacher_pipe, steps, 1.0)]
    for regime in ("off_policy", "on_policy"):
        columns.append((regime, StableDiffusion3Pipeline.from_pretrained(root / "export" / f"{regime}-seed{seed}"),
                        steps, 1.0))
    cell = 64
    sheet = Image.new("RGB", (len(columns) * cell + 200, len(heldout) * cell + 30), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (title, pipe, num_steps, guidance) in enumerate(columns):
        draw.text((c * cell + 2, 2), title[:10], fill="black")
        noise = torch.randn(len(heldout), 4, 16, 16, generator=torch.Generator().manual_seed(7))
        latents = pipeline_latents(pipe, heldout, noise, num_steps, guidance)
        for r, latent in enumerate(latents):
            sheet.paste(to_picture(latent), (c * cell, 30 + r * cell))
    for r, text in enumerate(heldout):
        draw.text((len(columns) * cell + 4, 30 + r * cell + 24), text.replace(" background", "")[:32], fill="black")
    sheet.save(root / "samples.png")


if __name__ == "__main__":
    main()
