"""Workflows shaped as ComfyUI's example pages build them (tests/workflows/*.json, API format as
ComfyUI exports it, on FLUX's split loaders): image-to-image, both inpainting graphs,
outpainting, the two-pass "hires fix", SamplerCustomAdvanced, KSamplerAdvanced in two passes,
CLIPTextEncodeFlux, and the image, mask, latent, conditioning and sigma tools; and the FLUX.1
family's: Kontext (a published RunningHub export of ComfyUI's Kontext dev graph: ReferenceLatent
on the encoded image, which is also the sampled latent), Fill (InpaintModelConditioning with
DifferentialDiffusion, guidance 30) and Depth (InstructPixToPixConditioning, guidance 10). Each runs on the
tiny model in-process, through POST /workflow and through `ryla run-workflow`; then the
properties ComfyUI's own arithmetic gives (denoise 1 img2img is text-to-image, denoise 0 is
the VAE round trip, a zero mask keeps the latent, two KSamplerAdvanced passes are one run)."""

from __future__ import annotations

import base64
import copy
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from ryla import catalogue
from ryla.graph.executor import RunContext
from conftest import image_difference

WORKFLOWS = Path(__file__).parent / "workflows"
NAMES = sorted(path.stem for path in WORKFLOWS.glob("*.json"))


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    """A 64x64 photo-like gradient, the same with a transparent square (LoadImage's mask), and
    a white-on-black mask."""
    y, x = np.mgrid[0:64, 0:64]
    rgb = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[16:40, 20:44] = 0
    mask = np.zeros((64, 64), np.uint8)
    mask[16:40, 20:44] = 255
    return {"input.png": png(Image.fromarray(rgb)),
            "input_with_alpha.png": png(Image.fromarray(np.dstack([rgb, alpha]), "RGBA")),
            "mask.png": png(Image.fromarray(np.stack([mask] * 3, axis=-1)))}


def run(runtime, graph: dict, images: dict[str, bytes]):
    return runtime.run(graph, runtime.context(request_images=images))


@pytest.mark.parametrize("name", NAMES)
def test_each_workflow_runs_in_process(runtime, images, name):
    result = run(runtime, load(name), images)
    assert result.images, name
    saved = [image for image, prefix in zip(result.images, result.prefixes) if prefix.startswith("ComfyUI_")]
    assert saved and all(image.size[0] >= 64 for image in saved)


def test_each_workflow_runs_through_http_and_the_cli(server, images, tmp_path, cli_env):
    sent = {name: base64.b64encode(data).decode() for name, data in images.items()}
    for name in NAMES:
        r = httpx.post(server.url + "/workflow", json={"prompt": load(name), "images": sent},
                       headers={"Accept": "application/json"}, timeout=300)
        assert r.status_code == 200, (name, r.text[:500])
        returned = [Image.open(io.BytesIO(base64.b64decode(item["data"]))) for item in r.json()["images"]]
        assert returned and all(image.size[0] >= 64 for image in returned), name
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    image_args = [arg for name in images for arg in ("--image", f"{name}={tmp_path / name}")]
    # one process for all (`ryla run-workflow` takes several files): each start costs a torch import
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "ryla.cli.main", "run-workflow",
                             *(str(WORKFLOWS / f"{name}.json") for name in NAMES), "--output-dir", str(out),
                             *image_args], env=cli_env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in NAMES:
        assert list((out / name).glob("ComfyUI_*.png")), name


def test_output_sizes_follow_comfyuis_arithmetic(runtime, images):
    sizes = {name: [image.size for image in run(runtime, load(name), images).images] for name in NAMES}
    assert sizes["img2img"] == [(64, 64)]
    assert sizes["outpaint"] == [(96, 72)]  # 16 + 64 + 16 wide, 64 + 8 high
    assert sizes["hires_fix"] == [(144, 120)]  # 96x80 latent-upscaled, then 1.5x
    assert sizes["sampler_custom_advanced"] == [(80, 64)]
    assert sizes["clip_text_encode_flux"] == [(72, 56), (72, 56)]
    # SaveImage's decoded batch of 2 (RepeatLatentBatch), then the preview: the mask resized and
    # padded to 80x48, then scaled to 0.01 MP: sqrt(10485.76 / 3840) * (80, 48) rounds to (132, 79)
    assert sizes["image_and_mask_tools"] == [(64, 64), (64, 64), (132, 79)]
    assert sizes["area_conditioning_dual_cfg"] == [(128, 64)]


