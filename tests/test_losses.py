import math

import pytest
import torch

from losses import FlowMatching, LossBins, flux_mu, shift_sigmas, time_shift, timestep_bin_losses

pytestmark = pytest.mark.usefixtures("one_thread")

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


# --- The objective interface (Noised, noised, noised_at, loss with masks), SD3 and DDPM ---------------
# Every expected value below is re-derived here from its formula (the papers, kohya-ss/sd-scripts'
# train_util.py / custom_train_functions.py / sd3_train_utils.py), from diffusers' DDPMScheduler, or
# from improved-diffusion's GaussianDiffusion vendored unchanged under tests/oracles/.

from losses import DDPM, Noised, build_objective  # noqa: E402

SCALED_LINEAR = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)


def _abar_scaled_linear() -> torch.Tensor:
    """SDXL's abar from the formula, float64: betas = linspace(sqrt(b0), sqrt(b1), 1000)^2."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def _latents(seed: int, shape=(3, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g) for _ in range(3))


@pytest.mark.parametrize("sampling", ["shift", "flux_shift", "logit_normal", "mode"])
def test_flow_noised_is_bit_identical_to_the_old_call_sequence(sampling):
    fm = FlowMatching(timestep_sampling=sampling)
    x0, out, _ = _latents(10)
    seq_len = 16
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)  # train.training_loss before Noised
    sigma = fm.sample_sigmas(x0.shape[0], seq_len, generator=g).to(x0.device)
    x_t = fm.noisy(x0, noise, sigma)
    noised = fm.noised(x0, torch.Generator().manual_seed(7), seq_len=seq_len)
    assert isinstance(noised, Noised)
    assert torch.equal(noised.noise, noise) and torch.equal(noised.t, sigma) and torch.equal(noised.level, sigma)
    assert torch.equal(noised.x_t, x_t)
    old_mean, old_per_sample = fm.loss(out, x0, noise, sigma, x_t)
    new_mean, new_per_sample = fm.loss(out, x0, noised)
    assert torch.equal(new_mean, old_mean) and torch.equal(new_per_sample, old_per_sample)


def _ddpm_everything_on() -> DDPM:
    return DDPM(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.05,
                multires_noise_iterations=4, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)


@pytest.mark.parametrize("objective", [FlowMatching(), FlowMatching(timestep_sampling="logit_normal",
                                       training_shift=3.0, discrete_timesteps=True), _ddpm_everything_on()],
                         ids=["flux", "sd3", "ddpm"])
def test_noised_is_deterministic_under_a_seeded_generator(objective):
    x0 = _latents(11)[0]
    a, b, c = (objective.noised(x0, torch.Generator().manual_seed(s), seq_len=16) for s in (5, 5, 6))
    for field in ("t", "level", "noise", "x_t"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.noise, c.noise) and not torch.equal(a.x_t, c.x_t)
    assert a.t.shape == a.level.shape == (3,) and a.level.dtype == torch.float32
    assert 0 <= a.level.min() and a.level.max() <= 1


def test_flow_noised_at_and_validation_levels():
    fm = FlowMatching()
    x0, noise, _ = _latents(12)
    noised = fm.noised_at(x0, noise, 0.3)
    assert torch.equal(noised.t, torch.full((3,), 0.3)) and torch.equal(noised.level, noised.t)
    torch.testing.assert_close(noised.x_t, 0.7 * x0 + 0.3 * noise)
    with pytest.raises(ValueError, match="level=1.5 must lie in"):
        fm.noised_at(x0, noise, 1.5)


def test_sd3_logit_normal_training_shift_and_discrete_timesteps():
    # kohya sd3_train_utils.get_noisy_model_input_and_timesteps: u = sigmoid(N(m, s)),
    # u <- shift u / (1 + (shift - 1) u), t = long(u (t_max - t_min) + t_min), sigma = t / 1000
    fm = FlowMatching(timestep_sampling="logit_normal", logit_mean=0.2, logit_std=1.1, training_shift=3.0,
                      discrete_timesteps=True, min_timestep=100, max_timestep=900)
    sigma = fm.sample_sigmas(4096, None, generator=torch.Generator().manual_seed(8))
    n = torch.randn(4096, generator=torch.Generator().manual_seed(8))
    u = torch.sigmoid(0.2 + 1.1 * n)
    u = 3.0 * u / (1 + 2.0 * u)
    t = torch.floor(u * 800 + 100)
    assert torch.equal(sigma, t / 1000)
    assert sigma.min() >= 0.1 and sigma.max() < 0.9
    torch.testing.assert_close(sigma * 1000, torch.round(sigma * 1000), atol=1e-4, rtol=0)  # on the 1/1000 grid
    # training_shift alone composes with any sampling and stays continuous
    shifted = FlowMatching(timestep_sampling="uniform", training_shift=2.0).sample_sigmas(
        5, None, torch.Generator().manual_seed(9))
    uniform = torch.rand(5, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(shifted, 2 * uniform / (1 + uniform))


def test_x0_preconditioned_prediction_is_raw_weighted_by_sigma_squared():
    x0, noise, out = _latents(13)
    sigma = torch.tensor([0.2, 0.5, 0.9])
    pre = FlowMatching(model_prediction_type="x0_preconditioned")
    raw = FlowMatching(model_prediction_type="raw")
    noised = Noised(t=sigma, level=sigma, noise=noise, x_t=pre.noisy(x0, noise, sigma))
    s = sigma.view(-1, 1, 1, 1)
    # kohya's SD3: model_pred = out * (-sigma) + x_t, target = x0
    torch.testing.assert_close(pre.prediction(out, noised.x_t, sigma), out * (-s) + noised.x_t)
    _, per_sample = pre.loss(out, x0, noised)
    torch.testing.assert_close(per_sample, ((out * (-s) + noised.x_t - x0) ** 2).mean(dim=(1, 2, 3)))
    # x_t - sigma out - x0 = sigma (v - out): the raw velocity loss times sigma^2 ...
    _, raw_per_sample = raw.loss(out, x0, noised)
    torch.testing.assert_close(per_sample, raw_per_sample * sigma**2, rtol=1e-5, atol=1e-6)
    # ... and sigma_sqrt weighting gives the raw loss back
    _, weighted = FlowMatching(model_prediction_type="x0_preconditioned", weighting_scheme="sigma_sqrt").loss(
        out, x0, noised)
    torch.testing.assert_close(weighted, raw_per_sample, rtol=1e-5, atol=1e-6)


def test_sd3_loss_weighting_schemes():
    sigma = torch.tensor([0.0, 0.1, 0.5, 0.8])
    # kohya compute_loss_weighting_for_sd3: sigma_sqrt sigma^-2, cosmap 2 / (pi (1 - 2 s + 2 s^2))
    sqrt_w = FlowMatching(weighting_scheme="sigma_sqrt").loss_weighting(sigma)
    torch.testing.assert_close(sqrt_w[1:], sigma[1:] ** -2.0)
    assert sqrt_w[0].item() == pytest.approx(1000.0**2, rel=1e-6)  # floored at sigma = 1/1000, not kohya's inf
    cosmap = FlowMatching(weighting_scheme="cosmap").loss_weighting(sigma)
    torch.testing.assert_close(cosmap, 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)))
    assert cosmap[2].item() == pytest.approx(4 / math.pi)
    assert torch.equal(FlowMatching().loss_weighting(sigma), torch.ones(4))
    # a sigma = 0 sample of the x0-preconditioned loss is 0, not NaN
    x0, noise, out = _latents(14, (4, 2, 2, 2))
    fm = FlowMatching(model_prediction_type="x0_preconditioned", weighting_scheme="sigma_sqrt")
    _, per_sample = fm.loss(out, x0, Noised(sigma, sigma, noise, fm.noisy(x0, noise, sigma)))
    assert per_sample[0] == 0 and torch.isfinite(per_sample).all()


def _mask_and_changed(x0, noise, out, mask):
    """Copies of x0, noise, out with every masked-out pixel replaced by something else."""
    g = torch.Generator().manual_seed(99)
    dropped = (mask == 0).expand_as(x0)
    return tuple(torch.where(dropped, 50 * torch.randn(x.shape, generator=g), x) for x in (x0, noise, out))


@pytest.mark.parametrize("objective", [
    FlowMatching(model_prediction_type="x0_preconditioned", loss_type="huber", huber_schedule="snr"),
    DDPM(prediction_type="v_prediction", min_snr_gamma=5.0),
    DDPM(beta_schedule="squaredcos_cap_v2", learned_variance="learned_range"),
], ids=["flow", "ddpm_v", "ddpm_learned_variance"])
def test_masked_out_pixels_change_neither_loss_nor_gradients(objective):
    x0, noise, out = _latents(15, (3, 3, 6, 6))
    if isinstance(objective, DDPM) and objective.learned_variance == "learned_range":
        out = torch.cat([out, torch.rand(3, 3, 6, 6) * 2 - 1], dim=1)
        x0 = x0.clamp(-1, 1)
    mask = (torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.4).float()
    mask[1] = 0  # one sample masked out entirely
    mask[2, 0, 0, 0] = 0.5  # a fractional weight

    def loss_and_grad(x0, noise, out):
        out = out.clone().requires_grad_(True)
        mean, per_sample = objective.loss(out, x0, objective.noised_at(x0, noise, 0.4), mask=mask)
        mean.backward()
        return mean.detach(), per_sample.detach(), out.grad

    x0_b, noise_b, out_b = _mask_and_changed(x0, noise, out[:, :3], mask)
    out_b = torch.cat([out_b, out[:, 3:]], dim=1)
    first, second = loss_and_grad(x0, noise, out), loss_and_grad(x0_b, noise_b, out_b)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert first[1][1] == 0 and first[1][0] > 0
    assert torch.equal(first[2][1], torch.zeros_like(first[2][1]))  # no gradient from the masked-out sample
    # a non-finite output under the mask does not reach the loss, nor the gradient of any other element
    out_c = out.clone()
    out_c[:, :3][(mask == 0).expand(-1, 3, -1, -1)] = float("nan")
    third = loss_and_grad(x0, noise, out_c)
    assert torch.equal(third[0], first[0]) and torch.equal(third[1], first[1])
    kept = (mask > 0).expand(-1, out.shape[1], -1, -1)  # every channel of a kept pixel
    assert torch.equal(third[2][kept], first[2][kept])


def test_masked_loss_formula_and_shapes():
    fm = FlowMatching()
    x0, noise, out = _latents(16, (2, 4, 5, 5))
    mask = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(2))  # (B, h, w) in [0, 1]
    noised = fm.noised_at(x0, noise, 0.5)
    _, per_sample = fm.loss(out, x0, noised, mask=mask)
    elementwise = (out - (noise - x0)) ** 2
    m = mask[:, None].expand_as(elementwise)  # broadcast over channels
    torch.testing.assert_close(per_sample, (m * elementwise).sum((1, 2, 3)) / m.sum((1, 2, 3)))
    _, same = fm.loss(out, x0, noised, mask=mask[:, None])  # (B, 1, h, w) form
    assert torch.equal(per_sample, same)
    _, unmasked = fm.loss(out, x0, noised, mask=torch.ones(2, 1, 5, 5))
    torch.testing.assert_close(unmasked, fm.loss(out, x0, noised)[1])
    with pytest.raises(ValueError, match=r"loss mask of shape \(2, 1, 4, 4\) does not fit"):
        fm.loss(out, x0, noised, mask=torch.ones(2, 1, 4, 4))


@pytest.mark.parametrize("options, theirs", [
    (dict(), dict(SCALED_LINEAR)),
    (dict(zero_terminal_snr=True), dict(SCALED_LINEAR, rescale_betas_zero_snr=True)),
    (dict(beta_schedule="squaredcos_cap_v2"), dict(beta_schedule="squaredcos_cap_v2", clip_sample=False)),
], ids=["sdxl", "sdxl_zero_snr", "if_cosine"])
def test_ddpm_noising_and_velocity_match_diffusers(options, theirs):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, **theirs)
    x0, noise, _ = _latents(17)
    t = torch.tensor([0, 499, 999])
    ddpm = DDPM(prediction_type="v_prediction", **options)
    # diffusers takes the cumulative product in fp32, here in float64: 1e-5 covers its rounding
    torch.testing.assert_close(ddpm.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t), atol=1e-5, rtol=0)
    torch.testing.assert_close(ddpm.target(x0, noise, t), scheduler.get_velocity(x0, noise, t), atol=1e-5, rtol=0)
    assert torch.equal(DDPM(**options).target(x0, noise, t), noise)
    # noised: x_t is add_noise of the noise it returns at the t it returns
    noised = ddpm.noised(x0, torch.Generator().manual_seed(3))
    assert noised.t.dtype == torch.long and torch.equal(noised.level, noised.t / 1000)
    torch.testing.assert_close(noised.x_t, scheduler.add_noise(x0, noised.noise, noised.t), atol=1e-5, rtol=0)
    at = ddpm.noised_at(x0, noise, 0.25)
    assert torch.equal(at.t, torch.full((3,), 250))
    torch.testing.assert_close(at.x_t, scheduler.add_noise(x0, noise, at.t), atol=1e-5, rtol=0)
    assert torch.equal(ddpm.noised_at(x0, noise, 1.0).t, torch.full((3,), 999))


@pytest.mark.parametrize("adaptive", [0.5, -0.4])  # a negative scale clamps some offsets to 0
def test_ddpm_draw_order_offset_noise_and_input_perturbation(adaptive):
    # kohya get_noise_noisy_latents_and_timesteps, re-derived draw by draw from one generator
    x0 = _latents(18)[0] + torch.tensor([0.3, -0.1, 0.0, 0.6]).view(1, 4, 1, 1)  # channel means for the adaptive offset
    ddpm = DDPM(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=adaptive,
                ip_noise_gamma=0.2, ip_noise_gamma_random_strength=True, min_timestep=100, max_timestep=200)
    noised = ddpm.noised(x0, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(x0.shape, generator=g)
    strength = torch.rand(1, generator=g) * 0.1
    offset = torch.clamp(strength + adaptive * torch.abs(x0.mean(dim=(2, 3), keepdim=True)), 0.0, None)
    assert (offset == 0).any() == (adaptive < 0)
    noise = noise + offset * torch.randn((3, 4, 1, 1), generator=g)
    t = torch.randint(100, 200, (3,), generator=g)
    gamma = torch.rand(1, generator=g) * 0.2
    xi = torch.randn(x0.shape, generator=g)
    abar = _abar_scaled_linear()[t].float().view(-1, 1, 1, 1)
    assert torch.equal(noised.t, t)
    torch.testing.assert_close(noised.noise, noise)  # the target keeps the unperturbed noise
    torch.testing.assert_close(noised.x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * (noise + gamma * xi))
    fixed = DDPM(min_timestep=300, max_timestep=300).noised(x0, torch.Generator().manual_seed(4))
    assert torch.equal(fixed.t, torch.full((3,), 300))


def test_pyramid_noise_against_kohya_formula():
    x0 = torch.zeros(2, 3, 16, 12)
    ddpm = DDPM(multires_noise_iterations=10, multires_noise_discount=0.3)
    noise = ddpm.noised(x0, torch.Generator().manual_seed(5)).noise
    # pyramid_noise_like: noise += Upsample(randn(b, c, H / r^i, W / r^i)) * discount^i, r ~ U(2, 4),
    # stop after a 1-pixel side, then noise / noise.std()
    g = torch.Generator().manual_seed(5)
    expected = torch.randn(x0.shape, generator=g)
    upsample = torch.nn.Upsample(size=(16, 12), mode="bilinear")
    levels = 0
    for i in range(10):
        r = torch.rand((), generator=g).item() * 2 + 2
        hn, wn = max(1, int(16 / (r**i))), max(1, int(12 / (r**i)))
        expected += upsample(torch.randn(2, 3, hn, wn, generator=g)) * 0.3**i
        levels += 1
        if hn == 1 or wn == 1:
            break
    expected = expected / expected.std()
    assert levels < 10  # it stopped at a 1-pixel level
    torch.testing.assert_close(noise, expected)
    assert noise.std().item() == pytest.approx(1.0)


def test_min_snr_weights_against_the_formula():
    abar = _abar_scaled_linear()
    snr = abar / (1 - abar)
    t = torch.tensor([0, 10, 100, 500, 999])
    gamma = 5.0
    eps = DDPM(min_snr_gamma=gamma).timestep_weight(t)
    v = DDPM(min_snr_gamma=gamma, prediction_type="v_prediction").timestep_weight(t)
    # Hang et al. 2023 / kohya apply_snr_weight: min(SNR, g) / SNR (eps), min(SNR, g) / (SNR + 1) (v)
    s = snr[t]
    torch.testing.assert_close(eps, (torch.clamp(s, max=gamma) / s).float())
    torch.testing.assert_close(v, (torch.clamp(s, max=gamma) / (s + 1)).float())
    # t = 0: SNR = (1 - beta_0) / beta_0 with beta_0 = 0.00085
    assert eps[0].item() == pytest.approx(gamma * 0.00085 / (1 - 0.00085), rel=1e-5)
    assert eps[-1] == 1 and v[-1].item() == pytest.approx(s[-1].item() / (s[-1].item() + 1), rel=1e-5)
    # zero terminal SNR: SNR = 0 at t = 999, where eps takes the limit 1 and v weight is 0
    zero = DDPM(min_snr_gamma=gamma, zero_terminal_snr=True)
    assert zero.snr(torch.tensor([999])) == 0 and zero.timestep_weight(torch.tensor([999])) == 1
    assert DDPM(min_snr_gamma=gamma, zero_terminal_snr=True, prediction_type="v_prediction").timestep_weight(
        torch.tensor([999])) == 0


def test_v_pred_scales_and_debiased_estimation_against_the_formulas():
    abar = _abar_scaled_linear()
    t = torch.tensor([0, 5, 200, 800])
    s = torch.clamp(abar[t] / (1 - abar[t]), max=1000)  # kohya caps SNR at 1000 (t = 0 has 1175)
    scale = (s / (s + 1)).float()
    torch.testing.assert_close(DDPM(scale_v_pred_loss_like_noise_pred=True).timestep_weight(t), scale)
    torch.testing.assert_close(DDPM(v_pred_like_loss=0.3).timestep_weight(t), 1 + 0.3 / scale)
    torch.testing.assert_close(DDPM(debiased_estimation_loss=True).timestep_weight(t), (1 / s.sqrt()).float())
    torch.testing.assert_close(DDPM(debiased_estimation_loss=True, prediction_type="v_prediction").timestep_weight(t),
                               (1 / (s + 1)).float())
    everything = DDPM(min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=True, v_pred_like_loss=0.3,
                      debiased_estimation_loss=True)
    s_raw = abar[t] / (1 - abar[t])
    product = (torch.clamp(s_raw, max=5.0) / s_raw).float() * scale * (1 + 0.3 / scale) * (1 / s.sqrt()).float()
    torch.testing.assert_close(everything.timestep_weight(t), product)


def test_v_pred_like_loss_adds_the_v_loss_of_an_epsilon_model():
    # What the scale means: an epsilon model's loss / (SNR / (SNR + 1)) is the v loss of the same prediction.
    x0, noise, eps_hat = _latents(19)
    t = torch.tensor([20, 400, 900])
    plain, k = DDPM(), 0.5
    noised = Noised(t, t / 1000, noise, plain.add_noise(x0, noise, t))
    a, b = (x.float().view(-1, 1, 1, 1) for x in (_abar_scaled_linear()[t].sqrt(), (1 - _abar_scaled_linear()[t]).sqrt()))
    x0_hat = (noised.x_t - b * eps_hat) / a
    v_loss = ((a * eps_hat - b * x0_hat) - (a * noise - b * x0)).square().mean(dim=(1, 2, 3))
    _, eps_loss = plain.loss(eps_hat, x0, noised)
    _, combined = DDPM(v_pred_like_loss=k).loss(eps_hat, x0, noised)
    torch.testing.assert_close(combined, eps_loss + k * v_loss, rtol=1e-4, atol=0)
    # and scale_v_pred_loss_like_noise_pred turns that v loss back into the epsilon loss
    v_model = DDPM(prediction_type="v_prediction", scale_v_pred_loss_like_noise_pred=True)
    _, scaled = v_model.loss(a * eps_hat - b * x0_hat, x0, noised)
    torch.testing.assert_close(scaled, eps_loss, rtol=1e-4, atol=0)


def test_ddpm_huber_schedules_use_kohyas_formulas_with_the_ddpm_t():
    abar = _abar_scaled_linear()
    t = torch.tensor([0, 250, 999])
    # kohya get_huber_threshold_if_needed: exponential exp(-alpha t), alpha = -ln(c) / T;
    # snr (1 - c) / (1 + sigma)^2 + c with sigma = sqrt((1 - abar) / abar)
    exp = DDPM(loss_type="huber", huber_c=0.2, huber_schedule="exponential").huber_threshold(t)
    torch.testing.assert_close(exp, torch.exp(-(-math.log(0.2) / 1000) * t))
    sigma = ((1 - abar[t]) / abar[t]).sqrt()
    snr = DDPM(loss_type="smooth_l1", huber_c=0.2, huber_schedule="snr").huber_threshold(t)
    torch.testing.assert_close(snr, ((1 - 0.2) / (1 + sigma) ** 2 + 0.2).float())
    const = DDPM(loss_type="huber", huber_c=0.2).huber_threshold(t)
    assert torch.equal(const, torch.full((3,), 0.2))
    # the flow form agrees: with r = sigma / (1 - sigma) the same expression is c + (1 - c)(1 - sigma)^2
    flow_sigma = torch.tensor([0.3])
    r = flow_sigma / (1 - flow_sigma)
    torch.testing.assert_close(FlowMatching(loss_type="huber", huber_c=0.2, huber_schedule="snr").huber_threshold(
        flow_sigma), (1 - 0.2) / (1 + r) ** 2 + 0.2)
    # zero terminal SNR: pure noise at t = 999 gives c = huber_c, not NaN
    zero = DDPM(loss_type="huber", huber_c=0.2, huber_schedule="snr", zero_terminal_snr=True)
    torch.testing.assert_close(zero.huber_threshold(torch.tensor([999])), torch.tensor([0.2]))
    # the threshold reaches the loss: huber 2c (sqrt(d^2 + c^2) - c)
    x0, noise, out = _latents(20, (3, 1, 2, 2))
    model = DDPM(loss_type="huber", huber_c=0.2, huber_schedule="snr")
    _, per_sample = model.loss(out, x0, Noised(t, t / 1000, noise, model.add_noise(x0, noise, t)))
    c = snr.view(-1, 1, 1, 1)
    torch.testing.assert_close(per_sample, (2 * c * (torch.sqrt((out - noise) ** 2 + c**2) - c)).mean(dim=(1, 2, 3)))


def _improved_diffusion():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "oracles"))
    try:
        from improved_diffusion import gaussian_diffusion as gd
    finally:
        sys.path.pop(0)
    return gd


@pytest.mark.parametrize("steps", [1000, 400])  # IF's 1000; 400 shows the T / 1000 factor on the vb term
def test_learned_variance_loss_matches_improved_diffusion(steps):
    gd = _improved_diffusion()
    theirs = gd.GaussianDiffusion(betas=gd.get_named_beta_schedule("cosine", steps),
                                  model_mean_type=gd.ModelMeanType.EPSILON,
                                  model_var_type=gd.ModelVarType.LEARNED_RANGE,
                                  loss_type=gd.LossType.RESCALED_MSE, rescale_timesteps=True)  # IF's get_diffusion
    ours = DDPM(beta_schedule="squaredcos_cap_v2", learned_variance="learned_range", num_train_timesteps=steps)
    g = torch.Generator().manual_seed(21)
    x0 = (torch.randint(0, 256, (4, 3, 8, 8), generator=g) / 127.5 - 1)  # 8-bit pixels in [-1, 1], ends included
    noise = torch.randn(x0.shape, generator=g)
    out = torch.cat([torch.randn(x0.shape, generator=g), torch.rand(x0.shape, generator=g) * 2 - 1], dim=1)
    t = torch.tensor([0, 1, 300, steps - 1])  # t = 0 is the decoder NLL, the rest KL terms

    out_theirs = out.clone().requires_grad_(True)
    terms = theirs.training_losses(lambda x, ts, r=out_theirs: r, x0, t, noise=noise)
    terms["loss"].mean().backward()
    out_ours = out.clone().requires_grad_(True)
    noised = Noised(t, t / steps, noise, ours.add_noise(x0, noise, t))
    mean, per_sample = ours.loss(out_ours, x0, noised)
    mean.backward()
    torch.testing.assert_close(per_sample, terms["loss"].float(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(out_ours.grad, out_theirs.grad, rtol=1e-4, atol=1e-7)
    # the vb part alone, and the mean channels train by the MSE only
    _, mse = DDPM(beta_schedule="squaredcos_cap_v2", learned_variance="learned_range", freeze_variance=True,
                  num_train_timesteps=steps).loss(out, x0, noised)
    torch.testing.assert_close(per_sample - mse, terms["vb"].float(), rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(out_ours.grad[:, :3], 2 * (out[:, :3] - noise) / out[:, :3][0].numel() / 4)


def test_variance_terms_against_a_direct_computation():
    from losses import discretized_gaussian_log_likelihood, normal_kl

    g = torch.Generator().manual_seed(22)
    m1, m2, lv1, lv2 = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4))
    p = torch.distributions.Normal(m1, (0.5 * lv1).exp())
    q = torch.distributions.Normal(m2, (0.5 * lv2).exp())
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), torch.distributions.kl_divergence(p, q))
    # the decoder likelihood: the Gaussian mass of x's 8-bit bin, the end bins open (exact CDF vs the tanh one)
    x = torch.tensor([-1.0, -0.5, 0.0, 0.2, 1.0], dtype=torch.float64)
    mean, log_scale = torch.tensor([-0.9, -0.45, 0.01, 0.3, 0.95], dtype=torch.float64), torch.full((5,), -3.0,
                                                                                                   dtype=torch.float64)
    normal = torch.distributions.Normal(mean, log_scale.exp())
    upper, lower = normal.cdf(x + 1 / 255), normal.cdf(x - 1 / 255)
    mass = torch.where(x < -0.999, upper, torch.where(x > 0.999, 1 - lower, upper - lower))
    torch.testing.assert_close(discretized_gaussian_log_likelihood(x, mean, log_scale), mass.log(), rtol=2e-3, atol=2e-3)


def test_freeze_variance_and_output_channels():
    x0, noise, out = _latents(23, (2, 3, 4, 4))
    wide = torch.cat([out, torch.zeros_like(out)], dim=1).requires_grad_(True)
    frozen = DDPM(beta_schedule="squaredcos_cap_v2", learned_variance="learned_range", freeze_variance=True)
    noised = frozen.noised_at(x0, noise, 0.5)
    mean, per_sample = frozen.loss(wide, x0, noised)
    mean.backward()
    torch.testing.assert_close(per_sample, ((out - noise) ** 2).mean(dim=(1, 2, 3)))
    assert torch.equal(wide.grad[:, 3:], torch.zeros_like(out))
    with pytest.raises(ValueError, match="output has 3 channels for 3-channel data; learned_variance='learned_range' expects 6"):
        frozen.loss(out, x0, noised)
    with pytest.raises(ValueError, match="output has 6 channels .* learned_variance='none' expects 3"):
        DDPM().loss(wide, x0, noised)


def test_ddpm_loss_dtype_sample_weight_and_gradient():
    ddpm = DDPM(prediction_type="v_prediction")
    x0, noise, out = _latents(24, (2, 4, 4, 4))
    noised = ddpm.noised_at(x0.bfloat16(), noise, 0.5)
    assert noised.x_t.dtype == torch.bfloat16 and noised.noise.dtype == torch.float32
    out = out.requires_grad_(True)
    mean, per_sample = ddpm.loss(out, x0, noised, sample_weight=torch.tensor([1.0, 0.0]))
    assert mean.dtype == per_sample.dtype == torch.float32 and per_sample[1] == 0
    mean.backward()
    v = ddpm.target(x0, noise, noised.t)
    torch.testing.assert_close(out.grad[0], 2 * (out - v).detach()[0] / out[0].numel() / 2)


def test_build_objective():
    flux = build_objective("flow_matching", timestep_sampling="shift", discrete_flow_shift=3.1582)
    assert isinstance(flux, FlowMatching) and flux.discrete_flow_shift == 3.1582
    sdxl = build_objective("ddpm", prediction_type="v_prediction", zero_terminal_snr=True)
    assert isinstance(sdxl, DDPM) and sdxl.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="objective='dpm' is not one of flow_matching, ddpm"):
        build_objective("dpm")
    with pytest.raises(ValueError, match="no option 'min_snr_gama'. Did you mean 'min_snr_gamma'"):
        build_objective("ddpm", min_snr_gama=5)
    with pytest.raises(ValueError, match="prediction_type='sample' is not one of epsilon, v_prediction"):
        build_objective("ddpm", prediction_type="sample")
    with pytest.raises(ValueError, match="weighting_scheme='logit_normal' .* here that is timestep_sampling"):
        build_objective("flow_matching", weighting_scheme="logit_normal")


@pytest.mark.parametrize("options, message", [
    (dict(adaptive_noise_scale=0.1), "adaptive_noise_scale adds to noise_offset"),
    (dict(zero_terminal_snr=True, beta_schedule="squaredcos_cap_v2", learned_variance="learned_range"),
     "does not go with zero_terminal_snr"),
    (dict(zero_terminal_snr=True, v_pred_like_loss=0.1), "set max_timestep=999"),
    (dict(zero_terminal_snr=True, debiased_estimation_loss=True), "debiased_estimation_loss with epsilon"),
    (dict(min_timestep=500, max_timestep=100), "need 0 <= min_timestep <= max_timestep <= 1000"),
    (dict(min_timestep=1000, max_timestep=1000), "past the last index 999"),
    (dict(learned_variance="learned"), "learned_variance='learned' is not one of none, learned_range"),
    (dict(multires_noise_iterations=6, multires_noise_discount=0.0), "multires_noise_discount=0.0"),
    (dict(loss_type="huber", huber_c=0.0), "huber_c=0.0 must be > 0"),
])
def test_invalid_ddpm_options(options, message):
    with pytest.raises(ValueError, match=message):
        DDPM(**options)


def test_valid_edge_options_and_flow_checks():
    DDPM(zero_terminal_snr=True, v_pred_like_loss=0.1, max_timestep=999)  # the SNR-0 step left out
    DDPM(zero_terminal_snr=True, debiased_estimation_loss=True, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="set discrete_timesteps=True"):
        FlowMatching(min_timestep=100)
    with pytest.raises(ValueError, match="training_shift=0.0 must be > 0"):
        FlowMatching(training_shift=0.0)
    with pytest.raises(ValueError, match="'x0_preconditioned' for kohya's SD3 loss"):
        FlowMatching(model_prediction_type="sigma_scaled")
    with pytest.raises(ValueError, match="flux_shift' needs the image token count"):
        FlowMatching(timestep_sampling="flux_shift").noised(torch.zeros(1, 4, 2, 2), torch.Generator())


def test_objectives_run_on_the_meta_device():
    """The memory plan calls noised and loss on the meta device without a generator."""
    x0 = torch.empty(2, 4, 8, 8, device="meta")
    for objective, channels in ((FlowMatching(), 4), (_ddpm_everything_on(), 4),
                                (DDPM(beta_schedule="squaredcos_cap_v2", learned_variance="learned_range"), 8)):
        noised = objective.noised(x0, seq_len=16)
        assert noised.x_t.device.type == noised.t.device.type == "meta"
        mean, per_sample = objective.loss(torch.empty(2, channels, 8, 8, device="meta"), x0, noised)
        assert mean.device.type == "meta" and per_sample.shape == (2,)
