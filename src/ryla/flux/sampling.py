"""FLUX sampling with ComfyUI's semantics: sigmas, seeded noise and the Euler loop.

Sources of truth, in ComfyUI: comfy/model_sampling.py (ModelSamplingFlux,
flux_time_shift), comfy/samplers.py (simple/normal schedulers, KSampler.set_steps),
comfy/sample.py (prepare_noise), comfy/k_diffusion/sampling.py (sample_euler). Reproducing
them makes a ComfyUI workflow run here give ComfyUI's sigmas and starting noise.
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


SCHEDULERS: dict[str, Callable[[FluxModelSampling, int], torch.Tensor]] = {
    "simple": simple_scheduler,
    "normal": normal_scheduler,
    "sgm_uniform": lambda ms, steps: normal_scheduler(ms, steps, sgm=True),
}
SAMPLERS = ("euler",)


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


def prepare_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """comfy.sample.prepare_noise: one CPU float32 draw for the whole batch, unpacked shape.
    ComfyUI seeds torch's global generator; a private CPU generator gives the same numbers
    without touching global state, so concurrent requests cannot disturb each other's noise."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, dtype=torch.float32, generator=generator, device="cpu")


def euler(velocity: Callable[[torch.Tensor, float, int], torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
          callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Flow-matching Euler: x_next = x + (sigma_next - sigma) * v. Identical to ComfyUI's
    sample_euler for a flow model, where d = (x - denoised) / sigma = v."""
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        v = velocity(x, sigma, i)
        x = x + (sigma_next - sigma) * v
        if callback is not None:
            callback(i + 1, total)
    return x


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


def latent_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Rope positions of the image tokens: (0, row, column) per 2x2 patch."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)
