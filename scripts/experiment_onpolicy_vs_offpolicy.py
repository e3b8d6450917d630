#!/usr/bin/env python
"""Few-step students of a teacher that has learned something: which K, which teacher target, which student,
and is the on-policy part worth it? A reproducible experiment, on the CPU or (much faster) one GPU.

1. A teacher worth distilling: a small SD3 transformer (the built-in tiny model's text encoders and
   tokenizers, a wider transformer) trained here by flow matching on drawn pictures of coloured
   shapes described by their prompts. Its "latents" are the pictures themselves, 2x average-pooled
   (RGB and grey), so every sample can be looked at directly.
2. Two readings of prompt adherence: a judge (a small classifier trained on drawn pictures, which also
   gives the features of the Frechet distance) and a strict one straight from the pixels, independent of
   any trained network (strict_reading: majority colours, and the shape's fill of its bounding box).
3. The runs: groups of settings (a plan), each the main script distilling the teacher into a student
   (all weights, LoRA of a rank, or a half-depth copy that cannot copy its teacher), on-policy,
   off-policy or the DAgger mix (equal updates, equal teacher calls), for each seed, as separate
   processes, several at once (--jobs).
4. Each student is measured apart from its run, through diffusers' StableDiffusion3Pipeline, on 12
   held-out prompts x 8 fixed noises: the gap (latent MSE to the teacher's guided 28-step sample
   from the same noise), the Frechet distance of the judge's features to drawn pictures of the same
   prompts, and both adherence readings. Beside them, at each K and step spacing: the teacher
   unguided in K steps (the student before training), guided in K steps (the floor of N = 1), and
   guided with as many transformer passes as the student (equal cost). From the runs' own evaluations:
   the state drift along training (how far the student's states lie from the teacher's path).

    python scripts/experiment_onpolicy_vs_offpolicy.py --out outputs_colab/experiment --jobs 12
    python scripts/experiment_onpolicy_vs_offpolicy.py --out ... --plan plan.json --jobs 15   (groups of settings)
    python scripts/experiment_onpolicy_vs_offpolicy.py --out ... --solver-error                (the substep solvers)

On one GPU the runs' processes overlap only under NVIDIA's MPS daemon: start it first
(nvidia-cuda-mps-control -d). Without it, 14 runs at once took 0.69 s per update each on an H200.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
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
from distill_module import SD3_CONFIGS, build_transformer, load_distill, run_main_process  # noqa: E402  (the main script)
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
          "white": (245, 245, 245), "black": (20, 20, 20), "orange": (245, 140, 30), "purple": (140, 50, 180)}
DEFAULT_COLORS = 6  # the first six: 90 prompts; --colors 8 gives 168
SHAPES = ("circle", "square", "triangle")
# Settings of the main script for the distillation runs (a group's own args, then this command line's, come after).
# Deterministic rollouts: the on-policy states are then exactly those the student visits when it samples
# (as the evaluation and diffusers' pipeline do). All 32 images of an update in one rollout: the model is small.
GUIDANCE = 3.0  # the teacher's guidance, distilled into the student and used for the reference (--guidance)
HELDOUT = 12  # the last 12 shape prompts are never trained on
REFERENCE_STEPS = 28  # the teacher's guided sampler that the final, pipeline-measured gap compares against
RUN_EVAL_NOISES = 8  # fixed noises per held-out prompt in the runs' own evaluation (the curves)
# DMD_WEIGHT and the LoRA's layers are the product's ("auto", resolved at each run's K): a group that names neither
# trains what users run (until 2026-12-07 DMD was off unless a group set it).
DISTILL_ARGS = ["--LEARNING_RATE=2e-4", "--LR_SCHEDULER=cosine", "--LR_WARMUP_STEPS=5", "--KL_WARMUP_STEPS=10",
                "--IMAGES_PER_STEP=32", "--BATCH_SIZE=32", "--STOCHASTIC_ROLLOUT=false", "--COMPILE=false",
                f"--TEACHER_EVAL_STEPS={REFERENCE_STEPS}"]
REGIMES = {"on_policy": 1.0, "off_policy": 0.0, "dagger": 0.5}  # each regime's ON_POLICY_FRACTION
STUDENTS = {  # what each kind of student is, as settings of the main script ("half-depth" also gets its STUDENT_ID)
    "all": ["--TRAINABLE=all"],  # a full copy of the teacher: it can copy it exactly
    "lora-r4": ["--TRAINABLE=lora", "--LORA_RANK=4", "--LORA_ALPHA=4"],  # rank / width 3%, as r32 on SD3-medium's 1536
    "lora-r16": ["--TRAINABLE=lora", "--LORA_RANK=16", "--LORA_ALPHA=16"],
    "lora-r64": ["--TRAINABLE=lora", "--LORA_RANK=64", "--LORA_ALPHA=64"],  # half the teacher's width
    "half-depth": ["--TRAINABLE=all"],  # every other block of the teacher (half_depth_student)
}
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


def pipeline_latents(pipe, prompts: list[str], noise, steps: int, guidance: float, sigmas: list | None = None):
    """Samples through diffusers' own StableDiffusion3Pipeline (not the main script's sampler): latents. `sigmas`:
    the sampler's own (the main script's pipeline_sigmas), else the scheduler's K steps."""
    pipe.set_progress_bar_config(disable=True)
    steps = {"sigmas": sigmas} if sigmas else {"num_inference_steps": steps}
    return pipe(prompts, guidance_scale=guidance, latents=noise, height=32, width=32, output_type="latent",
                max_sequence_length=32, **steps).images


