"""UI-format workflows (what ComfyUI's editor saves): converted to the API format as ComfyUI's
frontend converts them when it queues, then run. A hand-written graph covers each rule
(reroutes, primitives, muted and bypassed nodes, a subgraph, seeds' control_after_generate
value, LoadImage's upload value); Comfy-Org's own FLUX.1 templates, from the
comfyui-workflow-templates-json package, are converted and run on the tiny model."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from conftest import image_difference
from ryla.graph.executor import GraphValidationError


def node(node_id, kind, widgets=(), inputs=(), outputs=(), mode=0, title=None):
    entry = {"id": node_id, "type": kind, "mode": mode, "widgets_values": list(widgets),
             "inputs": [{"name": name, "type": t, "link": link, **({"widget": {"name": name}} if widget else {})}
                        for name, t, link, widget in inputs],
             "outputs": [{"name": name, "type": t, "links": links} for name, t, links in outputs]}
    if title:
        entry["title"] = title
    return entry


def ui_workflow() -> dict:
    """Text-to-image in the editor's format, with a Reroute on the model, a PrimitiveNode
    driving the width, a muted and a bypassed node, and the text encoding inside a subgraph
    whose prompt input is left unconnected (so its inner widget keeps its value)."""
    nodes = [
        node(4, "CheckpointLoaderSimple", ["flux1-dev-fp8.safetensors"],
             outputs=[("MODEL", "MODEL", [1]), ("CLIP", "CLIP", [2]), ("VAE", "VAE", [3])]),
        node(20, "Reroute", inputs=[("", "*", 1, False)], outputs=[("", "MODEL", [10])]),
        node(30, "PrimitiveNode", [80, "fixed"], outputs=[("INT", "INT", [11])], title="width"),
        node(5, "EmptySD3LatentImage", [512, 48, 1], inputs=[("width", "INT", 11, True)],
             outputs=[("LATENT", "LATENT", [12])]),
        # bypassed: its LATENT output passes its LATENT input through
        node(40, "LatentUpscaleBy", ["bislerp", 2.0], inputs=[("samples", "LATENT", 12, False)],
             outputs=[("LATENT", "LATENT", [13])], mode=4),
        node(50, "sub-encode", [], inputs=[("clip", "CLIP", 2, False), ("text", "STRING", None, True)],
             outputs=[("CONDITIONING", "CONDITIONING", [14, 15])]),
        node(3, "KSampler", [123, "randomize", 3, 1.0, "euler", "simple", 1.0],
             inputs=[("model", "MODEL", 10, False), ("positive", "CONDITIONING", 14, False),
                     ("negative", "CONDITIONING", 15, False), ("latent_image", "LATENT", 13, False)],
             outputs=[("LATENT", "LATENT", [16])]),
        node(8, "VAEDecode", inputs=[("samples", "LATENT", 16, False), ("vae", "VAE", 3, False)],
             outputs=[("IMAGE", "IMAGE", [17, 18])]),
        node(9, "SaveImage", ["ComfyUI"], inputs=[("images", "IMAGE", 17, False)]),
        node(60, "PreviewImage", inputs=[("images", "IMAGE", 18, False)], mode=2),  # muted: left out
        node(70, "MarkdownNote", ["# notes are ignored"]),
        node(80, "LoadImage", ["example.png", "image"], outputs=[("IMAGE", "IMAGE", []), ("MASK", "MASK", [])],
             mode=2),
    ]
    links = [[1, 4, 0, 20, 0, "MODEL"], [2, 4, 1, 50, 0, "CLIP"], [3, 4, 2, 8, 1, "VAE"], [10, 20, 0, 3, 0, "MODEL"],
             [11, 30, 0, 5, 0, "INT"], [12, 5, 0, 40, 0, "LATENT"], [13, 40, 0, 3, 3, "LATENT"],
             [14, 50, 0, 3, 1, "CONDITIONING"], [15, 50, 0, 3, 2, "CONDITIONING"], [16, 3, 0, 8, 0, "LATENT"],
             [17, 8, 0, 9, 0, "IMAGE"], [18, 8, 0, 60, 0, "IMAGE"]]
    subgraph = {
        "id": "sub-encode", "name": "Encode", "inputNode": {"id": -10}, "outputNode": {"id": -20},
        "inputs": [{"name": "clip", "type": "CLIP"}, {"name": "text", "type": "STRING"}],
        "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING"}],
        "nodes": [
            node(1, "CLIPTextEncode", ["a lighthouse at dusk"], inputs=[("clip", "CLIP", 101, False),
                                                                        ("text", "STRING", 102, True)],
                 outputs=[("CONDITIONING", "CONDITIONING", [103])]),
            node(2, "FluxGuidance", [3.5], inputs=[("conditioning", "CONDITIONING", 103, False)],
                 outputs=[("CONDITIONING", "CONDITIONING", [104])]),
        ],
        "links": [{"id": 101, "origin_id": -10, "origin_slot": 0, "target_id": 1, "target_slot": 0, "type": "CLIP"},
                  {"id": 102, "origin_id": -10, "origin_slot": 1, "target_id": 1, "target_slot": 1, "type": "STRING"},
                  {"id": 103, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0,
                   "type": "CONDITIONING"},
                  {"id": 104, "origin_id": 2, "origin_slot": 0, "target_id": -20, "target_slot": 0,
                   "type": "CONDITIONING"}],
    }
    return {"last_node_id": 80, "nodes": nodes, "links": links, "version": 0.4,
            "definitions": {"subgraphs": [subgraph]}}


EXPECTED = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-dev-fp8.safetensors"}},
    "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 80, "height": 48, "batch_size": 1}},
    "50:1": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["4", 1]}},
    "50:2": {"class_type": "FluxGuidance", "inputs": {"guidance": 3.5, "conditioning": ["50:1", 0]}},
    "3": {"class_type": "KSampler", "inputs": {
        "seed": 123, "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
        "model": ["4", 0], "positive": ["50:2", 0], "negative": ["50:2", 0], "latent_image": ["5", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def test_conversion_follows_comfyuis_frontend(runtime):
    api = runtime.executor.from_ui_format(ui_workflow())
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()} == EXPECTED
    assert api["4"]["_meta"]["title"] == "Load Checkpoint"


def test_a_converted_workflow_runs_and_equals_its_api_form(runtime):
    from_ui = runtime.run(ui_workflow()).images[0]
    from_api = runtime.run(EXPECTED).images[0]
    assert from_ui.size == (80, 48) and from_ui.tobytes() == from_api.tobytes()


def test_files_saved_before_control_after_generate_existed():
    """Older files have no control value after the seed; the values still land by name."""
    from ryla.graph.nodes import default_registry
    from ryla.graph.ui_format import to_api_format

    workflow = {"nodes": [node(1, "RandomNoise", [42]), node(2, "KSamplerSelect", ["heun"])], "links": []}
    api = to_api_format(workflow, default_registry())
    assert api["1"]["inputs"] == {"noise_seed": 42} and api["2"]["inputs"] == {"sampler_name": "heun"}


def test_unknown_node_types_are_listed_at_once(runtime):
    workflow = ui_workflow()
    workflow["nodes"].append(node(90, "DownloadAndLoadFlorence2Model", ["base"]))  # custom node packs' nodes
    workflow["definitions"]["subgraphs"][0]["nodes"].append(node(9, "SUPIR_Upscale", []))
    with pytest.raises(GraphValidationError) as info:
        runtime.executor.validate(workflow, runtime.context())
    error = info.value.body["error"]
    assert error["extra_info"]["unknown_node_types"] == ["DownloadAndLoadFlorence2Model", "SUPIR_Upscale"]
    assert "#50:9" in error["details"] and "#90" in error["details"]


def test_ui_format_through_http_and_a_png_that_carries_it(server, tmp_path, cli_env):
    """/workflow and ComfyUI's /prompt take the editor's file; the PNG ryla saves carries the
    API graph and the editor's file, and `ryla run-workflow` runs that PNG to the same image."""
    workflow = ui_workflow()
    r = httpx.post(server.url + "/workflow", json=workflow, timeout=120)
    assert r.status_code == 200, r.text
    direct = r.content
    r = httpx.post(server.url + "/prompt", json={"prompt": workflow, "client_id": "ui-test"}, timeout=30)
    assert r.status_code == 200, r.text
    prompt_id = r.json()["prompt_id"]
    for _ in range(240):
        history = httpx.get(f"{server.url}/history/{prompt_id}", timeout=10).json()
        if prompt_id in history and history[prompt_id]["status"]["completed"]:
            break
        import time
        time.sleep(0.5)
    entry = history[prompt_id]
    assert entry["prompt"][2]["3"]["class_type"] == "KSampler"  # history holds the API graph
    image = entry["outputs"]["9"]["images"][0]
    png = httpx.get(f"{server.url}/view", params=image, timeout=10).content
    chunks = Image.open(io.BytesIO(png)).text
    assert json.loads(chunks["prompt"])["50:1"]["class_type"] == "CLIPTextEncode"
    assert json.loads(chunks["workflow"])["nodes"][0]["type"] == "CheckpointLoaderSimple"
    saved = tmp_path / "saved.png"
    saved.write_bytes(png)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "ryla.cli.main", "run-workflow", str(saved), "--output-dir",
                             str(out)], env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (rerun,) = out.glob("ComfyUI_*.png")
    assert image_difference(rerun.read_bytes(), direct) <= 2  # conftest: server runs to within 2 levels
    # a PNG with only the editor's file (no API chunk) is converted
    info = PngImagePlugin.PngInfo()
    info.add_text("workflow", json.dumps(workflow))
    only_ui = tmp_path / "only-ui.png"
    Image.new("RGB", (8, 8)).save(only_ui, pnginfo=info)
    converted = subprocess.run([sys.executable, "-m", "ryla.cli.main", "convert-workflow", str(only_ui)],
                               env=cli_env, capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, converted.stderr
    assert json.loads(converted.stdout)["3"]["inputs"]["seed"] == 123
    # ryla-client sends the editor's file as it is; the server converts it
    ui_file = tmp_path / "ui.json"
    ui_file.write_text(json.dumps(workflow))
    client = subprocess.run([sys.executable, "-m", "ryla.cli.client", "--url", server.url, "workflow", str(ui_file),
                             "--output-dir", str(tmp_path / "client")], env=cli_env, capture_output=True, text=True,
                            timeout=300)
    assert client.returncode == 0, client.stderr
    (from_client,) = (tmp_path / "client").glob("*.png")
    assert image_difference(from_client.read_bytes(), direct) <= 2


# ------------------------------------------------------------------ Comfy-Org's FLUX.1 templates

def templates_dir() -> Path:
    templates = pytest.importorskip("comfyui_workflow_templates_json")
    return Path(templates.__file__).parent / "templates"


# Each FLUX.1 template, and what happens to it here (the list in docs/workflows.md).
FLUX1_TEMPLATES = {
    "flux_dev_checkpoint_example": "runs",
    "flux_dev_full_text_to_image": "runs",
    "flux1_krea_dev": "runs",
    "flux_schnell": "runs",
    "flux_schnell_full_text_to_image": "runs",
    "flux_fill_inpaint_example": "runs",
    "flux_fill_outpaint_example": "runs",
    "image_flux.1_fill_dev_OneReward": "runs",
    "flux_canny_model_example": "runs",
    "flux_depth_lora_example": ["LotusConditioning", "SetFirstSigma"],
    "flux_kontext_dev_basic": "runs",
    "flux_redux_model_example": "runs",
    "flux1_dev_uso_reference_image_gen": ["ImageScaleToMaxDimension", "ModelPatchLoader"],
}


def test_every_flux1_template_is_accounted_for():
    names = {path.stem for path in templates_dir().glob("*.json")
             if path.stem.startswith(("flux_", "flux1", "image_flux.1"))}
    assert names == set(FLUX1_TEMPLATES)


@pytest.mark.parametrize("name", sorted(FLUX1_TEMPLATES))
def test_flux1_templates_convert(runtime, name):
    workflow = json.loads((templates_dir() / f"{name}.json").read_text())
    expected = FLUX1_TEMPLATES[name]
    if expected == "runs":
        api = runtime.executor.from_ui_format(workflow)
        assert any(entry["class_type"] in ("SaveImage", "PreviewImage") for entry in api.values())
    else:
        with pytest.raises(GraphValidationError) as info:
            runtime.executor.from_ui_format(workflow)
        assert info.value.body["error"]["extra_info"]["unknown_node_types"] == expected


def shrink(workflow: dict) -> dict:
    """The template with a 64-pixel latent and two steps, edited in the UI file as a user would
    in the editor (the CPU here would need minutes for 1024x1024 x 20 steps)."""
    def visit(nodes):
        for entry in nodes:
            values = entry.get("widgets_values")
            if entry.get("type") in ("EmptySD3LatentImage", "EmptyLatentImage") and values:
                values[0], values[1] = 64, 64
            if entry.get("type") == "KSampler" and values:
                values[2] = 2
            if entry.get("type") == "PrimitiveNode" and entry.get("title") in ("width", "height"):
                values[0] = 64
    visit(workflow["nodes"])
    for sub in (workflow.get("definitions") or {}).get("subgraphs") or []:
        visit(sub["nodes"])
    return workflow


@pytest.fixture(scope="module")
def template_models(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model set under the file names the templates load (a copy of links): the
    tiny set's own schnell, Kontext, Fill and scaled-fp8 files where it has them (OneReward's
    Fill transformer is a Fill), links to dev's otherwise."""
    root = tmp_path_factory.mktemp("template-models")
    shutil.copytree(tiny_dir, root, symlinks=False, dirs_exist_ok=True, copy_function=os.link)
    names = {"diffusion_models": ["flux1-krea-dev_fp8_scaled.safetensors", "flux1-schnell.safetensors",
                                  "flux.1-fill-dev-OneReward-transformer_fp8.safetensors",
                                  "flux1-fill-dev.safetensors"],
             "checkpoints": ["flux1-schnell-fp8.safetensors"],
             "text_encoders": ["t5xxl_fp8_e4m3fn_scaled.safetensors"],
             "loras": []}
    sources = {"diffusion_models": "flux1-dev.safetensors", "checkpoints": "flux1-dev-fp8.safetensors",
               "text_encoders": "t5xxl_fp16.safetensors"}
    for folder, files in names.items():
        for file in files:
            if not (root / folder / file).exists():
                source = "flux1-fill-dev.safetensors" if "fill" in file else sources[folder]
                os.link(root / folder / source, root / folder / file)
    return root


def test_runnable_flux1_templates_run_with_ryla_run_workflow(template_models, tiny_store, tmp_path, cli_env):
    import lora_files

    # a LoRA that fits the tiny model, under the name the OneReward template loads (LoRAs live
    # in the user's store beside the tiny set)
    loras = Path(cli_env["RYLA_MODELS_DIR"]) / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    lora_files.write(lora_files.make_lora(tiny_store, 3), "comfyui", loras / "removal_timestep_alpha-2-1740.safetensors")
    image = tmp_path / "photo.png"
    y, x = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)).save(image)
    env = {**cli_env, "RYLA_TINY_MODELS_DIR": str(template_models)}
    names = sorted(n for n, result in FLUX1_TEMPLATES.items() if result == "runs")
    loads = set()
    for name in names:
        workflow = shrink(json.loads((templates_dir() / f"{name}.json").read_text()))
        (tmp_path / f"{name}.json").write_text(json.dumps(workflow))
        loads |= {entry["widgets_values"][0] for sub in [workflow] + workflow.get("definitions", {}).get("subgraphs", [])
                  for entry in sub["nodes"] if entry["type"] == "LoadImage"}
    args = [arg for load in sorted(loads) for arg in ("--image", f"{load}={image}")]
    # all in one process (run-workflow takes several files; each one's images in out/<name>/)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "ryla.cli.main", "run-workflow",
                             *(str(tmp_path / f"{name}.json") for name in names), "--output-dir", str(out), *args],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in names:
        assert list((out / name).glob("*.png")), name
