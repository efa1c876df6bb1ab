"""Training objectives: flow matching (FLUX.1, SD3 / SD3.5) and DDPM (SDXL, DeepFloyd IF).

Both objectives have the same three calls, which the training loop and the memory plan use:

    noised = objective.noised(x0, generator, seq_len)   # draw the noise level and noise, build x_t
    out = <the family's network>(noised.x_t, noised.t, ...)
    loss, per_sample = objective.loss(out, x0, noised, mask)

and `noised_at(x0, noise, level)` for validation at fixed noise levels with fixed noise.
`Noised.level` is a noise level in [0, 1] for every objective (flow: sigma; DDPM: t / T), for the
per-level loss bins (`LossBins`) and reports.

Flow matching (`FlowMatching`). A training example is a clean latent x0, a noise draw
eps ~ N(0, I) and a noise level sigma in [0, 1]. The model sees the point on the straight line

    x_t = (1 - sigma) * x0 + sigma * eps

and learns the velocity of that line, d x_t / d sigma = eps - x0. Sampling integrates from
sigma = 1 down to 0 with Euler steps x <- x + (sigma_next - sigma) * v. `Noised.t` is sigma
itself: FLUX takes it as its `timesteps` input (x1000 inside its embedding); SD3's MMDiT takes
sigma * 1000 (the family multiplies).

DDPM (`DDPM`). x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at an integer index t in 0..T-1,
the network predicts eps or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, optionally (IF) with a
learned variance in extra output channels.

The options and their names follow kohya-ss/sd-scripts (library/train_util.py,
custom_train_functions.py, flux_train_utils.py, sd3_train_utils.py) and, for the learned
variance, openai/improved-diffusion and deep-floyd/IF (gaussian_diffusion.py); every deviation
is said where it is made. `build_objective(kind, **options)` makes either from config values.

The noise-level conventions live here once, at module level, for the samplers too:
`shift_sigmas`, `flux_mu`, `time_shift` (flow) and `ddpm_betas`, `rescale_zero_terminal_snr`,
`alphas_cumprod`, `ddpm_sigmas` (DDPM).

`LossBins` accumulates the loss per noise-level bin, for the "which noise levels does my model
get wrong" plot.
"""
import difflib
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

TIMESTEP_SAMPLINGS = ("uniform", "sigmoid", "shift", "flux_shift", "logit_normal", "mode")
PREDICTION_TYPES = ("raw", "additive", "x0_preconditioned")
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "cosmap")
LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
DDPM_PREDICTION_TYPES = ("epsilon", "v_prediction")
LEARNED_VARIANCES = ("none", "learned_range")

# flux_shift: mu is linear in the image token count through these two points
# (black-forest-labs/flux sampling.get_schedule: base_shift 0.5, max_shift 1.15).
FLUX_SHIFT_POINTS = ((256, 0.5), (4096, 1.15))

# mode sampling u -> 1 - u - s(cos^2(pi u / 2) - 1 + u) stays a monotone map of
# [0, 1] onto [0, 1] only for -1 <= s <= 1 / (pi/2 - 1).
MODE_SCALE_RANGE = (-1.0, 1.0 / (math.pi / 2 - 1))

# SD3's discrete flow timesteps: t in 0..999, sigma = t / 1000 (kohya's FlowMatchEulerDiscreteScheduler(1000)).
FLOW_TIMESTEPS = 1000
# sigma_sqrt weighting is sigma^-2; below the first discrete SD3 step it is taken at this sigma
# (kohya's weight is inf at sigma = 0, and its x0-preconditioned loss then NaN).
SIGMA_WEIGHT_FLOOR = 1.0 / FLOW_TIMESTEPS
# kohya caps the SNR at 1000 in scale_v_pred_loss_like_noise_pred, v_pred_like_loss and the
# debiased estimation ("if timestep is 0, snr_t is inf").
SNR_CAP = 1000.0


def _check_choice(option: str, value: str, valid: tuple[str, ...], hint: str = "") -> None:
    if value not in valid:
        raise ValueError(f"{option}={value!r} is not one of {', '.join(valid)}.{hint}")


def shift_sigmas(sigma: Tensor, shift: float) -> Tensor:
    """s -> shift*s / (1 + (shift-1)*s): pushes sigma towards 1 (more noise) for shift > 1.

    It is the same map as time_shift below with shift = e^mu.
    """
    return shift * sigma / (1 + (shift - 1) * sigma)


def flux_mu(image_seq_len: int) -> float:
    """The FLUX resolution-dependent shift exponent: 0.5 at 256 tokens, 1.15 at 4096."""
    (x1, y1), (x2, y2) = FLUX_SHIFT_POINTS
    slope = (y2 - y1) / (x2 - x1)
    return y1 + slope * (image_seq_len - x1)


def time_shift(mu: float, sigma: Tensor) -> Tensor:
    """s -> e^mu / (e^mu + (1/s - 1)), black-forest-labs/flux's time_shift with exponent 1."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


# --- DDPM noise schedules (SDXL, DeepFloyd IF) ----------------------------------------------------
# One place for the discrete schedules: training (losses.DDPM) and the samplers read them from here.
# A DDPM index t in 0..T-1 has x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; its k-diffusion sigma is
# sqrt((1 - abar_t) / abar_t), the noise-to-signal ratio of the equivalent x0 + sigma eps.

BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")


def ddpm_betas(schedule: str = "scaled_linear", num_steps: int = 1000, beta_start: float = 0.00085,
               beta_end: float = 0.012, max_beta: float = 0.999) -> Tensor:
    """(T,) float64 betas.
      scaled_linear      linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2   (SD 1.x, SDXL)
      linear             linspace(beta_start, beta_end, T)
      squaredcos_cap_v2  1 - abar(t+1)/abar(t), abar(t) = cos^2((t/T + 0.008)/1.008 * pi/2),
                         each beta capped at max_beta                           (DeepFloyd IF)"""
    _check_choice("beta_schedule", schedule, BETA_SCHEDULES)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)

    def abar(t: float) -> float:
        return math.cos((t / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar(i + 1) / abar(i), max_beta) for i in range(num_steps)], dtype=torch.float64)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas whose last step has zero SNR (Lin et al. 2024, 'Common Diffusion Noise Schedules and
    Sample Steps are Flawed', Algorithm 1): sqrt(abar) shifted and scaled to end at exactly 0."""
    sqrt_abar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def alphas_cumprod(betas: Tensor) -> Tensor:
    """(T,) float64 abar_t = prod_{s <= t} (1 - beta_s)."""
    return torch.cumprod(1 - betas.double(), dim=0)


def ddpm_sigmas(abar: Tensor) -> Tensor:
    """(T,) float64 k-diffusion sigmas sqrt((1 - abar) / abar) of the DDPM indices."""
    return ((1 - abar) / abar).sqrt()


