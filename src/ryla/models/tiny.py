"""A tiny random-weight FLUX.1-dev model set, written in the real files' formats.

Real weights cannot be downloaded everywhere (CI, offline machines). This writes the same
architecture family at toy width (one double- and one single-stream block, guidance
embedding, CLIP-L-like and T5-like encoders, a 16-channel VAE), with locally generated
tokenizers, under the real file names and key layouts:

    checkpoints/flux1-dev-fp8.safetensors   all-in-one, transformer in float8_e4m3fn
    diffusion_models/flux1-dev.safetensors  BFL keys, bf16
    diffusion_models/...                    scaled fp8, schnell (no guidance), Kontext (scaled
                                            fp8), Fill (384 input channels), Canny and Depth (128),
                                            GGUF Q8_0 and Q4_K (city96's layout)
    text_encoders/clip_l.safetensors        transformers keys, fp16
    text_encoders/t5xxl_fp16.safetensors    transformers keys, fp16 (also scaled fp8, and GGUF Q8_0
                                            under llama.cpp's names)
    vae/ae.safetensors                      LDM keys, bf16
    tokenizers/clip_l, tokenizers/t5xxl     tokenizer files as in FLUX.1-dev's repo

so everything downstream goes through exactly the loaders real weights use. The one thing a
real file lacks is the model's size; tiny files carry their config in the safetensors
metadata (key `ryla`), and the loaders fall back to the bundled FLUX.1-dev
configs when it is absent. Output is deterministic: same bytes on every run.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from ryla.models import formats, gguf_files
from ryla.models.tensor_files import METADATA_KEY
from ryla.models.store import CLIP_L, FLUX_CHECKPOINT, FLUX_TRANSFORMER, FLUX_VAE, T5XXL, ModelStore

# diffusers' own FluxControlNetModel.__init__ (models/controlnets/controlnet_flux.py) builds the
# FluxPosEmbed that diffusers itself deprecated (models/embeddings.py): its FutureWarning
# is about diffusers' code, not ryla's, and would print on every InfuseNet build.
warnings.filterwarnings("ignore", message=r"`FluxPosEmbed` is deprecated", category=FutureWarning)

log = logging.getLogger(__name__)

TINY_VERSION = "7"  # bump when the tiny architecture changes, so stale sets are rewritten

TINY_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel",
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": [4, 6, 6],
}
TINY_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 16,
    "sample_size": 64,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "act_fn": "silu",
}
TINY_CLIP = {
    "model_type": "clip_text_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    "bos_token_id": 0,
    "eos_token_id": 2,  # as in FLUX.1-dev's config: pool at the highest token id (the end token)
    "pad_token_id": 1,
}
TINY_T5 = {
    "model_type": "t5",
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 32,
    "feed_forward_proj": "gated-gelu",
    "is_gated_act": True,
    "dense_act_fn": "gelu_new",
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
}


def ensure_tiny_models(root: Path | str) -> ModelStore:
    """Write the tiny set into `root` unless an up-to-date one is there already."""
    store = ModelStore(root, tiny=True)
    marker = store.root / "TINY_MODELS"
    if not (marker.is_file() and marker.read_text().strip() == TINY_VERSION and store.has_flux_weights()):
        make_tiny_models(store.root)
    return store


def make_tiny_models(root: Path | str) -> ModelStore:
    store = ModelStore(root, tiny=True)
    store.ensure_layout()
    tokenizer_sizes = _write_tokenizers(store)
    transformer = _transformer_state_dict()
    vae = _vae_state_dict()
    clip = _clip_state_dict(vocab_size=tokenizer_sizes["clip_l"])
    t5 = _t5_state_dict(vocab_size=tokenizer_sizes["t5xxl"])
    configs = {
        "transformer": TINY_TRANSFORMER,
        "vae": TINY_VAE,
        "clip_l": {**TINY_CLIP, "vocab_size": tokenizer_sizes["clip_l"]},
        "t5xxl": {**TINY_T5, "vocab_size": tokenizer_sizes["t5xxl"]},
    }

    def meta(*components: str) -> dict[str, str]:
        # One metadata key: safetensors writes its metadata map in hash order, so several keys
        # would make the bytes differ from run to run.
        return {METADATA_KEY: json.dumps({"tiny": TINY_VERSION, "configs": {c: configs[c] for c in components}},
                                         sort_keys=True)}

    bf16 = {k: v.to(torch.bfloat16) for k, v in transformer.items()}
    _save(store.folder("diffusion_models") / FLUX_TRANSFORMER, bf16, meta("transformer"))
    _save(store.folder("text_encoders") / CLIP_L, _half(clip), meta("clip_l"))
    _save(store.folder("text_encoders") / T5XXL, _half(t5), meta("t5xxl"))
    _save(store.folder("vae") / FLUX_VAE, {k: v.to(torch.bfloat16) for k, v in vae.items()}, meta("vae"))
    # ComfyUI's scaled fp8 layout (what Comfy-Org's current templates download): the same
    # weights, each weight matrix in float8 with a float32 scale_weight, and the marker
    _save(store.folder("diffusion_models") / SCALED_TRANSFORMER, scaled_fp8(bf16), meta("transformer"))
    _save(store.folder("text_encoders") / SCALED_T5XXL, scaled_fp8(_half(t5)), meta("t5xxl"))
    # FLUX.1-schnell's layout: no guidance embedding (guidance_in.*), its config read from the
    # weights as for the published file (no ryla metadata: the bundled config plus the weights)
    schnell = {k: v.to(torch.bfloat16) for k, v in _transformer_state_dict(guidance=False).items()}
    _save(store.folder("diffusion_models") / SCHNELL_TRANSFORMER, schnell, meta("transformer"))
    # FLUX.1 Kontext dev: FLUX.1-dev's layout and shapes (its reference images join the token
    # sequence; nothing in the weights says so), other weights; in the scaled fp8 layout of
    # Comfy-Org's flux1-dev-kontext_fp8_scaled.safetensors.
    kontext = {k: v.to(torch.bfloat16) for k, v in _transformer_state_dict(seed=2).items()}
    _save(store.folder("diffusion_models") / KONTEXT_TRANSFORMER, scaled_fp8(kontext), meta("transformer"))
    # FLUX.1 Fill dev and Canny/Depth dev: img_in takes the latent's 64 packed channels plus the
    # concatenated ones (Fill: masked image 64 + mask 256 = 384; Canny/Depth: control image 64
    # = 128), proj_out still gives 64, as in the published flux1-fill-dev.safetensors
    # (diffusers' FluxFillPipeline: in_channels 384, out_channels 64) and flux1-canny-dev.
    for name, in_channels, seed in ((FILL_TRANSFORMER, 384, 3), (CANNY_TRANSFORMER, 128, 4),
                                    (DEPTH_TRANSFORMER, 128, 5)):
        variant = _transformer_state_dict(seed=seed, in_channels=in_channels)
        _save(store.folder("diffusion_models") / name, {k: v.to(torch.bfloat16) for k, v in variant.items()},
              meta("transformer"))

    # A diffusers folder (FluxTransformer2DModel.save_pretrained: config.json, two shards and
    # their index, as black-forest-labs/FLUX.1-dev's transformer/ folder), dev's weights
    _write_diffusers_transformer(store.folder("diffusion_models") / DIFFUSERS_TRANSFORMER, bf16)
    # city96's GGUF files (ComfyUI-GGUF): the dev transformer in Q8_0 (BFL keys, arch flux) and
    # the T5 encoder in Q8_0 under llama.cpp's names (arch t5encoder), same weights as above.
    # Q4_K's super-blocks take rows of 256 values, wider than any of the tiny model's, so the
    # Q4_K file is a 256-wide variant (16 heads of 16; the text and image widths as above).
    gguf_files.write_gguf(store.folder("diffusion_models") / GGUF_Q8_TRANSFORMER, transformer, "flux", "Q8_0",
                          json.loads(meta("transformer")[METADATA_KEY]))
    gguf_files.write_gguf(store.folder("diffusion_models") / GGUF_Q4K_TRANSFORMER, wide_transformer_state_dict(),
                          "flux", "Q4_K", json.loads(meta("transformer")[METADATA_KEY]))
    gguf_files.write_gguf(store.folder("text_encoders") / GGUF_Q8_T5XXL, gguf_files.t5_to_llama_cpp_names(t5),
                          "t5encoder", "Q8_0", json.loads(meta("t5xxl")[METADATA_KEY]))

    # All-in-one, as ComfyUI's flux1-dev-fp8: the transformer's weight matrices in fp8,
    # its norms and biases (which real fp8 exports also keep wider) in bf16.
    checkpoint: dict[str, torch.Tensor] = {}
    for key, value in transformer.items():
        dtype = torch.float8_e4m3fn if value.ndim == 2 else torch.bfloat16
        checkpoint[formats.CHECKPOINT_PREFIXES["transformer"] + key] = value.to(dtype)
    for component, sd, cast in (("vae", vae, torch.bfloat16), ("clip_l", clip, torch.float16),
                                ("t5xxl", t5, torch.float16)):
        for key, value in sd.items():
            checkpoint[formats.CHECKPOINT_PREFIXES[component] + key] = value.to(cast)
    _save(store.folder("checkpoints") / FLUX_CHECKPOINT, checkpoint, meta("transformer", "vae", "clip_l", "t5xxl"))
    _write_identity_models(store)
    _write_controlnets(store, meta("transformer"))
    _write_redux(store)
    (store.root / "TINY_MODELS").write_text(TINY_VERSION + "\n")
    log.info("wrote the tiny FLUX.1-dev model set to %s", store.root)
    return store


# Comfy-Org's file names for these layouts
SCALED_TRANSFORMER = "flux1-dev-fp8-e4m3fn-scaled.safetensors"
SCALED_T5XXL = "t5xxl_fp8_e4m3fn_scaled.safetensors"
SCHNELL_TRANSFORMER = "flux1-schnell.safetensors"
KONTEXT_TRANSFORMER = "flux1-dev-kontext_fp8_scaled.safetensors"
FILL_TRANSFORMER = "flux1-fill-dev.safetensors"
CANNY_TRANSFORMER = "flux1-canny-dev.safetensors"
DEPTH_TRANSFORMER = "flux1-depth-dev.safetensors"
DIFFUSERS_TRANSFORMER = "FLUX.1-dev-transformer"


def _write_diffusers_transformer(folder: Path, bfl: dict[str, torch.Tensor]) -> None:
    import shutil

    from diffusers import FluxTransformer2DModel

    config = {k: v for k, v in TINY_TRANSFORMER.items() if not k.startswith("_")}
    model = FluxTransformer2DModel(**config)
    model.load_state_dict(formats.flux_transformer_from_bfl(bfl), assign=True)  # its bf16 tensors as they are
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, max_shard_size="100KB", safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


# city96's names (city96/FLUX.1-dev-gguf, city96/t5-v1_1-xxl-encoder-gguf)
GGUF_Q8_TRANSFORMER = "flux1-dev-Q8_0.gguf"
GGUF_Q4K_TRANSFORMER = "flux1-dev-Q4_K_S.gguf"
GGUF_Q8_T5XXL = "t5-v1_1-xxl-encoder-Q8_0.gguf"


# Single-file FLUX ControlNets under the names they are usually saved as: InstantX's Canny
# (InstantX/FLUX.1-dev-Controlnet-Canny), Shakker-Labs' Union Pro (10 control modes), XLabs-AI's
# Canny v3 (XLabs-AI/flux-controlnet-collections)
INSTANTX_CONTROLNET = "instantx_flux_canny.safetensors"
UNION_CONTROLNET = "FLUX.1-dev-ControlNet-Union-Pro.safetensors"
XLABS_CONTROLNET = "flux-canny-controlnet-v3.safetensors"


def controlnet_state_dict(seed: int, num_single_layers: int = 1, num_mode: int | None = None,
                          conditioning_embedding_channels: int | None = None) -> dict[str, torch.Tensor]:
    """A tiny FluxControlNetModel's weights (diffusers keys, float32), seeded."""
    from diffusers import FluxControlNetModel

    config = {k: v for k, v in TINY_TRANSFORMER.items() if not k.startswith("_")}
    config.update(num_single_layers=num_single_layers, num_mode=num_mode,
                  conditioning_embedding_channels=conditioning_embedding_channels)
    return _fill_deterministically(FluxControlNetModel(**config), seed=seed)


