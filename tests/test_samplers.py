"""samplers.py against independent implementations: the FLUX Euler loop written out (bit for bit),
diffusers' schedulers (SD3 flow Euler, SDXL Euler / Euler ancestral / DDIM / DPM++ 2M, IF's DDPM),
SD3.5's DPM++ 2M formula written out, and the exact sampler of Gaussian data.

The fake denoisers are the exact denoiser of data x0 ~ N(MU, STD^2) per element, plus a small
fixed linear term and the conditioning, so every output is O(1) like a real model's."""
import math

import pytest
import torch


import samplers
from losses import alphas_cumprod, ddpm_betas, rescale_zero_terminal_snr

from samplers import APG, Guidance, Level, SkipLayerGuidance

pytestmark = pytest.mark.usefixtures("one_thread")

MU, STD = 0.3, 0.5
SHAPE = (2, 4, 8, 8)
SDXL = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def gaussian_x0(x, alpha, sigma, mu=MU, std=STD):
    """E[x0 | x] for x0 ~ N(mu, std^2) and x = alpha x0 + sigma eps."""
    return mu + alpha * std**2 / (alpha**2 * std**2 + sigma**2) * (x - alpha * mu)


def conds(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return (0.05 * torch.randn(1, *SHAPE[1:], generator=g).to(dtype),
            -0.05 * torch.randn(1, *SHAPE[1:], generator=g).to(dtype))


def start_noise(shape=SHAPE, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)


def per_sample(t, x):
    return t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


# --- flow ----------------------------------------------------------------------------------------

def flow_model(time_scale=1.0, perturb=0.05):
    """Velocity model at t = sigma * time_scale; skip_layers weakens the data term."""
    def model(x, t, cond, skip_layers=None):
        s = per_sample(t / time_scale, x)
        x0 = gaussian_x0(x, 1 - s, s) + cond * (0.5 if skip_layers else 1.0)
        return (x - x0) / s + perturb * s * x.roll(1, dims=-1)
    return model


def flux_schedule_by_hand(steps: int, seq_len: int, shift: bool) -> list[float]:
    """black-forest-labs/flux sampling.get_schedule written out in Python floats: linspace 1 -> 0,
    then time_shift(mu, 1, t) = e^mu / (e^mu + (1/t - 1)) with mu linear in the token count
    through (256, 0.5) and (4096, 1.15); the final 0 stays 0."""
    ts = [1 - i / steps for i in range(steps + 1)]
    if not shift:
        return ts
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq_len - 256)
    return [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) if t > 0 else 0.0 for t in ts]


def test_flux_sigmas_follow_the_reference_schedule():
    for steps in (1, 4, 28, 50):
        for seq_len in (256, 1000, 4096):
            for shift in (True, False):
                mine = samplers.flux_sigmas(steps, seq_len, shift)
                assert mine == pytest.approx(flux_schedule_by_hand(steps, seq_len, shift), rel=1e-12, abs=1e-15)


def euler_by_hand(velocity, noise, sigmas, pos, neg, cfg_scale):
    """The FLUX Euler loop as sample.py wrote it before samplers.py existed (true CFG on velocities)."""
    x = noise
    for t_curr, t_prev in zip(sigmas[:-1], sigmas[1:]):
        t_vec = torch.full((x.shape[0],), t_curr)
        v = velocity(x, t_vec, pos)
        if cfg_scale != 1.0:
            v_neg = velocity(x, t_vec, neg)
            v = v_neg + cfg_scale * (v - v_neg)
        x = x + (t_prev - t_curr) * v
    return x


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_flow_euler_is_the_flux_loop_bit_for_bit(cfg_scale):
    velocity = flow_model()
    pos, neg = conds()
    noise = start_noise()
    sigmas = samplers.flux_sigmas(12, 16)
    theirs = euler_by_hand(velocity, noise, sigmas, pos, neg, cfg_scale)
    mine = samplers.sample_flow(velocity, noise, sigmas, pos, neg, Guidance(scale=cfg_scale))
    assert torch.equal(mine, theirs)


