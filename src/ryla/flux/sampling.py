"""FLUX sampling with ComfyUI's semantics: sigmas, seeded noise, masks and latent packing
(the samplers themselves are in ryla.flux.samplers).

Sources of truth, in ComfyUI: comfy/model_sampling.py (ModelSamplingFlux,
flux_time_shift), comfy/samplers.py (its schedulers, KSampler.set_steps), comfy/sample.py
(prepare_noise), comfy/utils.py (reshape_mask). Reproducing them makes a ComfyUI workflow run
here give ComfyUI's sigmas and starting noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# FLUX latent format (comfy/latent_formats.py Flux): model space = (vae_latent - shift) * scale.
LATENT_SCALE = 0.3611
LATENT_SHIFT = 0.1159
DEFAULT_SHIFT = 1.15  # ModelSamplingFlux default: the shift for 1024x1024
TIMESTEPS = 10000


def flux_time_shift(mu: float, sigma: float, t):
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def resolution_shift(width: int, height: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """ModelSamplingFlux's shift for an image size: linear in the number of 2x2 latent
    patches, base_shift at 256 of them and max_shift at 4096 (1024x1024)."""
    m = (max_shift - base_shift) / (4096 - 256)
    b = base_shift - m * 256
    return (width * height / (8 * 8 * 2 * 2)) * m + b


class FluxModelSampling:
    """ComfyUI's ModelSamplingFlux: a table of 10000 sigmas for one shift value."""

    def __init__(self, shift: float = DEFAULT_SHIFT):
        self.shift = shift
        t = torch.arange(1, TIMESTEPS + 1, 1) / TIMESTEPS  # float32, as ComfyUI builds it
        self.sigmas = self.sigma(t)

    def sigma(self, t):
        return flux_time_shift(self.shift, 1.0, t)

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]


def simple_scheduler(ms: FluxModelSampling, steps: int) -> torch.Tensor:
    stride = len(ms.sigmas) / steps
    sigmas = [float(ms.sigmas[-(1 + int(x * stride))]) for x in range(steps)]
    return torch.FloatTensor(sigmas + [0.0])


def normal_scheduler(ms: FluxModelSampling, steps: int, sgm: bool = False) -> torch.Tensor:
    # For flow models ComfyUI's timestep(sigma) is sigma itself, so this applies the shift to
    # already-shifted values. That is what ComfyUI computes, so it is what we compute.
    start, end = ms.sigma_max, ms.sigma_min
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigmas = [float(ms.sigma(ts)) for ts in timesteps]
    if append_zero:
        sigmas.append(0.0)
    return torch.FloatTensor(sigmas)


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """k-diffusion's get_sigmas_karras (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def karras_scheduler(ms: FluxModelSampling, steps: int, rho: float = 7.0) -> torch.Tensor:
    """The karras schedule between the model's sigma_min and sigma_max."""
    return karras_sigmas(steps, float(ms.sigma_min), float(ms.sigma_max), rho)


def exponential_scheduler(ms: FluxModelSampling, steps: int) -> torch.Tensor:
    """k-diffusion's get_sigmas_exponential: log-uniform from sigma_max to sigma_min."""
    return _append_zero(torch.linspace(math.log(float(ms.sigma_max)), math.log(float(ms.sigma_min)), steps).exp())