def _write_controlnets(store: ModelStore, metadata: dict[str, str]) -> None:
    """The three layouts as published: InstantX's and Union's in diffusers' key names (Union
    with its mode embedding), XLabs' with BFL block names, `pos_embed_input` and a
    pixel-space `input_hint_block`, double blocks only (comfy/controlnet.py tells them apart by
    these keys)."""
    folder = store.folder("controlnet")
    bf16 = lambda sd: {k: v.to(torch.bfloat16) for k, v in sd.items()}  # noqa: E731
    _save(folder / INSTANTX_CONTROLNET, bf16(controlnet_state_dict(seed=8)), metadata)
    _save(folder / UNION_CONTROLNET, bf16(controlnet_state_dict(seed=9, num_mode=10)), metadata)
    xlabs = controlnet_state_dict(seed=10, num_single_layers=0, conditioning_embedding_channels=16)
    _save(folder / XLABS_CONTROLNET, bf16(formats.controlnet_to_xlabs(xlabs)), metadata)


# FLUX.1 Redux's files under Comfy-Org's names (flux_redux_model_example's)
SIGLIP_VISION = "sigclip_vision_patch14_384.safetensors"
REDUX_MODEL = "flux1-redux-dev.safetensors"
# SigLIP so400m's shape at toy width: 384-pixel images in 14-pixel patches (729 tokens, as the
# real one, which comfy/clip_vision.py recognises by), 2 layers of width 32
TINY_SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 384, "patch_size": 14,
               "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": False}


