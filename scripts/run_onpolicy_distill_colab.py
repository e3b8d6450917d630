#!/usr/bin/env python
"""On-policy distillation of Stable Diffusion 3, in one file.

The student samples its own few-step trajectory from noise; at every state it actually visits, the
frozen teacher (with classifier-free guidance) solves its own flow over the student's step in a few
substeps, and the student learns to take that step in one. Loss: epsilon MSE and latent (x0) MSE
against the teacher's step, plus (optionally, warmed up from 0) the KL between the two flow-DDIM
transitions, and (optionally, DMD_WEIGHT) DMD2's distribution matching on the student's own samples,
against a fake score that follows them: a second LoRA adapter on the same frozen weights.

Run it:   python scripts/run_onpolicy_distill_colab.py                  (edit the constants below)
          python scripts/run_onpolicy_distill_colab.py --preset tiny    (built-in tiny SD3, CPU, < 1 min)
          python scripts/run_onpolicy_distill_colab.py --MAX_STEPS=200 --LEARNING_RATE=5e-5

Sections: the config; the algorithm (flow-matching conversions, sampler transitions, the teacher's
targets, the losses); the on-policy step; the training loop; main(); then, below a banner, everything
that does not change what is learned (command line, runs and resume, devices, prompts, model loading,
files, writers, the built-in tiny SD3, Colab helpers).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import difflib
import functools
import hashlib
import importlib.util
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

# One policy for imports: torch, diffusers and the rest are imported inside the functions that use them, so that
# --help and every config error answer at once, before any heavy import. (Type hints name torch through this.)
if TYPE_CHECKING:
    import torch

# =================================================================================================
# Config. Plain constants; each can be overridden as --NAME=VALUE on the command line.
# =================================================================================================
_NAMES_BEFORE_CONFIG = set(globals())

# --- Model setup --------------------------------------------------------------------------------
TEACHER_ID = "stabilityai/stable-diffusion-3-medium-diffusers"  # Hub id or local diffusers folder; "tiny-random-sd3" = built-in
TEACHER_REVISION = "main"  # git revision of TEACHER_ID on the Hub
STUDENT_ID = "stabilityai/stable-diffusion-3-medium-diffusers"  # same as TEACHER_ID = few-step self-distillation
STUDENT_REVISION = "main"  # git revision of STUDENT_ID
TEACHER_DTYPE = "auto"  # teacher weights: "auto" (bf16 on recent GPUs, fp16 on older, fp32 on CPU) | "bfloat16" | "float16" | "float32"
STUDENT_DTYPE = "float32"  # student weights outside LoRA; trainable weights are always kept in fp32
TEXT_ENCODER_DTYPE = "auto"  # CLIP-L/CLIP-G/T5 weights while embeddings are cached; same choices as TEACHER_DTYPE
IMAGE_SIZE = 1024  # pixels, square; multiple of VAE factor x patch size (16 for SD3); 512-1024 typical
USE_T5 = True  # encode the prompts with the 4.7B-param T5 too, as the pipeline samples (before the models load, then freed: no training memory); False = zeros in its place, as SD3 supports (saves a ~10 GB download)
T5_MAX_LENGTH = 256  # T5 tokens per prompt (the SD3 pipeline default); text length = 77 + this
TRAINABLE = "lora"  # what of the student trains: "all" | "lora" | "blocks" (TRAIN_BLOCKS) | "norms" (AdaLN modulation)
TRAIN_BLOCKS = "-4:"  # python slice of transformer_blocks for TRAINABLE="blocks", e.g. "-4:" = last 4, "0:12"
LORA_RANK = 32  # LoRA rank for TRAINABLE="lora"; 4-128 typical
LORA_ALPHA = 32  # LoRA scale numerator (scale = alpha / rank)
LORA_USE_DORA = False  # DoRA (peft's use_dora): LoRA on the direction, a learned magnitude per output feature
LORA_TARGET_MODULES = "auto"  # comma-separated layer names in each block: "auto" = attention (LORA_ATTENTION, as diffusers' SD3 LoRA training), and the MLPs too (LORA_MLPS) at K = 1, where they were measured to win (auto_lora_targets)
GRADIENT_CHECKPOINTING = False  # recompute block activations in backward: less memory, ~30% slower
COMPILE = True  # torch.compile each transformer block on CUDA (about 1.35x faster steps on an H100, ~1 min to compile)
ATTENTION_BACKEND = "auto"  # scaled-dot-product attention kernel: "auto" (PyTorch picks) | "cudnn" | "flash" | "efficient" | "math"
#   | "fa4": FlashAttention-4 on an H100/H200/B200 (pip install flash-attn-4==4.0.0b36; fastest measured, see README)
TEACHER_FP8 = "auto"  # the frozen teacher's attention and MLP matmuls in FP8 (row-wise scales): "auto" (on where the GPU has FP8, compute capability >= 8.9: L4, H100, H200) | True | False
STUDENT_FP8 = False  # LoRA only: the student's frozen base matmuls in FP8 too (forward and input gradients); with shared weights one FP8 base then serves teacher and student

# --- Train setup --------------------------------------------------------------------------------
SEED = 0  # seeds noise, prompt order and state choice; the same seed gives the same run
IMAGES_PER_STEP = 4  # images (prompts) per optimizer step, per process: the batch the learning rate goes with
BATCH_SIZE = "auto"  # images per rollout, for memory and speed only: "auto" = the largest divisor of IMAGES_PER_STEP that fits the GPU (measured at the start); rollouts accumulated per step = IMAGES_PER_STEP / BATCH_SIZE
LEARNING_RATE = 1e-4  # AdamW peak learning rate; 1e-4 for LoRA, 1e-5 for full training
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_WEIGHT_DECAY = 1e-4
ADAM_EPS = 1e-8
ADAM_8BIT = False  # AdamW's two moments in 8 bits (bitsandbytes' AdamW8bit, optional: pip install bitsandbytes): 6 bytes per trained weight in memory and in each checkpoint instead of 12; for TRAINABLE="all" (2B weights: 12 GB, not 24)
LR_SCHEDULER = "constant_with_warmup"  # any name of diffusers.optimization.get_scheduler: constant, cosine, linear, ...
LR_WARMUP_STEPS = 50  # optimizer steps of linear learning-rate warmup
MAX_STEPS = 1000  # optimizer steps in the whole run
EMA_DECAY = 0.0  # an exponential moving average of the trained weights (diffusers' EMAModel, decay warmed up as (1 + n) / (10 + n)), which the evaluations and the export then use; 0 = off, 0.99-0.999 typical (one fp32 copy of the trained weights more)
MAX_GRAD_NORM = 1.0  # gradient clipping (L2 over all trainable weights); 0 = off
MIXED_PRECISION = "auto"  # "no" | "fp16" | "bf16" | "auto" (bf16 where the GPU has it, else fp16; "no" on CPU)
LOG_EVERY = 10  # optimizer steps between metrics rows
CHECKPOINT_EVERY = 250  # optimizer steps between step_<N>.pt checkpoints
CHECKPOINT_EVERY_MINUTES = 10.0  # also checkpoint after this much wall time, checked at log steps (a disconnect gives no warning); 0 = off
KEEP_LAST_CHECKPOINTS = 3  # newest step_*.pt kept (final.pt is always kept)
KEEP_CHECKPOINTS_GB = 0.0  # also drop the oldest step_*.pt while those kept pass this many GB (the newest always stays); 0 = no cap (a Drive's free space, in one number)
RESUME = "auto"  # "auto" (continue the newest valid checkpoint of this run) | "never" | a checkpoint path
EVAL_EVERY = 250  # optimizer steps between held-out evaluations (teacher-student gap); 0 = only start and end
EVAL_NOISES = 2  # fixed noises per held-out prompt in each evaluation: 2+ also reads the diversity ratio (a student that collapses to one picture per prompt shows); more = a steadier gap, evaluations that many times longer
MAX_CONSECUTIVE_SKIPS = 5  # stop the run after this many non-finite steps in a row
SAVE_SAMPLE_GRIDS = True  # at each evaluation, a PNG of teacher vs student samples on the held-out prompts
REPORT_TO = ""  # also log to trackers through accelerate: "tensorboard", "wandb", "all"; "" = files only

# --- Distill setup ------------------------------------------------------------------------------
NUM_ROLLOUT_STEPS = 4  # K: steps of the student's own sampler, from noise to image
SAMPLER_SPACING = "trailing"  # where the K steps sit: "trailing" (evenly from noise to image, as few-step models sample) | "scheduler" (diffusers' default, whose last step starts at sigma 0.009: K = 2 is then one real step)
SAMPLER_SHIFT = None  # sigma shift of the student's sampler; None = the teacher scheduler's config (3.0 for SD3)
TEACHER_SUBSTEPS = 0  # N: the teacher solves its guided flow over each student step in N substeps; target = its average velocity (1 = instantaneous); 0 = 8 // K: 2 at K = 4, 4 at K = 2, 8 at K = 1
TEACHER_SOLVER = "auto"  # the solver of those substeps: "auto" = "ab2" at K >= 4, "euler" below (the best measured at each) | "ab2" (2nd order, reuses the last velocity: 1 pass per substep) | "euler" | "heun", "midpoint" (2nd order, 2 passes per substep)
TEACHER_SUBSTEP_SHIFT = None  # spacing of those substeps: None = as the teacher's scheduler spaces its steps (its shift), 1.0 = uniform in sigma
SUPERVISED_STATES = 0  # rollout states the teacher supervises: 0 = all K, M = a random M of them per rollout
GUIDANCE_SCALE = 7.0  # teacher classifier-free guidance (SD3: 7.0, SD3.5: 3.5-4.5); the student learns it
SAMPLER_ETA = 0.7  # eta of the flow-DDIM transition that defines the KL: each state keeps noise std sigma, a fraction rho <= eta of it fresh
STOCHASTIC_ROLLOUT = False  # sample rollout transitions with that noise (True) or follow the ODE, as the exported sampler does (False)
ON_POLICY_FRACTION = 1.0  # 1 = states from the student's own rollout; 0 = from the teacher's (off-policy); between: per step
KL_WEIGHT = 0.0  # weight of the transition KL after warmup (its last steps are sharp: see README, Does it work?)
EPS_MSE_WEIGHT = 1.0  # weight of the epsilon MSE
LATENT_MSE_WEIGHT = 1.0  # weight of the latent (x0) MSE
KL_WARMUP_STEPS = 100  # optimizer steps over which the KL weight ramps linearly from 0 to KL_WEIGHT
DMD_WEIGHT = "auto"  # weight of distribution matching (DMD2) on the student's own x0 predictions at the supervised states; 0 = off; "auto" = 1 where it was measured to win (K <= 2), else 0 (auto_dmd_weight)
DMD_STATES = 0  # supervised states per rollout that take DMD's step, chosen at random (DMD2 takes one: the real and fake scores and the fake score's samples at one state, not K); 0 = all of them
FAKE_LORA_RANK = 32  # DMD's fake score: a LoRA adapter of this rank on the frozen teacher, trained on the student's samples
FAKE_LEARNING_RATE = 1e-4  # AdamW learning rate of the fake score (constant)
FAKE_UPDATES_PER_STEP = 1  # fake-score updates per student update (DMD2's two time scales), each over all of the step's samples
FAKE_FRESH_SAMPLES = False  # fake-score updates after a step's first on new samples of the student (no-gradient rollouts from fresh noise), so the critic stays ahead
ADV_WEIGHT = 0.0  # weight of the adversarial term (LADD): a small head on the frozen teacher's features of noised samples tells the teacher's solve from the student's sample, at the last state; 0 = off
ADV_LEARNING_RATE = 1e-4  # AdamW learning rate of the adversarial head (constant)
DISTRIBUTION_START_STEP = 0  # the regression terms alone before this step (a staged start); then DMD and the adversarial term ramp in
DISTRIBUTION_RAMP_STEPS = 0  # steps over which the DMD and adversarial weights ramp linearly from 0 to DMD_WEIGHT and ADV_WEIGHT
TEACHER_EVAL_STEPS = 28  # steps of the teacher's own sampler for held-out reference samples

# --- Prompt setup -------------------------------------------------------------------------------
GENERATE_PROMPTS = True  # write PROMPTS_JSONL from the built-in generator (False = read your own file)
PROMPTS_JSONL = ""  # one {"id", "prompt", "category"} per line; "" = OUTPUT_ROOT/prompts/generated-n<NUM_PROMPTS>-seed<PROMPT_SEED>.jsonl
NUM_PROMPTS = 512  # prompts generated (train + held-out)
PROMPT_SEED = 0  # seeds the generator; the same seed gives the same prompts
HELDOUT_PROMPTS = 8  # the last N prompts of the file are held out for evaluation, never trained on

# --- Colab setup --------------------------------------------------------------------------------
PRINT_COLAB_SETUP = False  # print the notebook cells to paste (install, token, Drive) and exit
INSTALL_DEPS = False  # pip-install what requirements are missing or too old before the run
PREFETCH_MODELS = False  # download only the needed files with huggingface_hub.snapshot_download first
COLAB_MODEL_CACHE = ""  # Hugging Face cache folder (e.g. on Drive); "" = the default cache

# --- Output -------------------------------------------------------------------------------------
OUTPUT_ROOT = "outputs_colab"  # everything the run writes goes under here (may be a mounted Drive folder)
RUN_NAME = ""  # "" = reuse the newest unfinished run of this config (RESUME="auto"), else a timestamped name
EXPORT_DIFFUSERS = True  # at the end, export/<run>/: a StableDiffusion3Pipeline folder, or LoRA weights in LoRA mode
PUSH_TO_HUB = ""  # Hub repo id (e.g. "you/sd3-4step") to upload the export to; "" = don't

PRESETS = {
    # The built-in tiny random SD3: every component made in code, the whole job on a laptop CPU.
    "tiny": dict(
        TEACHER_ID="tiny-random-sd3", STUDENT_ID="tiny-random-sd3", TEACHER_DTYPE="float32",
        TEXT_ENCODER_DTYPE="float32", IMAGE_SIZE=32, USE_T5=True, T5_MAX_LENGTH=64, TRAINABLE="all",
        IMAGES_PER_STEP=2, LEARNING_RATE=1e-3, LR_WARMUP_STEPS=2, MAX_STEPS=30,
        MIXED_PRECISION="no", LOG_EVERY=1, CHECKPOINT_EVERY=10, EVAL_EVERY=10, KL_WARMUP_STEPS=10,
        GUIDANCE_SCALE=3.0, TEACHER_EVAL_STEPS=8, NUM_PROMPTS=48, HELDOUT_PROMPTS=4,
    ),
}

CONFIG_NAMES = [n for n in list(globals()) if n not in _NAMES_BEFORE_CONFIG and n[0].isalpha() and n.isupper()
                and n != "PRESETS"]
TINY_MODEL_ID = "tiny-random-sd3"

# =================================================================================================
# The algorithm. Flow matching, as SD3 is trained: x_t = (1 - sigma) x0 + sigma eps, and the transformer
# predicts the velocity v = eps - x0. Each is a small pure function, its formula in its docstring.
# =================================================================================================


def pipeline_sigmas(num_steps: int, spacing: str) -> list[float] | None:
    """The `sigmas` that StableDiffusion3Pipeline takes for this sampler, before its shift: "trailing" spaces the
    K steps evenly over the whole path, u_i = 1 - i/K; "scheduler" is the scheduler's own (None)."""
    return [1 - i / num_steps for i in range(num_steps)] if spacing == "trailing" else None


def sampler_sigmas(scheduler_config: dict, num_steps: int, shift: float | None, image_seq_len: int,
                   spacing: str = "scheduler"):
    """Sigmas sigma_0 = 1 > ... > sigma_K = 0 and timesteps t_i = 1000 sigma_i of a K-step sampler.

    Exactly diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps, as the pipeline calls it: unshifted
    sigmas u (pipeline_sigmas; by default linspace(1, sigma_min, K)), then shifted, sigma = s u / (1 + (s - 1) u),
    with shift s (or the resolution-dependent mu of the SD3 pipeline when the scheduler uses dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    overrides = {} if shift is None else {"shift": shift}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config, **overrides)
    kwargs = {"mu": dynamic_shift_mu(scheduler.config, image_seq_len)} if scheduler.config.use_dynamic_shifting else {}
    custom = pipeline_sigmas(num_steps, spacing)
    scheduler.set_timesteps(None if custom else num_steps, device="cpu", sigmas=custom, **kwargs)
    return scheduler.sigmas.clone(), scheduler.timesteps.clone()


def dynamic_shift_mu(scheduler_config, image_seq_len: int) -> float:
    """The SD3 pipeline's resolution-dependent mu (the shift is e^mu) for a scheduler with use_dynamic_shifting."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    return calculate_shift(image_seq_len, scheduler_config.base_image_seq_len, scheduler_config.max_image_seq_len,
                           scheduler_config.base_shift, scheduler_config.max_shift)


def epsilon_from_velocity(x_t, sigma, velocity):
    """eps_hat = x_t + (1 - sigma) v   (from x_t = (1 - sigma) x0 + sigma eps and v = eps - x0)."""
    return x_t + (1 - sigma) * velocity


def x0_from_velocity(x_t, sigma, velocity):
    """x0_hat = x_t - sigma v."""
    return x_t - sigma * velocity


def guided_velocity(v_uncond, v_cond, guidance_scale: float):
    """Classifier-free guidance: v = v_uncond + w (v_cond - v_uncond)."""
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def euler_step(x, velocity, sigma, sigma_next):
    """The deterministic flow sampler (diffusers' FlowMatchEulerDiscreteScheduler.step):
    x' = x + (sigma_next - sigma) v."""
    return x + (sigma_next - sigma) * velocity


def ddim_noise_fraction(sigma: float, sigma_next: float, eta: float) -> float:
    """rho = eta sqrt(1 - SNR(sigma) / SNR(sigma_next)), SNR(sigma) = ((1 - sigma) / sigma)^2.

    With eta = 1 this is the exact posterior q(x_sigma' | x_sigma, x0) of the forward process
    (ancestral sampling, as DDPM's in variance-preserving form); eta = 0 is the deterministic sampler.
    rho = eta at sigma = 1 (SNR 0) and where sigma_next = 0 (SNR infinite; the step has no noise then)."""
    if sigma >= 1 or sigma_next <= 0:
        return eta
    snr_ratio = ((1 - sigma) * sigma_next / ((1 - sigma_next) * sigma)) ** 2
    return eta * math.sqrt(max(0.0, 1 - snr_ratio))


def ddim_transition_mean(x, velocity, sigma: float, sigma_next: float, eta: float):
    """Mean of the flow-DDIM transition from sigma to sigma_next:
    mu(v) = (1 - sigma') x0_hat(v) + sigma' sqrt(1 - rho^2) eps_hat(v); its variance is (sigma' rho)^2.

    With an exact prediction the next state is (1 - sigma') x0 + sigma' (sqrt(1 - rho^2) eps + rho z):
    noise of std sigma' exactly, whatever the step size. rho = 0 gives euler_step."""
    rho = ddim_noise_fraction(sigma, sigma_next, eta)
    return ((1 - sigma_next) * x0_from_velocity(x, sigma, velocity)
            + sigma_next * math.sqrt(1 - rho * rho) * epsilon_from_velocity(x, sigma, velocity))


def ddim_step(x, velocity, sigma: float, sigma_next: float, eta: float, noise):
    """Draw x' ~ N(mu(v), (sigma' rho)^2) with the given standard-normal noise."""
    rho = ddim_noise_fraction(sigma, sigma_next, eta)
    return ddim_transition_mean(x, velocity, sigma, sigma_next, eta) + sigma_next * rho * noise


def epsilon_mse(x_t, sigma: float, v_student, v_teacher):
    """mean || eps_hat(v_student) - eps_hat(v_teacher) ||^2, the mean over all elements."""
    return (epsilon_from_velocity(x_t, sigma, v_student) - epsilon_from_velocity(x_t, sigma, v_teacher)).square().mean()


def latent_mse(x_t, sigma: float, v_student, v_teacher):
    """mean || x0_hat(v_student) - x0_hat(v_teacher) ||^2, the mean over all elements."""
    return (x0_from_velocity(x_t, sigma, v_student) - x0_from_velocity(x_t, sigma, v_teacher)).square().mean()


def kl_step_weight(sigma: float, sigma_next: float, eta: float) -> float:
    """c = b^2 / (2 (sigma' rho)^2), with b = d mu / d v = sigma' sqrt(1 - rho^2) (1 - sigma) - (1 - sigma') sigma: the
    transitions' means differ by b (v_s - v_t), so their KL is c times the velocity MSE (transition_kl). The two
    MSE terms weigh the same velocity MSE by (1 - sigma)^2 and sigma^2, so c says how far the KL is from their
    scale at each step. 0 where sigma' rho = 0 (no variance: the last step, or eta = 0)."""
    rho = ddim_noise_fraction(sigma, sigma_next, eta)
    if sigma_next * rho == 0:
        return 0.0
    b = sigma_next * math.sqrt(1 - rho * rho) * (1 - sigma) - (1 - sigma_next) * sigma
    return b * b / (2 * (sigma_next * rho) ** 2)


def transition_kl(sigma: float, sigma_next: float, eta: float, v_student, v_teacher):
    """KL( N(mu(v_student), (sigma' rho)^2 I) || N(mu(v_teacher), (sigma' rho)^2 I) ) = || mu_s - mu_t ||^2 / (2 (sigma' rho)^2)
    = c mean || v_student - v_teacher ||^2, between the flow-DDIM transitions of the two velocities from the same
    state (whose own term cancels), c = kl_step_weight(sigma, sigma', eta).

    Reduction: the mean over latent elements (the per-dimension KL; the KL of the whole latent is
    this times C*H*W), then the mean over the batch, so its scale matches the two MSE terms.
    The last step, to sigma' = 0, has no variance: both transitions are point masses, whose KL is
    infinite unless they agree, so there it is 0 and the latent MSE (the squared distance of the two
    deterministic next states) supervises the step."""
    return kl_step_weight(sigma, sigma_next, eta) * (v_student - v_teacher).square().mean()


def kl_weight_at(step: int, kl_weight: float, warmup_steps: int) -> float:
    """Linear warmup: w(step) = KL_WEIGHT * min(1, step / KL_WARMUP_STEPS); KL_WEIGHT at once if no warmup."""
    if warmup_steps <= 0:
        return kl_weight
    return kl_weight * min(1.0, step / warmup_steps)


def noised(x0, sigma, noise):
    """The forward process, x_s = (1 - s) x0 + s eps, with s one number or one per sample."""
    if not isinstance(sigma, float):
        sigma = sigma.reshape(-1, *[1] * (x0.ndim - 1))
    return (1 - sigma) * x0 + sigma * noise


def dmd_noise_levels(normal, shift: float, low: float = 0.02, high: float = 0.98):
    """The sigma at which DMD compares the scores (and the fake score learns), from standard-normal draws n: SD3's
    training density, logit-normal u = sigmoid(n), shifted as its scheduler shifts, s = shift u / (1 + (shift - 1) u),
    kept within [0.02, 0.98] as DMD2 keeps its timesteps."""
    import torch

    u = torch.sigmoid(normal)
    return (shift * u / (1 + (shift - 1) * u)).clamp(low, high)


def dmd_direction(x0_student, x0_real, x0_fake):
    """DMD's gradient for a sample x (here the student's x0 prediction), from the x0 predictions of the two scores at
    its noised x_s:   g = (x0_fake - x0_real) / mean |x - x0_real|   (the mean per sample: DMD2's normalisation).

    x0_real comes from the guided teacher, x0_fake from the fake score, which models the student's own samples; a step
    against g moves x towards the teacher's distribution and away from the student's, the gradient of
    KL(p_student || p_teacher) through the sample."""
    scale = (x0_student - x0_real).abs().mean(dim=tuple(range(1, x0_student.ndim)), keepdim=True)
    return (x0_fake - x0_real) / scale.clamp(min=1e-8)


def dmd_loss(x0_student, direction):
    """0.5 mean || x - sg(x - g) ||^2, the stop-gradient form of DMD: its gradient in x is g / (number of elements), so
    g, not the loss's value (0.5 mean g^2), sets the step."""
    return 0.5 * (x0_student - (x0_student - direction).detach()).square().mean()


def flow_matching_loss(velocity, x0, noise):
    """mean || v - (eps - x0) ||^2 for the velocity v predicted at x_s = (1 - s) x0 + s eps: SD3's training loss, here
    the fake score's, on the student's samples."""
    return (velocity - (noise - x0)).square().mean()


def distribution_weight_at(step: int, weight: float, start: int, ramp: int) -> float:
    """The staged start: w(step) = 0 before DISTRIBUTION_START_STEP, then weight * min(1, (step - start + 1) / ramp)
    (the full weight at once without a ramp), for DMD and the adversarial term alike."""
    if step < start:
        return 0.0
    return weight if ramp <= 0 else weight * min(1.0, (step - start + 1) / ramp)


def hinge_discriminator_loss(real_logits, fake_logits):
    """mean max(0, 1 - D(real)) + mean max(0, 1 + D(fake)): the head's loss (hinge, as LADD's and SANA-Sprint's heads
    are trained: it stops pushing a logit once it is past the margin, so the head cannot run away from the student)."""
    return (1 - real_logits).clamp(min=0).mean() + (1 + fake_logits).clamp(min=0).mean()


def adversarial_generator_loss(fake_logits):
    """-mean D(fake): the student's side of the hinge game, its gradient pushes its samples to where the head reads
    "real" (the teacher's solve)."""
    return -fake_logits.mean()


def adversarial_blocks(num_layers: int) -> list[int]:
    """The transformer blocks whose image tokens the head reads: the ends of the four quarters of the depth (blocks
    5, 11, 17, 23 of SD3-medium's 24), as LADD reads features spread over the teacher's depth."""
    return sorted({max(0, math.ceil((j + 1) * num_layers / 4) - 1) for j in range(4)})


def sample_diversity(samples, num_noises: int) -> float:
    """The mean Euclidean distance between two samples of one prompt from different noises, averaged over prompts.
    `samples` are noise-major: row n * P + p is prompt p's sample from noise n (num_noises >= 2)."""
    import torch

    per_prompt = samples.reshape(num_noises, -1, samples[0].numel()).transpose(0, 1).double()  # (P, noises, D)
    distances = torch.cdist(per_prompt, per_prompt)  # zero on the diagonal
    return float(distances.sum() / (per_prompt.shape[0] * num_noises * (num_noises - 1)))


