"""Single-file FLUX ControlNets through ComfyUI's nodes: InstantX, Shakker-Labs' Union and
XLabs-AI's layouts (ControlNetLoader, ControlNetApplyAdvanced, ControlNetApplySD3,
SetUnionControlNetType). One step is checked against the transformer and ControlNet called as
diffusers' FluxControlNetPipeline calls them; the spreading of a short ControlNet's outputs over
the transformer's blocks against diffusers' own two rules; XLabs' hint block against its
published layer order. Graphs shaped like published ones run in tests/test_workflows.py
(flux_controlnet_union.json, flux_controlnet_chain.json)."""

from __future__ import annotations

import types

import pytest
import torch

from ryla.flux import sampling
from ryla.flux.components import ControlHint
from ryla.flux.engine import IncompatibleInputs, _merge_residuals
from ryla.graph.nodes.controlnet import ControlNetApplyAdvanced, SetUnionControlNetType
from ryla.models import formats
from ryla.models.tiny import (INSTANTX_CONTROLNET, UNION_CONTROLNET, XLABS_CONTROLNET, controlnet_state_dict,
                              TINY_TRANSFORMER)


def _context(runtime):
    return types.SimpleNamespace(engine=runtime.engine, store=runtime.store, current_node="1",
                                 input_sources={})


def _cond(runtime):
    text = runtime.engine.load_text_encoders("clip_l.safetensors", "t5xxl_fp16.safetensors")
    return runtime.engine.encode(text, "a car").with_options(guidance=3.5)


def test_controlnet_files_are_recognised_from_their_keys(runtime):
    engine = runtime.engine
    instantx = engine.load_controlnet_file(INSTANTX_CONTROLNET)
    union = engine.load_controlnet_file(UNION_CONTROLNET)
    xlabs = engine.load_controlnet_file(XLABS_CONTROLNET)
    assert (instantx.layout, instantx.modes, instantx.model.input_hint_block) == ("instantx", 0, None)
    assert (union.layout, union.modes) == ("instantx", 10)
    assert xlabs.layout == "xlabs" and xlabs.model.config.num_single_layers == 0
    assert xlabs.model.input_hint_block is not None and xlabs.model.config.patch_size == 2


def test_xlabs_layout_round_trips_and_its_hint_block_is_xlabs_conv_stack():
    """XLabs' input_hint_block is an nn.Sequential (conv 3->16, then seven 16->16 convs, three of
    stride 2, SiLU between; x-flux's controlnet.py): written out, diffusers'
    ControlNetConditioningEmbedding with the converted weights computes the same."""
    sd = controlnet_state_dict(seed=10, num_single_layers=0, conditioning_embedding_channels=16)
    xlabs = formats.controlnet_to_xlabs(sd)
    assert formats.controlnet_layout(xlabs) == formats.CONTROLNET_XLABS
    assert "pos_embed_input.weight" in xlabs and "input_hint_block.14.weight" in xlabs
    back = formats.controlnet_from_xlabs(xlabs)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)

    layers = []
    for index in range(8):
        conv = torch.nn.Conv2d(3 if index == 0 else 16, 16, 3, padding=1, stride=2 if index in (2, 4, 6) else 1)
        conv.weight.data, conv.bias.data = xlabs[f"input_hint_block.{2 * index}.weight"], \
            xlabs[f"input_hint_block.{2 * index}.bias"]
        layers += [conv, torch.nn.SiLU()]
    reference = torch.nn.Sequential(*layers[:-1])  # no SiLU after the last conv
    from diffusers import FluxControlNetModel

    config = formats.controlnet_config_from_weights(TINY_TRANSFORMER, back)
    model = FluxControlNetModel.from_config(config)
    model.load_state_dict(back)
    image = torch.rand(1, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.input_hint_block(image), reference(image), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,mode", [(INSTANTX_CONTROLNET, None), (UNION_CONTROLNET, 3), (UNION_CONTROLNET, None)])
def test_a_controlnet_step_feeds_the_transformer_what_diffusers_controlnet_pipeline_does(runtime, name, mode):
    """One velocity through the engine with ControlNetApplyAdvanced's hint equals the
    ControlNet and the transformer called as diffusers' FluxControlNetPipeline calls them: the
    control image scaled to the latent's pixels, VAE-encoded and put in model space, packed;
    the ControlNet's block outputs times the strength into the transformer (a Union mode as a
    (batch, 1) index; without a type, no mode token, as ComfyUI's auto)."""
    engine = runtime.engine
    model = engine.load_diffusion_model("flux1-dev.safetensors")
    vae = engine.load_vae("ae.safetensors")
    control = engine.load_controlnet_file(name)
    if mode is not None:
        (control,) = SetUnionControlNetType().run(_context(runtime), control, "canny/lineart/anime_lineart/mlsd")
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 8, 6, generator=generator)
    image = torch.rand(1, 40, 56, 3, generator=generator)  # another size: scaled and cropped to 64x48
    cond = _cond(runtime)
    (positive, _) = ControlNetApplyAdvanced().run(_context(runtime), (cond,), (cond,), control, image, 0.7, 0.0, 1.0,
                                                  vae)
    ours = engine._velocity_fn(model, x.shape)(x, 0.6, positive, None, 1, 0, "cond")

    from ryla import imaging

    pixels = imaging.upscale(image.movedim(-1, 1), 48, 64, "nearest-exact", "center").movedim(1, -1)
    hint = (engine.encode_image(vae, pixels) - sampling.LATENT_SHIFT) * sampling.LATENT_SCALE
    latents = sampling.pack_latents(x)
    img_ids = sampling.latent_image_ids(8, 6, "cpu", torch.float32)
    kwargs = dict(encoder_hidden_states=cond.t5, pooled_projections=cond.pooled, timestep=torch.tensor([0.6]),
                  guidance=torch.tensor([3.5]), img_ids=img_ids, txt_ids=torch.zeros(cond.t5.shape[1], 3),
                  return_dict=False)
    with torch.inference_mode():
        if mode is None and control.modes:
            control.model.union = False  # ComfyUI's auto: no mode token
        try:
            blocks, single = control.model(hidden_states=latents, controlnet_cond=sampling.pack_latents(hint),
                                           controlnet_mode=None if mode is None else torch.tensor([[mode]]),
                                           conditioning_scale=0.7, **kwargs)
        finally:
            control.model.union = bool(control.modes)
        out = model.transformer(hidden_states=latents, controlnet_block_samples=blocks,
                                controlnet_single_block_samples=single, **kwargs)[0]
    theirs = sampling.unpack_latents(out.float(), 8, 6)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    plain = engine._velocity_fn(model, x.shape)(x, 0.6, (cond,), None, 1, 0, "cond")
    assert (plain - ours).abs().max() > 1e-3  # the ControlNet matters


