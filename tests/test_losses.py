import math

import pytest
import torch

from losses import FlowMatching, LossBins, flux_mu, shift_sigmas, time_shift, timestep_bin_losses

N_DRAWS = 200_000
QUANTILES = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])


def _sigmoid_quantile(q: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Quantile of sigmoid(mean + std * N(0, 1)): sigmoid is monotone, so it maps quantiles."""
    return torch.sigmoid(mean + std * torch.special.ndtri(q.double())).float()


def _mode_quantile(q: torch.Tensor, scale: float) -> torch.Tensor:
    """f(u) = 1 - u - s(cos^2(pi u/2) - 1 + u) decreases on [0, 1], so the q-quantile is f(1 - q)."""
    u = 1 - q.double()
    return (1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)).float()


SAMPLERS = {
    "uniform": (dict(), lambda q: q),
    "sigmoid": (dict(sigmoid_scale=1.5), lambda q: _sigmoid_quantile(q, std=1.5)),
    "shift": (dict(discrete_flow_shift=3.1582),
              lambda q: 3.1582 * _sigmoid_quantile(q) / (1 + 2.1582 * _sigmoid_quantile(q))),
    "flux_shift": (dict(), lambda q: math.exp(0.5) / (math.exp(0.5) + 1 / _sigmoid_quantile(q) - 1)),  # 256 tokens
    "logit_normal": (dict(logit_mean=-0.5, logit_std=0.8), lambda q: _sigmoid_quantile(q, -0.5, 0.8)),
    "mode": (dict(mode_scale=1.29), lambda q: _mode_quantile(q, 1.29)),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sigma_quantiles_match_closed_form(name):
    options, quantile = SAMPLERS[name]
    fm = FlowMatching(timestep_sampling=name, **options)
    sigma = fm.sample_sigmas(N_DRAWS, image_seq_len=256, generator=torch.Generator().manual_seed(0))
    assert sigma.shape == (N_DRAWS,) and sigma.dtype == torch.float32
    assert sigma.min() >= 0 and sigma.max() <= 1
    empirical = torch.quantile(sigma[:100_000], QUANTILES)  # torch.quantile caps its input size
    torch.testing.assert_close(empirical, quantile(QUANTILES), atol=4e-3, rtol=0)


def test_shift_and_flux_shift_medians():
    # The median of sigmoid(N(0,1)) is 0.5; shift maps it to shift*0.5/(1 + (shift-1)*0.5) = shift/(1+shift).
    shift = 3.1582
    half = torch.tensor([0.5])
    assert shift_sigmas(half, shift).item() == pytest.approx(shift / (1 + shift))
    assert shift / (1 + shift) == pytest.approx(0.75951, abs=1e-5)
    # flux_shift: mu through (256, 0.5) and (4096, 1.15); time_shift maps 0.5 to e^mu/(e^mu + 1) = sigmoid(mu).
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)
    for seq_len, mu in ((256, 0.5), (4096, 1.15)):
        assert time_shift(flux_mu(seq_len), half).item() == pytest.approx(1 / (1 + math.exp(-mu)))
        fm = FlowMatching(timestep_sampling="flux_shift")
        sigma = fm.sample_sigmas(50_001, seq_len, generator=torch.Generator().manual_seed(1))
        assert sigma.median().item() == pytest.approx(1 / (1 + math.exp(-mu)), abs=5e-3)
    # e^1.15 = 3.1582: the recommended `shift` is flux_shift at 4096 tokens.
    assert math.exp(1.15) == pytest.approx(3.1582, abs=1e-4)
    s = torch.tensor([0.2, 0.7])
    torch.testing.assert_close(time_shift(1.15, s), shift_sigmas(s, math.exp(1.15)))


def test_means_of_uniform_and_mode_are_one_half():
    # The mode map has integral 1/2 for every scale: int(cos^2(pi u/2)) = 1/2 cancels -1 + int(u).
    for name in ("uniform", "mode"):
        sigma = FlowMatching(timestep_sampling=name).sample_sigmas(N_DRAWS, 1024, torch.Generator().manual_seed(2))
        assert sigma.mean().item() == pytest.approx(0.5, abs=3e-3)


def test_sampling_is_reproducible_with_a_generator():
    fm = FlowMatching()
    a = fm.sample_sigmas(8, 1024, generator=torch.Generator().manual_seed(3))
    b = fm.sample_sigmas(8, 1024, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, fm.sample_sigmas(8, 1024, generator=torch.Generator().manual_seed(4)))


def test_noisy_endpoints_and_target():
    fm = FlowMatching()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    assert torch.equal(fm.noisy(x0, noise, torch.zeros(2)), x0)
    assert torch.equal(fm.noisy(x0, noise, torch.ones(2)), noise)
    # one sample clean, one pure noise: sigma broadcasts per sample
    mixed = fm.noisy(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.equal(mixed[0], x0[0]) and torch.equal(mixed[1], noise[1])
    torch.testing.assert_close(fm.noisy(x0, noise, torch.full((2,), 0.25)), 0.75 * x0 + 0.25 * noise)
    assert torch.equal(fm.target(x0, noise), noise - x0)
    # bf16 inputs come back bf16
    assert fm.noisy(x0.bfloat16(), noise.bfloat16(), torch.full((2,), 0.5)).dtype == torch.bfloat16


def test_euler_steps_with_the_true_velocity_follow_the_line():
    fm = FlowMatching()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 8, 16, generator=g), torch.randn(3, 8, 16, generator=g)
    v = fm.target(x0, noise)
    sigmas = shift_sigmas(torch.linspace(1, 0, 9), 3.0)  # a shifted sampling schedule, 1 -> 0
    x = fm.noisy(x0, noise, torch.ones(3))
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * v
        torch.testing.assert_close(x, fm.noisy(x0, noise, s_next.expand(3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_prediction_types():
    out, x_t = torch.randn(2, 4), torch.randn(2, 4)
    sigma = torch.tensor([0.3, 0.6])
    assert torch.equal(FlowMatching(model_prediction_type="raw").prediction(out, x_t, sigma), out)
    assert torch.equal(FlowMatching(model_prediction_type="additive").prediction(out, x_t, sigma), out + x_t)


def _loss_for_differences(fm: FlowMatching, d: torch.Tensor, sigma: torch.Tensor):
    """Loss with target = noise - x0 = 0 and model_out = d, so prediction - target = d."""
    zeros = torch.zeros_like(d)
    return fm.loss(d, zeros, zeros, sigma, zeros)


def test_loss_types_against_hand_values():
    # Rows are samples. Pythagorean triples make sqrt exact: (d, c) = (0.75, 1) -> 1.25, (4, 3) -> 5.
    d = torch.tensor([[0.0, 0.75], [4.0, -4.0]])
    sigma = torch.tensor([0.2, 0.9])
    mean, per_sample = _loss_for_differences(FlowMatching(loss_type="l2"), d, sigma)
    torch.testing.assert_close(per_sample, torch.tensor([0.5625 / 2, 16.0]))
    torch.testing.assert_close(mean, torch.tensor((0.28125 + 16.0) / 2))

    c1 = FlowMatching(loss_type="smooth_l1", huber_c=1.0)
    # smooth_l1: 2 (sqrt(d^2 + c^2) - c): d=0.75 -> 2 * 0.25 = 0.5; d=4 with c=1: 2 (sqrt 17 - 1)
    _, per_sample = _loss_for_differences(c1, d, sigma)
    torch.testing.assert_close(per_sample, torch.tensor([0.5 / 2, 2 * (math.sqrt(17) - 1)]))

    c3 = FlowMatching(loss_type="huber", huber_c=3.0)
    # huber: 2c (sqrt(d^2 + c^2) - c); d=4, c=3 -> 6 * 2 = 12; d=0.75 -> 6 (sqrt(9.5625) - 3)
    _, per_sample = _loss_for_differences(c3, d, sigma)
    torch.testing.assert_close(per_sample, torch.tensor([6 * (math.sqrt(9.5625) - 3) / 2, 12.0]))
    _, per_sample = _loss_for_differences(FlowMatching(loss_type="smooth_l1", huber_c=3.0), d, sigma)
    torch.testing.assert_close(per_sample, torch.tensor([2 * (math.sqrt(9.5625) - 3) / 2, 4.0]))


def test_huber_schedules():
    sigma = torch.tensor([0.0, 0.5, 1.0])
    exp = FlowMatching(loss_type="huber", huber_c=0.25, huber_schedule="exponential")
    torch.testing.assert_close(exp.huber_threshold(sigma), torch.tensor([1.0, 0.5, 0.25]))
    # kohya's form exp(-alpha t), alpha = -ln(c)/1000, t = 1000 sigma
    alpha = -math.log(0.25) / 1000
    torch.testing.assert_close(exp.huber_threshold(sigma), torch.exp(-alpha * 1000 * sigma))
    snr = FlowMatching(loss_type="huber", huber_c=0.1, huber_schedule="snr")
    torch.testing.assert_close(snr.huber_threshold(sigma), torch.tensor([1.0, 0.325, 0.1]))
    # kohya's (1 - c)/(1 + r)^2 + c with r the noise-to-signal ratio sigma/(1 - sigma)
    s = torch.tensor([0.3])
    torch.testing.assert_close(snr.huber_threshold(s), 0.9 / (1 + s / (1 - s)) ** 2 + 0.1)
    const = FlowMatching(loss_type="huber", huber_c=0.1)
    torch.testing.assert_close(const.huber_threshold(sigma), torch.full((3,), 0.1))
    # the schedule reaches the loss: sigma 0.5 -> c = 0.5, d = 1.2 -> 2 * 0.5 * (1.3 - 0.5) = 0.8
    _, per_sample = _loss_for_differences(exp, torch.tensor([[1.2]]), torch.tensor([0.5]))
    torch.testing.assert_close(per_sample, torch.tensor([0.8]))


def test_sample_weight_and_gradients():
    fm = FlowMatching()
    g = torch.Generator().manual_seed(5)
    x0, noise, out = (torch.randn(3, 2, 4, generator=g) for _ in range(3))
    out.requires_grad_(True)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    x_t = fm.noisy(x0, noise, sigma)
    mean, per_sample = fm.loss(out, x0, noise, sigma, x_t)
    weight = torch.tensor([1.0, 0.0, 2.0])
    w_mean, w_per_sample = fm.loss(out, x0, noise, sigma, x_t, sample_weight=weight)
    torch.testing.assert_close(w_per_sample, per_sample * weight)
    torch.testing.assert_close(w_mean, (per_sample * weight).mean())
    # gradient of mean((out - v)^2) is 2 (out - v) / numel
    mean.backward()
    torch.testing.assert_close(out.grad, 2 * (out - (noise - x0)).detach() / out.numel())


def test_bf16_model_output_gives_fp32_loss():
    fm = FlowMatching()
    x0, noise = torch.randn(2, 4), torch.randn(2, 4)
    mean, per_sample = fm.loss(torch.randn(2, 4).bfloat16(), x0, noise, torch.rand(2), x0)
    assert mean.dtype == per_sample.dtype == torch.float32


def test_guidance():
    g = FlowMatching().guidance(3)
    assert torch.equal(g, torch.ones(3))
    g = FlowMatching(guidance_scale=3.5).guidance(2, dtype=torch.bfloat16)
    assert g.dtype == torch.bfloat16 and g.tolist() == [3.5, 3.5]


@pytest.mark.parametrize("option, value, names", [
    ("timestep_sampling", "sigma", "uniform, sigmoid, shift, flux_shift, logit_normal, mode"),
    ("model_prediction_type", "sigma_scaled", "raw, additive"),
    ("loss_type", "l1", "l2, huber, smooth_l1"),
    ("huber_schedule", "linear", "constant, exponential, snr"),
])
def test_invalid_option_names_list_the_valid_ones(option, value, names):
    with pytest.raises(ValueError, match=names):
        FlowMatching(**{option: value})


def test_invalid_values():
    with pytest.raises(ValueError, match="mode_scale"):
        FlowMatching(mode_scale=2.0)
    with pytest.raises(ValueError, match="huber_c"):
        FlowMatching(loss_type="huber", huber_c=0.0)
    with pytest.raises(ValueError, match="huber_c"):
        FlowMatching(loss_type="huber", huber_c=2.0, huber_schedule="snr")
    with pytest.raises(ValueError, match="discrete_flow_shift"):
        FlowMatching(discrete_flow_shift=0.0)


def test_timestep_bin_losses_and_accumulator():
    per_sample = torch.tensor([1.0, 2.0, 3.0, 10.0])
    sigma = torch.tensor([0.05, 0.07, 0.55, 1.0])  # sigma = 1 belongs to the last bin
    assert timestep_bin_losses(per_sample, sigma) == {"0.0-0.1": (3.0, 2), "0.5-0.6": (3.0, 1), "0.9-1.0": (10.0, 1)}
    assert list(timestep_bin_losses(per_sample, sigma, bins=4)) == ["0.00-0.25", "0.50-0.75", "0.75-1.00"]

    bins = LossBins(bins=10)
    assert bins.summary() == {}
    bins.add(per_sample, sigma)
    bins.add(torch.tensor([5.0]), torch.tensor([0.01]))
    summary = bins.summary()
    assert summary == {"0.0-0.1": (8.0 / 3, 3), "0.5-0.6": (3.0, 1), "0.9-1.0": (10.0, 1)}
    bins.reset()
    assert bins.summary() == {}
    # detached inputs with grad are fine
    bins.add(per_sample.clone().requires_grad_(True), sigma)
    assert bins.summary()["0.5-0.6"] == (3.0, 1)


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_ddpm_betas_match_diffusers(schedule):
    from diffusers import DDPMScheduler

    from losses import ddpm_betas

    theirs = DDPMScheduler(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012).betas  # fp32
    assert torch.allclose(ddpm_betas(schedule).float(), theirs, rtol=0, atol=1e-8)


def test_zero_terminal_snr_ends_at_zero_and_keeps_the_first_step():
    from losses import alphas_cumprod, ddpm_betas, ddpm_sigmas, rescale_zero_terminal_snr

    betas = ddpm_betas("scaled_linear")
    rescaled = alphas_cumprod(rescale_zero_terminal_snr(betas))
    assert rescaled[-1] == 0 and alphas_cumprod(betas)[-1] > 0.004
    assert torch.allclose(rescaled[0], alphas_cumprod(betas)[0])
    sigmas = ddpm_sigmas(alphas_cumprod(betas))
    assert 0.029 < sigmas[0] < 0.03 and 14.6 < sigmas[-1] < 14.7  # SDXL's sigma_min / sigma_max