def test_sd3_sigmas_and_flow_euler_match_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(20)
    sigmas = samplers.sd3_sigmas(20, shift=3.0)
    assert torch.allclose(torch.tensor(sigmas, dtype=torch.float32), scheduler.sigmas, rtol=0, atol=1e-7)
    assert sigmas[-2] == pytest.approx(3 * 0.002994 / (1 + 2 * 0.002994), rel=1e-3)  # shift applied twice

    model, (pos, neg), x = flow_model(time_scale=1000), conds(), start_noise()
    for t in scheduler.timesteps:
        t_vec = torch.full((x.shape[0],), float(t))
        v_pos, v_neg = model(x, t_vec, pos), model(x, t_vec, neg)
        x = scheduler.step(v_neg + 4.5 * (v_pos - v_neg), t, x).prev_sample
    mine = samplers.sample_flow(model, start_noise(), sigmas, pos, neg, Guidance(4.5), time_scale=1000)
    assert (mine - x).abs().max() < 1e-5


def reference_dpmpp_2m(denoised_fn, x, sigmas):
    """SD3.5's sd3_impls.sample_dpmpp_2m written out: fp32 sigma tensor, lambda = -log sigma."""
    previous = None
    for i in range(len(sigmas) - 1):
        denoised = denoised_fn(x, sigmas[i])
        lam, lam_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = lam_next - lam
        if previous is not None and sigmas[i + 1] != 0:
            r = (lam + sigmas[i - 1].log()) / h
            target = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
        else:
            target = denoised
        x = (torch.exp(-lam_next) / torch.exp(-lam)) * x - torch.expm1(-h) * target
        previous = denoised
    return x


def test_flow_dpmpp_2m_matches_the_sd35_reference_formula():
    model, (pos, neg), scale = flow_model(time_scale=1000), conds(), 5.0

    def denoised_fn(x, sigma):  # the reference: CFG on x0 = x - out * sigma
        t = torch.full((x.shape[0],), float(sigma) * 1000)
        x0_pos, x0_neg = x - model(x, t, pos) * sigma, x - model(x, t, neg) * sigma
        return x0_neg + (x0_pos - x0_neg) * scale

    sigmas = samplers.sd3_sigmas(15, shift=3.0)
    theirs = reference_dpmpp_2m(denoised_fn, start_noise(), torch.tensor(sigmas, dtype=torch.float32))
    mine = samplers.sample_flow(model, start_noise(), sigmas, pos, neg, Guidance(scale), "dpmpp_2m", 1000)
    assert (mine - theirs).abs().max() < 1e-5
    euler = samplers.sample_flow(model, start_noise(), sigmas, pos, neg, Guidance(scale), "euler", 1000)
    assert (mine - euler).abs().max() > 1e-3  # the second-order term does something


# --- guidance ------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["flow", "epsilon", "v"])
def test_apg_with_eta_1_no_threshold_no_momentum_is_cfg(prediction):
    """x0_cond + (w - 1)(x0_cond - x0_neg) = x0_neg + w (x0_cond - x0_neg): CFG, whose weights sum
    to 1, so it is the same on x0 as on eps, v or velocity; only rounding differs."""
    pos, neg = conds()
    cfg, apg = Guidance(6.0), Guidance(6.0, apg=APG(eta=1.0, norm_threshold=0.0, momentum=0.0))
    abar = alphas_cumprod(ddpm_betas("scaled_linear"))

    def run(guidance):
        if prediction == "flow":
            return samplers.sample_flow(flow_model(), start_noise(), samplers.sd3_sigmas(10), pos, neg, guidance,
                                        "dpmpp_2m")
        return samplers.sample_ddpm(ddpm_model(abar, prediction), start_noise(), samplers.ddpm_schedule(abar, 10),
                                    pos, neg, guidance, "dpmpp_2m", prediction)
    assert (run(apg) - run(cfg)).abs().max() < 1e-5
    assert (run(Guidance(6.0, apg=APG())) - run(cfg)).abs().max() > 1e-2  # the defaults change it


def test_apg_update_by_hand_over_two_steps():
    """Momentum, norm threshold and the parallel / orthogonal split, against the formulas."""
    g = torch.Generator().manual_seed(5)
    outputs = [torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(4)]
    apg = APG(eta=0.3, norm_threshold=2.0, momentum=-0.5)
    calls = iter(outputs)
    guider = samplers.Guider(lambda x, t, c: next(calls), "pos", "neg", Guidance(4.0, apg=apg), steps=2)
    x, level = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), Level(0.8, 0.6)
    running = torch.zeros_like(x)
    for step in range(2):
        guided = guider(x, torch.zeros(2), step, level, "epsilon")
        pos, neg = outputs[2 * step], outputs[2 * step + 1]
        x0_pos, x0_neg = (x - 0.6 * pos) / 0.8, (x - 0.6 * neg) / 0.8
        running = (x0_pos - x0_neg) + apg.momentum * running
        diff = running * torch.clamp(2.0 / running.flatten(1).norm(dim=1), max=1).view(-1, 1, 1, 1)
        unit = x0_pos / x0_pos.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        parallel = (diff * unit).flatten(1).sum(1).view(-1, 1, 1, 1) * unit
        x0 = x0_pos + 3.0 * ((diff - parallel) + 0.3 * parallel)
        assert torch.allclose(guided, (x - 0.8 * x0) / 0.6, rtol=0, atol=1e-12)


