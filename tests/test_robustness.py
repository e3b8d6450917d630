"""Bad input and bad luck: full disks, Hub refusals, missing GPUs, leftovers of a killed run."""

import errno
import math

import pytest
import torch
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from conftest import run_main, tiny_args


def test_disk_full_keeps_the_previous_file_and_says_what_to_do(distill, tmp_path):
    path = tmp_path / "step_5.pt"
    path.write_text("previous")

    def write(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(distill.UserError, match=r"Could not write .*step_5.pt \(No space left on device\); its "
                                                r"previous version is intact.*KEEP_LAST_CHECKPOINTS.*run the same command"):
        distill.atomic_write(path, write)
    assert path.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["step_5.pt"]


@pytest.mark.parametrize("local_first", [True, False])
def test_atomic_write_places_the_whole_file(distill, tmp_path, local_first):
    path = tmp_path / "sub" / "final.pt"
    distill.atomic_write(path, lambda tmp: torch.save({"w": torch.arange(5)}, tmp), local_first=local_first)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(5))
    assert [p.name for p in path.parent.iterdir()] == ["final.pt"]


def hub_error(cls, message):
    """The Hub's own exception, wrapped in OSError as diffusers' from_pretrained re-raises it. (Made
    without its HTTP response, whose class differs between huggingface_hub versions.)"""
    try:
        try:
            raise cls.__new__(cls, message)
        except cls as inner:
            raise OSError("x is not a local folder and is not a valid model identifier") from inner
    except OSError as outer:
        return outer


def test_gated_model_without_a_token(distill, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    err = distill.explain_load_error("stabilityai/stable-diffusion-3.5-large", hub_error(GatedRepoError, "gated"))
    assert "no Hugging Face token is set" in str(err) and "HF_TOKEN" in str(err)


def test_gated_model_whose_licence_is_not_accepted(distill, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    err = distill.explain_load_error("stabilityai/stable-diffusion-3.5-large", hub_error(GatedRepoError, "gated"))
    assert "has not accepted its licence" in str(err)
    assert "https://huggingface.co/stabilityai/stable-diffusion-3.5-large" in str(err) and "hf_x" not in str(err)


def test_missing_model_and_revision(distill):
    err = distill.explain_load_error("stabilityai/sd-typo", hub_error(RepositoryNotFoundError, "404"))
    assert "was not found on the Hugging Face Hub" in str(err)
    err = distill.explain_load_error("stabilityai/sd", hub_error(RevisionNotFoundError, "404"))
    assert "Revision not found" in str(err) and "TEACHER_REVISION" in str(err)


def test_unknown_model_id_is_refused_by_the_script_in_one_paragraph(tmp_path, distill):
    result = run_main(distill, *tiny_args(tmp_path, "--TEACHER_ID=no-such-user/no-such-model",
                                   "--STUDENT_ID=no-such-user/no-such-model"), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Could not load no-such-user/no-such-model" in result.stderr and "PREFETCH_MODELS" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_half_precision_without_a_gpu_is_refused(distill):
    config = distill.parse_args(["--preset", "tiny", "--MIXED_PRECISION=bf16"])
    with pytest.raises(distill.UserError, match="no CUDA GPU is visible.*Change runtime type"):
        distill.validate_config(config)


def test_out_of_memory_advice_names_the_knobs(distill):
    text = distill.out_of_memory_advice(distill.default_config())
    for knob in ("BATCH_SIZE='auto' -> 1 (IMAGES_PER_STEP stays", "GRADIENT_CHECKPOINTING=False -> True", "IMAGE_SIZE=1024 -> 512",
                 "checkpoint is intact"):
        assert knob in text


def test_over_long_prompts_are_named_once(tmp_path, distill):
    prompts = tmp_path / "mine.jsonl"
    long_prompt = "a cat " * 60
    prompts.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in [long_prompt] + [f"a dog {i}" for i in range(9)]))
    result = run_main(distill, *tiny_args(tmp_path, "--GENERATE_PROMPTS=false", f"--PROMPTS_JSONL={prompts}",
                                   "--HELDOUT_PROMPTS=2", "--MAX_STEPS=1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 prompt(s) exceed CLIP's 77 tokens and are truncated" in result.stdout


def test_a_step_the_fp16_gradient_scaler_drops_counts_as_skipped(distill):
    """Under fp16 an overflowing gradient is the scaler's to find: it skips the step and lowers its scale. That step
    must count as skipped (its row's grad_norm is inf), not as a good one; the next finite step is taken."""
    import types

    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler

    accelerator = Accelerator(cpu=True)
    weight = torch.nn.Parameter(torch.ones(3))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    optimizer = AcceleratedOptimizer(torch.optim.SGD([weight], lr=0.1), device_placement=False, scaler=scaler)
    lr_scheduler = AcceleratedScheduler(torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda s: 1.0 / (1 + s)),
                                        optimizer)  # as accelerator.prepare makes it
    models, config = types.SimpleNamespace(trainable=[weight]), {"MAX_GRAD_NORM": 1.0}
    terms, counts = torch.ones(1, 1), torch.ones(1)
    for factor, taken in ((3e38, False), (1.0, True)):  # 3e38 x 2^16 overflows fp32: an inf gradient
        before = weight.detach().clone()
        scaler.scale((weight * factor).sum()).backward()
        grad_norm, finite = distill.apply_update(models, accelerator, optimizer, lr_scheduler, terms, counts, config,
                                                 "fp16")
        assert finite is taken and torch.equal(weight.detach(), before) is not taken
        assert math.isfinite(grad_norm) is taken
    assert scaler.get_scale() == 2.0 ** 15  # lowered once, by the skipped step
    assert lr_scheduler.scheduler.last_epoch == 1  # only the step taken moved the schedule
