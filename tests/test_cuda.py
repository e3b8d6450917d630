"""CUDA paths: mixed precision, compilation, fused AdamW, generators on the GPU. Skipped without CUDA."""

import json

import pytest
import torch

from conftest import run_script, tiny_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("extra", [
    ["--MIXED_PRECISION=bf16", "--TEACHER_DTYPE=bfloat16", "--TRAINABLE=all", "--COMPILE=true"],
    ["--MIXED_PRECISION=fp16", "--TEACHER_DTYPE=float16", "--TRAINABLE=lora", "--COMPILE=false"],
    ["--MIXED_PRECISION=auto", "--TEACHER_DTYPE=auto", "--TRAINABLE=lora", "--GRADIENT_CHECKPOINTING=true",
     "--ATTENTION_BACKEND=flash", "--COMPILE=false"],
])
def test_tiny_run_on_cuda(tmp_path, extra):
    result = run_script(*tiny_args(tmp_path, "--RUN_NAME=r", "--MAX_STEPS=12", *extra))
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "runs" / "r" / "train_summary.json").read_text())
    assert summary["status"] == "finished" and summary["device"].startswith("cuda")
    assert summary["skipped_steps"] <= 2  # fp16's scaler may skip its first steps
    assert summary["final_metrics"]["peak_mem_gb"] > 0
    assert summary["eval_gap_last"] == summary["eval_gap_last"]  # not NaN


def test_flash_attention_4_agrees_with_cudnn_and_auto_restores_pytorchs_kernel(distill):
    problem = distill.flash_attention_4_problem()
    if problem:
        pytest.skip(problem)
    q, k, v = (torch.randn(2, 24, 333 + 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)

    def attention_and_grads(backend):
        distill.set_attention_backend(backend)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        return [out, *grads], torch.nn.attention.current_flash_attention_impl()

    reference, impl = attention_and_grads("cudnn")
    assert impl is None
    fa4, impl = attention_and_grads("fa4")
    assert impl == "FA4"
    for a, b in zip(fa4, reference):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    distill.set_attention_backend("auto")
    assert torch.nn.attention.current_flash_attention_impl() is None


def test_tiny_run_with_flash_attention_4_compiled(tmp_path, distill):
    problem = distill.flash_attention_4_problem()
    if problem:
        pytest.skip(problem)
    result = run_script(*tiny_args(tmp_path, "--RUN_NAME=r", "--MAX_STEPS=6", "--ATTENTION_BACKEND=fa4",
                                   "--MIXED_PRECISION=bf16", "--TEACHER_DTYPE=bfloat16", "--TRAINABLE=all", "--COMPILE=true"))
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "runs" / "r" / "train_summary.json").read_text())
    assert summary["status"] == "finished" and summary["skipped_steps"] == 0
    assert summary["eval_gap_last"] == summary["eval_gap_last"]  # not NaN


def test_fp8_teacher_and_student_with_the_batch_chosen_to_fit(tmp_path, distill):
    """FP8 on a GPU that has it: the teacher as an FP8 copy beside the LoRA student's bf16 base, then one FP8 base
    for both; BATCH_SIZE="auto" measured on the GPU (the tiny model fits the whole step in one rollout)."""
    if problem := distill.fp8_problem():
        pytest.skip(problem)
    for name, fp8 in (("copy", ["--TEACHER_FP8=true"]), ("shared", ["--TEACHER_FP8=true", "--STUDENT_FP8=true"])):
        result = run_script(*tiny_args(tmp_path, f"--RUN_NAME={name}", "--MAX_STEPS=8", "--TRAINABLE=lora",
                                       "--MIXED_PRECISION=bf16", "--TEACHER_DTYPE=bfloat16", "--COMPILE=true",
                                       "--IMAGES_PER_STEP=4", "--BATCH_SIZE=auto", *fp8))
        assert result.returncode == 0, result.stderr[-4000:]
        summary = json.loads((tmp_path / "runs" / name / "train_summary.json").read_text())
        assert summary["teacher_fp8"] and summary["student_fp8"] == (name == "shared")
        assert summary["shares_teacher_weights"] == (name == "shared")
        assert summary["batch_size"] == 4 and summary["batch_size_choice"].startswith("auto: peak memory")
        assert summary["skipped_steps"] == 0 and summary["eval_gap_last"] < summary["eval_gap_before"]


def test_fp8_linear_on_the_gpu_matches_its_dequantised_product(distill):
    if problem := distill.fp8_problem():
        pytest.skip(problem)
    linear = torch.nn.Linear(256, 512, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    fp8 = distill.fp8_linear_module()(linear)
    x = torch.randn(3, 100, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, s = distill.fp8_quantize_rows(x.detach().reshape(-1, 256))
    expected = (q.float() * s) @ (fp8.weight_fp8.float() * fp8.weight_scale.t()).t() + linear.bias.float()
    y = fp8(x)
    torch.testing.assert_close(y.float().reshape(-1, 512), expected, atol=2e-2, rtol=2e-2)
    assert ((y.float() - linear(x.detach()).float()).square().mean() / linear(x.detach()).float().square().mean()) < 2e-3
    y.sum().backward()  # the input's gradient through the dequantised weight
    torch.testing.assert_close(x.grad.float(), (fp8.weight_fp8.float() * fp8.weight_scale.t()).sum(0).expand_as(x),
                               atol=2e-2, rtol=2e-2)


def test_teacher_fp8_auto_is_on_where_the_gpu_has_fp8(distill):
    expected = torch.cuda.get_device_capability() >= (8, 9)
    assert distill.teacher_fp8_enabled("auto", torch.device("cuda")) is expected