def test_apg_with_eta_0_moves_x0_orthogonally_to_the_conditional_x0():
    g = torch.Generator().manual_seed(6)
    pos, neg = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    model = lambda x, t, c: pos if c == "pos" else neg
    guider = samplers.Guider(model, "pos", "neg", Guidance(7.0, apg=APG(eta=0.0, norm_threshold=0.0, momentum=0.0)), 1)
    x, level = torch.randn(2, 3, 4, 4, generator=g), Level(0.9, math.sqrt(1 - 0.81))
    x0_guided, _ = samplers.x0_and_eps(guider(x, torch.zeros(2), 0, level, "v"), x, level, "v")
    x0_pos, _ = samplers.x0_and_eps(pos, x, level, "v")
    cosine = torch.nn.functional.cosine_similarity((x0_guided - x0_pos).flatten(1), x0_pos.flatten(1))
    assert cosine.abs().max() < 1e-5 and (x0_guided - x0_pos).abs().max() > 0.1


def test_skip_layer_guidance_runs_only_inside_its_step_range():
    skip_steps, step = [], {"i": -1}
    base = flow_model(time_scale=1000)

    def model(x, t, cond, skip_layers=None):
        if skip_layers is not None:
            assert skip_layers == [7, 8, 9] and cond is pos
            skip_steps.append(step["i"])
        elif cond is pos:
            step["i"] += 1
        return base(x, t, cond, skip_layers)

    pos, neg = conds()
    slg = SkipLayerGuidance()
    sigmas = samplers.sd3_sigmas(50)
    with_slg = samplers.sample_flow(model, start_noise(), sigmas, pos, neg, Guidance(4.0, slg=slg), "dpmpp_2m", 1000)
    assert skip_steps == list(range(1, 10))  # 0.01 * 50 < i < 0.2 * 50, SD3.5 medium's setting
    plain = samplers.sample_flow(base, start_noise(), sigmas, pos, neg, Guidance(4.0), "dpmpp_2m", 1000)
    assert (with_slg - plain).abs().max() > 1e-3

    guider = samplers.Guider(base, pos, neg, Guidance(4.0, slg=slg), steps=50)
    x, t, level = start_noise(), torch.full((2,), 700.0), Level.flow(0.7)
    v_pos, v_neg, v_skip = base(x, t, pos), base(x, t, neg), base(x, t, pos, skip_layers=[7, 8, 9])
    cfg = v_neg + 4.0 * (v_pos - v_neg)
    assert torch.equal(guider(x, t, 5, level, "flow"), cfg + (v_pos - v_skip) * 2.5)
    assert torch.equal(guider(x, t, 10, level, "flow"), cfg) and torch.equal(guider(x, t, 0, level, "flow"), cfg)


# --- DDPM (SDXL) ---------------------------------------------------------------------------------

def ddpm_model(abar, prediction, perturb=0.05):
    """eps or v model at the DDPM index t of the (T,) table abar."""
    def model(x, t, cond, skip_layers=None):
        a_bar = per_sample(abar[t.long()], x)
        a, s = a_bar.sqrt(), (1 - a_bar).sqrt()
        x0 = gaussian_x0(x, a, s) + cond
        eps = (x - a * x0) / s
        out = eps if prediction == "epsilon" else a * eps - s * x0
        return out + perturb * per_sample(torch.tanh(t / 1000), x) * x.roll(1, dims=-1)
    return model


def diffusers_loop(scheduler, model, x, cond, neg, scale, generator=None):
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        t_vec = torch.full((x.shape[0],), float(t))
        out_pos, out_neg = model(model_in, t_vec, cond), model(model_in, t_vec, neg)
        x = scheduler.step(out_neg + scale * (out_pos - out_neg), t, x, generator=generator).prev_sample
    return x


