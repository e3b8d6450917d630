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


def test_ddim_noise_fraction_by_hand(distill):
    # SNR(0.5) = 1, SNR(0.25) = 9: rho = eta sqrt(1 - 1/9)
    assert distill.ddim_noise_fraction(0.5, 0.25, 0.7) == pytest.approx(0.7 * math.sqrt(8 / 9))
    assert distill.ddim_noise_fraction(1.0, 0.6, 0.7) == 0.7  # from pure noise (SNR 0)
    assert distill.ddim_noise_fraction(0.3, 0.0, 0.7) == 0.7  # to sigma = 0, where the step has no noise anyway
    assert distill.ddim_noise_fraction(0.5, 0.25, 0.0) == 0.0


def test_ddim_mean_and_step_by_hand(distill):
    x, v = torch.tensor([2.0]), torch.tensor([1.0])
    sigma, nxt, eta = 0.5, 0.25, 0.7
    rho = 0.7 * math.sqrt(8 / 9)
    x0, eps = 2.0 - 0.5 * 1.0, 2.0 + 0.5 * 1.0
    mean = 0.75 * x0 + 0.25 * math.sqrt(1 - rho**2) * eps
    assert distill.ddim_transition_mean(x, v, sigma, nxt, eta).item() == pytest.approx(mean)
    z = torch.tensor([1.5])
    assert distill.ddim_step(x, v, sigma, nxt, eta, z).item() == pytest.approx(mean + 0.25 * rho * 1.5)


def test_ddim_without_noise_is_the_euler_step(distill):
    x, v = torch.randn(5), torch.randn(5)
    euler = distill.euler_step(x, v, 0.6, 0.4)
    assert torch.allclose(distill.ddim_step(x, v, 0.6, 0.4, 0.0, torch.randn(5)), euler, atol=1e-6)
    assert torch.allclose(euler, x - 0.2 * v)


@pytest.mark.parametrize("eta", [0.7, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_rollout_states_carry_the_noise_they_are_labelled_with(distill, steps, eta):
    """An exact predictor for a one-point data set (x0 = c, so v = (x - c) / sigma): every state of the
    stochastic rollout must hold noise of std sigma_i, as its label says, at SD3's 4-step schedule too."""
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    sigmas, _ = distill.sampler_sigmas(config, steps, None, 64)
    generator = torch.Generator().manual_seed(0)
    c = torch.full((200_000,), 0.8)
    x = torch.randn(c.shape, generator=generator)
    for i in range(steps):
        sigma, nxt = float(sigmas[i]), float(sigmas[i + 1])
        x = distill.ddim_step(x, (x - c) / sigma, sigma, nxt, eta, torch.randn(c.shape, generator=generator))
        noise_std = (x - (1 - nxt) * c).std().item()
        if nxt > 0:
            assert noise_std == pytest.approx(nxt, rel=0.05), (i, noise_std, nxt)
        else:
            assert noise_std < 1e-5


def test_kl_by_hand(distill):
    x = torch.zeros(2)
    v_s, v_t = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    sigma, nxt, eta = 0.5, 0.25, 0.7
    rho = 0.7 * math.sqrt(8 / 9)
    coef = -(1 - nxt) * sigma + nxt * math.sqrt(1 - rho**2) * (1 - sigma)  # d mean / d v
    expected = (coef**2 / 2) / (2 * (nxt * rho) ** 2)  # mean over the 2 elements
    assert distill.transition_kl(x, sigma, nxt, eta, v_s, v_t).item() == pytest.approx(expected)
    assert distill.transition_kl(x, 0.3, 0.0, eta, v_s, v_t).item() == 0  # the last step has no variance


def test_kl_matches_monte_carlo_of_the_two_gaussian_transitions(distill):
    torch.manual_seed(0)
    x, v_s, v_t = torch.randn(8), torch.randn(8), torch.randn(8)
    sigma, nxt, eta = 0.8, 0.55, 0.7
    std = nxt * distill.ddim_noise_fraction(sigma, nxt, eta)
    mu_s = distill.ddim_transition_mean(x, v_s, sigma, nxt, eta)
    mu_t = distill.ddim_transition_mean(x, v_t, sigma, nxt, eta)
    p, q = torch.distributions.Normal(mu_s, std), torch.distributions.Normal(mu_t, std)
    samples = p.sample((200_000,))
    monte_carlo = (p.log_prob(samples) - q.log_prob(samples)).mean()  # mean over draws and the 8 elements
    closed = distill.transition_kl(x, sigma, nxt, eta, v_s, v_t)
    assert closed.item() == pytest.approx(monte_carlo.item(), rel=0.03)
    assert closed.item() == pytest.approx(torch.distributions.kl_divergence(p, q).mean().item(), rel=1e-5)


def test_substep_sigmas_by_hand(distill):
    sigmas = torch.tensor([1.0, 0.75, 0.0])
    assert torch.allclose(distill.substep_sigmas(sigmas, 0, 4, 1.0), torch.tensor([1.0, 0.9375, 0.875, 0.8125, 0.75]))
    # shift 3: u = sigma / (3 - 2 sigma) takes [0.75, 0] to [0.5, 0]; midpoint u = 0.25 -> 3 * 0.25 / 1.5 = 0.5
    grid = distill.substep_sigmas(sigmas, 1, 2, 3.0)
    assert grid.tolist() == [0.75, pytest.approx(0.5), 0.0] and grid.dtype == torch.float32
    assert grid[0] == sigmas[1] and grid[-1] == sigmas[2]


def test_teacher_target_is_the_average_velocity_of_its_euler_solve(distill):
    sigmas = torch.tensor([1.0, 0.6, 0.0])
    calls = []

    def velocity(y, t):  # any smooth, state- and time-dependent flow
        calls.append(float(t))
        return torch.sin(y) * t / 1000 + 0.3

    x = torch.randn(6)
    assert torch.equal(distill.teacher_target_velocity(velocity, x, sigmas, 0, 1, 3.0), velocity(x, torch.tensor(1000.0)))
    calls.clear()
    target = distill.teacher_target_velocity(velocity, x, sigmas, 0, 3, 1.0)
    y = x.clone()
    for a, b in ((1.0, 13 / 15), (13 / 15, 11 / 15), (11 / 15, 0.6)):
        y = y + (b - a) * (torch.sin(y) * a + 0.3)
    assert torch.allclose(target, (x - y) / 0.4, atol=1e-5)
    assert calls == pytest.approx([1000.0, 1000 * 13 / 15, 1000 * 11 / 15], rel=1e-6)


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