def strict_reading(latents, num_colors: int):
    """What a latent shows, read straight from its pixels, with no trained network: (shape, shape colour,
    background) indices per latent, as labels() gives them (-1 where no shape is found).

    Background: the majority palette colour of the border. Shape colour: the majority of the other pixels.
    Shape: each pixel's coverage a in [0, 1] by the shape colour (its projection on the line from background to
    shape colour: 2x pooling mixes the two linearly), in the largest connected part (a > 0.5, with its edge);
    fill = sum a / (width x height), width and height the sums of the column and row maxima of a:
    a square fills its box (1), a circle pi/4 (0.79), a triangle half (0.5)."""
    import torch

    palette = torch.tensor([COLORS[c] for c in list(COLORS)[:num_colors]], dtype=torch.float32)
    readings = []
    for latent in latents:
        rgb = ((latent[:3].float().cpu().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0)
        nearest = torch.cdist(rgb.reshape(-1, 3), palette).argmin(1).reshape(rgb.shape[:2])
        border = torch.cat([nearest[0], nearest[-1], nearest[1:-1, 0], nearest[1:-1, -1]])
        background = int(torch.bincount(border, minlength=num_colors).argmax())
        inside = nearest[nearest != background]
        if inside.numel() == 0:
            readings.append((-1, -1, background))
            continue
        color = int(torch.bincount(inside, minlength=num_colors).argmax())
        bg, fg = palette[background], palette[color]
        coverage = (((rgb - bg) @ (fg - bg)) / (fg - bg).square().sum()).clamp(0, 1)
        part = largest_component(coverage > 0.5)
        edge = part.clone()
        edge[1:] |= part[:-1]
        edge[:-1] |= part[1:]
        edge[:, 1:] |= part[:, :-1]
        edge[:, :-1] |= part[:, 1:]
        a = coverage * edge
        box = a.max(0).values.sum() * a.max(1).values.sum()
        fill = float(a.sum() / box.clamp(min=1e-6))
        shape = "square" if fill > 0.89 else "circle" if fill > 0.64 else "triangle"
        readings.append((SHAPES.index(shape), color, background))
    return torch.tensor(readings)


def largest_component(mask):
    """The largest 4-connected part of a boolean (H, W) mask."""
    import torch

    height, width = mask.shape
    on, seen, best = mask.tolist(), set(), []
    for start in ((y, x) for y in range(height) for x in range(width) if on[y][x]):
        if start in seen:
            continue
        seen.add(start)
        stack, part = [start], []
        while stack:
            y, x = stack.pop()
            part.append((y, x))
            for n in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= n[0] < height and 0 <= n[1] < width and on[n[0]][n[1]] and n not in seen:
                    seen.add(n)
                    stack.append(n)
        best = max(best, part, key=len)
    out = torch.zeros_like(mask)
    for y, x in best:
        out[y, x] = True
    return out


def accuracy(readings, answers, questions=("shape", "color", "background")) -> dict:
    """The share of right answers, per question."""
    return {name: float((readings[:, k].cpu() == answers[:, k]).float().mean()) for k, name in enumerate(questions)}


def drawn_bank(prompts: list[dict], per_prompt: int, seed: int):
    """`per_prompt` drawn pictures of every prompt, as latents: a (P, per_prompt, 4, 16, 16) tensor."""
    import torch

    rng = random.Random(seed)
    return torch.stack([torch.stack([to_latent(draw(p, rng)) for _ in range(per_prompt)]) for p in prompts])


DIGITS_CSV = HERE / "data" / "digits.csv.gz"  # scikit-learn's copy of the UCI handwritten digits (see data/README.md)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_PHRASES = ("a handwritten digit {d}", "the number {w}, written by hand", "a handwritten {w}",
                 "handwriting of the digit {d}")


def digit_prompts() -> list[dict]:
    """10 digits x 4 phrasings, shuffled (seed 0): 40 prompts, of which the last HELDOUT are held out."""
    prompts = [{"prompt": phrase.format(d=d, w=DIGIT_WORDS[d]), "digit": d} for d in range(10) for phrase in DIGIT_PHRASES]
    random.Random(0).shuffle(prompts)
    return [{"id": i, **p, "category": str(p["digit"])} for i, p in enumerate(prompts)]


@functools.cache
def digit_images():
    """The 1,797 real 8x8 digits as (images in [-1, 1], labels), split by index: even rows train (the teacher and the
    classifier learn from them), odd rows are held out (the Frechet distance's real pictures)."""
    import gzip

    import torch

    rows = [[float(v) for v in line.split(",")] for line in gzip.open(DIGITS_CSV, "rt").read().split()]
    data = torch.tensor(rows)
    return data[:, :64].reshape(-1, 8, 8) / 8 - 1, data[:, 64].long()


def digit_latent(image, corner: tuple | None = None):
    """An 8x8 digit -> a (4, 16, 16) 'latent' as the shapes' are, grey in all four channels: upscaled 2x (bilinear),
    or, given a corner (y, x), at its own size on an empty canvas (-1) with its top-left pixel there."""
    import torch

    if corner is None:
        up = torch.nn.functional.interpolate(image[None, None], scale_factor=2, mode="bilinear", align_corners=False)[0]
        return up.expand(4, -1, -1).clone()
    canvas = torch.full((16, 16), -1.0)
    canvas[corner[0]:corner[0] + 8, corner[1]:corner[1] + 8] = image
    return canvas.expand(4, -1, -1).clone()


@dataclasses.dataclass
class Task:
    """What the experiment distils on: its prompts, what a sample of a prompt should show (the questions and their
    answers), real pictures of a prompt, and a reading that needs no trained network where there is one."""

    name: str
    prompts: list
    questions: tuple
    classes: tuple  # classes per question
    num_colors: int = DEFAULT_COLORS

    def answers(self, prompts: list[dict]):
        import torch

        if self.name != "shapes":
            return torch.tensor([[p["digit"]] for p in prompts])
        return labels(prompts, self.num_colors)

    def bank(self, prompts: list[dict], per_prompt: int, seed: int, held_out: bool = False):
        """`per_prompt` pictures of every prompt, (P, per_prompt, 4, 16, 16): drawn shapes, or real digits of the
        prompt's digit, picked at random from the training rows (or, held_out, from the others): upscaled to fill
        the picture ("digits"), or at their own size anywhere in it ("digits-anywhere", as the shapes are placed)."""
        import torch

        if self.name == "shapes":
            return drawn_bank(prompts, per_prompt, seed)
        images, digits = digit_images()
        rng, rows = random.Random(seed), torch.arange(len(digits))
        pools = {d: [int(i) for i in rows[(digits == d) & (rows % 2 == int(held_out))]] for d in range(10)}

        def picture(digit):
            corner = (rng.randrange(9), rng.randrange(9)) if self.name == "digits-anywhere" else None
            return digit_latent(images[rng.choice(pools[digit])], corner)

        return torch.stack([torch.stack([picture(p["digit"]) for _ in range(per_prompt)]) for p in prompts])

    def strict(self, latents):
        """The strict reading (shapes only; None for the digits, which only the classifier reads)."""
        return strict_reading(latents, self.num_colors) if self.name == "shapes" else None


TASK_FILES = {  # each task's prompts, teacher and judge, by the names they have in --out
    "shapes": ("shape_prompts.jsonl", "shape_teacher_{colors}colors", "judge_{colors}colors"),
    "digits": ("digit_prompts.jsonl", "digit_teacher", "judge_digits"),
    "digits-anywhere": ("digit_prompts.jsonl", "digit_anywhere_teacher", "judge_digits_anywhere"),
}


def make_task(name: str, num_colors: int) -> Task:
    if name == "shapes":
        return Task("shapes", shape_prompts(num_colors), ("shape", "color", "background"),
                    (len(SHAPES), num_colors, num_colors), num_colors)
    return Task(name, digit_prompts(), ("digit",), (10,))