def diffusers_scheduler(sampler, steps, prediction, spacing, zero_snr):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler)

    classes = {"euler": (EulerDiscreteScheduler, {}), "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
               "ddim": (DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False)),
               "dpmpp_2m": (DPMSolverMultistepScheduler, dict(use_karras_sigmas=spacing == "karras", solver_order=2,
                                                              algorithm_type="dpmsolver++"))}
    cls, extra = classes[sampler]
    scheduler = cls(**SDXL, prediction_type="v_prediction" if prediction == "v" else "epsilon", steps_offset=1,
                    timestep_spacing="leading" if spacing == "karras" else spacing,
                    rescale_betas_zero_snr=zero_snr, **extra)
    scheduler.set_timesteps(steps)
    return scheduler


DDPM_CASES = [  # sampler, steps, spacing ("karras": Karras sigmas), zero terminal SNR
    ("euler", 30, "leading", False), ("euler", 25, "trailing", False),
    ("euler_ancestral", 30, "leading", False),
    ("ddim", 30, "leading", False), ("ddim", 25, "trailing", False),
    ("dpmpp_2m", 25, "karras", False), ("dpmpp_2m", 10, "karras", False), ("dpmpp_2m", 20, "trailing", False),
]
ZERO_SNR_CASES = [(sampler, 25, "trailing", True) for sampler in ("euler", "euler_ancestral", "ddim", "dpmpp_2m")]


