"""FLUX.1 Redux through ComfyUI's nodes: CLIPVisionLoader (SigLIP), CLIPVisionEncode,
StyleModelLoader, StyleModelApply. The image tokens are checked against diffusers'
FluxPriorReduxPipeline run on the same files; the preprocessing against ComfyUI's
clip_preprocess arithmetic; Comfy-Org's flux_redux_model_example template runs in
tests/test_ui_format.py."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

from ryla.flux.engine import clip_vision_pixels
from ryla.graph.executor import NodeUserError
from ryla.graph.nodes.style import CLIPVisionEncode, StyleModelApply
from ryla.models.tiny import REDUX_MODEL, SIGLIP_VISION


def _context(runtime):
    return types.SimpleNamespace(engine=runtime.engine, store=runtime.store, current_node="41", input_sources={})


def test_clip_vision_pixels_follow_comfyuis_clip_preprocess():
    """Short side to 384 (bicubic, antialiased), the middle cropped; or squashed with crop
    none; 8-bit levels; (x - 0.5) / 0.5."""
    image = torch.rand(1, 300, 500, 3, generator=torch.Generator().manual_seed(0))
    pixels = clip_vision_pixels(image, 384, crop=True)
    assert pixels.shape == (1, 3, 384, 384)
    scaled = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(384, 640), mode="bicubic", antialias=True)
    expected = (torch.clip(255 * scaled[:, :, :, 128:512], 0, 255).round() / 255 - 0.5) / 0.5
    torch.testing.assert_close(pixels, expected)
    assert clip_vision_pixels(image, 384, crop=False).shape == (1, 3, 384, 384)
    levels = (clip_vision_pixels(image, 384) * 0.5 + 0.5) * 255
    torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0)


def test_redux_tokens_match_diffusers_flux_prior_redux_pipeline(runtime):
    """FluxPriorReduxPipeline on the same SigLIP and Redux weights (and the tiny text encoders)
    appends the image's projected tokens to the prompt's T5 tokens; StyleModelApply appends
    the same tokens, times its strength. The image is SigLIP's 384 pixels square, so neither
    resizes it (the pipeline would with Pillow, ComfyUI with torch)."""
    from diffusers import FluxPriorReduxPipeline
    from transformers import SiglipImageProcessorPil

    engine = runtime.engine
    vision = engine.load_clip_vision(SIGLIP_VISION)
    redux = engine.load_style_model(REDUX_MODEL)
    text = engine.load_text_encoders("clip_l.safetensors", "t5xxl_fp16.safetensors")
    y, x = np.mgrid[0:384, 0:384]
    picture = np.stack([x * 255 // 383, y * 255 // 383, (x + y) * 255 // 766], -1).astype(np.uint8)
    pipe = FluxPriorReduxPipeline(image_encoder=vision, image_embedder=redux,
                                  feature_extractor=SiglipImageProcessorPil(size={"height": 384, "width": 384}),
                                  text_encoder=text.clip, tokenizer=text.clip_tokenizer, text_encoder_2=text.t5,
                                  tokenizer_2=text.t5_tokenizer)
    with torch.inference_mode():
        theirs = pipe(image=Image.fromarray(picture), prompt="a cat", return_dict=False)[0][:, -729:]

    image = torch.from_numpy(picture.astype(np.float32) / 255)[None]
    (encoded,) = CLIPVisionEncode().run(_context(runtime), vision, image, "none")
    cond = engine.encode(text, "a cat")
    (applied,) = StyleModelApply().run(_context(runtime), (cond,), redux, encoded, 0.5, "multiply")
    assert applied[0].t5.shape[1] == cond.t5.shape[1] + 729
    torch.testing.assert_close(applied[0].t5[:, :cond.t5.shape[1]], cond.t5)
    ours = applied[0].t5[:, cond.t5.shape[1]:] / 0.5
    error = (ours - theirs.float()).norm() / theirs.float().norm()
    assert error < 1e-5, float(error)


def test_style_model_apply_options(runtime):
    engine = runtime.engine
    vision = engine.load_clip_vision(SIGLIP_VISION)
    redux = engine.load_style_model(REDUX_MODEL)
    cond = engine.encode(engine.load_text_encoders("clip_l.safetensors", "t5xxl_fp16.safetensors"), "x")
    cond = cond.with_options(guidance=3.5)
    (encoded,) = CLIPVisionEncode().run(_context(runtime), vision, torch.rand(2, 64, 64, 3), "center")
    (both,) = StyleModelApply().run(_context(runtime), (cond,), redux, encoded, 1.0, "attn_bias")
    # a batch of two images: both images' tokens, one after the other, as ComfyUI flattens them
    assert both[0].t5.shape[1] == cond.t5.shape[1] + 2 * 729 and both[0].guidance == 3.5
    (zero,) = StyleModelApply().run(_context(runtime), (cond,), redux, encoded, 0.0, "multiply")
    assert not zero[0].t5[:, cond.t5.shape[1]:].any()
    with pytest.raises(NodeUserError, match="attn_bias"):
        StyleModelApply().run(_context(runtime), (cond,), redux, encoded, 0.5, "attn_bias")