def ddim_uniform_scheduler(ms: FluxModelSampling, steps: int) -> torch.Tensor:
    """ComfyUI's ddim_scheduler: every len/steps-th entry of the sigma table, from the second,
    highest first (with a zero appended unless the table's second entry is already zero)."""
    sigmas, index = [], 1
    if math.isclose(float(ms.sigmas[index]), 0, abs_tol=0.00001):
        steps += 1
    else:
        sigmas = [0.0]
    stride = max(len(ms.sigmas) // steps, 1)
    while index < len(ms.sigmas):
        sigmas.append(float(ms.sigmas[index]))
        index += stride
    return torch.FloatTensor(sigmas[::-1])


def beta_scheduler(ms: FluxModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """ComfyUI's beta_scheduler (from "Beta Sampling is All You Need", arXiv:2407.12173): table
    indices at the Beta(alpha, beta) distribution's quantiles, repeats dropped."""
    import numpy as np
    from scipy import stats

    total = len(ms.sigmas) - 1
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    indices = np.rint(stats.beta.ppf(quantiles, alpha, beta) * total)
    sigmas, last = [], -1
    for index in indices:
        if index != last:
            sigmas.append(float(ms.sigmas[int(index)]))
        last = index
    return torch.FloatTensor(sigmas + [0.0])


def linear_quadratic_scheduler(ms: FluxModelSampling, steps: int, threshold_noise: float = 0.025,
                               linear_steps: int | None = None) -> torch.Tensor:
    """ComfyUI's linear_quadratic_schedule (after Genmo's Mochi): linear up to threshold_noise
    for the first half of the steps, quadratic after, scaled by sigma_max."""
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        linear_steps = steps // 2 if linear_steps is None else linear_steps
        linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = step_diff / (linear_steps * quadratic_steps ** 2)
        linear_coef = threshold_noise / linear_steps - 2 * step_diff / (quadratic_steps ** 2)
        const = quadratic_coef * (linear_steps ** 2)
        quadratic = [quadratic_coef * (i ** 2) + linear_coef * i + const for i in range(linear_steps, steps)]
        schedule = [1.0 - x for x in linear + quadratic + [1.0]]
    return torch.FloatTensor(schedule) * ms.sigma_max.cpu()


def kl_optimal_scheduler(ms: FluxModelSampling, steps: int) -> torch.Tensor:
    """ComfyUI's kl_optimal_scheduler (from AUTOMATIC1111's PR 15608, "Align Your Steps"'s KL
    optimal schedule): tan of a linear interpolation between atan(sigma_max) and atan(sigma_min)."""
    positions = torch.arange(steps, dtype=torch.float).div_(steps - 1) if steps > 1 else torch.zeros(1)
    sigmas = positions.new_zeros(steps + 1)
    sigmas[:-1] = (positions * math.atan(float(ms.sigma_min))
                   + (1 - positions) * math.atan(float(ms.sigma_max))).tan_()
    return sigmas


# ComfyUI's scheduler names (comfy/samplers.py SCHEDULER_HANDLERS), in its order.
SCHEDULERS: dict[str, Callable[[FluxModelSampling, int], torch.Tensor]] = {
    "simple": simple_scheduler,
    "sgm_uniform": lambda ms, steps: normal_scheduler(ms, steps, sgm=True),
    "karras": karras_scheduler,
    "exponential": exponential_scheduler,
    "ddim_uniform": ddim_uniform_scheduler,
    "beta": beta_scheduler,
    "normal": normal_scheduler,
    "linear_quadratic": linear_quadratic_scheduler,
    "kl_optimal": kl_optimal_scheduler,
}


def calculate_sigmas(ms: FluxModelSampling, scheduler: str, steps: int) -> torch.Tensor:
    return SCHEDULERS[scheduler](ms, steps)


def ksampler_sigmas(ms: FluxModelSampling, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """KSampler.set_steps: with denoise < 1, the last `steps` steps of a longer schedule."""
    if denoise is None or denoise > 0.9999:
        return calculate_sigmas(ms, scheduler, steps)
    if denoise <= 0.0:
        return torch.FloatTensor([])
    sigmas = calculate_sigmas(ms, scheduler, int(steps / denoise))
    return sigmas[-(steps + 1):]


def prepare_noise(shape: tuple[int, ...], seed: int, batch_index: list[int] | None = None) -> torch.Tensor:
    """comfy.sample.prepare_noise: one CPU float32 draw for the whole batch, unpacked shape.
    With a latent's batch_index (LatentFromBatch's), image i of the batch gets the noise that
    position batch_index[i] had in the full batch: one draw per position up to the largest.
    ComfyUI seeds torch's global generator; a private CPU generator gives the same numbers
    without touching global state, so concurrent requests cannot disturb each other's noise."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if batch_index is None:
        return torch.randn(shape, dtype=torch.float32, generator=generator, device="cpu")
    draws = {}
    for position in range(max(batch_index) + 1):
        noise = torch.randn((1, *shape[1:]), dtype=torch.float32, generator=generator, device="cpu")
        if position in batch_index:
            draws[position] = noise
    return torch.cat([draws[position] for position in batch_index])


def latent_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A LATENT's noise_mask at the latent's shape (comfy/utils.py reshape_mask, as
    sampler_helpers.prepare_mask uses it): bilinear to the latent's height and width, the same
    mask for every channel, repeated or cut to the batch."""
    mask = mask.float().reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    mask = torch.nn.functional.interpolate(mask, size=tuple(shape[2:]), mode="bilinear")
    if mask.shape[1] < shape[1]:
        mask = mask.repeat(1, shape[1], 1, 1)[:, :shape[1]]
    return repeat_to_batch(mask, shape[0])


def repeat_to_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """comfy/utils.py repeat_to_batch_size: the first `batch` entries, repeating as needed."""
    if tensor.shape[0] > batch:
        return tensor[:batch]
    if tensor.shape[0] < batch:
        repeats = math.ceil(batch / tensor.shape[0])
        return tensor.repeat(repeats, *([1] * (tensor.ndim - 1)))[:batch]
    return tensor


# Packing of latents into transformer tokens. Same layout as diffusers' FluxPipeline
# _pack_latents / _unpack_latents / _prepare_latent_image_ids (static methods there); kept
# here so the engine does not import the pipeline module, which pulls in image processors.

def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2x2 patch becomes one token."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of pack_latents for a latent of height h and width w."""
    b, _, dim = tokens.shape
    c = dim // 4
    x = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def pad_to_patches(x: torch.Tensor) -> torch.Tensor:
    """A latent of odd height or width padded to whole 2x2 patches, circularly, as
    comfy/ldm/common_dit.py pad_to_patch_size does before FLUX patches it."""
    h, w = x.shape[-2:]
    if h % 2 == 0 and w % 2 == 0:
        return x
    return torch.nn.functional.pad(x, (0, w % 2, 0, h % 2), mode="circular")


def latent_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Rope positions of the image tokens: (0, row, column) per 2x2 patch."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


REFERENCE_METHODS = ("offset", "index", "uxo")


def reference_tokens(latents: list[torch.Tensor], method: str, h: int, w: int, device,
                     dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference latents (model space, [1, C, H, W] each) as tokens to append to an h x w
    latent's, and their rope positions, as comfy/ldm/flux/model.py Flux._forward places
    ref_latents: "offset" (FLUX.1 Kontext's default) puts each reference at index 1 of the first
    rope axis, the second and later ones beside the earlier ones along their shorter side;
    "index" gives each its own index (1, 2, ...) at the origin; "uxo" (UNO/USO) keeps index
    0 and moves each diagonally past the image and the references before it. Offsets are in
    latent pixels and become patch positions rounded as process_img rounds them."""
    if method not in REFERENCE_METHODS:
        raise ValueError(f"unknown reference latents method {method!r}; one of {', '.join(REFERENCE_METHODS)}")
    tokens, positions = [], []
    used_h = used_w = 0
    index = 0
    for latent in latents:
        ref_h, ref_w = latent.shape[-2:]
        h_offset = w_offset = 0
        if method == "index":
            index += 1
        elif method == "uxo":
            index = 0
            h_offset, w_offset = h + used_h, w + used_w  # h_len * patch_size: the padded latent's size
            used_h, used_w = used_h + ref_h, used_w + ref_w
        else:
            index = 1
            if ref_h + used_h > ref_w + used_w:
                w_offset = used_w
            else:
                h_offset = used_h
            used_h, used_w = max(used_h, ref_h + h_offset), max(used_w, ref_w + w_offset)
        padded = pad_to_patches(latent[:1].float())
        ids = latent_image_ids(padded.shape[-2], padded.shape[-1], "cpu", torch.float32)
        ids[:, 0] = index
        ids[:, 1] += (h_offset + 1) // 2
        ids[:, 2] += (w_offset + 1) // 2
        tokens.append(pack_latents(padded))
        positions.append(ids)
    return (torch.cat(tokens, dim=1).to(device=device, dtype=dtype),
            torch.cat(positions, dim=0).to(device=device, dtype=dtype))
