"""The models: the built-in tiny SD3, the teacher sampler against diffusers' pipeline, the rollout,
and what training may and may not change."""

import hashlib
import itertools

import pytest
import torch
from accelerate import Accelerator


def tiny_config(distill, root, *extra):
    return distill.parse_args(["--preset", "tiny", f"--OUTPUT_ROOT={root}", *extra])


def test_tiny_model_is_a_complete_diffusers_folder(tiny_path):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                 "tokenizer_3", "scheduler"):
        assert getattr(pipe, name) is not None, name
    assert list(pipe.transformer.config.dual_attention_layers) == [0] and pipe.transformer.config.qk_norm == "rms_norm"
    ids = pipe.tokenizer_3("a photo of a cat").input_ids
    assert pipe.tokenizer_3.unk_token_id not in ids  # the T5 vocabulary was learned from the generator's prompts


def test_tiny_model_is_built_the_same_every_time(distill, tiny_path, tmp_path):
    again = distill.resolve_model_path(distill.TINY_MODEL_ID, str(tmp_path))

    def digest(folder):
        from pathlib import Path

        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(Path(folder).rglob("*.safetensors"))}

    assert digest(again) == digest(tiny_path) and len(digest(again)) == 5


def test_teacher_sampler_reproduces_the_diffusers_pipeline(distill, tiny_root, tiny_path):
    from diffusers import StableDiffusion3Pipeline

    config = tiny_config(distill, tiny_root)
    models, _ = distill.load_models(config, torch.device("cpu"))
    prompts = ["a photo of a cat, neon lights", "a watercolor of a lighthouse"]
    text = distill.encode_prompts_cached(prompts, tiny_path, config, torch.device("cpu"),
                                         tiny_root / "cache")
    noise = torch.randn(2, *models.latent_shape, generator=torch.Generator().manual_seed(0))
    steps, guidance = 12, 4.5
    sigmas, timesteps = distill.sampler_sigmas(models.scheduler_config, steps, None, models.image_seq_len)
    cond, uncond = text.batch([0, 1], "cpu", torch.float32), text.empty_batch(2, "cpu", torch.float32)
    with torch.no_grad():
        ours = distill.sample_latents(
            lambda x, t: distill.teacher_velocity(models.teacher, x, t, cond, uncond, guidance, torch.float32),
            noise, sigmas, timesteps)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    reference = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(),
                     height=32, width=32, output_type="latent", max_sequence_length=config["T5_MAX_LENGTH"]).images
    assert ours.shape == reference.shape == (2, 4, 16, 16)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
    assert (ours - noise).abs().mean() > 0.1  # it did move