def siglip_state_dict() -> dict[str, torch.Tensor]:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    sd = _fill_deterministically(SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP)), seed=11)
    # Written as published files are: `vision_model.` keys (transformers 5 drops the prefix), no
    # position_ids buffer
    sd = {k if k.startswith("vision_model.") else "vision_model." + k: v for k, v in sd.items()}
    sd.pop("vision_model.embeddings.position_ids", None)
    return sd


def redux_state_dict() -> dict[str, torch.Tensor]:
    """Redux's projection from SigLIP's width to T5's (the tiny T5's 32), 3x wide inside."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    return _fill_deterministically(ReduxImageEncoder(redux_dim=TINY_SIGLIP["hidden_size"],
                                                     txt_in_features=TINY_T5["d_model"]), seed=12)


def _write_redux(store: ModelStore) -> None:
    """The SigLIP tower in transformers' key names (`vision_model.`, as Comfy-Org's
    sigclip_vision_patch14_384.safetensors) and Redux's `redux_up`/`redux_down`."""
    _save(store.folder("clip_vision") / SIGLIP_VISION, {k: v.to(torch.float16) for k, v in siglip_state_dict().items()},
          {METADATA_KEY: json.dumps({"tiny": TINY_VERSION, "configs": {"clip_vision": TINY_SIGLIP}}, sort_keys=True)})
    _save(store.folder("style_models") / REDUX_MODEL, {k: v.to(torch.bfloat16) for k, v in redux_state_dict().items()},
          {METADATA_KEY: json.dumps({"tiny": TINY_VERSION}, sort_keys=True)})