def predict_velocity(transformer, x, timestep, embeds, pooled, dtype):
    """One SD3 transformer call: the velocity at state x and timestep t = 1000 sigma, in fp32.
    The timestep goes in as float32, as StableDiffusion3Pipeline passes it, whatever the model's dtype."""
    import torch

    t = torch.as_tensor(timestep, dtype=torch.float32, device=x.device).expand(x.shape[0])
    return transformer(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=embeds.to(dtype),
                       pooled_projections=pooled.to(dtype), return_dict=False)[0].float()


def teacher_velocity(teacher, x, timestep, cond, uncond, guidance_scale: float, dtype):
    """The teacher's guided velocity; conditional and unconditional in one batched call. The timestep: one, or one
    per sample."""
    if guidance_scale == 1:
        return predict_velocity(teacher, x, timestep, cond[0], cond[1], dtype)
    import torch

    if torch.is_tensor(timestep) and timestep.ndim:
        timestep = torch.cat([timestep, timestep])
    v_uncond, v_cond = predict_velocity(teacher, torch.cat([x, x]), timestep, torch.cat([uncond[0], cond[0]]),
                                        torch.cat([uncond[1], cond[1]]), dtype).chunk(2)
    return guided_velocity(v_uncond, v_cond, guidance_scale)


def substep_sigmas(sigmas, i: int, num_substeps: int, shift: float):
    """N + 1 sigmas from sigma_i down to sigma_{i+1} (float32, ends exact): uniform in the unshifted
    coordinate u = sigma / (s - (s - 1) sigma), then shifted back, sigma = s u / (1 + (s - 1) u), as the
    scheduler spaces its own steps; s = 1 is uniform in sigma."""
    import torch

    ends = sigmas[i:i + 2].double()
    u = ends / (shift - (shift - 1) * ends)
    grid = torch.linspace(float(u[0]), float(u[1]), num_substeps + 1, dtype=torch.float64)
    inner = (shift * grid / (1 + (shift - 1) * grid)).float()
    inner[0], inner[-1] = sigmas[i], sigmas[i + 1]
    return inner


TEACHER_SOLVERS = {"euler": 1, "ab2": 1, "heun": 2, "midpoint": 2}  # transformer passes per substep


def teacher_passes_per_step(config: dict) -> int:
    """The teacher's transformer passes per optimizer step (of one process): images x (supervised states x substeps x
    the solver's passes per substep, + 1 for DMD's real score at each state that takes it) x 2 with guidance
    (conditional and unconditional), + 3 unguided passes per image for the adversarial term at the last state (the
    student's side, the head's real and fake; with SUPERVISED_STATES < K the last state is supervised only in some
    rollouts, so this counts the most)."""
    states = config["SUPERVISED_STATES"] or config["NUM_ROLLOUT_STEPS"]
    dmd_states = min(config.get("DMD_STATES", 0) or states, states) * int(config["DMD_WEIGHT"] > 0)
    guided = states * teacher_substeps(config) * TEACHER_SOLVERS[teacher_solver(config)] + dmd_states
    adversarial = 3 * int(config.get("ADV_WEIGHT", 0) > 0)  # absent from the configs of runs before it existed
    return config["IMAGES_PER_STEP"] * (guided * (1 if config["GUIDANCE_SCALE"] == 1 else 2) + adversarial)


def teacher_substeps(config: dict) -> int:
    """N, the teacher's substeps per student step: TEACHER_SUBSTEPS, or with 0, 8 // K (at least 1): about eight
    substeps over the whole path whatever K, as measured best per teacher pass at K = 4 (N = 2, AB2); at K = 1-2 more
    substeps were measured to help (Euler), so fewer steps get more."""
    return config["TEACHER_SUBSTEPS"] or max(1, 8 // config["NUM_ROLLOUT_STEPS"])


def teacher_solver(config: dict) -> str:
    """TEACHER_SOLVER, or with "auto", AB2 from K = 4 up (its students were the best there, at half Euler's passes)
    and Euler below: on K = 1-2's long steps AB2's extrapolation from the first substep's velocity misses, and its
    targets were 1.3-20x further from a fine solve than Euler's at equal passes (the trained teacher, 2026-12-03)."""
    solver = config["TEACHER_SOLVER"]
    return solver if solver != "auto" else ("ab2" if config["NUM_ROLLOUT_STEPS"] >= 4 else "euler")


def solve_flow(velocity_fn, x, grid, solver: str):
    """Integrate dx/dsigma = v(x, sigma) over a decreasing sigma grid (t = 1000 sigma), step h = s' - s < 0:

        euler     x' = x + h v(x, s)                                        1st order, 1 pass
        ab2       x' = x + h ((1 + r/2) v_n - (r/2) v_{n-1}), r = h / h_prev 2nd order, 1 pass (Adams-Bashforth on
                                                                            the uneven grid; Euler for the first)
        heun      x~ = x + h v(x, s);  x' = x + h/2 (v(x, s) + v(x~, s'))    2nd order, 2 passes
        midpoint  x' = x + h v(x + h/2 v(x, s), s + h/2)                    2nd order, 2 passes (never at s' = 0)"""
    previous = None  # ab2: the last substep's velocity and length
    for a, b in zip(grid[:-1], grid[1:]):
        h = float(b) - float(a)
        v = step = velocity_fn(x, a * 1000)
        if solver == "heun":
            step = (v + velocity_fn(euler_step(x, v, float(a), float(b)), b * 1000)) / 2
        elif solver == "midpoint":
            middle = (a + b) / 2
            step = velocity_fn(euler_step(x, v, float(a), float(middle)), middle * 1000)
        elif solver == "ab2" and previous is not None:
            r = h / previous[1]
            step = (1 + r / 2) * v - (r / 2) * previous[0]
        previous = (v, h)
        x = euler_step(x, step, float(a), float(b))
    return x


def teacher_target_velocity(velocity_fn, x, sigmas, i: int, num_substeps: int, shift: float, solver: str = "euler"):
    """The target over student step i: the teacher's own solve of its guided flow from (x, sigma_i) to
    sigma_{i+1} in N substeps of `solver` (solve_flow), x^T, as an average velocity:

        v* = (x - x^T) / (sigma_i - sigma_{i+1}),   x^T = solve_flow over substep_sigmas.

    A student step with v* lands where the teacher's N-substep solve lands. N = 1 with Euler (or AB2, whose
    first substep is Euler's): the teacher's instantaneous velocity velocity_fn(x, t_i) itself."""
    if num_substeps == 1 and solver in ("euler", "ab2"):
        return velocity_fn(x, sigmas[i] * 1000)
    y = solve_flow(velocity_fn, x, substep_sigmas(sigmas, i, num_substeps, shift), solver)
    return (x - y) / (float(sigmas[i]) - float(sigmas[i + 1]))


def sample_trajectory(velocity_fn, noise, sigmas, timesteps) -> list:
    """The deterministic flow sampler from noise, x_{i+1} = x_i + (sigma_{i+1} - sigma_i) velocity_fn(x_i, t_i):
    the states x_1 ... x_K it visits (x_K, the sample, last). t_i is what velocity_fn is called with at step i:
    the model's timestep, or the step's index itself (teacher_path). The one sampler of every no-gradient path."""
    states, x = [], noise.float()
    for i in range(len(timesteps)):
        x = euler_step(x, velocity_fn(x, timesteps[i]), float(sigmas[i]), float(sigmas[i + 1]))
        states.append(x)
    return states


def sample_latents(velocity_fn, noise, sigmas, timesteps):
    """The sampler's last state, the sample."""
    return sample_trajectory(velocity_fn, noise, sigmas, timesteps)[-1]


def state_drift(student_states: list, teacher_states: list) -> list[float]:
    """Per state i = 1..K: mean over samples and elements of (x_i^student - x_i^teacher)^2, the distance between the
    states the student visits and those of the teacher's path from the same noise (where off-policy learns)."""
    return [(s - t).square().mean().item() for s, t in zip(student_states, teacher_states, strict=True)]

# =================================================================================================
# The on-policy step: the student's rollout, the teacher's targets at the states it visits, the losses.
# =================================================================================================


@dataclasses.dataclass
class Models:
    """Everything the step needs; `teacher` is the student itself when the two share LoRA base weights."""

    student: object  # after accelerator.prepare: may be wrapped for data parallelism
    teacher: object
    shares_weights: bool
    teacher_dtype: object
    student_dtype: object
    latent_shape: tuple  # (C, H, W) of one latent
    trainable: list  # the student's trainable parameters (fp32)
    scheduler_config: dict  # the teacher's FlowMatchEulerDiscreteScheduler config
    patch_size: int
    teacher_fp8: bool = False  # its attention and MLP matmuls in FP8
    student_fp8: bool = False  # its frozen base matmuls in FP8
    fake: list = dataclasses.field(default_factory=list)  # DMD's fake score: its FAKE_ADAPTER weights (fp32)
    fake_host: object = None  # the model that carries them: the frozen base weights (add_fake_score)
    adv_head: object = None  # with ADV_WEIGHT: the adversarial head (adversarial_head_module) on the teacher's features

    def teacher_context(self):
        """The teacher itself: its model with every adapter (the student's where shared, the fake score's) off."""
        has_adapters = self.shares_weights or self.fake_host is self.teacher
        return adapters_disabled(self.teacher) if has_adapters else contextlib.nullcontext()

    def fake_context(self):
        """DMD's fake score: the frozen base with only the FAKE_ADAPTER on."""
        return adapter_active(self.fake_host, FAKE_ADAPTER)

    @property
    def image_seq_len(self) -> int:
        return (self.latent_shape[1] // self.patch_size) * (self.latent_shape[2] // self.patch_size)


@contextlib.contextmanager
def adapters_disabled(model):
    """The shared-weights teacher: the LoRA student with its adapters switched off."""
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


def checkpoint_as_in_forward(block, *args):
    """Gradient checkpointing of one block (torch's, non-reentrant, as diffusers' own) that recomputes it in backward
    with the adapters that were on in its forward. With shared weights the frozen teacher is the student with its
    adapters off, and the adversarial term's gradient flows through it; its backward runs after they are back on."""
    import torch

    layers = [m for m in block.modules() if hasattr(m, "_disable_adapters") and hasattr(m, "_active_adapter")]
    in_forward = [(m._disable_adapters, m._active_adapter) for m in layers]

    @contextlib.contextmanager
    def as_in_forward():
        now = [(m._disable_adapters, m._active_adapter) for m in layers]
        for m, (off, active) in zip(layers, in_forward):
            m._disable_adapters, m._active_adapter = off, active
        try:
            yield
        finally:
            for m, (off, active) in zip(layers, now):
                m._disable_adapters, m._active_adapter = off, active

    return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False,
                                             context_fn=lambda: (contextlib.nullcontext(), as_in_forward()))


@contextlib.contextmanager
def adapter_active(model, name: str):
    """Only the named adapter on, then the ones before (peft also makes only the active one's weights require grad)."""
    previous = model.active_adapters()
    model.set_adapter(name)
    try:
        yield model
    finally:
        model.set_adapter(previous)


@functools.cache
def adversarial_head_module():
    """The AdversarialHead class (made on first use: torch is imported lazily)."""
    import torch

    nn = torch.nn

    class AdversarialHead(nn.Module):
        """One small convolutional head per block of adversarial_blocks: the block's image tokens (B, T, D), normed,
        laid out on their (h, w) grid, a 3x3 convolution to 128 channels, SiLU, a 1x1 to one logit per position.
        Returns the logits of every head and position, (B, heads x positions). Trained in fp32."""

        def __init__(self, width: int, blocks: list[int], hidden: int = 128):
            super().__init__()
            self.blocks = list(blocks)
            self.heads = nn.ModuleList(nn.Sequential(nn.Conv2d(width, hidden, 3, padding=1), nn.SiLU(),
                                                     nn.Conv2d(hidden, 1, 1)) for _ in self.blocks)
            self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in self.blocks)

        def forward(self, features: dict):
            logits = []
            for block, norm, head in zip(self.blocks, self.norms, self.heads, strict=True):
                tokens = norm(features[block].float())
                side = math.isqrt(tokens.shape[1])
                logits.append(head(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)).flatten(1))
            return torch.cat(logits, 1)

    return AdversarialHead


def teacher_features(models: Models, x, sigma, cond, blocks: list[int]) -> dict:
    """{block: its image tokens} of the frozen teacher (adapters off, unguided, conditional) at state x and noise level
    sigma (one per sample), read by forward hooks on those blocks; gradients flow to x where x has them."""
    features = {}
    hooks = [models.teacher.transformer_blocks[b].register_forward_hook(
        lambda _module, _args, out, b=b: features.__setitem__(b, out[1])) for b in blocks]
    try:
        with models.teacher_context():
            predict_velocity(models.teacher, x, sigma * 1000, cond[0], cond[1], models.teacher_dtype)
    finally:
        for hook in hooks:
            hook.remove()
    return features


def adversarial_logits(models: Models, x0, sigma, noise, cond):
    """The head's logits for samples x0 noised to x_s = (1 - s) x0 + s eps: it reads the teacher's features of x_s."""
    return models.adv_head(teacher_features(models, noised(x0, sigma, noise), sigma, cond, models.adv_head.blocks))


def step_generator(seed: int, step: int, micro: int, rank: int, device):
    """Noise for one rollout depends only on (seed, step, micro-batch, process): resumes are exact."""
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step) * 1_009 + micro * 101 + rank)
    return generator


def choose_supervised(num_steps: int, num_supervised: int, rng: random.Random) -> set[int]:
    """All K states, or a random M of them (0 = all)."""
    if num_supervised == 0 or num_supervised >= num_steps:
        return set(range(num_steps))
    return set(rng.sample(range(num_steps), num_supervised))


def choose_student_leads(num_steps: int, on_policy_fraction: float, rng: random.Random) -> set[int]:
    """The rollout steps at which the student's own velocity moves the state: all of them on-policy
    (1.0), none off-policy (0.0: the states are the teacher's trajectory), else each with that probability."""
    if on_policy_fraction >= 1:
        return set(range(num_steps))
    return {i for i in range(num_steps) if rng.random() < on_policy_fraction}


def teacher_substep_shift(config: dict, models: Models) -> float:
    """The spacing of the teacher's substeps: TEACHER_SUBSTEP_SHIFT, or the shift its own scheduler uses."""
    if config["TEACHER_SUBSTEP_SHIFT"] is not None:
        return config["TEACHER_SUBSTEP_SHIFT"]
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(models.scheduler_config).config  # defaults filled in
    return math.exp(dynamic_shift_mu(scheduler, models.image_seq_len)) if scheduler.use_dynamic_shifting else scheduler.shift


@dataclasses.dataclass
class RolloutPlan:
    """One rollout's draws: its prompts, its noise, which states the teacher supervises and which the student moves."""

    cond: tuple  # (embeds, pooled) of its prompts
    uncond: tuple  # the empty prompt's, for guidance
    generator: object  # seeded by (SEED, step, micro-batch, process)
    supervised: set[int]
    student_leads: set[int]
    dmd_states: set[int]  # the supervised states that take DMD's step (DMD_STATES)
    loss_scale: float  # 1 / (supervised states x accumulated rollouts)
    sync_gradients: bool  # the last rollout of an optimizer step: synchronise gradients across processes
    weights: dict  # this step's loss weights: kl, dmd, adv (the staged start and the warmups applied)
    samples: list = dataclasses.field(default_factory=list)  # with DMD: (the student's x0, detached; cond; state) per state
    adv_samples: list = dataclasses.field(default_factory=list)  # with ADV_WEIGHT: (student's sample, teacher's; cond)


def distribution_scores(models: Models, config: dict, x0, cond, uncond, generator, shift: float):
    """The two scores DMD compares, at the student's sample x0 noised to x_s = (1 - s) x0 + s eps, s per sample from
    SD3's training density (dmd_noise_levels): the x0 predictions x_s - s v of the guided teacher (real) and of the fake
    score (conditional, as the student samples). Without gradients."""
    import torch

    sigma = dmd_noise_levels(torch.randn(x0.shape[0], generator=generator, device=x0.device), shift)
    x_s = noised(x0, sigma, torch.randn(x0.shape, generator=generator, device=x0.device))
    with torch.no_grad():
        with models.teacher_context():
            v_real = teacher_velocity(models.teacher, x_s, sigma * 1000, cond, uncond, config["GUIDANCE_SCALE"],
                                      models.teacher_dtype)
        with models.fake_context():
            v_fake = predict_velocity(models.fake_host, x_s, sigma * 1000, cond[0], cond[1], models.teacher_dtype)
    sigma = sigma.reshape(-1, *[1] * (x0.ndim - 1))
    return x0_from_velocity(x_s, sigma, v_real), x0_from_velocity(x_s, sigma, v_fake)


def distill_rollout(models: Models, accelerator, config: dict, sigmas, timesteps, plan: RolloutPlan):
    """One rollout with its losses; gradients are accumulated into the student.

    From noise the student integrates its own K-step sampler. At a supervised state x_i (one the
    student actually visits) the teacher solves its guided flow to sigma_{i+1} in TEACHER_SUBSTEPS
    substeps (teacher_target_velocity), the student predicts with gradients, the losses are taken
    against that target and backpropagated at once (no backpropagation through the rollout), and the
    same student prediction, detached, moves the rollout on, by the flow-DDIM transition (ddim_step)
    or, with STOCHASTIC_ROLLOUT off, the ODE. At steps not in `plan.student_leads` the teacher's
    target moves it instead (ON_POLICY_FRACTION < 1: off-policy or DAgger-style mixes).
    With DMD_WEIGHT > 0 the student's x0 prediction there, x_i - sigma_i v (at the last state: its sample), also
    takes DMD's step (dmd_direction, from distribution_scores), and is kept for the fake score (plan.samples).
    With ADV_WEIGHT > 0, at the last state the student's sample x_K = x - sigma v meets the adversarial head
    (adversarial_generator_loss, through the frozen teacher's features of it noised), and the pair (its sample,
    the teacher's own solve from the same state, x - sigma v*) is kept for the head (plan.adv_samples).
    Returns per-step loss terms (fp32, detached) as a (K, 6) tensor: total, kl, eps_mse, latent_mse, dmd, adv
    (zeros where not supervised)."""
    import torch

    cond, uncond, supervised, student_leads = plan.cond, plan.uncond, plan.supervised, plan.student_leads
    device = accelerator.device
    x = torch.randn((cond[0].shape[0], *models.latent_shape), generator=plan.generator, device=device)
    terms = torch.zeros(len(timesteps), len(LOSS_TERMS), device=device)
    plain_student = accelerator.unwrap_model(models.student)
    eta, last_supervised, weights = config["SAMPLER_ETA"], max(supervised), plan.weights
    substeps, shift, solver = teacher_substeps(config), teacher_substep_shift(config, models), teacher_solver(config)

    def guided_teacher(y, t):
        return teacher_velocity(models.teacher, y, t, cond, uncond, config["GUIDANCE_SCALE"], models.teacher_dtype)

    for i in range(len(timesteps)):
        sigma, sigma_next, t = float(sigmas[i]), float(sigmas[i + 1]), timesteps[i]
        v_teacher = None
        if i in supervised or i not in student_leads:
            with torch.no_grad(), models.teacher_context():
                v_teacher = teacher_target_velocity(guided_teacher, x, sigmas, i, substeps, shift, solver)
        if i in supervised:
            sync = plan.sync_gradients and i == last_supervised
            with contextlib.nullcontext() if sync else accelerator.no_sync(models.student):
                with accelerator.autocast():
                    v_student = predict_velocity(models.student, x, t, cond[0], cond[1], models.student_dtype)
                kl = transition_kl(sigma, sigma_next, eta, v_student, v_teacher)
                eps = epsilon_mse(x, sigma, v_student, v_teacher)
                lat = latent_mse(x, sigma, v_student, v_teacher)
                dmd, adv = torch.zeros((), device=device), torch.zeros((), device=device)
                x0 = x0_from_velocity(x, sigma, v_student)
                if config["DMD_WEIGHT"] > 0 and i in plan.dmd_states:
                    if weights["dmd"] > 0:  # before the staged start only the fake score learns (on the samples)
                        real, fake = distribution_scores(models, config, x0.detach(), cond, uncond, plan.generator, shift)
                        # at M of the S supervised states, x S / M: DMD's share of the rollout's gradient is as at all S
                        dmd = dmd_loss(x0, dmd_direction(x0.detach(), real, fake)) * len(supervised) / len(plan.dmd_states)
                    plan.samples.append((x0.detach(), cond, i))
                if config["ADV_WEIGHT"] > 0 and i == len(timesteps) - 1:
                    x0_teacher = x0_from_velocity(x, sigma, v_teacher)  # the teacher's own solve to sigma = 0
                    if weights["adv"] > 0:
                        level = dmd_noise_levels(torch.randn(x.shape[0], generator=plan.generator, device=device), shift)
                        noise = torch.randn(x.shape, generator=plan.generator, device=device)
                        models.adv_head.requires_grad_(False)  # the student's side: the head stays as it is
                        with accelerator.autocast():
                            adv = adversarial_generator_loss(adversarial_logits(models, x0, level, noise, cond))
                        models.adv_head.requires_grad_(True)
                    plan.adv_samples.append((x0.detach(), x0_teacher, cond))
                total = (weights["kl"] * kl + config["EPS_MSE_WEIGHT"] * eps + config["LATENT_MSE_WEIGHT"] * lat
                         + weights["dmd"] * dmd + weights["adv"] * adv)
                accelerator.backward(total * plan.loss_scale)
            terms[i] = torch.stack([total, kl, eps, lat, dmd, adv]).detach()
            v_student = v_student.detach()
        elif i in student_leads:
            with torch.no_grad(), accelerator.autocast():
                v_student = predict_velocity(plain_student, x, t, cond[0], cond[1], models.student_dtype)
        v_next = v_student if i in student_leads else v_teacher
        if config["STOCHASTIC_ROLLOUT"] and eta > 0:
            noise = torch.randn(x.shape, generator=plan.generator, device=device)
            x = ddim_step(x, v_next, sigma, sigma_next, eta, noise)
        else:
            x = euler_step(x, v_next, sigma, sigma_next)
    return terms


def distill_step(models: Models, accelerator, text: "TextEmbeddings", step: int, config: dict, sigmas, timesteps,
                 num_train_prompts: int):
    """IMAGES_PER_STEP / BATCH_SIZE on-policy rollouts of BATCH_SIZE training prompts (BATCH_SIZE resolved
    to a number), gradients accumulated (and synchronised across processes only on the last). Returns the
    summed (K, 5) loss terms, how often each rollout step was supervised, and (with DMD) the student's samples."""
    import torch

    K, batch = len(timesteps), config["BATCH_SIZE"]
    accum = config["IMAGES_PER_STEP"] // batch
    weights = loss_weights(config, step)
    terms = torch.zeros(K, len(LOSS_TERMS), device=accelerator.device)
    counts = torch.zeros(K, device=accelerator.device)
    samples, adv_samples = [], []
    for micro in range(accum):
        idx = prompt_indices(step, micro, accelerator.process_index, accelerator.num_processes, batch, accum,
                             num_train_prompts, config["SEED"])
        rng = random.Random(config["SEED"] * 7919 + step * 31 + micro)
        supervised = choose_supervised(K, config["SUPERVISED_STATES"], rng)
        student_leads = choose_student_leads(K, config["ON_POLICY_FRACTION"], rng)
        in_order = sorted(supervised)
        dmd_states = {in_order[j] for j in choose_supervised(len(in_order), config["DMD_STATES"], rng)}
        plan = RolloutPlan(text.batch(idx, accelerator.device, models.teacher_dtype),
                           text.empty_batch(batch, accelerator.device, models.teacher_dtype),
                           step_generator(config["SEED"], step, micro, accelerator.process_index, accelerator.device),
                           supervised, student_leads, dmd_states, 1.0 / (len(supervised) * accum), micro == accum - 1,
                           weights)
        terms += distill_rollout(models, accelerator, config, sigmas, timesteps, plan)
        samples += plan.samples
        adv_samples += plan.adv_samples
        for i in supervised:
            counts[i] += 1
    return terms, counts, StepSamples(samples, adv_samples)


@dataclasses.dataclass
class StepSamples:
    """What a step's rollouts leave for the critics: the fake score's samples and the adversarial head's pairs."""

    fake: list
    adv: list


def loss_weights(config: dict, step: int) -> dict:
    """The step's weights: the KL's warmup (kl_weight_at), DMD's and the adversarial term's staged start
    (distribution_weight_at)."""
    start, ramp = config["DISTRIBUTION_START_STEP"], config["DISTRIBUTION_RAMP_STEPS"]
    return {"kl": kl_weight_at(step, config["KL_WEIGHT"], config["KL_WARMUP_STEPS"]),
            "dmd": distribution_weight_at(step, config["DMD_WEIGHT"], start, ramp),
            "adv": distribution_weight_at(step, config["ADV_WEIGHT"], start, ramp)}


def fresh_student_samples(models: Models, accelerator, samples: list, sigmas, timesteps, generator) -> list:
    """New samples of the student for the fake score (FAKE_FRESH_SAMPLES): for each rollout's prompts in `samples`, the
    student's own sampler from fresh noise, without gradients, and its x0 predictions x_i - sigma_i v at the same
    states as there."""
    import torch

    student, wanted = accelerator.unwrap_model(models.student), {}
    for x0, cond, i in samples:
        wanted.setdefault(id(cond), (cond, x0.shape, []))[2].append(i)
    fresh = []
    for cond, shape, states in wanted.values():
        visited = []  # (x_i, v_i) of the sampler, in order

        def velocity(x, t, cond=cond, visited=visited):
            visited.append((x, predict_velocity(student, x, t, cond[0], cond[1], models.student_dtype)))
            return visited[-1][1]

        with torch.no_grad(), accelerator.autocast():
            sample_trajectory(velocity, torch.randn(shape, generator=generator, device=accelerator.device), sigmas,
                              timesteps)
        fresh += [(x0_from_velocity(visited[i][0], float(sigmas[i]), visited[i][1]), cond, i) for i in states]
    return fresh


