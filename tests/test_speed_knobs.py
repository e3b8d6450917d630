"""The speed knobs of the step: FP8 matmuls (values against hand computation, refusals before any model loads) and
BATCH_SIZE="auto" (the memory model by hand, a whole run on the CPU). Their GPU runs are in test_cuda.py."""

import contextlib
import json

import pytest
import torch

from conftest import run_main, tiny_args


def test_rows_are_quantised_to_e4m3_with_one_scale_each(distill):
    x = torch.tensor([[1.0, -2.0, 4.0, 0.0], [0.5, 0.0, 0.0, -0.25], [0.3, 0.1, -0.7, 0.2]])
    q, scale = distill.fp8_quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 1)
    assert scale.flatten().tolist() == pytest.approx([4 / 448, 0.5 / 448, 0.7 / 448])  # max |row| maps to 448
    assert q.float().abs().amax(1).tolist() == [448.0, 448.0, 448.0]
    assert torch.equal(q[:2].float() * scale[:2], x[:2])  # powers of two survive exactly
    assert ((q[2].float() * scale[2] - x[2]).abs() / x[2].abs()).max() <= 2**-4  # e4m3: 3 mantissa bits


def test_fp8_linear_is_the_product_of_its_dequantised_operands_and_passes_the_input_gradient(distill):
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 48).to(torch.bfloat16).requires_grad_(False)
    fp8 = distill.fp8_linear_module()(linear)
    assert fp8.weight_fp8.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == (1, 48)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    q, s = distill.fp8_quantize_rows(x.detach().reshape(-1, 32))
    weight = fp8.weight_fp8.float() * fp8.weight_scale.t()
    expected = (q.float() * s) @ weight.t() + linear.bias.float()
    y = fp8(x)
    assert y.shape == (2, 5, 48) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float().reshape(-1, 48), expected, atol=1e-2, rtol=1e-2)
    plain = linear(x.detach()).float()
    assert ((y.float() - plain).square().mean() / plain.square().mean()) < 2e-3
    grad = torch.randn(2, 5, 48, dtype=torch.bfloat16)
    y.backward(grad)
    torch.testing.assert_close(x.grad.float(), grad.float() @ weight, atol=2e-2, rtol=2e-2)


def test_fp8_puts_only_the_frozen_attention_and_mlp_linears_in_fp8(distill, tiny_path):
    from diffusers import SD3Transformer2DModel

    from peft import LoraConfig

    fp8_type = distill.fp8_linear_module()
    teacher = SD3Transformer2DModel.from_pretrained(tiny_path, subfolder="transformer").requires_grad_(False)
    copy = distill.fp8_copy(teacher)
    names = {n for n, m in copy.named_modules() if isinstance(m, fp8_type)}
    assert names and all(n.split(".")[2] in ("attn", "attn2", "ff", "ff_context") for n in names)
    assert "transformer_blocks.0.norm1.linear" not in names and "proj_out" not in names
    assert not any(isinstance(m, fp8_type) for m in teacher.modules())  # the original keeps its bf16 linears
    x, embeds, pooled = torch.randn(2, 4, 16, 16), torch.randn(2, 12, 32), torch.randn(2, 64)
    ref = distill.predict_velocity(teacher, x, 500.0, embeds, pooled, torch.float32)
    out = distill.predict_velocity(copy, x, 500.0, embeds, pooled, torch.float32)
    assert 0 < float((out - ref).square().mean() / ref.square().mean()) < 1e-3
    student = SD3Transformer2DModel.from_pretrained(tiny_path, subfolder="transformer").requires_grad_(False)
    student.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["attn.to_q", "attn.to_k"]))
    converted = distill.convert_to_fp8(student)  # LoRA: the adapters stay, their frozen base goes to FP8
    layer = student.transformer_blocks[0].attn.to_q
    assert isinstance(layer.base_layer, fp8_type) and converted == len(names)
    assert all(p.requires_grad for n, p in layer.named_parameters() if "lora_" in n)