def test_cached_embeddings_equal_the_pipelines_and_are_reused(distill, tiny_root, tiny_path, monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    config = tiny_config(distill, tiny_root)
    models, _ = distill.load_models(config, torch.device("cpu"))
    text = distill.encode_prompts_cached(["a dog"], tiny_path, config, torch.device("cpu"),
                                         tiny_root / "cache")
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt("a dog", None, None, max_sequence_length=64)
    assert torch.allclose(text.embeds[0], embeds[0], atol=1e-5) and torch.allclose(text.pooled[0], pooled[0], atol=1e-5)
    assert torch.allclose(text.empty_embeds[0], neg[0], atol=1e-5)
    assert torch.allclose(text.empty_pooled[0], neg_pooled[0], atol=1e-5)
    assert text.embeds.shape[1] == 77 + 64
    # a second call finds everything on disk and loads no text encoder
    monkeypatch.setattr(StableDiffusion3Pipeline, "from_pretrained", lambda *a, **k: pytest.fail("encoders loaded"))
    again = distill.encode_prompts_cached(["a dog"], tiny_path, config, torch.device("cpu"),
                                          tiny_root / "cache")
    assert torch.equal(again.embeds, text.embeds)


def test_without_t5_the_t5_slot_is_zeros_as_in_the_pipeline(distill, tiny_root, tiny_path):
    config = tiny_config(distill, tiny_root, "--USE_T5=false")
    models, _ = distill.load_models(config, torch.device("cpu"))
    text = distill.encode_prompts_cached(["a dog"], tiny_path, config, torch.device("cpu"),
                                         tiny_root / "cache")
    assert text.embeds.shape == (1, 77 + 64, 32)
    assert torch.count_nonzero(text.embeds[0, 77:]) == 0 and torch.count_nonzero(text.embeds[0, :77]) > 0


def rollout_setup(distill, root, tiny_path, *extra):
    config = tiny_config(distill, root, *extra)
    accelerator = Accelerator(cpu=True)
    models, _ = distill.load_models(config, accelerator.device)
    texts = [p["prompt"] for p in distill.generate_prompts(8, 0)]
    text = distill.encode_prompts_cached(texts, tiny_path, config, accelerator.device, root / "cache")
    sigmas, timesteps = distill.sampler_sigmas(models.scheduler_config, config["NUM_ROLLOUT_STEPS"], None,
                                               models.image_seq_len)
    if config["BATCH_SIZE"] == "auto":  # as a run resolves it (on the CPU: all of IMAGES_PER_STEP at once)
        config["BATCH_SIZE"], _ = distill.choose_batch_size(models, accelerator, text, config, sigmas, timesteps)
    return config, accelerator, models, text, sigmas, timesteps


def test_every_loss_is_zero_when_the_student_is_the_teacher_and_guidance_is_1(distill, tiny_root, tiny_path):
    # one substep: the target is the teacher's own velocity, which the student (the teacher) matches
    config, accelerator, models, text, sigmas, timesteps = rollout_setup(
        distill, tiny_root, tiny_path, "--GUIDANCE_SCALE=1", "--KL_WARMUP_STEPS=0", "--TEACHER_SUBSTEPS=1")
    terms, counts, _ = distill.distill_step(models, accelerator, text, 0, config, sigmas, timesteps, 8)
    assert counts.tolist() == [1, 1, 1, 1]
    assert terms.abs().max().item() < 1e-10
    # with guidance the student is off the teacher at every state (eps_hat carries no signal at sigma = 1)
    config["GUIDANCE_SCALE"] = 3.0
    terms, _, _ = distill.distill_step(models, accelerator, text, 0, config, sigmas, timesteps, 8)
    assert (terms[:, 3] > 0).all() and (terms[1:, 2] > 0).all() and terms[0, 2] == 0


@pytest.mark.parametrize("spacing", ["trailing", "scheduler"])
def test_state_drift_is_zero_for_a_student_identical_to_its_teacher(distill, tiny_root, tiny_path, spacing):
    """LoRA at its start (B = 0) is the teacher; with guidance 1 and one substep the teacher's path is its own
    K-step sampler, so the states the student visits are the teacher's, exactly. A changed student drifts."""
    config, accelerator, models, text, _, _ = rollout_setup(
        distill, tiny_root, tiny_path, "--TRAINABLE=lora", "--GUIDANCE_SCALE=1", "--TEACHER_SUBSTEPS=1",
        f"--SAMPLER_SPACING={spacing}")
    sigmas, timesteps = distill.sampler_sigmas(models.scheduler_config, 4, None, models.image_seq_len, spacing)
    cond, uncond = text.batch([0, 1, 2], "cpu", torch.float32), text.empty_batch(3, "cpu", torch.float32)
    noise = torch.randn(3, *models.latent_shape, generator=torch.Generator().manual_seed(0))
    teacher = distill.teacher_path(models, config, cond, uncond, noise, sigmas)
    student = distill.student_trajectory(models, accelerator, cond, sigmas, timesteps, noise)
    assert distill.state_drift(student, teacher) == [0.0] * 4
    with torch.no_grad():
        for p in models.trainable:
            p.add_(0.05)
    moved = distill.state_drift(distill.student_trajectory(models, accelerator, cond, sigmas, timesteps, noise), teacher)
    assert all(d > 0 for d in moved)


@pytest.mark.parametrize("trainable", ["all", "lora", "blocks", "norms"])
def test_training_changes_only_the_trainable_weights(distill, tiny_root, tiny_path, trainable):
    config, accelerator, models, text, sigmas, timesteps = rollout_setup(
        distill, tiny_root, tiny_path, f"--TRAINABLE={trainable}", "--TRAIN_BLOCKS=-1:", "--LORA_RANK=4")
    teacher_before = {k: v.clone() for k, v in models.teacher.state_dict().items()}
    trainable_ids = {id(p) for p in models.trainable}
    named = dict(accelerator.unwrap_model(models.student).named_parameters())
    trainable_before = {n: p.detach().clone() for n, p in named.items() if id(p) in trainable_ids}
    frozen_before = {n: p.detach().clone() for n, p in named.items() if id(p) not in trainable_ids}
    optimizer, lr_scheduler = distill.build_optimizer(models.trainable, config, accelerator.device, 1)
    models.student, optimizer, lr_scheduler = accelerator.prepare(models.student, optimizer, lr_scheduler)
    for step in range(3):
        terms, counts, _ = distill.distill_step(models, accelerator, text, step, config, sigmas, timesteps, 8)
        _, finite = distill.apply_update(models, accelerator, optimizer, lr_scheduler, terms, counts, config, "no")
        assert finite
    # no teacher parameter reaches the optimizer
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == trainable_ids
    if models.shares_weights:  # the base weights are the teacher's: all frozen ones must be unchanged
        assert trainable == "lora" and models.teacher is accelerator.unwrap_model(models.student)
        assert all(".lora_" in n for n in trainable_before)
    else:
        assert all(torch.equal(v, models.teacher.state_dict()[k]) for k, v in teacher_before.items())
    now = dict(accelerator.unwrap_model(models.student).named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen_before.items())
    changed = [n for n, v in trainable_before.items() if not torch.equal(now[n], v)]
    assert len(changed) >= len(trainable_before) // 2, f"only {len(changed)} of {len(trainable_before)} changed"


def test_lora_teacher_is_the_base_model_with_adapters_off(distill, tiny_root, tiny_path):
    config, accelerator, models, text, sigmas, timesteps = rollout_setup(
        distill, tiny_root, tiny_path, "--TRAINABLE=lora", "--LORA_RANK=4")
    base = distill.load_transformer(tiny_path, None, torch.float32, "")
    with torch.no_grad():  # make the adapters matter
        for n, p in models.student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    x = torch.randn(2, *models.latent_shape)
    cond, uncond = text.batch([0, 1], "cpu", torch.float32), text.empty_batch(2, "cpu", torch.float32)
    with torch.no_grad(), models.teacher_context():
        v_teacher = distill.teacher_velocity(models.teacher, x, 700.0, cond, uncond, 3.0, torch.float32)
    with torch.no_grad():
        v_base = distill.teacher_velocity(base, x, 700.0, cond, uncond, 3.0, torch.float32)
        v_student = distill.predict_velocity(models.student, x, 700.0, cond[0], cond[1], torch.float32)
    assert torch.allclose(v_teacher, v_base, atol=1e-6)
    assert not torch.allclose(v_student, distill.predict_velocity(base, x, 700.0, cond[0], cond[1], torch.float32))


def test_incompatible_teacher_and_student_are_refused(distill):
    teacher = {"in_channels": 16, "out_channels": 16, "joint_attention_dim": 4096, "pooled_projection_dim": 2048,
               "patch_size": 2, "pos_embed_max_size": 192}
    with pytest.raises(distill.UserError, match="in_channels: teacher 16, student 4"):
        distill.check_compatible(teacher, {**teacher, "in_channels": 4}, 1024, 8)
    with pytest.raises(distill.UserError, match="at most 3072 pixels"):
        distill.check_compatible(teacher, teacher, 4096, 8)
    distill.check_compatible(teacher, teacher, 1024, 8)


def test_a_folder_that_is_not_a_diffusers_model_is_explained(distill, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(distill.UserError, match="not a diffusers SD3 folder"):
        distill.load_transformer(str(tmp_path), None, torch.float32, "")


def hand_written_target(distill, teacher, x, cond, uncond, guidance, sigmas, i, substeps, shift):
    """The teacher's guided Euler solve over student step i, written out: N substeps uniform in the
    unshifted coordinate u = sigma / (s - (s - 1) sigma), t = 1000 sigma, as the pipeline's timesteps."""
    s0, s1 = float(sigmas[i]), float(sigmas[i + 1])
    u0, u1 = s0 / (shift - (shift - 1) * s0), s1 / (shift - (shift - 1) * s1)
    grid = [s0] + [shift * u / (1 + (shift - 1) * u) for u in
                   (u0 + (u1 - u0) * k / substeps for k in range(1, substeps))] + [s1]
    y = x
    for a, b in zip(grid[:-1], grid[1:]):
        t = torch.full((x.shape[0],), a * 1000)
        v_u = teacher(hidden_states=y, timestep=t, encoder_hidden_states=uncond[0], pooled_projections=uncond[1]).sample
        v_c = teacher(hidden_states=y, timestep=t, encoder_hidden_states=cond[0], pooled_projections=cond[1]).sample
        y = y + (b - a) * (v_u + guidance * (v_c - v_u))
    return (x - y) / (s0 - s1)


@pytest.mark.parametrize("fraction,substeps", [(1.0, 1), (0.0, 1), (1.0, 3), (0.0, 3)])
def test_rollout_supervises_the_states_of_the_policy_it_follows(distill, tiny_root, tiny_path, fraction, substeps):
    """On-policy: the losses are taken at the states of the student's own trajectory; off-policy
    (ON_POLICY_FRACTION=0): at the teacher's. The target is the teacher's guided solve over each step
    in TEACHER_SUBSTEPS substeps. Checked by re-running each trajectory by hand."""
    config, accelerator, models, text, sigmas, timesteps = rollout_setup(
        distill, tiny_root, tiny_path, f"--ON_POLICY_FRACTION={fraction}", "--STOCHASTIC_ROLLOUT=false",
        "--KL_WARMUP_STEPS=0", f"--TEACHER_SUBSTEPS={substeps}", "--TEACHER_SOLVER=euler")  # as the hand-written one
    torch.manual_seed(0)
    with torch.no_grad():  # a student that differs from the teacher
        for p in models.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    terms, _, _ = distill.distill_step(models, accelerator, text, 3, config, sigmas, timesteps, 8)
    idx = distill.prompt_indices(3, 0, 0, 1, config["BATCH_SIZE"], 1, 8, config["SEED"])
    cond, uncond = text.batch(idx, "cpu", torch.float32), text.empty_batch(len(idx), "cpu", torch.float32)
    x = torch.randn((len(idx), *models.latent_shape), generator=distill.step_generator(config["SEED"], 3, 0, 0, "cpu"))
    for i in range(4):
        s, n = float(sigmas[i]), float(sigmas[i + 1])
        with torch.no_grad():
            v_t = hand_written_target(distill, models.teacher, x, cond, uncond, config["GUIDANCE_SCALE"], sigmas, i,
                                      substeps, models.scheduler_config["shift"])
            v_s = distill.predict_velocity(models.student, x, timesteps[i], cond[0], cond[1], torch.float32)
        expected = [distill.transition_kl(s, n, config["SAMPLER_ETA"], v_s, v_t), distill.epsilon_mse(x, s, v_s, v_t),
                    distill.latent_mse(x, s, v_s, v_t)]
        assert torch.allclose(terms[i, 1:4], torch.stack(expected), rtol=1e-3, atol=1e-9), i
        x = distill.euler_step(x, v_s if fraction == 1.0 else v_t, s, n)


def test_one_substep_gives_exactly_the_teachers_instantaneous_velocity(distill, tiny_root, tiny_path):
    config, accelerator, models, text, sigmas, timesteps = rollout_setup(distill, tiny_root, tiny_path)
    cond, uncond = text.batch([0, 1], "cpu", torch.float32), text.empty_batch(2, "cpu", torch.float32)
    x = torch.randn(2, *models.latent_shape)
    with torch.no_grad():
        for i, solver in itertools.product(range(len(timesteps)), ("euler", "ab2")):
            target = distill.teacher_target_velocity(
                lambda y, t: distill.teacher_velocity(models.teacher, y, t, cond, uncond, 3.0, torch.float32),
                x, sigmas, i, 1, 3.0, solver)
            assert torch.equal(target, distill.teacher_velocity(models.teacher, x, timesteps[i], cond, uncond, 3.0,
                                                                torch.float32))


def test_timesteps_reach_the_transformer_in_float32_as_the_pipelines_do(distill, tiny_path):
    """Under bf16 weights the transformer gets the same float32 timesteps from the script's samplers
    (the student's K steps, the teacher's substeps) as from StableDiffusion3Pipeline."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path, torch_dtype=torch.bfloat16)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["timestep"]),
                                               with_kwargs=True)
    steps = 4
    pipe("a cat", num_inference_steps=steps, guidance_scale=1.0, height=32, width=32, output_type="latent",
         max_sequence_length=16)
    from_pipeline, seen[:] = list(seen), []
    sigmas, timesteps = distill.sampler_sigmas(dict(pipe.scheduler.config), steps, None, 64)
    embeds, _, pooled, _ = pipe.encode_prompt("a cat", None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=16)
    noise = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        distill.sample_latents(lambda x, t: distill.predict_velocity(pipe.transformer, x, t, embeds, pooled,
                                                                     torch.bfloat16), noise, sigmas, timesteps)
    assert len(seen) == len(from_pipeline) == steps
    for ours, theirs in zip(seen, from_pipeline):
        assert ours.dtype == theirs.dtype == torch.float32 and torch.equal(ours, theirs)
    assert from_pipeline[1].item() != torch.tensor(from_pipeline[1].item(), dtype=torch.bfloat16).item()  # bf16 would round it
    seen.clear()
    with torch.no_grad():  # the teacher's substeps: t = 1000 sigma of each substep, in float32
        distill.teacher_target_velocity(lambda x, t: distill.predict_velocity(pipe.transformer, x, t, embeds, pooled,
                                                                              torch.bfloat16), noise, sigmas, 1, 3, 3.0)
    grid = distill.substep_sigmas(sigmas, 1, 3, 3.0)
    assert [t.dtype for t in seen] == [torch.float32] * 3
    assert torch.equal(torch.cat(seen), grid[:-1] * 1000) and torch.equal(seen[0], from_pipeline[1])


def test_student_leads_by_fraction(distill):
    import random

    assert distill.choose_student_leads(4, 1.0, random.Random(0)) == {0, 1, 2, 3}
    assert distill.choose_student_leads(4, 0.0, random.Random(0)) == set()
    draws = [len(distill.choose_student_leads(10, 0.3, random.Random(s))) for s in range(200)]
    assert 2.5 < sum(draws) / len(draws) < 3.5


@pytest.mark.parametrize("trainable", ["lora", "all"])
def test_lora_targets_that_match_no_layer_are_refused_with_the_layers_named(distill, tiny_root, trainable):
    """The student's adapter and DMD's fake score (also beside a student of all weights) take the same targets."""
    config = distill.parse_args(["--preset", "tiny", f"--OUTPUT_ROOT={tiny_root}", f"--TRAINABLE={trainable}",
                                 "--DMD_WEIGHT=1", "--LORA_TARGET_MODULES=attn.no_such_proj"])
    with pytest.raises(distill.UserError, match=r"LORA_TARGET_MODULES='attn.no_such_proj' names no layer of the model "
                                                r".*linear layers are: .*attn.to_q"):
        distill.load_models(config, torch.device("cpu"))


def test_prompts_are_encoded_before_any_transformer_loads(distill, tmp_path, monkeypatch):
    """The text encoders (T5's 4.7B weights on SD3) and the transformers are never loaded together."""
    from conftest import run_main, tiny_args

    loaded, load_transformer = [], distill.load_transformer

    def recording(*args, **kwargs):
        loaded.append(sorted(p.name for p in (tmp_path / "cache" / "text_embeddings").glob("*.pt")))
        return load_transformer(*args, **kwargs)

    monkeypatch.setattr(distill, "load_transformer", recording)
    result = run_main(distill, *tiny_args(tmp_path, "--RUN_NAME=r", "--MAX_STEPS=1", "--TRAINABLE=all"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(loaded) == 2 and all(len(names) == 1 for names in loaded)  # teacher and student: the cache was there


def test_dmd_at_one_state_per_rollout_takes_the_whole_rollouts_share(distill, tiny_root, tiny_path):
    """DMD_STATES=1: DMD's step (and the fake score's sample) at one random supervised state per rollout, its term
    scaled by S / M, so that at the state chosen it is twice the term it has when both of K = 2 states take it; the
    other state takes none and leaves no sample for the fake score."""
    import random

    extra = ("--NUM_ROLLOUT_STEPS=2", "--DMD_WEIGHT=1", "--KL_WARMUP_STEPS=0", "--LORA_RANK=4")
    config, accelerator, models, text, sigmas, timesteps = rollout_setup(distill, tiny_root, tiny_path, *extra)
    for p in models.trainable:  # a student that differs from the teacher (LoRA starts as it)
        torch.nn.init.normal_(p, std=0.05)
    # the state the rollout of step `step` draws (after the supervised states and the student's leads, which draw
    # nothing at M = 0 and on-policy): pick a step where it is the first, whose draws are as with DMD at both
    step = next(s for s in range(20) if random.Random(config["SEED"] * 7919 + s * 31).sample(range(2), 1) == [0])
    every, every_samples = distill.distill_step(models, accelerator, text, step, config, sigmas, timesteps, 8)[::2]
    one, one_samples = distill.distill_step(models, accelerator, text, step, {**config, "DMD_STATES": 1}, sigmas,
                                            timesteps, 8)[::2]
    dmd = distill.LOSS_TERMS.index("dmd")
    assert (every[:, dmd] > 0).all() and one[1, dmd] == 0
    assert torch.allclose(one[0, dmd], 2 * every[0, dmd], rtol=1e-5)
    assert [i for _, _, i in every_samples.fake] == [0, 1] and [i for _, _, i in one_samples.fake] == [0]
    for p in models.trainable:
        p.grad = None
    # per image: 2 states x N = 4 substeps, + one real score, x 2 for guidance
    assert distill.teacher_passes_per_step({**config, "DMD_STATES": 1}) == config["IMAGES_PER_STEP"] * (2 * 4 + 1) * 2