def average_gradients(accelerator, params: list) -> None:
    """A critic (the fake score, the adversarial head) is no part of the student's DDP: its own all-reduce of the
    gradients across processes."""
    import torch

    if accelerator.num_processes > 1:
        grads = accelerator.reduce(torch.cat([p.grad.flatten() for p in params]), "mean")
        for p, g in zip(params, grads.split([p.numel() for p in params]), strict=True):
            p.grad.copy_(g.view_as(p))


def critic_step(params: list, optimizer, scaler, loss_sum, config: dict) -> None:
    """Clip and step a critic, unless its loss or gradient is not finite (under fp16 its scaler skips those itself)."""
    import torch

    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, config["MAX_GRAD_NORM"] or float("inf"))
    if bool(torch.isfinite(loss_sum) and torch.isfinite(norm)) or scaler.is_enabled():
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def update_fake_score(models: Models, accelerator, optimizer, scaler, samples: list, config: dict, step: int,
                      sigmas=None, timesteps=None):
    """DMD's fake score follows the student: FAKE_UPDATES_PER_STEP AdamW steps of flow_matching_loss at s from SD3's
    training density, conditional on each sample's prompt, each over all of this step's samples (the student's
    detached x0 predictions, in the micro-batches they were made in, gradients accumulated), or with
    FAKE_FRESH_SAMPLES every update after the first over new ones (fresh_student_samples, on the student's sampler
    `sigmas`, `timesteps`). Draws are seeded by (SEED, step), as the rollouts' are. A step whose loss or gradient is
    not finite is skipped. Returns the mean loss."""
    import torch

    shift, device, total = teacher_substep_shift(config, models), accelerator.device, 0.0
    for update in range(config["FAKE_UPDATES_PER_STEP"]):
        generator = step_generator(config["SEED"], step, 1_000 + update, accelerator.process_index, device)
        if update and config["FAKE_FRESH_SAMPLES"]:
            samples = fresh_student_samples(models, accelerator, samples, sigmas, timesteps, generator)
        loss_sum = torch.zeros((), device=device)
        with models.fake_context():
            for x0, cond, _ in samples:
                sigma = dmd_noise_levels(torch.randn(x0.shape[0], generator=generator, device=device), shift)
                noise = torch.randn(x0.shape, generator=generator, device=device)
                with accelerator.autocast():
                    v = predict_velocity(models.fake_host, noised(x0, sigma, noise), sigma * 1000, cond[0], cond[1],
                                         models.teacher_dtype)
                loss = flow_matching_loss(v, x0, noise)
                scaler.scale(loss / len(samples)).backward()
                loss_sum += loss.detach()
        average_gradients(accelerator, models.fake)
        critic_step(models.fake, optimizer, scaler, loss_sum, config)
        total += float(loss_sum) / len(samples)
    return total / config["FAKE_UPDATES_PER_STEP"]


def update_adversarial_head(models: Models, accelerator, optimizer, scaler, pairs: list, config: dict, step: int):
    """One AdamW step of the adversarial head on this step's pairs (the student's sample, the teacher's solve from the
    same state; both detached): hinge_discriminator_loss of its logits on the two, noised alike (one s and eps per
    pair, s from SD3's training density, shifted towards high noise, where the features carry the layout: shapes, not
    texture), the teacher's features taken without gradients. Returns the mean loss."""
    import torch

    shift, device = teacher_substep_shift(config, models), accelerator.device
    generator = step_generator(config["SEED"], step, 2_000, accelerator.process_index, device)
    params = list(models.adv_head.parameters())
    loss_sum = torch.zeros((), device=device)
    for fake, real, cond in pairs:
        sigma = dmd_noise_levels(torch.randn(fake.shape[0], generator=generator, device=device), shift)
        noise = torch.randn(fake.shape, generator=generator, device=device)
        both, sigmas = (torch.cat([cond[0], cond[0]]), torch.cat([cond[1], cond[1]])), torch.cat([sigma, sigma])
        with torch.no_grad(), accelerator.autocast():  # the features without gradients; the head's with them
            features = teacher_features(models, noised(torch.cat([real, fake]), sigmas, torch.cat([noise, noise])),
                                        sigmas, both, models.adv_head.blocks)
        real_logits, fake_logits = models.adv_head(features).chunk(2)
        loss = hinge_discriminator_loss(real_logits, fake_logits)
        scaler.scale(loss / len(pairs)).backward()
        loss_sum += loss.detach()
    average_gradients(accelerator, params)
    critic_step(params, optimizer, scaler, loss_sum, config)
    return float(loss_sum) / len(pairs)


def update_critics(models: Models, accelerator, training: "Training", samples: StepSamples, config: dict, step: int):
    """After the student's update: the fake score's and the adversarial head's, each where it is on. Returns their
    mean losses (None where off)."""
    fake_loss = disc_loss = None
    if models.fake:
        fake_loss = update_fake_score(models, accelerator, training.fake_optimizer, training.fake_scaler, samples.fake,
                                      config, step, training.sigmas, training.timesteps)
    if models.adv_head is not None:
        disc_loss = update_adversarial_head(models, accelerator, training.adv_optimizer, training.adv_scaler,
                                            samples.adv, config, step)
    return fake_loss, disc_loss

# =================================================================================================
# The training loop, its setup, the held-out evaluation.
# =================================================================================================


def largest_fitting_batch(images_per_step: int, peak_one: float, peak_two: float | None, capacity: float) -> int:
    """The largest divisor b of IMAGES_PER_STEP whose step fits: peak memory is linear in the batch (the weights
    once, the activations per image), m(b) = m_1 + (b - 1)(m_2 - m_1) <= capacity, from peaks m_1, m_2 measured at
    batch 1 and 2 (m_2 None: batch 2 did not fit). At least 1."""
    if peak_two is None:
        return 1
    fits = [b for b in range(1, images_per_step + 1)
            if images_per_step % b == 0 and peak_one + (b - 1) * (peak_two - peak_one) <= capacity]
    return max(fits, default=1)


def probe_peak_memory(models: Models, accelerator, text: "TextEmbeddings", config: dict, sigmas, timesteps,
                      batch: int) -> float | None:
    """Peak GPU memory (bytes) of one rollout of `batch` images with its backward, run eagerly (more than the compiled
    step takes, so the estimate errs towards fitting); None if it ran out of memory. Its gradients are dropped."""
    import torch

    free_accelerator_memory()
    torch.cuda.reset_peak_memory_stats()
    K = len(timesteps)
    plan = RolloutPlan(text.batch([i % len(text.embeds) for i in range(batch)], accelerator.device, models.teacher_dtype),
                       text.empty_batch(batch, accelerator.device, models.teacher_dtype),
                       step_generator(config["SEED"], 0, 0, accelerator.process_index, accelerator.device),
                       set(range(K)), set(range(K)), set(range(K)), 1.0 / K, False,
                       {"kl": config["KL_WEIGHT"], "dmd": config["DMD_WEIGHT"], "adv": config["ADV_WEIGHT"]})
    eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else contextlib.nullcontext()
    try:
        with eager:
            distill_rollout(models, accelerator, config, sigmas, timesteps, plan)
        torch.cuda.synchronize()
        peak = float(torch.cuda.max_memory_allocated())
    except torch.cuda.OutOfMemoryError:
        peak = None
    for p in models.trainable:
        p.grad = None
    free_accelerator_memory()
    return peak


def choose_batch_size(models: Models, accelerator, text: "TextEmbeddings", config: dict, sigmas, timesteps,
                      resumed_batch: int | None = None) -> tuple[int, str]:
    """BATCH_SIZE="auto": the largest divisor of IMAGES_PER_STEP that fits this GPU (largest_fitting_batch, from
    two probe rollouts, plus AdamW's two fp32 moments per trainable weight, against 90% of the memory torch can
    have), the same on every process; a resumed run keeps its checkpoint's batch where it still fits (so it
    continues exactly). On the CPU: all of IMAGES_PER_STEP in one rollout. Returns (batch, why)."""
    import torch

    images = config["IMAGES_PER_STEP"]
    if accelerator.device.type != "cuda":
        return images, f"auto: all {images} images in one rollout, as the CPU has no GPU memory to fit"
    free, _ = torch.cuda.mem_get_info(accelerator.device)
    capacity = 0.9 * (free + torch.cuda.memory_reserved(accelerator.device))
    optimizer_state = 8.0 * sum(p.numel() for p in models.trainable)
    peak_one = probe_peak_memory(models, accelerator, text, config, sigmas, timesteps, 1)
    if peak_one is None:
        raise torch.cuda.OutOfMemoryError("one image per rollout does not fit")
    peak_two = probe_peak_memory(models, accelerator, text, config, sigmas, timesteps, 2) if images > 1 else peak_one
    peak_one += optimizer_state
    peak_two = None if peak_two is None else peak_two + optimizer_state
    batch = largest_fitting_batch(images, peak_one, peak_two, capacity)
    batch = int(accelerator.gather(torch.tensor([batch], device=accelerator.device)).min())  # every process the same
    gib = 2.0**30
    second = "" if images == 1 else f", {peak_two / gib:.1f} GiB at 2" if peak_two is not None else ", batch 2 did not fit"
    why = (f"auto: peak memory {peak_one / gib:.1f} GiB at batch 1{second} (measured eagerly, with the optimizer's "
           f"state), linear in the batch; {capacity / gib:.1f} GiB usable")
    if resumed_batch and resumed_batch <= batch and images % resumed_batch == 0:
        batch, why = resumed_batch, why + f"; the checkpoint's batch {resumed_batch} kept, so the run continues exactly"
    return batch, why


def build_optimizer(params: list, config: dict, device, num_processes: int):
    """AdamW (fused on CUDA; 8-bit with ADAM_8BIT) and diffusers' learning-rate schedule. accelerate steps a prepared
    schedule once per process, hence the factor."""
    import torch
    from diffusers.optimization import get_scheduler

    adam = dict(lr=config["LEARNING_RATE"], betas=(config["ADAM_BETA1"], config["ADAM_BETA2"]),
                weight_decay=config["ADAM_WEIGHT_DECAY"], eps=config["ADAM_EPS"])
    if config["ADAM_8BIT"]:  # block-wise 8-bit moments (tensors under 4096 weights keep fp32 ones)
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(params, **adam)
    else:
        optimizer = torch.optim.AdamW(params, **adam, **({"fused": True} if device.type == "cuda" else {}))
    lr_scheduler = get_scheduler(config["LR_SCHEDULER"], optimizer, num_warmup_steps=config["LR_WARMUP_STEPS"] * num_processes,
                                 num_training_steps=config["MAX_STEPS"] * num_processes)
    return optimizer, lr_scheduler


def build_critic_optimizer(params: list, learning_rate: float, config: dict, device, mixed_precision: str):
    """A critic's own AdamW (constant learning rate) and fp16 gradient scaler (off under bf16 or fp32), outside
    accelerate's, whose scaler and data parallelism are the student's; (None, None) for no weights."""
    import torch

    if not params:
        return None, None
    optimizer, _ = build_optimizer(params, {**config, "LEARNING_RATE": learning_rate, "LR_SCHEDULER": "constant"},
                                   device, 1)
    return optimizer, torch.amp.GradScaler(device.type, enabled=mixed_precision == "fp16")


def build_fake_optimizer(models: Models, config: dict, device, mixed_precision: str):
    """DMD's fake score's optimizer and scaler (FAKE_LEARNING_RATE); (None, None) without DMD."""
    return build_critic_optimizer(models.fake, config["FAKE_LEARNING_RATE"], config, device, mixed_precision)


def apply_update(models: Models, accelerator, optimizer, lr_scheduler, terms, counts, config: dict, mixed_precision: str):
    """Clip, then step, unless the loss or the gradient is not finite: then the weights and the
    optimizer state stay exactly as they were, and the step counts as skipped. (Under fp16 the gradient
    scaler finds overflowing gradients itself, skips the step and lowers its scale: that counts as skipped
    too.) One host sync per step, for that check."""
    import torch

    loss = terms[:, 0].sum() / counts.sum()
    grad_norm = accelerator.clip_grad_norm_(models.trainable, config["MAX_GRAD_NORM"] or float("inf"))
    finite = bool(torch.isfinite(loss) and (mixed_precision == "fp16" or torch.isfinite(grad_norm)))
    if finite:
        optimizer.step()
        finite = not getattr(optimizer, "step_was_skipped", False)
        lr_scheduler.step()  # accelerate's scheduler does not move after a step the scaler skipped
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


@dataclasses.dataclass
class TrainResult:
    status: str = "running"  # trained (final.pt written) | finished (the ending too) | interrupted | failed
    step: int = 0
    skipped_steps: int = 0
    gap_before: float | None = None
    gap_last: float | None = None
    last_row: dict = dataclasses.field(default_factory=dict)
    exit_code: int = 0  # 130 after Ctrl-C, 143 after SIGTERM
    last_checkpoint: tuple | None = None  # (file name, step) of the newest checkpoint this run has


@dataclasses.dataclass
class Training:
    """What the loop works with, made by setup_training."""

    optimizer: object
    lr_scheduler: object
    sigmas: object  # the student's K-step sampler
    timesteps: object
    evaluate: HeldoutEval | None  # main process only
    metrics: MetricsWriter | None  # main process only
    result: TrainResult
    fake_optimizer: object = None  # with DMD: the fake score's AdamW and its fp16 gradient scaler (off otherwise)
    fake_scaler: object = None
    adv_optimizer: object = None  # with ADV_WEIGHT: the adversarial head's
    adv_scaler: object = None
    ema: object = None  # with EMA_DECAY: diffusers' EMAModel of models.trainable


def setup_training(run: Run, models: Models, text: TextEmbeddings, train_prompts: list[dict],
                   heldout_prompts: list[dict], teacher_path: str) -> Training:
    """Optimizer and schedule under accelerate, the sampler, the held-out evaluation, the writers, the
    restored checkpoint (weights, optimizer, schedule) or the step-0 evaluation of a fresh run."""
    config, accelerator, paths, device = run.config, run.accelerator, run.paths, run.accelerator.device
    set_attention_backend(config["ATTENTION_BACKEND"])  # after the text encoders, whose masked attention needs others
    if accelerator.is_main_process and (hint := attention_hint(config["ATTENTION_BACKEND"], device)):
        print(hint)
    sigmas, timesteps = sampler_sigmas(models.scheduler_config, config["NUM_ROLLOUT_STEPS"], config["SAMPLER_SHIFT"],
                                       models.image_seq_len, config["SAMPLER_SPACING"])
    if config["BATCH_SIZE"] == "auto":
        resumed_batch = run.resume[1]["config"].get("BATCH_SIZE") if run.resume else None
        config["BATCH_SIZE"], run.batch_choice = choose_batch_size(models, accelerator, text, config, sigmas, timesteps,
                                                                   resumed_batch)
    optimizer, lr_scheduler = build_optimizer(models.trainable, config, device, accelerator.num_processes)
    models.student, optimizer, lr_scheduler = accelerator.prepare(models.student, optimizer, lr_scheduler)
    fake_optimizer, fake_scaler = build_fake_optimizer(models, config, device, run.mixed_precision)
    adv_optimizer, adv_scaler = build_critic_optimizer(
        list(models.adv_head.parameters()) if models.adv_head is not None else [], config["ADV_LEARNING_RATE"], config,
        device, run.mixed_precision)
    ema = None
    if config["EMA_DECAY"]:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(models.trainable, decay=config["EMA_DECAY"], foreach=True)
    vae = None
    if config["SAVE_SAMPLE_GRIDS"] and accelerator.is_main_process:
        vae = load_vae(teacher_path, config, models.teacher_dtype, device)
    evaluate = None  # on the main process only: the others go on to the next step's gradient all-reduce and wait there
    if accelerator.is_main_process:
        evaluate = HeldoutEval(models, accelerator, text, heldout_prompts, len(train_prompts), config, sigmas,
                               timesteps, paths, vae, ema)
    result = TrainResult()
    if run.resume:
        result.step, result.skipped_steps, result.gap_before = restore_checkpoint(
            run.resume, models, optimizer, lr_scheduler, accelerator, (fake_optimizer, fake_scaler),
            (adv_optimizer, adv_scaler), ema)
        print(f"resumed {paths.name} from {run.resume[0].name} at step {result.step}")
    metrics = None
    if accelerator.is_main_process:
        metrics = MetricsWriter(paths.metrics, metric_columns(config["NUM_ROLLOUT_STEPS"]),
                                result.step if run.resume else None)
        atomic_write_text(paths.run / "config.json", json.dumps(config, indent=2))
    if config["REPORT_TO"]:
        accelerator.init_trackers(paths.name, config={k: v for k, v in config.items() if v is not None})
    if not run.resume:
        result.gap_before = evaluate(0) if evaluate else None
    evaluations = rows_through(paths.metrics / "eval.jsonl", result.step) if run.resume else []
    result.gap_last = evaluations[-1]["eval_gap"] if evaluations else result.gap_before
    return Training(optimizer, lr_scheduler, sigmas, timesteps, evaluate, metrics, result, fake_optimizer, fake_scaler,
                    adv_optimizer, adv_scaler, ema)


def train(run: Run, models: Models, text: TextEmbeddings, num_train_prompts: int, training: Training) -> TrainResult:
    """The distillation loop: one optimizer step per iteration, metrics rows, held-out evaluations,
    checkpoints by steps and by minutes; a summary is written however it ends."""
    import torch
    from tqdm.auto import tqdm

    config, accelerator, paths, device = run.config, run.accelerator, run.paths, run.accelerator.device
    optimizer, lr_scheduler, result = training.optimizer, training.lr_scheduler, training.result

    def checkpoint(name, status):
        if run.lock:
            run.lock.check()  # a process whose run was taken over stops before it writes over the new holder's files
        result.last_checkpoint = (name, result.step)
        if accelerator.is_main_process:
            extra = {"skipped_steps": result.skipped_steps, "gap_before": result.gap_before,
                     "num_processes": accelerator.num_processes, "prompts_sha256": run.prompts_sha256,
                     "teacher_fp8": models.teacher_fp8, "device_name": device_name(device)}
            if models.fake:
                extra.update(fake=named_state(models.fake_host, models.fake),
                             fake_optimizer=training.fake_optimizer.state_dict(),
                             fake_scaler=training.fake_scaler.state_dict())
            if models.adv_head is not None:
                extra.update(adv_head=models.adv_head.state_dict(), adv_optimizer=training.adv_optimizer.state_dict(),
                             adv_scaler=training.adv_scaler.state_dict())
            if training.ema is not None:
                extra.update(ema=training.ema.state_dict())
            run.checkpoints.save(name, result.step, status, config_fingerprint(config),
                                 lambda path: save_checkpoint(path, models, optimizer, lr_scheduler, accelerator,
                                                              result.step, config, extra))
        accelerator.wait_for_everyone()

    K, max_steps = config["NUM_ROLLOUT_STEPS"], config["MAX_STEPS"]
    images_per_step = config["IMAGES_PER_STEP"] * accelerator.num_processes
    if accelerator.is_main_process:
        print(run_header(run, models, images_per_step, result))
    window, last_checkpoint_time, consecutive_skips, rows = LogWindow(K, device), time.time(), 0, 0
    if run.resume:
        result.last_checkpoint = (run.resume[0].name, result.step)
    before_divergence = result.last_checkpoint  # the newest checkpoint written before a run of non-finite steps
    bar = tqdm(total=max_steps, initial=result.step, disable=not accelerator.is_local_main_process, desc="distill",
               dynamic_ncols=True)
    run.timings["train_started"] = time.time()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        while result.step < max_steps:
            terms, counts, samples = distill_step(models, accelerator, text, result.step, config, training.sigmas,
                                                  training.timesteps, num_train_prompts)
            # A Ctrl-C from here on takes effect once the updates, the step's row and grid and its checkpoint are
            # written, so a resumed run goes on exactly as one left alone.
            with held_signals():
                grad_norm, finite = apply_update(models, accelerator, optimizer, lr_scheduler, terms, counts, config,
                                                 run.mixed_precision)
                critic_losses = update_critics(models, accelerator, training, samples, config, result.step)
                if finite:
                    if training.ema is not None:
                        training.ema.step(models.trainable)
                    consecutive_skips = 0
                    window.add(terms, counts, grad_norm, *critic_losses)
                else:
                    before_divergence = result.last_checkpoint if consecutive_skips == 0 else before_divergence
                    result.skipped_steps += 1
                    consecutive_skips += 1
                    if consecutive_skips >= config["MAX_CONSECUTIVE_SKIPS"]:
                        raise UserError(diverged_message(consecutive_skips, result.step, before_divergence, paths))
                result.step += 1
                step = result.step
                bar.update(1)

                evaluate_now = step == max_steps or (config["EVAL_EVERY"] and step % config["EVAL_EVERY"] == 0)
                if evaluate_now:
                    result.gap_last = training.evaluate(step) if training.evaluate else None
                if step % config["LOG_EVERY"] == 0 or step == max_steps or evaluate_now:
                    row = window.row(accelerator, step, loss_weights(config, step - 1), lr_scheduler.get_last_lr()[0],
                                     images_per_step, result.skipped_steps,
                                     training.evaluate.readings if evaluate_now and training.evaluate else None)
                    if training.metrics:
                        training.metrics.write(row)
                    if config["REPORT_TO"]:
                        accelerator.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=step)
                    result.last_row = row
                    rows += 1
                    if rows == 2 and accelerator.is_main_process:  # the first window holds the compilation
                        bar.write(pace_line(row["sec_per_step"], max_steps - step))
                    bar.set_postfix(loss=f"{row['loss']:.4g}" if row["loss"] is not None else "nan",
                                    s_it=f"{row['sec_per_step']:.2f}")
                due = step % config["CHECKPOINT_EVERY"] == 0
                if not due and config["CHECKPOINT_EVERY_MINUTES"] and step % config["LOG_EVERY"] == 0:
                    minutes = (time.time() - last_checkpoint_time) / 60
                    due = main_process_decides(accelerator, minutes >= config["CHECKPOINT_EVERY_MINUTES"])
                if step < max_steps and due:
                    checkpoint(f"step_{step}.pt", "running")
                    last_checkpoint_time = time.time()
        check_finite_weights(models, result.step)
        checkpoint("final.pt", "trained")  # then the ending: finish_run
        result.status = "trained"
        if training.ema is not None:
            training.ema.copy_to(models.trainable)  # what the run exports: the average (final.pt holds both)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Stopped): what Colab, Kaggle, SLURM and timeout send
        result.status, result.exit_code = "interrupted", stop_exit_code(stop)
        with held_signals(reraise=False):  # a second Ctrl-C must not cut this checkpoint short
            checkpoint(f"step_{result.step}.pt", "interrupted")
        print(f"\ninterrupted ({'SIGTERM' if result.exit_code == 143 else 'Ctrl-C'}) at step {result.step}: saved "
              f"{paths.checkpoints / f'step_{result.step}.pt'}. To continue: {run.command}")
    except BaseException:
        result.status = "failed"
        raise
    finally:
        bar.close()
        if result.status != "trained":
            write_summary_after_a_stop(run, result, models)
    return result


def diverged_message(skips: int, step: int, before: tuple | None, paths: "RunPaths") -> str:
    """Why a run stopped after MAX_CONSECUTIVE_SKIPS non-finite steps, and which of its checkpoints came before that."""
    if before is None:
        kept = "No checkpoint of this run was written before it diverged."
    else:
        kept = (f"The newest checkpoint written before the first of them is {paths.checkpoints / before[0]} (step "
                f"{before[1]}); if the loss was already climbing before that (metrics.jsonl), it may be damaged too, "
                f"so none is known good.")
    return (f"{skips} steps in a row had a non-finite loss or gradient (the last at step {step}); stopped. {kept} Start "
            f"a new run (a new RUN_NAME) with a lower LEARNING_RATE, MIXED_PRECISION='bf16' or 'no', or a lower "
            f"GUIDANCE_SCALE.")


def check_finite_weights(models: Models, step: int) -> None:
    """A student whose weights are not finite is never written as final, exported or marked finished."""
    import torch

    if not all(bool(torch.isfinite(p).all()) for p in models.trainable):
        raise UserError(f"The student's weights are not finite at step {step}; it is not exported or marked finished. "
                        f"Lower LEARNING_RATE (or use MIXED_PRECISION='bf16' or 'no') and start a new run.")