def device_for_helpers():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_teacher(distill, base_path: str, folder: Path, task: Task, steps: int, root: Path, width: int,
                  layers: int, batch: int) -> None:
    """Flow matching as SD3 is trained (x_t = (1-s) x0 + s eps, target v = eps - x0, logit-normal s),
    with 10% of prompts dropped to the empty one so that guidance works; saved as a diffusers folder.
    Pictures come from a bank made once (256 per prompt), so a GPU is not kept waiting on drawing."""
    import torch
    from diffusers import SD3Transformer2DModel

    device, prompts = device_for_helpers(), task.prompts
    config = distill.parse_args(["--preset", "tiny", f"--OUTPUT_ROOT={root}", "--T5_MAX_LENGTH=32"])
    text = distill.encode_prompts_cached([p["prompt"] for p in prompts], base_path, config, torch.device("cpu"),
                                         root / "cache")
    bank = task.bank(prompts, 256, seed=1).to(device)
    text = distill.TextEmbeddings(text.embeds.to(device), text.pooled.to(device), text.empty_embeds.to(device),
                                  text.empty_pooled.to(device))  # indexed on the device: no host sync per step
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
                                  attention_head_dim=width // 4, num_attention_heads=4, joint_attention_dim=32,
                                  caption_projection_dim=width, pooled_projection_dim=64, pos_embed_max_size=32,
                                  qk_norm="rms_norm").to(device)
    cuda = device.type == "cuda"
    if cuda:  # a small model: the host's kernel launches, not the GPU, set the pace, so fuse them
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True  # where a block cannot compile, it runs as it is
        for block in model.transformer_blocks:
            block.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=cuda)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100) * (1 - s / steps) + 0.05)
    generator = torch.Generator(device).manual_seed(0)
    for step in range(steps):
        chosen = torch.randint(len(prompts), (batch,), generator=generator, device=device)
        x0 = bank[chosen, torch.randint(bank.shape[1], (batch,), generator=generator, device=device)]
        embeds, pooled = text.batch(chosen, device, torch.float32)
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


def make_judge(classes: tuple):
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
            self.heads = nn.ModuleList([nn.Linear(64, n) for n in classes])

        def forward(self, x):
            f = self.features(x)
            return f, [head(f) for head in self.heads]

    return Judge()


