"""The one catalogue of user-facing inputs: defaults, bounds and descriptions.

The HTTP schemas (`ryla.api.schemas`), the command-line options (`ryla.cli`) and the graph
nodes (`ryla.graph.nodes`) all read their limits from here, so a bound cannot drift between
the API, the CLI and a ComfyUI workflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_SEED = 2**64 - 1  # ComfyUI's seed range; torch.manual_seed accepts all of it.
MAX_RESOLUTION = 16384  # ComfyUI's nodes.py MAX_RESOLUTION: its size inputs' upper bound


@dataclass(frozen=True)
class Param:
    """One input: its type, default, bounds and the sentence users read in --help and /docs."""

    name: str
    type: type
    default: Any
    description: str
    min: float | None = None
    max: float | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] | None = None
    # ComfyUI's own default and bounds for this input on its nodes (nodes.py), where they
    # differ from ryla's typed-endpoint ones: a ComfyUI workflow is validated as ComfyUI
    # would; the server's protection limits (ryla.graph.executor.Limits) apply apart.
    comfyui: dict[str, Any] | None = None

    def check(self, value: Any) -> str | None:
        """Return why `value` is not acceptable, or None. Used by the CLI; pydantic and the
        graph validator apply the same bounds through their own error shapes."""
        if self.choices is not None and value not in self.choices:
            return f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}"
        if self.type is str:
            if self.max is not None and len(value) > self.max:
                return f"{self.name} must be at most {self.max:g} characters, got {len(value)}"
            if self.min is not None and len(value) < self.min:
                return f"{self.name} must not be empty"
            return None
        if self.min is not None and value < self.min:
            return f"{self.name} must be >= {self.min:g}, got {value}"
        if self.max is not None and value > self.max:
            return f"{self.name} must be <= {self.max:g}, got {value}"
        if self.multiple_of and value % self.multiple_of:
            return f"{self.name} must be a multiple of {self.multiple_of}, got {value}"
        return None


PROMPT = Param("prompt", str, None, "What to draw. Plain language; FLUX follows long, specific prompts well.",
               min=1, max=4000, comfyui=dict(default="", min=None, max=None))
NEGATIVE_PROMPT = Param("negative_prompt", str, "",
                        "What to avoid. Only used when cfg > 1 (true classifier-free guidance); "
                        "ignored at cfg 1.0 exactly as ComfyUI does.", max=4000)
WIDTH = Param("width", int, 1024, "Image width in pixels (multiple of 16).", min=64, max=2048, multiple_of=16,
              comfyui=dict(default=1024, min=16, max=MAX_RESOLUTION, multiple_of=None, step=16))
HEIGHT = Param("height", int, 1024, "Image height in pixels (multiple of 16).", min=64, max=2048, multiple_of=16,
               comfyui=dict(default=1024, min=16, max=MAX_RESOLUTION, multiple_of=None, step=16))
STEPS = Param("steps", int, 28, "Sampling steps. 20-30 is typical for FLUX.1-dev.", min=1, max=100,
              comfyui=dict(default=20, max=10000))
GUIDANCE = Param("guidance", float, 3.5, "FLUX distilled guidance (FluxGuidance). 3.5 is the model's default.",
                 min=0.0, max=100.0)
CFG = Param("cfg", float, 1.0, "True classifier-free guidance scale. 1.0 disables it (one model call per step); "
            "above 1.0 the negative prompt is used and each step costs two calls.", min=0.0, max=100.0,
            comfyui=dict(default=8.0, step=0.1))
SEED = Param("seed", int, None, "Random seed; the same seed and inputs give the same image. Random when omitted.",
             min=0, max=MAX_SEED)
BATCH_SIZE = Param("batch_size", int, 1, "Images generated together from consecutive noise of one seed.",
                   min=1, max=4, comfyui=dict(max=4096))
NUM_IMAGES = Param("num_images", int, 1, "Number of images to return (one batch).", min=1, max=4)
DENOISE = Param("denoise", float, 1.0, "Fraction of the schedule to run; 1.0 starts from pure noise.",
                min=0.0, max=1.0)
SAMPLER = Param("sampler_name", str, "euler", "Sampler, as ComfyUI computes it. FLUX.1-dev is trained for "
                "flow-matching Euler; heun and dpm_2 evaluate the model twice a step; the ancestral, SDE "
                "and lcm samplers add seeded noise on the way.",
                choices=("euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "dpmpp_sde",
                         "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun",
                         "dpmpp_3m_sde", "lcm", "ipndm", "deis", "res_multistep", "res_multistep_ancestral", "ddim"))
SCHEDULER = Param("scheduler", str, "simple", "Noise schedule, as ComfyUI computes it.",
                  choices=("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                           "linear_quadratic", "kl_optimal"))
IMAGE = Param("image", str, None, "Start from this image (base64 or a data: URL of a JPEG, PNG or WebP): "
              "image-to-image. The result has the image's size, cut to whole 8-pixel blocks "
              "(64 to 2048 pixels a side); width and height then come from the image.")
STRENGTH = Param("strength", float, 0.8, "With an image: how much of it is redrawn, the fraction of the "
                 "schedule that runs (ComfyUI's denoise). 1.0 keeps nothing but its size (or, with a "
                 "mask, nothing inside the mask); 0 returns it through the VAE.", min=0.0, max=1.0)
MASK = Param("mask", str, None, "With an image: redraw only where this mask is white (a black-and-white "
             "image, any size: it is scaled to the image; grey values count as white above 50 %). "
             "Inpainting as ComfyUI's SetLatentNoiseMask does it; with FLUX.1 Fill dev "
             "(flux1-fill-dev.safetensors) in the store, on Fill, as ComfyUI's Fill example does it "
             "(InpaintModelConditioning, guidance 30 unless given; not with a reference face).")
OUTPUT_FORMAT = Param("output_format", str, "jpeg", "Encoding of the returned images.",
                      choices=("jpeg", "png", "webp"))
QUALITY = Param("quality", int, 90, "JPEG/WebP quality (ignored for PNG).", min=1, max=100)
MAX_SHIFT = Param("max_shift", float, 1.15, "ModelSamplingFlux shift at 4096 image tokens (1024x1024).",
                  min=0.0, max=100.0)
BASE_SHIFT = Param("base_shift", float, 0.5, "ModelSamplingFlux shift at 256 image tokens (256x256).",
                   min=0.0, max=100.0)
LORA_STRENGTH = Param("lora_strength", float, 1.0, "How strongly the LoRA is applied; 0 gives the base model.",
                      min=-4.0, max=4.0, comfyui=dict(min=-100.0, max=100.0))
FILENAME_PREFIX = Param("filename_prefix", str, "ryla", "Prefix for saved image names.", max=200)
LORA_ID = Param("lora_id", str, None, "Id of a LoRA in the store (see GET /loras).", min=1, max=128)
TRIGGER_WORD = Param("trigger_word", str, None, "Word that activates the LoRA; put into the prompt once. "
                     "Defaults to the one stored with the LoRA.", max=100)
INSTANTID_STRENGTH = Param("instantid_strength", float, 0.8, "How strongly the reference face's identity is "
                           "applied (scales the identity tokens); 0 turns identity off.", min=0.0, max=3.0)
CONTROLNET_STRENGTH = Param("controlnet_strength", float, 0.8, "Strength of the identity ControlNet (InfuseNet) "
                            "residuals; 0 turns identity off.", min=0.0, max=3.0)
FACE_PROVIDER = Param("face_provider", str, "cpu", "Where face analysis runs (onnxruntime provider).",
                      choices=("cpu", "gpu"))