def test_denoise_one_img2img_is_text_to_image_with_the_same_seed(runtime, images):
    img2img = load("img2img")
    img2img["3"]["inputs"]["denoise"] = 1.0
    text = copy.deepcopy(img2img)
    text["21"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    assert run(runtime, img2img, images).images[0].tobytes() == run(runtime, text, images).images[0].tobytes()


def test_denoise_zero_returns_the_inputs_vae_round_trip(runtime, images):
    img2img = load("img2img")
    img2img["3"]["inputs"]["denoise"] = 0.0
    round_trip = copy.deepcopy(img2img)
    round_trip["8"]["inputs"]["samples"] = ["21", 0]
    del round_trip["3"]
    out = run(runtime, img2img, images).images[0]
    assert out.tobytes() == run(runtime, round_trip, images).images[0].tobytes()
    assert out.tobytes() != Image.open(io.BytesIO(images["input.png"])).tobytes()  # the VAE changed it


def test_a_mask_of_zeros_leaves_the_latent_unchanged(runtime, images):
    graph = load("img2img")
    graph["40"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
    graph["41"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["21", 0], "mask": ["40", 0]}}
    graph["3"]["inputs"].update(latent_image=["41", 0], denoise=1.0)
    for sampler in ("euler", "dpmpp_2m", "euler_ancestral"):
        graph["3"]["inputs"]["sampler_name"] = sampler
        sampled = np.asarray(run(runtime, graph, images).images[0], dtype=np.int16)
        round_trip = copy.deepcopy(graph)
        round_trip["8"]["inputs"]["samples"] = ["21", 0]
        expected = np.asarray(run(runtime, round_trip, images).images[0], dtype=np.int16)
        assert np.abs(sampled - expected).max() <= 1, sampler  # float rounding of the last step only


def test_the_noise_mask_limits_what_changes_in_the_latent(runtime, images):
    """Outside the latent's noise mask the sampled latent is the input latent (KSamplerX0Inpaint
    puts it back at every step); inside it changes. Checked on latents: the tiny VAE's attention
    spreads any change over the whole decoded image."""
    from ryla.flux import sampling
    from ryla.graph.nodes.sampling import KSampler

    model, clip, vae = runtime.engine.load_checkpoint("flux1-dev-fp8.safetensors")
    pixels = torch.from_numpy(np.asarray(Image.open(io.BytesIO(images["input.png"])), dtype=np.float32) / 255)[None]
    latent = runtime.engine.encode_image(vae, pixels)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 24:56] = 1.0  # latent rows 2..5, columns 3..6
    cond = (runtime.engine.encode(clip, "a red door"),)
    for sampler in ("euler", "dpmpp_2m_sde", "lcm"):
        out = KSampler().run(runtime.context(), model, 7, 4, 1.0, sampler, "simple", cond, cond,
                             {"samples": latent, "noise_mask": mask}, 1.0)[0]["samples"]
        outside = sampling.latent_mask(mask, latent.shape) == 0
        assert torch.allclose(out[outside], latent[outside], atol=1e-4), sampler
        assert (out[~outside] - latent[~outside]).abs().mean() > 0.05, sampler


