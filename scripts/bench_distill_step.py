#!/usr/bin/env python
"""Step benchmark: the distillation script's own step at real SD3 scale, beside a straightforward loop.

Builds SD3 transformers from the public configs (sd3-medium, sd3.5-medium, sd3.5-large) with random
weights (nothing is downloaded), and measures in one process: the accelerator's bf16 matmul ceiling,
the FLOPs of one forward pass (counted, and by the per-token formula), the script's step (median time,
images/s, MFU, peak memory) and a straightforward loop doing the same work the plain way. With
--profile it also records where the step's time goes: matmuls, attention, fused pointwise and the rest.

    python scripts/bench_distill_step.py --suite h200-passes   # on a CUDA GPU: the README's table (N = 2 AB2 default)
    python scripts/bench_distill_step.py --suite h200          # the N = 4 defaults of 2026-12-02, FP8 (lab notes)
    python scripts/bench_distill_step.py --suite h100          # the earlier levers at N = 1 (lab notes)
    python scripts/bench_distill_step.py --suite levers        # 2026-12-07: attention kernel, DMD at one state, K = 1
    python scripts/bench_distill_step.py --suite attention     # 2026-12-08: the attention kernels alone, bf16 and FP8
    python scripts/bench_distill_step.py --suite tiny          # on the CPU: keeps this file working

Each case's result is appended to --out (JSON) as soon as it is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from distill_module import SD3_CONFIGS, build_transformer, load_distill  # noqa: E402

SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def median_gpu_seconds(fn, repeats: int, warmup: int = 3) -> float:
    """Median time of fn() between CUDA events, after `warmup` untimed calls."""
    import torch

    times = []
    for i in range(repeats + warmup):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def matmul_ceiling_tflops(device, size=8192, repeats=10) -> float:
    """Median bf16 matmul rate on random data: the denominator of MFU."""
    import torch

    if device.type != "cuda":
        return float("nan")
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    return 2 * size**3 / median_gpu_seconds(lambda: a @ b, repeats) / 1e12


def fp8_matmul_ceiling_tflops(distill, device, size=8192, repeats=10) -> float | None:
    """Median FP8 (e4m3, row-wise scaled) matmul rate on random data, measured as the bf16 ceiling is."""
    import torch

    if device.type != "cuda" or distill.fp8_problem(device):
        return None
    a, scale_a = distill.fp8_quantize_rows(torch.randn(size, size, device=device))
    b, scale_b = distill.fp8_quantize_rows(torch.randn(size, size, device=device))
    scale_b = scale_b.t().contiguous()  # the bare product of quantised inputs, as fp8_linear runs it
    return 2 * size**3 / median_gpu_seconds(
        lambda: torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16), repeats) / 1e12


def fp8_teacher_probe(distill, case: dict, device, ceiling: float, fp8_ceiling: float | None,
                      with_torchao: bool = False, kernels: bool = False) -> dict:
    """The teacher's guided pass (batch = 2 x the rollout's images) in bf16 against FP8: the script's FP8Linear
    and, where torchao is installed, torchao's float8 dynamic row-wise quantisation of the same layers; each with
    its blocks compiled as the script compiles them. Forward time, the velocity's error against bf16 (relative
    MSE), and the matmul kernels the profiler saw (FP8 ones have f8/e4m3 in their names)."""
    import copy

    import torch
    from torch.profiler import ProfilerActivity, profile

    cfg = SD3_CONFIGS[case["teacher"]]
    latent = case["image_size"] // 8
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(case["batch"], cfg["in_channels"], latent, latent, generator=g).to(device, torch.bfloat16)
    enc = torch.randn(case["batch"], case["text_len"], cfg["joint_attention_dim"], generator=g).to(device, torch.bfloat16)
    pooled = torch.randn(case["batch"], cfg["pooled_projection_dim"], generator=g).to(device, torch.bfloat16)
    bf16 = build_transformer(case["teacher"], torch.bfloat16, device).requires_grad_(False).eval()
    variants = {"bf16": bf16, "fp8 (script)": distill.fp8_copy(bf16)}
    torchao_note = "not asked for (--torchao)"
    if with_torchao:
        try:
            import torchao
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

            torchao_model = copy.deepcopy(bf16)
            targets = {id(m) for m in distill.fp8_targets(torchao_model).values()}
            quantize_(torchao_model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                      filter_fn=lambda module, fqn: id(module) in targets)
            variants["fp8 (torchao)"], torchao_note = torchao_model, torchao.__version__
        except ImportError as err:
            torchao_note = f"not installed ({err})"
    result = {"case": case, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "matmul_ceiling_tflops": ceiling,
              "fp8_matmul_ceiling_tflops": fp8_ceiling, "torchao": torchao_note, "variants": {}}
    reference = None
    for name, model in variants.items():
        torch._dynamo.reset()
        for block in model.transformer_blocks:
            block.compile()

        def forward():
            with torch.no_grad():
                return distill.predict_velocity(model, x, 500.0, enc, pooled, torch.bfloat16)

        started = time.perf_counter()
        out = forward()
        synchronize(device)
        print(f"  {name}: first pass (compiling) {time.perf_counter() - started:.0f} s", flush=True)
        reference = out if reference is None else reference
        times = timed(forward, device, 2, 10)
        result["variants"][name] = {
            "forward_ms": statistics.median(times) * 1e3,
            "relative_mse_vs_bf16": float((out - reference).square().mean() / reference.square().mean())}
        print(f"  {name}: {result['variants'][name]}", flush=True)
        if kernels:
            with profile(activities=[ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]) as prof:
                forward()
                synchronize(device)
            result["variants"][name]["matmul_kernels"] = sorted(
                {e.key[:120] for e in prof.key_averages()
                 if kernel_kind(e.key) == "matmul" or any(f in e.key.lower() for f in ("f8", "e4m3", "scaled_mm"))})[:12]
    base = result["variants"]["bf16"]["forward_ms"]
    for v in result["variants"].values():
        v["speedup_vs_bf16"] = base / v["forward_ms"]
    del variants, bf16
    distill.free_accelerator_memory()
    return result


def fp8_per_tensor(t):
    """(t / s) in float8 e4m3 and s = amax(|t|) / 448, so that t ~ s * q: the per-tensor scaling FP8 attention takes."""
    import torch

    scale = t.abs().amax().float().clamp(min=1e-12) / 448.0
    return (t.float() / scale).to(torch.float8_e4m3fn), scale


def attention_kernels_probe(case: dict, device, repeats: int = 10) -> dict:
    """SD3's joint attention alone at the step's shape (batch, 24 heads of 64, image and text tokens): each kernel's
    forward (what the teacher's passes run) and forward with backward (the student's), in ms and TFLOP/s
    (forward 4 B H T^2 D FLOPs, backward 2.5x that), and its output's relative RMS error against fp32 on the first
    sample. Kernels: PyTorch's SDPA backends in bf16, FlexAttention compiled in bf16 and in FP8 (e4m3 inputs scaled
    per tensor, the scales folded into the softmax scale and the output; forward only, as FP8 attention runs)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, T, D = case["batch"], case.get("heads", 24), case["tokens"], case.get("head_dim", 64)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device, torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        exact = F.scaled_dot_product_attention(q[:1].float(), k[:1].float(), v[:1].float())
    forward_flops = 4 * B * H * T * T * D

    def seconds(fn):  # between CUDA events on the GPU, as the ceilings are timed
        return median_gpu_seconds(fn, repeats, 2) if device.type == "cuda" else statistics.median(timed(fn, device, 2, repeats))

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    result = {"case": case, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "forward_flops": forward_flops,
              "variants": {}}
    variants = {"sdpa flash (bf16)": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa cudnn (bf16)": sdpa(SDPBackend.CUDNN_ATTENTION),
                "sdpa efficient (bf16)": sdpa(SDPBackend.EFFICIENT_ATTENTION)}
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = variants["flex (bf16, compiled)"] = torch.compile(flex_attention, dynamic=False)

        def flex_fp8(q, k, v):
            (q8, sq), (k8, sk), (v8, sv) = fp8_per_tensor(q), fp8_per_tensor(k), fp8_per_tensor(v)
            return flex(q8, k8, v8, scale=float(sq * sk) / D**0.5).to(torch.bfloat16) * sv.to(torch.bfloat16)
        variants["flex (fp8 e4m3, compiled)"] = flex_fp8
    except ImportError as err:
        result["variants"]["flex"] = {"error": f"ImportError: {err}"}
    for name, fn in variants.items():
        entry = result["variants"][name] = {}
        try:
            with torch.no_grad():
                out = fn(q, k, v)
                entry["relative_rms_error_vs_fp32"] = float((out[:1].float() - exact).square().mean().sqrt()
                                                            / exact.square().mean().sqrt())
                entry["output_dtype"] = str(out.dtype)
                forward = seconds(lambda: fn(q, k, v))
            entry["forward_ms"], entry["forward_tflops"] = forward * 1e3, forward_flops / forward / 1e12
            if "fp8" not in name:
                qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                both = seconds(lambda: fn(qg, kg, vg).sum().backward())
                entry["forward_backward_ms"] = both * 1e3
                entry["forward_backward_tflops"] = 3.5 * forward_flops / both / 1e12
        except Exception as err:  # a kernel this GPU or torch lacks: say so and go on
            entry["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        print(f"  {name}: {entry}", flush=True)
    return result


def formula_forward_flops(cfg: dict, batch: int, image_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one joint-attention transformer forward, by the per-token formula.

    Per block, each stream of n tokens: q,k,v,out projections 4 d^2 and a 4x MLP 8 d^2, so 2 n 12 d^2;
    joint attention over N = n_img + n_txt tokens: QK^T and AV, 2 * 2 N^2 d. The last block's text
    stream only projects q,k,v (2 n 3 d^2). A dual-attention block (SD3.5-medium) adds self-attention
    over the image tokens: 2 n 4 d^2 + 4 n^2 d. Embeddings and the adaLN modulation are negligible."""
    d = cfg["attention_head_dim"] * cfg["num_attention_heads"]
    n_img, n_txt, layers = image_tokens, text_tokens, cfg["num_layers"]
    total = 0.0
    for i in range(layers):
        last = i == layers - 1
        total += 2 * n_img * 12 * d * d
        total += 2 * n_txt * (3 if last else 12) * d * d
        total += 4 * (n_img + n_txt) ** 2 * d
        if i in tuple(cfg.get("dual_attention_layers", ())):
            total += 2 * n_img * 4 * d * d + 4 * n_img**2 * d
    return batch * total


def counted_flops(fn) -> float:
    """FLOPs of fn() as torch.utils.flop_counter counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def synchronize(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


KERNEL_KINDS = (  # (kind, name fragments): the first match wins; CUDA kernel names and CPU aten op names
    ("fused pointwise and norms (triton)", ("triton_",)),  # first: Inductor names them after the ops they feed
    ("attention", ("sdpa", "fmha", "flash", "attention", "cudnn::fusion")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
)


def kernel_kind(name: str) -> str:
    """Which kind of work a kernel (or, on the CPU, an aten op) does: attention, matmul, fused, other."""
    lowered = name.lower()
    for kind, fragments in KERNEL_KINDS:
        if any(f in lowered for f in fragments):
            return kind
    return "other"


def profiled_time_by_kind(fn, device, steps: int = 2) -> dict:
    """Milliseconds per step spent in each kind of kernel (GPU time on CUDA, self CPU time of aten ops
    on the CPU), from torch.profiler over `steps` calls of fn, and the step's wall time beside them."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    wall = (time.perf_counter() - start) / steps
    by_kind: dict[str, float] = {}
    for event in prof.key_averages():
        if cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            busy = event.self_device_time_total
        else:
            if not event.key.startswith("aten::"):
                continue
            busy = event.self_cpu_time_total
        kind = kernel_kind(event.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + busy / 1e3 / steps
    return {"ms_per_step_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "busy_ms_per_step": sum(by_kind.values()), "profiled_step_ms": wall * 1e3,
            "clock": "GPU kernel time" if cuda else "self CPU time of aten ops"}


PHASES = {  # the script's functions each phase of a step is, by name in its module
    "teacher_target_velocity": "teacher substeps (the targets)",
    "distribution_scores": "DMD: real and fake scores",
    "fresh_student_samples": "DMD: fresh student samples",
    "update_fake_score": "DMD: fake score update",
    "adversarial_logits": "adversarial: the student's side",
    "update_adversarial_head": "adversarial: head update",
    "apply_update": "optimizer (clip, AdamW)",
}
REST_OF_STEP = "student forward and backward, the rest"


def time_by_phase(distill, fn, device, steps: int = 2) -> dict:
    """Milliseconds per step in each phase (PHASES), each of the script's functions timed between device
    synchronisations and without the phases it calls itself (the fake score's fresh samples inside its update);
    what is left of the step is REST_OF_STEP. The synchronisations take away some overlap of host and device, so the
    step under them (synchronised_step_ms) is a little longer than the step's own time."""
    import functools

    spent = dict.fromkeys(PHASES, 0.0)
    inner = []  # per open phase, the seconds of the phases it called

    def timed_phase(name, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            inner.append(0.0)
            try:
                return function(*args, **kwargs)
            finally:
                synchronize(device)
                elapsed, nested = time.perf_counter() - start, inner.pop()
                spent[name] += elapsed - nested
                if inner:
                    inner[-1] += elapsed
        return wrapper

    originals = {name: getattr(distill, name) for name in PHASES}
    for name, function in originals.items():
        setattr(distill, name, timed_phase(name, function))  # the script calls them by their module's names
    try:
        fn()  # once untimed: the compiled blocks sit below these functions, so nothing compiles again
        spent.update(dict.fromkeys(PHASES, 0.0))
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        synchronize(device)
        wall = (time.perf_counter() - start) / steps
    finally:
        for name, function in originals.items():
            setattr(distill, name, function)
    phases = {PHASES[name]: seconds / steps * 1e3 for name, seconds in spent.items() if seconds}
    phases[REST_OF_STEP] = wall * 1e3 - sum(phases.values())
    return {"ms_per_step_by_phase": phases, "synchronised_step_ms": wall * 1e3}


def mixed_ceiling_images_per_second(case: dict, flops_per_image: float, forward_flops_per_image: float,
                                    ceiling: float, fp8_ceiling: float | None) -> float | None:
    """The images/s a step would reach with every matmul at its ceiling: the teacher's substep passes (states x N x 2
    guided, at the FP8 ceiling where its teacher is FP8) and the rest of the step's counted FLOPs (the student's
    passes, DMD's, the critics') at the bf16 ceiling: 1 / (F_teacher / C_teacher + F_rest / C_bf16), per image."""
    if not flops_per_image or ceiling != ceiling:
        return None
    states = case.get("supervised") or case["steps"]
    substeps = case.get("substeps") or max(1, 8 // case["steps"])
    teacher = states * substeps * 2 * forward_flops_per_image
    teacher_rate = fp8_ceiling if case.get("teacher_fp8") and fp8_ceiling else ceiling
    return 1 / (teacher / (teacher_rate * 1e12) + (flops_per_image - teacher) / (ceiling * 1e12))


def random_text(distill, num_prompts: int, text_len: int, cfg: dict, device, dtype):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    embeds = torch.randn(num_prompts, text_len, cfg["joint_attention_dim"], generator=g).to(device, dtype)
    pooled = torch.randn(num_prompts, cfg["pooled_projection_dim"], generator=g).to(device, dtype)
    return distill.TextEmbeddings(embeds, pooled, embeds[:1] * 0, pooled[:1] * 0)


def step_images(case: dict) -> int:
    """Images per optimizer step (IMAGES_PER_STEP): the batch times the rollouts accumulated into it."""
    return case.get("images", case["batch"])


def vae_factor(case: dict) -> int:
    """Pixels per latent side: 8 for SD3's VAE, 2 for the tiny model's."""
    return 8 if case["teacher"] != "tiny" else 2


def case_config(distill, case: dict, device) -> dict:
    """The script's settings for a case; what a case does not name stays at the script's default."""
    config = distill.default_config()
    config.update(TEACHER_ID=case["teacher"], STUDENT_ID=case["student"], IMAGE_SIZE=case["image_size"],
                  BATCH_SIZE=case["batch"], IMAGES_PER_STEP=step_images(case),
                  NUM_ROLLOUT_STEPS=case["steps"], TEACHER_SUBSTEPS=case.get("substeps", config["TEACHER_SUBSTEPS"]),
                  TEACHER_SOLVER=case.get("solver", config["TEACHER_SOLVER"]),
                  TEACHER_FP8=case.get("teacher_fp8", False), STUDENT_FP8=case.get("student_fp8", False),
                  SUPERVISED_STATES=case.get("supervised", 0), TRAINABLE=case["trainable"],
                  GRADIENT_CHECKPOINTING=case.get("checkpointing", False), COMPILE=case.get("compile", False),
                  ATTENTION_BACKEND=case.get("attention", "auto"), DMD_WEIGHT=case.get("dmd", 0.0),
                  DMD_STATES=case.get("dmd_states", 0),
                  LR_WARMUP_STEPS=0, KL_WARMUP_STEPS=0,
                  LEARNING_RATE=1e-6, MAX_STEPS=10**6, MIXED_PRECISION="bf16" if device.type == "cuda" else "no")
    if case.get("lora_targets"):
        config["LORA_TARGET_MODULES"] = case["lora_targets"]
    if device.type != "cuda":
        config.update(TEACHER_DTYPE="float32", COMPILE=False)
    return distill.resolve_auto_settings(config)  # the LoRA layers at the case's K, as a run's


def run_script_step(distill, case: dict, device, warmup: int, repeats: int, count_flops: bool,
                    profile: bool = False) -> dict:
    """The main script's own step (distill_step + apply_update), with its own model setup."""
    import torch
    from accelerate import Accelerator

    config = case_config(distill, case, device)
    accelerator = Accelerator(mixed_precision=config["MIXED_PRECISION"], cpu=device.type != "cuda")
    teacher_dtype = distill.resolve_dtype(config["TEACHER_DTYPE"], device)
    teacher = build_transformer(case["teacher"], teacher_dtype, device)
    shares = config["TRAINABLE"] == "lora" and case["teacher"] == case["student"]
    student_dtype = teacher_dtype if shares else torch.float32
    student = teacher if shares else build_transformer(case["student"], student_dtype, device)
    models = distill.make_models(teacher, student, shares, teacher_dtype, student_dtype, config, vae_factor(case),
                                 SCHEDULER_CONFIG, device)
    distill.set_attention_backend(config["ATTENTION_BACKEND"])
    optimizer, lr_scheduler = distill.build_optimizer(models.trainable, config, device, 1)
    models.student, optimizer, lr_scheduler = accelerator.prepare(models.student, optimizer, lr_scheduler)
    fake_optimizer, fake_scaler = distill.build_fake_optimizer(models, config, device, config["MIXED_PRECISION"])
    adv_optimizer, adv_scaler = distill.build_critic_optimizer(
        list(models.adv_head.parameters()) if models.adv_head is not None else [], config["ADV_LEARNING_RATE"], config,
        device, config["MIXED_PRECISION"])
    cfg = SD3_CONFIGS[case["teacher"]]
    text = random_text(distill, 16, case["text_len"], cfg, device, teacher_dtype)
    sigmas, timesteps = distill.sampler_sigmas(SCHEDULER_CONFIG, config["NUM_ROLLOUT_STEPS"], None, models.image_seq_len)
    batch_choice = None
    if config["BATCH_SIZE"] == "auto":  # as a run resolves it, before the step is first taken
        config["BATCH_SIZE"], batch_choice = distill.choose_batch_size(models, accelerator, text, config, sigmas, timesteps)
    state = {"step": 0, "finite": 0}
    critics = distill.Training(optimizer, lr_scheduler, sigmas, timesteps, None, None, distill.TrainResult(),
                               fake_optimizer, fake_scaler, adv_optimizer, adv_scaler)

    def step():
        terms, counts, samples = distill.distill_step(models, accelerator, text, state["step"], config, sigmas,
                                                      timesteps, 16)
        _, finite = distill.apply_update(models, accelerator, optimizer, lr_scheduler, terms, counts, config,
                                         config["MIXED_PRECISION"])
        distill.update_critics(models, accelerator, critics, samples, config, state["step"])
        state["step"] += 1
        state["finite"] += finite

    flops = None
    if count_flops and not config["COMPILE"]:  # counting under compilation would trace the counter into the graphs
        flops = counted_flops(step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    step()
    synchronize(device)
    print(f"  batch {config['BATCH_SIZE']} ({batch_choice or 'set'}); first step (compiling) "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    times = timed(step, device, max(warmup - 1, 0), repeats)
    result = {"step_seconds": statistics.median(times), "step_seconds_all": times, "step_flops": flops,
              "finite_steps": state["finite"], "total_steps": state["step"],
              "trainable_params": sum(p.numel() for p in models.trainable), "batch_size": config["BATCH_SIZE"],
              "batch_size_choice": batch_choice, "teacher_fp8": models.teacher_fp8, "student_fp8": models.student_fp8,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    if profile:
        result["profile"] = profiled_time_by_kind(step, device)
        result["phases"] = time_by_phase(distill, step, device)
    return result


# What the script's step does that the straightforward loop does not, in the order the ladder adds them.
REFERENCE_LEVERS = ("bf16_teacher", "batched_guidance", "cached_text", "no_recomputation", "no_host_sync")


def reference_step_factory(distill, case: dict, device, levers: tuple = ()):
    """A straightforward loop doing the same work the plain way: fp32 weights under autocast, the
    teacher's conditional and unconditional passes separately, prompts re-encoded by CLIP-L and
    CLIP-G every step, the student's states recomputed with gradients after a no-grad rollout, a host
    sync for every loss, no compilation. Each of `levers` (REFERENCE_LEVERS) switches one of these to
    what the script does: the teacher in bf16 (on CUDA), guidance in one batched pass, the prompts
    encoded once, each state's student forward with gradients also moving the rollout, no host sync."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = SD3_CONFIGS[case["teacher"]]
    teacher_dtype = torch.bfloat16 if "bf16_teacher" in levers and device.type == "cuda" else torch.float32
    teacher = build_transformer(case["teacher"], teacher_dtype, device).requires_grad_(False).eval()
    student = build_transformer(case["student"], torch.float32, device)
    if case["trainable"] == "lora":
        config = case_config(distill, case, device)
        distill.set_trainable(student, config)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    real = case["teacher"] != "tiny"
    with torch.device(device):  # CLIP-L and CLIP-G of the real sizes (random weights)
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768 if real else 8, intermediate_size=3072 if real else 16,
                                                            num_hidden_layers=12 if real else 2, num_attention_heads=12 if real else 2,
                                                            projection_dim=768 if real else 32))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280 if real else 16, intermediate_size=5120 if real else 32,
                                                            num_hidden_layers=32 if real else 2, num_attention_heads=20 if real else 2,
                                                            projection_dim=1280 if real else 32))
    clip_l.eval(), clip_g.eval()
    batch = case["batch"] if case["batch"] != "auto" else step_images(case)
    K, guidance, accum = case["steps"], 7.0, step_images(case) // batch
    N = distill.teacher_substeps({"TEACHER_SUBSTEPS": case.get("substeps", 0), "NUM_ROLLOUT_STEPS": K})  # its passes
    latent = case["image_size"] // vae_factor(case)
    t5_len = case["text_len"] - 77
    sigmas, timesteps = distill.sampler_sigmas(SCHEDULER_CONFIG, K, None, (latent // 2) ** 2)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def encode(token_ids):
        with torch.no_grad():
            out_l = clip_l(token_ids, output_hidden_states=True)
            out_g = clip_g(token_ids, output_hidden_states=True)
            clip = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
            clip = torch.nn.functional.pad(clip, (0, cfg["joint_attention_dim"] - clip.shape[-1]))
            t5 = torch.zeros(token_ids.shape[0], t5_len, cfg["joint_attention_dim"], device=device)
            return torch.cat([clip, t5], dim=1), torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1)

    def encode_prompts():
        ids = torch.randint(0, 1000 if real else 40, (batch, 77), device=device)
        return encode(ids), encode(torch.zeros_like(ids))

    cached = encode_prompts() if "cached_text" in levers else None

    def teacher_guided(x, t, cond, uncond):
        with torch.no_grad(), autocast:
            if "batched_guidance" in levers:
                return distill.teacher_velocity(teacher, x, t, cond, uncond, guidance, teacher_dtype)
            v_cond = distill.predict_velocity(teacher, x, t, *cond, teacher_dtype)
            v_uncond = distill.predict_velocity(teacher, x, t, *uncond, teacher_dtype)
            return distill.guided_velocity(v_uncond, v_cond, guidance)

    def learn_at(i, x, cond, uncond):
        """The losses at state i, backpropagated; returns the student's (detached) velocity there."""
        v_teacher = distill.teacher_target_velocity(lambda y, t: teacher_guided(y, t, cond, uncond), x, sigmas, i, N,
                                                    SCHEDULER_CONFIG["shift"])
        with autocast:
            v_student = distill.predict_velocity(student, x, timesteps[i], *cond, torch.float32)
        s, n = float(sigmas[i]), float(sigmas[i + 1])
        loss = (distill.transition_kl(s, n, 0.7, v_student, v_teacher) + distill.epsilon_mse(x, s, v_student, v_teacher)
                + distill.latent_mse(x, s, v_student, v_teacher)) / (K * accum)
        loss.backward()
        if "no_host_sync" not in levers:
            loss.item()
        return v_student.detach()

    def rollout():
        cond, uncond = cached or encode_prompts()
        x = torch.randn(batch, cfg["in_channels"], latent, latent, device=device)
        if "no_recomputation" in levers:
            for i in range(K):
                x = distill.euler_step(x, learn_at(i, x, cond, uncond), float(sigmas[i]), float(sigmas[i + 1]))
        else:
            states = []
            with torch.no_grad(), autocast:
                for i in range(K):
                    states.append(x)
                    v = distill.predict_velocity(student, x, timesteps[i], *cond, torch.float32)
                    x = distill.euler_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
            for i, x in enumerate(states):
                learn_at(i, x, cond, uncond)

    def step():
        for _ in range(accum):
            rollout()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    def cleanup():
        nonlocal teacher, student, optimizer, clip_l, clip_g, cached
        del teacher, student, optimizer, clip_l, clip_g, cached
        distill.free_accelerator_memory()

    return step, cleanup


def run_case(distill, case: dict, device, ceiling: float, args) -> dict:
    import torch

    torch._dynamo.reset()  # compile afresh, as a run does: compiled blocks do not re-check the attention switches
    cfg, latent = SD3_CONFIGS[case["teacher"]], case["image_size"] // vae_factor(case)
    image_tokens = (latent // cfg["patch_size"]) ** 2
    result = {"case": case, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "matmul_ceiling_tflops": ceiling}
    # One forward at the rollout's batch: counted and by formula.
    if case.get("forward", True):
        model = build_transformer(case["teacher"], torch.bfloat16 if device.type == "cuda" else torch.float32, device)
        dtype = model.dtype
        x = torch.randn(case["batch"], cfg["in_channels"], latent, latent, device=device, dtype=dtype)
        enc = torch.randn(case["batch"], case["text_len"], cfg["joint_attention_dim"], device=device, dtype=dtype)
        pooled = torch.randn(case["batch"], cfg["pooled_projection_dim"], device=device, dtype=dtype)
        t = torch.full((case["batch"],), 500.0, device=device, dtype=dtype)

        def forward():
            with torch.no_grad():
                model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t, return_dict=False)

        result["forward_flops_counted"] = counted_flops(forward)
        result["forward_flops_formula"] = formula_forward_flops(cfg, case["batch"], image_tokens, case["text_len"])
        result["forward_seconds_eager"] = statistics.median(timed(forward, device, 2, args.repeats))
        del model
        distill.free_accelerator_memory()
    script = run_script_step(distill, case, device, case.get("warmup", args.warmup), case.get("repeats", args.repeats),
                             count_flops=case.get("count_flops", True), profile=args.profile)
    distill.free_accelerator_memory()  # the step's models are gone with run_script_step's frame
    result["script"] = script
    images = step_images(case)
    result["script"]["images_per_second"] = images / script["step_seconds"]
    if script["step_flops"] and ceiling == ceiling:
        result["script"]["mfu"] = script["step_flops"] / script["step_seconds"] / (ceiling * 1e12)

    def time_reference(levers: tuple) -> dict:
        distill.set_attention_backend("auto")  # the straightforward loop lets PyTorch pick
        step, cleanup = reference_step_factory(distill, case, device, levers)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = timed(step, device, 1, max(2, args.repeats // 2))
        cleanup()
        return {"levers": list(levers), "step_seconds": statistics.median(times),
                "images_per_second": images / statistics.median(times),
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}

    if case.get("reference", False):
        result["reference"] = time_reference(())
        result["speedup_vs_reference"] = result["reference"]["step_seconds"] / script["step_seconds"]
    if case.get("ladder", False):  # the loop with the script's levers added one at a time
        result["reference_ladder"] = [time_reference(REFERENCE_LEVERS[:n]) for n in range(1, len(REFERENCE_LEVERS) + 1)]
    return result


def suite(name: str) -> list[dict]:
    base = dict(image_size=1024, text_len=333, steps=4, substeps=1, solver="euler")  # h100: measured before N existed
    if name == "h200":  # the defaults of 2026-12-02 (K = 4, N = 4 Euler, LoRA on shared weights, 4 images, auto batch)
        default = dict(base, teacher="sd3-medium", student="sd3-medium", substeps=4, solver="euler", trainable="lora",
                       batch="auto", images=4, compile=True, forward=False, count_flops=False)
        return [
            dict(kind="fp8_teacher", teacher="sd3-medium", batch=8, image_size=1024, text_len=333),
            dict(default, batch=1, images=1, compile=False, count_flops=True, repeats=2, warmup=1),  # FLOPs per image
            dict(default, reference=True),  # the default; the straightforward loop doing its work
            dict(default, teacher_fp8=True),
            dict(default, teacher_fp8=True, student_fp8=True),
            dict(default, batch=8, images=8, teacher_fp8=True, student_fp8=True, attention="cudnn"),
            dict(default, batch=16, images=16, teacher_fp8=True, student_fp8=True, attention="cudnn"),
        ]
    if name == "h200-passes":  # 2026-12-03: the teacher's passes per state at the FP8 default, N = 2 against N = 4
        default = dict(base, teacher="sd3-medium", student="sd3-medium", substeps=2, trainable="lora", batch="auto",
                       images=4, compile=True, forward=False, count_flops=False, teacher_fp8=True, solver="ab2")
        return [
            dict(default, batch=1, images=1, compile=False, count_flops=True, repeats=1, warmup=1,
                 teacher_fp8=False),  # FLOPs per image (eager, bf16: FP8 does not change the count)
            default,  # N = 2 with the 2-step Adams-Bashforth target (the same passes as N = 2 Euler)
            dict(default, substeps=4, solver="euler", count_flops=True, compile=False, batch=1, images=1, repeats=1,
                 warmup=1, teacher_fp8=False),  # FLOPs per image at N = 4
            dict(default, substeps=4, solver="euler"),  # the default, measured again beside it
            dict(default, reference=True),  # the straightforward loop doing N = 2's work
        ]
    if name == "dmd":  # 2026-12-06: what DMD_WEIGHT adds to the default step (its fake score: 1 update per step)
        default = dict(base, teacher="sd3-medium", student="sd3-medium", substeps=2, trainable="lora", batch="auto",
                       images=4, compile=True, forward=False, count_flops=False, teacher_fp8=True, solver="ab2")
        return [default, dict(default, dmd=1.0)]
    if name == "phases":  # 2026-12-07: where the default step's time goes, with DMD, at K = 2 (DMD on by default there)
        default = dict(base, teacher="sd3-medium", student="sd3-medium", substeps=2, trainable="lora", batch="auto",
                       images=4, compile=True, forward=False, count_flops=False, teacher_fp8=True, solver="ab2")
        k2 = dict(default, steps=2, substeps=4, solver="euler", dmd=1.0)  # K = 2 as it runs by default
        eager = dict(batch=1, images=1, compile=False, count_flops=True, repeats=1, warmup=1, teacher_fp8=False)
        return [dict(default, **eager), dict(default, reference=True), dict(default, dmd=1.0), dict(k2, **eager),
                k2, dict(default, student_fp8=True)]
    if name == "levers":  # 2026-12-07: the attention kernel, DMD at one state per rollout, the K = 1 recipe, STUDENT_FP8
        default = dict(base, teacher="sd3-medium", student="sd3-medium", substeps=2, trainable="lora", batch="auto",
                       images=4, compile=True, forward=False, count_flops=False, teacher_fp8=True, solver="ab2")
        k2 = dict(default, steps=2, substeps=4, solver="euler", dmd=1.0)  # K = 2 as it runs by default
        k1 = dict(default, steps=1, substeps=8, solver="euler", dmd=1.0)  # K = 1: the MLPs too ("auto"), DMD
        return [dict(default, reference=True), dict(default, attention="cudnn"), k2, dict(k2, dmd_states=1), k1,
                dict(default, student_fp8=True), dict(k2, dmd_states=1, attention="cudnn")]
    if name == "attention":  # 2026-12-08: SD3-medium's attention at 1024^2 alone, each kernel, bf16 and FP8 (issue 37)
        return [dict(kind="attention", batch=8, tokens=4096 + 333), dict(kind="attention", batch=4, tokens=4096 + 333)]
    if name == "tiny":
        return [dict(teacher="tiny", student="tiny", image_size=32, text_len=109, steps=4, substeps=2, solver="ab2",
                     batch=2, images=4, trainable="all", reference=True, ladder=True, compile=False)]
    if name == "h100":
        medium = dict(base, teacher="sd3-medium", student="sd3-medium", forward=False, count_flops=False)
        return [
            dict(base, teacher="sd3-medium", student="sd3-medium", batch=2, trainable="all", reference=True),
            dict(medium, batch=2, trainable="all", compile=True),
            dict(medium, batch=2, trainable="all", attention="cudnn"),
            dict(medium, batch=2, trainable="lora", count_flops=True),
            dict(medium, batch=4, trainable="lora", count_flops=True),
            dict(medium, batch=2, trainable="lora", compile=True),
            dict(medium, batch=4, trainable="lora", compile=True),
            dict(medium, batch=1, trainable="lora", checkpointing=True, compile=True),
            dict(medium, batch=1, trainable="all", compile=True),
            dict(medium, batch=1, trainable="all", checkpointing=True, compile=True),
            dict(base, teacher="sd3.5-medium", student="sd3.5-medium", batch=1, trainable="lora", count_flops=False,
                 compile=True),
            dict(base, teacher="sd3.5-large", student="sd3.5-medium", batch=1, trainable="lora", checkpointing=True,
                 count_flops=False, compile=True),
            # levers combined: compiled blocks with cuDNN attention, larger batches
            dict(medium, batch=2, trainable="all", compile=True, attention="cudnn"),
            dict(medium, batch=4, trainable="all", compile=True, attention="cudnn"),
            dict(medium, batch=4, trainable="lora", compile=True, attention="cudnn"),
            dict(medium, batch=8, trainable="lora", compile=True, attention="cudnn"),
            dict(medium, batch=4, trainable="all", compile=True, attention="cudnn", reference=True),
            dict(medium, batch=16, trainable="lora", compile=True, attention="cudnn"),
            # the straightforward loop, then with the script's levers added one at a time, then the script's step
            dict(base, teacher="sd3-medium", student="sd3-medium", batch=2, trainable="all", forward=False,
                 count_flops=False, reference=True, ladder=True),
            # the FLOPs of full training counted (eager), then full training as the script runs it by default:
            # 4 rollouts accumulated per optimizer step (IMAGES_PER_STEP = 4 x BATCH_SIZE)
            dict(medium, batch=2, trainable="all", count_flops=True),
            dict(medium, batch=4, images=16, trainable="all", compile=True, attention="cudnn"),
            # what LoRA's branches cost: case 15 with LoRA on one projection instead of eight
            dict(medium, batch=8, trainable="lora", compile=True, attention="cudnn", lora_targets="attn.to_q"),
            # FlashAttention-4 in place of cuDNN (ATTENTION_BACKEND="fa4", needs flash-attn-4): cases 13, 15, 20, 17
            dict(medium, batch=4, trainable="all", compile=True, attention="fa4"),
            dict(medium, batch=8, trainable="lora", compile=True, attention="fa4"),
            dict(medium, batch=4, images=16, trainable="all", compile=True, attention="fa4"),
            dict(medium, batch=16, trainable="lora", compile=True, attention="fa4"),
            # ... and against the straightforward loop at the work of its largest batch that fits 80 GB
            dict(base, teacher="sd3-medium", student="sd3-medium", batch=2, trainable="all", forward=False,
                 count_flops=False, compile=True, attention="fa4", reference=True),
        ]
    raise SystemExit(f"unknown suite {name}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="tiny", help="tiny (CPU), h200-passes (the defaults: README), h200 "
                        "(N = 4, FP8) or h100 (N = 1, bf16 levers: the lab notes)")
    parser.add_argument("--only", type=int, nargs="*", help="run only these case indices of the suite")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--out", default="bench_results.json")
    parser.add_argument("--torchao", action="store_true", help="the FP8 probe also tries torchao's float8 quantisation")
    parser.add_argument("--kernels", action="store_true", help="the FP8 probe also lists the matmul kernels it ran")
    parser.add_argument("--profile", action="store_true", help="also record where the step's time goes, by kernel kind "
                        "and by phase of the step")
    args = parser.parse_args()
    import torch

    distill = load_distill()
    distill.quiet_libraries()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ceiling, fp8_ceiling = matmul_ceiling_tflops(device), fp8_matmul_ceiling_tflops(distill, device)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"bf16 matmul ceiling {ceiling:.0f} TFLOP/s, FP8 {fp8_ceiling or float('nan'):.0f} TFLOP/s", flush=True)
    results, counted = [], {}
    for index, case in enumerate(suite(args.suite)):
        if args.only and index not in args.only:
            continue
        if case.get("kind") in ("fp8_teacher", "attention"):
            results.append(attention_kernels_probe(case, device) if case["kind"] == "attention" else
                           fp8_teacher_probe(distill, case, device, ceiling, fp8_ceiling, args.torchao, args.kernels))
            Path(args.out).write_text(json.dumps(results, indent=2))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "case"}), flush=True)
            continue
        try:
            result = run_case(distill, case, device, ceiling, args)
        except torch.cuda.OutOfMemoryError as err:
            result = {"case": case, "error": f"out of memory: {str(err)[:200]}"}
            distill.free_accelerator_memory()
        work = (case["teacher"], case["student"], case["trainable"], case["steps"], case.get("substeps", 0),
                case.get("supervised", 0), case["image_size"], case.get("dmd", 0.0), case.get("dmd_states", 0))
        if "script" in result:  # the same work costs the same FLOPs however it is run: reuse an eager count,
            # per image (every operation of the step is per sample, so FLOPs are proportional to the images
            # of an optimizer step, batch x accumulated rollouts; the optimizer's own FLOPs are negligible)
            images = step_images(case)
            if result["script"]["step_flops"] and not case.get("checkpointing"):
                counted[work] = result["script"]["step_flops"] / images
            elif work in counted and ceiling == ceiling:
                result["script"]["step_flops_from_eager_case"] = counted[work] * images
                result["script"]["mfu"] = counted[work] * images / result["script"]["step_seconds"] / (ceiling * 1e12)
            flops = result["script"].get("step_flops") or result["script"].get("step_flops_from_eager_case")
            if fp8_ceiling and (case.get("teacher_fp8") or case.get("student_fp8")):
                result["fp8_matmul_ceiling_tflops"] = fp8_ceiling  # kept with or without a FLOP count
                if flops:
                    seconds = result["script"]["step_seconds"]
                    result["script"]["mfu_of_fp8_ceiling"] = flops / seconds / (fp8_ceiling * 1e12)
            cfg = SD3_CONFIGS[case["teacher"]]
            image_tokens = (case["image_size"] // vae_factor(case) // cfg["patch_size"]) ** 2
            forward = formula_forward_flops(cfg, 1, image_tokens, case["text_len"])
            best = mixed_ceiling_images_per_second(case, (flops or 0) / images, forward, ceiling, fp8_ceiling)
            if best:
                result["script"]["mixed_ceiling_images_per_second"] = best
                result["script"]["of_mixed_ceiling"] = result["script"]["images_per_second"] / best
        results.append(result)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(summary_line(result), flush=True)
    print("\n" + table(results))


def summary_line(r: dict) -> str:
    c = r["case"]
    if c.get("kind") == "attention":
        return f"attention, batch {c['batch']}, {c['tokens']} tokens: " + ", ".join(
            f"{name} " + (f"fwd {v['forward_tflops']:.0f} TFLOP/s, error {v['relative_rms_error_vs_fp32']:.1e}"
                          if "forward_tflops" in v else "") + (f", fwd+bwd {v['forward_backward_tflops']:.0f}"
                                                               if "forward_backward_tflops" in v else "")
            + (f" [{v['error'][:60]}]" if "error" in v else "") for name, v in r["variants"].items())
    if c.get("kind") == "fp8_teacher":
        return f"{c['teacher']} teacher pass, batch {c['batch']}: " + ", ".join(
            f"{name} {v['forward_ms']:.1f} ms ({v['speedup_vs_bf16']:.2f}x, relative MSE {v['relative_mse_vs_bf16']:.1e})"
            for name, v in r["variants"].items())
    images = f" ({c['images']} per step)" if c.get("images", c["batch"]) != c["batch"] else ""
    name = f"{c['teacher']}->{c['student']} {c['trainable']} b{c['batch']}{images} K{c['steps']} N{c.get('substeps', 'default')}" + (
        " fp8-teacher" if c.get("teacher_fp8") else "") + (" fp8-student" if c.get("student_fp8") else "") + (
        " ckpt" if c.get("checkpointing") else "") + (f" lora:{c['lora_targets']}" if c.get("lora_targets") else "") + (
        " compiled" if c.get("compile") else "") + (f" {c['attention']}" if c.get("attention") else "") + (
        f" DMD x {c['dmd']:g}" if c.get("dmd") else "")
    if "error" in r:
        return f"{name}: {r['error']}"
    s = r["script"]
    parts = [name, f"step {s['step_seconds'] * 1e3:.0f} ms", f"{s['images_per_second']:.2f} img/s"]
    if s.get("mfu") is not None:
        parts.append(f"MFU {s['mfu'] * 100:.1f}%" + (f" ({s['mfu_of_fp8_ceiling'] * 100:.1f}% of FP8's)"
                                                     if s.get("mfu_of_fp8_ceiling") else ""))
    if s.get("of_mixed_ceiling"):
        parts.append(f"{s['of_mixed_ceiling'] * 100:.0f}% of the mixed ceiling ({s['mixed_ceiling_images_per_second']:.2f} img/s)")
    if s.get("batch_size_choice"):
        parts.append(f"batch {s['batch_size']} ({s['batch_size_choice']})")
    if s.get("peak_mem_gib") is not None:
        parts.append(f"peak {s['peak_mem_gib']:.1f} GiB")
    if "profile" in s:
        busy = s["profile"]["busy_ms_per_step"]
        parts.append(", ".join(f"{kind} {ms / busy * 100:.0f}%" for kind, ms in s["profile"]["ms_per_step_by_kind"].items()))
    if "phases" in s:
        parts.append(", ".join(f"{phase} {ms:.0f} ms" for phase, ms in s["phases"]["ms_per_step_by_phase"].items()))
    if "reference" in r:
        parts.append(f"reference {r['reference']['step_seconds'] * 1e3:.0f} ms ({r['speedup_vs_reference']:.2f}x)")
    for rung in r.get("reference_ladder", []):
        parts.append(f"+{rung['levers'][-1]} {rung['step_seconds'] * 1e3:.0f} ms")
    if "forward_flops_counted" in r:
        parts.append(f"fwd {r['forward_flops_counted'] / 1e12:.2f} TFLOP (formula {r['forward_flops_formula'] / 1e12:.2f}), "
                     f"{r['forward_seconds_eager'] * 1e3:.0f} ms eager")
    return " | ".join(parts)


def table(results: list[dict]) -> str:
    return "\n".join(summary_line(r) for r in results)


if __name__ == "__main__":
    main()
