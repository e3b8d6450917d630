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
    v_s, v_t = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    sigma, nxt, eta = 0.5, 0.25, 0.7
    rho = 0.7 * math.sqrt(8 / 9)
    coef = -(1 - nxt) * sigma + nxt * math.sqrt(1 - rho**2) * (1 - sigma)  # d mean / d v
    expected = (coef**2 / 2) / (2 * (nxt * rho) ** 2)  # mean over the 2 elements
    assert distill.transition_kl(sigma, nxt, eta, v_s, v_t).item() == pytest.approx(expected)
    assert distill.transition_kl(0.3, 0.0, eta, v_s, v_t).item() == 0  # the last step has no variance


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
    closed = distill.transition_kl(sigma, nxt, eta, v_s, v_t)
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


def test_kl_is_its_step_weight_times_the_velocity_mse(distill):
    """The means of the two transitions differ by b (v_s - v_t), so KL = c mean (v_s - v_t)^2 with c = b^2 / (2 (sigma' rho)^2),
    whatever the state; c is what puts the KL far above the MSE terms (at the scheduler's 0.60 -> 0.009 step) or not."""
    torch.manual_seed(0)
    v_s, v_t = torch.randn(6), torch.randn(6)
    for sigma, nxt in ((0.75, 0.5), (0.6022, 0.0089), (1.0, 0.9)):
        c = distill.kl_step_weight(sigma, nxt, 0.7)
        assert distill.transition_kl(sigma, nxt, 0.7, v_s, v_t).item() == pytest.approx(c * (v_s - v_t).square().mean().item())
    assert distill.kl_step_weight(0.6022, 0.0089, 0.7) > 1000  # the scheduler's 4-step schedule: thousands
    assert distill.kl_step_weight(0.75, 0.5, 0.7) < 0.625  # trailing: below that step's MSE weights (1 - s)^2 + s^2
    assert distill.kl_step_weight(0.5, 0.0, 0.7) == 0 and distill.kl_step_weight(0.5, 0.25, 0.0) == 0


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_trailing_sigmas_are_what_the_pipeline_samples_with(distill, tiny_path, steps):
    """SAMPLER_SPACING="trailing": u_i = 1 - i/K, shifted; exactly the scheduler's sigmas for the pipeline's `sigmas`
    argument (what the exported student's card passes), and evenly spread where the default ends at sigma 0.009."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = distill.load_scheduler_config(tiny_path, {"TEACHER_REVISION": None, "COLAB_MODEL_CACHE": ""})
    sigmas, timesteps = distill.sampler_sigmas(config, steps, None, 64, "trailing")
    assert distill.pipeline_sigmas(steps, "trailing") == [1 - i / steps for i in range(steps)]
    assert distill.pipeline_sigmas(steps, "scheduler") is None
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_path, subfolder="scheduler")
    scheduler.set_timesteps(sigmas=distill.pipeline_sigmas(steps, "trailing"))
    assert torch.equal(sigmas, scheduler.sigmas) and torch.equal(timesteps, scheduler.timesteps)
    u = torch.tensor([1 - i / steps for i in range(steps)])
    assert torch.allclose(sigmas[:-1], 3 * u / (1 + 2 * u)) and sigmas[-1] == 0
    if steps == 2:
        assert sigmas.tolist() == pytest.approx([1.0, 0.75, 0.0])
        assert distill.sampler_sigmas(config, 2, None, 64, "scheduler")[0][1] < 0.01  # one real step, then almost none


def linear_field(lam=1.5):
    """dx/dsigma = lam x + sigma^2 (t = 1000 sigma), and its exact solution from (x0, s0) to s1."""
    a = -1 / lam
    b = 2 * a / lam
    c = b / lam

    def particular(s):
        return a * s * s + b * s + c

    def velocity(x, t):
        s = t / 1000
        return lam * x + s * s

    def exact(x0, s0, s1):
        return (x0 - particular(s0)) * math.exp(lam * (s1 - s0)) + particular(s1)

    return velocity, exact


def test_each_solver_by_hand_on_a_linear_field(distill):
    velocity, _ = linear_field()
    x = torch.tensor([1.0], dtype=torch.float64)
    grid = torch.tensor([0.9, 0.6, 0.2], dtype=torch.float64)

    def v(y, s):
        return 1.5 * y + s * s

    e1 = x + (0.6 - 0.9) * v(x, 0.9)  # euler
    euler = e1 + (0.2 - 0.6) * v(e1, 0.6)
    h1 = x + (-0.3) / 2 * (v(x, 0.9) + v(e1, 0.6))  # heun
    heun = h1 + (-0.4) / 2 * (v(h1, 0.6) + v(h1 + (-0.4) * v(h1, 0.6), 0.2))
    m1 = x + (-0.3) * v(x + (-0.15) * v(x, 0.9), 0.75)  # midpoint
    midpoint = m1 + (-0.4) * v(m1 + (-0.2) * v(m1, 0.6), 0.4)
    r = 0.4 / 0.3  # ab2: Euler first, then the two-step formula on the uneven grid
    ab2 = e1 + (-0.4) * ((1 + r / 2) * v(e1, 0.6) - (r / 2) * v(x, 0.9))
    for solver, expected in (("euler", euler), ("heun", heun), ("midpoint", midpoint), ("ab2", ab2)):
        assert torch.allclose(distill.solve_flow(velocity, x, grid, solver), expected, rtol=1e-12), solver


@pytest.mark.parametrize("solver,order", [("euler", 1), ("ab2", 2), ("heun", 2), ("midpoint", 2)])
def test_solver_order_of_accuracy(distill, solver, order):
    """Error against N on the linear field: halving the substeps divides it by 2^order."""
    velocity, exact = linear_field()
    x = torch.tensor([1.0], dtype=torch.float64)
    errors = [abs(float(distill.solve_flow(velocity, x, torch.linspace(0.9, 0.2, n + 1, dtype=torch.float64), solver)
                        - exact(x, 0.9, 0.2))) for n in (64, 128, 256)]
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(rate - order) < 0.1 for rate in rates), rates


def test_teacher_target_with_a_solver_is_its_average_velocity(distill):
    velocity, exact = linear_field()
    sigmas = torch.tensor([1.0, 0.6, 0.0], dtype=torch.float64)
    x = torch.tensor([0.3], dtype=torch.float64)
    for solver in ("heun", "ab2"):
        target = distill.teacher_target_velocity(velocity, x, sigmas, 0, 4, 1.0, solver)
        landed = distill.solve_flow(velocity, x, distill.substep_sigmas(sigmas, 0, 4, 1.0).double(), solver)
        assert torch.allclose(target, (x - landed) / 0.4)
    fine = distill.teacher_target_velocity(velocity, x, sigmas, 0, 64, 1.0, "heun")
    assert torch.allclose(x - 0.4 * fine, exact(x, 1.0, 0.6), atol=1e-5)  # a fine solve lands on the exact flow


def test_teacher_passes_per_step(distill):
    config = {"IMAGES_PER_STEP": 4, "SUPERVISED_STATES": 0, "NUM_ROLLOUT_STEPS": 4, "TEACHER_SUBSTEPS": 4,
              "TEACHER_SOLVER": "euler", "GUIDANCE_SCALE": 7.0, "DMD_WEIGHT": 0.0}
    assert distill.teacher_passes_per_step(config) == 4 * 4 * 4 * 2
    assert distill.teacher_passes_per_step({**config, "DMD_WEIGHT": 1.0}) == 4 * 4 * (4 + 1) * 2  # + the real score
    # + the adversarial term's 3 unguided passes per image (its student side, the head's real and fake)
    assert distill.teacher_passes_per_step({**config, "ADV_WEIGHT": 0.5}) == 4 * (4 * 4 * 2 + 3)
    assert distill.teacher_passes_per_step({**config, "TEACHER_SOLVER": "heun", "TEACHER_SUBSTEPS": 2}) == 4 * 4 * 4 * 2
    assert distill.teacher_passes_per_step({**config, "SUPERVISED_STATES": 1, "GUIDANCE_SCALE": 1}) == 4 * 1 * 4
    # N = 0: 8 // K substeps, the same passes per supervised path at K = 4, 2 and 1 (and one substep past K = 8)
    assert [distill.teacher_substeps({**config, "TEACHER_SUBSTEPS": 0, "NUM_ROLLOUT_STEPS": k}) for k in (1, 2, 3, 4, 8, 16)] \
        == [8, 4, 2, 2, 1, 1]
    assert distill.teacher_passes_per_step({**config, "TEACHER_SUBSTEPS": 0, "TEACHER_SOLVER": "auto"}) == 4 * 4 * 2 * 2
    # "auto": AB2 from K = 4 up, Euler below
    assert [distill.teacher_solver({"TEACHER_SOLVER": "auto", "NUM_ROLLOUT_STEPS": k}) for k in (1, 2, 3, 4, 8)] \
        == ["euler", "euler", "euler", "ab2", "ab2"]
    assert distill.teacher_solver({"TEACHER_SOLVER": "heun", "NUM_ROLLOUT_STEPS": 4}) == "heun"


def test_state_drift_per_state(distill):
    a = [torch.zeros(2, 3), torch.ones(2, 3)]
    b = [torch.zeros(2, 3), torch.full((2, 3), 3.0)]
    assert distill.state_drift(a, b) == [0.0, 4.0]


def gaussian_x0(x_s, sigma, mean, std):
    """E[x0 | x_s] for x0 ~ N(mean, std^2) and x_s = (1 - s) x0 + s eps: the x0 prediction of a perfect score."""
    a = 1 - sigma
    return mean + a * std**2 / (a * a * std**2 + sigma**2) * (x_s - a * mean)


def test_dmd_moves_the_students_samples_to_the_teachers_distribution(distill):
    """Particles x (the student's samples) start as N(2, 0.5^2) per element; the teacher's distribution is N(0, 1). Each
    step the fake score is the particles' own Gaussian and the real score the teacher's, both in closed form, at s from
    SD3's density; the particles step against DMD's direction. They must reach the teacher's mean and spread: a flipped
    sign runs away (to a mean of 17); without the normalisation the spread stays at 0.97, at a tenth of the step at
    0.71. (The direction's exact scale is pinned by hand in the next test.)"""
    generator = torch.Generator().manual_seed(0)
    x = 2 + 0.5 * torch.randn(4096, 16, generator=generator)
    for _ in range(300):
        sigma = distill.dmd_noise_levels(torch.randn(x.shape[0], generator=generator), 3.0)
        x_s = distill.noised(x, sigma, torch.randn(x.shape, generator=generator))
        s = sigma[:, None]
        real = gaussian_x0(x_s, s, 0.0, 1.0)
        fake = gaussian_x0(x_s, s, x.mean(), x.std())
        x = x - 0.05 * distill.dmd_direction(x, real, fake)
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02, (x.mean().item(), x.std().item())


def test_dmd_loss_gradient_is_the_direction_per_element(distill):
    """0.5 mean ||x - sg(x - g)||^2 has gradient g / numel in x; its value is 0.5 mean g^2. The direction by hand:
    (x0_fake - x0_real) / mean |x - x0_real| per sample."""
    x = torch.tensor([[1.0, 3.0], [0.0, -2.0]], requires_grad=True)
    real, fake = torch.tensor([[0.0, 1.0], [1.0, -1.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    g = distill.dmd_direction(x.detach(), real, fake)
    # sample 0: |x - real| = [1, 2], mean 1.5; sample 1: [1, 1], mean 1
    assert torch.allclose(g, torch.tensor([[2 / 1.5, -1 / 1.5], [-1.0, 2.0]]))
    loss = distill.dmd_loss(x, g)
    loss.backward()
    assert torch.allclose(x.grad, g / 4) and loss.item() == pytest.approx(0.5 * g.square().mean().item())


def test_dmd_noise_levels_follow_sd3s_shifted_logit_normal(distill):
    """s = shift u / (1 + (shift - 1) u), u = sigmoid(n); kept in [0.02, 0.98]; its median is the shifted sigmoid(0)."""
    n = torch.tensor([0.0, -100.0, 100.0, 1.0])
    s = distill.dmd_noise_levels(n, 3.0)
    u = 1 / (1 + math.exp(-1.0))
    assert s.tolist() == pytest.approx([0.75, 0.02, 0.98, 3 * u / (1 + 2 * u)])


def test_flow_matching_loss_is_zero_for_the_true_velocity(distill):
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert distill.flow_matching_loss(noise - x0, x0, noise).item() == 0
    assert distill.flow_matching_loss(noise - x0 + 1, x0, noise).item() == pytest.approx(1.0)


def test_sample_diversity_by_hand(distill):
    """Two prompts, two noises each (noise-major rows): prompt 0's samples 3 apart, prompt 1's 5 apart: mean 4."""
    samples = torch.zeros(4, 1, 1, 2)
    samples[2, 0, 0] = torch.tensor([3.0, 0.0])  # noise 1, prompt 0 (noise 0, prompt 0 is zero)
    samples[1, 0, 0] = torch.tensor([1.0, 1.0])  # noise 0, prompt 1
    samples[3, 0, 0] = torch.tensor([4.0, 5.0])  # noise 1, prompt 1: (3, 4) away
    assert distill.sample_diversity(samples, 2) == pytest.approx(4.0)


def test_the_staged_start_by_hand(distill):
    w = [distill.distribution_weight_at(step, 2.0, 3, 4) for step in range(9)]
    assert w == [0, 0, 0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert [distill.distribution_weight_at(s, 2.0, 3, 0) for s in (2, 3)] == [0, 2.0]  # no ramp: all at once


def test_hinge_losses_and_the_heads_blocks_by_hand(distill):
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # mean max(0, 1 - real) = (0 + 0.5 + 2) / 3; mean max(0, 1 + fake) = (0 + 1 + 2) / 3
    assert distill.hinge_discriminator_loss(real, fake).item() == pytest.approx(2.5 / 3 + 3 / 3)
    assert distill.adversarial_generator_loss(fake).item() == pytest.approx(1 / 3)
    assert distill.adversarial_blocks(24) == [5, 11, 17, 23] and distill.adversarial_blocks(2) == [0, 1]


def test_the_adversarial_game_moves_fake_samples_towards_real_ones(distill):
    """A toy with a known answer: real samples at +1, fake at -1 in one dimension, a linear head. The head trained on
    hinge_discriminator_loss learns D(x) > 0 on the real side; a step of the generator against
    adversarial_generator_loss then moves every fake sample towards the real ones. A sign error in either fails."""
    gen = torch.Generator().manual_seed(0)
    real = 1 + 0.1 * torch.randn(256, 1, generator=gen)
    fake = -1 + 0.1 * torch.randn(256, 1, generator=gen)
    head = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    for _ in range(100):
        optimizer.zero_grad()
        distill.hinge_discriminator_loss(head(real), head(fake)).backward()
        optimizer.step()
    assert head.weight.item() > 0 and (head(real) > 0).all() and (head(fake) < 0).all()
    x = fake.clone().requires_grad_(True)
    distill.adversarial_generator_loss(head(x)).backward()
    moved = x - 0.5 * x.grad
    assert (moved > fake).all()


def test_step_windows_by_hand(distill):
    # logged every 2 steps, then a row of 3 steps (the first after a resume from step 4, say)
    rows = [{"step": 2, "sec_per_step": 0.5}, {"step": 4, "sec_per_step": 0.25}, {"step": 7, "sec_per_step": 1.0}]
    assert distill.step_windows(rows) == [(2, 1.0), (4, 0.5), (7, 3.0)]
    assert distill.step_windows([]) == []