def train_judge(task: Task, path: Path, steps: int):
    """Trained on pictures of every prompt (drawn shapes at random positions and sizes; the training rows of the real
    digits); kept at `path`."""
    import torch

    device = device_for_helpers()
    judge = make_judge(task.classes).to(device)
    if path.is_file():
        judge.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        return judge.eval()
    torch.manual_seed(0)
    prompts = task.prompts
    bank, answers = task.bank(prompts, 64, seed=2).to(device), task.answers(prompts).to(device)
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
    prompts, the judge, and the main script (for its samplers)."""

    distill: object
    teacher_pipe: object
    prompts: list  # texts, each held-out prompt noises_per_prompt times
    answers: object  # the three answers for each
    noise: object
    reference: object
    drawn_features: object
    judge: object
    guidance: float
    task: Task
    noises_per_prompt: int

    def measure(self, latents) -> dict:
        """gap (latent MSE to the reference), Frechet distance to the drawn pictures, both adherence readings, and the
        diversity ratio: the mean distance between two samples of one prompt (sample_diversity) over the reference's."""
        import torch

        with torch.no_grad():
            features, logits = self.judge(latents.to(next(self.judge.parameters()).device))
        diversity, strict = self.distill.sample_diversity, self.task.strict(latents)
        questions = self.task.questions
        return {"gap": (latents.cpu() - self.reference).square().mean().item(),
                "fd": frechet_distance(features.cpu(), self.drawn_features),
                "adherence": accuracy(torch.stack([lg.argmax(1) for lg in logits], 1), self.answers, questions),
                **({} if strict is None else {"adherence_strict": accuracy(strict, self.answers, questions)}),
                "diversity_ratio": (diversity(latents.cpu(), self.noises_per_prompt)
                                    / diversity(self.reference, self.noises_per_prompt))}

    def teacher(self, steps: int, guidance: float, spacing: str = "scheduler") -> dict:
        sigmas = self.distill.pipeline_sigmas(steps, spacing)
        return self.measure(pipeline_latents(self.teacher_pipe, self.prompts, self.noise, steps, guidance, sigmas))

    def baselines(self, steps: int, spacing: str) -> dict:
        """At K steps of a spacing: the teacher unguided (the student before training), guided (the floor of N = 1),
        and guided with as many transformer passes as a K-step student (K / 2 guided steps, at least one)."""
        equal = max(1, steps // 2)
        return {"no_training": self.teacher(steps, 1.0, spacing), "floor": self.teacher(steps, self.guidance, spacing),
                "equal_cost": self.teacher(equal, self.guidance, spacing), "equal_cost_steps": equal}

    def student_latents(self, root: Path, name: str, prompts: list[str], noise):
        """A run's exported student sampling through the pipeline with its own K steps, unguided: LoRA adapters
        loaded onto the teacher's pipeline (and taken off again), any other student as its own pipeline folder."""
        from diffusers import StableDiffusion3Pipeline

        config = json.loads((root / "runs" / name / "config.json").read_text())
        export, steps = root / "export" / name, config["NUM_ROLLOUT_STEPS"]
        sigmas = self.distill.pipeline_sigmas(steps, config["SAMPLER_SPACING"])
        if config["TRAINABLE"] != "lora":
            pipe = StableDiffusion3Pipeline.from_pretrained(export).to(self.teacher_pipe.device)
            return pipeline_latents(pipe, prompts, noise, steps, 1.0, sigmas)
        self.teacher_pipe.load_lora_weights(export)
        try:
            return pipeline_latents(self.teacher_pipe, prompts, noise, steps, 1.0, sigmas)
        finally:
            self.teacher_pipe.unload_lora_weights()

    def student(self, root: Path, name: str) -> dict:
        return self.measure(self.student_latents(root, name, self.prompts, self.noise))

    def checkpoint(self, root: Path, name: str, path: Path) -> dict:
        """The readings of the student a checkpoint of the run holds (its EMA where it has one), sampled as the
        export is: the checkpoint's weights in the run's STUDENT_ID transformer (with the script's own adapter in
        LoRA mode, DoRA included), then LoRA written by the export's own save_student_lora and loaded onto the
        teacher's pipeline, any other student as that transformer in the teacher's pipeline."""
        import tempfile

        import torch
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        config = json.loads((root / "runs" / name / "config.json").read_text())
        payload = torch.load(path, map_location="cpu", weights_only=True)
        weights = payload["student"]
        if "ema" in payload:
            weights = dict(zip(weights, payload["ema"]["shadow_params"], strict=True))
        steps = config["NUM_ROLLOUT_STEPS"]
        sigmas = self.distill.pipeline_sigmas(steps, config["SAMPLER_SPACING"])
        transformer = SD3Transformer2DModel.from_pretrained(config["STUDENT_ID"], subfolder="transformer")
        lora = config["TRAINABLE"] == "lora"
        if lora:
            self.distill.add_lora_adapter(transformer, config["LORA_RANK"], config["LORA_ALPHA"], config, "default",
                                          config["LORA_USE_DORA"])
        unexpected = transformer.load_state_dict(weights, strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"{path}: weights the student has no place for: {unexpected[:3]}")
        if not lora:
            pipe = StableDiffusion3Pipeline(**{**self.teacher_pipe.components, "transformer": transformer})
            return self.measure(pipeline_latents(pipe.to(self.teacher_pipe.device), self.prompts, self.noise, steps,
                                                 1.0, sigmas))
        with tempfile.TemporaryDirectory() as folder:
            self.distill.save_student_lora(folder, transformer)
            self.teacher_pipe.load_lora_weights(folder)
        try:
            return self.measure(pipeline_latents(self.teacher_pipe, self.prompts, self.noise, steps, 1.0, sigmas))
        finally:
            self.teacher_pipe.unload_lora_weights()


def final_eval(distill, teacher: Path, heldout: list[dict], noises_per_prompt: int, guidance: float, judge, task: Task):
    import torch
    from diffusers import StableDiffusion3Pipeline

    prompts = heldout * noises_per_prompt
    noise = torch.randn(len(prompts), 4, 16, 16, generator=torch.Generator().manual_seed(2026))
    teacher_pipe = StableDiffusion3Pipeline.from_pretrained(teacher).to(device_for_helpers())
    reference = pipeline_latents(teacher_pipe, [p["prompt"] for p in prompts], noise, REFERENCE_STEPS, guidance).cpu()
    drawn = task.bank(prompts, 1, seed=3, held_out=True)[:, 0].to(device_for_helpers())
    with torch.no_grad():
        drawn_features = judge(drawn)[0].cpu()
    return FinalEval(distill, teacher_pipe, [p["prompt"] for p in prompts], task.answers(prompts), noise,
                     reference, drawn_features, judge, guidance, task, noises_per_prompt)


def fill_carried_teacher(base: Path, teacher: Path) -> None:
    """A teacher carried from an earlier call may hold its transformer alone: the files it lacks come from the tiny
    base, and none it has is replaced (the tiny base's T5 tokenizer is learned when it is built, and differs between
    machines with other tokenizer versions: a teacher read with another machine's tokenizer ignores its prompts)."""
    def copy_if_missing(source, destination):
        if not os.path.exists(destination):
            shutil.copy2(source, destination)

    shutil.copytree(base, teacher, dirs_exist_ok=True, ignore=shutil.ignore_patterns("transformer"),
                    copy_function=copy_if_missing)


def half_depth_student(teacher: Path, folder: Path) -> Path:
    """The teacher's pipeline with every other transformer block (..., L-3, L-1: the last block, which only reads
    the text, stays last), the rest of the transformer copied: a student that cannot copy its teacher, as
    SD3.5-medium (24 blocks) is to SD3.5-large (38)."""
    from diffusers import SD3Transformer2DModel

    if folder.is_dir():
        return folder
    big = SD3Transformer2DModel.from_pretrained(teacher, subfolder="transformer")
    keep = list(range(big.config.num_layers - 1, -1, -2))[::-1]
    small = SD3Transformer2DModel.from_config({**big.config, "num_layers": len(keep)})
    state = {}
    for key, value in big.state_dict().items():
        parts = key.split(".")
        if parts[0] == "transformer_blocks":
            if int(parts[1]) not in keep:
                continue
            key = ".".join([parts[0], str(keep.index(int(parts[1])))] + parts[2:])
        state[key] = value
    small.load_state_dict(state)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(teacher, staging, ignore=shutil.ignore_patterns("transformer"))
    small.save_pretrained(staging / "transformer")
    os.replace(staging, folder)
    return folder


def distill_run(root: Path, teacher: Path, prompts_path: Path, run: dict, extra: list[str], env: dict):
    """One run of the main script in a process of its own, as a user starts it; raises with its error output."""
    student = root / "half_depth_student" if run["student"] == "half-depth" else teacher
    args = ["--preset", "tiny", f"--OUTPUT_ROOT={root}", f"--TEACHER_ID={teacher}", f"--STUDENT_ID={student}",
            "--GENERATE_PROMPTS=false", f"--PROMPTS_JSONL={prompts_path}", f"--HELDOUT_PROMPTS={HELDOUT}",
            f"--RUN_NAME={run['name']}", f"--ON_POLICY_FRACTION={REGIMES[run['regime']]}",
            f"--SEED={run['seed']}", f"--MAX_STEPS={run['steps']}", f"--NUM_ROLLOUT_STEPS={run['K']}",
            f"--TEACHER_SUBSTEPS={run['N']}", f"--TEACHER_SOLVER={run['solver']}", f"--SUPERVISED_STATES={run['M']}",
            "--EVAL_EVERY=25",
            f"--EVAL_NOISES={RUN_EVAL_NOISES}", "--LOG_EVERY=10", f"--CHECKPOINT_EVERY={run['steps']}",
            "--SAVE_SAMPLE_GRIDS=false", "--T5_MAX_LENGTH=32", "--USE_T5=true", *extra, *STUDENTS[run["student"]],
            *run["args"]]
    result = run_main_process(args, env)
    if result.returncode != 0:
        raise RuntimeError(f"run {run['name']} failed:\n{result.stderr[-3000:]}")


def run_record(root: Path, run: dict, ev: FinalEval) -> dict:
    """What one finished run measured: the final measurement, its own curves (gap, state drift, wall seconds), its cost."""
    name = run["name"]
    summary = json.loads((root / "runs" / name / "train_summary.json").read_text())
    config = json.loads((root / "runs" / name / "config.json").read_text())
    rows = [json.loads(line) for line in (root / "metrics" / name / "eval.jsonl").read_text().splitlines()]
    start = rows[0].get("time", 0)
    logged = [json.loads(line) for line in (root / "metrics" / name / "metrics.jsonl").read_text().splitlines()]
    windows = ev.distill.step_windows(logged)  # each row's window of steps, in seconds
    readings = []  # with checkpoints_every: each kept checkpoint's student read as the export is
    if run.get("checkpoints_every"):
        kept = ev.distill.CheckpointDir(ev.distill.RunPaths(root, name), keep=1)  # only read: the script's step files
        for path in kept.step_files() + [kept.folder / "final.pt"]:
            step = int(path.stem[5:]) if path.stem.startswith("step_") else summary["step"]  # final.pt: the last
            readings.append({"step": step, "train_seconds": sum(sec for end, sec in windows if end <= step),
                             **ev.checkpoint(root, name, path)})
    return {**run, **ev.student(root, name), "readings_curve": readings,
            "curve": [(r["step"], r["eval_gap"]) for r in rows],
            "drift_curve": [(r["step"], r.get("eval_drift")) for r in rows], "state_drift": rows[-1].get("state_drift"),
            "seconds_curve": [(r["step"], r.get("time", 0) - start) for r in rows],
            "train_seconds": summary["timings"]["train_seconds"], "updates": summary["step"],
            "train_seconds_logged": summary["timings"]["train_seconds_across_resumes"],  # also one resumed elsewhere
            "solver": ev.distill.teacher_solver(config), "spacing": config["SAMPLER_SPACING"],
            "learning_rate": config["LEARNING_RATE"], "teacher_fp8": summary["teacher_fp8"],
            "device_name": summary.get("device_name", summary["device"]), "config": config,
            "teacher_passes_per_update": ev.distill.teacher_passes_per_step(config)}


def plan_runs(groups: list[dict], distill) -> list[dict]:
    """Every run of a plan: each group's K x N x M x regime x seed (M = K is all states: skipped as the same as 0)."""
    runs = []
    for g in groups:
        tag, student = g.get("tag", ""), g.get("student", "all")
        if student not in STUDENTS:
            raise SystemExit(f"unknown student {student!r}; choose one of {sorted(STUDENTS)}")
        for K in g["k"]:
            solver = distill.teacher_solver({"TEACHER_SOLVER": g["solver"], "NUM_ROLLOUT_STEPS": K})
            for N in [distill.teacher_substeps({"TEACHER_SUBSTEPS": n, "NUM_ROLLOUT_STEPS": K}) for n in g["n"]]:
                for M in g.get("m", [0]):
                    if M and M >= K:
                        continue
                    for regime in g["regimes"]:
                        for seed in g["seeds"]:
                            # the solver is in the name where not Euler, as it is in none of the earlier records
                            name = (f"{student}-K{K}-N{N}{'' if solver == 'euler' else solver}-M{M}"
                                    f"{'-' + tag if tag else ''}-{regime}-seed{seed}")
                            every = g.get("checkpoints_every", 0)  # readings along training, from checkpoints
                            kept = [f"--CHECKPOINT_EVERY={every}", "--KEEP_LAST_CHECKPOINTS=100000"] if every else []
                            runs.append({"name": name, "K": K, "N": N, "M": M, "tag": tag, "student": student,
                                         "solver": solver, "regime": regime, "seed": seed, "steps": g["steps"],
                                         "args": [*g.get("args", []), *kept], "checkpoints_every": every})
    return runs


def settings_table(records: list[dict], baselines: dict, reference: dict, defaults_at) -> list[dict]:
    """One entry per (student, K, N, M, tag): means over seeds of each regime, beside the baselines of its K and
    spacing, and the scheduler spacing's (where the quality target is set)."""
    groups = {}
    for r in records:
        groups.setdefault((r.get("student", "all"), r["K"], r["N"], r["solver"], r["M"], r["tag"]), []).append(r)
    entries = []
    for (student, K, N, solver, M, tag), rs in sorted(groups.items()):
        base, plain = baselines[(K, rs[0]["spacing"])], baselines[(K, "scheduler")]
        entry = {"student": student, "rollout_steps": K, "teacher_substeps": N, "supervised_states": M or K, "tag": tag,
                 "solver": solver, "spacing": rs[0]["spacing"], "learning_rate": rs[0]["learning_rate"],
                 "args": rs[0].get("args", []), "updates": rs[0]["updates"],
                 "teacher_fp8": sorted({r.get("teacher_fp8") for r in rs}, key=str),
                 "devices": sorted({r.get("device_name") or r.get("device", "") for r in rs}),
                 "settings_off_the_product_defaults": settings_off_defaults(rs[0].get("config"), defaults_at),
                 "floor": base["floor"]["gap"], "equal_cost": base["equal_cost"]["gap"],
                 "equal_cost_guided_steps": base["equal_cost_steps"], "gap_no_training": base["no_training"]["gap"],
                 "floor_scheduler": plain["floor"]["gap"], "gap_no_training_scheduler": plain["no_training"]["gap"],
                 "fd_reference": reference["fd"], "fd_floor": base["floor"]["fd"],
                 "fd_equal_cost": base["equal_cost"]["fd"], "fd_no_training": base["no_training"]["fd"],
                 "teacher_passes_per_update": rs[0]["teacher_passes_per_update"],
                 "diversity_ratio_floor": base["floor"].get("diversity_ratio"),
                 "diversity_ratio_no_training": base["no_training"].get("diversity_ratio")}
        for reading in [r for r in ("adherence", "adherence_strict") if r in reference]:
            entry.update({f"{reading}_reference": reference[reading], f"{reading}_floor": base["floor"][reading],
                          f"{reading}_equal_cost": base["equal_cost"][reading],
                          f"{reading}_no_training": base["no_training"][reading]})
        for regime in REGIMES:
            mine = sorted((r for r in rs if r["regime"] == regime), key=lambda r: r["seed"])
            if not mine:
                continue
            gaps = [r["gap"] for r in mine]
            entry.update({
                f"gap_{regime}": statistics.mean(gaps), f"gap_{regime}_per_seed": gaps,
                f"gap_{regime}_seed_std": statistics.stdev(gaps) if len(gaps) > 1 else None,
                f"gap_to_floor_{regime}": statistics.mean(gaps) / base["floor"]["gap"],
                f"fd_{regime}": statistics.mean(r["fd"] for r in mine),
                f"fd_{regime}_per_seed": [r["fd"] for r in mine],
                f"diversity_ratio_{regime}": (statistics.mean(r["diversity_ratio"] for r in mine)
                                              if all("diversity_ratio" in r for r in mine) else None),
                f"train_seconds_{regime}": statistics.mean(r.get("train_seconds_logged", r["train_seconds"])
                                                           for r in mine),  # all of a resumed run's processes
                f"curve_{regime}": mean_curve([r["curve"] for r in mine]),
                f"seconds_curve_{regime}": mean_curve([r["seconds_curve"] for r in mine])})
            if any(r.get("readings_curve") for r in mine):  # the readings along training, per seed
                entry[f"readings_curve_{regime}_per_seed"] = [r.get("readings_curve") for r in mine]
            for reading in [r for r in ("adherence", "adherence_strict") if r in mine[0]]:
                entry[f"{reading}_{regime}"] = {k: statistics.mean(r[reading][k] for r in mine) for k in mine[0][reading]}
            if mine[0]["drift_curve"][-1][1] is not None:  # K = 1 has no state past the noise
                entry[f"drift_{regime}"] = statistics.mean(r["drift_curve"][-1][1] for r in mine)
                entry[f"drift_curve_{regime}"] = mean_curve([r["drift_curve"] for r in mine])
                entry[f"state_drift_{regime}"] = [statistics.mean(s) for s in zip(*(r["state_drift"] for r in mine))]
        entries.append(entry)
    return entries


def settings_off_defaults(config: dict | None, defaults_at) -> dict:
    """The run's settings of the main script that differ from the script's own defaults at its K (`defaults_at(K)`:
    the "auto" settings resolved as a user's run at that K resolves them; where its runs go, names and how often it
    logs left out): what the evidence ran with that a user's run would not."""
    if not config:
        return {}
    defaults = defaults_at(config["NUM_ROLLOUT_STEPS"])
    ignored = {"OUTPUT_ROOT", "RUN_NAME", "PROMPTS_JSONL", "TEACHER_ID", "STUDENT_ID", "LOG_EVERY", "CHECKPOINT_EVERY",
               "EVAL_EVERY", "SAVE_SAMPLE_GRIDS", "SEED"}
    return {k: v for k, v in sorted(config.items()) if k not in ignored and defaults.get(k) != v}


def mean_curve(curves: list[list]) -> list:
    steps = [s for s, _ in curves[0]]
    return [(s, statistics.mean(c[i][1] for c in curves)) for i, s in enumerate(steps)]


def add_cost_to_reach(entries: list[dict], jobs: int) -> None:
    """Which setting reaches a given quality first. At each K and spacing the target is 0.6 x the floor: the guided
    teacher's own K-step sample with the same step spacing (its best few-step sampler).
    For each on-policy setting, from its seed-mean held-out curve: the updates until it first reached the target,
    the teacher passes they took, and the run's wall seconds until then (on a GPU shared by `jobs` runs at once)."""
    for e in entries:
        e["quality_target"] = target = 0.6 * e["floor"]
        e["quality_target_rule"] = "0.6 x the guided teacher's own K-step gap with the run's step spacing"
        reached = next((step for step, gap in e.get("curve_on_policy", []) if gap <= target), None)
        e["updates_to_reach_target"] = reached
        e["teacher_passes_to_reach_target"] = None if reached is None else reached * e["teacher_passes_per_update"]
        seconds = dict(e.get("seconds_curve_on_policy", []))
        e["gpu_seconds_to_reach_target"] = seconds.get(reached)
        e["timing"] = f"wall seconds of the run's process, {jobs} runs sharing the GPU (MPS) or the CPU"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs_colab/experiment")
    parser.add_argument("--plan", help="a JSON list of groups of runs, each {tag, student, k, n, solver, m, regimes, seeds, "
                                       "steps, args, checkpoints_every}; what a group leaves out comes from the options "
                                       "below; checkpoints_every N: the student read at every N updates too, from its "
                                       "checkpoints (readings_curve)")
    parser.add_argument("--student", default="all", choices=sorted(STUDENTS), help="the student's kind")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200, help="student updates per run")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="K, the student's sampler steps")
    parser.add_argument("--n", type=int, nargs="+", default=[0], help="N, the teacher's substeps per step (0: the "
                        "script's default, 8 // K)")
    parser.add_argument("--solver", default="auto", help="the teacher's substep solver (TEACHER_SOLVER; auto: the "
                        "script's default, AB2 at K >= 4 and Euler below)")
    parser.add_argument("--m", type=int, nargs="+", default=[0], help="supervised states per rollout (0 = all K)")
    parser.add_argument("--regimes", nargs="+", default=["on_policy", "off_policy"], choices=sorted(REGIMES))
    parser.add_argument("--tag", default="", help="a name for this variant (with the settings passed through)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each a process; 15 suit one GPU under MPS)")
    parser.add_argument("--tabulate-only", action="store_true", help="start no run: tabulate the records there are")
    parser.add_argument("--teacher-steps", type=int, default=6000)
    parser.add_argument("--teacher-width", type=int, default=128)
    parser.add_argument("--teacher-layers", type=int, default=6)
    parser.add_argument("--teacher-batch", type=int, default=128)
    parser.add_argument("--judge-steps", type=int, default=1000, help="training steps of the classifier")
    parser.add_argument("--guidance", type=float, default=GUIDANCE, help="the teacher's guidance scale")
    parser.add_argument("--task", default="shapes", choices=sorted(TASK_FILES), help="coloured shapes drawn "
                        "here, or scikit-learn's 1,797 real handwritten digits (scripts/data), read by a classifier: "
                        "upscaled to fill the picture, or (digits-anywhere) at their own size anywhere in it")
    parser.add_argument("--colors", type=int, default=DEFAULT_COLORS, choices=range(3, len(COLORS) + 1),
                        help=f"colours of shape and background: 3 n (n - 1) prompts ({DEFAULT_COLORS}: 90, 8: 168)")
    parser.add_argument("--eval-noises", type=int, default=8, help="fixed noises per held-out prompt, final evaluation")
    parser.add_argument("--fp8-teacher", action="store_true", help="instead of the runs: the teacher with FP8 matmuls "
                        "(TEACHER_FP8) against itself, its samples measured as the students' are")
    parser.add_argument("--solver-error", action="store_true", help="instead of the runs: each substep solver's target "
                        "against a 64-substep Euler solve, at equal teacher passes (with --real-size: on random weights)")
    parser.add_argument("--real-size", help="instead: a short run on a random model of this architecture "
                                             "(sd3-medium, sd3.5-medium, sd3.5-large), for a GPU")
    parser.add_argument("--image-size", type=int, default=1024, help="--solver-error --real-size: the image size")
    parser.add_argument("--real-size-layers", type=int, help=argparse.SUPPRESS)  # small smoke tests on a CPU
    args, passthrough = parser.parse_known_args(argv)  # the rest goes to the main script as --NAME=VALUE
    if args.real_size and args.solver_error:
        return real_size_solver_error(args)
    if args.real_size:
        return real_size_run(args, REAL_SIZE_ARGS + passthrough)

    import torch

    distill = load_distill()
    distill.quiet_libraries()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    task = make_task(args.task, args.colors)
    prompts = task.prompts
    prompts_name, teacher_name, judge_name = (n.format(colors=args.colors) for n in TASK_FILES[task.name])
    prompts_path = root / prompts_name
    distill.write_prompts_jsonl(prompts_path, [{k: p[k] for k in ("id", "prompt", "category")} for p in prompts])
    base = distill.resolve_model_path(distill.TINY_MODEL_ID, str(root))
    teacher = root / f"{teacher_name}_w{args.teacher_width}_l{args.teacher_layers}_s{args.teacher_steps}_b{args.teacher_batch}"
    started = time.time()
    if not (teacher / "transformer" / "config.json").is_file():
        train_teacher(distill, base, teacher, task, args.teacher_steps, root, args.teacher_width, args.teacher_layers,
                      args.teacher_batch)
    else:
        fill_carried_teacher(base, teacher)
    teacher_seconds = time.time() - started
    judge = train_judge(task, root / f"{judge_name}_s{args.judge_steps}.pt", args.judge_steps)
    ev = final_eval(distill, teacher, prompts[-HELDOUT:], args.eval_noises, args.guidance, judge, task)
    reference = ev.teacher(REFERENCE_STEPS, args.guidance)
    if args.fp8_teacher:
        return fp8_teacher_check(distill, ev, root, args.guidance)
    if args.solver_error:
        return trained_teacher_solver_error(distill, ev, root, args.guidance)
    drawn = ev.measure(task.bank(prompts[-HELDOUT:] * args.eval_noises, 1, seed=4, held_out=True)[:, 0])
    print(f"on real pictures: judge {drawn['adherence']}, strict {drawn.get('adherence_strict')}; on the teacher's "
          f"{REFERENCE_STEPS}-step samples: judge {reference['adherence']}, strict {reference.get('adherence_strict')}, "
          f"FD {reference['fd']:.3f}", flush=True)
    records_dir = root / "records"
    records_dir.mkdir(exist_ok=True)
    defaults = {"tag": args.tag, "student": args.student, "k": args.k, "n": args.n, "m": args.m, "solver": args.solver,
                "regimes": args.regimes, "seeds": args.seeds, "steps": args.steps, "args": []}
    groups = json.loads(Path(args.plan).read_text()) if args.plan else [{}]
    runs = [] if args.tabulate_only else plan_runs([{**defaults, **g} for g in groups], distill)
    todo = [r for r in runs if not (records_dir / f"{r['name']}.json").is_file()]
    if any(r["student"] == "half-depth" for r in todo):  # made here: loading models in the runs' threads is not safe
        half_depth_student(teacher, root / "half_depth_student")
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if args.jobs > 1 else {})}
    extra = [*DISTILL_ARGS, f"--GUIDANCE_SCALE={args.guidance}", *passthrough]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(distill_run, root, teacher, prompts_path, r, extra, env): r for r in todo}
        for future in concurrent.futures.as_completed(futures):
            run = futures[future]
            try:
                future.result()
            except RuntimeError as err:  # one failed run is reported; the others go on
                print(err, flush=True)
                continue
            record = run_record(root, run, ev)
            (records_dir / f"{run['name']}.json").write_text(json.dumps(record))
            if run["seed"] != 0:  # measured; seed 0's export stays for the pictures, every checkpoint keeps the weights
                shutil.rmtree(root / "export" / run["name"])
            print(f"{run['name']}: gap {record['gap']:.4f}, FD {record['fd']:.1f}, adherence "
                  f"{fmt_adherence(record['adherence'])}, strict {fmt_adherence(record.get('adherence_strict'))}, "
                  f"{record['train_seconds']:.0f} s", flush=True)
    # Every record in the folder, this command's and earlier ones' (other groups, tags), makes the table.
    records = [json.loads(p.read_text()) for p in sorted(records_dir.glob("*.json"))]
    needed = {(r["K"], spacing) for r in records for spacing in (r["spacing"], "scheduler")}
    entries = settings_table(records, {key: ev.baselines(*key) for key in sorted(needed)}, reference,
                             lambda k: distill.parse_args([f"--NUM_ROLLOUT_STEPS={k}"]))
    add_cost_to_reach(entries, args.jobs)
    summary = {
        "command": "python scripts/experiment_onpolicy_vs_offpolicy.py " + " ".join(argv or sys.argv[1:]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d"), "guidance": args.guidance,
        "teacher": {"folder": teacher.name, "train_seconds_this_command": teacher_seconds},
        "final_eval": f"{HELDOUT} held-out prompts x {args.eval_noises} fixed noises, through StableDiffusion3Pipeline; "
                      f"gap = latent MSE to the teacher's guided {REFERENCE_STEPS}-step sample",
        "task": task.name, "judge_on_drawn_pictures": drawn["adherence"],
        "strict_on_drawn_pictures": drawn.get("adherence_strict"),
        "fd_drawn_vs_drawn": drawn["fd"], "reference": reference, "settings": entries,
    }
    (root / "results.json").write_text(json.dumps(summary, indent=2))
    print_table(entries, reference)
    plot_cost(entries, root / "quality_vs_cost.png")
    shown = [e for e in entries if "gap_on_policy" in e and e["rollout_steps"] == 4] or [e for e in entries
                                                                                         if "gap_on_policy" in e]
    if shown:
        pictures(root, ev, prompts, min(shown, key=lambda e: e["gap_on_policy"]), args.guidance)
    return summary


SOLVER_BUDGETS = (1, 2, 4, 8)  # teacher passes per student step at which the solvers are compared


def solver_errors(distill, velocity_fn, noise, sigmas, shift: float, reference_substeps: int = 64) -> dict:
    """Each solver's target at equal teacher passes against the target of a `reference_substeps`-substep Euler solve,
    at each state of the reference's own path from `noise`: relative MSE ||v* - v_ref||^2 / ||v_ref||^2 per state,
    as {solver: {passes: [per state]}} (passes per student step, a guided pass counted once)."""
    import torch

    errors = {solver: {} for solver in distill.TEACHER_SOLVERS}
    x = noise
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            reference = distill.teacher_target_velocity(velocity_fn, x, sigmas, i, reference_substeps, shift)
            for solver, per_substep in distill.TEACHER_SOLVERS.items():
                for passes in SOLVER_BUDGETS:
                    if passes % per_substep == 0:
                        v = distill.teacher_target_velocity(velocity_fn, x, sigmas, i, passes // per_substep, shift, solver)
                        errors[solver].setdefault(passes, []).append(
                            float((v - reference).square().mean() / reference.square().mean()))
            x = distill.euler_step(x, reference, float(sigmas[i]), float(sigmas[i + 1]))
    return errors


def trained_teacher_solver_error(distill, ev: FinalEval, root: Path, guidance: float) -> dict:
    """solver_errors for the trained teacher, guided, on the held-out prompts and noises, at K = 1, 2 and 4 (trailing)."""
    import torch

    pipe = ev.teacher_pipe
    cond, uncond = encode_for_teacher(pipe, ev.prompts)
    shift = pipe.scheduler.config.shift

    def velocity(y, t):
        return distill.teacher_velocity(pipe.transformer, y, t, cond, uncond, guidance, torch.float32)

    result = {"date": time.strftime("%Y-%m-%d"), "device": str(pipe.device), "model": "the trained shapes teacher",
              "guidance": guidance, "reference": "64 Euler substeps per student step", "errors": {}}
    for K in (1, 2, 4):
        sigmas, _ = distill.sampler_sigmas(dict(pipe.scheduler.config), K, None, 64, "trailing")
        result["errors"][f"K{K}"] = solver_errors(distill, velocity, ev.noise.to(pipe.device), sigmas, shift)
    (root / "solver_error.json").write_text(json.dumps(result, indent=2))
    print_solver_errors(result)
    return result


def real_size_solver_error(args) -> dict:
    """solver_errors on a random-weights transformer of a real architecture (--real-size), guided (7.0), one image
    of --image-size, random text embeddings, at K = 4 (trailing), in bf16 on a GPU."""
    import torch

    distill = load_distill()
    device = device_for_helpers()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = dict(SD3_CONFIGS[args.real_size], **({"num_layers": args.real_size_layers} if args.real_size_layers else {}))
    model = build_transformer(args.real_size, dtype, device, num_layers=config["num_layers"]).requires_grad_(False).eval()
    g = torch.Generator().manual_seed(0)
    latent = args.image_size // 8
    noise = torch.randn(1, config["in_channels"], latent, latent, generator=g).to(device)
    cond, uncond = [(torch.randn(1, 333, config["joint_attention_dim"], generator=g).to(device, dtype),
                     torch.randn(1, config["pooled_projection_dim"], generator=g).to(device, dtype)) for _ in range(2)]
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    sigmas, _ = distill.sampler_sigmas(scheduler, 4, None, (latent // 2) ** 2, "trailing")

    def velocity(y, t):
        return distill.teacher_velocity(model, y, t, cond, uncond, 7.0, dtype)

    started = time.time()
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "model": f"random {args.real_size}" + (f" ({args.real_size_layers} blocks)" if args.real_size_layers else ""),
              "image_size": args.image_size, "guidance": 7.0, "reference": "64 Euler substeps per student step",
              "errors": {"K4": solver_errors(distill, velocity, noise, sigmas, 3.0)}}
    result["seconds"] = time.time() - started
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"solver_error_{args.real_size}.json").write_text(json.dumps(result, indent=2))
    print_solver_errors(result)
    return result


def print_solver_errors(result: dict) -> None:
    print(f"{result['model']}: relative MSE of each target to the {result['reference']} one, mean over states")
    for k, per_solver in result["errors"].items():
        for solver, by_passes in per_solver.items():
            print(f"  {k} {solver:8} " + "  ".join(f"{passes} passes: {statistics.mean(e):.2e}"
                                                  for passes, e in by_passes.items()))


def encode_for_teacher(pipe, prompts: list[str]):
    """(embeds, pooled) of the prompts and of the empty prompt, through the teacher pipeline's encode_prompt."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, max_sequence_length=32,
                                              do_classifier_free_guidance=False)
    empty = [""] * len(prompts)
    uncond_embeds, _, uncond_pooled, _ = pipe.encode_prompt(empty, empty, empty, max_sequence_length=32,
                                                            do_classifier_free_guidance=False)
    return (embeds, pooled), (uncond_embeds, uncond_pooled)


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
    cond, uncond = encode_for_teacher(pipe, ev.prompts)
    device = pipe.device
    x, errors = ev.noise.to(device), []
    with torch.no_grad():
        for i in range(4):
            targets = [distill.teacher_target_velocity(
                lambda y, t, m=model: distill.teacher_velocity(m, y, t, cond, uncond, guidance, torch.float32),
                x, sigmas, i, 4, pipe.scheduler.config.shift)
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
    print(f"\nteacher, {REFERENCE_STEPS} steps: adherence judge {fmt_adherence(reference['adherence'])}, strict "
          f"{fmt_adherence(reference.get('adherence_strict'))}, FD {reference['fd']:.1f}")
    print("student    K  N  solver  spacing   tag     | no training  floor | gap on (seed std) / off / dagger "
          "| drift on / off | strict shape on / off | judge on | FD on | diversity on | passes/update, to target")
    for e in entries:
        def gap(regime):
            return "-" if f"gap_{regime}" not in e else f"{e[f'gap_{regime}']:.4f}"

        def value(key, fmt="{:.4f}"):
            return "-" if e.get(key) is None else fmt.format(e[key])

        def strict(regime):
            reading = e.get(f"adherence_strict_{regime}") or e.get(f"adherence_{regime}")
            return "-" if reading is None else f"{100 * next(iter(reading.values())):.0f}%"

        print(f"{e['student']:10} {e['rollout_steps']}  {e['teacher_substeps']}  {e['solver']:7} {e['spacing']:9} "
              f"{e['tag'] or '-':7} | {e['gap_no_training']:.4f}  {e['floor']:.4f} | {gap('on_policy')} "
              f"({value('gap_on_policy_seed_std')}) / {gap('off_policy')} / {gap('dagger')} | "
              f"{value('drift_on_policy')} / {value('drift_off_policy')} | {strict('on_policy')} / {strict('off_policy')} | "
              f"{fmt_adherence(e.get('adherence_on_policy'))} | {value('fd_on_policy', '{:.0f}')} | "
              f"{value('diversity_ratio_on_policy', '{:.2f}')} | {e['teacher_passes_per_update']}, "
              f"{value('teacher_passes_to_reach_target', '{}')}")


def fmt_adherence(a: dict | None) -> str:
    return "-" if a is None else "/".join(f"{100 * v:.0f}%" for v in a.values())


def plot_cost(entries: list[dict], path: Path) -> None:
    """Final on-policy gap against teacher passes per update, one colour per K (students of all weights)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; the numbers are in results.json")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for color, K in enumerate(sorted({e["rollout_steps"] for e in entries})):
        mine = [e for e in entries if e["rollout_steps"] == K and "gap_on_policy" in e and e["student"] == "all"]
        for e in mine:
            ax.scatter(e["teacher_passes_per_update"], e["gap_on_policy"], color=f"C{color}",
                       marker="o" if e["supervised_states"] == K else "s")
            ax.annotate(f"N={e['teacher_substeps']} {e['solver']}" + (f" {e['tag']}" if e["tag"] else ""),
                        (e["teacher_passes_per_update"], e["gap_on_policy"]), fontsize=6)
        if mine:
            ax.axhline(mine[0]["floor_scheduler"], color=f"C{color}", ls=":", lw=1,
                       label=f"K={K} (dotted: guided teacher, K steps)")
    ax.set(xlabel="teacher transformer passes per update", ylabel="held-out gap, on-policy (latent MSE)",
           xscale="log", yscale="log", title="few-step students: quality against teacher cost")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def pictures(root: Path, ev: FinalEval, prompts: list[dict], entry: dict, guidance: float) -> None:
    """Held-out prompts: the teacher's guided sample, the teacher in K steps unguided and guided, and the
    first seed's students of the given setting, each through the pipeline from the same noise."""
    import torch
    from PIL import Image, ImageDraw

    K, spacing = entry["rollout_steps"], entry["spacing"]
    name = (f"{entry['student']}-K{K}-N{entry['teacher_substeps']}-M{entry['supervised_states'] % K}"
            f"{'-' + entry['tag'] if entry['tag'] else ''}")
    heldout = [p["prompt"] for p in prompts[-6:]]
    noise = torch.randn(len(heldout), 4, 16, 16, generator=torch.Generator().manual_seed(7))
    sigmas = ev.distill.pipeline_sigmas(K, spacing)
    columns = [("teacher", lambda: pipeline_latents(ev.teacher_pipe, heldout, noise, REFERENCE_STEPS, guidance)),
               (f"{K} unguided", lambda: pipeline_latents(ev.teacher_pipe, heldout, noise, K, 1.0, sigmas)),
               (f"{K} guided", lambda: pipeline_latents(ev.teacher_pipe, heldout, noise, K, guidance, sigmas))]
    for regime in ("off_policy", "on_policy"):
        if (root / "export" / f"{name}-{regime}-seed0").is_dir():
            columns.append((regime.replace("_policy", "-policy"),
                            lambda r=regime: ev.student_latents(root, f"{name}-{r}-seed0", heldout, noise)))
    cell = 64
    sheet = Image.new("RGB", (len(columns) * cell + 200, len(heldout) * cell + 30), "white")
    draw_on = ImageDraw.Draw(sheet)
    for c, (title, sample) in enumerate(columns):
        draw_on.text((c * cell + 2, 2), title[:10], fill="black")
        for r, latent in enumerate(sample()):
            sheet.paste(to_picture(latent.cpu()), (c * cell, 30 + r * cell))
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
    run = json.loads((root / "runs" / f"real-{args.real_size}" / "train_summary.json").read_text())
    metrics = [json.loads(line) for line in
               (root / "metrics" / f"real-{args.real_size}" / "metrics.jsonl").read_text().splitlines()]
    summary = {"architecture": args.real_size, "command": " ".join(command[1:]), "date": time.strftime("%Y-%m-%d"),
               "device": run["device_name"], "gap": [(r["step"], r["eval_gap"]) for r in rows],
               "sec_per_step_after_the_first": statistics.median(r["sec_per_step"] for r in metrics[1:]) if metrics[1:] else None,
               "peak_mem_gb": max(r["peak_mem_gb"] or 0 for r in metrics), "teacher_fp8": run["teacher_fp8"],
               "batch_size": run["batch_size"], "train_seconds": run["timings"]["train_seconds"], "config": run["config"]}
    (root / f"real_size_{args.real_size}.json").write_text(json.dumps(summary, indent=2))
    print(f"{args.real_size}: held-out gap " + " ".join(f"{s}:{g:.4g}" for s, g in summary["gap"]))
    return summary


if __name__ == "__main__":
    main()
