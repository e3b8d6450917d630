"""The step benchmark keeps working: its tiny suite on the CPU, its FLOP formula by hand, its kernel kinds."""

import json
import subprocess
import sys

import pytest
from conftest import REPO


def test_tiny_benchmark_writes_its_result(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_distill_step.py"), "--suite", "tiny",
                             "--repeats", "1", "--warmup", "1", "--out", str(out), "--profile"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    script, reference = row["script"], row["reference"]
    assert script["step_seconds"] > 0 and reference["step_seconds"] > 0 and script["total_steps"] >= 3
    assert script["finite_steps"] == script["total_steps"] and script["step_flops"] > 0
    assert row["speedup_vs_reference"] == reference["step_seconds"] / script["step_seconds"]
    images = 2 * 2  # IMAGES_PER_STEP 4: batch 2 x 2 accumulated rollouts
    assert script["images_per_second"] == images / script["step_seconds"]
    assert reference["images_per_second"] == images / reference["step_seconds"]
    assert "tiny->tiny all b2 (4 per step) K4 N2" in result.stdout
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_distill_step as bench

    ladder = row["reference_ladder"]  # the loop with the script's levers switched on one at a time
    assert [rung["levers"] for rung in ladder] == [list(bench.REFERENCE_LEVERS[:n]) for n in range(1, 6)]
    assert all(rung["step_seconds"] > 0 for rung in ladder)
    profile = script["profile"]  # on the CPU: self time of aten ops, which run inside the profiled steps
    assert profile["ms_per_step_by_kind"]["matmul"] > 0 and profile["ms_per_step_by_kind"]["attention"] > 0
    assert profile["busy_ms_per_step"] == pytest.approx(sum(profile["ms_per_step_by_kind"].values()))
    assert profile["busy_ms_per_step"] <= profile["profiled_step_ms"]
    phases = row["script"]["phases"]  # by phase: the teacher's substeps, the optimizer and the rest, adding up
    assert set(phases["ms_per_step_by_phase"]) == {"teacher substeps (the targets)", "optimizer (clip, AdamW)",
                                                   bench.REST_OF_STEP}
    assert sum(phases["ms_per_step_by_phase"].values()) == pytest.approx(phases["synchronised_step_ms"])
    assert all(ms > 0 for ms in phases["ms_per_step_by_phase"].values())


def test_formula_counts_projections_mlp_and_joint_attention():
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_distill_step as bench

    cfg = {"attention_head_dim": 1, "num_attention_heads": 2, "num_layers": 1}  # d = 2, one (last) block
    # image: 2*3*12*4 = 288; text (last block: q,k,v only): 2*1*3*4 = 24; attention: 4*(3+1)^2*2 = 128
    assert bench.formula_forward_flops(cfg, batch=1, image_tokens=3, text_tokens=1) == 288 + 24 + 128
    assert bench.formula_forward_flops(cfg, batch=2, image_tokens=3, text_tokens=1) == 2 * 440


def test_kernel_kinds_of_the_h100_profile():
    """Kernel names as torch.profiler reported them for the compiled SD3-medium step on the H100."""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_distill_step as bench

    kinds = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x": "attention",
        "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*, void const*, void*": "attention",
        "nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN": "matmul",
        "triton_poi_fused__scaled_dot_product_cudnn_attention_cat_transpose_view_3": "fused pointwise and norms (triton)",
        "triton_red_fused__to_copy_add_mul_native_layer_norm_split_unsqueeze_1": "fused pointwise and norms (triton)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, std:": "other",
        "aten::addmm": "matmul",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    }
    assert {name: bench.kernel_kind(name) for name in kinds} == kinds


def test_phases_are_timed_without_the_phases_inside_them():
    """A phase that calls another (the fake score's update draws fresh samples) is charged its own time only."""
    import time
    import types

    sys.path.insert(0, str(REPO / "scripts"))
    import bench_distill_step as bench
    import torch

    module = types.SimpleNamespace()
    module.fresh_student_samples = lambda: time.sleep(0.05)
    module.update_fake_score = lambda: (time.sleep(0.02), module.fresh_student_samples())
    for name in set(bench.PHASES) - {"fresh_student_samples", "update_fake_score"}:
        setattr(module, name, lambda: None)
    originals = dict(vars(module))
    phases = bench.time_by_phase(module, lambda: (module.update_fake_score(), time.sleep(0.01)), torch.device("cpu"),
                                 steps=2)["ms_per_step_by_phase"]
    assert phases["DMD: fresh student samples"] == pytest.approx(50, abs=15)
    assert phases["DMD: fake score update"] == pytest.approx(20, abs=10)
    assert phases[bench.REST_OF_STEP] == pytest.approx(10, abs=10)
    assert vars(module) == originals  # the script's functions are given back


def test_mixed_ceiling_by_hand():
    """K = 4, N = 2: 16 guided teacher passes of F FLOPs at the FP8 ceiling, the rest at bf16's."""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_distill_step as bench

    case = {"steps": 4, "substeps": 2, "teacher_fp8": True}
    best = bench.mixed_ceiling_images_per_second(case, flops_per_image=26e12, forward_flops_per_image=1e12,
                                                 ceiling=500, fp8_ceiling=1000)
    assert best == pytest.approx(1 / (16e12 / 1000e12 + 10e12 / 500e12))
    assert bench.mixed_ceiling_images_per_second(dict(case, teacher_fp8=False), 26e12, 1e12, 500, 1000) == \
        pytest.approx(1 / (26e12 / 500e12))


def test_fp8_per_tensor_scaling_by_hand():
    """s = amax |t| / 448 (e4m3's largest finite value), so the largest entry lands on 448 exactly and s q gives t back
    to e4m3's 3 mantissa bits (relative error at most 2^-4 on normal values)."""
    import torch

    sys.path.insert(0, str(REPO / "scripts"))
    import bench_distill_step as bench

    t = torch.tensor([[-3.5, 0.25], [1.0, 7.0]])
    q, s = bench.fp8_per_tensor(t)
    assert q.dtype == torch.float8_e4m3fn and float(s) == pytest.approx(7.0 / 448)
    assert float(q.float().abs().max()) == 448.0
    back = q.float() * s
    assert torch.all((back - t).abs() <= t.abs() / 16)


def test_a_lora_case_adapts_the_layers_a_run_at_its_k_adapts(distill):
    """The benchmark's config resolves the "auto" settings as a run's does: LoRA on attention at K = 4, the MLPs too
    at K = 1; a case's own layers win."""
    import torch

    import bench_distill_step as bench

    case = dict(teacher="tiny", student="tiny", image_size=32, text_len=109, steps=4, batch=2, trainable="lora")
    cpu = torch.device("cpu")
    assert bench.case_config(distill, case, cpu)["LORA_TARGET_MODULES"] == distill.LORA_ATTENTION
    assert bench.case_config(distill, dict(case, steps=1), cpu)["LORA_TARGET_MODULES"] == (
        f"{distill.LORA_ATTENTION},{distill.LORA_MLPS}")
    assert bench.case_config(distill, dict(case, lora_targets="attn.to_q"), cpu)["LORA_TARGET_MODULES"] == "attn.to_q"
