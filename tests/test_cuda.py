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
