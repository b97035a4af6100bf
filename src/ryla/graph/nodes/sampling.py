"""Sampling nodes: KSampler, ModelSamplingFlux, and the SamplerCustomAdvanced path
(RandomNoise, KSamplerSelect, BasicScheduler, BasicGuider) of ComfyUI's full-precision
FLUX example."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ryla import catalogue
from ryla.flux import sampling
from ryla.flux.components import Conditioning, FluxModel
from ryla.graph.executor import NodeUserError
from ryla.graph.registry import Node, Output, from_param, link, node
from ryla.graph.nodes.latent import LATENT_CHANNELS


def sampling_cost(steps=0, denoise=1.0, **_) -> dict[str, float]:
    """A sampler's steps, and the schedule it builds: steps / denoise below denoise 1, as
    KSampler.set_steps does (a tiny denoise asks for a huge schedule)."""
    schedule = steps / denoise if denoise is not None and 0 < denoise < 0.9999 else steps
    return {"steps": steps, "schedule": schedule}


def model_sampling(model: FluxModel) -> sampling.FluxModelSampling:
    return sampling.FluxModelSampling(model.shift if model.shift is not None else sampling.DEFAULT_SHIFT)


def flux_latent(latent: dict) -> torch.Tensor:
    """comfy.sample.fix_empty_latent_channels: an all-zero latent of another channel count
    (EmptyLatentImage's 4) becomes FLUX's 16; anything else must already have 16."""
    samples = latent["samples"]
    if samples.shape[1] != LATENT_CHANNELS:
        if torch.count_nonzero(samples) == 0:
            return torch.zeros(samples.shape[0], LATENT_CHANNELS, *samples.shape[2:])
        raise NodeUserError("invalid_latent", f"latent has {samples.shape[1]} channels; FLUX needs 16")
    return samples


def run_sampler(context, model: FluxModel, positive: Conditioning, negative: Conditioning | None,
                latent: torch.Tensor, noise: torch.Tensor | None, sigmas: torch.Tensor, cfg: float,
                sampler: str = "euler") -> torch.Tensor:
    return context.engine.sample(model, positive, negative, latent, noise, sigmas, cfg,
                                 callback=context.progress, cancel=context.cancel, sampler=sampler)


@node
class KSampler(Node):
    class_type = "KSampler"
    category = "sampling"
    description = "Denoise a latent with the FLUX model: ComfyUI's KSampler (seeded CPU noise, its samplers)."
    inputs = (
        link("model", "MODEL"),
        from_param(catalogue.SEED, name="seed", default=0, control_after_generate=True),
        from_param(catalogue.STEPS),
        from_param(catalogue.CFG, step=0.1),
        from_param(catalogue.SAMPLER),
        from_param(catalogue.SCHEDULER),
        link("positive", "CONDITIONING"),
        link("negative", "CONDITIONING"),
        link("latent_image", "LATENT"),
        from_param(catalogue.DENOISE),
    )
    outputs = (Output("LATENT", "LATENT"),)

    def cost(self, **values):
        return sampling_cost(**values)

    def run(self, context, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
            denoise):
        latent = flux_latent(latent_image)
        noise = sampling.prepare_noise(tuple(latent.shape), seed)
        sigmas = sampling.ksampler_sigmas(model_sampling(model), scheduler, steps, denoise)
        return ({"samples": run_sampler(context, model, positive, negative, latent, noise, sigmas, cfg,
                                        sampler=sampler_name)},)


@node
class ModelSamplingFlux(Node):
    class_type = "ModelSamplingFlux"
    category = "advanced/model"
    description = "Set the schedule shift for an image size (what diffusers does for every size)."
    inputs = (
        link("model", "MODEL"),
        from_param(catalogue.MAX_SHIFT),
        from_param(catalogue.BASE_SHIFT),
        from_param(catalogue.WIDTH),
        from_param(catalogue.HEIGHT),
    )
    outputs = (Output("MODEL", "MODEL"),)

    def run(self, context, model, max_shift, base_shift, width, height):
        shift = sampling.resolution_shift(width, height, base_shift=base_shift, max_shift=max_shift)
        return (dataclasses.replace(model, shift=shift),)


@dataclass(frozen=True)
class Noise:
    seed: int

    def generate(self, latent: torch.Tensor) -> torch.Tensor:
        return sampling.prepare_noise(tuple(latent.shape), self.seed)


@dataclass(frozen=True)
class Guider:
    model: FluxModel
    positive: Conditioning
    negative: Conditioning | None = None
    cfg: float = 1.0


@node
class RandomNoise(Node):
    class_type = "RandomNoise"
    category = "sampling/custom_sampling/noise"
    inputs = (from_param(catalogue.SEED, name="noise_seed", default=0, control_after_generate=True),)
    outputs = (Output("NOISE", "NOISE"),)

    def run(self, context, noise_seed):
        return (Noise(noise_seed),)


@node
class KSamplerSelect(Node):
    class_type = "KSamplerSelect"
    category = "sampling/custom_sampling/samplers"
    inputs = (from_param(catalogue.SAMPLER),)
    outputs = (Output("SAMPLER", "SAMPLER"),)

    def run(self, context, sampler_name):
        return (sampler_name,)


@node
class BasicScheduler(Node):
    class_type = "BasicScheduler"
    category = "sampling/custom_sampling/schedulers"
    inputs = (link("model", "MODEL"), from_param(catalogue.SCHEDULER), from_param(catalogue.STEPS),
              from_param(catalogue.DENOISE))
    outputs = (Output("SIGMAS", "SIGMAS"),)

    def cost(self, **values):
        return sampling_cost(**values)

    def run(self, context, model, scheduler, steps, denoise):
        return (sampling.ksampler_sigmas(model_sampling(model), scheduler, steps, denoise),)


@node
class BasicGuider(Node):
    class_type = "BasicGuider"
    category = "sampling/custom_sampling/guiders"
    inputs = (link("model", "MODEL"), link("conditioning", "CONDITIONING"))
    outputs = (Output("GUIDER", "GUIDER"),)

    def run(self, context, model, conditioning):
        return (Guider(model, conditioning),)


@node
class SamplerCustomAdvanced(Node):
    class_type = "SamplerCustomAdvanced"
    category = "sampling/custom_sampling"
    inputs = (link("noise", "NOISE"), link("guider", "GUIDER"), link("sampler", "SAMPLER"),
              link("sigmas", "SIGMAS"), link("latent_image", "LATENT"))
    outputs = (Output("LATENT", "output"), Output("LATENT", "denoised_output"))

    def run(self, context, noise, guider, sampler, sigmas, latent_image):
        latent = flux_latent(latent_image)
        out = run_sampler(context, guider.model, guider.positive, guider.negative, latent,
                          noise.generate(latent), sigmas, guider.cfg, sampler=sampler)
        # After the last step (sigma 0) the output is its own denoised prediction.
        return ({"samples": out}, {"samples": out})


NODES = (KSampler, ModelSamplingFlux, RandomNoise, KSamplerSelect, BasicScheduler, BasicGuider,
         SamplerCustomAdvanced)
