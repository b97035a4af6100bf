"""Single-file loaders for FLUX.1-dev components, with configs bundled (no network).

One loader per component reads the real files' layouts (see ryla.models.formats) and builds
the diffusers / transformers module. The modules are built on the meta device and the file's
tensors are assigned into them, so a 12B transformer is never initialised twice in memory.
"""

from __future__ import annotations

import json
import logging
import time
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open

from ryla.flux.lora import E4M3_VALUED_LAYERS
from ryla.models import formats, gguf_files
from ryla.models.tensor_files import METADATA_KEY, ModelFormatError

log = logging.getLogger(__name__)

BUNDLED_CONFIGS = {
    "transformer": "flux1-dev-transformer.json",
    "clip_vision": "siglip-so400m-patch14-384.json",
    "vae": "flux1-vae.json",
    "clip_l": "clip-l-text.json",
    "t5xxl": "t5-xxl-encoder.json",
}
# Tensors some published text-encoder files carry that the encoder does not use.
_IGNORED_TEXT_KEYS = ("text_model.embeddings.position_ids", "text_projection.weight", "logit_scale")


def component_config(component: str, ryla_meta: dict) -> dict:
    """The file's own config (tiny files carry one), else the bundled FLUX.1-dev config."""
    configs = ryla_meta.get("configs", {})
    if component in configs:
        return dict(configs[component])
    text = resources.files("ryla.models").joinpath("configs", BUNDLED_CONFIGS[component]).read_text()
    return json.loads(text)


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _assign(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str,
            dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Load tensors into a meta-initialised module, strictly, cast to dtype on device."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ModelFormatError(
            f"{what}: keys do not match the architecture "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelFormatError(f"{what}: {key} has shape {tuple(tensor.shape)}, "
                                   f"expected {tuple(expected[key].shape)}")
    cast = {k: v.to(device=device, dtype=dtype if v.dtype.is_floating_point else v.dtype)
            for k, v in state_dict.items()}
    module.load_state_dict(cast, strict=True, assign=True)
    # Buffers made at construction (CLIP's position ids) are still on the CPU.
    return module.to(device).eval().requires_grad_(False)


def _empty(factory):
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta; buffers (rope tables, ids) real
        return factory()


def build_transformer(tensors: dict[str, torch.Tensor], ryla_meta: dict, dtype: torch.dtype,
                      device: torch.device, what: str = "transformer"):
    """A FLUX transformer from BFL/ComfyUI keys (the published single files) or from
    diffusers' own (a diffusers folder, or a single file saved from one), its config read
    from the weights over the file's own config (tiny files) or the bundled FLUX.1-dev one."""
    start = time.perf_counter()
    from diffusers import FluxTransformer2DModel  # the first import of diffusers' models: seconds

    imported = time.perf_counter()
    config = component_config("transformer", ryla_meta)
    try:
        tensors = formats.dequantize_scaled_fp8(tensors, dtype)
        if formats.is_diffusers_transformer(tensors):  # diffusers' own names: used as they are
            converted = {k.removeprefix("transformer."): v for k, v in tensors.items()}
            config = formats.transformer_config_from_diffusers_weights(config, converted)
        else:
            config = formats.transformer_config_from_weights(config, tensors)
            converted = formats.flux_transformer_from_bfl(tensors)
    except KeyError as exc:
        other = formats.describe_other_model(tensors)
        if other is not None:
            raise ModelFormatError(f"{what} is not a FLUX transformer: it looks like {other}") from exc
        raise ModelFormatError(f"{what} is not a FLUX transformer: {exc}") from exc
    e4m3_layers = frozenset(key.removesuffix(".weight") for key, tensor in converted.items()
                            if tensor.dtype == torch.float8_e4m3fn and key.endswith(".weight"))
    model = _assign(_empty(lambda: FluxTransformer2DModel.from_config(_public(config))), converted, what, dtype, device)
    if e4m3_layers and comfyui_keeps_fp8_storage(device):
        # Computed in `dtype`, these layers hold fp8 values, as ComfyUI's fp8-stored weights
        # do: a LoRA's sum goes back onto the fp8 grid (ryla.flux.lora).
        setattr(model, E4M3_VALUED_LAYERS, e4m3_layers)
    log.info("built %s in %.2fs (of which importing diffusers' model %.2fs)", what, time.perf_counter() - start,
             imported - start)
    return model


def comfyui_keeps_fp8_storage(device: torch.device) -> bool:
    """Whether ComfyUI would keep an fp8 checkpoint's weights in fp8 on this device (and cast
    each layer up as it computes): where the GPU has fp8 compute, compute capability 8.9 or
    later (comfy/model_management.py unet_dtype with supports_fp8_compute). Elsewhere it
    loads them in a 16- or 32-bit dtype, as ryla does."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def build_controlnet(tensors: dict[str, torch.Tensor], ryla_meta: dict, dtype: torch.dtype, device: torch.device,
                     what: str = "controlnet"):
    """A single-file FLUX ControlNet (InstantX, Shakker-Labs Union or XLabs layout, see
    ryla.models.formats) as diffusers' FluxControlNetModel, its config read from the weights.
    Returns (model, layout)."""
    from diffusers import FluxControlNetModel

    layout = formats.controlnet_layout(tensors)
    if layout is None:
        other = formats.describe_other_model(tensors)
        raise ModelFormatError(f"{what} is not a FLUX ControlNet (InstantX, Union or XLabs layout)"
                               + (f": it looks like {other}" if other else ""))
    try:
        converted = formats.controlnet_from_xlabs(tensors) if layout == formats.CONTROLNET_XLABS else dict(tensors)
        config = formats.controlnet_config_from_weights(component_config("transformer", ryla_meta), converted)
    except KeyError as exc:
        raise ModelFormatError(f"{what}: {exc}") from exc
    width = converted["controlnet_x_embedder.weight"].shape[1]
    if layout == formats.CONTROLNET_INSTANTX and width != config["in_channels"]:
        raise ModelFormatError(f"{what}: its control input is {width // 4} latent channels, a kind (inpainting "
                               "ControlNets with a mask channel) ryla does not run yet")
    model = _assign(_empty(lambda: FluxControlNetModel.from_config(config)), converted, what, dtype, device)
    return model, layout


def build_clip_vision(tensors: dict[str, torch.Tensor], ryla_meta: dict, dtype: torch.dtype,
                      device: torch.device, what: str = "clip_vision"):
    """CLIPVisionLoader: a SigLIP vision tower (Redux's image encoder) as transformers'
    SiglipVisionModel, its size read from the weights."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    tensors = {k: v for k, v in tensors.items() if k != "vision_model.embeddings.position_ids"}
    if "vision_model.embeddings.patch_embedding.weight" not in tensors:
        other = formats.describe_other_model(tensors)
        raise ModelFormatError(f"{what} is not a SigLIP vision model (Redux's image encoder)"
                               + (f": it looks like {other}" if other else ""))
    if "vision_model.embeddings.class_embedding" in tensors:
        raise ModelFormatError(f"{what} is a CLIP vision model; FLUX.1 Redux takes SigLIP "
                               "(sigclip_vision_patch14_384.safetensors)")
    try:
        config = formats.siglip_config_from_weights(component_config("clip_vision", ryla_meta), tensors)
    except (KeyError, ValueError) as exc:
        raise ModelFormatError(f"{what}: {exc}") from exc
    model = _empty(lambda: SiglipVisionModel(SiglipVisionConfig(**_public(config))))
    if not any(k.startswith("vision_model.") for k in model.state_dict()):
        # Published files say `vision_model.encoder...`; transformers 5 names it `encoder...`.
        tensors = {k.removeprefix("vision_model."): v for k, v in tensors.items()}
    if not config.get("vision_use_head"):
        tensors = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    return _assign(model, tensors, what, dtype, device)


def build_redux(tensors: dict[str, torch.Tensor], ryla_meta: dict, dtype: torch.dtype, device: torch.device,
                what: str = "style_model"):
    """StyleModelLoader: FLUX.1 Redux's projection (SigLIP tokens -> T5-width tokens), as
    diffusers' ReduxImageEncoder, its widths read from the weights."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    if not formats.is_redux(tensors):
        raise ModelFormatError(f"{what} is not FLUX.1 Redux (flux1-redux-dev.safetensors); other style models "
                               "(SD 1.x T2I style adapters) do not fit FLUX")
    redux_dim = int(tensors["redux_up.weight"].shape[1])
    txt_in_features = int(tensors["redux_down.weight"].shape[0])
    model = _empty(lambda: ReduxImageEncoder(redux_dim=redux_dim, txt_in_features=txt_in_features))
    return _assign(model, tensors, what, dtype, device)


def build_vae(tensors: dict[str, torch.Tensor], ryla_meta: dict, dtype: torch.dtype, device: torch.device,
              what: str = "vae"):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = component_config("vae", ryla_meta)
    converted = convert_ldm_vae_checkpoint(tensors, config)
    model = _empty(lambda: AutoencoderKL.from_config(_public(config)))
    return _assign(model, converted, what, dtype, device)


def build_clip(tensors: dict[str, torch.Tensor], ryla_meta: dict, dtype: torch.dtype, device: torch.device,
               what: str = "clip_l"):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**_public(component_config("clip_l", ryla_meta)))
    tensors = {k: v for k, v in formats.dequantize_scaled_fp8(tensors, dtype).items() if k not in _IGNORED_TEXT_KEYS}
    model = _empty(lambda: CLIPTextModel(config))
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        # Published files say `text_model.encoder...`; transformers 5 names it `encoder...`.
        tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    return _assign(model, tensors, what, dtype, device)


def build_t5(tensors: dict[str, torch.Tensor], ryla_meta: dict, dtype: torch.dtype, device: torch.device,
             what: str = "t5xxl"):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**_public(component_config("t5xxl", ryla_meta)))
    model = _empty(lambda: T5EncoderModel(config))
    tensors = dict(formats.dequantize_scaled_fp8(tensors, dtype))
    expected = model.state_dict()
    if "token_embd.weight" in tensors or any(k.startswith("enc.") for k in tensors):
        # a llama.cpp GGUF (city96's t5-v1_1-xxl-encoder-*.gguf): its own tensor names
        tensors = gguf_files.t5_from_llama_cpp_names(tensors, sorted(expected))
    # The encoder's token embedding is tied to `shared`; files store only one of the two.
    if "encoder.embed_tokens.weight" in expected and "encoder.embed_tokens.weight" not in tensors:
        if "shared.weight" in tensors:
            tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
        tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
    return _assign(model, tensors, what, dtype, device)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"tokenizer files missing in {folder}; run `ryla models download --preset flux-dev`")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def detect_text_encoder(path: Path) -> str:
    """'clip_l' or 't5xxl' from the file's keys, as ComfyUI's DualCLIPLoader tells them apart
    (a GGUF text encoder from its general.architecture, as ComfyUI-GGUF's gguf_clip_loader)."""
    if gguf_files.is_gguf(path):
        arch = gguf_files.architecture(path)
        if arch in gguf_files.T5_ARCHITECTURES:
            return "t5xxl"
        raise ModelFormatError(f"{path.name} is not a T5 text encoder: it is {gguf_files.describe_architecture(arch)}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:
        raise ModelFormatError(f"{path.name} is not a readable safetensors file: {exc}") from exc
    if any(k.startswith("text_model.") for k in keys):
        return "clip_l"
    if any(k.startswith("encoder.block.") for k in keys):
        return "t5xxl"
    raise ModelFormatError(f"{path.name} is neither a CLIP-L nor a T5 text encoder")


def architecture_shapes(store) -> tuple[dict, dict]:
    """Linear shapes of the store's FLUX transformer and CLIP-L, built on the meta device
    from the configs their files carry (or the bundled FLUX.1-dev ones)."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ryla.flux.lora import linear_shapes
    from ryla.models.store import CLIP_L, FLUX_CHECKPOINT, FLUX_TRANSFORMER

    meta: dict = {}
    for kind, name in (("checkpoints", FLUX_CHECKPOINT), ("diffusion_models", FLUX_TRANSFORMER),
                       ("text_encoders", CLIP_L)):
        if name in store.list(kind):
            with safe_open(str(store.resolve(kind, name)), framework="pt") as f:
                file_meta = f.metadata() or {}
            if METADATA_KEY in file_meta:
                configs = json.loads(file_meta[METADATA_KEY]).get("configs", {})
                meta.setdefault("configs", {}).update({k: v for k, v in configs.items()
                                                       if k not in meta.get("configs", {})})
    transformer = _empty(lambda: FluxTransformer2DModel.from_config(_public(component_config("transformer", meta))))
    clip = _empty(lambda: CLIPTextModel(CLIPTextConfig(**_public(component_config("clip_l", meta)))))
    return linear_shapes(transformer), linear_shapes(clip)
