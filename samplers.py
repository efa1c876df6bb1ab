"""Sampling algorithms of the four families, as pure functions over a denoiser callable.

A denoiser is any callable `model(x, t, cond, **extra) -> output`: x is the noisy sample (B, C, ...),
t a (B,) fp32 tensor in the family's own time units, cond the family's conditioning (passed through
untouched: a dict of text embeddings, say). What x, t and the output mean per family:

  family        x_t                                  t fed to the model        output
  FLUX.1        (1 - s) x0 + s eps                   s in [0, 1]               velocity eps - x0
  SD3 / SD3.5   (1 - s) x0 + s eps                   1000 s (time_scale=1000)  velocity eps - x0
  SDXL          sqrt(abar) x0 + sqrt(1 - abar) eps   DDPM index 0..999         eps, or v
  DeepFloyd IF  sqrt(abar) x0 + sqrt(1 - abar) eps   ORIGINAL index 0..999     eps (ch 0:C) + variance (C:2C)

Every step sees one noise level x = alpha x0 + sigma eps (`Level`); `x0_and_eps` turns any output
into the clean-sample and noise estimates, `output_from_x0` goes back.

Samplers:
  sample_flow   euler (FLUX's `img += (t_prev - t_curr) * v`, bit for bit), dpmpp_2m (SD3.5's)
  sample_ddpm   euler, euler_ancestral, ddim (eta 0), dpmpp_2m; eps or v; leading / trailing /
                linspace spacing or Karras sigmas; zero-terminal-SNR schedules
  sample_if     IF's respaced DDPM: learned-range variance, dynamic thresholding
Guidance (`Guidance`): CFG against a negative prompt on the raw output (x0, eps, v and velocity
give the same result, its weights sum to 1), or APG on the x0 predictions; SD3.5's skip-layer
guidance on top. Noise: the start noise (`initial_noise`) and every ancestral draw come from one
CPU torch.Generator, so a seed gives the same image on every device.

Defaults (the families' sampling settings):
  FLUX dev      flux_sigmas(28, seq_len), euler, embedded guidance 3.5, no CFG (sample.py's)
  FLUX schnell  flux_sigmas(4, seq_len, shift=False), euler
  SD3.5 large   sd3_sigmas(40, 3.0), dpmpp_2m, CFG 4.5; large turbo: 4 steps, euler, CFG 1
  SD3.5 medium  sd3_sigmas(50, 3.0), dpmpp_2m, CFG 5, optionally SkipLayerGuidance()
  SD3 medium    sd3_sigmas(50, 3.0), dpmpp_2m, CFG 5 (sd3_infer's CONFIGS say shift 1.0, its
                comment that released models use 3.0, as diffusers does; 28 steps "quite decent")
  SDXL          ddpm_schedule(abar, steps, "leading", steps_offset=1), euler, epsilon, CFG 5
                (diffusers' StableDiffusionXLPipeline: 50 steps, CFG 5)
  IF stage I    respacing "150", CFG 7, dynamic threshold p 0.95, max 1.5
  IF stage II   respacing "smart50", CFG 4, max 1.0, low-res image noised by q_sample at
                t = int(0.25 * 1000)
(the SD3.5 figures are Stability-AI/sd3.5 sd3_infer.CONFIGS; IF's are deep-floyd/IF modules/)
"""
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from losses import alphas_cumprod, ddpm_betas, ddpm_sigmas, flux_mu, shift_sigmas, time_shift

Denoiser = Callable[..., Tensor]  # model(x, t, cond, **extra) -> output

PREDICTIONS = ("flow", "epsilon", "v")
FLOW_SAMPLERS = ("euler", "dpmpp_2m")
DDPM_SAMPLERS = ("euler", "euler_ancestral", "ddim", "dpmpp_2m")
SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS = ("zero", "sigma_min")

# abar = 0 (zero terminal SNR) makes the k-diffusion sigma sqrt((1 - abar) / abar) infinite; the
# k-diffusion samplers use this stand-in instead, as diffusers' Euler and DPM-Solver schedulers do
# (fp16's smallest subnormal; sigma = 4096). DDIM handles abar = 0 exactly (with v-prediction).
ZERO_SNR_ABAR = 2.0**-24

