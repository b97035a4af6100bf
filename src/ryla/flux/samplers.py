"""ComfyUI's samplers for a flow model, written from comfy/k_diffusion/sampling.py.

A sampler gets a `FlowModel` (the transformer as ComfyUI's samplers see it, with
comfy/samplers.py KSamplerX0Inpaint's masking), the starting x in model space and the sigmas.
Where ComfyUI has a rectified-flow variant for its CONST model sampling (FLUX's), that variant
is the one written here: sample_euler_ancestral_RF, sample_dpm_2_ancestral_RF, the half-log-SNR
of sigma_to_half_log_snr, offset_first_sigma_for_snr. Noise injected by the stochastic samplers
comes from the same generators as ComfyUI's (default_noise_sampler, BrownianTreeNoiseSampler),
seeded from the request's seed, so a workflow gives ComfyUI's numbers here.

Arithmetic on sigmas is done in Python floats (float64), as the existing Euler loop does; the
latents stay in their own dtype.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

# torchsde warns when float32 sigmas put a query a hair outside the tree's interval; ComfyUI's trees
# are built from the same float32 values and see the same harmless warning.
warnings.filterwarnings("ignore", message="Should have (ta>=t0|tb<=t1)", category=UserWarning)

Velocity = Callable[[torch.Tensor, float, int], torch.Tensor]
Progress = Callable[[int, int], None] | None


@dataclass
class FlowModel:
    """The model for one sampling run: `predict(x, sigma, step)` is FLUX's velocity at one of
    the run's sigmas (`step` is the index of the schedule step under way).

    With a `denoise_mask` (1 = repaint, 0 = keep, latent-shaped) it is KSamplerX0Inpaint: the
    kept region of x is replaced by the input latent noised to sigma before the model sees it,
    and the prediction there is the input latent. `mask_function(sigma, mask)` is ComfyUI's
    model-level denoise_mask_function (DifferentialDiffusion)."""

    predict: Velocity
    shift: float = 1.15
    denoise_mask: torch.Tensor | None = None
    latent: torch.Tensor | None = None  # the input latent, model space
    noise: torch.Tensor | None = None  # the run's initial noise (unscaled)
    mask_function: Callable[[float, torch.Tensor], torch.Tensor] | None = None
    seed: int = 0
    # The first evaluation of the step under way, as ComfyUI's sampler callbacks report it:
    # (x, sigma, velocity) or (denoised,); the last step's is SamplerCustom's denoised_output.
    _first: tuple | None = None
    _record: bool = True

    def velocity(self, x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        if self.denoise_mask is None:
            v = self.predict(x, sigma, step)
            self._keep(x, sigma, v)
            return v
        return (x - self.denoised(x, sigma, step)) / sigma

    def denoised(self, x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        """The model's x0 prediction (comfy/model_sampling.py CONST.calculate_denoised)."""
        if self.denoise_mask is None:
            v = self.predict(x, sigma, step)
            self._keep(x, sigma, v)
            return x - sigma * v
        out = self._masked(x, sigma, step)
        self._keep(out)
        return out

    def _keep(self, *evaluation) -> None:
        if self._record:
            self._first, self._record = evaluation, False

    def tick(self, callback: Progress, i: int, total: int) -> None:
        """A step is done: report progress; the next evaluation starts the next step."""
        self._record = True
        if callback is not None:
            callback(i + 1, total)

    def last_denoised(self) -> torch.Tensor | None:
        if self._first is None:
            return None
        if len(self._first) == 1:
            return self._first[0]
        x, sigma, v = self._first
        return x - sigma * v

    def _masked(self, x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        mask = self.denoise_mask if self.mask_function is None else self.mask_function(sigma, self.denoise_mask)
        keep = 1.0 - mask
        noised = sigma * self.noise + (1.0 - sigma) * self.latent  # CONST.noise_scaling
        x_in = x * mask + noised * keep
        out = x_in - sigma * self.predict(x_in, sigma, step)
        return out * mask + self.latent * keep

    def percent_to_sigma(self, percent: float) -> float:
        return percent_to_sigma(self.shift, percent)


def percent_to_sigma(shift: float, percent: float) -> float:
    """ModelSamplingFlux.percent_to_sigma: the sigma at a fraction of the schedule."""
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    return math.exp(shift) / (math.exp(shift) + (1 / (1.0 - percent) - 1) ** 1.0)


def differential_diffusion(sigmas: torch.Tensor, sigma_min: float, strength: float = 1.0):
    """comfy_extras/nodes_differential_diffusion.py's denoise_mask_function: at each sigma, the
    mask's values above the run's progress threshold repaint; strength < 1 blends that binary
    mask with the soft one. For FLUX the model's timestep is sigma itself."""
    sigma_from = float(sigmas[0])
    sigma_to = max(sigma_min, float(sigmas[-1]))

    def mask_function(sigma: float, mask: torch.Tensor) -> torch.Tensor:
        threshold = (sigma - sigma_to) / (sigma_from - sigma_to)
        binary = (mask >= threshold).to(mask.dtype)
        if strength and strength < 1:
            return strength * binary + (1 - strength) * mask
        return binary

    return mask_function


# ---------------------------------------------------------------------------- noise


def default_noise_sampler(x: torch.Tensor, seed: int):
    """k-diffusion's default_noise_sampler as ComfyUI seeds it: a generator on x's device,
    seeded with the request's seed (+1 on the CPU), one draw of x's shape per call."""
    generator = torch.Generator(device=x.device).manual_seed(seed + 1 if x.device.type == "cpu" else seed)
    return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device,
                                                 generator=generator)


