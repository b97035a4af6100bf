"""The FLUX.1 family beside dev: Kontext's reference latents, Fill's and Canny/Depth's
concatenated input channels. The engine's inputs are checked against diffusers' own
FluxKontextPipeline and FluxFillPipeline code (what they feed the same transformer), and the
placement of several references against comfy/ldm/flux/model.py's rules; the workflows shaped
like ComfyUI's examples run in tests/test_workflows.py (tests/workflows/flux_*.json)."""

from __future__ import annotations

import types

import pytest
import torch

from ryla.flux import sampling
from ryla.flux.components import Cond
from ryla.flux.engine import IncompatibleInputs, model_concat
from ryla.graph.nodes.edit import kontext_size
from ryla.models.tiny import CANNY_TRANSFORMER, DEPTH_TRANSFORMER, FILL_TRANSFORMER, KONTEXT_TRANSFORMER


def _cond(runtime, text: str = "a cat") -> Cond:
    model = runtime.engine.load_text_encoders("clip_l.safetensors", "t5xxl_fp16.safetensors")
    return runtime.engine.encode(model, text)


def test_variants_are_recognised_from_their_weights(runtime):
    engine = runtime.engine
    fill = engine.load_diffusion_model(FILL_TRANSFORMER).transformer.config
    assert (fill.in_channels, fill.out_channels, fill.guidance_embeds) == (384, 64, True)
    for name in (CANNY_TRANSFORMER, DEPTH_TRANSFORMER):
        config = engine.load_diffusion_model(name).transformer.config
        assert (config.in_channels, config.out_channels) == (128, 64)
    kontext = engine.load_diffusion_model(KONTEXT_TRANSFORMER).transformer.config
    assert (kontext.in_channels, kontext.out_channels) == (64, 64)


def test_a_kontext_step_feeds_the_transformer_what_diffusers_kontext_pipeline_does(runtime):
    """One velocity through the engine with a ReferenceLatent equals the transformer called as
    diffusers' FluxKontextPipeline calls it: the image latent's tokens appended, their ids
    those of _prepare_latent_image_ids with the first axis set to 1, the output cut back."""
    from diffusers import FluxKontextPipeline

    engine = runtime.engine
    model = engine.load_diffusion_model(KONTEXT_TRANSFORMER)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 8, 12, generator=generator)
    reference = torch.randn(1, 16, 10, 6, generator=generator)  # VAE space, another size
    cond = _cond(runtime).with_options(guidance=2.5, reference_latents=(reference,))
    ours = engine._velocity_fn(model, x.shape)(x, 0.7, (cond,), None, 1, 0, "cond")

    reference_model_space = (reference - sampling.LATENT_SHIFT) * sampling.LATENT_SCALE
    latents = FluxKontextPipeline._pack_latents(x, 1, 16, 8, 12)
    image_latents = FluxKontextPipeline._pack_latents(reference_model_space, 1, 16, 10, 6)
    latent_ids = FluxKontextPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32)
    image_ids = FluxKontextPipeline._prepare_latent_image_ids(1, 5, 3, "cpu", torch.float32)
    image_ids[..., 0] = 1
    with torch.inference_mode():
        out = model.transformer(hidden_states=torch.cat([latents, image_latents], dim=1),
                                timestep=torch.tensor([0.7]), guidance=torch.tensor([2.5]),
                                pooled_projections=cond.pooled, encoder_hidden_states=cond.t5,
                                txt_ids=torch.zeros(cond.t5.shape[1], 3),
                                img_ids=torch.cat([latent_ids, image_ids], dim=0), return_dict=False)[0]
    theirs = FluxKontextPipeline._unpack_latents(out[:, :latents.shape[1]], 64, 96, 8)
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-5)
    plain = engine._velocity_fn(model, x.shape)(x, 0.7, (cond.with_options(reference_latents=()),), None, 1, 0, "c")
    assert (plain - ours).abs().max() > 1e-3  # the reference matters


def test_several_references_are_placed_as_comfyui_places_them():
    """comfy/ldm/flux/model.py Flux._forward: "offset" puts the second reference beside the
    first along the side where it fits, "index" numbers them, "uxo" moves each diagonally past
    the image. Two 8x12 (latent pixel) references beside a 16x16 latent:"""
    refs = [torch.zeros(1, 16, 8, 12), torch.zeros(1, 16, 8, 12)]

    def corners(method):
        _, ids = sampling.reference_tokens(refs, method, 16, 16, "cpu", torch.float32)
        first, second = ids[:24], ids[24:]  # 4 x 6 patches each
        return first[0].tolist(), second[0].tolist(), second[-1].tolist()

    # offset: 8 + 8 > 12 + 12 is false, so the second goes below the first (8 latent px = 4 rows)
    assert corners("offset") == ([1, 0, 0], [1, 4, 0], [1, 7, 5])
    assert corners("index") == ([1, 0, 0], [2, 0, 0], [2, 3, 5])
    # uxo: past the 16x16 image (8 patches), the second also past the first (8x12 -> 4, 6)
    assert corners("uxo") == ([0, 8, 8], [0, 12, 14], [0, 15, 19])