def test_two_ksampler_advanced_passes_equal_one_ksampler(runtime, images):
    two_pass = load("ksampler_advanced_two_pass")
    one = copy.deepcopy(two_pass)
    one["41"] = {"class_type": "KSampler", "inputs": {
        "seed": 42, "steps": 6, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
        "model": ["10", 0], "positive": ["26", 0], "negative": ["33", 0], "latent_image": ["5", 0]}}
    del one["40"]
    a = np.asarray(run(runtime, two_pass, images).images[0], dtype=np.int16)
    b = np.asarray(run(runtime, one, images).images[0], dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # the leftover-noise latent's trip through VAE space rounds


def test_latent_from_batch_keeps_each_images_noise(runtime, images):
    """LatentFromBatch's batch_index: image 2 of a batch of 3, sampled alone, is the same image
    (ComfyUI's prepare_noise draws the noise of every position before it)."""
    graph = load("clip_text_encode_flux")
    graph["5"]["inputs"]["batch_size"] = 3
    batch = run(runtime, graph, images).images
    graph["90"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["5", 0], "batch_index": 2, "length": 1}}
    graph["3"]["inputs"]["latent_image"] = ["90", 0]
    alone = run(runtime, graph, images).images
    assert len(alone) == 1 and alone[0].tobytes() == batch[2].tobytes()


@pytest.mark.parametrize("sampler", catalogue.SAMPLER.choices)
def test_sampler_custom_advanced_runs_every_sampler(runtime, images, sampler):
    graph = load("sampler_custom_advanced")
    graph["16"]["inputs"]["sampler_name"] = sampler
    assert run(runtime, graph, images).images[0].size == (80, 64)


@pytest.mark.parametrize("scheduler", catalogue.SCHEDULER.choices)
def test_sampler_custom_advanced_runs_every_scheduler(runtime, images, scheduler):
    graph = load("sampler_custom_advanced")
    graph["17"]["inputs"]["scheduler"] = scheduler
    graph["16"]["inputs"]["sampler_name"] = "dpmpp_2m"
    assert run(runtime, graph, images).images[0].size == (80, 64)


def test_comfyuis_bounds_not_the_typed_endpoints(runtime, images):
    """Values ComfyUI accepts and ryla's typed endpoints refuse: a width of 1080 (not a multiple
    of 16: the odd latent is padded to whole patches, as ComfyUI's FLUX model does), 150 steps,
    a batch of 8, a LoRA strength outside ±4, a long prompt."""
    graph = load("clip_text_encode_flux")
    graph["5"]["inputs"].update(width=1080, height=40, batch_size=1)
    graph["3"]["inputs"]["steps"] = 1
    assert run(runtime, graph, images).images[0].size == (1080, 40)
    graph["5"]["inputs"].update(width=40, height=40, batch_size=8)
    graph["3"]["inputs"]["steps"] = 150
    graph["6"]["inputs"]["t5xxl"] = "a very long prompt " * 1000
    runtime.executor.validate(graph, runtime.context())  # validates; running 150 steps x 8 is slow here
    graph["3"]["inputs"]["steps"] = 1
    assert len(run(runtime, graph, images).images) == 8


def test_runtime_size_limits_name_the_limit(runtime, images):
    from ryla.graph.executor import ExecutionError, Limits

    graph = load("hires_fix")
    graph["30"]["inputs"]["scale_by"] = 8.0
    context = runtime.context(request_images=images)
    context.limits = Limits(max_pixels=64 * 64 * 30)  # the first passes fit, the 8x upscale does not
    with pytest.raises(ExecutionError) as info:
        runtime.run(graph, context)
    assert info.value.user_error is not None and info.value.user_error.type == "limit_exceeded"
    assert "max_pixels" in str(info.value.user_error) and info.value.node_id == "30"


