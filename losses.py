"""The flow-matching (rectified flow) objective used to train FLUX.1.

A training example is a clean latent x0, a noise draw eps ~ N(0, I) and a
noise level sigma in [0, 1]. The model sees the point on the straight line
between them,

    x_t = (1 - sigma) * x0 + sigma * eps,

and learns the velocity of that line, d x_t / d sigma = eps - x0. Sampling
then integrates from sigma = 1 (pure noise) down to 0 with Euler steps
x <- x + (sigma_next - sigma) * v.

FLUX takes sigma itself as its `timesteps` input (in [0, 1]; the x1000 happens
inside its timestep embedding), so no integer timestep exists here.

Everything that is a choice lives in one small class, `FlowMatching`:
how sigma is drawn (`timestep_sampling`), how the model output becomes a
velocity (`model_prediction_type`), and how the error is measured
(`loss_type`, `huber_c`, `huber_schedule`). The options and their defaults
follow kohya-ss/sd-scripts (library/flux_train_utils.py, train_util.py);
the defaults here are the ones its docs recommend for FLUX LoRA:
`shift` sampling with shift 3.1582, `raw` prediction, guidance 1.0.

`LossBins` accumulates the loss per sigma bin, for the "which noise levels
does my model get wrong" plot.
"""
import math

import torch
from torch import Tensor

TIMESTEP_SAMPLINGS = ("uniform", "sigmoid", "shift", "flux_shift", "logit_normal", "mode")
PREDICTION_TYPES = ("raw", "additive")
LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")

# flux_shift: mu is linear in the image token count through these two points
# (black-forest-labs/flux sampling.get_schedule: base_shift 0.5, max_shift 1.15).
FLUX_SHIFT_POINTS = ((256, 0.5), (4096, 1.15))

