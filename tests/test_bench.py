"""The step benchmark keeps working: its tiny suite on the CPU, and its FLOP formula by hand."""

import json
import subprocess
import sys

from conftest import REPO


def test_tiny_benchmark_writes_its_result(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_distill_step.py"), "--suite", "tiny",
                             "--repeats", "2", "--warmup", "1", "--out", str(out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    script, reference = row["script"], row["reference"]
    assert script["step_seconds"] > 0 and reference["step_seconds"] > 0 and script["total_steps"] >= 3
    assert script["finite_steps"] == script["total_steps"] and script["step_flops"] > 0
    assert row["speedup_vs_reference"] == reference["step_seconds"] / script["step_seconds"]
    assert "tiny->tiny all b2 K4" in result.stdout


def test_formula_counts_projections_mlp_and_joint_attention():
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_distill_step as bench

    cfg = {"attention_head_dim": 1, "num_attention_heads": 2, "num_layers": 1}  # d = 2, one (last) block
    # image: 2*3*12*4 = 288; text (last block: q,k,v only): 2*1*3*4 = 24; attention: 4*(3+1)^2*2 = 128
    assert bench.formula_forward_flops(cfg, batch=1, image_tokens=3, text_tokens=1) == 288 + 24 + 128
    assert bench.formula_forward_flops(cfg, batch=2, image_tokens=3, text_tokens=1) == 2 * 440