def test_fp8_asked_for_without_such_a_gpu_is_refused_before_any_model_loads(tmp_path, distill, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "none is visible here" in distill.fp8_problem()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    assert "NVIDIA A100-SXM4-40GB has 8.0" in distill.fp8_problem()
    if torch.cuda.is_available():
        return
    result = run_main(distill, *tiny_args(tmp_path, "--TEACHER_FP8=true", "--STUDENT_FP8=true", "--TRAINABLE=all"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "TEACHER_FP8/STUDENT_FP8 need a CUDA GPU with FP8 tensor cores" in result.stderr
    assert "STUDENT_FP8=True puts the student's frozen base weights in FP8, so it needs TRAINABLE='lora'" in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "checkpoints").exists()


def test_batch_settings_are_checked_and_the_old_accumulation_knob_is_named(distill):
    with pytest.raises(distill.UserError, match=r"BATCH_SIZE=3 must be 'auto' or a whole number that divides IMAGES_PER_STEP=4"):
        distill.validate_config(distill.parse_args(["--preset", "tiny", "--IMAGES_PER_STEP=4", "--BATCH_SIZE=3"]))
    with pytest.raises(distill.UserError, match=r"--GRAD_ACCUM_STEPS is gone: .* set IMAGES_PER_STEP"):
        distill.parse_args(["--GRAD_ACCUM_STEPS=4"])
    assert distill.parse_args(["--BATCH_SIZE=2", "--TEACHER_FP8=auto"])["BATCH_SIZE"] == 2
    assert distill.parse_args(["--BATCH_SIZE=auto"])["BATCH_SIZE"] == "auto"
    a, b = (distill.parse_args(["--BATCH_SIZE=" + v]) for v in ("auto", "2"))
    assert distill.config_fingerprint(a) == distill.config_fingerprint(b)  # memory only: a run resumes with another


def test_the_largest_divisor_that_fits_by_the_linear_memory_model(distill):
    # m(b) = m1 + (b - 1)(m2 - m1): 10 GiB at 1, 14 at 2 -> 18 at 3, 22 at 4, 38 at 8
    assert distill.largest_fitting_batch(8, 10.0, 14.0, 40.0) == 8
    assert distill.largest_fitting_batch(8, 10.0, 14.0, 37.9) == 4  # 38 > 37.9; 3 does not divide 8
    assert distill.largest_fitting_batch(6, 10.0, 14.0, 29.9) == 3  # m(6) = 30
    assert distill.largest_fitting_batch(8, 10.0, None, 100.0) == 1  # batch 2 ran out of memory
    assert distill.largest_fitting_batch(4, 10.0, 14.0, 5.0) == 1  # never less than one


def test_auto_batch_resolves_runs_and_says_why(tmp_path, distill):
    result = run_main(distill, *tiny_args(tmp_path, "--RUN_NAME=r", "--MAX_STEPS=4", "--IMAGES_PER_STEP=4", "--LOG_EVERY=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("batch 4 images per rollout, 1 rollout(s) per step, per process; auto: all 4 images in one rollout, as the "
            "CPU has no GPU memory to fit") in result.stdout
    assert "pace: " in result.stdout + result.stderr and "1,000 steps take about" in result.stdout + result.stderr
    summary = json.loads((tmp_path / "runs" / "r" / "train_summary.json").read_text())
    assert summary["batch_size"] == 4 and summary["batch_size_choice"].startswith("auto: all 4 images")
    assert summary["config"]["BATCH_SIZE"] == 4 and summary["final_metrics"]["images_per_sec"] > 0
    rows = [json.loads(line) for line in (tmp_path / "metrics" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["images_per_sec"] == pytest.approx(4 / r["sec_per_step"], rel=0.2) for r in rows)


def test_checkpoint_sizes_by_hand(distill):
    assert distill.checkpoint_gb(2_000_000_000) == 24.0  # SD3-medium's 2B weights, each with two Adam moments, fp32
    line = distill.checkpoint_line({"KEEP_LAST_CHECKPOINTS": 3, "KEEP_CHECKPOINTS_GB": 0}, 2_000_000_000)
    assert line.startswith("  checkpoints about 24 GB each, 96 GB kept (3 + final.pt); a free Google Drive holds 15 GB")
    assert distill.checkpoint_line({"KEEP_LAST_CHECKPOINTS": 3, "KEEP_CHECKPOINTS_GB": 0}, 18_874_368) == (
        "  checkpoints about 226 MB each, 906 MB kept (3 + final.pt)")  # LoRA r32 on SD3-medium's attention
    capped = distill.checkpoint_line({"KEEP_LAST_CHECKPOINTS": 3, "KEEP_CHECKPOINTS_GB": 50}, 2_000_000_000)
    assert capped.startswith("  checkpoints about 24 GB each, 72 GB kept (2 + final.pt, at most 50 GB by "
                             "KEEP_CHECKPOINTS_GB); a free Google Drive")
    assert "1 + final.pt" in distill.checkpoint_line({"KEEP_LAST_CHECKPOINTS": 3, "KEEP_CHECKPOINTS_GB": 10}, 2_000_000_000)


def test_checkpoints_kept_by_size(tmp_path, distill):
    """KEEP_CHECKPOINTS_GB drops the oldest step files while those kept pass the cap, never the newest; final.pt
    and what lies outside the run's folder stay."""
    import torch

    paths = distill.RunPaths(tmp_path, "r")
    paths.checkpoints.mkdir(parents=True)
    (paths.checkpoints / "final.pt").write_bytes(b"x" * 10)
    (tmp_path / "step_1.pt").write_bytes(b"not the run's")
    folder = distill.CheckpointDir(paths, keep=10)

    def save(step, size):
        def write(path):
            torch.save({"format": "onpolicy-distill-v1", "step": step, "pad": torch.zeros(size // 4, dtype=torch.int32)},
                       path)
        folder.save(f"step_{step}.pt", step, "running", "f", write)
        return sorted(p.name for p in paths.checkpoints.glob("step_*.pt"))

    assert save(1, 1000) == ["step_1.pt"]
    folder.keep_gb = 2.5 * (paths.checkpoints / "step_1.pt").stat().st_size / 1e9  # two such files fit
    assert save(2, 1000) == ["step_1.pt", "step_2.pt"]
    assert save(3, 1000) == ["step_2.pt", "step_3.pt"]
    assert save(4, 8000) == ["step_4.pt"]  # over the cap alone: the newest stays
    assert (paths.checkpoints / "final.pt").is_file() and (tmp_path / "step_1.pt").read_bytes() == b"not the run's"


def test_pace_line(distill):
    assert distill.pace_line(2.0, 500) == "pace: 2.00 s per optimizer step, so 1,000 steps take about 33 min and the 500 steps left about 17 min"
    assert distill.pace_line(0.05, 10).endswith("1,000 steps take about 50 s and the 10 steps left about 0 s")
    assert "about 2.8 h" in distill.pace_line(10.0, 0)


def test_whole_fp8_runs_where_fp8_is_emulated(tmp_path, distill):
    """The FP8 paths of a run on the CPU (DISTILL_FP8_ON_CPU=1: torch emulates the products): an FP8 teacher copy beside
    the LoRA student's base, then one FP8 base for both (the teacher is then the student with adapters off)."""
    for name, fp8 in (("copy", ["--TEACHER_FP8=true"]), ("shared", ["--TEACHER_FP8=true", "--STUDENT_FP8=true"])):
        result = run_main(distill, *tiny_args(tmp_path, f"--RUN_NAME={name}", "--MAX_STEPS=3", "--TRAINABLE=lora", *fp8),
                            env={"DISTILL_FP8_ON_CPU": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        assert "(float32, FP8 matmuls), student " in result.stdout
        summary = json.loads((tmp_path / "runs" / name / "train_summary.json").read_text())
        assert summary["status"] == "finished" and summary["teacher_fp8"]
        assert summary["student_fp8"] == summary["shares_teacher_weights"] == (name == "shared")
        assert summary["eval_gap_last"] == summary["eval_gap_last"]  # not NaN


def test_teacher_fp8_auto_is_off_without_a_gpu_that_has_fp8(distill, monkeypatch):
    """The default: off on the CPU, even where FP8 is emulated there for tests (it is on only where a GPU has it:
    tests/test_cuda.py checks that on the GPU)."""
    assert distill.default_config()["TEACHER_FP8"] == "auto"
    cpu = torch.device("cpu")
    assert distill.teacher_fp8_enabled("auto", cpu) is False and distill.teacher_fp8_enabled(False, cpu) is False
    monkeypatch.setenv("DISTILL_FP8_ON_CPU", "1")
    assert distill.teacher_fp8_enabled("auto", cpu) is False and distill.teacher_fp8_enabled(True, cpu) is True


def test_gradient_checkpointing_recomputes_the_teachers_pass_with_the_adapters_off(distill, tiny_path):
    """With shared weights the teacher is the student with its adapters off, and the adversarial term's gradient flows
    through it to the sample; the backward runs after the adapters are back on. Checkpointing must recompute each block
    as it ran (diffusers' own checkpointing raised torch's CheckpointError here)."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    def input_gradient(checkpointing: bool, adapters_off: bool = True):
        model = SD3Transformer2DModel.from_pretrained(tiny_path, subfolder="transformer").requires_grad_(False)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["attn.to_q", "attn.to_v"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))  # adapters that matter
        if checkpointing:
            model.enable_gradient_checkpointing(distill.checkpoint_as_in_forward)
        model.train()
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        embeds, pooled = torch.ones(2, 12, 32), torch.ones(2, 64)
        with distill.adapters_disabled(model) if adapters_off else contextlib.nullcontext():
            v = distill.predict_velocity(model, x, 500.0, embeds, pooled, torch.float32)
        v.square().sum().backward()
        return x.grad

    reference = input_gradient(False)
    assert torch.allclose(input_gradient(True), reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(input_gradient(False, adapters_off=False), reference, rtol=1e-3)  # the adapters matter


def test_adam_8bit_halves_the_checkpoint_and_trains_or_is_refused_without_bitsandbytes(tmp_path, distill, tiny_root):
    """ADAM_8BIT: bitsandbytes' AdamW8bit, whose moments take 2 bytes per weight instead of 8 (checkpoint 6 x params
    bytes, not 12). Where bitsandbytes is installed a tiny run trains with it and its checkpoint holds the 8-bit moments;
    where it is not, the setting is refused before any model loads, with the fix."""
    import importlib.util

    import torch

    assert distill.checkpoint_gb(2_000_000_000, adam_8bit=True) == 12.0
    assert "or with ADAM_8BIT=True" in distill.checkpoint_line({"KEEP_LAST_CHECKPOINTS": 3, "KEEP_CHECKPOINTS_GB": 0},
                                                               2_000_000_000)
    assert distill.checkpoint_line({"KEEP_LAST_CHECKPOINTS": 3, "KEEP_CHECKPOINTS_GB": 0, "ADAM_8BIT": True},
                                   2_000_000_000).startswith("  checkpoints about 12 GB each, 48 GB kept")
    args = tiny_args(tiny_root, f"--OUTPUT_ROOT={tmp_path}", "--RUN_NAME=r", "--ADAM_8BIT=true", "--MAX_STEPS=2",
                     "--EVAL_EVERY=0", "--EXPORT_DIFFUSERS=false")
    result = run_main(distill, *args)
    if importlib.util.find_spec("bitsandbytes") is None:
        assert result.returncode == 2 and "ADAM_8BIT=True needs bitsandbytes, which is not installed" in result.stderr
        assert not (tmp_path / "runs" / "r").exists()
        return
    assert result.returncode == 0, result.stderr[-2000:]
    payload = torch.load(tmp_path / "checkpoints" / "r" / "final.pt", map_location="cpu", weights_only=False)
    states = [s.get("__bnb_optimizer_quant_state__", s) for s in payload["optimizer"]["state"].values()]
    moments = [s["state1"] for s in states if "state1" in s]
    assert moments and any(m.dtype == torch.uint8 for m in moments)


def test_a_one_step_lora_run_adapts_the_mlps_and_says_so(tmp_path, distill, tiny_root):
    """LORA_TARGET_MODULES="auto" at K = 1: the header names the layers, and the student's checkpoint holds adapters on
    the MLPs beside attention's."""
    import torch

    result = run_main(distill, *tiny_args(tiny_root, f"--OUTPUT_ROOT={tmp_path}", "--RUN_NAME=r", "--TRAINABLE=lora",
                                          "--NUM_ROLLOUT_STEPS=1", "--MAX_STEPS=1", "--EVAL_EVERY=0",
                                          "--EXPORT_DIFFUSERS=false"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"(lora r32 on {distill.LORA_ATTENTION},{distill.LORA_MLPS})" in result.stdout
    student = torch.load(tmp_path / "checkpoints" / "r" / "final.pt", weights_only=True)["student"]
    assert any(".ff.net.0.proj.lora_A." in k for k in student) and any(".attn.to_q.lora_A." in k for k in student)