def test_fill_gets_the_masked_image_and_the_mask_as_diffusers_fill_pipeline_packs_them():
    """comfy's Flux.concat_cond for FLUX.1 Fill: masked image latent then the mask folded 8x8,
    joined on channels before patching; diffusers' FluxFillPipeline.prepare_mask_latents packs
    each and joins the tokens. The two must be the same tokens."""
    from diffusers import FluxFillPipeline

    generator = torch.Generator().manual_seed(5)
    masked = torch.randn(1, 16, 6, 8, generator=generator)  # VAE space
    mask = (torch.rand(1, 1, 48, 64, generator=generator) > 0.5).float()
    transformer = types.SimpleNamespace(config=types.SimpleNamespace(in_channels=384, out_channels=64))
    cond = Cond(torch.zeros(1, 4, 32), torch.zeros(1, 32)).with_options(concat_latent_image=masked, concat_mask=mask)
    ours = model_concat(transformer, cond, (1, 16, 6, 8), None, "cpu", torch.float32)
    assert ours.shape == (1, 80, 6, 8)

    pipeline = types.SimpleNamespace(vae_scale_factor=8, _pack_latents=FluxFillPipeline._pack_latents,
                                     vae=types.SimpleNamespace(config=types.SimpleNamespace(
                                         shift_factor=sampling.LATENT_SHIFT, scaling_factor=sampling.LATENT_SCALE)))
    theirs_mask, theirs_image = FluxFillPipeline.prepare_mask_latents(
        pipeline, mask, masked, 1, 16, 1, 48, 64, torch.float32, "cpu", None)
    theirs = torch.cat([theirs_image, theirs_mask], dim=-1)
    torch.testing.assert_close(sampling.pack_latents(ours), theirs, rtol=0, atol=1e-6)


def test_canny_and_depth_take_the_control_latent_and_fill_defaults_as_comfyui_does():
    cond = Cond(torch.zeros(1, 4, 32), torch.zeros(1, 32))
    control = torch.randn(1, 16, 4, 4)
    two = types.SimpleNamespace(config=types.SimpleNamespace(in_channels=128, out_channels=64))
    out = model_concat(two, cond.with_options(concat_latent_image=control), (2, 16, 4, 4), None, "cpu", torch.float32)
    assert out.shape == (2, 16, 4, 4)
    torch.testing.assert_close(out[1], ((control - sampling.LATENT_SHIFT) * sampling.LATENT_SCALE)[0])
    # no image: zeros (shifted into model space); Fill without a mask: all ones
    fill = types.SimpleNamespace(config=types.SimpleNamespace(in_channels=384, out_channels=64))
    out = model_concat(fill, cond, (1, 16, 4, 4), None, "cpu", torch.float32)
    assert torch.allclose(out[:, :16], torch.full((1, 16, 4, 4), -sampling.LATENT_SHIFT * sampling.LATENT_SCALE))
    assert torch.equal(out[:, 16:], torch.ones(1, 64, 4, 4))
    dev = types.SimpleNamespace(config=types.SimpleNamespace(in_channels=64, out_channels=None))
    assert model_concat(dev, cond, (1, 16, 4, 4), None, "cpu", torch.float32) is None


def test_reference_latents_on_a_fill_model_are_a_client_error(runtime):
    model = runtime.engine.load_diffusion_model(FILL_TRANSFORMER)
    x = torch.zeros(1, 16, 4, 4)
    cond = _cond(runtime).with_options(reference_latents=(torch.zeros(1, 16, 4, 4),))
    with pytest.raises(IncompatibleInputs, match="reference latents"):
        runtime.engine._velocity_fn(model, x.shape)(x, 0.5, (cond,), None, 1, 0, "cond")