@pytest.mark.parametrize("layout,repeat", [(formats.CONTROLNET_INSTANTX, False), (formats.CONTROLNET_XLABS, True)])
def test_short_controlnets_spread_over_the_blocks_as_diffusers_and_comfyui_do(layout, repeat):
    """A ControlNet with 2 double blocks (and, InstantX's, 3 single ones) on a transformer with
    5 and 7: InstantX's outputs each cover consecutive blocks (diffusers' interval_control),
    XLabs' cycle (controlnet_blocks_repeat; XLabs has no single blocks), as
    comfy/ldm/flux/controlnet.py expands them. ryla expands them to one per block, then the
    transformer takes them one to one: the same output."""
    from diffusers import FluxTransformer2DModel

    config = {k: v for k, v in TINY_TRANSFORMER.items() if not k.startswith("_")}
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**{**config, "num_layers": 5, "num_single_layers": 7}).eval()
    hidden = 32
    blocks = [torch.randn(1, 12, hidden) for _ in range(2)]
    single = None if repeat else [torch.randn(1, 12, hidden) for _ in range(3)]
    merged = _merge_residuals([({"controlnet_block_samples": blocks, "controlnet_single_block_samples": single},
                                layout)], 5, 7)
    assert len(merged["controlnet_block_samples"]) == 5
    assert merged["controlnet_single_block_samples"] is None if repeat else len(single) == 3
    inputs = dict(hidden_states=torch.randn(1, 12, 64), encoder_hidden_states=torch.randn(1, 4, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                  img_ids=sampling.latent_image_ids(6, 8, "cpu", torch.float32), txt_ids=torch.zeros(4, 3),
                  return_dict=False)
    with torch.no_grad():
        theirs = transformer(controlnet_block_samples=blocks, controlnet_single_block_samples=single,
                             controlnet_blocks_repeat=repeat, **inputs)[0]
        ours = transformer(**merged, **inputs)[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # chained ControlNets add up (comfy/controlnet.py control_merge)
    twice = _merge_residuals([({"controlnet_block_samples": blocks, "controlnet_single_block_samples": single},
                               layout)] * 2, 5, 7)
    torch.testing.assert_close(twice["controlnet_block_samples"][3], 2 * merged["controlnet_block_samples"][3])


def test_hint_schedule_strength_and_wrong_networks(runtime):
    """end_percent before the step's sigma turns the hint off (the plain velocity); strength 0
    adds nothing to the conditioning; InfuseNet in ControlNetApplyAdvanced, a latent-input
    ControlNet without a VAE are client errors."""
    from ryla.graph.executor import NodeUserError

    engine = runtime.engine
    model = engine.load_diffusion_model("flux1-dev.safetensors")
    vae = engine.load_vae("ae.safetensors")
    control = engine.load_controlnet_file(INSTANTX_CONTROLNET)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    image = torch.rand(1, 64, 64, 3)
    cond = _cond(runtime)
    context = _context(runtime)
    plain = engine._velocity_fn(model, x.shape)(x, 0.9, (cond,), None, 1, 0, "cond")
    (late, _) = ControlNetApplyAdvanced().run(context, (cond,), (cond,), control, image, 1.0, 0.5, 1.0, vae)
    torch.testing.assert_close(engine._velocity_fn(model, x.shape)(x, 0.9, late, None, 1, 0, "cond"), plain)
    assert (engine._velocity_fn(model, x.shape)(x, 0.2, late, None, 1, 0, "cond")
            - engine._velocity_fn(model, x.shape)(x, 0.2, (cond,), None, 1, 0, "cond")).abs().max() > 1e-3
    (unchanged, _) = ControlNetApplyAdvanced().run(context, (cond,), (cond,), control, image, 0.0, 0.0, 1.0, vae)
    assert unchanged == (cond,)
    infusenet = engine.load_controlnet("InfuseNetModel")
    with pytest.raises(NodeUserError, match="InfuseNet"):
        ControlNetApplyAdvanced().run(context, (cond,), (cond,), infusenet, image, 1.0, 0.0, 1.0, vae)
    (no_vae, _) = ControlNetApplyAdvanced().run(context, (cond,), (cond,), control, image, 1.0, 0.0, 1.0)
    with pytest.raises(IncompatibleInputs, match="VAE"):
        engine._velocity_fn(model, x.shape)(x, 0.5, no_vae, None, 1, 0, "cond")
    assert isinstance(no_vae[0].option("controls")[0], ControlHint)