def test_every_node_in_the_corpus_is_used(runtime):
    """The corpus exercises every node this issue added (a new node without a workflow using it
    fails here)."""
    used = {node["class_type"] for name in NAMES for node in load(name).values()}
    added = {"VAEEncode", "VAEEncodeForInpaint", "SetLatentNoiseMask", "InpaintModelConditioning",
             "DifferentialDiffusion", "LoadImageMask", "ImageToMask", "MaskToImage", "InvertMask", "GrowMask",
             "SolidMask", "ImageScale", "ImageScaleBy", "ImageScaleToTotalPixels", "ImageCrop", "ImageInvert",
             "ImagePadForOutpaint", "ResizeAndPadImage", "LatentUpscale", "LatentUpscaleBy", "LatentCrop",
             "LatentComposite", "RepeatLatentBatch", "ImageBatch", "LatentFromBatch", "CLIPTextEncodeFlux",
             "ConditioningZeroOut", "ConditioningSetTimestepRange", "ConditioningAverage", "ConditioningConcat",
             "CFGGuider", "KSamplerAdvanced", "SamplerCustom", "DisableNoise", "SplitSigmas", "SplitSigmasDenoise",
             "KarrasScheduler", "BetaSamplingScheduler", "SamplerEulerAncestral", "SamplerDPMPP_2M_SDE",
             "ConditioningSetArea", "ConditioningSetAreaPercentage", "ConditioningSetAreaStrength", "DualCFGGuider"}
    assert added - used == set()
    assert added <= set(runtime.registry.classes)


# ------------------------------------------------------------------ image input on the typed endpoints