class Stopped(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is (the run saves, writes its summary, says how to continue), with exit code 143."""


def raise_stopped(*_):
    raise Stopped


def stop_exit_code(stop: KeyboardInterrupt) -> int:
    return 143 if isinstance(stop, Stopped) else 130


STOP_SIGNALS = ("SIGINT", "SIGTERM")


@contextlib.contextmanager
def held_signals(reraise: bool = True):
    """A Ctrl-C (SIGINT) or SIGTERM inside the block is held until the block is done, then raised (as KeyboardInterrupt
    or Stopped) or, with reraise=False, dropped: the run is stopping already."""
    import signal

    if not threading_main():
        yield
        return
    held = []

    def hold(signum, _):
        if not held:
            print("\nfinishing this step's update, row and checkpoint, then stopping" if reraise else
                  "\nalready stopping: the checkpoint is being written")
        held.append(signum)

    previous = {name: signal.signal(getattr(signal, name), hold) for name in STOP_SIGNALS}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
    if held and reraise:
        raise Stopped if held[0] == signal.SIGTERM else KeyboardInterrupt


def finish_run(run: Run, models: Models, teacher_path: str, result: TrainResult) -> None:
    """The ending of a trained run, in an order each part of which a re-run redoes if a kill cut it: final.pt
    (written), the export, the summary, then latest.json's status "finished"."""
    fault_point("after final.pt")
    result.status = "finished"
    if run.accelerator.is_main_process:
        if run.config["EXPORT_DIFFUSERS"]:
            export_student(models, run.accelerator, run.config, teacher_path, run.paths, result.gap_before,
                           result.gap_last)
        write_summary(run, result, models)
        run.checkpoints.mark("finished")


def trained_result(run: Run, models: Models) -> TrainResult:
    """A run trained to its end whose ending was cut off: the student's final weights restored, what the summary
    needs read back from its checkpoint and metrics."""
    path, payload = run.resume
    run.accelerator.unwrap_model(models.student).load_state_dict(payload["student"], strict=False)
    if "ema" in payload:  # the average is what the run exports
        for param, average in zip(models.trainable, payload["ema"]["shadow_params"], strict=True):
            param.data.copy_(average)
    evaluations = rows_through(run.paths.metrics / "eval.jsonl", payload["step"])
    rows = rows_through(run.paths.metrics / "metrics.jsonl", payload["step"])
    problem = export_problem(run.paths.export) if run.config["EXPORT_DIFFUSERS"] else None
    why = f"its export {problem}" if problem and run.paths.export.exists() else "its export and summary were cut off"
    print(f"finishing run {run.paths.name}: trained to step {payload['step']} ({path.name}); {why}; writing them "
          f"again from {path.name}.")
    return TrainResult("trained", payload["step"], payload.get("skipped_steps", 0), payload.get("gap_before"),
                       evaluations[-1]["eval_gap"] if evaluations else None, rows[-1] if rows else {})


def main_process_decides(accelerator, flag: bool) -> bool:
    """The main process's flag, on every process. A checkpoint is collective (all processes wait for
    it), so a decision taken on each process's own clock could differ by a step and hang them all."""
    if accelerator.num_processes == 1:
        return flag
    from accelerate.utils import broadcast_object_list

    return bool(broadcast_object_list([flag])[0])


class LogWindow:
    """Loss terms, supervision counts and gradient norms summed on the device since the last metrics row."""

    def __init__(self, num_steps: int, device):
        self.num_steps, self.device = num_steps, device
        self.reset()

    def reset(self):
        import torch

        num_steps, device = self.num_steps, self.device
        self.terms = torch.zeros(num_steps, len(LOSS_TERMS), device=device)
        self.counts = torch.zeros(num_steps, device=device)
        self.grad = torch.zeros((), device=device)
        self.steps, self.fake_loss, self.disc_loss, self.start = 0, [], [], time.time()

    def add(self, terms, counts, grad_norm, fake_loss=None, disc_loss=None):
        self.terms += terms
        self.counts += counts
        self.grad += grad_norm.detach().float()
        self.steps += 1
        for losses, loss in ((self.fake_loss, fake_loss), (self.disc_loss, disc_loss)):
            if loss is not None:
                losses.append(loss)

    def row(self, accelerator, step, weights: dict, lr, images_per_step, skipped, evaluation: dict | None) -> dict:
        """Means over the window and all processes, read from the device once; then the window starts again.
        `evaluation`: the held-out evaluation's readings at this step (eval_gap, eval_drift, eval_diversity), if any."""
        import torch

        elapsed, steps = time.time() - self.start, max(self.steps, 1)
        K, n = self.num_steps, len(LOSS_TERMS)  # one all-reduce and one host read for the whole row
        summed = accelerator.reduce(torch.cat([self.terms.flatten(), self.counts, self.grad.reshape(1)]), "sum").tolist()
        terms, counts = [summed[n * i:n * i + n] for i in range(K)], summed[n * K:(n + 1) * K]
        total, grad_norm = sum(counts), summed[-1] / accelerator.num_processes

        def mean(col):
            return sum(t[col] for t in terms) / total if total else None

        row = {"step": step, **{name: mean(col) for col, name in enumerate(LOSS_TERMS)},
               "fake_loss": sum(self.fake_loss) / len(self.fake_loss) if self.fake_loss else None,
               "disc_loss": sum(self.disc_loss) / len(self.disc_loss) if self.disc_loss else None,
               "kl_weight": weights["kl"], "dmd_weight": weights["dmd"], "adv_weight": weights["adv"], "lr": lr,
               "grad_norm": grad_norm / steps, "sec_per_step": elapsed / steps,
               "images_per_sec": images_per_step * steps / elapsed if elapsed > 0 else None,
               "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
               "skipped_steps": skipped, **dict.fromkeys(EVAL_COLUMNS), **(evaluation or {})}
        for i, (t, c) in enumerate(zip(terms, counts, strict=True)):
            row.update({f"{name}_{i}": t[col] / c if c else None for col, name in enumerate(LOSS_TERMS) if col})
        self.reset()
        return row


def run_header(run: Run, models: Models, images_per_step: int, result: TrainResult) -> str:
    """What this run is, before its progress bar: where it writes, on what, what trains, how long, where it starts."""
    config, accelerator = run.config, run.accelerator
    trainable = sum(p.numel() for p in models.trainable)
    student = "LoRA on the teacher's own weights" if models.shares_weights else config["STUDENT_ID"]
    gap = "" if result.gap_before is None else f"{result.gap_before:.4g}"
    fp8 = ", FP8 matmuls" if models.teacher_fp8 else ""
    student += " (FP8 base matmuls)" if models.student_fp8 else ""
    batch = config["BATCH_SIZE"]
    return "\n".join([
        f"run {run.paths.name}: writing under {run.paths.root}",
        f"  device {accelerator.device} x {accelerator.num_processes}, mixed precision {run.mixed_precision}, teacher "
        f"{config['TEACHER_ID']} ({str(models.teacher_dtype).replace('torch.', '')}{fp8}), student {student}",
        f"  trainable parameters {trainable:,} ({config['TRAINABLE']}"
        + (f" r{config['LORA_RANK']}{', DoRA' if config['LORA_USE_DORA'] else ''} on {config['LORA_TARGET_MODULES']}"
           if config["TRAINABLE"] == "lora" else "") + ")",
        checkpoint_line(config, trainable + sum(p.numel() for p in models.fake or [])
                        + (sum(p.numel() for p in models.adv_head.parameters()) if models.adv_head is not None else 0)),
        f"  batch {batch} images per rollout, {config['IMAGES_PER_STEP'] // batch} rollout(s) per step, per process"
        + (f"; {run.batch_choice}" if run.batch_choice else ""),
        f"  K = {config['NUM_ROLLOUT_STEPS']} student steps ({config['SAMPLER_SPACING']} spacing), N = "
        f"{teacher_substeps(config)} teacher substeps per step ({teacher_solver(config)}; "
        f"{teacher_passes_per_step(config) // config['IMAGES_PER_STEP']} teacher passes per image), guidance "
        f"{config['GUIDANCE_SCALE']}"
        + (f"; DMD x {config['DMD_WEIGHT']:g} at {config['DMD_STATES'] or 'every'} supervised state(s) per rollout "
           f"(fake score: LoRA r{config['FAKE_LORA_RANK']} on the teacher's weights, "
           f"{config['FAKE_UPDATES_PER_STEP']} update(s) per step at {config['FAKE_LEARNING_RATE']:g})"
           if models.fake else "")
        + (f"; adversarial x {config['ADV_WEIGHT']:g} (a head on the teacher's blocks {models.adv_head.blocks})"
           if models.adv_head is not None else "")
        + (f"; those from step {config['DISTRIBUTION_START_STEP']}, ramped over {config['DISTRIBUTION_RAMP_STEPS']}"
           if (models.fake or models.adv_head is not None) and (config['DISTRIBUTION_START_STEP']
                                                                or config['DISTRIBUTION_RAMP_STEPS']) else "")
        + f"; {config['MAX_STEPS']} optimizer steps of {images_per_step} images"
        + (f", from step {result.step}" if result.step else ""),
        f"  held-out gap at step 0: {gap or 'n/a'}" + (f", latest {result.gap_last:.4g}"
                                                        if run.resume and result.gap_last is not None else "")
        + f" (latent MSE to the teacher's {config['TEACHER_EVAL_STEPS']}-step guided sample; it should fall)"])


def checkpoint_gb(trained_params: int, adam_8bit: bool = False) -> float:
    """Size of one checkpoint: every trained weight (the student's, the fake score's, the adversarial head's) in fp32
    with AdamW's two moments, fp32 (3 x 4 bytes: 12 x params / 1e9 GB, 2B weights: 24 GB) or 8-bit (4 + 2 x 1: 6 x)."""
    return (6 if adam_8bit else 12) * trained_params / 1e9


def checkpoint_line(config: dict, trained_params: int) -> str:
    """The header's line on disk use: one checkpoint, and all the run keeps (KEEP_LAST_CHECKPOINTS and final.pt)."""
    def size(gb):
        return f"{gb:.3g} GB" if gb >= 1 else f"{1000 * gb:.3g} MB"

    one, cap = checkpoint_gb(trained_params, config.get("ADAM_8BIT", False)), config["KEEP_CHECKPOINTS_GB"]
    count = config["KEEP_LAST_CHECKPOINTS"]
    if cap:
        count = max(1, min(count, int(cap // one)))
    kept = one * (count + 1)
    capped = f", at most {cap:g} GB by KEEP_CHECKPOINTS_GB" if cap else ""
    line = f"  checkpoints about {size(one)} each, {size(kept)} kept ({count} + final.pt{capped})"
    if kept > 10:
        line += (f"; a free Google Drive holds 15 GB: set KEEP_CHECKPOINTS_GB or lower KEEP_LAST_CHECKPOINTS, or train "
                 f"LoRA (TRAINABLE='lora'){'' if config.get('ADAM_8BIT') else ' or with ADAM_8BIT=True'}, or write "
                 f"OUTPUT_ROOT to a larger disk")
    return line


def pace_line(sec_per_step: float, steps_left: int) -> str:
    """This run's own estimate of its time, from a window of steps after the first (which compiles)."""
    def duration(seconds):
        return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"

    return (f"pace: {sec_per_step:.2f} s per optimizer step, so 1,000 steps take about {duration(1000 * sec_per_step)}"
            f" and the {steps_left} steps left about {duration(steps_left * sec_per_step)}")


def restore_checkpoint(resume, models: Models, optimizer, lr_scheduler, accelerator, fake=(None, None),
                       adv=(None, None), ema=None):
    """Weights, optimizer, schedule, scaler, and the critics (DMD's fake score, the adversarial head) with their own
    optimizers and scalers, and the EMA of the weights; returns (step, skipped steps, gap before). No RNG state:
    every draw of a step comes from generators seeded by (SEED, step), so a resumed run continues exactly without one."""
    path, payload = resume
    student = accelerator.unwrap_model(models.student)
    for model, params, key in ((student, models.trainable, "student"), (models.fake_host, models.fake, "fake")):
        if not params:
            continue
        missing = set(named_state(model, params)) - set(payload.get(key) or {})
        if missing:
            raise UserError(f"Checkpoint {path} lacks {len(missing)} trainable weights (e.g. {sorted(missing)[0]}).")
        model.load_state_dict(payload.get(key) or {}, strict=False)
    optimizer.load_state_dict(payload["optimizer"])
    lr_scheduler.load_state_dict(payload["lr_scheduler"])
    if payload["scaler"] is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(payload["scaler"])
    if models.fake:
        fake[0].load_state_dict(payload["fake_optimizer"])
        fake[1].load_state_dict(payload["fake_scaler"])
    if models.adv_head is not None:
        models.adv_head.load_state_dict(payload["adv_head"])
        adv[0].load_state_dict(payload["adv_optimizer"])
        adv[1].load_state_dict(payload["adv_scaler"])
    if ema is not None:
        if "ema" not in payload:
            raise UserError(f"Checkpoint {path} holds no EMA of the weights (EMA_DECAY was 0 when it was written).")
        ema.load_state_dict(payload["ema"])
        ema.to(accelerator.device)
    return payload["step"], payload.get("skipped_steps", 0), payload.get("gap_before")


def student_trajectory(models: Models, accelerator, cond, sigmas, timesteps, noise) -> list:
    """The states of the student's own K-step deterministic sampler (conditional only: guidance is distilled into it)."""
    import torch

    student = accelerator.unwrap_model(models.student)
    with torch.no_grad(), accelerator.autocast():
        return sample_trajectory(lambda x, t: predict_velocity(student, x, t, cond[0], cond[1], models.student_dtype),
                                 noise, sigmas, timesteps)


def teacher_reference_samples(models: Models, heldout_cond, uncond, config: dict, noise):
    """The teacher's own sampler (TEACHER_EVAL_STEPS steps, guidance) on the held-out prompts: computed once."""
    import torch

    sigmas, timesteps = sampler_sigmas(models.scheduler_config, config["TEACHER_EVAL_STEPS"], None, models.image_seq_len)
    with torch.no_grad(), models.teacher_context():
        return sample_latents(lambda x, t: teacher_velocity(models.teacher, x, t, heldout_cond, uncond,
                                                            config["GUIDANCE_SCALE"], models.teacher_dtype),
                              noise, sigmas, timesteps)


def teacher_path(models: Models, config: dict, cond, uncond, noise, sigmas) -> list:
    """The teacher's own path from noise over the student's K steps, x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v*(x_i)
    with v* its guided N-substep target (teacher_target_velocity): the states off-policy training learns at."""
    import torch

    shift, substeps, solver = teacher_substep_shift(config, models), teacher_substeps(config), teacher_solver(config)

    def guided(y, t):
        return teacher_velocity(models.teacher, y, t, cond, uncond, config["GUIDANCE_SCALE"], models.teacher_dtype)

    with torch.no_grad(), models.teacher_context():
        return sample_trajectory(lambda x, i: teacher_target_velocity(guided, x, sigmas, i, substeps, shift, solver),
                                 noise, sigmas, range(len(sigmas) - 1))


class HeldoutEval:
    """The held-out teacher-student gap: latent MSE between the teacher's full guided sample and the
    student's K-step sample from the same fixed noise, averaged over EVAL_NOISES noises per prompt
    (sampled one prompt batch at a time, so memory does not grow with it); and the state drift
    (state_drift) between the student's states and the teacher's path (teacher_path) from that noise.
    The teacher's samples (and their images) and path are made once; each evaluation appends to
    eval.jsonl and, with a VAE, saves a PNG grid of the first noise. With an EMA of the weights, the student
    evaluated is the average (the one exported)."""

    def __init__(self, models: Models, accelerator, text: TextEmbeddings, heldout: list[dict], first_index: int,
                 config: dict, sigmas, timesteps, paths: "RunPaths", vae=None, ema=None):
        import torch

        device = accelerator.device
        indices = list(range(first_index, first_index + len(heldout)))
        self.models, self.accelerator, self.sigmas, self.timesteps = models, accelerator, sigmas, timesteps
        self.ema = ema
        self.prompts, self.paths, self.vae, self.teacher_images = [p["prompt"] for p in heldout], paths, vae, None
        self.cond = text.batch(indices, device, models.teacher_dtype)
        self.noise = torch.randn((config["EVAL_NOISES"] * len(indices), *models.latent_shape),
                                 generator=torch.Generator().manual_seed(config["SEED"] + 12345)).to(device)
        uncond = text.empty_batch(len(indices), device, models.teacher_dtype)
        chunks = self.noise.split(len(indices))
        self.teacher = torch.cat([teacher_reference_samples(models, self.cond, uncond, config, noise) for noise in chunks])
        paths = [teacher_path(models, config, self.cond, uncond, noise, sigmas) for noise in chunks]
        self.teacher_path = [torch.cat(states) for states in zip(*paths, strict=True)]
        self.num_steps, self.noises, self.readings = config["NUM_ROLLOUT_STEPS"], config["EVAL_NOISES"], {}
        self.teacher_diversity = sample_diversity(self.teacher, self.noises) if self.noises > 1 else None

    def __call__(self, step: int) -> float:
        import torch

        if self.ema is not None:  # the average's samples, then the weights back as they were
            self.ema.store(self.models.trainable)
            self.ema.copy_to(self.models.trainable)
        try:
            trajectories = [student_trajectory(self.models, self.accelerator, self.cond, self.sigmas, self.timesteps,
                                               noise) for noise in self.noise.split(len(self.prompts))]
        finally:
            if self.ema is not None:
                self.ema.restore(self.models.trainable)
        states = [torch.cat(states) for states in zip(*trajectories, strict=True)]
        samples = states[-1]
        per_sample = (samples - self.teacher).square().flatten(1).mean(1)
        per_prompt = per_sample.view(self.noises, len(self.prompts)).mean(0).tolist()
        gap = sum(per_prompt) / len(per_prompt)
        drift = state_drift(states, self.teacher_path)
        self.readings = {"eval_gap": gap,
                         # the states learned at, past the noise and before the sample
                         "eval_drift": sum(drift[:-1]) / (len(drift) - 1) if len(drift) > 1 else None,
                         # below 1: the student's samples of a prompt vary less than the teacher's (DMD can collapse modes)
                         "eval_diversity": (sample_diversity(samples, self.noises) / self.teacher_diversity
                                            if self.teacher_diversity else None)}
        if self.accelerator.is_main_process:
            row = {"step": step, **self.readings, "per_prompt": per_prompt, "prompts": self.prompts,
                   "noises_per_prompt": self.noises, "state_drift": drift, "time": time.time()}
            fault_point(f"evaluation {step}")
            append_line(self.paths.metrics / "eval.jsonl", json.dumps(row))
            if self.vae is not None:
                first = slice(0, len(self.prompts))
                if self.teacher_images is None:
                    self.teacher_images = decode_latents(self.vae, self.teacher[first])
                grid = sample_grid(self.teacher_images, decode_latents(self.vae, samples[first]), self.prompts,
                                   per_sample[first].tolist(), self.num_steps)
                atomic_write(self.paths.samples / f"step_{step}.png", lambda tmp: grid.save(tmp, format="PNG"))
                send_to_trackers(self.accelerator, grid, step)
        return gap


def send_to_trackers(accelerator, grid, step: int) -> None:
    """A sample grid to each tracker of REPORT_TO that takes images (TensorBoard, W&B), beside its PNG."""
    import numpy as np

    images = np.asarray(grid.convert("RGB"))[None]  # (1, H, W, 3)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": images}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"samples": images}, step=step)

# =================================================================================================
# main(): the story of a run.
# =================================================================================================


def main(argv: list[str] | None = None) -> int:
    """The story of a run: settings, prompts, models, text embeddings, training, the exported student."""
    config = None
    try:
        argv = sys.argv[1:] if argv is None else argv
        if "--help" in argv or "-h" in argv:
            try:
                print(help_text(), flush=True)
            except BrokenPipeError:  # --help | head: the reader left; say nothing more (as Python's docs advise)
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        config = parse_args(argv)
        if config["PRINT_COLAB_SETUP"]:
            print(colab_setup_text())
            return 0
        validate_config(config)
        if os.environ.get("LOCAL_RANK", "0") == "0":  # once per machine in an accelerate launch
            for warning in setting_warnings(config):
                print(f"warning: {warning}", flush=True)
        if config["INSTALL_DEPS"]:
            dep_install()
        quiet_libraries()
        if threading_main():
            import signal

            signal.signal(signal.SIGTERM, raise_stopped)  # handled as Ctrl-C is: the run saves and says how to go on

        run = start_run(config)
        run.command = resume_command(argv, run.paths.name)
        try:
            code = train_and_finish(run)
        finally:
            if run.lock:
                run.lock.release()
        if run.accelerator.num_processes > 1:
            # Everything is written. Tearing the gloo process group down hung now and then (1 in 3 full test runs, after
            # the export, with and without a barrier first), so the processes leave together and skip the teardown.
            run.accelerator.wait_for_everyone()
            for tracker in run.accelerator.trackers:
                tracker.finish()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        run.accelerator.end_training()  # trackers closed
        return code
    except KeyboardInterrupt as stop:
        print("\ninterrupted: nothing is lost; the same command continues the run where it stopped.", file=sys.stderr)
        return stop_exit_code(stop)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a write that failed outside atomic_write (a metrics row, the lock): the same refusal
        import errno

        if errno.errorcode.get(err.errno) not in WRITE_ERRNOS:
            raise
        print(f"error: {write_failure(Path(err.filename or (config or {}).get('OUTPUT_ROOT', '.')), err)}",
              file=sys.stderr)
        return 2
    except Exception as err:
        if type(err).__name__ != "OutOfMemoryError":
            raise
        print(f"error: {out_of_memory_advice(config)}", file=sys.stderr)
        return 2


def train_and_finish(run: Run) -> int:
    """Prompts, models, text embeddings, training, then the ending (export, summary, status); or just the ending,
    for a run whose ending a kill cut off. Returns the exit code."""
    if run.finished:
        print(finished_run_report(run))
        return 0
    train_prompts, heldout_prompts = prepare_prompts(run)
    folders = fetch_model_folders(run)
    # The prompts are encoded (T5 too) before any transformer loads: the text encoders and the models are never
    # on the GPU together, and the encoders are freed before training takes its memory.
    text = None if run.trained else cache_text_embeddings(run, train_prompts + heldout_prompts, folders[0])
    models, teacher_path = load_run_models(run, folders)
    fault_point("startup")
    if run.trained:
        result = trained_result(run, models)
    else:
        training = setup_training(run, models, text, train_prompts, heldout_prompts, teacher_path)
        result = train(run, models, text, len(train_prompts), training)
    if result.status == "interrupted":
        return result.exit_code
    finish_run(run, models, teacher_path, result)
    if run.accelerator.is_main_process:
        print(json.dumps({"status": result.status, "run_name": run.paths.name, "step": result.step,
                          "eval_gap_before": result.gap_before, "eval_gap_last": result.gap_last}))
    return 0

# =================================================================================================
# Nothing below changes what is learned: the command line and its checks, run folders and resume, devices,
# prompts, model loading, files and checkpoints, writers, the built-in tiny SD3, Colab and Hub helpers.
#
# Command line and validation.
# =================================================================================================


class UserError(Exception):
    """A problem the user can fix; printed as one paragraph, without a traceback."""


def default_config() -> dict:
    return {name: globals()[name] for name in CONFIG_NAMES}


AUTO_OR = {"BATCH_SIZE": 1, "TEACHER_FP8": False, "DMD_WEIGHT": 0.0}  # settings that take "auto" or a value of this one's type
RENAMED = {"GRAD_ACCUM_STEPS": "the rollouts per step are now IMAGES_PER_STEP / BATCH_SIZE: set IMAGES_PER_STEP "
                               "(the old BATCH_SIZE x GRAD_ACCUM_STEPS)"}


def parse_value(name: str, text: str, default):
    """Parse --NAME=VALUE to the type of the constant's default ("auto" where AUTO_OR allows it)."""
    if name in AUTO_OR:
        if text.lower() == "auto":
            return "auto"
        default = AUTO_OR[name]
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{name}={text}: expected true or false.")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise UserError(f"--{name}={text}: expected a whole number.") from None
    if isinstance(default, float) or default is None:
        if default is None and text.lower() in ("none", ""):
            return None
        try:
            return float(text)
        except ValueError:
            raise UserError(f"--{name}={text}: expected a number{' or none' if default is None else ''}.") from None
    return text


PRECEDENCE = ("Precedence: the constants at the top of the script, then --preset NAME (it sets the values it names, "
              "over the file's, and prints each one), then each --NAME=VALUE, which wins over both.")


LORA_ATTENTION = "attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,attn.add_k_proj,attn.add_v_proj,attn.to_add_out"
LORA_MLPS = "ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2"


def auto_lora_targets(num_steps) -> str:
    """LORA_TARGET_MODULES="auto": attention and the MLPs at K = 1, where the MLPs were measured to win with DMD at
    800 updates on both tasks (scripts/experiment_results, 2026-12-07: shapes 25% -> 38% strict, digits 52% -> 58%;
    DoRA on attention alone added nothing, 25%); attention alone at K >= 2 (K = 2 with the MLPs read 53%, attention
    alone 56% the session before)."""
    return f"{LORA_ATTENTION},{LORA_MLPS}" if num_steps == 1 else LORA_ATTENTION


def auto_dmd_weight(num_steps) -> float:
    """DMD_WEIGHT="auto": 1 where distribution matching was measured to win (scripts/experiment_results, 2026-12-06
    and -07, on both tasks): at K = 2 (shapes 48% -> 56% strict at 800 updates), and at K = 1 (all weights 18% -> 45%;
    LoRA with DoRA and the MLPs 40-46%, where regression alone stays at 17% to 1,200 updates); else 0 (at K = 4 it
    made the student worse)."""
    return 1.0 if num_steps <= 2 else 0.0


def resolve_auto_settings(config: dict) -> dict:
    """DMD_WEIGHT and LORA_TARGET_MODULES "auto" resolved in place, from the settings alone (so a run and its resume
    agree): auto_dmd_weight, auto_lora_targets. Every config the step runs with passes through here."""
    if config["DMD_WEIGHT"] == "auto":
        config["DMD_WEIGHT"] = auto_dmd_weight(config["NUM_ROLLOUT_STEPS"])
    if config["LORA_TARGET_MODULES"] == "auto":
        config["LORA_TARGET_MODULES"] = auto_lora_targets(config["NUM_ROLLOUT_STEPS"])
    return config


def parse_args(argv: list[str]) -> dict:
    """Config = constants, then --preset NAME, then each --NAME=VALUE, in that order of precedence (PRECEDENCE)."""
    config = default_config()
    overrides, preset, problems = {}, None, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--preset" or arg.startswith("--preset="):
            preset = arg.split("=", 1)[1] if "=" in arg else (args.pop(0) if args else "")
            if preset not in PRESETS:
                problems.append(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
            continue
        if arg.startswith("--") and "=" not in arg and arg[2:] in config:
            value = args.pop(0) if args and not args[0].startswith("--") else "VALUE"
            problems.append(f"{arg} {value}: write {arg}={value} (an = between name and value).")
            continue
        if not arg.startswith("--") or "=" not in arg:
            problems.append(f"{arg!r}: arguments are --NAME=VALUE (e.g. --MAX_STEPS=200) or --preset tiny; --help lists them.")
            continue
        name, text = arg[2:].split("=", 1)
        if name in RENAMED:
            problems.append(f"--{name} is gone: {RENAMED[name]}.")
            continue
        if name not in config:
            close = difflib.get_close_matches(name.upper(), CONFIG_NAMES, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join('--' + c for c in close)}?" if close else ""
            problems.append(f"unknown setting --{name}.{hint}")
            continue
        try:
            overrides[name] = parse_value(name, text, config[name])
        except UserError as err:
            problems.append(str(err))
    if problems:
        raise UserError("Command line: " + " ".join(problems))
    if preset:
        print(f"--preset {preset} sets " + ", ".join(f"{k}={v!r}" for k, v in PRESETS[preset].items() if k not in overrides)
              + " (over the constants in the file; a --NAME=VALUE on the command line wins over both).")
        config.update(PRESETS[preset])
    config.update(overrides)
    resolve_auto_settings(config)
    if not config["PROMPTS_JSONL"] and config["GENERATE_PROMPTS"]:  # a file the script owns, one per prompt set
        config["PROMPTS_JSONL"] = str(Path(config["OUTPUT_ROOT"]) / "prompts" /
                                      f"generated-n{config['NUM_PROMPTS']}-seed{config['PROMPT_SEED']}.jsonl")
    return config


def help_text() -> str:
    """Every setting by block, with its default and its comment, read from this file's config block."""
    import re

    lines, block = [__doc__.strip().split("\n\n")[0], "", PRECEDENCE, ""], None
    source = Path(__file__).read_text(encoding="utf-8").split("PRESETS = {")[0]
    for line in source.splitlines():
        if line.startswith("# --- "):
            block = line[6:].rstrip("- ").strip()
            lines.append(f"{block}:")
        elif block and (match := re.match(r"^([A-Z][A-Z0-9_]*) = .*?(?:  # (.*))?$", line)):
            name, comment = match.groups()
            lines.append(f"  --{name}={globals()[name]!r}" + (f"\n      {comment}" if comment else ""))
        elif block and line.startswith("#   "):
            lines[-1] += " " + line[4:].strip()
    lines += ["", f"Presets: {', '.join(f'--preset {name}' for name in PRESETS)} (the built-in tiny SD3 on a CPU)."]
    return "\n".join(lines)


def setting_warnings(c: dict) -> list[str]:
    """Settings that run but that a user would regret: each a line, printed before any model loads."""
    warnings = []
    if c["GENERATE_PROMPTS"] and c["TEACHER_ID"] != TINY_MODEL_ID:
        warnings.append(f"a real teacher ({c['TEACHER_ID']}) with the built-in toy prompts ({c['NUM_PROMPTS']} "
                        f"templated prompts): the student learns the prompts it is shown. For a student to use, give "
                        f"your own (GENERATE_PROMPTS=False, PROMPTS_JSONL=...).")
    if c["NUM_ROLLOUT_STEPS"] == 1 and c["TRAINABLE"] == "lora" and ("ff." not in c["LORA_TARGET_MODULES"]
                                                                      or c["DMD_WEIGHT"] == 0):
        warnings.append("a one-step LoRA student without both DMD and the MLPs: on attention alone it drew the right "
                        "shape 17% of the time from 200 to 1,200 updates without DMD and 25% at 800 with it (the "
                        "teacher: 92%); with DMD_WEIGHT=1 and the MLPs in LORA_TARGET_MODULES (LORA_TARGET_MODULES="
                        "'auto' does both at K = 1) 46% at 1,600 (3 seeds); README, Does it work?.")
    if c["NUM_ROLLOUT_STEPS"] == 1 and c["TRAINABLE"] == "all" and c["DMD_WEIGHT"] == 0:
        warnings.append("a one-step student of all weights without DMD drew the right shape 18% of the time, with "
                        "DMD_WEIGHT=1 43% (3 seeds, 200 updates; 45% at 800; README, Does it work?): set "
                        "DMD_WEIGHT='auto' or 1.")
    return warnings


def validate_config(c: dict) -> None:
    """Check every setting before anything heavy runs; report all problems at once, each with its fix."""
    problems = []

    def need(ok, message):
        if not ok:
            problems.append(message)

    for name in ("IMAGES_PER_STEP", "MAX_STEPS", "LOG_EVERY", "CHECKPOINT_EVERY",
                 "NUM_ROLLOUT_STEPS", "TEACHER_EVAL_STEPS", "NUM_PROMPTS", "LORA_RANK", "T5_MAX_LENGTH",
                 "KEEP_LAST_CHECKPOINTS", "MAX_CONSECUTIVE_SKIPS", "EVAL_NOISES", "FAKE_LORA_RANK", "FAKE_UPDATES_PER_STEP"):
        need(isinstance(c[name], int) and c[name] >= 1, f"{name}={c[name]!r} must be a whole number >= 1.")
    need(not c["ADAM_8BIT"] or importlib.util.find_spec("bitsandbytes") is not None,
         "ADAM_8BIT=True needs bitsandbytes, which is not installed: pip install bitsandbytes (a GPU build; on Colab "
         "!pip install -q bitsandbytes), or set ADAM_8BIT=False for torch's AdamW (two fp32 moments per weight).")
    need(isinstance(c["HELDOUT_PROMPTS"], int) and c["HELDOUT_PROMPTS"] >= 1,
         f"HELDOUT_PROMPTS={c['HELDOUT_PROMPTS']!r}: at least one prompt must be held out, since every evaluation (the "
         f"gap, the sample grids, the summary) is taken on them; set HELDOUT_PROMPTS=8 (or 1 for almost all to train).")
    need(isinstance(c["TEACHER_SUBSTEPS"], int) and c["TEACHER_SUBSTEPS"] >= 0,
         f"TEACHER_SUBSTEPS={c['TEACHER_SUBSTEPS']!r} must be a whole number >= 1, or 0 for 8 // K.")
    for name in ("LEARNING_RATE", "ADAM_EPS", "IMAGE_SIZE", "LORA_ALPHA", "FAKE_LEARNING_RATE", "ADV_LEARNING_RATE"):
        need(isinstance(c[name], (int, float)) and c[name] > 0, f"{name}={c[name]!r} must be > 0.")
    for name in ("ADAM_WEIGHT_DECAY", "MAX_GRAD_NORM", "LR_WARMUP_STEPS", "KL_WARMUP_STEPS", "EVAL_EVERY",
                 "CHECKPOINT_EVERY_MINUTES", "KEEP_CHECKPOINTS_GB", "SUPERVISED_STATES", "SAMPLER_ETA",
                 "DISTRIBUTION_START_STEP", "DISTRIBUTION_RAMP_STEPS"):
        need(isinstance(c[name], (int, float)) and c[name] >= 0, f"{name}={c[name]!r} must be >= 0.")
    need(c["BATCH_SIZE"] == "auto" or (isinstance(c["BATCH_SIZE"], int) and c["BATCH_SIZE"] >= 1
                                        and isinstance(c["IMAGES_PER_STEP"], int) and c["IMAGES_PER_STEP"] % c["BATCH_SIZE"] == 0),
         f"BATCH_SIZE={c['BATCH_SIZE']!r} must be 'auto' or a whole number that divides IMAGES_PER_STEP="
         f"{c['IMAGES_PER_STEP']!r} (the rollouts of a step are equal), e.g. 'auto', 1, 2 or 4.")
    need(0 <= c["ON_POLICY_FRACTION"] <= 1, f"ON_POLICY_FRACTION={c['ON_POLICY_FRACTION']} must be in [0, 1].")
    need(isinstance(c["EMA_DECAY"], (int, float)) and 0 <= c["EMA_DECAY"] < 1,
         f"EMA_DECAY={c['EMA_DECAY']!r} must be in [0, 1): 0 = off, 0.99-0.999 typical.")
    for name in ("ADAM_BETA1", "ADAM_BETA2"):
        need(0 <= c[name] < 1, f"{name}={c[name]!r} must be in [0, 1).")
    weights = [c["KL_WEIGHT"], c["EPS_MSE_WEIGHT"], c["LATENT_MSE_WEIGHT"], c["DMD_WEIGHT"], c["ADV_WEIGHT"]]
    names = "KL_WEIGHT, EPS_MSE_WEIGHT, LATENT_MSE_WEIGHT, DMD_WEIGHT and ADV_WEIGHT"
    need(all(w >= 0 for w in weights), f"{names} must be >= 0.")
    need(any(w > 0 for w in weights), f"{names} are all 0: nothing to learn; set one > 0.")
    need(not (c["DISTRIBUTION_START_STEP"] > 0 and c["DMD_WEIGHT"] == 0 and c["ADV_WEIGHT"] == 0),
         f"DISTRIBUTION_START_STEP={c['DISTRIBUTION_START_STEP']} stages DMD and the adversarial term, but both are off "
         f"(DMD_WEIGHT=0, ADV_WEIGHT=0); set one of them > 0, or DISTRIBUTION_START_STEP=0.")
    need(not (c["EPS_MSE_WEIGHT"] == c["LATENT_MSE_WEIGHT"] == c["KL_WEIGHT"] == 0 and c["DISTRIBUTION_START_STEP"] > 0),
         "DISTRIBUTION_START_STEP > 0 with every regression weight 0 leaves the first steps with nothing to learn; set "
         "EPS_MSE_WEIGHT or LATENT_MSE_WEIGHT > 0, or DISTRIBUTION_START_STEP=0.")
    need(not c["LORA_USE_DORA"] or c["TRAINABLE"] == "lora",
         f"LORA_USE_DORA=True is a kind of LoRA, so it needs TRAINABLE='lora' (it is {c['TRAINABLE']!r}).")
    need(c["SAMPLER_ETA"] <= 1, f"SAMPLER_ETA={c['SAMPLER_ETA']} must be in [0, 1] (1 = the forward process's own posterior).")
    need(not (c["KL_WEIGHT"] > 0 and c["SAMPLER_ETA"] <= 0),
         "KL_WEIGHT > 0 needs SAMPLER_ETA > 0 (the KL is between stochastic transitions); set SAMPLER_ETA=0.7 or KL_WEIGHT=0.")
    need(c["GUIDANCE_SCALE"] >= 1, f"GUIDANCE_SCALE={c['GUIDANCE_SCALE']} must be >= 1 (1 = no guidance).")
    need(isinstance(c["DMD_STATES"], int) and c["DMD_STATES"] >= 0, f"DMD_STATES={c['DMD_STATES']!r} must be a whole "
         f"number >= 0: 0 = every supervised state, 1 = one per rollout.")
    need(c["SUPERVISED_STATES"] <= c["NUM_ROLLOUT_STEPS"],
         f"SUPERVISED_STATES={c['SUPERVISED_STATES']} exceeds NUM_ROLLOUT_STEPS={c['NUM_ROLLOUT_STEPS']}; use 0 for all states.")
    for name in ("SAMPLER_SHIFT", "TEACHER_SUBSTEP_SHIFT"):
        need(c[name] is None or c[name] > 0, f"{name} must be > 0, or None for the teacher scheduler's own.")
    need(c["MIXED_PRECISION"] in ("no", "fp16", "bf16", "auto"), f"MIXED_PRECISION={c['MIXED_PRECISION']!r}: use no, fp16, bf16 or auto.")
    for name in ("TEACHER_DTYPE", "STUDENT_DTYPE", "TEXT_ENCODER_DTYPE"):
        need(c[name] in DTYPES, f"{name}={c[name]!r}: use one of {sorted(DTYPES)}.")
    need(c["ATTENTION_BACKEND"] in ATTENTION_BACKENDS,
         f"ATTENTION_BACKEND={c['ATTENTION_BACKEND']!r}: use one of {', '.join(ATTENTION_BACKENDS)}.")
    if c["ATTENTION_BACKEND"] == "fa4" and (problem := flash_attention_4_problem()):
        problems.append(problem)
    need(c["TEACHER_FP8"] in (True, False, "auto"), f"TEACHER_FP8={c['TEACHER_FP8']!r}: use True, False or 'auto'.")
    need(not c["STUDENT_FP8"] or c["TRAINABLE"] == "lora",
         f"STUDENT_FP8=True puts the student's frozen base weights in FP8, so it needs TRAINABLE='lora' "
         f"(TRAINABLE={c['TRAINABLE']!r} trains or exports them); set STUDENT_FP8=False or TRAINABLE='lora'.")
    if (c["TEACHER_FP8"] is True or c["STUDENT_FP8"]) and (problem := fp8_problem()):
        problems.append(problem)
    need(c["TRAINABLE"] in ("all", "lora", "blocks", "norms"), f"TRAINABLE={c['TRAINABLE']!r}: use all, lora, blocks or norms.")
    need(c["SAMPLER_SPACING"] in ("trailing", "scheduler"), f"SAMPLER_SPACING={c['SAMPLER_SPACING']!r}: use trailing or scheduler.")
    need(c["TEACHER_SOLVER"] == "auto" or c["TEACHER_SOLVER"] in TEACHER_SOLVERS,
         f"TEACHER_SOLVER={c['TEACHER_SOLVER']!r}: use 'auto' or one of {', '.join(TEACHER_SOLVERS)}.")
    if c["TRAINABLE"] == "blocks":
        try:
            parse_block_slice(c["TRAIN_BLOCKS"])
        except ValueError:
            problems.append(f"TRAIN_BLOCKS={c['TRAIN_BLOCKS']!r} is not a python slice such as '-4:' or '0:12'.")
    for who in models_to_check(c):
        factor, patch = image_multiple(c[f"{who}_ID"], c[f"{who}_REVISION"], c["COLAB_MODEL_CACHE"])
        need(c["IMAGE_SIZE"] % (factor * patch) == 0,
             f"IMAGE_SIZE={c['IMAGE_SIZE']} must be a multiple of {factor * patch} for {who}_ID (VAE factor {factor} x "
             f"patch size {patch})" + (", e.g. 512, 768 or 1024." if factor * patch == 16 else "."))
        if problem := model_source_problem(c[f"{who}_ID"], c[f"{who}_REVISION"], c["COLAB_MODEL_CACHE"], who):
            problems.append(problem)
    writable = "choose a folder you can write to (in Colab, under /content or a mounted Drive)."
    try:
        Path(c["OUTPUT_ROOT"]).mkdir(parents=True, exist_ok=True)
        need(os.access(c["OUTPUT_ROOT"], os.W_OK), f"OUTPUT_ROOT={c['OUTPUT_ROOT']!r} is not writable; {writable}")
    except OSError as err:
        problems.append(f"OUTPUT_ROOT={c['OUTPUT_ROOT']!r} cannot be created ({err.strerror}); {writable}")
    need(c["HELDOUT_PROMPTS"] < c["NUM_PROMPTS"] or not c["GENERATE_PROMPTS"],
         f"HELDOUT_PROMPTS={c['HELDOUT_PROMPTS']} leaves no training prompts out of NUM_PROMPTS={c['NUM_PROMPTS']}.")
    need(c["GENERATE_PROMPTS"] or bool(c["PROMPTS_JSONL"]), "GENERATE_PROMPTS=False reads your own prompts: set PROMPTS_JSONL to the file "
                                   "(one {\"prompt\": ...} per line).")
    need(not (c["RESUME"] not in ("auto", "never") and not Path(c["RESUME"]).is_file()),
         f"RESUME={c['RESUME']!r} is neither auto, never nor an existing checkpoint file.")
    need(bool(str(c["OUTPUT_ROOT"]).strip()), "OUTPUT_ROOT is empty; give a folder such as outputs_colab.")
    need(len(c["RUN_NAME"]) <= 100, f"RUN_NAME is {len(c['RUN_NAME'])} characters long; at most 100 fit in the "
         f"names of its files and folders. Give a shorter one, e.g. 'sd3-4step'.")
    need(not c["RUN_NAME"] or (c["RUN_NAME"][0].isalnum() and all(ch.isalnum() or ch in "-_." for ch in c["RUN_NAME"])),
         f"RUN_NAME={c['RUN_NAME']!r} must be one plain folder name: letters, digits, '-', '_' and '.', starting with a "
         f"letter or digit (no '/', no '..'), e.g. 'sd3-4step'; or '' for an automatic one.")
    for name, value in c.items():
        need(not (isinstance(value, float) and not math.isfinite(value)), f"{name}={value!r} must be a finite number.")
    if c["LR_SCHEDULER"] not in LR_SCHEDULERS:
        problems.append(f"LR_SCHEDULER={c['LR_SCHEDULER']!r}: use one of {', '.join(LR_SCHEDULERS)} (diffusers' get_scheduler).")
    if problem := tracker_problem(c["REPORT_TO"]):
        problems.append(problem)
    if c["MIXED_PRECISION"] in ("fp16", "bf16") or any(c[n] in ("float16", "bfloat16") for n in (
            "TEACHER_DTYPE", "STUDENT_DTYPE", "TEXT_ENCODER_DTYPE")):
        import torch

        need(torch.cuda.is_available(), "half precision was asked for (MIXED_PRECISION or a *_DTYPE) but no CUDA GPU "
             "is visible. In Colab: Runtime > Change runtime type > a GPU; on a CPU use 'no'/'float32' or 'auto'.")
    if problems:
        raise UserError("Config has %d problem(s):\n  - " % len(problems) + "\n  - ".join(problems))


LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")  # get_scheduler's


def tracker_problem(report_to: str) -> str | None:
    """Why REPORT_TO cannot log here (an unknown tracker, or its package missing), with the fix; None if it can."""
    if not report_to or report_to == "all":
        return None
    from accelerate.utils import LoggerType

    names = [t.value for t in LoggerType if t.value != "all"]
    if report_to not in names:
        return f"REPORT_TO={report_to!r}: use '' (files only), 'all', or one of {', '.join(names)}."
    package = {"tensorboard": "tensorboard", "comet_ml": "comet_ml"}.get(report_to, report_to)
    if importlib.util.find_spec(package) is None and not (report_to == "tensorboard" and importlib.util.find_spec("tensorboardX")):
        return f"REPORT_TO={report_to!r} needs the {package} package: pip install {package.replace('_', '-')}, or set REPORT_TO=''."
    return None


def models_to_check(c: dict) -> list[str]:
    """TEACHER, and STUDENT where it is another model."""
    same = (c["STUDENT_ID"], c["STUDENT_REVISION"]) == (c["TEACHER_ID"], c["TEACHER_REVISION"])
    return ["TEACHER"] if same else ["TEACHER", "STUDENT"]


def looks_like_a_path(model_id: str) -> bool:
    """A Hub id is "owner/name"; anything else (absolute, relative with ./, ~, deeper folders) is a local folder."""
    return model_id.startswith(("/", ".", "~")) or model_id.count("/") != 1 or "\\" in model_id


def cached_config(model_id: str, revision: str, cache_dir: str, filename: str) -> dict | None:
    """A config file of a local folder, or of a Hub model already in the local cache; None if neither."""
    if Path(model_id).expanduser().is_dir():
        path = Path(model_id).expanduser() / filename
        return json.loads(path.read_text()) if path.is_file() else None
    if looks_like_a_path(model_id):
        return None
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(model_id, filename, cache_dir=cache_dir or None, revision=revision)
    return json.loads(Path(path).read_text()) if isinstance(path, str) else None


def image_multiple(model_id: str, revision: str, cache_dir: str) -> tuple[int, int]:
    """(VAE factor, patch size) from the model's config files where they can be read without loading weights;
    the built-in tiny model's (2, 2); SD3's (8, 2) otherwise (every SD3 and SD3.5 model has them)."""
    if model_id == TINY_MODEL_ID:
        return 2, 2
    vae = cached_config(model_id, revision, cache_dir, "vae/config.json")
    transformer = cached_config(model_id, revision, cache_dir, "transformer/config.json")
    return (2 ** (len(vae["block_out_channels"]) - 1) if vae else 8), (transformer["patch_size"] if transformer else 2)


def hub_answers(timeout: float = 3.0) -> bool:
    """Whether the Hub's host accepts a connection within `timeout` seconds (name lookup included)."""
    import socket
    import threading
    import urllib.parse

    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    answered = []

    def probe():
        with contextlib.suppress(OSError):
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
            answered.append(True)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def model_source_problem(model_id: str, revision: str, cache_dir: str, who: str) -> str | None:
    """Why TEACHER_ID/STUDENT_ID cannot be loaded, found in seconds and before any weights: a local folder
    that does not exist, or a Hub model that is not cached while the Hub cannot be reached."""
    if model_id == TINY_MODEL_ID or Path(model_id).expanduser().is_dir():
        return None
    if looks_like_a_path(model_id):
        return (f"{who}_ID={model_id!r}: folder not found. Give an existing diffusers folder (with model_index.json), a "
                f"Hub id such as stabilityai/stable-diffusion-3-medium-diffusers, or {TINY_MODEL_ID!r}.")
    if cached_config(model_id, revision, cache_dir, "model_index.json") is not None:
        return None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or not hub_answers():
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub did not answer within 3 s (no network?)"
        return (f"Could not load {model_id}: it is not in the local Hugging Face cache and {why}. Connect and run "
                f"again (PREFETCH_MODELS=True downloads it once for later offline runs), or point {who}_ID at a local "
                f"diffusers folder.")
    return None


def parse_block_slice(text: str) -> slice:
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(text)
    return slice(*(int(p) if p.strip() else None for p in parts))

# =================================================================================================
# Runs: names, folders, where a run resumes.
# =================================================================================================


class RunPaths:
    """Where a run's files go: OUTPUT_ROOT/<kind>/<run name>, one folder per kind; the run deletes nothing else."""

    KINDS = ("metrics", "checkpoints", "runs", "samples", "export")

    def __init__(self, root: Path, name: str):
        self.root, self.name = Path(root), name
        self.metrics, self.checkpoints, self.run, self.samples, self.export = (self.root / kind / name
                                                                               for kind in self.KINDS)
        self.export_staging = self.export.with_name(f".tmp-{name}")  # the export is written here, then renamed

    def remove(self, target: Path) -> None:
        """Delete a file or folder of this run. The one way anything is deleted: a target outside the run's own
        folders (OUTPUT_ROOT/<kind>/<run>, and its export's staging folder) is refused, whatever the name."""
        import shutil

        target = Path(os.path.abspath(target))
        owned = [Path(os.path.abspath(self.root / kind / self.name)) for kind in self.KINDS]
        owned += [Path(os.path.abspath(self.export_staging))] + [staging_folder(folder) for folder in owned]
        if not self.name or not any(target == folder or folder in target.parents for folder in owned):
            raise RuntimeError(f"refused to delete {target}: it is not inside run {self.name!r}'s folders")
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


@dataclasses.dataclass
class Run:
    """What every stage of a run shares: its config, accelerate, where its files go, where it resumes from."""

    config: dict
    accelerator: object
    mixed_precision: str
    paths: RunPaths
    checkpoints: CheckpointDir
    resume: tuple | None  # (path, payload) of the checkpoint to continue, or None
    timings: dict
    lock: RunLock | None = None  # held by the main process
    command: str = ""  # the command that continues this run (resume_command)
    batch_choice: str = ""  # how BATCH_SIZE="auto" was resolved
    prompts_sha256: str = ""  # of the prompt texts, kept in checkpoints

    @property
    def trained(self) -> bool:
        """Its last checkpoint is at MAX_STEPS: nothing left to train (the ending may still be due)."""
        return bool(self.resume) and self.resume[1]["step"] >= self.config["MAX_STEPS"]

    @property
    def finished(self) -> bool:
        """Trained, and the ending done: the export (if asked for), then the summary, then the status."""
        if not self.trained:
            return False
        summary = read_json(self.paths.run / "train_summary.json") or {}
        pointer = read_json(self.paths.checkpoints / "latest.json") or {}
        return (summary.get("status") == "finished" and summary.get("step") == self.resume[1]["step"]
                and pointer.get("status") == "finished"
                and (not self.config["EXPORT_DIFFUSERS"] or export_problem(self.paths.export) is None))


def read_json(path: Path):
    """A JSON file's value, or None where it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def start_run(config: dict) -> Run:
    """accelerate, the run's name (the same in every process), its lock, and its resume point: decided before any
    model is loaded, so a wrong setting costs nothing."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list

    started = time.time()
    mixed_precision = resolve_mixed_precision(config["MIXED_PRECISION"])
    # Several processes: DDP would broadcast the model's buffers from the first process before each step's synchronised
    # forward, a second collective per step (SD3's only buffer is its constant position table, 113 MB in SD3-medium,
    # the same in every process), so the gradient all-reduce stays the one collective of a step (tested).
    accelerator = Accelerator(mixed_precision=mixed_precision, log_with=config["REPORT_TO"] or None,
                              project_dir=str(Path(config["OUTPUT_ROOT"]) / "trackers"),
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    decided, lock = [None, None], None  # the run's name, or the refusal: every process follows the main one
    if accelerator.is_main_process:
        try:
            name = choose_run_name(config)
            lock = RunLock(RunPaths(Path(config["OUTPUT_ROOT"]), name))
            lock.acquire()
            decided = [name, None]
        except UserError as err:
            decided = [None, str(err)]
    broadcast_object_list(decided)
    if decided[1]:
        raise UserError(decided[1])
    paths = RunPaths(Path(config["OUTPUT_ROOT"]), decided[0])
    config = {**config, "RUN_NAME": paths.name}
    checkpoints = CheckpointDir(paths, config["KEEP_LAST_CHECKPOINTS"], config["KEEP_CHECKPOINTS_GB"])
    try:
        if accelerator.is_main_process:  # the lock is held: no other process writes here
            for folder in (paths.metrics, paths.checkpoints, paths.run, paths.samples):
                remove_stale_temporaries(paths, folder)
            if paths.export_staging.exists():
                paths.remove(paths.export_staging)  # an export cut off by a kill; it is made again
        resume = find_resume_point(config, paths, checkpoints, accelerator.num_processes, accelerator.device)
    except BaseException:
        if lock:
            lock.release()
        raise
    torch.manual_seed(config["SEED"])
    # fp32 matmuls and convolutions (MIXED_PRECISION="no" runs, VAE decoding) on the tensor cores, as diffusers' --allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return Run(config, accelerator, mixed_precision, paths, checkpoints, resume, {"started": started}, lock)


def resume_command(argv: list[str], run_name: str) -> str:
    """The command line that continues this run: this one, with the run's name where it did not give one."""
    import shlex

    named = any(arg.startswith("--RUN_NAME=") and arg != "--RUN_NAME=" for arg in argv)
    return shlex.join(["python", sys.argv[0] or "run_onpolicy_distill_colab.py", *argv,
                       *([] if named else [f"--RUN_NAME={run_name}"])])


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def choose_run_name(config: dict) -> str:
    """RUN_NAME; else, with RESUME="auto", the newest run of this same config (an unfinished one is continued,
    a finished one reported or trained on to a larger MAX_STEPS); else a new name, unique even within a second."""
    import secrets

    if config["RUN_NAME"]:
        return config["RUN_NAME"]
    if config["RESUME"] == "auto":
        found = find_run_of_config(Path(config["OUTPUT_ROOT"]), config_fingerprint(config))
        if found:
            name, status, step = found
            if step < config["MAX_STEPS"]:
                print(f"continuing run {name} (same config) from step {step} to {config['MAX_STEPS']}; set RUN_NAME "
                      f"to start another.")
            return name
    return time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def finished_run_report(run: "Run") -> str:
    """What a finished run of this config left, for a re-run that has nothing to do."""
    summary = read_json(run.paths.run / "train_summary.json") or {}
    gap_before, gap_last = summary.get("eval_gap_before"), summary.get("eval_gap_last")
    gaps = f"; held-out gap {gap_before:.4g} -> {gap_last:.4g}" if gap_before is not None and gap_last is not None else ""
    export = f"; export {run.paths.export}" if run.paths.export.is_dir() else ""
    return (f"run {run.paths.name} of this config already finished at step {run.resume[1]['step']}{gaps}{export}. "
            f"Nothing to do. To train it longer: a larger MAX_STEPS. To train again: RESUME='never' (a new run) or "
            f"a new RUN_NAME.")


def find_run_of_config(output_root: Path, fingerprint: str) -> tuple[str, str, int] | None:
    """With RUN_NAME empty: (name, status, step) of the newest run of exactly this config, finished or not. A run
    whose latest.json is missing or broken is read from its newest readable checkpoint instead, with a warning."""
    best = None
    for folder in sorted(p for p in (output_root / "checkpoints").glob("*") if p.is_dir()):
        info = read_json(folder / "latest.json")
        if not (isinstance(info, dict) and {"fingerprint", "step", "time"} <= set(info)):
            found = CheckpointDir(RunPaths(output_root, folder.name), 1).newest_valid()
            if found is None:
                continue
            path, payload = found
            print(f"warning: {folder / 'latest.json'} is missing or unreadable; run {folder.name} was read from "
                  f"{path.name} instead.")
            info = {"fingerprint": config_fingerprint(checkpoint_config(payload)), "step": payload["step"],
                    "status": "unknown", "time": path.stat().st_mtime}
        if info["fingerprint"] == fingerprint and (best is None or info["time"] > best[0]):
            best = (info["time"], folder.name, info.get("status"), info["step"])
    return best[1:] if best else None


def find_resume_point(config: dict, paths: "RunPaths", checkpoints: "CheckpointDir", num_processes: int, device):
    """(path, payload) of the checkpoint to continue from, or None for a fresh run. Never a silent restart: a run
    that has history but no readable checkpoint stops with the fix."""
    resume = None
    if config["RESUME"] == "auto":
        resume = checkpoints.newest_valid()
        has_checkpoints = checkpoints.step_files() or (paths.checkpoints / "final.pt").exists()
        if resume is None and not has_checkpoints and rows_through(paths.metrics / "metrics.jsonl", math.inf):
            print(f"note: run {paths.name} stopped before its first checkpoint; it starts again from step 0.")
        if resume is None and has_checkpoints:
            raise UserError(f"Run {paths.name} has history (metrics or checkpoints) but no checkpoint that can be read, "
                            f"so it cannot continue, and starting it again would overwrite that history. Start a new "
                            f"run (a new RUN_NAME, or RESUME='never' with RUN_NAME=''), or point RESUME at a good "
                            f"checkpoint file.")
    elif config["RESUME"] != "never":
        try:
            resume = (Path(config["RESUME"]), load_checkpoint(Path(config["RESUME"])))
        except Exception as err:
            raise UserError(f"RESUME={config['RESUME']!r} cannot be read ({type(err).__name__}: {brief(err)}); "
                            f"give another checkpoint or RESUME='auto'.") from err
    elif checkpoints.step_files() or (paths.checkpoints / "final.pt").exists() or paths.metrics.exists():
        raise UserError(f"Run {paths.name} already has files under {paths.root} and RESUME='never' would overwrite them. "
                        f"Set RESUME='auto' to continue it, or a new RUN_NAME.")
    if resume and config_fingerprint(checkpoint_config(resume[1])) != config_fingerprint(config):
        raise UserError(f"Checkpoint {resume[0]} was written with other settings: "
                        f"{settings_that_differ(checkpoint_config(resume[1]), config)}. Resuming would mix two runs. Set "
                        f"them back to continue it, or use a new RUN_NAME for a new run.")
    if resume and (problem := resolved_fp8_problem(resume[1], config, device)):
        raise UserError(problem)
    if resume and resume[1]["step"] > config["MAX_STEPS"]:
        raise UserError(f"Run {paths.name} has trained to step {resume[1]['step']} ({resume[0].name}), past "
                        f"MAX_STEPS={config['MAX_STEPS']}; a run is not cut back, so nothing was changed. To go on with "
                        f"it, set MAX_STEPS to {resume[1]['step']} or more; for a shorter run, start a new one (a new "
                        f"RUN_NAME, or RESUME='never' with RUN_NAME='').")
    written_by = resume[1].get("num_processes", num_processes) if resume else num_processes
    trained = resume and resume[1]["step"] >= config["MAX_STEPS"]
    if written_by != num_processes and not trained:
        raise UserError(f"Checkpoint {resume[0]} was written by {written_by} process(es) and this run has "
                        f"{num_processes}. The prompt stream and the learning-rate schedule are laid out per process, so "
                        f"it would not continue where it stopped. Resume with the same number (accelerate launch "
                        f"--multi_gpu --num_processes {written_by} ...), or start a new run: RESUME='never' or a new "
                        f"RUN_NAME.")
    return resume


# Settings added since earlier checkpoints were written, as those runs had them.
SETTINGS_BEFORE_THEY_EXISTED = {"SAMPLER_SPACING": "scheduler", "TEACHER_SOLVER": "euler", "DMD_WEIGHT": 0.0,
                               "FAKE_LORA_RANK": 32, "FAKE_LEARNING_RATE": 1e-4, "FAKE_UPDATES_PER_STEP": 1,
                               "FAKE_FRESH_SAMPLES": False, "DMD_STATES": 0, "ADV_WEIGHT": 0.0, "ADV_LEARNING_RATE": 1e-4,
                               "DISTRIBUTION_START_STEP": 0, "DISTRIBUTION_RAMP_STEPS": 0, "LORA_USE_DORA": False,
                               "EMA_DECAY": 0.0, "ADAM_8BIT": False}
# Not part of what a run is: where outputs go, how often, memory and speed only (a run resumes on a smaller GPU with
# a smaller BATCH_SIZE, IMAGES_PER_STEP unchanged, checkpointing on, another attention kernel), how long (MAX_STEPS: a
# run can be trained longer), and the path of the prompts file (its contents are checked apart, so OUTPUT_ROOT can be
# moved, to Drive say). TEACHER_FP8 is checked apart too, by what it resolved to (resolved_fp8_problem).
NOT_FINGERPRINTED = {"BATCH_SIZE", "RUN_NAME", "RESUME", "OUTPUT_ROOT", "LOG_EVERY", "CHECKPOINT_EVERY",
                     "CHECKPOINT_EVERY_MINUTES", "KEEP_LAST_CHECKPOINTS", "KEEP_CHECKPOINTS_GB", "EVAL_EVERY", "PRINT_COLAB_SETUP", "INSTALL_DEPS",
                     "PREFETCH_MODELS", "COLAB_MODEL_CACHE", "MAX_CONSECUTIVE_SKIPS", "SAVE_SAMPLE_GRIDS", "REPORT_TO",
                     "EXPORT_DIFFUSERS", "PUSH_TO_HUB", "MAX_STEPS", "PROMPTS_JSONL", "GRADIENT_CHECKPOINTING",
                     "COMPILE", "ATTENTION_BACKEND", "TEACHER_FP8"}


def checkpoint_config(payload: dict) -> dict:
    """A checkpoint's settings, with the ones added since it was written as its run had them."""
    return {**SETTINGS_BEFORE_THEY_EXISTED, **payload.get("config", {})}


def config_fingerprint(config: dict) -> str:
    """What makes two runs the same run: every setting but NOT_FINGERPRINTED."""
    kept = {k: v for k, v in sorted(config.items()) if k not in NOT_FINGERPRINTED}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def resolved_fp8_problem(payload: dict, config: dict, device) -> str | None:
    """A resume where TEACHER_FP8="auto" resolves otherwise than it did for the checkpoint (an H100 run continued
    on an A100, say) would change the teacher's targets mid-run: refused, naming both GPUs, until the user picks a
    value. An explicit True or False is the user's choice and is followed."""
    then = payload.get("teacher_fp8")
    if then is None or config["TEACHER_FP8"] != "auto" or teacher_fp8_enabled("auto", device) == then:
        return None
    where = f"TEACHER_FP8='auto' on {payload.get('device_name', 'the GPU that wrote it')}"
    if then:
        return (f"This run's teacher ran its matmuls in FP8 ({where}); {device_name(device)} has no FP8, so 'auto' "
                f"would switch to the bf16 teacher mid-run, whose targets differ slightly. Choose: TEACHER_FP8=False "
                f"to continue with the bf16 teacher, resume on a GPU with FP8 (L4, H100, H200), or a new RUN_NAME.")
    return (f"This run's teacher ran its matmuls in bf16 ({where}); on {device_name(device)} 'auto' would switch to "
            f"FP8 mid-run, whose targets differ slightly. Choose: TEACHER_FP8=False to continue as it trained, "
            f"TEACHER_FP8=True to go on with the faster FP8 teacher, or a new RUN_NAME.")


def settings_that_differ(old: dict, new: dict) -> str:
    names = sorted(k for k in set(old) | set(new) if k not in NOT_FINGERPRINTED and old.get(k) != new.get(k))
    return ", ".join(f"{k}={old.get(k, 'unset')!r} there, {new.get(k, 'unset')!r} now" for k in names)


class RunLock:
    """checkpoints/<run>/lock.json: which process trains the run (host, pid) and when it was last alive (a heartbeat
    every HEARTBEAT_SECONDS). Made with an exclusive create; on a Drive folder that two machines share, where no file
    lock crosses machines, the heartbeat is what tells a live holder from a gone one. The main process of an
    accelerate launch holds it for all of them."""

    HEARTBEAT_SECONDS, STALE_SECONDS = 30, 300

    def __init__(self, paths: RunPaths):
        import socket
        import threading
        import uuid

        self.paths, self.path = paths, paths.checkpoints / "lock.json"
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self.stop, self.lost = threading.Event(), False

    def acquire(self) -> None:
        import threading

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                with open(self.path, "x") as f:  # exclusive: of two processes here, one makes it
                    f.write(json.dumps({**self.mine, "time": time.time()}))
                break
            except FileExistsError:
                self.take_over_if_stale(read_json(self.path))
        else:
            raise UserError(f"Run {self.paths.name}: another process took its lock at the same moment; run again.")
        threading.Thread(target=self.beat, daemon=True).start()

    def take_over_if_stale(self, holder) -> None:
        """A holder alive within STALE_SECONDS is refused; one gone (or a lock file cut off) is taken over, said."""
        import socket

        holder = holder if isinstance(holder, dict) and "time" in holder else None
        try:
            age = time.time() - (holder["time"] if holder else self.path.stat().st_mtime)
        except FileNotFoundError:
            return  # released meanwhile
        if holder is None and age < 10:  # being written this moment: look again
            time.sleep(1)
            return
        where = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "an unreadable lock"
        gone = bool(holder) and holder.get("host") == socket.gethostname() and not pid_alive(holder.get("pid"))
        if age < self.STALE_SECONDS and not gone and holder is not None:
            raise UserError(f"Run {self.paths.name} is being trained by another process ({where}, last alive "
                            f"{age:.0f} s ago); two processes would write over each other. Stop that one first (in "
                            f"Colab: the runtime that still runs it), or start a new run (another RUN_NAME). A lock not "
                            f"renewed for {self.STALE_SECONDS // 60} minutes is taken over: that is in "
                            f"{self.STALE_SECONDS - age:.0f} s if its process is gone.")
        print(f"note: taking over run {self.paths.name} from {where} ("
              + ("no longer running" if gone else f"last alive {age:.0f} s ago") + ").")
        self.paths.remove(self.path)

    def beat(self) -> None:
        while not self.stop.wait(self.HEARTBEAT_SECONDS):
            holder = read_json(self.path)
            if not (isinstance(holder, dict) and holder.get("token") == self.mine["token"]):
                self.lost = True  # taken over: the training loop stops at its next step
                return
            with contextlib.suppress(OSError, UserError):
                atomic_write_text(self.path, json.dumps({**self.mine, "time": time.time()}))

    def check(self) -> None:
        if self.lost:
            raise UserError(f"Run {self.paths.name} was taken over by another process (its lock shows another "
                            f"holder); this one stops here without writing more.")

    def release(self) -> None:
        self.stop.set()
        holder = read_json(self.path)
        if isinstance(holder, dict) and holder.get("token") == self.mine["token"]:
            try:
                self.paths.remove(self.path)
            except OSError as err:  # a folder gone read-only: the lock stays, and goes stale (taken over) with its pid
                print(f"warning: could not remove {self.path} ({err.strerror}); the next run of {self.paths.name} "
                      f"takes it over, at once on this machine.", file=sys.stderr)


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


# =================================================================================================
# Devices, precision, attention kernels.
# =================================================================================================


DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_dtype(name: str, device):
    """'auto' -> bf16 on a GPU that has it, fp16 on an older GPU, fp32 on the CPU."""
    import torch

    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def device_name(device) -> str:
    """The GPU's name (e.g. NVIDIA H100 80GB HBM3), or the CPU's architecture: what a record says it ran on."""
    import platform

    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"


def resolve_mixed_precision(name: str) -> str:
    import torch

    if name != "auto":
        return name
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "fa4")

SDPA_SWITCHES = {"cudnn": "cudnn", "flash": "flash", "efficient": "mem_efficient", "math": "math"}

FLASH_ATTENTION_4_INSTALL = "pip install flash-attn-4==4.0.0b36"  # the version measured (README, Speed)


def set_attention_backend(name: str) -> None:
    """Allow only the named scaled-dot-product attention kernel, or all of them for "auto" (global
    switches, so compiled code sees them too). "fa4" is PyTorch's flash kernel with FlashAttention-4
    put in its place."""
    import torch
    import torch.nn.attention

    if name == "fa4":
        activate_flash_attention_4()
    elif getattr(torch.nn.attention, "current_flash_attention_impl", lambda: None)() is not None:
        torch.nn.attention.restore_flash_attention_impl()
    for backend, switch in SDPA_SWITCHES.items():
        getattr(torch.backends.cuda, f"enable_{switch}_sdp")(name in ("auto", backend) or (name, backend) == ("fa4", "flash"))


def flash_attention_4_problem() -> str | None:
    """Why ATTENTION_BACKEND="fa4" cannot run here, with the fix; None if it can."""
    import torch
    import torch.nn.attention

    if not hasattr(torch.nn.attention, "activate_flash_attention_impl"):
        return (f"ATTENTION_BACKEND='fa4' needs a torch with torch.nn.attention.activate_flash_attention_impl "
                f"(2.11 was measured; this is {torch.__version__}): upgrade torch, or use 'cudnn'.")
    try:
        has_fa4 = importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:  # no flash_attn at all, or a FlashAttention-2 build that fails to import
        has_fa4 = False
    if not has_fa4:
        return f"ATTENTION_BACKEND='fa4' needs FlashAttention-4: {FLASH_ATTENTION_4_INSTALL} (or use 'cudnn')."
    if not torch.cuda.is_available() or not flash_attention_4_gpu():
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
        return f"ATTENTION_BACKEND='fa4' runs on H100/H200 or B200 GPUs only ({gpu} here); use 'cudnn' or 'auto'."
    return None


def flash_attention_4_gpu(device=None) -> bool:
    """Whether the (current) CUDA GPU is one FlashAttention-4 has kernels for: Hopper (9.x) or Blackwell (10.x)."""
    import torch

    return torch.cuda.get_device_capability(device)[0] in (9, 10)


def attention_hint(backend: str, device) -> str | None:
    """One line for a GPU where FlashAttention-4 would run but another attention kernel was chosen."""
    if backend == "fa4" or device.type != "cuda" or not flash_attention_4_gpu(device):
        return None
    how = "set it" if flash_attention_4_problem() is None else f"{FLASH_ATTENTION_4_INSTALL} and set it"
    return f"note: ATTENTION_BACKEND='fa4' made steps 7-9% faster on an H100 (README, Speed); {how} to use it here."


def activate_flash_attention_4() -> None:
    """Route PyTorch's flash-attention kernel to FlashAttention-4 (the flash-attn-4 package's CuTe
    kernels) through torch's own hook, activate_flash_attention_impl("FA4"). Torch's side expects
    `_flash_attn_fwd` to return (out, lse) and flash-attn-4 4.0.0b36 returns three more values, so a
    small module in between keeps the first two. Going through SDPA leaves diffusers' SD3 attention
    processor and torch.compile as they are."""
    import types

    from flash_attn.cute import interface
    from torch.nn.attention import _fa4, activate_flash_attention_impl, register_flash_attention_impl

    adapter = types.ModuleType("flash_attention_4_adapter")
    adapter._flash_attn_fwd = lambda *args, **kwargs: tuple(interface._flash_attn_fwd(*args, **kwargs)[:2])
    adapter._flash_attn_bwd = interface._flash_attn_bwd
    sys.modules[adapter.__name__] = adapter
    register_flash_attention_impl("FA4", register_fn=lambda: _fa4.register_flash_attention_fa4(adapter.__name__))
    activate_flash_attention_impl("FA4")


def quiet_libraries() -> None:
    """Keep the console to what this script says: no per-file progress bars or deprecation chatter."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated")
    warnings.filterwarnings("ignore", message="Argument aux_data .* cannot be converted to a JitArgument")  # FA4, per kernel
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")  # DMD's second adapter, meant
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def out_of_memory_advice(config: dict) -> str:
    """What lowers memory, most effective first, with this run's current values."""
    return (f"The GPU ran out of memory (the last checkpoint is intact). To fit: BATCH_SIZE={config['BATCH_SIZE']!r} -> 1 "
            f"(IMAGES_PER_STEP stays; the rollouts are accumulated); GRADIENT_CHECKPOINTING={config['GRADIENT_CHECKPOINTING']} -> True; "
            f"TRAINABLE={config['TRAINABLE']!r} -> 'lora' (with STUDENT_ID = TEACHER_ID the two share one copy of the "
            f"weights); IMAGE_SIZE={config['IMAGE_SIZE']} -> 512; USE_T5={config['USE_T5']} -> False; a smaller "
            f"teacher; SUPERVISED_STATES -> 1 or 2. The README's memory table lists what fits each Colab GPU.")


def free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


FP8_E4M3_MAX = 448.0  # the largest float8_e4m3fn value
FP8_LAYERS = ("attn.", "attn2.", "ff.", "ff_context.")  # in each transformer block: attention projections and MLPs


def fp8_quantize_rows(x):
    """Row-wise FP8: x ~= q s, one scale per row, s_r = max_j |x_rj| / 448, q = x / s rounded to float8_e4m3fn.
    Returns (q, s), s of shape (rows, 1) in fp32."""
    import torch

    scale = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_E4M3_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def fp8_linear(x2d, weight_fp8, weight_scale, bias):
    """y = (q_x s_x)(q_W s_W)^T + b with the input quantised per token at each call and the weight per output
    feature once (weight_scale of shape (1, out)); the product runs on FP8 tensor cores, accumulates in fp32
    and comes out in bf16 (torch._scaled_mm)."""
    import torch

    q, scale = fp8_quantize_rows(x2d)
    return torch._scaled_mm(q, weight_fp8.t(), scale_a=scale, scale_b=weight_scale, bias=bias, out_dtype=torch.bfloat16)


@functools.cache
def fp8_linear_module():
    """The FP8Linear module class (made on first use: torch is imported lazily)."""
    import torch

    class FP8Matmul(torch.autograd.Function):
        """fp8_linear forward; backward gives the input its gradient, dy W, with W dequantised (frozen: no dW)."""

        @staticmethod
        def forward(ctx, x2d, weight_fp8, weight_scale, bias):
            ctx.save_for_backward(weight_fp8, weight_scale)
            return fp8_linear(x2d, weight_fp8, weight_scale, bias)

        @staticmethod
        def backward(ctx, grad):
            weight_fp8, weight_scale = ctx.saved_tensors
            weight = weight_fp8.to(grad.dtype) * weight_scale.t().to(grad.dtype)
            return grad @ weight, None, None, None

    class FP8Linear(torch.nn.Module):
        """A frozen nn.Linear stored in FP8 (1 byte per weight, a scale per output feature), computing fp8_linear."""

        def __init__(self, linear):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            weight_fp8, scale = fp8_quantize_rows(linear.weight.detach())
            self.register_buffer("weight_fp8", weight_fp8)
            self.register_buffer("weight_scale", scale.t().contiguous())
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

        def forward(self, x):
            y = FP8Matmul.apply(x.reshape(-1, self.in_features), self.weight_fp8, self.weight_scale, self.bias)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    return FP8Linear


def fp8_targets(model) -> dict:
    """{(parent module, attribute): nn.Linear} of the frozen attention and MLP linears of the transformer blocks
    whose sizes FP8 tensor cores take (multiples of 16). peft's LoRA layers keep their adapters; their base goes."""
    import torch

    targets = {}
    for block in model.transformer_blocks:
        for name, module in block.named_modules():
            if not (isinstance(module, torch.nn.Linear) and name.startswith(FP8_LAYERS)) or module.weight.requires_grad:
                continue
            if ".lora_" in name:  # an adapter's own layers (one not active has requires_grad off) stay as they are
                continue
            if module.in_features % 16 or module.out_features % 16:
                continue
            parent, _, attr = name.rpartition(".")
            targets[(block.get_submodule(parent), attr)] = module
    return targets


def convert_to_fp8(model) -> int:
    """Put FP8Linear in place of each of fp8_targets(model); returns how many."""
    fp8 = fp8_linear_module()
    targets = fp8_targets(model)
    for (parent, attr), linear in targets.items():
        setattr(parent, attr, fp8(linear))
    return len(targets)


def fp8_copy(model):
    """A copy of the model with FP8Linear for fp8_targets and everything else copied (the bf16 linears never are)."""
    import copy

    fp8 = fp8_linear_module()
    memo = {id(linear): fp8(linear) for linear in fp8_targets(model).values()}
    return copy.deepcopy(model, memo)


FP8_ON_CPU = "DISTILL_FP8_ON_CPU"  # =1: allow FP8 on the CPU, where torch emulates it slowly (tests, the experiment)


def teacher_fp8_enabled(setting, device) -> bool:
    """TEACHER_FP8: True, False, or "auto": on a CUDA GPU with FP8 tensor cores that run the FP8 product, else off."""
    return setting is True or (setting == "auto" and device.type == "cuda" and fp8_problem(device) is None)


def fp8_problem(device=None) -> str | None:
    """Why FP8 matmuls cannot run here, with the fix; None if they can (tried on a small product)."""
    import torch

    if os.environ.get(FP8_ON_CPU) == "1" and not torch.cuda.is_available():
        return None
    if not torch.cuda.is_available():
        return ("TEACHER_FP8/STUDENT_FP8 need a CUDA GPU with FP8 tensor cores (compute capability 8.9 or more: L4, "
                "H100, H200); none is visible here. Set them to False (or TEACHER_FP8='auto').")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"TEACHER_FP8/STUDENT_FP8 need FP8 tensor cores (compute capability 8.9 or more: L4, H100, H200); "
                f"{torch.cuda.get_device_name(device)} has {major}.{minor}. Set them to False (or TEACHER_FP8='auto').")
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return f"FP8 needs torch with float8 and _scaled_mm (2.5 or newer; this is {torch.__version__}): upgrade torch."
    try:
        x = torch.randn(32, 64, device=device or "cuda", dtype=torch.bfloat16)
        w, scale = fp8_quantize_rows(torch.randn(32, 64, device=x.device))
        fp8_linear(x, w, scale.t().contiguous(), None)
    except RuntimeError as err:
        return (f"FP8 matmuls with row-wise scales do not run on {torch.cuda.get_device_name(device)} with torch "
                f"{torch.__version__} ({str(err).splitlines()[0][:160]}). Upgrade torch, or set TEACHER_FP8/STUDENT_FP8 "
                f"to False.")
    return None

# =================================================================================================
# Prompts: a deterministic generator (categories x templates x attributes), a checked reader, the order.
# =================================================================================================


PROMPT_CATEGORIES = {
    "animal": ["a cat", "a dog", "a fox", "an owl", "a horse", "a red panda", "a whale", "a tiger"],
    "landscape": ["a mountain lake", "a desert canyon", "a snowy forest", "a rocky coast", "a rice terrace", "a volcano"],
    "object": ["a teapot", "a vintage camera", "a pair of sneakers", "a glass bottle", "an old clock", "a guitar"],
    "food": ["a bowl of ramen", "a slice of cake", "a plate of sushi", "a basket of apples", "a cup of coffee"],
    "vehicle": ["a red bicycle", "a steam train", "a sailboat", "a vintage car", "a hot air balloon"],
    "architecture": ["a lighthouse", "a gothic cathedral", "a wooden cabin", "a glass skyscraper", "a stone bridge"],
    "person": ["an astronaut", "a chef", "a knight in armor", "a street musician", "a painter"],
}

PROMPT_TEMPLATES = [
    "{style} of {subject}, {light}",
    "{subject} in {setting}, {style}",
    "{style}: {subject} at {setting}, {light}",
    "close-up {style} of {subject}, {light}",
]

PROMPT_ATTRIBUTES = {
    "style": ["a photo", "an oil painting", "a watercolor", "a pencil sketch", "a 3d render", "a pixel art image"],
    "light": ["golden hour light", "soft morning light", "neon lights", "dramatic shadows", "overcast sky"],
    "setting": ["the city", "the countryside", "a quiet studio", "the night", "the seaside", "a misty valley"],
}


def generate_prompts(num_prompts: int, seed: int) -> list[dict]:
    """Draw `num_prompts` distinct prompts, deterministically from `seed`, balanced over categories.

    Each is {"id", "prompt", "category"}; the same (num_prompts, seed) always gives the same list."""
    rng = random.Random(seed)
    per_category = {}
    for category, subjects in PROMPT_CATEGORIES.items():
        combos = [(s, t, st, li, se) for s in subjects for t in PROMPT_TEMPLATES for st in PROMPT_ATTRIBUTES["style"]
                  for li in PROMPT_ATTRIBUTES["light"] for se in PROMPT_ATTRIBUTES["setting"]]
        rng.shuffle(combos)
        per_category[category] = [t.format(subject=s, style=st, light=li, setting=se) for s, t, st, li, se in combos]
    capacity = sum(len(set(texts)) for texts in per_category.values())  # templates without {light} repeat texts
    if num_prompts > capacity:
        raise UserError(f"NUM_PROMPTS={num_prompts} exceeds the {capacity} distinct prompts the generator can make; "
                        f"lower it, or give your own file (GENERATE_PROMPTS=False, PROMPTS_JSONL=...).")
    prompts, seen, cursor, categories = [], set(), 0, list(PROMPT_CATEGORIES)
    while len(prompts) < num_prompts:  # ends: at most `capacity` distinct texts are asked for
        category = categories[cursor % len(categories)]
        if per_category[category]:
            text = per_category[category].pop()
            if text not in seen:
                seen.add(text)
                prompts.append({"id": len(prompts), "prompt": text, "category": category})
        cursor += 1
    return prompts


def prompts_jsonl_text(prompts: list[dict]) -> str:
    return "".join(json.dumps(p) + "\n" for p in prompts)


def write_prompts_jsonl(path: Path, prompts: list[dict]) -> None:
    atomic_write_text(path, prompts_jsonl_text(prompts))


def read_prompts_jsonl(path: Path) -> list[dict]:
    """Read and check a prompts file; every problem names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Prompts file {path} not found. Set GENERATE_PROMPTS=True to write one, "
                        f"or point PROMPTS_JSONL at a file with one {{\"prompt\": ...}} per line.")
    prompts, problems = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise UserError(f"Prompts file {path}:{line}: not UTF-8 text (byte {err.object[err.start]:#04x}). Save it as "
                        f"UTF-8 (one {{\"prompt\": ...}} per line).") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{path}:{number}: not valid JSON ({err.msg}).")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path}:{number}: expected an object like {{\"prompt\": \"a cat\"}}.")
            continue
        text = row.get("prompt")
        if not isinstance(text, str):
            problems.append(f"{path}:{number}: missing \"prompt\" string.")
            continue
        if not text.strip():
            problems.append(f"{path}:{number}: empty \"prompt\".")
            continue
        prompts.append({"id": row.get("id", len(prompts)), "prompt": text, "category": row.get("category", "")})
    if problems:
        raise UserError("Prompts file has %d problem(s):\n  - " % len(problems) + "\n  - ".join(problems[:20]))
    if not prompts:
        raise UserError(f"Prompts file {path} has no prompts; add lines like {{\"prompt\": \"a cat\"}}.")
    return prompts


def split_heldout(prompts: list[dict], heldout: int) -> tuple[list[dict], list[dict]]:
    """The last `heldout` prompts are for evaluation only."""
    if heldout >= len(prompts):
        raise UserError(f"HELDOUT_PROMPTS={heldout} leaves none of the {len(prompts)} prompts for training.")
    return prompts[: len(prompts) - heldout], prompts[len(prompts) - heldout:]


def prepare_prompts(run: Run) -> tuple[list[dict], list[dict]]:
    """The run's prompts, split into training and held out. Generated ones are written (main process) where
    PROMPTS_JSONL points, unless a file is there already: one with exactly the generated lines is used, any other is
    a file the script did not write (yours, or edited) and is refused, never replaced. Everything is read back
    through the checked reader; a resumed run must find the prompts it was trained on."""
    config, accelerator = run.config, run.accelerator
    path = Path(config["PROMPTS_JSONL"])
    if config["GENERATE_PROMPTS"]:
        generated = prompts_jsonl_text(generate_prompts(config["NUM_PROMPTS"], config["PROMPT_SEED"]))
        if not path.exists():
            if accelerator.is_main_process:
                atomic_write_text(path, generated)
        elif path.read_bytes() != generated.encode():
            raise UserError(f"{path} is not the prompt list that GENERATE_PROMPTS makes for NUM_PROMPTS="
                            f"{config['NUM_PROMPTS']}, PROMPT_SEED={config['PROMPT_SEED']} (your own file, or one that "
                            f"was edited), so it is not replaced. To train on it: GENERATE_PROMPTS=False. To generate "
                            f"prompts: point PROMPTS_JSONL at a new file, or leave it '' for one under OUTPUT_ROOT.")
    accelerator.wait_for_everyone()
    prompts = read_prompts_jsonl(path)
    run.prompts_sha256 = hashlib.sha256(json.dumps([p["prompt"] for p in prompts]).encode()).hexdigest()[:16]
    trained_on = run.resume[1].get("prompts_sha256") if run.resume else None
    if trained_on not in (None, run.prompts_sha256):
        raise UserError(f"The prompts in {path} are not those run {run.paths.name} was trained on; resuming would mix "
                        f"two prompt sets. Restore that file, or start a new run (a new RUN_NAME).")
    return split_heldout(prompts, config["HELDOUT_PROMPTS"])


def prompt_indices(step: int, micro: int, rank: int, world: int, batch: int, accum: int, n: int, seed: int) -> list[int]:
    """Which training prompts one rollout uses: a fresh permutation each epoch, the stream cut into
    batches, batches dealt to (step, micro-batch, process). A pure function of the step, so a resumed
    run continues exactly where it stopped."""
    start = ((step * accum + micro) * world + rank) * batch
    out = []
    for position in range(start, start + batch):
        epoch, offset = divmod(position, n)
        out.append(epoch_permutation(n, seed, epoch)[offset])
    return out


_PERMUTATIONS: dict = {}


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _PERMUTATIONS:
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        _PERMUTATIONS.clear()
        _PERMUTATIONS[key] = order
    return _PERMUTATIONS[key]

# =================================================================================================
# Models: teacher and student through diffusers, what trains, the cached text embeddings.
# =================================================================================================


def resolve_model_path(model_id: str, output_root: str) -> str:
    """The built-in tiny model is built once under OUTPUT_ROOT/cache; anything else passes through."""
    if model_id != TINY_MODEL_ID:
        return model_id
    path = Path(output_root) / "cache" / TINY_MODEL_ID
    if not (path / "model_index.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_sd3(path)  # two processes at once: both build it, the first one's stays (the same bytes)
    return str(path)


def explain_load_error(model_id: str, err: Exception) -> UserError:
    """Turn a Hub or folder loading failure into the one-paragraph fix. diffusers wraps the Hub's
    errors in OSError, so the original is found along the exception's cause chain."""
    causes, cause = [], err
    while cause is not None and len(causes) < 10:
        causes.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    text = str(err)
    if Path(model_id).exists():
        return UserError(f"{model_id} is a local folder but not a diffusers SD3 folder (it needs model_index.json "
                         f"and transformer/, vae/, text_encoder*/ and tokenizer*/ subfolders): {text[:300]}")
    if "GatedRepoError" in causes:
        if not os.environ.get("HF_TOKEN"):
            return UserError(f"{model_id} is gated and no Hugging Face token is set. Create a token at "
                             f"https://huggingface.co/settings/tokens and set HF_TOKEN (in Colab: from Secrets, "
                             f"see PRINT_COLAB_SETUP), then run again.")
        return UserError(f"{model_id} is gated and your token's account has not accepted its licence. Open "
                         f"https://huggingface.co/{model_id} while logged in, accept the licence, then run again.")
    if "RevisionNotFoundError" in causes:
        return UserError(f"Revision not found for {model_id}: check TEACHER_REVISION/STUDENT_REVISION against "
                         f"https://huggingface.co/{model_id}/tree/main, or use 'main'.")
    if "RepositoryNotFoundError" in causes:
        return UserError(f"{model_id} was not found on the Hugging Face Hub. Check the spelling, e.g. "
                         f"stabilityai/stable-diffusion-3.5-medium, or give a local diffusers folder.")
    return UserError(f"Could not load {model_id}: {type(err).__name__}: {text[:400]}. If you are offline, run once "
                     f"online with PREFETCH_MODELS=True, or point TEACHER_ID/STUDENT_ID at a local diffusers folder.")


def load_transformer(model_path: str, revision: str, dtype, cache_dir: str):
    from diffusers import SD3Transformer2DModel

    try:
        return SD3Transformer2DModel.from_pretrained(model_path, subfolder="transformer", revision=revision,
                                                     torch_dtype=dtype, cache_dir=cache_dir or None)
    except Exception as err:  # any failure here is the user's model id, folder, network or token
        raise explain_load_error(model_path, err) from err


def check_compatible(teacher_config, student_config, image_size: int, vae_factor: int) -> None:
    """Teacher and student must read the same latents and the same text embeddings."""
    problems = []
    for key in ("in_channels", "out_channels", "joint_attention_dim", "pooled_projection_dim"):
        if teacher_config[key] != student_config[key]:
            problems.append(f"{key}: teacher {teacher_config[key]}, student {student_config[key]}")
    if problems:
        raise UserError("Teacher and student are not compatible (" + "; ".join(problems) + "). Pick models of one "
                        "family: SD3-medium, SD3.5-medium and SD3.5-large all share 16 latent channels and 4096/2048 "
                        "text sizes.")
    for who, cfg in (("teacher", teacher_config), ("student", student_config)):
        multiple = vae_factor * cfg["patch_size"]
        patches = image_size // multiple
        if image_size % multiple:
            raise UserError(f"IMAGE_SIZE={image_size} must be a multiple of {multiple} (VAE factor {vae_factor} x "
                            f"{who} patch size {cfg['patch_size']}).")
        if patches > cfg["pos_embed_max_size"]:
            raise UserError(f"IMAGE_SIZE={image_size} is too large for the {who}: at most "
                            f"{cfg['pos_embed_max_size'] * multiple} pixels.")


def add_lora_adapter(model, rank: int, alpha: float, config: dict, name: str, dora: bool = False) -> None:
    """A LoRA adapter of this rank and alpha on the LORA_TARGET_MODULES of the model (peft, through diffusers), its B
    matrices zero; target names that match no layer are refused with the model's own linear layers named."""
    from peft import LoraConfig

    targets = [t.strip() for t in config["LORA_TARGET_MODULES"].split(",") if t.strip()]
    try:
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets,
                                     use_dora=dora), adapter_name=name)
    except ValueError as err:  # peft: none of the names is a layer of this model
        linears = sorted({n.split(".", 2)[-1] for n, m in model.named_modules()
                          if type(m).__name__ == "Linear" and n.startswith("transformer_blocks.0.")})
        raise UserError(f"LORA_TARGET_MODULES={config['LORA_TARGET_MODULES']!r} names no layer of the model "
                        f"({brief(err, 120)}). Its blocks' linear layers are: {', '.join(linears)}.") from None


def set_trainable(student, config: dict) -> list:
    """Freeze the student except the part TRAINABLE names; return the trainable parameters (fp32)."""
    import torch

    mode = config["TRAINABLE"]
    student.requires_grad_(mode == "all")
    if mode == "lora":
        add_lora_adapter(student, config["LORA_RANK"], config["LORA_ALPHA"], config, "default", config["LORA_USE_DORA"])
    elif mode == "blocks":
        for block in student.transformer_blocks[parse_block_slice(config["TRAIN_BLOCKS"])]:
            block.requires_grad_(True)
    elif mode == "norms":
        for name, param in student.named_parameters():
            if "norm" in name:
                param.requires_grad_(True)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"TRAINABLE={mode!r} (TRAIN_BLOCKS={config['TRAIN_BLOCKS']!r}) selects no weights of the student.")
    for p in params:  # master weights in fp32, as diffusers' cast_training_params does
        p.data = p.data.to(torch.float32)
    return params


FAKE_ADAPTER = "fake"  # the name of DMD's fake-score adapter; the student's LoRA is peft's "default"


def add_fake_score(model, config: dict) -> list:
    """DMD's fake score: a LoRA adapter (FAKE_ADAPTER, rank FAKE_LORA_RANK, on LORA_TARGET_MODULES) on a model of the
    teacher's frozen weights (with a LoRA student on them: its own model, so no third copy of the transformer).
    Its B matrices start at zero, so it starts as the teacher without guidance. Returns its weights, in fp32 as the
    student's trainable ones; the adapters active before stay active."""
    import torch

    active = model.active_adapters() if getattr(model, "_hf_peft_config_loaded", False) else None
    add_lora_adapter(model, config["FAKE_LORA_RANK"], config["FAKE_LORA_RANK"], config, FAKE_ADAPTER)
    if active:
        model.set_adapter(active)
    params = [p for name, p in model.named_parameters() if f".{FAKE_ADAPTER}." in name]
    for p in params:
        p.data = p.data.to(torch.float32)
    return params


def model_folders(config: dict) -> tuple[str, str]:
    """The teacher's and the student's model: a local folder, the built-in tiny SD3 (built on first use), or a Hub
    id; with PREFETCH_MODELS the needed files are downloaded first and their folders returned."""
    teacher_path = resolve_model_path(config["TEACHER_ID"], config["OUTPUT_ROOT"])
    student_path = resolve_model_path(config["STUDENT_ID"], config["OUTPUT_ROOT"])
    if config["PREFETCH_MODELS"]:
        teacher_path = prefetch_model(teacher_path, config["TEACHER_REVISION"], config["USE_T5"], config["COLAB_MODEL_CACHE"])
        student_path = prefetch_model(student_path, config["STUDENT_REVISION"], False, config["COLAB_MODEL_CACHE"])
    return teacher_path, student_path


def load_models(config: dict, device, folders: tuple[str, str] | None = None) -> tuple[Models, str]:
    """Teacher and student SD3 transformers through diffusers' from_pretrained, checked for
    compatibility, the teacher frozen, the student's trainable part chosen; returns the models and the
    teacher's folder (where the text encoders, VAE and scheduler come from)."""
    from diffusers import AutoencoderKL

    teacher_path, student_path = folders or model_folders(config)
    teacher_dtype = resolve_dtype(config["TEACHER_DTYPE"], device)
    # One copy of the transformer when the student is LoRA on the teacher's own weights.
    shares_weights = config["TRAINABLE"] == "lora" and (config["TEACHER_ID"], config["TEACHER_REVISION"]) == (
        config["STUDENT_ID"], config["STUDENT_REVISION"])
    teacher = load_transformer(teacher_path, config["TEACHER_REVISION"], teacher_dtype, config["COLAB_MODEL_CACHE"])
    if shares_weights:
        student, student_dtype = teacher, teacher_dtype
    else:
        student_dtype = resolve_dtype(config["STUDENT_DTYPE"], device)
        student = load_transformer(student_path, config["STUDENT_REVISION"], student_dtype, config["COLAB_MODEL_CACHE"])
    vae_config = AutoencoderKL.load_config(teacher_path, subfolder="vae", revision=config["TEACHER_REVISION"],
                                           cache_dir=config["COLAB_MODEL_CACHE"] or None)
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    models = make_models(teacher, student, shares_weights, teacher_dtype, student_dtype, config, vae_factor,
                         load_scheduler_config(teacher_path, config), device)
    return models, teacher_path


def make_models(teacher, student, shares_weights: bool, teacher_dtype, student_dtype, config: dict, vae_factor: int,
                scheduler_config: dict, device) -> Models:
    """Check compatibility, freeze the teacher, choose what of the student trains, place both on the device,
    put FP8 matmuls where TEACHER_FP8 / STUDENT_FP8 ask for them."""
    check_compatible(teacher.config, student.config, config["IMAGE_SIZE"], vae_factor)
    # DMD's fake score sits on the frozen base weights: the student's own model where it is LoRA on the teacher's
    # weights (also where the teacher becomes an FP8 copy below), else the teacher's.
    fake_host = student if shares_weights else teacher
    teacher_fp8 = teacher_fp8_enabled(config["TEACHER_FP8"], device)
    teacher.requires_grad_(False)
    teacher.eval().to(device)
    if teacher_fp8 and shares_weights and not config["STUDENT_FP8"]:
        teacher, shares_weights = fp8_copy(teacher), False  # an FP8 teacher beside the student's bf16 base
    trainable = set_trainable(student, config)
    fake = add_fake_score(fake_host, config) if config["DMD_WEIGHT"] > 0 else []
    adv_head = None
    if config["ADV_WEIGHT"] > 0:  # its own small weights, in fp32; the features it reads are the teacher's
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config["SEED"])
            adv_head = adversarial_head_module()(teacher.config.num_attention_heads * teacher.config.attention_head_dim,
                                                 adversarial_blocks(teacher.config.num_layers)).to(device)
    student.to(device).train()
    if config["STUDENT_FP8"]:
        convert_to_fp8(student)  # with shared weights the teacher's base too
    if teacher_fp8:
        convert_to_fp8(teacher)  # nothing left to convert when it is a copy made in FP8
    if config["GRADIENT_CHECKPOINTING"]:
        student.enable_gradient_checkpointing(checkpoint_as_in_forward)
    if config["COMPILE"] and device.type == "cuda":
        # Regional compilation: the blocks share one code object, so it compiles once, not per block;
        # rollout, teacher and evaluation batches and the adapter switch each add a variant.
        import torch._dynamo
        import torch._functorch.config

        # The on-disk AOTAutograd cache keys a block's graph from before the attention kernel is chosen,
        # so it would hand back a compile made under another ATTENTION_BACKEND (seen on an H200: "fa4"
        # ran exactly as fast as "cudnn" until that cache was off). Inductor's cache, keyed after the
        # choice, still saves most of a repeated run's compile time.
        torch._functorch.config.enable_autograd_cache = False
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
        for model in {id(teacher): teacher, id(student): student}.values():
            for block in model.transformer_blocks:
                block.compile()
    latent_size = config["IMAGE_SIZE"] // vae_factor
    return Models(student, teacher, shares_weights, teacher_dtype, student_dtype,
                  (teacher.config.in_channels, latent_size, latent_size), trainable, scheduler_config,
                  teacher.config.patch_size, teacher_fp8 or (shares_weights and config["STUDENT_FP8"]), config["STUDENT_FP8"],
                  fake, fake_host if fake else None, adv_head)