def brownian_noise_sampler(x: torch.Tensor, sigmas: torch.Tensor, seed: int, cpu: bool = True):
    """BrownianTreeNoiseSampler (torchsde's BrownianTree over [sigma_min, sigma_max], entropy =
    seed): the increments of one Brownian path, so the noise is the same however the interval
    is cut. `cpu` builds the tree on the CPU (ComfyUI's default; its *_gpu samplers do not)."""
    import torchsde

    positive = sigmas[sigmas > 0]
    t0, t1 = torch.as_tensor(positive.min()), torch.as_tensor(sigmas.max())
    w0 = torch.zeros_like(x)
    if cpu:
        t0, w0, t1 = t0.detach().cpu(), w0.detach().cpu(), t1.detach().cpu()
    tree = torchsde.BrownianTree(t0, w0, t1, entropy=seed)

    def sample(sigma: float, sigma_next: float) -> torch.Tensor:
        a, b = torch.as_tensor(sigma, dtype=sigmas.dtype), torch.as_tensor(sigma_next, dtype=sigmas.dtype)
        low, high, sign = (a, b, 1) if a < b else (b, a, -1)
        if cpu:
            low, high = low.cpu().float(), high.cpu().float()
        w = tree(low, high).to(device=x.device, dtype=x.dtype) * sign
        return w / (b - a).abs().sqrt().to(x.device, x.dtype)

    return sample


def _ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """k-diffusion's get_ancestral_step: the sigma to step down to, and the noise to add."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def _half_log_snr(sigma: float) -> float:
    """sigma_to_half_log_snr for CONST: log((1 - sigma) / sigma)."""
    return math.log((1.0 - sigma) / sigma)


def _sigma_of_half_log_snr(value: float) -> float:
    return 1.0 / (1.0 + math.exp(value))


def _snr_sigmas(model: FlowModel, sigmas: torch.Tensor) -> list[float]:
    """offset_first_sigma_for_snr: a first sigma of 1 (infinite SNR) moves to 1e-4 percent."""
    values = [float(s) for s in sigmas]
    if len(values) > 1 and values[0] >= 1:
        values[0] = model.percent_to_sigma(1e-4)
    return values


# ---------------------------------------------------------------------------- samplers


def euler(model: FlowModel, x, sigmas, callback: Progress = None):
    """sample_euler: x_next = x + (sigma_next - sigma) * d, where d = (x - denoised) / sigma is
    the flow model's velocity."""
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x = x + (sigma_next - sigma) * model.velocity(x, sigma, i)
        model.tick(callback, i, total)
    return x


