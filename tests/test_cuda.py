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