def load_scheduler_config(model_path: str, config: dict) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return dict(FlowMatchEulerDiscreteScheduler.load_config(model_path, subfolder="scheduler",
                                                            revision=config["TEACHER_REVISION"],
                                                            cache_dir=config["COLAB_MODEL_CACHE"] or None))


def fetch_model_folders(run: Run) -> tuple[str, str]:
    t0 = time.time()
    with run.accelerator.main_process_first():  # the first process builds or downloads, the others read
        folders = model_folders(run.config)
    run.timings["model_fetch_seconds"] = time.time() - t0
    return folders


def load_run_models(run: Run, folders: tuple[str, str]) -> tuple[Models, str]:
    t0 = time.time()
    models, teacher_path = load_models(run.config, run.accelerator.device, folders)
    run.timings["model_load_seconds"] = time.time() - t0
    return models, teacher_path


@dataclasses.dataclass
class TextEmbeddings:
    """Cached encoder outputs for every prompt: (N, L, D) token embeddings and (N, P) pooled ones."""

    embeds: "torch.Tensor"
    pooled: "torch.Tensor"
    empty_embeds: "torch.Tensor"  # the empty prompt, the unconditional branch of guidance
    empty_pooled: "torch.Tensor"

    def batch(self, indices, device, dtype):
        return (self.embeds[indices].to(device, dtype, non_blocking=True),
                self.pooled[indices].to(device, dtype, non_blocking=True))

    def empty_batch(self, size, device, dtype):
        return (self.empty_embeds.to(device, dtype).expand(size, -1, -1),
                self.empty_pooled.to(device, dtype).expand(size, -1))