# mode sampling u -> 1 - u - s(cos^2(pi u / 2) - 1 + u) stays a monotone map of
# [0, 1] onto [0, 1] only for -1 <= s <= 1 / (pi/2 - 1).
MODE_SCALE_RANGE = (-1.0, 1.0 / (math.pi / 2 - 1))


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

    model_prediction_type: `raw` (the output is the velocity) or `additive`
    (output + x_t). kohya's `sigma_scaled` is left out on purpose: for FLUX it
    turns the output into an x0 estimate while the target stays a velocity.

    loss_type, elementwise on d = prediction - target, then the mean over all
    non-batch dims gives one loss per sample:
      l2         d^2
      huber      2c (sqrt(d^2 + c^2) - c)   (pseudo-Huber: ~d^2 for |d| << c, ~2c|d| beyond)
      smooth_l1  2 (sqrt(d^2 + c^2) - c)    (~d^2/c for |d| << c, ~2|d| beyond)
    huber_schedule, the threshold c per sample as a function of sigma:
      constant     c = huber_c
      exponential  c = huber_c ** sigma. kohya's exp(-alpha t), alpha = -ln(huber_c)/1000,
                   with t = 1000 sigma: c = 1 on clean latents, huber_c on pure noise.
      snr          c = huber_c + (1 - huber_c) (1 - sigma)^2. kohya's
                   (1 - huber_c) / (1 + r)^2 + huber_c, where r is the
                   noise-to-signal ratio; here r = sigma / (1 - sigma).
    So both schedules move from l2-like on clean inputs to robust on noisy ones.
    (kohya's huber_scale, default 1.0, is not offered.)

    guidance_scale: the value fed to FLUX.1-dev's guidance embedding during
    training; 1.0 is what kohya's and ai-toolkit's FLUX docs recommend.
    """

    def __init__(self, timestep_sampling: str = "shift", sigmoid_scale: float = 1.0,
                 discrete_flow_shift: float = 3.1582, logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, model_prediction_type: str = "raw", loss_type: str = "l2",
                 huber_c: float = 0.1, huber_schedule: str = "constant", guidance_scale: float = 1.0):
        _check_choice("timestep_sampling", timestep_sampling, TIMESTEP_SAMPLINGS,
                      " ('sigma', kohya's default, draws from a discrete table; use 'shift' instead.)"
                      if timestep_sampling == "sigma" else "")
        _check_choice("model_prediction_type", model_prediction_type, PREDICTION_TYPES,
                      " ('sigma_scaled' mixes an x0 estimate with a velocity target for FLUX; use 'raw'.)"
                      if model_prediction_type == "sigma_scaled" else "")
        _check_choice("loss_type", loss_type, LOSS_TYPES)
        _check_choice("huber_schedule", huber_schedule, HUBER_SCHEDULES)
        if discrete_flow_shift <= 0:
            raise ValueError(f"discrete_flow_shift={discrete_flow_shift} must be > 0 (1.0 means no shift).")
        if sigmoid_scale <= 0 or logit_std <= 0:
            raise ValueError(f"sigmoid_scale={sigmoid_scale} and logit_std={logit_std} must both be > 0.")
        lo, hi = MODE_SCALE_RANGE
        if not lo <= mode_scale <= hi:
            raise ValueError(f"mode_scale={mode_scale} must lie in [{lo}, {hi:.4f}], "
                             "where the mode map keeps sigma inside [0, 1].")
        if loss_type != "l2" and huber_c <= 0:
            raise ValueError(f"huber_c={huber_c} must be > 0 for loss_type={loss_type!r}.")
        if loss_type != "l2" and huber_schedule != "constant" and huber_c > 1:
            raise ValueError(f"huber_c={huber_c} must be <= 1 with huber_schedule={huber_schedule!r} "
                             "(it is the threshold on pure noise; clean inputs get 1).")
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

    # ---- sigma ----

    def sample_sigmas(self, batch: int, image_seq_len: int, generator: torch.Generator | None = None,
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
                sigma = time_shift(flux_mu(image_seq_len), sigma)
        elif kind == "logit_normal":
            sigma = torch.sigmoid(self.logit_mean + self.logit_std * normal())
        else:  # mode
            u = uniform()
            sigma = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return sigma.to(device) if device is not None else sigma

    def guidance(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
        """(B,) the guidance value fed to FLUX.1-dev during training."""
        return torch.full((batch,), self.guidance_scale, device=device, dtype=dtype)

    # ---- the straight line from data to noise ----

    @staticmethod
    def _per_sample(sigma: Tensor, like: Tensor) -> Tensor:
        """(B,) -> (B, 1, ..., 1) so it broadcasts against `like`."""
        return sigma.reshape(-1, *([1] * (like.ndim - 1)))

    def noisy(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """x_t = (1 - sigma) x0 + sigma noise, computed in fp32, returned in x0's dtype."""
        s = self._per_sample(sigma.float(), x0)
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)

    @staticmethod
    def target(x0: Tensor, noise: Tensor) -> Tensor:
        """The velocity of the line, d x_t / d sigma = noise - x0."""
        return noise - x0

    def prediction(self, model_out: Tensor, x_t: Tensor, sigma: Tensor) -> Tensor:
        """The model's velocity estimate from its raw output."""
        if self.model_prediction_type == "additive":
            return model_out + x_t
        return model_out

    # ---- the loss ----

    def huber_threshold(self, sigma: Tensor) -> Tensor:
        """(B,) the pseudo-Huber c for each sample's sigma (see the class docstring)."""
        sigma = sigma.float()
        if self.huber_schedule == "exponential":
            return self.huber_c ** sigma
        if self.huber_schedule == "snr":
            return self.huber_c + (1 - self.huber_c) * (1 - sigma) ** 2
        return torch.full_like(sigma, self.huber_c)

    def elementwise_loss(self, prediction: Tensor, target: Tensor, sigma: Tensor) -> Tensor:
        """The loss at every element, fp32, same shape as prediction."""
        d = prediction.float() - target.float()
        if self.loss_type == "l2":
            return d.square()
        c = self._per_sample(self.huber_threshold(sigma), d)
        smooth = torch.sqrt(d.square() + c.square()) - c
        return 2 * c * smooth if self.loss_type == "huber" else 2 * smooth

    def loss(self, model_out: Tensor, x0: Tensor, noise: Tensor, sigma: Tensor, x_t: Tensor,
             sample_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(scalar loss to backpropagate, (B,) per-sample loss), both fp32.

        The per-sample loss is the mean over every non-batch dim, times
        sample_weight (B,) when given; the scalar is its mean over the batch.
        """
        pred = self.prediction(model_out, x_t, sigma)
        elementwise = self.elementwise_loss(pred, self.target(x0, noise), sigma)
        per_sample = elementwise.flatten(1).mean(dim=1)
        if sample_weight is not None:
            per_sample = per_sample * sample_weight.to(per_sample)
        return per_sample.mean(), per_sample


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
