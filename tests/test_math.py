"""The formulas of the rollout and the losses, against hand computation and diffusers."""

import math

import pytest
import torch


def test_epsilon_and_x0_from_velocity_invert_the_forward_process(distill):
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    sigma = 0.3
    x_t = (1 - sigma) * x0 + sigma * eps
    v = eps - x0
    assert torch.allclose(distill.epsilon_from_velocity(x_t, sigma, v), eps, atol=1e-6)
    assert torch.allclose(distill.x0_from_velocity(x_t, sigma, v), x0, atol=1e-6)


def test_epsilon_and_latent_mse_by_hand(distill):
    x = torch.tensor([1.0, -2.0])
    v_s, v_t = torch.tensor([0.5, 1.0]), torch.tensor([0.0, 3.0])
    sigma = 0.25
    # eps_hat = x + 0.75 v: student [1.375, -1.25], teacher [1.0, 0.25] -> diffs [0.375, -1.5]
    assert distill.epsilon_mse(x, sigma, v_s, v_t).item() == pytest.approx((0.375**2 + 1.5**2) / 2)
    # x0_hat = x - 0.25 v: student [0.875, -2.25], teacher [1.0, -2.75] -> diffs [-0.125, 0.5]
    assert distill.latent_mse(x, sigma, v_s, v_t).item() == pytest.approx((0.125**2 + 0.5**2) / 2)


def test_sde_noise_scale_and_mean_by_hand(distill):
    # sigma = 0.5, next 0.25, eta 0.7: s = 0.7 * sqrt(0.5 / 0.5) = 0.7, Delta = 0.25
    assert distill.sde_noise_scale(0.5, 0.25, 0.7) == pytest.approx(0.7)
    # sigma = 1 uses the next sigma in the denominator: 0.7 * sqrt(1 / (1 - 0.75))
    assert distill.sde_noise_scale(1.0, 0.75, 0.7) == pytest.approx(0.7 * 2.0)
    x, v = torch.tensor([2.0]), torch.tensor([1.0])
    s2, delta = 0.49, 0.25
    expected = 2.0 * (1 - s2 * delta / (2 * 0.5)) - 1.0 * (1 + s2 * 0.5 / (2 * 0.5)) * delta
    assert distill.sde_transition_mean(x, v, 0.5, 0.25, 0.7).item() == pytest.approx(expected)


def test_sde_step_with_no_noise_tends_to_euler_as_eta_vanishes(distill):
    x, v = torch.randn(5), torch.randn(5)
    euler = distill.euler_step(x, v, 0.6, 0.4)
    assert torch.allclose(distill.sde_step(x, v, 0.6, 0.4, 1e-8, torch.randn(5)), euler, atol=1e-6)
    assert torch.allclose(euler, x - 0.2 * v)


def test_kl_by_hand(distill):
    x = torch.zeros(2)
    v_s, v_t = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    sigma, nxt, eta = 0.5, 0.25, 0.7
    s2, delta = 0.49, 0.25
    coef = (1 + s2 * (1 - sigma) / (2 * sigma)) * delta  # mean moves by -coef * v
    expected = (coef**2 / 2) / (2 * s2 * delta)  # mean over the 2 elements
    assert distill.transition_kl(x, sigma, nxt, eta, v_s, v_t).item() == pytest.approx(expected)


def test_kl_matches_monte_carlo_of_the_two_gaussian_transitions(distill):
    torch.manual_seed(0)
    x, v_s, v_t = torch.randn(8), torch.randn(8), torch.randn(8)
    sigma, nxt, eta = 0.8, 0.55, 0.7
    std = distill.sde_noise_scale(sigma, nxt, eta) * math.sqrt(sigma - nxt)
    mu_s = distill.sde_transition_mean(x, v_s, sigma, nxt, eta)
    mu_t = distill.sde_transition_mean(x, v_t, sigma, nxt, eta)
    p, q = torch.distributions.Normal(mu_s, std), torch.distributions.Normal(mu_t, std)
    samples = p.sample((200_000,))
    monte_carlo = (p.log_prob(samples) - q.log_prob(samples)).mean()  # mean over draws and the 8 elements
    closed = distill.transition_kl(x, sigma, nxt, eta, v_s, v_t)
    assert closed.item() == pytest.approx(monte_carlo.item(), rel=0.03)
    assert closed.item() == pytest.approx(torch.distributions.kl_divergence(p, q).mean().item(), rel=1e-5)


def test_kl_warmup_ramps_linearly(distill):
    assert distill.kl_weight_at(0, 2.0, 10) == 0.0
    assert distill.kl_weight_at(5, 2.0, 10) == pytest.approx(1.0)
    assert distill.kl_weight_at(10, 2.0, 10) == 2.0
    assert distill.kl_weight_at(50, 2.0, 10) == 2.0
    assert distill.kl_weight_at(0, 2.0, 0) == 2.0


def test_guided_velocity(distill):
    assert distill.guided_velocity(torch.tensor(1.0), torch.tensor(3.0), 4.0).item() == 9.0


@pytest.mark.parametrize("shift", [None, 5.0])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_rollout_sigmas_are_the_diffusers_schedulers(distill, tiny_path, shift, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = distill.load_scheduler_config(tiny_path, {"TEACHER_REVISION": None, "COLAB_MODEL_CACHE": ""})
    sigmas, timesteps = distill.sampler_sigmas(config, steps, shift, image_seq_len=64)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_path, subfolder="scheduler",
                                                                **({} if shift is None else {"shift": shift}))
    scheduler.set_timesteps(steps)
    assert torch.equal(sigmas, scheduler.sigmas) and torch.equal(timesteps, scheduler.timesteps)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == steps + 1


def test_sigmas_follow_the_shift_formula(distill):
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    sigmas, _ = distill.sampler_sigmas(config, 4, None, 64)
    # diffusers spaces the unshifted sigmas from 1 to its smallest training sigma, itself the shifted 1/1000
    smallest = 3 * 0.001 / (1 + 2 * 0.001)
    plain = torch.linspace(1.0, smallest, 4)
    assert torch.allclose(sigmas[:-1], 3 * plain / (1 + 2 * plain))


def test_choose_supervised(distill):
    import random

    assert distill.choose_supervised(4, 0, random.Random(0)) == {0, 1, 2, 3}
    chosen = distill.choose_supervised(8, 3, random.Random(0))
    assert len(chosen) == 3 and chosen <= set(range(8))
