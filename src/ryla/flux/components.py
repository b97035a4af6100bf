"""The values that flow between graph nodes: loaded models and conditioning.

They are immutable handles. A node that changes a model (a shift, a LoRA, an identity
adapter) returns a new handle that shares the loaded weights, as ComfyUI clones its
ModelPatcher; nothing is written into a shared module, so two requests with different
patches cannot see each other's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class LoraPatch:
    """One LoRA applied to a model or text encoder. Compared by file, version and strength;
    the converted weights ride along."""

    name: str
    path: str
    version: int  # the file's mtime_ns: a replaced file is a different patch
    strength: float
    weights: Any = field(default=None, compare=False, hash=False, repr=False)


DEV_SHIFT = 1.15
SCHNELL_SHIFT = 1.0


@dataclass(frozen=True)
class FluxModel:
    """MODEL: the FLUX transformer plus per-run patches."""

    name: str
    transformer: Any  # diffusers FluxTransformer2DModel
    shift: float | None = None  # ModelSamplingFlux shift; None means the model's default (1.15)
    loras: tuple[LoraPatch, ...] = ()
    identity: Any = None  # set by ApplyInstantID (ryla.identity)
    # DifferentialDiffusion's strength: masks repaint by their grey levels over the steps
    differential_diffusion: float | None = None

    @property
    def sampling_shift(self) -> float:
        """ModelSamplingFlux's shift, else the model's own default, as comfy/supported_models.py
        sets it: 1.15 for FLUX.1-dev (Flux), 1.0 for FLUX.1-schnell (FluxSchnell: the model
        without a guidance embedding)."""
        if self.shift is not None:
            return self.shift
        return SCHNELL_SHIFT if not getattr(self.transformer.config, "guidance_embeds", True) else DEV_SHIFT


@dataclass(frozen=True)
class TextEncoder:
    """CLIP: CLIP-L (pooled vector) and T5-XXL (token sequence), with their tokenizers."""

    name: str
    clip: Any
    clip_tokenizer: Any
    t5: Any
    t5_tokenizer: Any
    loras: tuple[LoraPatch, ...] = ()


@dataclass(frozen=True)
class Vae:
    name: str
    vae: Any  # diffusers AutoencoderKL


@dataclass(frozen=True)
class ControlNet:
    """CONTROL_NET from a single file: diffusers' FluxControlNetModel, the file's layout
    (ryla.models.formats: "instantx" takes a VAE-encoded control image, "xlabs" the pixels),
    and SetUnionControlNetType's mode for a Union ControlNet (None: no mode, ComfyUI's auto)."""

    name: str
    model: Any
    layout: str
    union_mode: int | None = None

    @property
    def modes(self) -> int:
        return int(getattr(self.model.config, "num_mode", None) or 0)


@dataclass(frozen=True, eq=False)
class ControlHint:
    """One ControlNetApplyAdvanced on a conditioning entry: the ControlNet, its control image
    (IMAGE [B, H, W, C], 0..1), strength, the schedule's [start, end] fraction and the VAE that
    encodes the image for latent-input ControlNets. Conditioning keeps a tuple of them, in
    order; their residuals add up, as comfy/controlnet.py's previous_controlnet chain does."""

    controlnet: ControlNet
    image: torch.Tensor
    strength: float
    start: float
    end: float
    vae: Vae | None


@dataclass(frozen=True)
class Cond:
    """One CONDITIONING entry: T5 tokens, the CLIP pooled vector, and per-entry options
    (FluxGuidance's value, ControlNet hints, reference latents, ...)."""

    t5: torch.Tensor  # [1, seq, d_t5]
    pooled: torch.Tensor  # [1, d_clip]
    guidance: float | None = None
    extras: tuple[tuple[str, Any], ...] = field(default=())

    def with_options(self, **options) -> Cond:
        extras = dict(self.extras)
        guidance = options.pop("guidance", self.guidance)
        extras.update(options)
        return Cond(self.t5, self.pooled, guidance, tuple(sorted(extras.items())))

    def option(self, name: str, default=None):
        return dict(self.extras).get(name, default)


Conditioning = tuple[Cond, ...]