def euler_ancestral(model: FlowModel, x, sigmas, callback: Progress = None, eta: float = 1.0, s_noise: float = 1.0):
    """sample_euler_ancestral_RF: step down past sigma_next, then mix fresh noise back in."""
    noise = default_noise_sampler(x, model.seed)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model.denoised(x, sigma, i)
        if sigma_next == 0:
            x = denoised
        else:
            sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
            alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
            renoise = (sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2) ** 0.5
            ratio = sigma_down / sigma
            x = ratio * x + (1 - ratio) * denoised
            if eta > 0:
                x = (alpha_next / alpha_down) * x + noise(sigma, sigma_next) * s_noise * renoise
        model.tick(callback, i, total)
    return x


def heun(model: FlowModel, x, sigmas, callback: Progress = None):
    """sample_heun (Karras et al. 2022, algorithm 1, no churn): Euler to the next sigma, a
    second evaluation there, the mean of the two slopes; a plain Euler step onto sigma 0."""
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = model.velocity(x, sigma, i)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = model.velocity(x_2, sigma_next, i + 1)  # sigma_next is step i + 1's sigma
            x = x + (d + d_2) / 2 * dt
        model.tick(callback, i, total)
    return x


def dpm_2(model: FlowModel, x, sigmas, callback: Progress = None):
    """sample_dpm_2: the slope at the log-midpoint sigma_mid = sqrt(sigma * sigma_next) carries
    the whole step; Euler onto sigma 0."""
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = model.velocity(x, sigma, i)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            sigma_mid = math.exp((math.log(sigma) + math.log(sigma_next)) / 2)
            x_2 = x + d * (sigma_mid - sigma)
            x = x + model.velocity(x_2, sigma_mid, i) * (sigma_next - sigma)
        model.tick(callback, i, total)
    return x


def dpm_2_ancestral(model: FlowModel, x, sigmas, callback: Progress = None, eta: float = 1.0, s_noise: float = 1.0):
    """sample_dpm_2_ancestral_RF: a DPM-Solver-2 step down to sigma_down, then renoise."""
    noise = default_noise_sampler(x, model.seed)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = model.velocity(x, sigma, i)
        sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
        alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            renoise = (sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2) ** 0.5
            sigma_mid = math.exp((math.log(sigma) + math.log(sigma_down)) / 2)
            x_2 = x + d * (sigma_mid - sigma)
            x = x + model.velocity(x_2, sigma_mid, i) * (sigma_down - sigma)
            x = (alpha_next / alpha_down) * x + noise(sigma, sigma_next) * s_noise * renoise
        model.tick(callback, i, total)
    return x


def dpmpp_2m(model: FlowModel, x, sigmas, callback: Progress = None):
    """sample_dpmpp_2m (DPM-Solver++(2M), arXiv:2211.01095), in t = -log(sigma): a first-order
    step, then second-order steps from the last two denoised predictions; onto sigma 0 the
    result is the denoised prediction."""
    total = len(sigmas) - 1
    old_denoised = None
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model.denoised(x, sigma, i)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            if old_denoised is None:
                x = (sigma_next / sigma) * x - math.expm1(-h) * denoised
            else:
                r = (math.log(float(sigmas[i - 1])) - math.log(sigma)) / h
                corrected = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                x = (sigma_next / sigma) * x - math.expm1(-h) * corrected
        old_denoised = denoised
        model.tick(callback, i, total)
    return x