def ddpm_parity(sampler, steps, spacing, zero_snr, prediction, own_table=False):
    """Max |ours - diffusers| with the same model, noise and generator. Both read diffusers' fp32
    abar table unless own_table (then ours reads losses' fp64 one)."""
    scheduler = diffusers_scheduler(sampler, steps, prediction, spacing, zero_snr)
    betas = ddpm_betas("scaled_linear")
    ours = alphas_cumprod(rescale_zero_terminal_snr(betas) if zero_snr else betas)
    table = ours if own_table else scheduler.alphas_cumprod.double()
    if zero_snr:
        table[-1] = 0.0  # diffusers' k-samplers store 2**-24 there; samplers.py floors at it itself
    schedule = samplers.ddpm_schedule(table, steps, "leading" if spacing == "karras" else spacing, 1,
                                      karras=spacing == "karras",
                                      final_sigma="sigma_min" if sampler == "ddim" else "zero")
    assert [float(t) for t in scheduler.timesteps] == list(schedule.timesteps)
    model, (pos, neg), noise = ddpm_model(ours, prediction), conds(), start_noise()
    # diffusers' k-diffusion schedulers keep x / alpha; trailing ones start at sigma_max * noise, not
    # sqrt(sigma_max^2 + 1) * noise: give them the same start x = noise as everyone else
    scale_in = math.sqrt(1 + scheduler.sigmas[0].item() ** 2) if sampler.startswith("euler") else 1.0
    theirs = diffusers_loop(scheduler, model, noise * scale_in, pos, neg, 5.0, torch.Generator().manual_seed(7))
    mine = samplers.sample_ddpm(model, noise, schedule, pos, neg, Guidance(5.0), sampler, prediction,
                                torch.Generator().manual_seed(7))
    return (mine - theirs).abs().max().item()


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("case", DDPM_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_ddpm_samplers_match_diffusers(case, prediction):
    assert ddpm_parity(*case, prediction) < 1e-5


@pytest.mark.parametrize("case", ZERO_SNR_CASES, ids=lambda c: c[0])
def test_zero_terminal_snr_samplers_match_diffusers(case):
    assert ddpm_parity(*case, "v") < 1e-5


@pytest.mark.parametrize("case", [DDPM_CASES[0], DDPM_CASES[5]], ids=["euler", "dpmpp_2m-karras"])
def test_ddpm_samplers_on_the_fp64_table(case):
    """losses' fp64 abar differs from diffusers' fp32 cumprod by up to ~3e-5 relative at t = 999,
    which moves the sample by up to ~3e-5 (measured 2.9e-5 with Karras sigmas)."""
    assert ddpm_parity(*case, "epsilon", own_table=True) < 5e-5


def test_ddpm_timesteps_match_diffusers():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    for steps in range(1, 61):
        for spacing in ("leading", "trailing"):
            euler = EulerDiscreteScheduler(**SDXL, timestep_spacing=spacing, steps_offset=1)
            euler.set_timesteps(steps)
            assert samplers.ddpm_timesteps(steps, spacing, 1) == euler.timesteps.long().tolist()
        ddim = DDIMScheduler(**SDXL, timestep_spacing="linspace")
        ddim.set_timesteps(steps)
        assert samplers.ddpm_timesteps(steps, "linspace") == ddim.timesteps.tolist()


def test_ddpm_argument_errors():
    zero_snr = alphas_cumprod(rescale_zero_terminal_snr(ddpm_betas()))
    schedule = samplers.ddpm_schedule(zero_snr, 10, "trailing")
    model = ddpm_model(zero_snr, "v")
    with pytest.raises(ValueError, match="use prediction='v'"):
        samplers.sample_ddpm(model, start_noise(), schedule, conds()[0], sampler="ddim", prediction="epsilon")
    with pytest.raises(ValueError, match="pass generator="):
        samplers.sample_ddpm(model, start_noise(), schedule, conds()[0], sampler="euler_ancestral")
    with pytest.raises(ValueError, match="sampler='heun' is not one of"):
        samplers.sample_ddpm(model, start_noise(), schedule, conds()[0], sampler="heun")
    with pytest.raises(ValueError, match="spacing='even' is not one of"):
        samplers.ddpm_timesteps(10, "even")


# --- DeepFloyd IF --------------------------------------------------------------------------------

def if_model(abar, seen=None):
    """eps (channels 0:3) and learned-range variance values in [-1, 1] (channels 3:6)."""
    base = ddpm_model(abar, "epsilon")

    def model(x, t, cond, skip_layers=None):
        if seen is not None:
            seen.append(t[0].item())
        return torch.cat([base(x, t, cond), torch.tanh(x + cond)], dim=1)
    return model


def diffusers_if(respacing, threshold_max, scale, dtype, variance_type="learned_range"):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type=variance_type, thresholding=True,
                              dynamic_thresholding_ratio=0.95, sample_max_value=threshold_max)
    if dtype == torch.float64:  # run diffusers' arithmetic in fp64 on the fp64 table
        scheduler.alphas_cumprod, scheduler.one = samplers.if_alphas_cumprod(), torch.tensor(1.0, dtype=torch.float64)
    scheduler.set_timesteps(timesteps=samplers.space_timesteps(1000, respacing))
    model, (pos, neg), x = if_model(samplers.if_alphas_cumprod()), conds(dtype), start_noise((2, 3, 8, 8), dtype)
    pos, neg = pos[:, :3], neg[:, :3]
    generator = torch.Generator().manual_seed(9)
    for t in scheduler.timesteps:
        t_vec = torch.full((2,), float(t))
        out_pos, out_neg = model(x, t_vec, pos), model(x, t_vec, neg)
        eps = out_neg[:, :3] + scale * (out_pos[:, :3] - out_neg[:, :3])  # IF: CFG on eps, variance of the prompt
        eps = torch.cat([eps, out_pos[:, 3:]], dim=1) if variance_type == "learned_range" else eps
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x


def our_if(respacing, threshold_max, scale, dtype, seen=None, model_in_fp32=False, learned_variance=True):
    pos, neg = conds(dtype)
    model = if_model(samplers.if_alphas_cumprod(), seen)
    if model_in_fp32:  # the sampler's arithmetic in fp64, the model's as in an fp32 run
        model = (lambda fp32: lambda x, t, c: fp32(x.float(), t, c.float()).double())(model)
    return samplers.sample_if(model, start_noise((2, 3, 8, 8), dtype),
                              pos[:, :3], neg[:, :3], respacing, Guidance(scale), threshold_max, 0.95,
                              torch.Generator().manual_seed(9), learned_variance=learned_variance)


IF_CASES = [("smart50", 1.0, 4.0), ("fast27", 1.5, 7.0), ("150", 1.5, 7.0)]