TYPED = {"prompt": "a lighthouse", "steps": 3, "seed": 11, "output_format": "png"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_flux_dev_image_to_image_and_inpainting(server, images):
    url = server.url + "/flux-dev"
    photo = b64(images["input.png"])
    text = httpx.post(url, json={**TYPED, "width": 64, "height": 64}, timeout=120)
    full = httpx.post(url, json={**TYPED, "image": photo, "strength": 1.0}, timeout=120)
    assert full.status_code == 200, full.text
    assert image_difference(full.content, text.content) <= 2  # strength 1: only its size
    partial = httpx.post(url, json={**TYPED, "image": "data:image/png;base64," + photo, "strength": 0.5}, timeout=120)
    assert partial.status_code == 200 and Image.open(io.BytesIO(partial.content)).size == (64, 64)
    assert partial.content != text.content
    kept = httpx.post(url, json={**TYPED, "image": photo, "strength": 0.0}, timeout=120)
    black = b64(png(Image.new("L", (32, 32))))  # a mask of any size, nothing to redraw
    masked = httpx.post(url, json={**TYPED, "image": photo, "mask": black, "strength": 1.0}, timeout=120)
    assert masked.status_code == 200, masked.text
    difference = np.abs(np.asarray(Image.open(io.BytesIO(masked.content)), dtype=np.int16)
                        - np.asarray(Image.open(io.BytesIO(kept.content)), dtype=np.int16))
    assert difference.max() <= 1  # the latent kept everywhere: the VAE round trip
    inpainted = httpx.post(url, json={**TYPED, "image": photo, "mask": b64(images["mask.png"]), "num_images": 2},
                           headers={"Accept": "application/json"}, timeout=120)
    assert inpainted.status_code == 200 and len(inpainted.json()["images"]) == 2
    first, second = (base64.b64decode(item["data"]) for item in inpainted.json()["images"])
    assert first != second  # each image of the batch has its own noise


@pytest.mark.parametrize("extra,status,field", [
    ({"mask": "AAAA"}, 422, "mask"),
    ({"strength": 0.5}, 422, "strength"),
    ({"image": "IMAGE", "width": 512}, 422, "width"),
    ({"image": "SMALL"}, 422, "image"),
    ({"image": "not an image"}, 422, "image"),
    ({"image": "IMAGE", "strength": 1.5}, 422, "strength"),
])
def test_image_input_errors_name_the_field(server, images, extra, status, field):
    substitutes = {"IMAGE": b64(images["input.png"]), "SMALL": b64(png(Image.new("RGB", (40, 40))))}
    body = {**TYPED, **{k: substitutes.get(v, v) for k, v in extra.items()}}
    r = httpx.post(server.url + "/flux-dev", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert field in r.text


def test_generate_and_client_take_an_image_and_a_mask(server, images, tmp_path, cli_env):
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "edit.png"
    result = subprocess.run([sys.executable, "-m", "ryla.cli.main", "generate", "--prompt", "a red door", "--steps", "2",
                             "--image", str(tmp_path / "input.png"), "--mask", str(tmp_path / "mask.png"),
                             "--strength", "0.9", "-o", str(out)], env=cli_env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (64, 64)
    refused = subprocess.run([sys.executable, "-m", "ryla.cli.main", "generate", "--prompt", "a red door", "--mask",
                              str(tmp_path / "mask.png")], env=cli_env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--mask applies only with --image" in refused.stderr
    client_out = tmp_path / "client.png"
    result = subprocess.run([sys.executable, "-m", "ryla.cli.client", "--url", server.url, "flux-dev", "--prompt", "a red door",
                             "--steps", "2", "--image", str(tmp_path / "input.png"), "--strength", "0.6",
                             "-o", str(client_out)], env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert Image.open(client_out).size == (64, 64)


def test_the_docs_node_table_lists_every_node(runtime):
    text = (Path(__file__).parents[1] / "docs" / "workflows.md").read_text()
    table = text[text.index("## Supported nodes"):text.index("## Workflows as ComfyUI")]
    missing = [name for name in runtime.registry.classes if name not in table]
    assert missing == []
    # ComfyUI's documentation for each of its own nodes (the identity nodes are ryla's; the GGUF
    # loaders link to city96's node pack)
    for name in runtime.registry.classes:
        if "GGUF" in name:
            assert "(https://github.com/city96/ComfyUI-GGUF)" in table
        elif not name.startswith(("InstantID", "ApplyInstantID")):
            assert f"(https://docs.comfy.org/built-in-nodes/{name})" in table, name


def test_dual_cfg_guider_reduces_to_comfyuis_simpler_guiders(runtime, images):
    """With its weights at 1 DualCFGGuider computes only cond1 (BasicGuider's image); with
    cfg_cond2_negative 1 it is CFG between cond1 and cond2 (CFGGuider's image, same bytes)."""
    graph = load("area_conditioning_dual_cfg")
    graph["26"]["inputs"].update(cond1=["6", 0], cfg_conds=1.0, cfg_cond2_negative=1.0)
    basic = copy.deepcopy(graph)
    basic["26"] = {"class_type": "BasicGuider", "inputs": {"model": ["10", 0], "conditioning": ["6", 0]}}
    assert run(runtime, graph, images).images[0].tobytes() == run(runtime, basic, images).images[0].tobytes()
    graph["26"]["inputs"]["cfg_conds"] = 2.5
    cfg = copy.deepcopy(graph)
    cfg["26"] = {"class_type": "CFGGuider", "inputs": {"model": ["10", 0], "positive": ["6", 0],
                                                        "negative": ["13", 0], "cfg": 2.5}}
    assert run(runtime, graph, images).images[0].tobytes() == run(runtime, cfg, images).images[0].tobytes()
    # nested with cfg_conds 1 is CFG between cond1 and the negative (to rounding)
    graph["26"]["inputs"].update(cfg_conds=1.0, cfg_cond2_negative=2.0, style="nested")
    cfg["26"]["inputs"].update(negative=["25", 0], cfg=2.0)
    nested = np.asarray(run(runtime, graph, images).images[0], dtype=np.int16)
    plain = np.asarray(run(runtime, cfg, images).images[0], dtype=np.int16)
    assert np.abs(nested - plain).max() <= 1


def test_area_conditioning_is_comfyuis(runtime, images):
    """An area over the whole image at strength 1 is the plain conditioning (same bytes); two
    half areas give another image; the weights are get_area_and_mult's."""
    from ryla.flux.engine import _area_box, _area_weights

    graph = load("area_conditioning_dual_cfg")
    graph["26"] = {"class_type": "BasicGuider", "inputs": {"model": ["10", 0], "conditioning": ["20", 0]}}
    graph["20"]["inputs"].update(width=128, height=64)
    whole = run(runtime, graph, images).images[0].tobytes()
    graph["26"]["inputs"]["conditioning"] = ["6", 0]
    assert whole == run(runtime, graph, images).images[0].tobytes()
    graph["20"]["inputs"]["width"] = 64
    graph["26"]["inputs"]["conditioning"] = ["23", 0]
    assert run(runtime, graph, images).images[0].tobytes() != whole
    # regions in latent units, clipped; the percentage form resolved against the latent
    assert _area_box((8, 6, 0, 0), 8, 12) == (0, 0, 8, 6)
    assert _area_box(("percentage", 1.0, 0.5, 0.0, 0.5), 8, 12) == (0, 6, 8, 12)
    assert _area_box((20, 20, 4, 4), 8, 12) == (4, 4, 8, 12)
    # feathered on inner edges only: a region at the left border fades towards its right side
    mult = _area_weights((1, 1, 8, 10), (0, 0, 8, 10), 8, 12, 1.5, "cpu")
    assert mult[0, 0, 0, 0] == 1.5 and mult[0, 0, 0, 9] == 1.5 * (1 / 8)
    assert torch.allclose(mult[0, 0, 0, :], 1.5 * torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 1, 1]) *
                          torch.tensor([1, 1, 8 / 8, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]))


def test_flux_dev_inpainting_moves_to_flux_fill_when_it_is_installed(server, images, runtime, tiny_dir, tmp_path):
    """With flux1-fill-dev.safetensors in the store (the tiny set has it) /flux-dev's mask runs
    ComfyUI's Fill example graph: Fill's transformer through DifferentialDiffusion,
    InpaintModelConditioning, guidance 30 unless the request gives one. The image says so in
    its parameters and is the one that graph gives run directly; image-to-image without a mask,
    and a store without Fill, stay on FLUX.1-dev."""
    from ryla import imaging
    from ryla.pipeline import Ryla
    from ryla.workflows import FILL_GUIDANCE, FLUX_DEV, with_fill_inpainting, with_image_input

    url = server.url + "/flux-dev"
    body = {**TYPED, "image": b64(images["input.png"]), "mask": b64(images["mask.png"]), "strength": 1.0}
    fill = httpx.post(url, json=body, timeout=120)
    assert fill.status_code == 200, fill.text
    parameters = imaging.read_parameters(fill.content)
    assert parameters["model"].startswith("flux1-fill-dev.safetensors") and parameters["guidance"] == FILL_GUIDANCE
    graph = with_fill_inpainting(with_image_input(FLUX_DEV.fill(prompt="a lighthouse", steps=3, seed=11, width=64,
                                                                height=64), 1.0, 64, 64, mask=True), "flux1-fill-dev.safetensors")
    assert {node["class_type"] for node in graph.values()} >= {"UNETLoader", "DifferentialDiffusion",
                                                               "InpaintModelConditioning"}
    assert "SetLatentNoiseMask" not in {node["class_type"] for node in graph.values()}
    direct = run(runtime, graph, {"image": images["input.png"], "mask": images["mask.png"]}).images[0]
    assert image_difference(fill.content, png(direct)) <= 2
    guided = httpx.post(url, json={**body, "guidance": 5.0}, timeout=120)
    assert imaging.read_parameters(guided.content)["guidance"] == 5.0 and guided.content != fill.content
    plain = httpx.post(url, json={**TYPED, "image": b64(images["input.png"]), "strength": 0.5}, timeout=120)
    assert imaging.read_parameters(plain.content)["model"].startswith("flux1-dev-fp8.safetensors")
    # a store without Fill: the mask stays on FLUX.1-dev (SetLatentNoiseMask), guidance 3.5
    store = tmp_path / "no-fill"
    shutil.copytree(tiny_dir, store)
    (store / "diffusion_models" / "flux1-fill-dev.safetensors").unlink()
    (tmp_path / "input.png").write_bytes(images["input.png"])
    (tmp_path / "mask.png").write_bytes(images["mask.png"])
    without = Ryla(store).generate("a lighthouse", image=tmp_path / "input.png", mask=tmp_path / "mask.png", steps=1,
                                   seed=3)
    assert without.parameters["model"].startswith("flux1-dev-fp8") and without.parameters["guidance"] == 3.5