def text_cache_path(cache_root: Path, model_path: str, revision: str, dtype_name: str, use_t5: bool, t5_len: int) -> Path:
    key = json.dumps([model_path, revision, dtype_name, use_t5, t5_len])
    return cache_root / "text_embeddings" / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".pt")


def encode_prompts_cached(texts: list[str], model_path: str, config: dict, device, cache_root: Path):
    """Encode each prompt once with CLIP-L, CLIP-G and (unless USE_T5 is off) T5, through diffusers'
    own StableDiffusion3Pipeline.encode_prompt; reuse earlier results from a cache on disk keyed by
    model, revision, dtype, T5 switch and length, and prompt. Text encoders are loaded only on a cache
    miss (the pipeline without its transformer and VAE), and deleted (off the accelerator) before the
    models load."""
    import torch

    dtype = resolve_dtype(config["TEXT_ENCODER_DTYPE"], device)
    path = text_cache_path(cache_root, model_path, config["TEACHER_REVISION"], str(dtype), config["USE_T5"],
                           config["T5_MAX_LENGTH"])
    cache = {}
    if path.is_file():
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            print(f"warning: text-embedding cache {path} is unreadable ({type(err).__name__}); re-encoding.")
    wanted = list(dict.fromkeys([""] + texts))
    missing = [t for t in wanted if t not in cache]
    if missing:
        from accelerate import init_empty_weights
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        extra = {} if config["USE_T5"] else {"text_encoder_3": None, "tokenizer_3": None}
        try:
            hub = {"revision": config["TEACHER_REVISION"], "cache_dir": config["COLAB_MODEL_CACHE"] or None}
            with init_empty_weights():  # no weights: the pipeline reads only its config (the width of T5's zeros)
                transformer = SD3Transformer2DModel.from_config(
                    SD3Transformer2DModel.load_config(model_path, subfolder="transformer", **hub))
            pipe = StableDiffusion3Pipeline.from_pretrained(model_path, torch_dtype=dtype, transformer=transformer,
                                                            vae=None, **hub, **extra)
        except Exception as err:
            raise explain_load_error(model_path, err) from err
        for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            if module is not None:
                module.to(device)
        warn_truncation(pipe, missing, config)
        with torch.no_grad():
            for start in range(0, len(missing), 16):
                chunk = missing[start:start + 16]
                embeds, _, pooled, _ = pipe.encode_prompt(
                    prompt=chunk, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
                    max_sequence_length=config["T5_MAX_LENGTH"])
                for i, text in enumerate(chunk):
                    cache[text] = (embeds[i].cpu().clone(), pooled[i].cpu().clone())
        del pipe
        free_accelerator_memory()
        atomic_write(path, lambda tmp: torch.save(cache, tmp))
    embeds = torch.stack([cache[t][0] for t in texts])
    pooled = torch.stack([cache[t][1] for t in texts])
    return TextEmbeddings(embeds, pooled, cache[""][0][None], cache[""][1][None])