def wide_transformer_state_dict() -> dict[str, torch.Tensor]:
    """The Q4_K file's weights (float32, BFL keys): 256 wide, so its matrices fit Q4_K's blocks."""
    return _transformer_state_dict(seed=6, heads=16)


def scaled_fp8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in ComfyUI's scaled fp8 layout: every 2-D `.weight` as float8_e4m3fn
    divided by a per-tensor scale (absolute maximum / 448, e4m3's largest value) stored beside
    it as `.scale_weight` in float32; other tensors as they are; the `scaled_fp8` marker (an
    empty float8 tensor, as ComfyUI's exports carry it)."""
    out: dict[str, torch.Tensor] = {formats.SCALED_FP8_MARKER: torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in sd.items():
        if key.endswith(".weight") and value.ndim == 2:
            scale = value.float().abs().amax().clamp(min=1e-12) / 448.0
            out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[key] = value
    return out


def _half(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float16) for k, v in sd.items()}


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomic write: a reader never sees a half-written model file under its final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fill_deterministically(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded values for every tensor, in sorted-name order: independent of the libraries'
    own init code, so the files stay byte-identical across versions. Matrices get
    1/sqrt(fan_in)-scaled normals, norms ones, biases zeros (a conventional, stable init)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in sorted(module.state_dict().items()):
        if tensor.ndim >= 2:
            fan_in = math.prod(tensor.shape[1:])
            std = 0.02 if "embed" in name or "shared" in name else 1.0 / math.sqrt(fan_in)
            value = torch.randn(tensor.shape, generator=generator) * std
        elif name.endswith("bias"):
            value = torch.zeros(tensor.shape)
        elif tensor.dtype.is_floating_point:
            value = torch.ones(tensor.shape)
        else:
            value = tensor.clone()
        out[name] = value.float() if value.dtype.is_floating_point else value
    return out


def _transformer_state_dict(guidance: bool = True, seed: int = 1, in_channels: int = 64,
                            heads: int = TINY_TRANSFORMER["num_attention_heads"]) -> dict[str, torch.Tensor]:
    from diffusers import FluxTransformer2DModel

    config = {k: v for k, v in TINY_TRANSFORMER.items() if not k.startswith("_")}
    config.update(guidance_embeds=guidance, in_channels=in_channels, out_channels=64, num_attention_heads=heads)
    model = FluxTransformer2DModel(**config)
    return formats.flux_transformer_to_bfl(_fill_deterministically(model, seed=seed))


def _vae_state_dict() -> dict[str, torch.Tensor]:
    from diffusers import AutoencoderKL

    config = {k: v for k, v in TINY_VAE.items() if not k.startswith("_")}
    model = AutoencoderKL(**config)
    return formats.vae_to_ldm(_fill_deterministically(model, seed=2), len(config["block_out_channels"]))


def _clip_state_dict(vocab_size: int) -> dict[str, torch.Tensor]:
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**{**TINY_CLIP, "vocab_size": vocab_size}))
    sd = _fill_deterministically(model, seed=3)
    # Written as published clip_l files are: `text_model.` keys, no position_ids buffer.
    sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}
    sd.pop("text_model.embeddings.position_ids", None)
    return sd