# DeepFloyd IF's named respacings (deep-floyd/IF modules/base.py IFBaseModule.respacing_modes).
IF_RESPACINGS = {
    "fast27": "10,10,3,2,2",
    "smart27": "7,4,2,1,2,4,7",
    "smart50": "10,6,4,3,2,2,3,4,6,10",
    "smart100": "1,1,1,1,2,2,2,2,2,2,3,3,4,4,5,5,6,7,7,8,9,10,13",
    "smart185": "1,1,2,2,2,3,3,3,4,5,6,7,8,9,10,11,12,13,14,15,16,18,20",
    "super27": "1,1,1,1,1,1,1,2,5,13",
    "super40": "2,2,2,2,2,2,3,4,6,15",
    "super100": "4,4,6,6,8,8,10,10,14,30",
}


def _check_choice(option: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{option}={value!r} is not one of {', '.join(valid)}.")


# --- noise levels and parameterizations ----------------------------------------------------------

@dataclass(frozen=True)
class Level:
    """One noise level: x = alpha * x0 + sigma * eps."""
    alpha: float
    sigma: float

    @staticmethod
    def flow(s: float) -> "Level":
        return Level(1.0 - s, s)

    @staticmethod
    def ddpm(abar: float) -> "Level":
        return Level(math.sqrt(abar), math.sqrt(1.0 - abar))

    @property
    def k_sigma(self) -> float:
        """k-diffusion's sigma, noise over signal: x / alpha = x0 + k_sigma * eps (inf at zero SNR)."""
        return self.sigma / self.alpha if self.alpha > 0 else math.inf


def x0_and_eps(out: Tensor, x: Tensor, level: Level, prediction: str) -> tuple[Tensor, Tensor]:
    """(x0, eps) estimates from a model output:
      flow     out = eps - x0 (x = (1 - s) x0 + s eps)
      epsilon  out = eps
      v        out = alpha eps - sigma x0"""
    a, s = level.alpha, level.sigma
    if prediction == "flow":
        return x - s * out, x + a * out
    if prediction == "v":
        return a * x - s * out, s * x + a * out
    return (x - s * out) / a, out


def output_from_x0(x0: Tensor, x: Tensor, level: Level, prediction: str) -> Tensor:
    """The model output that x0_and_eps maps to x0 (sigma > 0)."""
    a, s = level.alpha, level.sigma
    if prediction == "flow":
        return (x - x0) / s
    if prediction == "v":
        return (a * x - x0) / s
    return (x - a * x0) / s


# --- guidance ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class APG:
    """Adaptive projected guidance (Sadat et al. 2024, 'Eliminating Oversaturation and Artifacts of
    High Guidance Scales in Diffusion Models'), on the x0 predictions as ComfyUI's APG node does:
      diff = x0_cond - x0_neg;  running = diff + momentum * running;  diff = running
      diff *= min(1, norm_threshold / |diff|)       (L2 over each sample; skipped at 0)
      diff = diff_orthogonal + eta * diff_parallel  (parallel to x0_cond)
      x0 = x0_cond + (scale - 1) * diff
    eta = 1, norm_threshold = 0, momentum = 0 is CFG. norm_threshold is in x0 units over the whole
    sample, so it grows with sqrt(C * H * W)."""
    eta: float = 0.0
    norm_threshold: float = 15.0
    momentum: float = -0.5  # negative: the paper's reverse momentum


@dataclass(frozen=True)
class SkipLayerGuidance:
    """SD3.5's skip-layer guidance (Stability-AI/sd3.5 sd3_impls.SkipLayerCFGDenoiser, CONFIGS of
    sd3.5_medium): out += scale * (cond - cond_without_layers) at the steps i with
    start * steps < i < end * steps; the skip pass calls model(x, t, cond, skip_layers=layers).
    CONFIGS also lists cfg 4.0 with it, which sd3_infer.main never applies (it sets `cfg` after
    `_cfg` is taken), so the reference runs SLG with CFG 5."""
    scale: float = 2.5
    layers: tuple[int, ...] = (7, 8, 9)
    start: float = 0.01
    end: float = 0.2

    def active(self, step: int, steps: int) -> bool:
        return self.scale > 0 and self.start * steps < step < self.end * steps


@dataclass(frozen=True)
class Guidance:
    scale: float = 1.0  # CFG scale; 1 (or no negative conditioning) runs the conditional pass only
    apg: APG | None = None  # APG instead of plain CFG
    slg: SkipLayerGuidance | None = None


class Guider:
    """The guided output of one step: the conditional pass, the negative pass (CFG or APG) and the
    skip-layer pass. Output channels past x's (IF's variance) come from the conditional pass.
    Holds APG's momentum: one Guider per image."""

    def __init__(self, model: Denoiser, cond: Any, neg_cond: Any, guidance: Guidance, steps: int):
        self.model, self.cond, self.neg_cond = model, cond, neg_cond
        self.guidance, self.steps = guidance, steps
        self.running: Tensor | None = None  # APG's running guidance update

    def __call__(self, x: Tensor, t: Tensor, step: int, level: Level, prediction: str) -> Tensor:
        channels = x.shape[1]
        out = self.model(x, t, self.cond).to(x.dtype)
        guided = out[:, :channels]
        if self.neg_cond is not None and self.guidance.scale != 1.0:
            neg = self.model(x, t, self.neg_cond).to(x.dtype)
            guided = self._combine(guided, neg[:, :channels], x, level, prediction)
        slg = self.guidance.slg
        if slg is not None and slg.active(step, self.steps):
            skipped = self.model(x, t, self.cond, skip_layers=list(slg.layers)).to(x.dtype)
            guided = guided + (out[:, :channels] - skipped[:, :channels]) * slg.scale
        if out.shape[1] > channels:  # IF's learned variance: the conditional pass's, unguided
            guided = torch.cat([guided, out[:, channels:]], dim=1)
        return guided

    def _combine(self, pos: Tensor, neg: Tensor, x: Tensor, level: Level, prediction: str) -> Tensor:
        if self.guidance.apg is None:
            return neg + self.guidance.scale * (pos - neg)
        x0_pos, _ = x0_and_eps(pos, x, level, prediction)
        x0_neg, _ = x0_and_eps(neg, x, level, prediction)
        x0 = x0_pos + (self.guidance.scale - 1) * self._apg_update(x0_pos - x0_neg, x0_pos)
        return output_from_x0(x0, x, level, prediction)

    def _apg_update(self, diff: Tensor, x0_pos: Tensor) -> Tensor:
        apg = self.guidance.apg
        if apg.momentum != 0:
            self.running = diff if self.running is None else diff + apg.momentum * self.running
            diff = self.running
        flat = diff.flatten(1)  # (B, C*H*W)
        if apg.norm_threshold > 0:
            flat = flat * (apg.norm_threshold / flat.norm(dim=1, keepdim=True)).clamp(max=1.0)
        unit = F.normalize(x0_pos.flatten(1).double(), dim=1)  # the projection in fp64, as the paper's code
        parallel = (flat.double() * unit).sum(dim=1, keepdim=True) * unit
        update = (flat.double() - parallel) + apg.eta * parallel
        return update.to(diff.dtype).view_as(diff)


# --- flow matching (FLUX.1, SD3 / SD3.5) --------------------------------------------------------

def flux_sigmas(steps: int, image_seq_len: int, shift: bool = True) -> list[float]:
    """FLUX's schedule, float64, 1 -> 0 (black-forest-labs/flux sampling.get_schedule): linspace;
    dev shifts it by time_shift with mu from the token count, schnell (shift=False) keeps it linear."""
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    if shift:
        sigmas[:-1] = time_shift(flux_mu(image_seq_len), sigmas[:-1])  # sigma = 0 stays 0
    return sigmas.tolist()


def sd3_sigmas(steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> list[float]:
    """SD3's schedule (Stability-AI/sd3.5 sd3_infer.get_sigmas), then 0: linspace in sigma from
    sigma_max = shift(1) = 1 to sigma_min = shift(1/1000), each point mapped through shift_sigmas
    again (so the last nonzero sigma is shift(shift(1/1000)), 0.0089 at shift 3; diffusers'
    FlowMatchEulerDiscreteScheduler does the same)."""
    sigma_min = shift_sigmas(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64), shift)
    t = torch.linspace(1.0, sigma_min.item(), steps, dtype=torch.float64)
    return shift_sigmas(t, shift).tolist() + [0.0]


def _dpmpp_2m(x: Tensor, denoised: Tensor, previous: tuple[float, Tensor] | None, sigma: float,
              sigma_next: float) -> Tensor:
    """One DPM-Solver++(2M) step on x = x0 + sigma * eps (k-diffusion's sample_dpmpp_2m, with
    lambda = -log sigma); `previous` is (sigma, denoised) of the step before, None on the first."""
    if sigma_next == 0:
        return denoised
    h = math.log(sigma / sigma_next)
    if previous is not None:
        sigma_prev, old_denoised = previous
        r = math.log(sigma_prev / sigma) / h
        denoised = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return (sigma_next / sigma) * x - math.expm1(-h) * denoised


@torch.no_grad()
def sample_flow(model: Denoiser, noise: Tensor, sigmas: list[float], cond: Any, neg_cond: Any = None,
                guidance: Guidance = Guidance(), sampler: str = "euler", time_scale: float = 1.0) -> Tensor:
    """Integrate a velocity model from noise at sigmas[0] down to sigmas[-1] (0).

    model(x, t, cond) returns the velocity eps - x0 at t = sigma * time_scale (FLUX 1, SD3 1000).
      euler     x <- x + (sigma_next - sigma) * v, FLUX's step exactly
      dpmpp_2m  SD3.5's sd3_impls.sample_dpmpp_2m: the k-diffusion DPM-Solver++(2M) update applied
                to the flow sample as if it were x0 + sigma * eps, on x0 = x - sigma * v
    CFG combines velocities (SD3.5's reference combines x0 = x - sigma v: the same up to rounding)."""
    _check_choice("sampler", sampler, FLOW_SAMPLERS)
    x = noise
    guider = Guider(model, cond, neg_cond, guidance, steps=len(sigmas) - 1)
    previous = None  # (sigma, x0) of the previous step, for DPM++ 2M
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        t = torch.full((x.shape[0],), sigma * time_scale, device=x.device)
        velocity = guider(x, t, i, Level.flow(sigma), "flow")
        if sampler == "euler":
            x = x + (sigma_next - sigma) * velocity
        else:
            x0 = x - sigma * velocity
            x = _dpmpp_2m(x, x0, previous, sigma, sigma_next)
            previous = (sigma, x0)
    return x


# --- DDPM (SDXL) ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class DDPMSchedule:
    timesteps: tuple[float, ...]  # the t fed to the model at each step (DDPM indices)
    abar: tuple[float, ...]  # alphas_cumprod of each step's input x
    abar_final: float  # the level after the last step: 1.0 (clean) or abar[0] ("sigma_min")


def ddpm_timesteps(steps: int, spacing: str = "leading", steps_offset: int = 1,
                   num_train_timesteps: int = 1000) -> list[int]:
    """Descending DDPM indices, as diffusers' schedulers space them ('Common Diffusion Noise
    Schedules and Sample Steps are Flawed', Table 2):
      leading   i * (T // steps) + steps_offset          (SDXL: steps_offset 1)
      trailing  round(T - i * T / steps) - 1             (starts at T - 1; zero-SNR models)
      linspace  round(i * (T - 1) / (steps - 1))         (DDIM's and DDPM's rounding)"""
    _check_choice("spacing", spacing, SPACINGS)
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps={steps} must be in 1..{num_train_timesteps}.")
    total = num_train_timesteps
    if spacing == "leading":
        ratio = total // steps
        return [i * ratio + steps_offset for i in reversed(range(steps))]
    # numpy's own grids: arange takes its step as x[1] - x[0], which decides ties such as 937.5
    if spacing == "trailing":
        return (np.arange(total, 0, -total / steps).round() - 1).astype(np.int64).tolist()
    return np.linspace(0, total - 1, steps).round()[::-1].astype(np.int64).tolist()


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> list[float]:
    """Karras et al. 2022 (eq. 5): sigma_max -> sigma_min evenly spaced in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return ((inv_max + ramp * (inv_min - inv_max)) ** rho).tolist()


def sigma_to_timestep(sigma: float, table: Tensor) -> float:
    """The fractional DDPM index whose k-diffusion sigma is `sigma`, interpolating log sigma in the
    (T,) increasing table (diffusers' _sigma_to_t); clamped to [0, T - 1]."""
    log_table = table.double().log()
    log_sigma = math.log(sigma)
    low = int(torch.searchsorted(log_table, torch.tensor([log_sigma], dtype=torch.float64), right=True)) - 1
    low = min(max(low, 0), len(table) - 2)
    w = (log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1])
    return low + min(max(float(w), 0.0), 1.0)


def ddpm_schedule(abar: Tensor, steps: int, spacing: str = "leading", steps_offset: int = 1,
                  karras: bool = False, final_sigma: str = "zero") -> DDPMSchedule:
    """The steps of a DDPM sampler over the (T,) training abar (losses.alphas_cumprod).

    karras=False: the indices of ddpm_timesteps, each at its own abar.
    karras=True:  Karras sigmas between the table's first and last sigma (abar = 0 counts as
                  ZERO_SNR_ABAR), the model fed the nearest integer index (diffusers'
                  DPMSolverMultistepScheduler with use_karras_sigmas; spacing is unused).
    final_sigma: "zero" ends on the clean sample; "sigma_min" ends at abar[0] (diffusers' DDIM
    with set_alpha_to_one=False, as SDXL's scheduler config has it)."""
    _check_choice("final_sigma", final_sigma, FINAL_SIGMAS)
    table = abar.double()
    if karras:
        table_sigmas = ddpm_sigmas(table.clamp(min=ZERO_SNR_ABAR))
        sigmas = karras_sigmas(table_sigmas[0].item(), table_sigmas[-1].item(), steps)
        timesteps = [float(round(sigma_to_timestep(s, table_sigmas))) for s in sigmas]
        levels = [1 / (1 + s * s) for s in sigmas]
    else:
        timesteps = [float(t) for t in ddpm_timesteps(steps, spacing, steps_offset, len(table))]
        levels = [table[int(t)].item() for t in timesteps]
    final = 1.0 if final_sigma == "zero" else table[0].item()
    return DDPMSchedule(tuple(timesteps), tuple(levels), final)


def _ancestral_step(x0: Tensor, eps: Tensor, level: Level, next_level: Level,
                    generator: torch.Generator) -> Tensor:
    """k-diffusion's Euler ancestral (eta 1) in x / alpha: down to sigma_down along eps, then fresh
    noise of sigma_up, sigma_down^2 + sigma_up^2 = sigma_next^2."""
    sigma, sigma_next = level.k_sigma, next_level.k_sigma
    sigma_up = sigma_next * math.sqrt(1 - (sigma_next / sigma) ** 2)
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    x = x0 + sigma_down * eps
    if sigma_up > 0:
        x = x + sigma_up * _randn_like(x, generator)
    return next_level.alpha * x


def _randn_like(x: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal noise drawn on the generator's device (the CPU: the same on every device), in
    fp32 whatever x's dtype (fp64 for an fp64 x)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=dtype).to(x.device, x.dtype)


@torch.no_grad()
def sample_ddpm(model: Denoiser, noise: Tensor, schedule: DDPMSchedule, cond: Any, neg_cond: Any = None,
                guidance: Guidance = Guidance(), sampler: str = "euler", prediction: str = "epsilon",
                generator: torch.Generator | None = None) -> Tensor:
    """Sample a DDPM model (eps or v) from noise = the x of the first step (unit variance).

    model(x, t, cond) sees x = sqrt(abar) x0 + sqrt(1 - abar) eps itself (the k-diffusion input
    scaling c_in = 1 / sqrt(sigma^2 + 1) is already in it) and t from schedule.timesteps.
      euler, ddim      x <- a' x0 + s' eps: Euler on x / a against sigma = s / a is DDIM (eta 0);
                       euler floors abar at ZERO_SNR_ABAR, ddim takes abar = 0 exactly
      euler_ancestral  k-diffusion's, noise from `generator` (required)
      dpmpp_2m         DPM-Solver++(2M) on x / a, first order on the first and last step
    Returns x at schedule.abar_final (the clean sample for final_sigma "zero")."""
    _check_choice("sampler", sampler, DDPM_SAMPLERS)
    _check_choice("prediction", prediction, ("epsilon", "v"))
    if sampler == "euler_ancestral" and generator is None:
        raise ValueError("euler_ancestral draws noise at every step: "
                         "pass generator=torch.Generator().manual_seed(seed).")
    floor = 0.0 if sampler == "ddim" else ZERO_SNR_ABAR
    levels = [Level.ddpm(max(a, floor)) for a in schedule.abar] + [Level.ddpm(schedule.abar_final)]
    if prediction == "epsilon" and levels[0].alpha == 0:
        raise ValueError("abar = 0 (zero terminal SNR) leaves x0 undefined for an eps model: use prediction='v'.")
    x = noise
    guider = Guider(model, cond, neg_cond, guidance, steps=len(schedule.timesteps))
    previous = None  # (k-sigma, x0) of the previous step, for DPM++ 2M
    for i, timestep in enumerate(schedule.timesteps):
        level, next_level = levels[i], levels[i + 1]
        t = torch.full((x.shape[0],), timestep, device=x.device)
        x0, eps = x0_and_eps(guider(x, t, i, level, prediction), x, level, prediction)
        if sampler == "euler_ancestral":
            x = _ancestral_step(x0, eps, level, next_level, generator)
        elif sampler == "dpmpp_2m":
            x = next_level.alpha * _dpmpp_2m(x / level.alpha, x0, previous, level.k_sigma, next_level.k_sigma)
            previous = (level.k_sigma, x0)
        else:
            x = next_level.alpha * x0 + next_level.sigma * eps
    return x


# --- DeepFloyd IF ------------------------------------------------------------------------------

def if_alphas_cumprod() -> Tensor:
    """IF's (1000,) float64 abar: the cosine schedule (squaredcos_cap_v2, max_beta 0.999)."""
    return alphas_cumprod(ddpm_betas("squaredcos_cap_v2"))


def space_timesteps(num_timesteps: int, section_counts: str) -> list[int]:
    """Descending original indices kept by a respacing (deep-floyd/IF model/respace.space_timesteps):
    "150", "ddim50", a named mode of IF_RESPACINGS ("smart50", "fast27", ...), or comma-separated
    counts, one per equal section of the original steps, each section strided evenly.
    IF's modules map "fast27" to "10,10,3,2,2" before respacing (keeping index 999), as here."""
    counts = IF_RESPACINGS.get(section_counts, section_counts)
    if counts.startswith("ddim"):
        desired = int(counts[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(reversed(range(0, num_timesteps, stride)))
        raise ValueError(f"cannot make exactly {desired} steps out of {num_timesteps} with an integer stride")
    section_sizes = [int(c) for c in counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_sizes))
    start, kept = 0, set()
    for i, count in enumerate(section_sizes):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"respacing {section_counts!r}: cannot divide a section of {size} steps into {count}")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        index = 0.0
        for _ in range(count):
            kept.add(start + round(index))
            index += stride  # accumulated, as IF does: the rounding of .5 cases depends on it
        start += size
    return sorted(kept, reverse=True)


def respaced_betas(abar: Tensor, timesteps: list[int]) -> Tensor:
    """(N,) float64 betas of the respaced process, in ascending time: 1 - abar_t / abar_prev over
    the kept indices (IF's SpacedDiffusion); its abar at each kept index is the original one."""
    kept = abar.double()[sorted(timesteps)]
    previous = torch.cat([kept.new_ones(1), kept[:-1]])
    return 1 - kept / previous


def dynamic_threshold(x0: Tensor, percentile: float = 0.95, max_value: float = 1.5) -> Tensor:
    """Imagen's dynamic thresholding as IF applies it: s = the percentile of |x0| over each sample,
    clamped to [1, max_value]; x0 clipped to [-s, s] and divided by s (max_value 1: a plain clip)."""
    flat = x0.flatten(1)  # (B, C*H*W)
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()  # quantile needs them
    s = torch.quantile(flat.abs(), percentile, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (flat.clamp(-s, s) / s).view_as(x0).to(x0.dtype)


def _if_posterior_step(x: Tensor, x0: Tensor, variance_values: Tensor | None, abar_t: float, abar_prev: float,
                       generator: torch.Generator) -> Tensor:
    """x_prev ~ q(x_prev | x, x0) with IF's learned-range variance: log var = frac log beta +
    (1 - frac) log beta_posterior, frac = (v + 1) / 2; variance_values None: the fixed-small
    variance beta_posterior (diffusers' "fixed_small"); no noise on the last step."""
    beta = 1 - abar_t / abar_prev
    coef_x0 = beta * math.sqrt(abar_prev) / (1 - abar_t)
    coef_x = (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar_t)
    mean = coef_x0 * x0 + coef_x * x
    if abar_prev == 1.0:
        return mean
    log_posterior = math.log(beta * (1 - abar_prev) / (1 - abar_t))
    if variance_values is None:
        return mean + math.exp(0.5 * log_posterior) * _randn_like(x, generator)
    frac = (variance_values + 1) / 2
    log_variance = frac * math.log(beta) + (1 - frac) * log_posterior
    return mean + torch.exp(0.5 * log_variance) * _randn_like(x, generator)


@torch.no_grad()
def sample_if(model: Denoiser, noise: Tensor, cond: Any, neg_cond: Any = None, respacing: str = "150",
              guidance: Guidance = Guidance(scale=7.0), threshold_max: float = 1.5,
              threshold_percentile: float = 0.95, generator: torch.Generator | None = None,
              abar: Tensor | None = None, learned_variance: bool = True) -> Tensor:
    """IF's respaced ancestral DDPM (deep-floyd/IF gaussian_diffusion.p_sample_loop).

    model(x, t, cond) sees the ORIGINAL index t of each kept step and returns 2C channels: eps, then
    the learned-range variance values in [-1, 1]. CFG acts on eps; the variance is the conditional
    pass's. x0 is dynamically thresholded (percentile, threshold_max). Defaults: stage I ("150",
    CFG 7, max 1.5); stage II: respacing "smart50", Guidance(scale=4.0), threshold_max 1.0, and a
    model that concatenates the q_sample-noised upsampled stage-I image itself. `generator` (required)
    draws the noise of every step but the last. learned_variance=False ignores the variance channels
    and steps with the fixed-small variance (diffusers' IF LoRA docs; for epsilon-only fine-tunes)."""
    if generator is None:
        raise ValueError("IF's DDPM draws noise at every step: pass generator=torch.Generator().manual_seed(seed).")
    abar = if_alphas_cumprod() if abar is None else abar.double()
    timesteps = space_timesteps(len(abar), respacing)
    x = noise
    channels = x.shape[1]
    guider = Guider(model, cond, neg_cond, guidance, steps=len(timesteps))
    for i, timestep in enumerate(timesteps):
        abar_t = abar[timestep].item()
        abar_prev = abar[timesteps[i + 1]].item() if i + 1 < len(timesteps) else 1.0
        level = Level.ddpm(abar_t)
        t = torch.full((x.shape[0],), float(timestep), device=x.device)
        out = guider(x, t, i, level, "epsilon")
        if out.shape[1] != 2 * channels:
            raise ValueError(f"IF's model returns eps and variance ({2 * channels} channels), got {out.shape[1]}")
        x0, _ = x0_and_eps(out[:, :channels], x, level, "epsilon")
        x0 = dynamic_threshold(x0, threshold_percentile, threshold_max)
        variance_values = out[:, channels:] if learned_variance else None
        x = _if_posterior_step(x, x0, variance_values, abar_t, abar_prev, generator)
    return x


def q_sample(x0: Tensor, t: int | Tensor, noise: Tensor, abar: Tensor) -> Tensor:
    """The forward process at DDPM index t (an int or (B,)): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.
    IF stage II noises the upsampled stage-I image so at t = int(aug_level * 1000), on IF's abar."""
    abar_t = abar.double()[torch.as_tensor(t).cpu()].reshape(-1, *([1] * (x0.ndim - 1)))
    a, s = abar_t.sqrt().to(x0.device, x0.dtype), (1 - abar_t).sqrt().to(x0.device, x0.dtype)
    return a * x0 + s * noise


def initial_noise(shape: tuple[int, ...], generator: torch.Generator, device=None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Start noise drawn from the generator on its device (a CPU generator: the same image on every
    device). Pass the same generator on to an ancestral sampler, as diffusers' pipelines do."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device, dtype)