@pytest.mark.parametrize("case", IF_CASES, ids=lambda c: c[0])
def test_if_sampler_matches_diffusers_ddpm_learned_range_thresholding(case, monkeypatch):
    """In fp64 the two are the same algorithm (measured <= 3e-15). In fp32 diffusers is off by about
    1e-4 (measured 7.9e-5 to 9.8e-5): its fp32 cumprod and its 1 - abar_t / abar_prev for the small
    respaced betas near t = 0; ours (fp64 coefficients) stays within 7.5e-7 of its fp64 run on the
    same noise and model."""
    seen = []
    assert (our_if(*case, torch.float64, seen) - diffusers_if(*case, torch.float64)).abs().max() < 1e-12
    assert seen[::2] == [float(t) for t in samplers.space_timesteps(1000, case[0])]  # original indices
    ours32 = our_if(*case, torch.float32)
    assert (ours32 - diffusers_if(*case, torch.float32)).abs().max() < 2e-4
    # the fp64 run on the fp32 run's noise draws (fp64 draws are other numbers)
    monkeypatch.setattr(samplers, "_randn_like", lambda x, g: torch.randn(x.shape, generator=g).to(x.dtype))
    assert (ours32.double() - our_if(*case, torch.float64, model_in_fp32=True)).abs().max() < 2e-6


def test_if_sampler_fixed_small_variance_matches_diffusers():
    """learned_variance=False: the variance channels are ignored, the step uses the posterior
    variance, as diffusers' DDPMScheduler with variance_type="fixed_small" (SimpleTuner's advice
    for IF LoRAs)."""
    case = ("smart50", 1.0, 4.0)
    ours = our_if(*case, torch.float64, learned_variance=False)
    assert (ours - diffusers_if(*case, torch.float64, variance_type="fixed_small")).abs().max() < 1e-12
    assert (ours - our_if(*case, torch.float64)).abs().max() > 1e-3  # the variance channels mattered before


def test_space_timesteps_and_respaced_betas():
    expected_lengths = {"smart50": 50, "fast27": 27, "smart27": 27, "smart100": 100, "smart185": 185, "150": 150,
                        "super40": 40, "ddim25": 25, "1000": 1000}
    for respacing, length in expected_lengths.items():
        kept = samplers.space_timesteps(1000, respacing)
        assert len(kept) == length and kept == sorted(kept, reverse=True) and kept[-1] == 0, respacing
    assert samplers.space_timesteps(1000, "smart50")[:4] == [999, 988, 977, 966]
    assert samplers.space_timesteps(1000, "fast27")[:5] == [999, 800, 799, 600, 599]  # "10,10,3,2,2"
    assert samplers.space_timesteps(1000, "ddim25")[:2] == [960, 920]
    assert samplers.space_timesteps(300, "10,15,20")[:3] == [299, 294, 289]
    with pytest.raises(ValueError, match="cannot divide a section of 500 steps into 501"):
        samplers.space_timesteps(1000, "501,1")
    abar = samplers.if_alphas_cumprod()
    kept = samplers.space_timesteps(1000, "smart50")
    betas = samplers.respaced_betas(abar, kept)
    assert torch.allclose(torch.cumprod(1 - betas, 0), abar[sorted(kept)], rtol=1e-9, atol=0)


def test_q_sample_matches_diffusers_add_noise():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x0, noise = torch.rand(3, 3, 8, 8) * 2 - 1, start_noise((3, 3, 8, 8))
    t = torch.tensor([0, 250, 999])
    theirs = scheduler.add_noise(x0, noise, t)
    assert (samplers.q_sample(x0, t, noise, scheduler.alphas_cumprod) - theirs).abs().max() < 1e-6
    mine = samplers.q_sample(x0, t, noise, samplers.if_alphas_cumprod())
    assert (mine - theirs).abs().max() < 1e-5  # diffusers' fp32 cumprod: measured 5.6e-6 at t = 999
    assert torch.equal(samplers.q_sample(x0[1:2], 250, noise[1:2], samplers.if_alphas_cumprod()), mine[1:2])


def test_dynamic_threshold():
    x0 = torch.linspace(-3, 3, 2 * 100).view(2, 1, 10, 10)
    out = samplers.dynamic_threshold(x0, 0.95, 1.5)
    assert out.abs().max() == 1.0  # clipped at s = 1.5, then divided by it
    assert torch.equal(samplers.dynamic_threshold(x0, 0.95, 1.0), x0.clamp(-1, 1))
    small = 0.5 * torch.rand(1, 3, 4, 4)
    assert torch.equal(samplers.dynamic_threshold(small), small)  # s clamps to 1: nothing to do