def warn_truncation(pipe, texts: list[str], config: dict) -> None:
    """Name prompts longer than the tokenizers keep, once, instead of per batch."""
    limits = [(pipe.tokenizer, 77, "CLIP")]
    if pipe.tokenizer_3 is not None:
        limits.append((pipe.tokenizer_3, config["T5_MAX_LENGTH"], "T5"))
    for tokenizer, limit, name in limits:
        long = [t for t in texts if len(tokenizer(t).input_ids) > limit]
        if long:
            print(f"warning: {len(long)} prompt(s) exceed {name}'s {limit} tokens and are truncated, e.g. {long[0][:80]!r}")


def cache_text_embeddings(run: Run, prompts: list[dict], teacher_path: str) -> TextEmbeddings:
    t0 = time.time()
    with run.accelerator.main_process_first():
        text = encode_prompts_cached([p["prompt"] for p in prompts], teacher_path, run.config, run.accelerator.device,
                                     Path(run.config["OUTPUT_ROOT"]) / "cache")
    run.timings["text_embedding_seconds"] = time.time() - t0
    return text

# =================================================================================================
# Files and checkpoints: atomic writes, what a checkpoint holds, the checkpoint folder.
# =================================================================================================


FAULT_AT = "DISTILL_FAULT_AT"  # tests: "<moment>:<signal>" makes the run signal itself there (tests/test_faults.py)


def fault_point(moment: str) -> None:
    """Where the fault tests stop a run: with DISTILL_FAULT_AT="<moment>:KILL" (or ":INT") this process sends itself
    that signal here, once. Unset, as in every real run, it does nothing."""
    wanted = os.environ.get(FAULT_AT, "")
    if wanted.rpartition(":")[0] == moment:
        import signal

        del os.environ[FAULT_AT]
        os.kill(os.getpid(), getattr(signal, "SIG" + wanted.rpartition(":")[2]))


def brief(err: Exception, width: int = 200) -> str:
    """An exception's message on one line, shortened at a word boundary."""
    import textwrap

    return textwrap.shorten(" ".join(str(err).split()), width, placeholder=" ...")


def atomic_write(path: Path, write, local_first: bool | None = None) -> None:
    """write(tmp_path) into a temporary file beside `path`, fsync it, then rename it into place.

    A rename within one folder is atomic, so a reader (or a resumed run) sees the old file or the
    new one, never half of one, even when the runtime dies mid-write. When `path` is on another
    filesystem than the local temp folder (a mounted Google Drive), the file is written locally
    first (in staging_folder, which the next run of the folder's run clears) and then copied beside its
    destination, so a slow or cut-off mount never holds a file half-written by torch.save. A failed write
    (a full disk, a file-size limit, a read-only folder) leaves the previous file in place and says so."""
    import shutil
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if local_first is None:
        local_first = os.stat(path.parent).st_dev != os.stat(tempfile.gettempdir()).st_dev
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    staged = staging_folder(path.parent) / f"{os.getpid()}-{path.name}" if local_first else tmp
    try:
        staged.parent.mkdir(parents=True, exist_ok=True)
        write(staged)
        if local_first:
            shutil.copyfile(staged, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        fault_point(f"write {path.name}")
        os.replace(tmp, path)
    except Exception as err:
        if failure := write_failure(path, err):
            raise failure from err
        raise
    finally:
        for leftover in {tmp, staged}:
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)
        if local_first:
            with contextlib.suppress(OSError):  # emptied: nothing left in the local temp folder
                staged.parent.rmdir()