def dpmpp_sde(model: FlowModel, x, sigmas, callback: Progress = None, eta: float = 1.0, s_noise: float = 1.0,
              r: float = 0.5, cpu_tree: bool = True):
    """sample_dpmpp_sde (DPM-Solver++ stochastic, a midpoint at r of the half-log-SNR step),
    with Brownian-tree noise."""
    if len(sigmas) <= 1:
        return x
    noise = brownian_noise_sampler(x, sigmas, model.seed, cpu=cpu_tree)
    values = _snr_sigmas(model, sigmas)
    total = len(values) - 1
    for i in range(total):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = model.denoised(x, sigma, i)
        if sigma_next == 0:
            x = denoised
        else:
            lambda_s, lambda_t = _half_log_snr(sigma), _half_log_snr(sigma_next)
            h = lambda_t - lambda_s
            lambda_s_1 = lambda_s + r * h
            fac = 1 / (2 * r)
            sigma_s_1 = _sigma_of_half_log_snr(lambda_s_1)
            alpha_s = sigma * math.exp(lambda_s)
            alpha_s_1 = sigma_s_1 * math.exp(lambda_s_1)
            alpha_t = sigma_next * math.exp(lambda_t)
            # step 1
            sd, su = _ancestral_step(math.exp(-lambda_s), math.exp(-lambda_s_1), eta)
            h_ = -math.log(sd) - lambda_s
            x_2 = (alpha_s_1 / alpha_s) * math.exp(-h_) * x - alpha_s_1 * math.expm1(-h_) * denoised
            if eta > 0 and s_noise > 0:
                x_2 = x_2 + alpha_s_1 * noise(sigma, sigma_s_1) * s_noise * su
            denoised_2 = model.denoised(x_2, sigma_s_1, i)
            # step 2
            sd, su = _ancestral_step(math.exp(-lambda_s), math.exp(-lambda_t), eta)
            h_ = -math.log(sd) - lambda_s
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (alpha_t / alpha_s) * math.exp(-h_) * x - alpha_t * math.expm1(-h_) * denoised_d
            if eta > 0 and s_noise > 0:
                x = x + alpha_t * noise(sigma, sigma_next) * s_noise * su
        model.tick(callback, i, total)
    return x