def test_reference_latent_method_and_chaining(runtime):
    """ReferenceLatent appends (two nodes, two references); without a latent it changes nothing;
    one reference placed by "index" is where "offset" puts it (index 1, no offset)."""
    from ryla.graph.nodes.edit import FluxKontextMultiReferenceLatentMethod, ReferenceLatent

    cond = (_cond(runtime),)
    a, b = torch.zeros(1, 16, 2, 2), torch.ones(1, 16, 2, 2)
    (chained,) = ReferenceLatent().run(None, ReferenceLatent().run(None, cond, {"samples": a})[0], {"samples": b})
    assert [t is a or t is b for t in chained[0].option("reference_latents")] == [True, True]
    assert chained[0].option("reference_latents")[1] is b
    assert ReferenceLatent().run(None, cond)[0] is cond
    (uno,) = FluxKontextMultiReferenceLatentMethod().run(None, cond, "uxo/uno")
    assert uno[0].option("reference_latents_method") == "uxo"
    offset = sampling.reference_tokens([a], "offset", 4, 4, "cpu", torch.float32)[1]
    index = sampling.reference_tokens([a], "index", 4, 4, "cpu", torch.float32)[1]
    assert torch.equal(offset, index)


@pytest.mark.parametrize(("size", "expected"), [((1024, 1024), (1024, 1024)), ((1920, 1080), (1392, 752)),
                                                ((700, 1500), (688, 1504)), ((600, 1400), (672, 1568)), ((64, 64), (1024, 1024))])
def test_kontext_image_scale_picks_comfyuis_training_size(size, expected):
    assert kontext_size(*size) == expected


def test_kontext_image_scale_node_resizes_with_lanczos_and_centre_crop():
    from ryla.graph.nodes.edit import FluxKontextImageScale

    image = torch.rand(1, 90, 160, 3)
    (out,) = FluxKontextImageScale().run(None, image)
    assert out.shape == (1, 752, 1392, 3)


def test_image_stitch_joins_as_comfyui_does():
    """comfy_extras/nodes_images.py ImageStitch (the Kontext template's first node)."""
    from ryla.graph.nodes.image import ImageStitch

    context = types.SimpleNamespace(check_pixels=lambda pixels: None)
    red = torch.zeros(1, 64, 64, 3)
    red[..., 0] = 1.0
    blue = torch.zeros(2, 32, 64, 3)
    blue[..., 2] = 1.0
    (right,) = ImageStitch().run(context, red, "right", True, 0, "white", blue)
    assert right.shape == (2, 64, 192, 3)  # image2 scaled to image1's height (64 x 128), batch evened
    assert right[1, :, :64, 0].min() == 1.0 and right[1, :, 70:, 2].min() > 0.99
    (up,) = ImageStitch().run(context, red, "up", False, 3, "green", blue)
    # padded to the wider (equal here), a 4-pixel green spacer (3 made even), image2 on top
    assert up.shape == (2, 32 + 4 + 64, 64, 3)
    assert up[0, 33, 10].tolist() == [0.0, 1.0, 0.0] and up[0, 0, 0, 2] == 1.0
    assert ImageStitch().run(context, red, "right", True, 0, "white")[0] is red


