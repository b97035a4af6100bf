"""Sampling nodes: KSampler and KSamplerAdvanced (nodes.py), ModelSamplingFlux, and the custom
sampling family of comfy_extras/nodes_custom_sampler.py (SamplerCustom, SamplerCustomAdvanced,
noises, guiders, sampler selectors, schedulers and sigma tools), with ComfyUI's inputs,
defaults and behaviour."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ryla import catalogue
from ryla.flux import samplers, sampling
from ryla.flux.components import Conditioning, FluxModel
from ryla.graph.executor import NodeUserError
from ryla.graph.registry import InputSpec, Node, Output, from_param, link, node
from ryla.graph.nodes.latent import LATENT_CHANNELS, latent_pixels

MAX_STEPS = 10000  # ComfyUI's bound on steps and step indices


def sampling_cost(steps=0, denoise=1.0, **_) -> dict[str, float]:
    """A sampler's steps, and the schedule it builds: steps / denoise below denoise 1, as
    KSampler.set_steps does (a tiny denoise asks for a huge schedule)."""
    schedule = steps / denoise if denoise is not None and 0 < denoise < 0.9999 else steps
    return {"steps": steps, "schedule": schedule}


def model_sampling(model: FluxModel) -> sampling.FluxModelSampling:
    return sampling.FluxModelSampling(model.sampling_shift)


def flux_latent(latent: dict) -> torch.Tensor:
    """comfy.sample.fix_empty_latent_channels: an all-zero latent of another channel count
    (EmptyLatentImage's 4) becomes FLUX's 16; anything else must already have 16."""
    samples = latent["samples"]
    if samples.shape[1] != LATENT_CHANNELS:
        if torch.count_nonzero(samples) == 0:
            return torch.zeros(samples.shape[0], LATENT_CHANNELS, *samples.shape[2:])
        raise NodeUserError("invalid_latent", f"latent has {samples.shape[1]} channels; FLUX needs 16")
    return samples


@dataclass(frozen=True)
class Sampler:
    """SAMPLER: one of ComfyUI's samplers by name, with a sampler node's settings."""

    name: str
    options: tuple[tuple[str, object], ...] = ()


def run_sampler(context, model: FluxModel, positive: Conditioning, negative: Conditioning | None, latent: dict,
                noise: torch.Tensor | None, sigmas: torch.Tensor, cfg: float, sampler: Sampler, seed: int,
                denoised_out: list | None = None, dual: dict | None = None) -> torch.Tensor:
    """comfy.sample.sample / sample_custom: the latent's noise_mask inpaints, and a model
    patched by DifferentialDiffusion reads the mask's grey levels."""
    samples = flux_latent(latent)
    context.check_pixels(latent_pixels(samples))
    mask = latent.get("noise_mask")
    mask_function = None
    if mask is not None and model.differential_diffusion is not None and len(sigmas) > 1:
        mask_function = samplers.differential_diffusion(sigmas, float(model_sampling(model).sigma_min),
                                                        model.differential_diffusion)
    return context.engine.sample(model, positive, negative, samples, noise, sigmas, cfg,
                                 callback=context.progress, cancel=context.cancel, sampler=sampler.name,
                                 denoise_mask=mask, seed=seed, mask_function=mask_function,
                                 sampler_options=dict(sampler.options), denoised_out=denoised_out,
                                 **(dual or {}))


def with_samples(latent: dict, samples: torch.Tensor) -> dict:
    """A LATENT like the input (its noise_mask and batch_index kept, as ComfyUI's latent.copy())
    with new samples."""
    return {**latent, "samples": samples}


def seeded_noise(latent: dict, seed: int) -> torch.Tensor:
    samples = flux_latent(latent)
    return sampling.prepare_noise(tuple(samples.shape), seed, latent.get("batch_index"))


SEED = from_param(catalogue.SEED, name="seed", default=0, control_after_generate=True)
NOISE_SEED = from_param(catalogue.SEED, name="noise_seed", default=0, control_after_generate=True)


@node
class KSampler(Node):
    class_type = "KSampler"
    category = "sampling"
    description = "Denoise a latent with the FLUX model: ComfyUI's KSampler (seeded CPU noise, its samplers)."
    inputs = (
        link("model", "MODEL"),
        SEED,
        from_param(catalogue.STEPS),
        from_param(catalogue.CFG),
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
        sigmas = sampling.ksampler_sigmas(model_sampling(model), scheduler, steps, denoise)
        out = run_sampler(context, model, positive, negative, latent_image, seeded_noise(latent_image, seed), sigmas,
                          cfg, Sampler(sampler_name), seed)
        return (with_samples(latent_image, out),)


@node
class KSamplerAdvanced(Node):
    class_type = "KSamplerAdvanced"
    category = "sampling"
    description = ("KSampler over a range of its schedule's steps: add_noise off continues a latent that "
                   "still holds noise; return_with_leftover_noise hands one on to another sampler.")
    inputs = (
        link("model", "MODEL"),
        InputSpec("add_noise", "COMBO", default="enable", choices=("enable", "disable")),
        NOISE_SEED,
        from_param(catalogue.STEPS),
        from_param(catalogue.CFG),
        from_param(catalogue.SAMPLER),
        from_param(catalogue.SCHEDULER),
        link("positive", "CONDITIONING"),
        link("negative", "CONDITIONING"),
        link("latent_image", "LATENT"),
        InputSpec("start_at_step", "INT", default=0, min=0, max=MAX_STEPS),
        InputSpec("end_at_step", "INT", default=MAX_STEPS, min=0, max=MAX_STEPS),
        InputSpec("return_with_leftover_noise", "COMBO", default="disable", choices=("disable", "enable")),
    )
    outputs = (Output("LATENT", "LATENT"),)

    def cost(self, steps=0, start_at_step=0, end_at_step=MAX_STEPS, **_):
        run = max(0, min(steps, end_at_step) - (start_at_step or 0)) if steps else 0
        return {"steps": run, "schedule": steps}

    def run(self, context, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
            latent_image, start_at_step, end_at_step, return_with_leftover_noise):
        # comfy/samplers.py KSampler.sample: the schedule cut at end_at_step (onto 0 unless the
        # leftover noise is wanted), then from start_at_step.
        sigmas = sampling.calculate_sigmas(model_sampling(model), scheduler, steps).clone()
        if end_at_step < len(sigmas) - 1:
            sigmas = sigmas[:end_at_step + 1]
            if return_with_leftover_noise == "disable":
                sigmas[-1] = 0
        if start_at_step >= len(sigmas) - 1:
            return (latent_image,)  # nothing left to run: the latent as it came
        sigmas = sigmas[start_at_step:]
        noise = None if add_noise == "disable" else seeded_noise(latent_image, noise_seed)
        out = run_sampler(context, model, positive, negative, latent_image, noise, sigmas, cfg,
                          Sampler(sampler_name), noise_seed)
        return (with_samples(latent_image, out),)


@node
class ModelSamplingFlux(Node):
    class_type = "ModelSamplingFlux"
    category = "advanced/model"
    description = "Set the schedule shift for an image size (what diffusers does for every size)."
    inputs = (
        link("model", "MODEL"),
        from_param(catalogue.MAX_SHIFT),
        from_param(catalogue.BASE_SHIFT),
        from_param(catalogue.WIDTH, step=8),
        from_param(catalogue.HEIGHT, step=8),
    )
    outputs = (Output("MODEL", "MODEL"),)

    def run(self, context, model, max_shift, base_shift, width, height):
        shift = sampling.resolution_shift(width, height, base_shift=base_shift, max_shift=max_shift)
        return (dataclasses.replace(model, shift=shift),)


@node
class DifferentialDiffusion(Node):
    class_type = "DifferentialDiffusion"
    category = "_for_testing"
    description = "Inpaint by the mask's grey levels: lighter areas change over more of the steps."
    inputs = (link("model", "MODEL"),
              InputSpec("strength", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01, optional=True))
    outputs = (Output("MODEL", "MODEL"),)

    def run(self, context, model, strength=1.0):
        return (dataclasses.replace(model, differential_diffusion=1.0 if strength is None else strength),)


# --------------------------------------------------------------------------- custom sampling


@dataclass(frozen=True)
class Noise:
    """NOISE: RandomNoise's seeded noise, or DisableNoise's zeros (seed 0)."""

    seed: int
    disabled: bool = False

    def generate(self, latent: dict) -> torch.Tensor | None:
        return None if self.disabled else seeded_noise(latent, self.seed)


@dataclass(frozen=True)
class Guider:
    """GUIDER: the model with its conditionings and guidance; `middle` makes it DualCFGGuider's
    (cond1 = positive, cond2 = middle, cfg = cfg_conds, cfg2 = cfg_cond2_negative)."""

    model: FluxModel
    positive: Conditioning
    negative: Conditioning | None = None
    cfg: float = 1.0
    middle: Conditioning | None = None
    cfg2: float = 1.0
    nested: bool = False

    def dual(self) -> dict | None:
        return None if self.middle is None else {"middle": self.middle, "cfg2": self.cfg2, "nested": self.nested}


@node
class RandomNoise(Node):
    class_type = "RandomNoise"
    category = "sampling/custom_sampling/noise"
    inputs = (NOISE_SEED,)
    outputs = (Output("NOISE", "NOISE"),)

    def run(self, context, noise_seed):
        return (Noise(noise_seed),)


@node
class DisableNoise(Node):
    class_type = "DisableNoise"
    category = "sampling/custom_sampling/noise"
    description = "No noise: continue a latent that already holds some."
    outputs = (Output("NOISE", "NOISE"),)

    def run(self, context):
        return (Noise(0, disabled=True),)


@node
class KSamplerSelect(Node):
    class_type = "KSamplerSelect"
    category = "sampling/custom_sampling/samplers"
    inputs = (from_param(catalogue.SAMPLER),)
    outputs = (Output("SAMPLER", "SAMPLER"),)

    def run(self, context, sampler_name):
        return (Sampler(sampler_name),)


ETA = InputSpec("eta", "FLOAT", default=1.0, min=0.0, max=100.0, step=0.01)
S_NOISE = InputSpec("s_noise", "FLOAT", default=1.0, min=0.0, max=100.0, step=0.01)


@node
class SamplerEulerAncestral(Node):
    class_type = "SamplerEulerAncestral"
    category = "sampling/custom_sampling/samplers"
    inputs = (ETA, S_NOISE)
    outputs = (Output("SAMPLER", "SAMPLER"),)

    def run(self, context, eta, s_noise):
        return (Sampler("euler_ancestral", (("eta", eta), ("s_noise", s_noise))),)


@node
class SamplerDPMPP_2M_SDE(Node):
    class_type = "SamplerDPMPP_2M_SDE"
    category = "sampling/custom_sampling/samplers"
    inputs = (InputSpec("solver_type", "COMBO", default="midpoint", choices=("midpoint", "heun")), ETA, S_NOISE,
              InputSpec("noise_device", "COMBO", default="gpu", choices=("gpu", "cpu")))
    outputs = (Output("SAMPLER", "SAMPLER"),)

    def run(self, context, solver_type, eta, s_noise, noise_device):
        return (Sampler("dpmpp_2m_sde", (("eta", eta), ("s_noise", s_noise), ("solver_type", solver_type),
                                         ("cpu_tree", noise_device == "cpu"))),)


STEPS_CUSTOM = from_param(catalogue.STEPS)


@node
class BasicScheduler(Node):
    class_type = "BasicScheduler"
    category = "sampling/custom_sampling/schedulers"
    inputs = (link("model", "MODEL"), from_param(catalogue.SCHEDULER), STEPS_CUSTOM, from_param(catalogue.DENOISE))
    outputs = (Output("SIGMAS", "SIGMAS"),)

    def cost(self, **values):
        return sampling_cost(**values)

    def run(self, context, model, scheduler, steps, denoise):
        return (sampling.ksampler_sigmas(model_sampling(model), scheduler, steps, denoise),)


@node
class KarrasScheduler(Node):
    class_type = "KarrasScheduler"
    category = "sampling/custom_sampling/schedulers"
    inputs = (STEPS_CUSTOM,
              InputSpec("sigma_max", "FLOAT", default=14.614642, min=0.0, max=5000.0, step=0.01),
              InputSpec("sigma_min", "FLOAT", default=0.0291675, min=0.0, max=5000.0, step=0.01),
              InputSpec("rho", "FLOAT", default=7.0, min=0.0, max=100.0, step=0.01))
    outputs = (Output("SIGMAS", "SIGMAS"),)

    def cost(self, steps=0, **_):
        return {"schedule": steps}

    def run(self, context, steps, sigma_max, sigma_min, rho):
        return (sampling.karras_sigmas(steps, sigma_min, sigma_max, rho),)


@node
class BetaSamplingScheduler(Node):
    class_type = "BetaSamplingScheduler"
    category = "sampling/custom_sampling/schedulers"
    inputs = (link("model", "MODEL"), STEPS_CUSTOM,
              InputSpec("alpha", "FLOAT", default=0.6, min=0.0, max=50.0, step=0.01),
              InputSpec("beta", "FLOAT", default=0.6, min=0.0, max=50.0, step=0.01))
    outputs = (Output("SIGMAS", "SIGMAS"),)

    def cost(self, steps=0, **_):
        return {"schedule": steps}

    def run(self, context, model, steps, alpha, beta):
        return (sampling.beta_scheduler(model_sampling(model), steps, alpha=alpha, beta=beta),)


@node
class SplitSigmas(Node):
    class_type = "SplitSigmas"
    category = "sampling/custom_sampling/sigmas"
    inputs = (link("sigmas", "SIGMAS"), InputSpec("step", "INT", default=0, min=0, max=MAX_STEPS))
    outputs = (Output("SIGMAS", "high_sigmas"), Output("SIGMAS", "low_sigmas"))

    def run(self, context, sigmas, step):
        return sigmas[:step + 1], sigmas[step:]


@node
class SplitSigmasDenoise(Node):
    class_type = "SplitSigmasDenoise"
    category = "sampling/custom_sampling/sigmas"
    inputs = (link("sigmas", "SIGMAS"), from_param(catalogue.DENOISE))
    outputs = (Output("SIGMAS", "high_sigmas"), Output("SIGMAS", "low_sigmas"))

    def run(self, context, sigmas, denoise):
        steps = max(sigmas.shape[-1] - 1, 0)
        total = round(steps * denoise)
        # Python's slices, as ComfyUI writes them: denoise 0 gives an empty first half.
        return sigmas[:-total], sigmas[-(total + 1):]


@node
class FlipSigmas(Node):
    class_type = "FlipSigmas"
    category = "sampling/custom_sampling/sigmas"
    inputs = (link("sigmas", "SIGMAS"),)
    outputs = (Output("SIGMAS", "SIGMAS"),)

    def run(self, context, sigmas):
        if len(sigmas) == 0:
            return (sigmas,)
        sigmas = sigmas.flip(0)
        if sigmas[0] == 0:
            sigmas[0] = 0.0001
        return (sigmas,)


@node
class BasicGuider(Node):
    class_type = "BasicGuider"
    category = "sampling/custom_sampling/guiders"
    inputs = (link("model", "MODEL"), link("conditioning", "CONDITIONING"))
    outputs = (Output("GUIDER", "GUIDER"),)

    def run(self, context, model, conditioning):
        return (Guider(model, conditioning),)


@node
class CFGGuider(Node):
    class_type = "CFGGuider"
    category = "sampling/custom_sampling/guiders"
    inputs = (link("model", "MODEL"), link("positive", "CONDITIONING"), link("negative", "CONDITIONING"),
              from_param(catalogue.CFG))
    outputs = (Output("GUIDER", "GUIDER"),)

    def run(self, context, model, positive, negative, cfg):
        return (Guider(model, positive, negative, cfg),)


@node
class DualCFGGuider(Node):
    class_type = "DualCFGGuider"
    category = "sampling/custom_sampling/guiders"
    description = ("Guidance from two conditionings and a negative: cfg_conds between cond1 and cond2, "
                   "cfg_cond2_negative between cond2 and the negative ('nested': the first inside the second).")
    inputs = (link("model", "MODEL"), link("cond1", "CONDITIONING"), link("cond2", "CONDITIONING"),
              link("negative", "CONDITIONING"), from_param(catalogue.CFG, name="cfg_conds"),
              from_param(catalogue.CFG, name="cfg_cond2_negative"),
              InputSpec("style", "COMBO", default="regular", choices=("regular", "nested")))
    outputs = (Output("GUIDER", "GUIDER"),)

    def run(self, context, model, cond1, cond2, negative, cfg_conds, cfg_cond2_negative, style):
        return (Guider(model, cond1, negative, cfg_conds, middle=cond2, cfg2=cfg_cond2_negative,
                       nested=style == "nested"),)


def _custom_sample(context, guider: Guider, noise: Noise, sampler: Sampler, sigmas, latent_image):
    denoised: list = []
    out = run_sampler(context, guider.model, guider.positive, guider.negative, latent_image,
                      noise.generate(latent_image), sigmas, guider.cfg, sampler, noise.seed, denoised_out=denoised,
                      dual=guider.dual())
    result = with_samples(latent_image, out)
    # the last step's denoised prediction (ComfyUI's x0 callback); the output when none ran
    x0 = denoised[0] if denoised and denoised[0] is not None else None
    return result, (with_samples(latent_image, x0) if x0 is not None else result)


@node
class SamplerCustomAdvanced(Node):
    class_type = "SamplerCustomAdvanced"
    category = "sampling/custom_sampling"
    inputs = (link("noise", "NOISE"), link("guider", "GUIDER"), link("sampler", "SAMPLER"),
              link("sigmas", "SIGMAS"), link("latent_image", "LATENT"))
    outputs = (Output("LATENT", "output"), Output("LATENT", "denoised_output"))

    def run(self, context, noise, guider, sampler, sigmas, latent_image):
        return _custom_sample(context, guider, noise, sampler, sigmas, latent_image)


@node
class SamplerCustom(Node):
    class_type = "SamplerCustom"
    category = "sampling/custom_sampling"
    inputs = (link("model", "MODEL"), InputSpec("add_noise", "BOOLEAN", default=True), NOISE_SEED,
              from_param(catalogue.CFG), link("positive", "CONDITIONING"), link("negative", "CONDITIONING"),
              link("sampler", "SAMPLER"), link("sigmas", "SIGMAS"), link("latent_image", "LATENT"))
    outputs = (Output("LATENT", "output"), Output("LATENT", "denoised_output"))

    def run(self, context, model, add_noise, noise_seed, cfg, positive, negative, sampler, sigmas, latent_image):
        noise = Noise(noise_seed, disabled=not add_noise)
        return _custom_sample(context, Guider(model, positive, negative, cfg), noise, sampler, sigmas, latent_image)


NODES = (KSampler, KSamplerAdvanced, ModelSamplingFlux, DifferentialDiffusion, RandomNoise, DisableNoise,
         KSamplerSelect, SamplerEulerAncestral, SamplerDPMPP_2M_SDE, BasicScheduler, KarrasScheduler,
         BetaSamplingScheduler, SplitSigmas, SplitSigmasDenoise, FlipSigmas, BasicGuider, CFGGuider, DualCFGGuider,
         SamplerCustomAdvanced, SamplerCustom)