def _t5_state_dict(vocab_size: int) -> dict[str, torch.Tensor]:
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config(**{**TINY_T5, "vocab_size": vocab_size}))
    sd = _fill_deterministically(model, seed=4)
    sd.pop("encoder.embed_tokens.weight", None)  # tied to `shared`, as in t5xxl_fp16.safetensors
    return sd


# --------------------------------------------------------------------------------------------
# Tokenizers, generated: a byte-level BPE in CLIP's file format, a Unigram model in T5's.
# --------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


_WORDS = ("a", "an", "the", "of", "in", "on", "red", "fox", "snow", "cat", "dog", "portrait", "photo",
          "woman", "man", "face", "light", "city", "night", "forest", "blue", "green", "smiling")


def _write_tokenizers(store: ModelStore) -> dict[str, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    clip_dir = store.folder("tokenizers") / "clip_l"
    clip_dir.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for ch in _bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    for ch in _bytes_to_unicode().values():
        vocab[ch + "</w>"] = len(vocab)
    merges = []
    for word in _WORDS:  # whole-word merges for a few common words, built left to right
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = (pieces[0], pieces[1])
            if f"{merge[0]} {merge[1]}" not in merges:
                merges.append(f"{merge[0]} {merge[1]}")
                vocab.setdefault(merge[0] + merge[1], len(vocab))
            pieces = [merge[0] + merge[1]] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # highest id: CLIP pools at the end token
    _write_json(clip_dir / "vocab.json", vocab)
    (clip_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    _write_json(clip_dir / "special_tokens_map.json", {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"})
    _write_json(clip_dir / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    })

    t5_dir = store.folder("tokenizers") / "t5xxl"
    t5_dir.mkdir(parents=True, exist_ok=True)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in _WORDS]
    pieces += [(c, -4.0) for c in alphabet] + [("▁" + c, -3.5) for c in alphabet]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tokenizer.save(str(t5_dir / "tokenizer.json"), pretty=True)
    _write_json(t5_dir / "special_tokens_map.json", {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
    _write_json(t5_dir / "tokenizer_config.json", {
        "tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0,
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
    })
    return {"clip_l": len(vocab), "t5xxl": len(pieces)}


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# Identity: the ArcFace stand-in, the Resampler (image_proj_model.bin) and InfuseNet.
# --------------------------------------------------------------------------------------------

TINY_RESAMPLER = dict(embed_dims=512, output_dims=TINY_TRANSFORMER["joint_attention_dim"], hidden_dims=64, depth=1,
                      dim_head=64, heads=1, num_queries=8, ffn_ratio=4)


def _write_identity_models(store: ModelStore) -> None:
    from diffusers import FluxControlNetModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    from ryla.identity.adapter import resampler_to_original
    from ryla.identity.faces import TINY_EMBEDDER, TinyFaceEmbedder

    _save(store.folder("insightface") / TINY_EMBEDDER, _fill_deterministically(TinyFaceEmbedder(), seed=5),
          {METADATA_KEY: json.dumps({"tiny": TINY_VERSION})})
    resampler = _fill_deterministically(IPAdapterPlusImageProjection(**TINY_RESAMPLER), seed=6)
    path = store.folder("instantid") / "image_proj_model.bin"
    buffer = io.BytesIO()
    torch.save({"image_proj": resampler_to_original(resampler)}, buffer)
    path.write_bytes(buffer.getvalue())
    config = {k: v for k, v in TINY_TRANSFORMER.items() if not k.startswith("_")}
    controlnet = FluxControlNetModel(**config)
    controlnet.load_state_dict(_fill_deterministically(controlnet, seed=7))
    folder = store.folder("controlnet") / "InfuseNetModel"
    controlnet.save_pretrained(str(folder), safe_serialization=True)
    # diffusers records its own version in config.json; drop it so the bytes stay identical.
    config_path = folder / "config.json"
    config_json = json.loads(config_path.read_text())
    config_json.pop("_diffusers_version", None)
    _write_json(config_path, config_json)


def write_example_lora(path: Path | str, transformer_shapes: dict[str, tuple[int, int]], rank: int = 4,
                       seed: int = 0) -> Path:
    """A small LoRA that fits the model whose linear shapes are given (diffusers module name ->
    (out, in)): every attention projection of every block, in the PEFT/diffusers layout
    (`transformer.<module>.lora_A.weight` [rank, in], `.lora_B.weight` [out, rank]), as
    diffusers' FluxLoraLoaderMixin and ai-toolkit write them. Deterministic for a seed; its
    effect is visible but does not swamp the base weights."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in sorted(transformer_shapes.items()):
        if ".attn." not in module:
            continue
        down = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
        up = torch.randn(out_features, rank, generator=generator) * 0.05
        tensors[f"transformer.{module}.lora_A.weight"] = down.to(torch.bfloat16)
        tensors[f"transformer.{module}.lora_B.weight"] = up.to(torch.bfloat16)
    path = Path(path)
    _save(path, tensors, {"format": "pt", "ryla_example_lora": "1"})
    return path