WRITE_ERRNOS = {"ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "EIO", "ENAMETOOLONG"}


def write_failure(path: Path, err: BaseException, kept: str | None = None) -> UserError | None:
    """The one-paragraph refusal for a write that failed for a reason outside the script (a full disk or quota, a
    file-size limit such as `ulimit -f`, a read-only or vanished folder: an OSError, torch.save's RuntimeError from a
    short write, safetensors' "os error"), saying what was kept and how to go on; None for any other error."""
    import errno

    text = " ".join(str(err).split())
    if isinstance(err, OSError) and errno.errorcode.get(err.errno) in WRITE_ERRNOS:
        reason = err.strerror
    elif isinstance(err, OSError) or (not isinstance(err, UserError) and (
            "os error" in text or "PytorchStreamWriter" in text or "unexpected pos" in text)):
        reason = text[:160]
    else:
        return None
    if kept is None:
        kept = "its previous version is intact" if Path(path).exists() else "nothing was written there"
    return UserError(f"Could not write {path} ({reason}); {kept}, and everything the run wrote before is intact. Free "
                     f"space (or lower KEEP_LAST_CHECKPOINTS), make OUTPUT_ROOT writable, or point it at a larger disk "
                     f"(e.g. Google Drive), then run the same command again: it continues from the newest checkpoint.")


def staging_folder(folder: Path) -> Path:
    """Where files bound for `folder` are first written when it is on another filesystem (a mounted Drive): one
    folder in the local temp folder per destination, named by its path, so the next run that owns `folder` finds and
    clears what a kill left there (the full weights of a checkpoint, say)."""
    import tempfile

    key = hashlib.sha256(os.path.abspath(folder).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"onpolicy-distill-staging-{key}"


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def remove_stale_temporaries(paths: "RunPaths", folder: Path) -> None:
    """A run killed mid-write leaves .tmp-* files beside their targets and staged ones in the folder's staging_folder;
    they are never valid, so remove them at start."""
    if folder.is_dir():
        for tmp in folder.glob(".tmp-*"):
            paths.remove(tmp)
    if staging_folder(folder).is_dir():
        paths.remove(staging_folder(folder))


def named_state(model, params: list) -> dict:
    """{name: a CPU copy} of the given weights of a model: only what trains (all weights, the chosen blocks, or just
    the LoRA adapters), or DMD's fake score."""
    wanted = {id(p) for p in params}
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if id(p) in wanted}


def save_checkpoint(path: Path, models: Models, optimizer, lr_scheduler, accelerator, step: int, config: dict,
                    extra: dict) -> None:
    import torch

    student = accelerator.unwrap_model(models.student)
    payload = {"format": "onpolicy-distill-v1", "step": step, "student": named_state(student, models.trainable),
               "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
               "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
               "config": config, "fingerprint": config_fingerprint(config), **extra}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """weights_only=True: a checkpoint holds only tensors and plain values, so loading one runs no code.
    mmap=True leaves the tensors on disk (enough to verify a freshly written file)."""
    import torch

    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if payload.get("format") != "onpolicy-distill-v1":
        raise ValueError("not a checkpoint of this script")
    return payload


class CheckpointDir:
    """checkpoints/<run>/: step_<N>.pt, final.pt and latest.json naming the newest complete one and the run's status
    (running, interrupted, trained: final.pt written, the ending not yet; finished)."""

    def __init__(self, paths: "RunPaths", keep: int, keep_gb: float = 0.0):
        self.paths, self.folder, self.keep, self.keep_gb = paths, paths.checkpoints, keep, keep_gb
        self.pointer = self.folder / "latest.json"

    def step_files(self) -> list[Path]:
        files = [p for p in self.folder.glob("step_*.pt") if p.stem[5:].isdigit()]
        return sorted(files, key=lambda p: int(p.stem[5:]))

    def save(self, name: str, step: int, status: str, fingerprint: str, save_fn) -> Path:
        """Write, verify (its archive reads back), point latest.json at it, then drop the oldest: past the newest `keep`,
        and while the step files kept pass `keep_gb` (the newest always stays)."""
        path = self.folder / name
        save_fn(path)
        load_checkpoint(path, mmap=True)  # reads the archive's index and values, not the tensors
        atomic_write_text(self.pointer, json.dumps({"checkpoint": name, "step": step, "status": status,
                                                    "fingerprint": fingerprint, "time": time.time()}))
        if name.startswith("step_"):
            for old in self.step_files()[: -self.keep]:
                self.paths.remove(old)
            kept = self.step_files()
            while self.keep_gb and len(kept) > 1 and sum(p.stat().st_size for p in kept) > self.keep_gb * 1e9:
                self.paths.remove(kept.pop(0))
        return path

    def mark(self, status: str) -> None:
        """Set the status in latest.json, the rest as it is."""
        pointer = read_json(self.pointer) or {}
        atomic_write_text(self.pointer, json.dumps({**pointer, "status": status, "time": time.time()}))

    def newest_valid(self) -> tuple[Path, dict] | None:
        """The checkpoint of the highest step that loads, by its step, not its name: final.pt of an earlier, shorter
        training of a run that then trained longer is older than that training's step files. A truncated or corrupt
        one is named and skipped."""
        candidates = [(int(path.stem[5:]), path) for path in self.step_files()]
        final = self.folder / "final.pt"
        if final.is_file():
            with contextlib.suppress(Exception):  # unreadable: named below, when it is tried
                candidates.append((load_checkpoint(final, mmap=True)["step"] + 0.5, final))  # first at its step
            if all(path != final for _, path in candidates):
                candidates.append((math.inf, final))
        for _, path in sorted(candidates, key=lambda c: c[0], reverse=True):
            try:
                return path, load_checkpoint(path)
            except Exception as err:
                print(f"warning: checkpoint {path} is unreadable ({type(err).__name__}: {brief(err)}); "
                      f"falling back to an older one.")
        return None

# =================================================================================================
# Writers: metrics, sample grids and curves, the summary, the exported student.
# =================================================================================================


LOSS_TERMS = ("loss", "kl", "eps_mse", "latent_mse", "dmd", "adv")  # the columns of distill_rollout's terms; "loss" = total
EVAL_COLUMNS = ("eval_gap", "eval_drift", "eval_diversity")


def metric_columns(num_steps: int) -> list[str]:
    columns = [*("step",) + LOSS_TERMS, "fake_loss", "disc_loss", "kl_weight", "dmd_weight", "adv_weight", "lr", "grad_norm", "sec_per_step", "images_per_sec",
               "peak_mem_gb", "skipped_steps", *EVAL_COLUMNS]
    for i in range(num_steps):
        columns += [f"{name}_{i}" for name in LOSS_TERMS[1:]]
    return columns


class MetricsWriter:
    """metrics.jsonl and metrics.csv, a row per logged step, flushed as written (eval.jsonl beside
    them is written by HeldoutEval). On resume, rows past the restored step are dropped first from
    all three, so each step appears once; the CSV header stays that of the run."""

    def __init__(self, folder: Path, columns: list[str], resume_step: int | None):
        self.jsonl, self.csv, self.columns = folder / "metrics.jsonl", folder / "metrics.csv", columns
        folder.mkdir(parents=True, exist_ok=True)
        rows = rows_through(self.jsonl, resume_step)
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(self.csv, ",".join(columns) + "\n" + "".join(self._csv_line(r) for r in rows))
        evals = rows_through(folder / "eval.jsonl", resume_step)
        atomic_write_text(folder / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in evals))

    def _csv_line(self, row: dict) -> str:
        import io

        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow(["" if row.get(c) is None else row.get(c) for c in self.columns])
        return out.getvalue()

    def write(self, row: dict) -> None:
        append_line(self.jsonl, json.dumps(row))
        append_line(self.csv, self._csv_line(row).rstrip("\n"))


def rows_through(path: Path, last_step: int | None) -> list[dict]:
    """The rows of a JSONL file up to and including `last_step` (none for a fresh run). A line that is not a row (cut
    by a kill, or damaged: not UTF-8, not JSON, not an object with a step) is dropped, and named once."""
    rows, dropped = [], 0
    if last_step is not None and path.is_file():
        for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
                dropped += bool(line.strip())
            elif row["step"] <= last_step:
                rows.append(row)
    if dropped:
        print(f"warning: {path} had {dropped} line(s) that are not metrics rows (cut off or damaged); they are left out.")
    return rows


def step_windows(rows: list[dict]) -> list[tuple[int, float]]:
    """Each metrics row's window of optimizer steps in seconds: (step_i, sec_per_step_i * (step_i - step_{i-1})),
    step_0 = 0. Summed, the training time of every process a resumed run ran in (a window cut by a kill is lost with
    its row, so the sum errs by at most one window per resume)."""
    return [(r["step"], r["sec_per_step"] * (r["step"] - (rows[i - 1]["step"] if i else 0))) for i, r in enumerate(rows)]


def append_line(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_vae(model_path: str, config: dict, dtype, device):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_path, subfolder="vae", revision=config["TEACHER_REVISION"],
                                        torch_dtype=dtype, cache_dir=config["COLAB_MODEL_CACHE"] or None)
    return vae.requires_grad_(False).eval().to(device)


def decode_latents(vae, latents) -> list:
    """Latents to PIL images exactly as StableDiffusion3Pipeline decodes them, one at a time (memory)."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))
    images = []
    for latent in latents:
        z = latent[None].to(vae.device, vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        with torch.no_grad():
            images += processor.postprocess(vae.decode(z, return_dict=False)[0].float(), output_type="pil")
    return images


def sample_grid(teacher_images: list, student_images: list, prompts: list[str], gaps: list[float], num_steps: int):
    """One row per held-out prompt: teacher | student, the prompt and its gap underneath."""
    from PIL import Image, ImageDraw

    side = max(teacher_images[0].width, 160)  # small (tiny-model) images are enlarged to be seen
    caption, header = 30, 18
    grid = Image.new("RGB", (2 * side, header + len(prompts) * (side + caption)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 3), "teacher (guided, full sampler)", fill="black")
    draw.text((side + 4, 3), f"student ({num_steps} steps)", fill="black")
    for row, (t, s, prompt, gap) in enumerate(zip(teacher_images, student_images, prompts, gaps, strict=True)):
        top = header + row * (side + caption)
        grid.paste(t.resize((side, side), Image.NEAREST), (0, top))
        grid.paste(s.resize((side, side), Image.NEAREST), (side, top))
        text = prompt if len(prompt) <= 2 * side // 6 else prompt[: 2 * side // 6 - 1] + "…"
        draw.text((4, top + side + 2), text, fill="black")
        draw.text((4, top + side + 15), f"gap {gap:.4g}", fill="black")
    return grid


def plot_curves(metrics_jsonl: Path, path: Path) -> None:
    """Loss terms and the held-out gap over steps, as a PNG (matplotlib where installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, so no {path.name}; the numbers are in {metrics_jsonl}.")
        return
    rows = rows_through(metrics_jsonl, math.inf)
    if not rows:
        return
    fig, (losses, gap) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "kl", "eps_mse", "latent_mse"):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            losses.plot(*zip(*points, strict=True), label=key)
    losses.set(xlabel="step", yscale="log", title="training loss terms")
    losses.legend()
    evals = rows_through(metrics_jsonl.with_name("eval.jsonl"), math.inf)  # from step 0, before any training
    points = [(r["step"], r["eval_gap"]) for r in evals]
    if points:
        gap.plot(*zip(*points, strict=True), marker="o")
    gap.set(xlabel="step", title="held-out teacher-student gap (latent MSE)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def write_summary_after_a_stop(run: Run, result: TrainResult, models: Models) -> None:
    """The summary of an interrupted or failed run; a failure to write it (a full disk, say) is named, never raised
    over the reason the run stopped."""
    try:
        write_summary(run, result, models)
    except Exception as err:
        print(f"warning: the summary of run {run.paths.name} could not be written ({brief(err)}).", file=sys.stderr)


def write_summary(run: Run, result: TrainResult, models: Models) -> dict:
    """runs/<run>/train_summary.json (and the curves plot), from the main process."""
    if not run.accelerator.is_main_process:
        return {}
    config, paths, now = run.config, run.paths, time.time()
    plot_curves(paths.metrics / "metrics.jsonl", paths.run / "curves.png")
    logged = rows_through(paths.metrics / "metrics.jsonl", math.inf)
    summary = {
        "status": result.status, "run_name": paths.name, "step": result.step, "max_steps": config["MAX_STEPS"],
        "skipped_steps": result.skipped_steps, "eval_gap_before": result.gap_before, "eval_gap_last": result.gap_last,
        "final_metrics": result.last_row,
        "timings": {"total_seconds": now - run.timings["started"],
                    "model_fetch_seconds": run.timings.get("model_fetch_seconds"),
                    "model_load_seconds": run.timings.get("model_load_seconds"),
                    "text_embedding_seconds": run.timings.get("text_embedding_seconds"),
                    "train_seconds": now - run.timings.get("train_started", now),  # this process's
                    "train_seconds_across_resumes": sum(sec for _, sec in step_windows(logged))},
        "device": str(run.accelerator.device), "device_name": device_name(run.accelerator.device),
        "mixed_precision": run.mixed_precision,
        "num_processes": run.accelerator.num_processes, "batch_size": config["BATCH_SIZE"],
        "batch_size_choice": run.batch_choice or "set in the config", "teacher_fp8": models.teacher_fp8,
        "student_fp8": models.student_fp8,
        "trainable_parameters": sum(p.numel() for p in models.trainable), "shares_teacher_weights": models.shares_weights,
        "paths": {"metrics_jsonl": str(paths.metrics / "metrics.jsonl"), "metrics_csv": str(paths.metrics / "metrics.csv"),
                  "eval_jsonl": str(paths.metrics / "eval.jsonl"), "checkpoints": str(paths.checkpoints),
                  "final": str(paths.checkpoints / "final.pt"), "prompts": config["PROMPTS_JSONL"],
                  "samples": str(paths.samples), "curves": str(paths.run / "curves.png"),
                  "export": str(paths.export) if config["EXPORT_DIFFUSERS"] else None},
        "config": config,
    }
    atomic_write_text(paths.run / "train_summary.json", json.dumps(summary, indent=2))
    return summary


EXPORT_MANIFEST = "export_manifest.json"  # {file: {"bytes", "sha256"}} of everything else in the export


def export_manifest(folder: Path) -> dict:
    def sha256(path):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    return {str(f.relative_to(folder)): {"bytes": f.stat().st_size, "sha256": sha256(f)}
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != EXPORT_MANIFEST}


def export_problem(folder: Path) -> str | None:
    """What is wrong with an export folder (missing, no manifest, a file missing, cut short or changed), or None where
    every file is as its manifest says: a re-run of a finished run checks this, and exports again where it fails."""
    manifest = read_json(folder / EXPORT_MANIFEST)
    if not folder.is_dir():
        return "is missing"
    if not isinstance(manifest, dict):
        return f"has no readable {EXPORT_MANIFEST}"
    try:
        found = export_manifest(folder)
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    for name, entry in manifest.items():
        if name not in found:
            return f"lacks {name}"
        if found[name] != entry:
            return f"has {name} at {found[name]['bytes']:,} bytes, not the {entry['bytes']:,} it was written with" if (
                found[name]["bytes"] != entry["bytes"]) else f"has {name} changed since it was written"
    return None


def export_student(models: Models, accelerator, config: dict, teacher_path: str, paths: "RunPaths", gap_before,
                   gap_last) -> None:
    """export_student_files, with a failed write (a full disk, say) refused in one paragraph."""
    try:
        export_student_files(models, accelerator, config, teacher_path, paths, gap_before, gap_last)
    except Exception as err:
        kept = (f"the export was not finished (final.pt holds the trained student; the same command exports it again; "
                f"a half-written {paths.export_staging.name} is cleared then)")
        if failure := write_failure(paths.export_staging, err, kept):
            raise failure from err
        raise


def save_student_lora(folder, transformer) -> None:
    """The student's LoRA (peft's "default" adapter) as pipe.load_lora_weights reads it: peft's state dict in
    diffusers' file, the adapter's config (rank, alpha, targets, DoRA) in its metadata, so it loads at the strength it
    was trained at (alpha / rank). DMD's fake-score adapter is never part of it. The export and the experiment's
    readings of checkpoints both write through here."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    StableDiffusion3Pipeline.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name="default"),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())


def export_student_files(models: Models, accelerator, config: dict, teacher_path: str, paths: "RunPaths", gap_before,
                         gap_last) -> None:
    """The student in the form diffusers users load: LoRA weights for pipe.load_lora_weights in LoRA
    mode, else a whole StableDiffusion3Pipeline folder (without T5 when it was trained without it);
    a model card beside it; optionally pushed to the Hub."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    student = accelerator.unwrap_model(models.student)
    staging = paths.export_staging
    if staging.exists():
        paths.remove(staging)
    if config["TRAINABLE"] == "lora":
        save_student_lora(staging, student)
        base = teacher_path if config["STUDENT_ID"] == TINY_MODEL_ID else config["STUDENT_ID"]  # the built-in one's folder
        # As it was trained: without T5 where it learned without it, and at its own shift (a LoRA file holds none).
        no_t5 = "" if config["USE_T5"] else ", text_encoder_3=None, tokenizer_3=None"
        usage = (f"pipe = StableDiffusion3Pipeline.from_pretrained({base!r}{no_t5})\n"
                 f"pipe.load_lora_weights({str(paths.export)!r})\n")
        if config["SAMPLER_SHIFT"] is not None:
            usage += (f"pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, "
                      f"shift={config['SAMPLER_SHIFT']})\n")
    else:
        extra = {} if config["USE_T5"] else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = StableDiffusion3Pipeline.from_pretrained(teacher_path, transformer=student, revision=config["TEACHER_REVISION"],
                                                        cache_dir=config["COLAB_MODEL_CACHE"] or None, **extra)
        if config["SAMPLER_SHIFT"] is not None:
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=config["SAMPLER_SHIFT"])
        pipe.save_pretrained(staging)
        usage = f"pipe = StableDiffusion3Pipeline.from_pretrained({str(paths.export)!r})\n"
    sigmas = pipeline_sigmas(config["NUM_ROLLOUT_STEPS"], config["SAMPLER_SPACING"])
    steps = f"sigmas={sigmas}" if sigmas else f"num_inference_steps={config['NUM_ROLLOUT_STEPS']}"
    card = f"""# {paths.name}: a {config['NUM_ROLLOUT_STEPS']}-step SD3 student

On-policy distilled from `{config['TEACHER_ID']}` into `{config['STUDENT_ID']}` ({config['TRAINABLE']}) by
run_onpolicy_distill_colab.py: {config['MAX_STEPS']} steps, teacher guidance {config['GUIDANCE_SCALE']}, losses
KL x {config['KL_WEIGHT']} + epsilon MSE x {config['EPS_MSE_WEIGHT']} + latent MSE x {config['LATENT_MSE_WEIGHT']}.
Held-out teacher-student gap (latent MSE): {gap_before} before, {gap_last} after.

```python
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
{usage}image = pipe("a photo of a cat", {steps}, guidance_scale=1.0).images[0]
```
Guidance is distilled into the student: sample with guidance_scale=1.0{
", and with these sigmas, the steps it learned (the scheduler shifts them as it shifts its own)" if sigmas else ""}.
"""
    (staging / "README.md").write_text(card)
    umask = os.umask(0)
    os.umask(umask)
    for file in staging.rglob("*"):  # diffusers writes its weights 0600 (through a temporary file); others 0644
        if file.is_file():
            file.chmod(0o666 & ~umask)
    (staging / EXPORT_MANIFEST).write_text(json.dumps(export_manifest(staging), indent=1))
    fault_point("export")
    if paths.export.exists():
        paths.remove(paths.export)  # the export of an earlier, shorter training of this run
    os.replace(staging, paths.export)
    if config["PUSH_TO_HUB"]:
        from huggingface_hub import create_repo, upload_folder

        create_repo(config["PUSH_TO_HUB"], exist_ok=True)
        upload_folder(repo_id=config["PUSH_TO_HUB"], folder_path=str(paths.export))
        print(f"pushed {paths.export} to https://huggingface.co/{config['PUSH_TO_HUB']}")

# =================================================================================================
# The built-in tiny SD3: every component made in code, saved and loaded as a Hub model is.
# =================================================================================================


def build_tiny_sd3(path: Path) -> None:
    """Make a tiny random SD3 (every component, tokenizers included) and save it as a diffusers folder.

    Deterministic: the same folder, bit for bit, every time. Loaded back through the same
    from_pretrained calls as a Hub model. Architecture as SD3.5 (qk RMS-norm, a dual-attention block)."""
    import io
    import tempfile

    import sentencepiece as spm
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel,
                              T5TokenizerFast)

    with tempfile.TemporaryDirectory() as scratch, torch.random.fork_rng(devices=[]):
        scratch = Path(scratch)
        # CLIP tokenizers: a byte-pair vocabulary of single characters, word-final ones and a few merges.
        chars = "abcdefghijklmnopqrstuvwxyz0123456789,.:-'!?"
        vocab = {}
        for c in chars:
            vocab[c] = len(vocab)
        for c in chars:
            vocab[c + "</w>"] = len(vocab)
        merges = ["t h", "th e</w>", "a n", "an d</w>"]
        for merge in merges:
            vocab[merge.replace(" ", "")] = len(vocab)
        vocab["<|startoftext|>"] = len(vocab)
        vocab["<|endoftext|>"] = len(vocab)
        (scratch / "clip").mkdir()
        (scratch / "clip" / "vocab.json").write_text(json.dumps(vocab))
        (scratch / "clip" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        clip_tokenizer = CLIPTokenizer.from_pretrained(scratch / "clip", model_max_length=77)
        # T5 tokenizer: a sentencepiece unigram model trained here on the prompt generator's own text.
        sentences = [p["prompt"] for p in generate_prompts(300, seed=0)]
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=96,
                                       hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                       bos_id=-1, minloglevel=2, num_threads=1, shuffle_input_sentence=False)
        (scratch / "t5").mkdir()
        (scratch / "t5" / "spiece.model").write_bytes(model.getvalue())
        t5_tokenizer = T5TokenizerFast.from_pretrained(scratch / "t5", extra_ids=0, model_max_length=512)

        def clip(hidden, seed):
            torch.manual_seed(seed)
            return CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                num_attention_heads=2, max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"]))

        text_encoder, text_encoder_2 = clip(8, 1), clip(16, 2)
        torch.manual_seed(3)
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
            feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        torch.manual_seed(4)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                            latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=1.5035,
                            shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
        torch.manual_seed(5)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer, text_encoder_3=text_encoder_3,
            tokenizer_3=t5_tokenizer)
        staging = Path(path).with_name(f".tmp-{Path(path).name}-{os.getpid()}")
        pipe.save_pretrained(staging)
        try:
            os.replace(staging, path)
        except OSError:  # another process put its build there first
            if not (Path(path) / "model_index.json").is_file():
                raise
            import shutil

            shutil.rmtree(staging)  # this process's own scratch folder

# =================================================================================================
# Colab and Hub helpers: the notebook cells, installing what is missing, prefetching only what a run reads.
# =================================================================================================


REQUIREMENTS = {  # the ranges of requirements.txt, for dep_install()
    "torch": ">=2.4", "diffusers": ">=0.34", "transformers": ">=4.45", "accelerate": ">=0.34",
    "huggingface_hub": ">=0.25", "sentencepiece": ">=0.2", "protobuf": ">=3.20", "tqdm": ">=4.60", "peft": ">=0.13",
}


def colab_setup_text() -> str:
    """The notebook's cells (README and the .ipynb hold exactly these); Cell 1 installs REQUIREMENTS' ranges of what
    Colab lacks or has too old (torch, huggingface_hub and tqdm come with it)."""
    pip = " ".join(f'"{name}{REQUIREMENTS[name]}"' for name in ("diffusers", "transformers", "accelerate", "peft"))
    return f"""\
# Cell 1: install (skips what is already there)
!pip install -q {pip} sentencepiece protobuf
# Cell 2: Hugging Face token. Add HF_TOKEN under Colab's key icon (Secrets) first; a !python process
# cannot read secrets itself, so hand it over through the environment:
from google.colab import userdata; import os; os.environ["HF_TOKEN"] = userdata.get("HF_TOKEN")
# SD3 models are gated: accept the licence on each model page while logged in, e.g.
#   https://huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers
# Cell 3 (recommended): keep outputs and downloads on Drive, so a disconnect loses nothing
from google.colab import drive; drive.mount("/content/drive")
# Cell 4: run (edit the constants at the top of the script, or pass --NAME=VALUE). Without Drive (no Cell 3),
# leave out both flags: outputs then go to /content/outputs_colab, which a disconnect deletes.
!python run_onpolicy_distill_colab.py --OUTPUT_ROOT=/content/drive/MyDrive/distill --COLAB_MODEL_CACHE=/content/drive/MyDrive/hf_cache
"""


def dep_install() -> list[str]:
    """pip-install each requirement that is missing or older than its range; return what was installed."""
    import importlib.metadata as md
    import subprocess

    from packaging.specifiers import SpecifierSet

    wanted = []
    for package, spec in REQUIREMENTS.items():
        try:
            if md.version(package) in SpecifierSet(spec):
                continue
        except md.PackageNotFoundError:
            pass
        wanted.append(package + spec)
    if wanted:
        print("installing:", " ".join(wanted))
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *wanted])
    else:
        print("all requirements already installed")
    return wanted


def prefetch_patterns(use_t5: bool) -> list[str]:
    """The files of a diffusers SD3 folder that a run reads: configs, tokenizers and safetensors weights."""
    folders = ["transformer", "scheduler", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
    if use_t5:
        folders += ["text_encoder_3", "tokenizer_3"]
    patterns = ["model_index.json"]
    for folder in folders:
        patterns += [f"{folder}/*.json", f"{folder}/*.safetensors", f"{folder}/*.txt", f"{folder}/*.model"]
    return patterns


def download_size(files: list[tuple[str, int]], patterns: list[str]) -> int:
    """Bytes of the repository files (name, size) that the patterns select."""
    import fnmatch

    return sum(size or 0 for name, size in files if any(fnmatch.fnmatch(name, p) for p in patterns))


def prefetch_model(model_id: str, revision: str, use_t5: bool, cache_dir: str) -> str:
    """Say how much will be downloaded, then download once (huggingface_hub skips files already
    cached); return the local folder."""
    from huggingface_hub import HfApi, snapshot_download

    patterns = prefetch_patterns(use_t5)
    if not Path(model_id).exists():
        try:
            info = HfApi().model_info(model_id, revision=revision, files_metadata=True)
            size = download_size([(f.rfilename, f.size) for f in info.siblings], patterns)
            print(f"prefetching {model_id}: {size / 2**30:.1f} GiB (less what is already cached)")
        except Exception as err:
            raise explain_load_error(model_id, err) from err
    return snapshot_download(model_id, revision=revision, cache_dir=cache_dir or None, allow_patterns=patterns)


if __name__ == "__main__":
    sys.exit(main())