def dpmpp_2m_sde(model: FlowModel, x, sigmas, callback: Progress = None, eta: float = 1.0, s_noise: float = 1.0,
                 solver_type: str = "midpoint", cpu_tree: bool = True):
    """sample_dpmpp_2m_sde (DPM-Solver++(2M) SDE) in half-log-SNR, Brownian-tree noise."""
    if len(sigmas) <= 1:
        return x
    noise = brownian_noise_sampler(x, sigmas, model.seed, cpu=cpu_tree)
    values = _snr_sigmas(model, sigmas)
    total = len(values) - 1
    old_denoised, h, h_last = None, None, None
    for i in range(total):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = model.denoised(x, sigma, i)
        if sigma_next == 0:
            x = denoised
        else:
            lambda_s, lambda_t = _half_log_snr(sigma), _half_log_snr(sigma_next)
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigma_next * math.exp(lambda_t)
            x = sigma_next / sigma * math.exp(-h * eta) * x + alpha_t * -math.expm1(-h_eta) * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * (-math.expm1(-h_eta) / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * -math.expm1(-h_eta) * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                x = x + noise(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        old_denoised, h_last = denoised, h
        model.tick(callback, i, total)
    return x


def dpmpp_3m_sde(model: FlowModel, x, sigmas, callback: Progress = None, eta: float = 1.0, s_noise: float = 1.0,
                 cpu_tree: bool = True):
    """sample_dpmpp_3m_sde (DPM-Solver++(3M) SDE): third order from the last three denoised."""
    if len(sigmas) <= 1:
        return x
    noise = brownian_noise_sampler(x, sigmas, model.seed, cpu=cpu_tree)
    values = _snr_sigmas(model, sigmas)
    total = len(values) - 1
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in range(total):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = model.denoised(x, sigma, i)
        if sigma_next == 0:
            x = denoised
        else:
            lambda_s, lambda_t = _half_log_snr(sigma), _half_log_snr(sigma_next)
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigma_next * math.exp(lambda_t)
            x = sigma_next / sigma * math.exp(-h * eta) * x + alpha_t * -math.expm1(-h_eta) * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                x = x + (alpha_t * phi_2) * d
            if eta > 0 and s_noise > 0:
                x = x + noise(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        model.tick(callback, i, total)
    return x


def lcm(model: FlowModel, x, sigmas, callback: Progress = None):
    """sample_lcm: jump to the denoised prediction, then noise it to the next sigma
    (CONST.noise_scaling) with fresh noise."""
    noise = default_noise_sampler(x, model.seed)
    total = max(1, len(sigmas) - 1)
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x = model.denoised(x, sigma, i)
        if sigma_next > 0:
            x = sigma_next * noise(sigma, sigma_next) + (1.0 - sigma_next) * x
        model.tick(callback, i, total)
    return x


def ipndm(model: FlowModel, x, sigmas, callback: Progress = None, max_order: int = 4):
    """sample_ipndm (improved PNDM, from zju-pi/diff-sampler): Adams-Bashforth steps of up to
    fourth order from the slopes of the previous steps."""
    total = len(sigmas) - 1
    history: list[torch.Tensor] = []
    for i in range(total):
        t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model.denoised(x, t_cur, i)
        d_cur = (x - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x = denoised
        elif order == 1:
            x = x + (t_next - t_cur) * d_cur
        elif order == 2:
            x = x + (t_next - t_cur) * (3 * d_cur - history[-1]) / 2
        elif order == 3:
            x = x + (t_next - t_cur) * (23 * d_cur - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            x = x + (t_next - t_cur) * (55 * d_cur - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history.append(d_cur)
        del history[:-(max_order - 1)]
        model.tick(callback, i, total)
    return x


def _deis_times(sigmas: torch.Tensor, epsilon_s: float = 1e-3, sigma_min: float = 0.002, sigma_max: float = 80.0):
    """DEIS's time t for each sigma (comfy/k_diffusion/deis.py edm2t: the sigmas read as a VP
    schedule fitted to EDM's range), and that schedule's beta_0, beta_1; in float32 as there."""
    low, high = torch.tensor(sigma_min), torch.tensor(sigma_max)
    beta_d = 2 * (torch.log(low ** 2 + 1) / epsilon_s - torch.log(high ** 2 + 1)) / (epsilon_s - 1)
    beta_min = torch.log(high ** 2 + 1) - 0.5 * beta_d
    t = ((beta_min ** 2 + 2 * beta_d * (sigmas.cpu() ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    return t, beta_min, beta_d + beta_min


def deis_coefficients(sigmas: torch.Tensor, max_order: int = 3, points: int = 10000) -> list[list[float]]:
    """DEIS's "tab" coefficients: for each step, the integral over [t_cur, t_next] of the VP
    integrand times each Lagrange basis polynomial through the last `order` times, by a sum over
    `points` samples (deis.py get_deis_coeff_list). The integrand is -0.5 d(log alpha)/dt /
    sqrt(alpha (1 - alpha)), with d(log alpha)/dt in closed form."""
    t_steps, beta_0, beta_1 = _deis_times(sigmas)
    coefficients: list[list[float]] = []
    for i in range(len(t_steps) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            coefficients.append([])
            continue
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        taus = torch.linspace(float(t_cur), float(t_next), points)
        dtau = (t_next - t_cur) / points
        alpha = torch.exp(-0.5 * taus ** 2 * (beta_1 - beta_0) - taus * beta_0)
        d_log_alpha = -(taus * (beta_1 - beta_0) + beta_0)
        integrand = -0.5 * d_log_alpha / torch.sqrt(alpha * (1 - alpha))
        previous = t_steps[[i - k for k in range(order)]]
        row = []
        for j in range(order):
            basis = torch.ones_like(taus)
            for k in range(order):
                if k != j:
                    basis = basis * (taus - previous[k]) / (previous[j] - previous[k])
            row.append(float(torch.sum(integrand * basis) * dtau))
        coefficients.append(row)
    return coefficients


def deis(model: FlowModel, x, sigmas, callback: Progress = None, max_order: int = 3):
    """sample_deis (DEIS, arXiv:2204.13902, as zju-pi/diff-sampler writes it and ComfyUI runs
    it): Adams-Bashforth steps whose coefficients integrate the schedule exactly ("tab")."""
    coefficients = deis_coefficients(sigmas, max_order)
    total = len(sigmas) - 1
    history: list[torch.Tensor] = []
    for i in range(total):
        t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model.denoised(x, t_cur, i)
        d_cur = (x - denoised) / t_cur
        order = 1 if t_next <= 0 else min(max_order, i + 1)
        if order == 1:
            x = x + (t_next - t_cur) * d_cur
        else:
            row = coefficients[i]
            x = x + row[0] * d_cur + sum(c * d for c, d in zip(row[1:], reversed(history[-(order - 1):])))
        history.append(d_cur)
        del history[:-(max_order - 1)]
        model.tick(callback, i, total)
    return x


def res_multistep(model: FlowModel, x, sigmas, callback: Progress = None, eta: float = 0.0, s_noise: float = 1.0):
    """res_multistep (the second-order multistep exponential integrator of arXiv:2308.02157, as
    ComfyUI writes it; eta > 0 is its ancestral form)."""
    noise = default_noise_sampler(x, model.seed)
    total = len(sigmas) - 1
    old_denoised, old_sigma_down = None, None
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model.denoised(x, sigma, i)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0 or old_denoised is None:
            x = x + (x - denoised) / sigma * (sigma_down - sigma)
        else:
            t, t_old, t_next, t_prev = (-math.log(sigma), -math.log(old_sigma_down), -math.log(sigma_down),
                                        -math.log(float(sigmas[i - 1])))
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1 = phi1 - phi2 / c2 if math.isfinite(phi2 / c2) else phi1
            b2 = phi2 / c2 if math.isfinite(phi2 / c2) else 0.0
            x = math.exp(-h) * x + h * (b1 * denoised + b2 * old_denoised)
        if sigma_next > 0 and sigma_up:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        old_denoised, old_sigma_down = denoised, sigma_down
        model.tick(callback, i, total)
    return x


# ComfyUI's sampler names that ryla runs, in the order of comfy/samplers.py KSAMPLER_NAMES.
# "ddim" is ComfyUI's euler with its own random noise for the masked region when inpainting
# (comfy/samplers.py sampler_object); the engine does that part.
SAMPLERS: dict[str, Callable] = {
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "heun": heun,
    "dpm_2": dpm_2,
    "dpm_2_ancestral": dpm_2_ancestral,
    "dpmpp_sde": dpmpp_sde,
    "dpmpp_sde_gpu": lambda model, x, sigmas, callback=None: dpmpp_sde(model, x, sigmas, callback, cpu_tree=False),
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": lambda model, x, sigmas, callback=None: dpmpp_2m_sde(model, x, sigmas, callback,
                                                                             cpu_tree=False),
    "dpmpp_2m_sde_heun": lambda model, x, sigmas, callback=None: dpmpp_2m_sde(model, x, sigmas, callback,
                                                                              solver_type="heun"),
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "lcm": lcm,
    "ipndm": ipndm,
    "deis": deis,
    "res_multistep": res_multistep,
    "res_multistep_ancestral": lambda model, x, sigmas, callback=None: res_multistep(model, x, sigmas, callback,
                                                                                     eta=1.0),
    "ddim": euler,
}