def test_kontext_images_equal_diffusers_kontext_pipeline_end_to_end(tmp_path):
    """bench/family_speed.py's CPU dry run: the whole Kontext image (reference encoded, 3 steps,
    decoded) from the engine and from diffusers' FluxKontextPipeline, same embeddings, sigmas
    and noise, in float32 on the tiny architecture."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    result = subprocess.run([sys.executable, str(root / "bench" / "family_speed.py"), "--tiny", "--kinds", "kontext",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    kontext = json.loads((tmp_path / "family_speed_tiny.json").read_text())["kinds"]["kontext"]
    assert kontext["ryla_eager"]["rel_l2_vs_stock"] < 1e-4


def test_flux_kontext_endpoint_edits_an_image_over_http(server):
    """POST /flux-kontext: the image is scaled to a Kontext size (a square: 1024x1024), used as
    the reference and the starting latent's size; the same seed gives the same image; an
    unknown LoRA is a 404 naming it; the image is required."""
    import base64
    import io

    import httpx
    from PIL import Image

    from conftest import image_difference

    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 40, 40)).save(buffer, format="PNG")
    body = {"prompt": "make it blue", "image": base64.b64encode(buffer.getvalue()).decode(), "steps": 1, "seed": 5,
            "output_format": "png"}
    first = httpx.post(server.url + "/flux-kontext", json=body, timeout=300)
    assert first.status_code == 200, first.text[:500]
    assert Image.open(io.BytesIO(first.content)).size == (1024, 1024)
    again = httpx.post(server.url + "/flux-kontext", json=body, timeout=300)
    assert image_difference(first.content, again.content) <= 2
    missing = httpx.post(server.url + "/flux-kontext", json={**body, "lora_id": "no-such-lora"}, timeout=60)
    assert missing.status_code == 404 and "no-such-lora" in missing.text
    no_image = httpx.post(server.url + "/flux-kontext", json={"prompt": "x"}, timeout=60)
    assert no_image.status_code == 422 and "image" in no_image.text


def test_a_reference_latent_on_a_fill_model_is_a_422_naming_the_node(runtime):
    """Through the executor, as /workflow runs it: the engine's refusal becomes a client error
    (incompatible_inputs) on the sampler node, not a server fault."""
    import io
    import json
    from pathlib import Path

    from PIL import Image

    from ryla.graph.executor import ExecutionError

    graph = json.loads((Path(__file__).parent / "workflows" / "flux_kontext_dev.json").read_text())
    graph["8"]["inputs"]["unet_name"] = FILL_TRANSFORMER
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="PNG")
    with pytest.raises(ExecutionError) as info:
        runtime.run(graph, runtime.context(request_images={"input.png": buffer.getvalue()}))
    error = info.value.user_error
    assert error is not None and error.type == "incompatible_inputs" and error.status == 422
    assert "node 17 (KSampler)" in error.message and "reference latents" in error.message


def test_canny_finds_the_edges_comfyui_finds(runtime):
    """ComfyUI's Canny node (comfy_extras/nodes_canny.py): kornia's detector on the image, the
    edge map repeated into three channels. A bright square on black has its outline as edges
    and nothing inside or outside; higher thresholds find no more than lower ones; a low
    threshold above the high one is the client's error."""
    from ryla.graph.executor import NodeUserError
    from ryla.graph.nodes.image import Canny

    image = torch.zeros(1, 48, 48, 3)
    image[:, 12:36, 12:36] = 0.9
    context = types.SimpleNamespace(engine=runtime.engine, current_node="18")
    (edges,) = Canny().run(context, image, 0.15, 0.3)
    assert edges.shape == (1, 48, 48, 3) and torch.equal(edges[..., 0], edges[..., 2])
    assert set(edges.unique().tolist()) == {0.0, 1.0}
    edge = edges[0, ..., 0]
    assert edge[11:13, 14:34].any(dim=0).all() and edge[14:34, 11:13].any(dim=1).all()  # the outline
    assert not edge[16:32, 16:32].any() and not edge[:8].any() and not edge[40:].any()
    (strict,) = Canny().run(context, image * 0.3, 0.4, 0.8)
    assert strict.sum() <= edges.sum()
    with pytest.raises(NodeUserError, match="low_threshold"):
        Canny().run(context, image, 0.8, 0.4)


def test_kontext_edits_from_the_cli_and_the_client_match_the_endpoint(server, cli_env, tmp_path):
    """`ryla generate --edit` (the Python API's Ryla.edit, in-process) and `ryla-client
    flux-kontext` (over HTTP) give /flux-kontext's image for the same seed; --edit refuses the
    options it cannot use together."""
    import base64
    import io
    import subprocess
    import sys

    import httpx
    from PIL import Image

    from conftest import image_difference

    photo = tmp_path / "photo.png"
    Image.new("RGB", (48, 40), (200, 40, 40)).save(photo)
    body = {"prompt": "make it blue", "image": base64.b64encode(photo.read_bytes()).decode(), "steps": 1, "seed": 5,
            "output_format": "png"}
    endpoint = httpx.post(server.url + "/flux-kontext", json=body, timeout=300)
    assert endpoint.status_code == 200, endpoint.text[:500]
    assert Image.open(io.BytesIO(endpoint.content)).size == (1104, 944)  # the Kontext size nearest 48:40

    def ryla(*args, module="ryla.cli.main"):
        return subprocess.run([sys.executable, "-m", module, *args], env=cli_env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)

    local = ryla("generate", "--edit", str(photo), "--prompt", "make it blue", "--steps", "1", "--seed", "5",
                 "-o", "local.png")
    assert local.returncode == 0, local.stderr[-2000:]
    client = ryla("--url", server.url, "flux-kontext", "--image", str(photo), "--prompt", "make it blue", "--steps",
                  "1", "--seed", "5", "-o", "client.png", module="ryla.cli.client")
    assert client.returncode == 0, client.stderr[-2000:]
    for name in ("local.png", "client.png"):
        assert image_difference((tmp_path / name).read_bytes(), endpoint.content) <= 2, name
    clash = ryla("generate", "--edit", str(photo), "--image", str(photo), "--prompt", "x")
    assert clash.returncode != 0 and "--edit cannot be combined with --image" in clash.stderr