# --- What every objective shares -------------------------------------------------------------------

@dataclass
class Noised:
    """One batch noised by an objective: what the network sees and what the loss needs."""
    t: Tensor      # (B,) the objective's time: sigma in [0, 1] fp32 (flow) or the DDPM index, long, 0..T-1
    level: Tensor  # (B,) fp32 noise level in [0, 1] for loss bins and reports (flow: sigma; DDPM: t / T)
    noise: Tensor  # (B, C, H, W) fp32, the noise the target is built from
    x_t: Tensor    # (B, C, H, W) the network input, in x0's dtype


def _per_sample(value: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so it broadcasts against `like`."""
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def scheduled_huber_c(schedule: str, huber_c: float, level: Tensor, signal_fraction: Tensor) -> Tensor:
    """(B,) pseudo-Huber threshold c per sample (kohya's scheduled Huber, sd-scripts PR #1228).

    level: the noise level in [0, 1] (flow: sigma; DDPM: t / T). signal_fraction: a / (a + b) for
    x_t = a x0 + b eps (flow: 1 - sigma; DDPM: sqrt(abar) / (sqrt(abar) + sqrt(1 - abar))).
      constant     c = huber_c
      exponential  c = huber_c ** level. kohya: exp(-alpha t), alpha = -ln(huber_c) / T, which is
                   huber_c ** (t / T); for flow kohya's t is 1000 sigma with T = 1000.
      snr          c = huber_c + (1 - huber_c) signal_fraction^2. kohya: (1 - huber_c) / (1 + r)^2 + huber_c
                   with r = b / a the noise-to-signal ratio (DDPM sqrt((1 - abar) / abar),
                   flow sigma / (1 - sigma)), and 1 / (1 + r) = a / (a + b), finite also where a = 0.
    Both schedules give c = 1 on clean inputs and c = huber_c on pure noise. kohya's huber_scale
    (a factor on the constant and exponential c, default 1.0) is not offered.
    """
    if schedule == "exponential":
        return huber_c ** level
    if schedule == "snr":
        return huber_c + (1 - huber_c) * signal_fraction**2
    return torch.full_like(level, huber_c)


def elementwise_loss(loss_type: str, prediction: Tensor, target: Tensor, huber_c: Tensor | None = None) -> Tensor:
    """The loss at every element, fp32, on d = prediction - target (kohya's conditional_loss):
      l2         d^2
      huber      2c (sqrt(d^2 + c^2) - c)   (pseudo-Huber: ~d^2 for |d| << c, ~2c|d| beyond)
      smooth_l1  2 (sqrt(d^2 + c^2) - c)    (~d^2/c for |d| << c, ~2|d| beyond)
    huber_c: (B,) threshold per sample (scheduled_huber_c), needed by huber and smooth_l1."""
    d = prediction.float() - target.float()
    if loss_type == "l2":
        return d.square()
    c = _per_sample(huber_c, d)
    smooth = torch.sqrt(d.square() + c.square()) - c
    return 2 * c * smooth if loss_type == "huber" else 2 * smooth


def _loss_mask(mask: Tensor, like: Tensor) -> Tensor:
    """(B, 1, h, w) or (B, h, w) mask -> (B, 1, h, w) fp32, checked against like (B, C, h, w)."""
    if mask.ndim == like.ndim - 1:
        mask = mask.unsqueeze(1)
    if mask.ndim != like.ndim or mask.shape[0] != like.shape[0] or mask.shape[1] != 1 \
            or mask.shape[2:] != like.shape[2:]:
        raise ValueError(f"loss mask of shape {tuple(mask.shape)} does not fit a loss of shape {tuple(like.shape)}: "
                         "give (B, 1, h, w) or (B, h, w) at the latent resolution.")
    return mask.float()


def per_sample_mean(elementwise: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B,) mean of an elementwise loss over every non-batch dim.

    With a mask (B, 1, h, w) or (B, h, w) in [0, 1], broadcast over channels: the per-sample loss
    is sum(mask * loss) / sum(mask) over that sample, so each sample's loss is the mean over its
    kept area. An element with mask 0 contributes exactly nothing: not to the value (even when it
    is inf or NaN) nor to any other element's gradient, and its own gradient is 0 (NaN if its
    value is). A sample whose mask is all zero has loss 0. In the batch mean every
    sample still counts 1 / B. (kohya's apply_masked_loss multiplies by the mask and takes the
    plain mean, so there a half-masked sample weighs half; here it weighs the same.)
    """
    if mask is None:
        return elementwise.flatten(1).mean(dim=1)
    m = _loss_mask(mask, elementwise).expand_as(elementwise)
    kept = torch.where(m > 0, m * elementwise, torch.zeros_like(elementwise))
    total = m.flatten(1).sum(dim=1)
    return kept.flatten(1).sum(dim=1) / total.clamp_min(torch.finfo(total.dtype).tiny)


def _finish(per_sample: Tensor, sample_weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """(scalar mean, (B,) per-sample), the per-sample loss times sample_weight (B,) when given."""
    if sample_weight is not None:
        per_sample = per_sample * sample_weight.to(per_sample)
    return per_sample.mean(), per_sample


class _Draws:
    """Random draws for one batch: from `generator` on its device, then moved to `device`; without a
    generator, drawn on `device` itself (the meta device in the memory plan)."""

    def __init__(self, generator: torch.Generator | None, device):
        self.generator = generator
        self.device = device
        self.draw_device = generator.device if generator is not None else device

    def normal(self, *shape: int) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.draw_device).to(self.device)

    def uniform(self, *shape: int) -> Tensor:
        return torch.rand(shape, generator=self.generator, device=self.draw_device).to(self.device)

    def integers(self, low: int, high: int, n: int) -> Tensor:
        """(n,) long in [low, high)."""
        return torch.randint(low, high, (n,), generator=self.generator, device=self.draw_device).to(self.device)

    def python_uniform(self) -> float:
        """One float in [0, 1) as a Python number (a shape depends on it), on the CPU without a generator."""
        device = self.draw_device if self.generator is not None else "cpu"
        return float(torch.rand((), generator=self.generator, device=device))


# --- Flow matching (FLUX.1, SD3 / SD3.5) -----------------------------------------------------------

class FlowMatching:
    """Sigma sampling, noising, target and loss for flow-matching training.

    timestep_sampling (how sigma is drawn, n ~ N(0, 1), u ~ U(0, 1)):
      uniform       sigma = u
      sigmoid       sigma = sigmoid(sigmoid_scale * n)          (x-flux, ai-toolkit)
      shift         the sigmoid draw, then shift_sigmas(., discrete_flow_shift)
      flux_shift    the sigmoid draw, then time_shift(mu(image_seq_len), .)
      logit_normal  sigma = sigmoid(logit_mean + logit_std * n)  (SD3 paper)
      mode          sigma = 1 - u - mode_scale * (cos^2(pi u / 2) - 1 + u)   (SD3 paper)
    Note e^1.15 = 3.1582: `shift` with the default shift is `flux_shift` at
    4096 tokens (1024x1024 images) used at every resolution.
    Then, as kohya's SD3 (sd3_train_utils.get_noisy_model_input_and_timesteps):
      training_shift      sigma <- shift_sigmas(sigma, training_shift); 1.0 (default) leaves it.
      discrete_timesteps  t = floor(sigma (max_timestep - min_timestep) + min_timestep),
                          sigma = t / 1000 (default False: sigma stays continuous).
    kohya's SD3 draws u from its `weighting_scheme` density (logit_normal, mode, else uniform);
    here that is timestep_sampling, and weighting_scheme below is only the loss weighting. SD3 /
    SD3.5 as kohya trains it: timestep_sampling="logit_normal", discrete_timesteps=True,
    model_prediction_type="x0_preconditioned", training_shift (kohya default 1.0; the models
    sample with shift 3.0). kohya casts t to the weight dtype (bf16 rounds t above 256); here
    sigma = t / 1000 stays fp32.

    model_prediction_type, how the output becomes the prediction, and what the sampler must do:
      raw                prediction = out, target = noise - x0 (the velocity).
                         Sampler: v = out; x <- x + (sigma_next - sigma) v.
      additive           prediction = out + x_t, target = noise - x0.
                         Sampler: v = out + x_t.
      x0_preconditioned  prediction = x_t - sigma out, target = x0 (kohya's SD3 loss; SD3's
                         `calculate_denoised`). The output is still a velocity:
                         x_t - sigma out - x0 = sigma (v - out), so this is raw with loss weight
                         sigma^2. Sampler: v = out, exactly as raw (x0_hat = x_t - sigma out).
    kohya's FLUX `sigma_scaled` is left out on purpose: for FLUX it turns the output into an x0
    estimate while the target stays a velocity.

    weighting_scheme, a loss weight per sample (kohya's compute_loss_weighting_for_sd3):
      none         1
      sigma_sqrt   sigma^-2 (sigma floored at 1/1000): with x0_preconditioned it gives back the
                   plain velocity loss; kohya gives inf at sigma = 0
      cosmap       2 / (pi (1 - 2 sigma + 2 sigma^2))
    kohya applies it only with sigma_scaled (FLUX) or always (SD3); here it applies to every
    prediction type.

    loss_type, elementwise on d = prediction - target (see elementwise_loss), then the mean over
    all non-batch dims (or the masked mean, see per_sample_mean) gives one loss per sample.
    huber_schedule, the threshold c per sample from sigma (see scheduled_huber_c):
      constant     c = huber_c
      exponential  c = huber_c ** sigma. kohya's exp(-alpha t), alpha = -ln(huber_c)/1000,
                   with t = 1000 sigma: c = 1 on clean latents, huber_c on pure noise.
      snr          c = huber_c + (1 - huber_c) (1 - sigma)^2. kohya's
                   (1 - huber_c) / (1 + r)^2 + huber_c, where r is the
                   noise-to-signal ratio; here r = sigma / (1 - sigma).
    So both schedules move from l2-like on clean inputs to robust on noisy ones.
    (kohya's huber_scale, default 1.0, is not offered.)

    guidance_scale: the value fed to FLUX.1-dev's guidance embedding during training; 1.0 is
    what kohya's and ai-toolkit's FLUX docs recommend. MOVING: the guidance embedding belongs to
    the family's input building; `guidance_scale` and `guidance()` stay here until it moves.
    """

    def __init__(self, timestep_sampling: str = "shift", sigmoid_scale: float = 1.0,
                 discrete_flow_shift: float = 3.1582, logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, model_prediction_type: str = "raw", loss_type: str = "l2",
                 huber_c: float = 0.1, huber_schedule: str = "constant", guidance_scale: float = 1.0,
                 weighting_scheme: str = "none", training_shift: float = 1.0, discrete_timesteps: bool = False,
                 min_timestep: int | None = None, max_timestep: int | None = None):
        _check_choice("timestep_sampling", timestep_sampling, TIMESTEP_SAMPLINGS,
                      " ('sigma', kohya's default, draws from a discrete table; use 'shift' instead.)"
                      if timestep_sampling == "sigma" else "")
        _check_choice("model_prediction_type", model_prediction_type, PREDICTION_TYPES,
                      " ('sigma_scaled' mixes an x0 estimate with a velocity target for FLUX; use 'raw', "
                      "or 'x0_preconditioned' for kohya's SD3 loss, whose target is x0.)"
                      if model_prediction_type == "sigma_scaled" else "")
        _check_choice("weighting_scheme", weighting_scheme, WEIGHTING_SCHEMES,
                      f" (kohya's weighting_scheme={weighting_scheme!r} picks the sigma density; here that is "
                      "timestep_sampling, with weighting_scheme='none'.)"
                      if weighting_scheme in ("logit_normal", "mode", "uniform") else "")
        _check_choice("loss_type", loss_type, LOSS_TYPES)
        _check_choice("huber_schedule", huber_schedule, HUBER_SCHEDULES)
        _check_flow_numbers(discrete_flow_shift, sigmoid_scale, logit_std, mode_scale, loss_type, huber_c,
                            huber_schedule, training_shift)
        self.min_timestep, self.max_timestep = _flow_timestep_range(discrete_timesteps, min_timestep, max_timestep)
        self.timestep_sampling = timestep_sampling
        self.sigmoid_scale = sigmoid_scale
        self.discrete_flow_shift = discrete_flow_shift
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.mode_scale = mode_scale
        self.model_prediction_type = model_prediction_type
        self.loss_type = loss_type
        self.huber_c = huber_c
        self.huber_schedule = huber_schedule
        self.guidance_scale = guidance_scale
        self.weighting_scheme = weighting_scheme
        self.training_shift = training_shift
        self.discrete_timesteps = discrete_timesteps

    # ---- sigma ----

    def sample_sigmas(self, batch: int, image_seq_len: int | None, generator: torch.Generator | None = None,
                      device=None) -> Tensor:
        """(B,) fp32 noise levels in [0, 1]. image_seq_len = packed image tokens,
        (latent_h / 2) * (latent_w / 2); only `flux_shift` reads it.

        Drawn on the generator's device (CPU when there is none and no device
        is given), then moved to `device`.
        """
        draw_device = generator.device if generator is not None else device

        def normal() -> Tensor:
            return torch.randn(batch, generator=generator, device=draw_device, dtype=torch.float32)

        def uniform() -> Tensor:
            return torch.rand(batch, generator=generator, device=draw_device, dtype=torch.float32)

        kind = self.timestep_sampling
        if kind == "uniform":
            sigma = uniform()
        elif kind in ("sigmoid", "shift", "flux_shift"):
            sigma = torch.sigmoid(self.sigmoid_scale * normal())
            if kind == "shift":
                sigma = shift_sigmas(sigma, self.discrete_flow_shift)
            elif kind == "flux_shift":
                if image_seq_len is None:
                    raise ValueError("timestep_sampling='flux_shift' needs the image token count (seq_len).")
                sigma = time_shift(flux_mu(image_seq_len), sigma)
        elif kind == "logit_normal":
            sigma = torch.sigmoid(self.logit_mean + self.logit_std * normal())
        else:  # mode
            u = uniform()
            sigma = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        sigma = self._shift_and_discretise(sigma)
        return sigma.to(device) if device is not None else sigma

    def _shift_and_discretise(self, sigma: Tensor) -> Tensor:
        """kohya's SD3 steps after the draw: training_shift, then t = floor(.), sigma = t / 1000."""
        if self.training_shift != 1.0:
            sigma = shift_sigmas(sigma, self.training_shift)
        if self.discrete_timesteps:
            t = (sigma * (self.max_timestep - self.min_timestep) + self.min_timestep).long()
            sigma = t.float() / FLOW_TIMESTEPS
        return sigma

    def guidance(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
        """(B,) the guidance value fed to FLUX.1-dev during training.
        MOVING to the family's input building (see the class docstring)."""
        return torch.full((batch,), self.guidance_scale, device=device, dtype=dtype)

    # ---- the straight line from data to noise ----

    @staticmethod
    def _per_sample(sigma: Tensor, like: Tensor) -> Tensor:
        """(B,) -> (B, 1, ..., 1) so it broadcasts against `like`."""
        return _per_sample(sigma, like)

    def noisy(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """x_t = (1 - sigma) x0 + sigma noise, computed in fp32, returned in x0's dtype."""
        s = self._per_sample(sigma.float(), x0)
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)

    def noised(self, x0: Tensor, generator: torch.Generator | None = None, seq_len: int | None = None) -> Noised:
        """Noise (B, C, H, W) fp32 first, then sigma (B,), then x_t: with a generator, each drawn on its
        device and moved to x0's, the order the FLUX loop has always used (so runs stay bit-identical);
        without one, drawn on x0's device (the memory plan on the meta device)."""
        b = x0.shape[0]
        if generator is not None:
            noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
            sigma = self.sample_sigmas(b, seq_len, generator=generator).to(x0.device)
        else:
            noise = torch.randn(x0.shape, device=x0.device)
            sigma = self.sample_sigmas(b, seq_len, device=x0.device)
        return Noised(t=sigma, level=sigma, noise=noise, x_t=self.noisy(x0, noise, sigma))

    def noised_at(self, x0: Tensor, noise: Tensor, level: float) -> Noised:
        """x0 noised with the given noise at sigma = level for every sample (validation)."""
        if not 0 <= level <= 1:
            raise ValueError(f"level={level} must lie in [0, 1] (it is sigma).")
        sigma = torch.full((x0.shape[0],), float(level), device=x0.device)
        noise = noise.to(x0.device)
        return Noised(t=sigma, level=sigma, noise=noise, x_t=self.noisy(x0, noise, sigma))

    @staticmethod
    def target(x0: Tensor, noise: Tensor) -> Tensor:
        """The velocity of the line, d x_t / d sigma = noise - x0."""
        return noise - x0

    def loss_target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """What the prediction is compared with: x0 for x0_preconditioned, else the velocity."""
        return x0 if self.model_prediction_type == "x0_preconditioned" else self.target(x0, noise)

    def prediction(self, model_out: Tensor, x_t: Tensor, sigma: Tensor) -> Tensor:
        """The model's estimate of loss_target from its raw output (see the class docstring)."""
        if self.model_prediction_type == "additive":
            return model_out + x_t
        if self.model_prediction_type == "x0_preconditioned":
            return x_t.float() - self._per_sample(sigma.float(), x_t) * model_out.float()
        return model_out

    # ---- the loss ----

    def huber_threshold(self, sigma: Tensor) -> Tensor:
        """(B,) the pseudo-Huber c for each sample's sigma (see the class docstring)."""
        sigma = sigma.float()
        return scheduled_huber_c(self.huber_schedule, self.huber_c, sigma, 1 - sigma)

    def elementwise_loss(self, prediction: Tensor, target: Tensor, sigma: Tensor) -> Tensor:
        """The loss at every element, fp32, same shape as prediction."""
        c = self.huber_threshold(sigma) if self.loss_type != "l2" else None
        return elementwise_loss(self.loss_type, prediction, target, c)

    def loss_weighting(self, sigma: Tensor) -> Tensor:
        """(B,) fp32 weight per sample from weighting_scheme (see the class docstring)."""
        sigma = sigma.float()
        if self.weighting_scheme == "sigma_sqrt":
            return sigma.clamp_min(SIGMA_WEIGHT_FLOOR) ** -2.0
        if self.weighting_scheme == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
        return torch.ones_like(sigma)

    def loss(self, model_out: Tensor, x0: Tensor, noised: Noised | Tensor, *legacy: Tensor,
             mask: Tensor | None = None, sample_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(scalar loss to backpropagate, (B,) per-sample loss), both fp32.

        loss(out, x0, noised, mask=None): the per-sample loss is the mean over every non-batch
        dim (the masked mean with a mask, see per_sample_mean), times the weighting_scheme weight
        and sample_weight (B,) when given; the scalar is its mean over the batch.
        The form before `Noised`, loss(out, x0, noise, sigma, x_t, sample_weight=None), still
        works and gives the same numbers; it goes when train.py and plan.py call the new form.
        """
        if not isinstance(noised, Noised):
            sigma, x_t, *weight = legacy
            sample_weight = weight[0] if weight else sample_weight
            noised = Noised(t=sigma, level=sigma, noise=noised, x_t=x_t)
        elif legacy:
            (mask,) = legacy
        sigma = noised.t
        pred = self.prediction(model_out, noised.x_t, sigma)
        elementwise = self.elementwise_loss(pred, self.loss_target(x0, noised.noise), sigma)
        per_sample = per_sample_mean(elementwise, mask)
        if self.weighting_scheme != "none":
            per_sample = per_sample * self.loss_weighting(sigma)
        return _finish(per_sample, sample_weight)


def _check_flow_numbers(discrete_flow_shift: float, sigmoid_scale: float, logit_std: float, mode_scale: float,
                        loss_type: str, huber_c: float, huber_schedule: str, training_shift: float) -> None:
    if discrete_flow_shift <= 0:
        raise ValueError(f"discrete_flow_shift={discrete_flow_shift} must be > 0 (1.0 means no shift).")
    if training_shift <= 0:
        raise ValueError(f"training_shift={training_shift} must be > 0 (1.0 means no shift).")
    if sigmoid_scale <= 0 or logit_std <= 0:
        raise ValueError(f"sigmoid_scale={sigmoid_scale} and logit_std={logit_std} must both be > 0.")
    lo, hi = MODE_SCALE_RANGE
    if not lo <= mode_scale <= hi:
        raise ValueError(f"mode_scale={mode_scale} must lie in [{lo}, {hi:.4f}], "
                         "where the mode map keeps sigma inside [0, 1].")
    _check_huber(loss_type, huber_c, huber_schedule)


def _check_huber(loss_type: str, huber_c: float, huber_schedule: str) -> None:
    if loss_type != "l2" and huber_c <= 0:
        raise ValueError(f"huber_c={huber_c} must be > 0 for loss_type={loss_type!r}.")
    if loss_type != "l2" and huber_schedule != "constant" and huber_c > 1:
        raise ValueError(f"huber_c={huber_c} must be <= 1 with huber_schedule={huber_schedule!r} "
                         "(it is the threshold on pure noise; clean inputs get 1).")


def _timestep_range(min_timestep: int | None, max_timestep: int | None, steps: int, last: int) -> tuple[int, int]:
    """kohya's [min_timestep, max_timestep): defaults 0 and `steps`; equal ends draw t = max_timestep,
    which must not pass `last`, the largest t the objective has."""
    lo = 0 if min_timestep is None else int(min_timestep)
    hi = steps if max_timestep is None else int(max_timestep)
    if not 0 <= lo <= hi <= steps:
        raise ValueError(f"min_timestep={min_timestep}, max_timestep={max_timestep}: need "
                         f"0 <= min_timestep <= max_timestep <= {steps} (max_timestep is excluded).")
    if lo == hi > last:
        raise ValueError(f"min_timestep = max_timestep = {hi} draws t = {hi}, past the last index {last}.")
    return lo, hi


def _flow_timestep_range(discrete: bool, min_timestep: int | None, max_timestep: int | None) -> tuple[int, int]:
    if not discrete and (min_timestep is not None or max_timestep is not None):
        raise ValueError("min_timestep / max_timestep apply to discrete flow timesteps; "
                         "set discrete_timesteps=True (kohya's SD3) or leave them None.")
    return _timestep_range(min_timestep, max_timestep, FLOW_TIMESTEPS, last=FLOW_TIMESTEPS)


# --- DDPM (SDXL, DeepFloyd IF) ---------------------------------------------------------------------

def min_snr_weight(snr: Tensor, gamma: float, v_prediction: bool) -> Tensor:
    """Min-SNR-gamma weighting (Hang et al. 2023; kohya apply_snr_weight): min(SNR, gamma) / SNR for
    epsilon, min(SNR, gamma) / (SNR + 1) for v-prediction. At SNR = 0 (the last step of a
    zero-terminal-SNR schedule) the epsilon weight is its limit, 1."""
    if v_prediction:
        return torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
    return torch.where(snr > gamma, gamma / snr, torch.ones_like(snr))


def v_pred_scale(snr: Tensor) -> Tensor:
    """kohya get_snr_scale: SNR / (SNR + 1), SNR capped at 1000. An epsilon error e is a v error
    e / sqrt(abar), so |v error|^2 = |eps error|^2 (SNR + 1) / SNR: this factor turns a v loss into
    the epsilon loss of the same prediction (scale_v_pred_loss_like_noise_pred), and loss / scale
    turns an epsilon loss into the v loss (v_pred_like_loss)."""
    snr = snr.clamp(max=SNR_CAP)
    return snr / (snr + 1)


def debiased_weight(snr: Tensor, v_prediction: bool) -> Tensor:
    """kohya apply_debiased_estimation (Yu et al. 2024, 'Debias the training of diffusion models'):
    1 / sqrt(SNR) for epsilon, 1 / (SNR + 1) for v-prediction, SNR capped at 1000."""
    snr = snr.clamp(max=SNR_CAP)
    return 1 / (snr + 1) if v_prediction else 1 / snr.sqrt()


def pyramid_noise(noise: Tensor, draw: _Draws, iterations: int, discount: float) -> Tensor:
    """Multi-resolution (pyramid) noise, kohya's pyramid_noise_like (after J. Whitaker,
    wandb.ai/johnowhitaker/multires_noise): for level i = 0, 1, ... add discount^i times a normal
    draw of size (H, W) / r^i, r ~ U(2, 4) per level, bilinearly upsampled to (H, W); stop after a
    level with height or width 1; then divide by the std of the whole batch. Level 0 is a second
    full-resolution draw. kohya draws r from Python's `random`; here it comes from the generator."""
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = draw.python_uniform() * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        noise = noise + F.interpolate(draw.normal(b, c, hn, wn), size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF that improved-diffusion and IF use."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) per element, in nats, of N(mean, e^(2 log_scale)) integrated over x's 8-bit bin
    (width 2/255 for data in [-1, 1]); the end bins reach to -inf and +inf (the decoder term at t = 0)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _ddpm_tables(betas: Tensor) -> dict[str, Tensor]:
    """(T,) fp32 CPU tables, computed in float64 (as improved-diffusion does) and then rounded."""
    betas = betas.double()
    abar = alphas_cumprod(betas)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    posterior_var = betas * (1 - abar_prev) / (1 - abar)  # beta~_t of q(x_{t-1} | x_t, x0)
    tables = dict(
        sqrt_abar=abar.sqrt(), sqrt_one_minus_abar=(1 - abar).sqrt(), snr=abar / (1 - abar),
        sqrt_recip_abar=(1 / abar).sqrt(), sqrt_recipm1_abar=(1 / abar - 1).sqrt(), log_beta=betas.log(),
        # beta~_0 = 0, so its log is taken at beta~_1 (improved-diffusion's posterior_log_variance_clipped)
        posterior_log_var=torch.cat([posterior_var[1:2], posterior_var[1:]]).log(),
        posterior_coef_x0=betas * abar_prev.sqrt() / (1 - abar),
        posterior_coef_xt=(1 - abar_prev) * (1 - betas).sqrt() / (1 - abar))
    return {name: table.float() for name, table in tables.items()}


class DDPM:
    """Discrete-time DDPM training for SDXL (epsilon or v) and DeepFloyd IF (epsilon + learned variance).

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t an integer index in [min_timestep, max_timestep)
    (kohya: randint; defaults 0 and T = num_train_timesteps; equal ends mean t = max_timestep). The
    betas come from ddpm_betas(beta_schedule, T, beta_start, beta_end) (SDXL: scaled_linear
    0.00085..0.012; IF: squaredcos_cap_v2), rescaled by rescale_zero_terminal_snr with
    zero_terminal_snr. `Noised.t` is that index (long); the network takes it as is (IF's
    rescale_timesteps multiplies by 1000 / T = 1).

    prediction_type, the target, and what the sampler must do:
      epsilon       target eps. Sampler: epsilon prediction.
      v_prediction  target v = sqrt(abar) eps - sqrt(1 - abar) x0 (kohya's v_parameterization).
                    Sampler: x0 = sqrt(abar) x_t - sqrt(1 - abar) v, eps = sqrt(1 - abar) x_t + sqrt(abar) v.
    learned_variance:
      none           the output has C channels (SDXL). Default.
      learned_range  the output has 2C channels (eps or v, then the variance value w in [-1, 1]),
                     as IF: log var = f log beta_t + (1 - f) log beta~_t, f = (w + 1) / 2, beta~_t the
                     posterior variance (log clipped at t = 0 to beta~_1). The mean channels train with
                     `loss_type` as usual; the variance channels with improved-diffusion's hybrid loss
                     term L_vlb (_vb_terms_bpd with the mean detached): KL(q(x_{t-1} | x_t, x0) ||
                     p(x_{t-1} | x_t)) at t > 0, the discretised decoder NLL at t = 0 (data in [-1, 1],
                     8-bit bins), in bits per element, times T / 1000 (improved-diffusion's and IF's
                     RESCALED_MSE: lambda = 0.001 on the sum over T steps; 1 at T = 1000), added to the
                     per-sample loss unweighted by the timestep weights below. freeze_variance=True
                     takes the mean channels only: the variance channels get no loss and no gradient
                     (they may still drift through shared layers; sampling with the fixed-small
                     variance, as diffusers' IF LoRA docs do, avoids depending on them).
                     Sampler: read the variance from channels C..2C as above, or use fixed_small.

    Timestep weights on the per-sample loss, applied in kohya's order (post_process_loss) after
    sample_weight; each is a factor, so the order does not change the product. SNR = abar / (1 - abar):
      min_snr_gamma                      min_snr_weight: min(SNR, g) / SNR (eps), min(SNR, g) / (SNR + 1) (v)
      scale_v_pred_loss_like_noise_pred  * s, s = v_pred_scale(SNR) = SNR / (SNR + 1), SNR capped at 1000
      v_pred_like_loss k                 loss + k loss / s
      debiased_estimation_loss           debiased_weight: 1 / sqrt(SNR) (eps), 1 / (SNR + 1) (v), SNR capped at 1000
    kohya computes SNR before rescaling for zero_terminal_snr (its all_snr is set first); here the
    weights use the schedule that trains. Where that SNR is 0 (the last step with zero_terminal_snr),
    v_pred_like_loss and epsilon debiased estimation are infinite, so they need max_timestep <= T - 1.

    Noise (kohya's get_noise_noisy_latents_and_timesteps), each off by default:
      noise_offset o                 eps += o' n, n ~ N(0, 1) of shape (B, C, 1, 1); o' = o, or o u with
                                     noise_offset_random_strength (u ~ U(0, 1), one per batch)
      adaptive_noise_scale a         o' <- max(o' + a |mean over H, W of x0|, 0) per sample and channel
                                     (only with noise_offset, as kohya)
      multires_noise_iterations n,   eps <- pyramid_noise(eps, n, multires_noise_discount), after the offset
      multires_noise_discount (0.3)
      ip_noise_gamma g               the network input is add_noise(x0, eps + g' xi, t), xi ~ N(0, 1), g' = g
                                     or g u with ip_noise_gamma_random_strength; the target keeps eps
    loss_type / huber_c / huber_schedule: as FlowMatching (elementwise_loss, scheduled_huber_c) with
    level = t / T and the noise-to-signal ratio sqrt((1 - abar) / abar); kohya's default schedule is
    snr, here constant as for flow.
    """

    def __init__(self, prediction_type: str = "epsilon", num_train_timesteps: int = 1000,
                 beta_schedule: str = "scaled_linear", beta_start: float = 0.00085, beta_end: float = 0.012,
                 zero_terminal_snr: bool = False, min_timestep: int | None = None, max_timestep: int | None = None,
                 min_snr_gamma: float | None = None, scale_v_pred_loss_like_noise_pred: bool = False,
                 v_pred_like_loss: float | None = None, debiased_estimation_loss: bool = False,
                 noise_offset: float | None = None, noise_offset_random_strength: bool = False,
                 adaptive_noise_scale: float | None = None, multires_noise_iterations: int | None = None,
                 multires_noise_discount: float = 0.3, ip_noise_gamma: float | None = None,
                 ip_noise_gamma_random_strength: bool = False, loss_type: str = "l2", huber_c: float = 0.1,
                 huber_schedule: str = "constant", learned_variance: str = "none", freeze_variance: bool = False):
        _check_choice("prediction_type", prediction_type, DDPM_PREDICTION_TYPES)
        _check_choice("loss_type", loss_type, LOSS_TYPES)
        _check_choice("huber_schedule", huber_schedule, HUBER_SCHEDULES)
        _check_choice("learned_variance", learned_variance, LEARNED_VARIANCES)
        _check_huber(loss_type, huber_c, huber_schedule)
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={num_train_timesteps} must be >= 2.")
        self.num_train_timesteps = num_train_timesteps
        self.min_timestep, self.max_timestep = _timestep_range(min_timestep, max_timestep, num_train_timesteps,
                                                               last=num_train_timesteps - 1)
        self.prediction_type = prediction_type
        self.min_snr_gamma = min_snr_gamma or 0.0
        self.scale_v_pred_loss_like_noise_pred = scale_v_pred_loss_like_noise_pred
        self.v_pred_like_loss = v_pred_like_loss or 0.0
        self.debiased_estimation_loss = debiased_estimation_loss
        self.noise_offset = noise_offset or 0.0
        self.noise_offset_random_strength = noise_offset_random_strength
        self.adaptive_noise_scale = adaptive_noise_scale
        self.multires_noise_iterations = multires_noise_iterations or 0
        self.multires_noise_discount = multires_noise_discount
        self.ip_noise_gamma = ip_noise_gamma or 0.0
        self.ip_noise_gamma_random_strength = ip_noise_gamma_random_strength
        self.loss_type, self.huber_c, self.huber_schedule = loss_type, huber_c, huber_schedule
        self.learned_variance, self.freeze_variance = learned_variance, freeze_variance
        self._check_options(zero_terminal_snr)
        betas = ddpm_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        self.betas = rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas  # (T,) float64
        self.tables = _ddpm_tables(self.betas)
        self._on_device: dict[tuple[str, str], Tensor] = {}

    def _check_options(self, zero_terminal_snr: bool) -> None:
        if self.adaptive_noise_scale is not None and not self.noise_offset:
            raise ValueError("adaptive_noise_scale adds to noise_offset; set noise_offset too (kohya requires it).")
        if self.min_snr_gamma < 0 or self.noise_offset < 0 or self.ip_noise_gamma < 0 or self.v_pred_like_loss < 0:
            raise ValueError("min_snr_gamma, noise_offset, ip_noise_gamma and v_pred_like_loss must be >= 0 (0 or None: off).")
        if self.multires_noise_iterations < 0 or not 0 < self.multires_noise_discount <= 1:
            raise ValueError(f"multires_noise_iterations={self.multires_noise_iterations} must be >= 0 and "
                             f"multires_noise_discount={self.multires_noise_discount} in (0, 1].")
        if not zero_terminal_snr:
            return
        if self.learned_variance == "learned_range":
            raise ValueError("learned_variance='learned_range' needs abar > 0 at every step (x0 from eps divides "
                             "by sqrt(abar)); it does not go with zero_terminal_snr.")
        last_drawn = self.max_timestep - 1 if self.min_timestep < self.max_timestep else self.max_timestep
        infinite = [name for name, on in (("v_pred_like_loss", self.v_pred_like_loss),
                                          ("debiased_estimation_loss with epsilon", self.debiased_estimation_loss
                                           and self.prediction_type == "epsilon")) if on]
        if infinite and last_drawn == self.num_train_timesteps - 1:
            raise ValueError(f"{' and '.join(infinite)} weigh the last step by 1 / SNR, and zero_terminal_snr makes "
                             f"its SNR 0; set max_timestep={self.num_train_timesteps - 1} to leave that step out.")

    # ---- schedule lookups ----

    def _at(self, name: str, t: Tensor) -> Tensor:
        """(B,) fp32 table values at the indices t, on t's device."""
        key = (name, str(t.device))
        if key not in self._on_device:
            self._on_device[key] = self.tables[name].to(t.device)
        return self._on_device[key][t]

    def _coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """sqrt(abar_t), sqrt(1 - abar_t) shaped (B, 1, ..., 1)."""
        return (_per_sample(self._at("sqrt_abar", t), like), _per_sample(self._at("sqrt_one_minus_abar", t), like))

    def snr(self, t: Tensor) -> Tensor:
        """(B,) SNR_t = abar_t / (1 - abar_t)."""
        return self._at("snr", t)

    # ---- noising ----

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, in fp32, returned in x0's dtype."""
        a, b = self._coefficients(t, x0)
        return (a * x0.float() + b * noise.float()).to(x0.dtype)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """fp32 eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
        if self.prediction_type == "epsilon":
            return noise.float()
        a, b = self._coefficients(t, x0)
        return a * noise.float() - b * x0.float()

    def predicted_x0(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """fp32 x0 estimate from the mean output: (x_t - sqrt(1 - abar) eps) / sqrt(abar), or sqrt(abar) x_t - sqrt(1 - abar) v."""
        x_t, out = x_t.float(), out.float()
        if self.prediction_type == "epsilon":
            return (_per_sample(self._at("sqrt_recip_abar", t), x_t) * x_t
                    - _per_sample(self._at("sqrt_recipm1_abar", t), x_t) * out)
        a, b = self._coefficients(t, x_t)
        return a * x_t - b * out

    def noised(self, x0: Tensor, generator: torch.Generator | None = None, seq_len: int | None = None) -> Noised:
        """Draws, in this order, from `generator` (on its device; without one on x0's device):
        noise (B, C, H, W); with noise_offset its strength u (1,) if random, then n (B, C, 1, 1); with
        multires noise, per level a ratio u and a normal draw; t (B,); with ip_noise_gamma its strength
        u (1,) if random, then xi (B, C, H, W). seq_len is not used (the flow objective's argument)."""
        draw = _Draws(generator, x0.device)
        noise = draw.normal(*x0.shape)
        noise = self._offset_noise(noise, x0, draw)
        if self.multires_noise_iterations:
            noise = pyramid_noise(noise, draw, self.multires_noise_iterations, self.multires_noise_discount)
        b = x0.shape[0]
        if self.min_timestep < self.max_timestep:
            t = draw.integers(self.min_timestep, self.max_timestep, b)
        else:
            t = torch.full((b,), self.max_timestep, dtype=torch.long, device=x0.device)
        x_t = self.add_noise(x0, self._input_noise(noise, draw), t)
        return Noised(t=t, level=t.float() / self.num_train_timesteps, noise=noise, x_t=x_t)

    def _offset_noise(self, noise: Tensor, x0: Tensor, draw: _Draws) -> Tensor:
        """kohya's apply_noise_offset (crosslabs.org/blog/diffusion-with-offset-noise), see the class docstring."""
        if not self.noise_offset:
            return noise
        offset = self.noise_offset
        if self.noise_offset_random_strength:
            offset = draw.uniform(1) * offset  # one strength for the whole batch, as kohya
        if self.adaptive_noise_scale is not None:
            channel_mean = x0.float().mean(dim=(2, 3), keepdim=True).abs()  # (B, C, 1, 1)
            offset = (offset + self.adaptive_noise_scale * channel_mean).clamp_min(0)
        return noise + offset * draw.normal(x0.shape[0], x0.shape[1], 1, 1)

    def _input_noise(self, noise: Tensor, draw: _Draws) -> Tensor:
        """The noise the network input is built from: noise + gamma xi with ip_noise_gamma, else noise."""
        if not self.ip_noise_gamma:
            return noise
        gamma = self.ip_noise_gamma
        if self.ip_noise_gamma_random_strength:
            gamma = draw.uniform(1) * gamma  # one strength for the whole batch, as kohya
        return noise + gamma * draw.normal(*noise.shape)

    def noised_at(self, x0: Tensor, noise: Tensor, level: float) -> Noised:
        """x0 noised with the given noise (no offset, pyramid or input perturbation) at
        t = round(level T), at most T - 1, for every sample (validation)."""
        if not 0 <= level <= 1:
            raise ValueError(f"level={level} must lie in [0, 1] (it is t / T).")
        index = min(round(level * self.num_train_timesteps), self.num_train_timesteps - 1)
        t = torch.full((x0.shape[0],), index, dtype=torch.long, device=x0.device)
        noise = noise.to(x0.device)
        return Noised(t=t, level=t.float() / self.num_train_timesteps, noise=noise, x_t=self.add_noise(x0, noise, t))

    # ---- the loss ----

    def huber_threshold(self, t: Tensor) -> Tensor:
        """(B,) pseudo-Huber c at the indices t (scheduled_huber_c with level t / T)."""
        a, b = self._at("sqrt_abar", t), self._at("sqrt_one_minus_abar", t)
        return scheduled_huber_c(self.huber_schedule, self.huber_c, t.float() / self.num_train_timesteps, a / (a + b))

    def timestep_weight(self, t: Tensor) -> Tensor:
        """(B,) fp32 product of the enabled timestep weights (see the class docstring); 1 when none is."""
        snr = self.snr(t)
        v_prediction = self.prediction_type == "v_prediction"
        weight = torch.ones_like(snr)
        if self.min_snr_gamma:
            weight = weight * min_snr_weight(snr, self.min_snr_gamma, v_prediction)
        if self.scale_v_pred_loss_like_noise_pred:
            weight = weight * v_pred_scale(snr)
        if self.v_pred_like_loss:
            weight = weight * (1 + self.v_pred_like_loss / v_pred_scale(snr))
        if self.debiased_estimation_loss:
            weight = weight * debiased_weight(snr, v_prediction)
        return weight

    def variance_vlb(self, mean_out: Tensor, variance_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Elementwise L_vlb term in bits, times T / 1000 (see the class docstring). mean_out is the
        (detached) eps or v output, variance_out the learned-range value w in [-1, 1]."""
        x0, x_t = x0.float(), x_t.float()
        coef_x0, coef_xt = (_per_sample(self._at(name, t), x_t) for name in ("posterior_coef_x0", "posterior_coef_xt"))
        min_log = _per_sample(self._at("posterior_log_var", t), x_t)  # log beta~_t
        max_log = _per_sample(self._at("log_beta", t), x_t)
        frac = (variance_out.float() + 1) / 2
        model_log_var = frac * max_log + (1 - frac) * min_log
        model_mean = coef_x0 * self.predicted_x0(mean_out, x_t, t) + coef_xt * x_t
        true_mean = coef_x0 * x0 + coef_xt * x_t  # mean of q(x_{t-1} | x_t, x0)
        kl = normal_kl(true_mean, min_log, model_mean, model_log_var)
        decoder_nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        bits = torch.where(_per_sample(t == 0, x_t), decoder_nll, kl) / math.log(2.0)
        return bits * (self.num_train_timesteps / 1000.0)

    def _split_output(self, model_out: Tensor, x0: Tensor) -> tuple[Tensor, Tensor | None]:
        """(mean output (B, C, ...), variance output or None)."""
        c = x0.shape[1]
        learned = self.learned_variance == "learned_range"
        if model_out.shape[1] != (2 * c if learned else c):
            raise ValueError(f"the network output has {model_out.shape[1]} channels for {c}-channel data; "
                             f"learned_variance={self.learned_variance!r} expects {2 * c if learned else c}.")
        if not learned:
            return model_out, None
        return model_out[:, :c], None if self.freeze_variance else model_out[:, c:]

    def loss(self, model_out: Tensor, x0: Tensor, noised: Noised, mask: Tensor | None = None,
             sample_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(scalar loss to backpropagate, (B,) per-sample loss), both fp32: the (masked) mean of
        the elementwise loss of the mean output, times the timestep weights, plus the variance
        term with learned_range, times sample_weight (B,) when given; the scalar is the batch mean."""
        out, variance_out = self._split_output(model_out, x0)
        t = noised.t
        c = self.huber_threshold(t) if self.loss_type != "l2" else None
        elementwise = elementwise_loss(self.loss_type, out, self.target(x0, noised.noise, t), c)
        per_sample = per_sample_mean(elementwise, mask) * self.timestep_weight(t)
        if variance_out is not None:
            vlb = self.variance_vlb(out.detach(), variance_out, x0, noised.x_t, t)
            per_sample = per_sample + per_sample_mean(vlb, mask)
        return _finish(per_sample, sample_weight)


# --- From config values ----------------------------------------------------------------------------

OBJECTIVES = {"flow_matching": FlowMatching, "ddpm": DDPM}


def build_objective(kind: str, **options) -> FlowMatching | DDPM:
    """FlowMatching (kind 'flow_matching') or DDPM (kind 'ddpm') from keyword options named as the
    constructor's arguments. An unknown kind or option name, or a bad value, is a ValueError that
    says what is valid."""
    _check_choice("objective", kind, tuple(OBJECTIVES))
    cls = OBJECTIVES[kind]
    valid = list(inspect.signature(cls).parameters)
    for name in options:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"the {kind} objective has no option {name!r}.{hint} Its options: {', '.join(valid)}.")
    return cls(**options)


def _bin_labels(bins: int) -> list[str]:
    """'0.0-0.1', ... with as few decimals as the bin edges need (at least one)."""
    edges = [i / bins for i in range(bins + 1)]
    decimals = next(d for d in range(1, 10) if all(abs(e - round(e, d)) < 1e-12 for e in edges))
    return [f"{edges[i]:.{decimals}f}-{edges[i + 1]:.{decimals}f}" for i in range(bins)]


def _bin_sums(per_sample: Tensor, sigma: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """(bins,) loss sums and (bins,) counts; sigma = 1.0 falls in the last bin."""
    index = (sigma.detach().float() * bins).long().clamp_(0, bins - 1)
    values = per_sample.detach().float()
    sums = torch.zeros(bins, device=values.device).index_add_(0, index, values)
    counts = torch.zeros(bins, dtype=torch.long, device=values.device).index_add_(0, index, torch.ones_like(index))
    return sums, counts


def timestep_bin_losses(per_sample: Tensor, sigma: Tensor, bins: int = 10) -> dict[str, tuple[float, int]]:
    """{'0.0-0.1': (loss sum, count), ...} over the bins of [0, 1] that hold a sample."""
    sums, counts = _bin_sums(per_sample, sigma, bins)
    return {label: (float(s), int(n)) for label, s, n in zip(_bin_labels(bins), sums.tolist(), counts.tolist()) if n}


class LossBins:
    """Running per-sigma-bin loss: add() every step (no host sync), summary() when logging."""

    def __init__(self, bins: int = 10):
        if bins < 1:
            raise ValueError(f"bins={bins} must be >= 1.")
        self.bins = bins
        self.sums: Tensor | None = None    # (bins,) fp32, on the loss's device
        self.counts: Tensor | None = None  # (bins,) int64

    def add(self, per_sample: Tensor, sigma: Tensor) -> None:
        sums, counts = _bin_sums(per_sample, sigma, self.bins)
        if self.sums is None:
            self.sums, self.counts = sums, counts
        else:
            self.sums += sums
            self.counts += counts

    def summary(self) -> dict[str, tuple[float, int]]:
        """{'0.0-0.1': (mean loss, count), ...} for the bins that saw a sample."""
        if self.sums is None:
            return {}
        sums, counts = self.sums.tolist(), self.counts.tolist()
        return {label: (s / n, n) for label, s, n in zip(_bin_labels(self.bins), sums, counts) if n}

    def reset(self) -> None:
        self.sums = self.counts = None