# --- the exact sampler of Gaussian data ----------------------------------------------------------
# For x0 ~ N(MU, STD^2) per element the probability-flow ODE maps the start noise z to MU + STD z
# (the monotone map between the two Gaussians); the samplers' discretisation error shrinks with the
# step count. Measured max |x - (MU + STD z)| at these step counts: flux euler 200: 0.030, sd3
# dpmpp_2m 100: 0.028, ddpm euler / ddim 200: 0.039, dpmpp_2m karras 50: 0.014 (SDXL's first
# abar is 0.0047, not 0: that alone leaves 0.010). Euler ancestral converges slowly (each step goes
# down to sigma_next^2 / sigma and re-noises: a first-order variance deficit): std 0.484 at 500
# steps. A sign or scale error in a step is off by 0.1 to 1.

ANALYTIC_SHAPE = (1, 4, 32, 32)  # 4096 values: mean and std to about 0.008 and 0.0055 at 1 sigma


@pytest.mark.parametrize("sampler, sigmas", [("euler", samplers.flux_sigmas(200, 4096)),
                                             ("dpmpp_2m", samplers.sd3_sigmas(100, 3.0))])
def test_flow_samplers_land_on_gaussian_data(sampler, sigmas):
    model, noise = flow_model(perturb=0.0), start_noise(ANALYTIC_SHAPE)
    x = samplers.sample_flow(model, noise, sigmas, torch.zeros(()), sampler=sampler)
    assert (x - (MU + STD * noise)).abs().max() < 0.05


@pytest.mark.parametrize("sampler, steps, karras", [("euler", 200, False), ("ddim", 200, False),
                                                    ("dpmpp_2m", 50, True), ("euler_ancestral", 500, False)])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddpm_samplers_land_on_gaussian_data(sampler, steps, karras, prediction):
    abar = alphas_cumprod(ddpm_betas("scaled_linear"))
    model, noise = ddpm_model(abar, prediction, perturb=0.0), start_noise(ANALYTIC_SHAPE)
    schedule = samplers.ddpm_schedule(abar, steps, "trailing", karras=karras)
    x = samplers.sample_ddpm(model, noise, schedule, torch.zeros(()), sampler=sampler, prediction=prediction,
                             generator=torch.Generator().manual_seed(2))
    if sampler == "euler_ancestral":
        assert abs(x.mean().item() - MU) < 0.02 and abs(x.std().item() - STD) < 0.03
    else:
        assert (x - (MU + STD * noise)).abs().max() < 0.05


def test_if_sampler_with_the_exact_variance_lands_on_gaussian_data():
    """For Gaussian data the reverse step is Gaussian at any step size, with variance
    beta_posterior + coef_x0^2 Var[x0 | x] inside [beta_posterior, beta] (data std <= 1), so a
    model that reports it in IF's learned-range form makes respaced DDPM exact. The data sit well
    inside [-1, 1] (the percentile of |x0| stays under 1), so dynamic thresholding leaves them be."""
    mu, std = 0.3, 0.2
    abar = samplers.if_alphas_cumprod()
    kept = samplers.space_timesteps(1000, "smart50")
    previous = {t: (abar[p].item() if p >= 0 else 1.0) for t, p in zip(kept, kept[1:] + [-1])}

    def model(x, t, cond):
        t_int = int(t[0])
        abar_t, abar_prev = abar[t_int].item(), previous[t_int]
        a, s = math.sqrt(abar_t), math.sqrt(1 - abar_t)
        eps = (x - a * gaussian_x0(x, a, s, mu, std)) / s
        beta = 1 - abar_t / abar_prev
        posterior = beta * (1 - abar_prev) / (1 - abar_t)
        exact = posterior + (beta * math.sqrt(abar_prev) / (1 - abar_t)) ** 2 * std**2 * s**2 / (a**2 * std**2 + s**2)
        frac = math.log(exact / posterior) / math.log(beta / posterior) if abar_prev < 1 else 0.0  # last: no noise
        return torch.cat([eps, torch.full_like(x, 2 * frac - 1)], dim=1)

    noise = start_noise((1, 3, 64, 64))
    x = samplers.sample_if(model, noise, None, respacing="smart50", generator=torch.Generator().manual_seed(4))
    # measured 0.3005, 0.1998; the variance pinned to beta_posterior (v = -1) gives std 0.182, to beta 0.213
    assert abs(x.mean().item() - mu) < 0.006 and abs(x.std().item() - std) < 0.006


def test_initial_noise_is_the_cpu_generators():
    a = samplers.initial_noise((1, 4, 8, 8), torch.Generator().manual_seed(11), dtype=torch.bfloat16)
    b = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(11)).bfloat16()
    assert torch.equal(a, b)
