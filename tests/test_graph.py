"""The ComfyUI-format executor: validation errors in ComfyUI's shape, execution semantics."""

from __future__ import annotations

import copy

import pytest
import torch

from ryla.graph.executor import GraphValidationError
from ryla.workflows import FLUX_DEV

SMALL = dict(prompt="a red fox in the snow", width=64, height=64, steps=3, seed=7)


def small_graph(**overrides):
    return FLUX_DEV.fill(**{**SMALL, **overrides})


class CountingEngine:
    """Wraps the real engine and counts calls: proves that an invalid graph runs nothing."""

    def __init__(self, engine):
        self._engine, self.calls = engine, 0
        self.store = engine.store

    def __getattr__(self, name):
        attr = getattr(self._engine, name)
        if callable(attr):
            def counted(*args, **kwargs):
                self.calls += 1
                return attr(*args, **kwargs)
            return counted
        return attr


def validation_error(runtime, graph) -> dict:
    engine = CountingEngine(runtime.engine)
    context = runtime.context()
    context.engine = engine
    with pytest.raises(GraphValidationError) as info:
        runtime.executor.run(graph, context)
    assert engine.calls == 0, "an invalid graph must not run any node"
    return info.value.body


def node_error_types(body: dict, node_id: str) -> list[str]:
    return [e["type"] for e in body["node_errors"][node_id]["errors"]]


def test_template_runs_and_images_have_the_requested_size(runtime, caplog):
    with caplog.at_level("INFO", logger="ryla.runtime"):
        graph = small_graph(width=96, height=64, batch_size=2)
        result = runtime.run(graph)
    assert [im.size for im in result.images] == [(96, 64), (96, 64)]
    # the log line names where the time went, slowest node first
    done = [r.getMessage() for r in caplog.records if "workflow done" in r.getMessage()][-1]
    slowest = max(result.node_seconds, key=result.node_seconds.get)
    assert f"({graph[slowest]['class_type']} #{slowest} {result.node_seconds[slowest]:.2f}s" in done
    assert "KSampler #7 " in done


@pytest.mark.parametrize("mutate,node_id,error_type", [
    (lambda g: g["7"]["inputs"].pop("steps"), "7", "required_input_missing"),
    (lambda g: g["7"]["inputs"].__setitem__("positive", ["3"]), "7", "bad_linked_input"),
    (lambda g: g["7"]["inputs"].__setitem__("positive", ["42", 0]), "7", "bad_linked_input"),
    (lambda g: g["7"]["inputs"].__setitem__("positive", ["5", 0]), "7", "return_type_mismatch"),
    (lambda g: g["7"]["inputs"].__setitem__("steps", "many"), "7", "invalid_input_type"),
    (lambda g: g["7"]["inputs"].__setitem__("steps", 0), "7", "value_smaller_than_min"),
    (lambda g: g["7"]["inputs"].__setitem__("cfg", 1000.0), "7", "value_bigger_than_max"),
    (lambda g: g["7"]["inputs"].__setitem__("sampler_name", "lms"), "7", "value_not_in_list"),
    (lambda g: g["7"]["inputs"].__setitem__("scheduler", "not_a_scheduler"), "7", "value_not_in_list"),
    (lambda g: g["1"]["inputs"].__setitem__("ckpt_name", "missing.safetensors"), "1", "value_not_in_list"),
    # ComfyUI's bounds (a width of 1000 is fine, as in ComfyUI), not the typed endpoints'
    (lambda g: g["5"]["inputs"].__setitem__("width", 20000), "5", "value_bigger_than_max"),
    (lambda g: g["9"]["inputs"].__setitem__("filename_prefix", "../out"), "9", "custom_validation_failed"),
])
def test_each_error_type_names_the_node(runtime, mutate, node_id, error_type):
    graph = small_graph()
    mutate(graph)
    body = validation_error(runtime, graph)
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert error_type in node_error_types(body, node_id)
    entry = body["node_errors"][node_id]
    assert entry["dependent_outputs"] == ["9"] and entry["class_type"] == graph[node_id]["class_type"]
    for err in entry["errors"]:
        assert set(err) == {"type", "message", "details", "extra_info"}


def test_unsupported_sampler_error_lists_the_supported_values(runtime):
    graph = small_graph()
    graph["7"]["inputs"]["sampler_name"] = "lms"  # a ComfyUI sampler ryla does not run
    body = validation_error(runtime, graph)
    details = body["node_errors"]["7"]["errors"][0]["details"]
    assert "euler" in details and "dpmpp_2m" in details


def test_unknown_node_and_missing_output(runtime):
    graph = small_graph()
    graph["10"] = {"class_type": "NotANode", "inputs": {}}
    body = validation_error(runtime, graph)
    assert body["error"]["type"] == "invalid_prompt" and "#10" in body["error"]["details"]
    no_outputs = small_graph()
    del no_outputs["9"]
    assert validation_error(runtime, no_outputs)["error"]["type"] == "prompt_no_outputs"


def test_cycle_is_reported(runtime):
    graph = small_graph()
    graph["3"]["inputs"]["conditioning"] = ["11", 0]
    graph["11"] = {"class_type": "FluxGuidance", "inputs": {"guidance": 3.5, "conditioning": ["3", 0]}}
    body = validation_error(runtime, graph)
    assert "dependency_cycle" in node_error_types(body, "3")
    assert "dependency_cycle" in node_error_types(body, "11")


def test_only_output_ancestors_run_and_nodes_run_once(runtime):
    graph = small_graph()
    graph["20"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "never encoded", "clip": ["1", 1]}}
    context = runtime.context()
    runtime.executor.run(graph, context)
    assert "20" not in context.node_seconds
    assert set(context.node_seconds) == set(map(str, range(1, 10)))


def test_template_equals_calling_the_engine_directly(runtime):
    from ryla import imaging
    from ryla.flux import sampling

    result = runtime.run(small_graph(negative_prompt="blurry"))
    engine = runtime.engine
    model, text, vae = engine.load_checkpoint("flux1-dev-fp8.safetensors")
    positive = (engine.encode(text, SMALL["prompt"]).with_options(guidance=3.5),)
    negative = (engine.encode(text, "blurry"),)
    latent = torch.zeros(1, 16, 8, 8)
    ms = sampling.FluxModelSampling(sampling.resolution_shift(64, 64))
    sigmas = sampling.ksampler_sigmas(ms, "simple", 3, 1.0)
    out = engine.sample(model, positive, negative, latent, sampling.prepare_noise(latent.shape, 7), sigmas, 1.0)
    direct = imaging.to_pil(engine.decode(vae, out))[0]
    assert result.images[0].tobytes() == direct.tobytes()


def test_cfg_one_ignores_the_negative_prompt_and_cfg_above_uses_it(runtime):
    def pixels(**kw):
        return runtime.run(small_graph(**kw)).images[0].tobytes()

    assert pixels(negative_prompt="", cfg=1.0) == pixels(negative_prompt="ugly, blurry", cfg=1.0)
    assert pixels(negative_prompt="", cfg=3.0) != pixels(negative_prompt="ugly, blurry", cfg=3.0)


def test_same_seed_same_image_other_seed_differs(runtime):
    a, b, c = (runtime.run(small_graph(seed=s)).images[0] for s in (5, 5, 6))
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_advanced_sampler_path_equals_ksampler(runtime):
    """ComfyUI's full-precision FLUX example (UNETLoader, DualCLIPLoader, VAELoader,
    RandomNoise/BasicGuider/BasicScheduler/SamplerCustomAdvanced) runs, and at cfg 1 gives
    the same result as KSampler on the same files."""
    advanced = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl_fp16.safetensors",
                                                          "clip_name2": "clip_l.safetensors", "type": "flux"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["2", 0]}},
        "5": {"class_type": "FluxGuidance", "inputs": {"guidance": 3.5, "conditioning": ["4", 0]}},
        "6": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5,
                                                              "width": 64, "height": 64}},
        "7": {"class_type": "BasicGuider", "inputs": {"model": ["6", 0], "conditioning": ["5", 0]}},
        "8": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
        "9": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "10": {"class_type": "BasicScheduler", "inputs": {"model": ["6", 0], "scheduler": "simple", "steps": 3,
                                                           "denoise": 1.0}},
        "11": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "12": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["8", 0], "guider": ["7", 0],
                                                                  "sampler": ["9", 0], "sigmas": ["10", 0],
                                                                  "latent_image": ["11", 0]}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["3", 0]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "adv"}},
    }
    adv_image = runtime.run(advanced).images[0]
    ksampler = copy.deepcopy(advanced)
    for key in ("7", "8", "9", "10", "12"):
        del ksampler[key]
    ksampler["15"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}}
    ksampler["12"] = {"class_type": "KSampler", "inputs": {
        "model": ["6", 0], "seed": 3, "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["5", 0], "negative": ["15", 0], "latent_image": ["11", 0], "denoise": 1.0}}
    assert runtime.run(ksampler).images[0].tobytes() == adv_image.tobytes()


def test_object_info_has_comfyui_shape(runtime):
    info = runtime.registry.object_info(runtime.context())
    ksampler = info["KSampler"]
    assert ksampler["input"]["required"]["steps"][0] == "INT"
    # ComfyUI's own defaults and bounds (nodes.py KSampler), not the typed endpoints'
    assert ksampler["input"]["required"]["steps"][1] == {"default": 20, "min": 1, "max": 10000, "step": 1,
                                                         "tooltip": ksampler["input"]["required"]["steps"][1]["tooltip"]}
    assert ksampler["input"]["required"]["cfg"][1]["default"] == 8.0
    assert info["EmptyLatentImage"]["input"]["required"]["width"][1]["default"] == 512
    assert info["EmptySD3LatentImage"]["input"]["required"]["batch_size"][1]["max"] == 4096
    assert info["LoraLoader"]["input"]["required"]["strength_model"][1]["min"] == -100.0
    from ryla.flux import samplers
    assert ksampler["input"]["required"]["sampler_name"][0] == list(samplers.SAMPLERS)
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["flux1-dev-fp8.safetensors"]
    assert info["SaveImage"]["output_node"] is True and info["KSampler"]["output"] == ["LATENT"]


def test_every_scheduler_runs_in_a_ksampler_and_basic_scheduler(runtime):
    from ryla import catalogue

    outputs = {}
    for scheduler in catalogue.SCHEDULER.choices:
        graph = small_graph()
        graph["7"]["inputs"].update(scheduler=scheduler, steps=3)
        outputs[scheduler] = runtime.run(graph).images[0].tobytes()
    assert len(set(outputs.values())) == len(outputs)  # each schedule gives its own image
    info = runtime.registry.object_info(runtime.context())
    assert info["BasicScheduler"]["input"]["required"]["scheduler"][0] == list(catalogue.SCHEDULER.choices)


def test_every_sampler_runs_and_ddim_is_comfyuis_euler(runtime):
    from ryla import catalogue

    images = {}
    for sampler in catalogue.SAMPLER.choices:
        graph = small_graph()
        graph["7"]["inputs"].update(sampler_name=sampler, steps=4)  # at 3 steps 3m_sde is 2m_sde_heun
        images[sampler] = runtime.run(graph).images[0].tobytes()
    assert images["ddim"] == images["euler"]  # ComfyUI's ddim is euler unless inpainting
    # The *_gpu variants build their Brownian tree on the model's device: the CPU here.
    assert images["dpmpp_sde_gpu"] == images["dpmpp_sde"] and images["dpmpp_2m_sde_gpu"] == images["dpmpp_2m_sde"]
    distinct = {name: image for name, image in images.items() if name not in ("ddim", "dpmpp_sde_gpu",
                                                                               "dpmpp_2m_sde_gpu")}
    assert len(set(distinct.values())) == len(distinct)


def test_ui_format_is_converted_and_runpod_bodies_are_unwrapped(runtime, server):
    import httpx

    from ryla.graph.executor import unwrap_workflow

    ui = {"last_node_id": 9, "last_link_id": 9, "nodes": [{"id": 3, "type": "KSampler", "widgets_values": []}],
          "links": [[1, 4, 0, 3, 0, "MODEL"]], "groups": [], "version": 0.4}
    # converted (tests/test_ui_format.py has the rules); a lone KSampler is a graph with no outputs
    body = validation_error(runtime, ui)
    assert body["error"]["type"] == "prompt_no_outputs"
    graph = small_graph()
    assert unwrap_workflow({"input": {"workflow": graph}}) == (graph, None)
    assert unwrap_workflow({"input": {"workflow": graph, "images": [{"name": "a.png", "image": "AAAA"}]}})[1] == \
        {"a.png": "AAAA"}
    r = httpx.post(server.url + "/workflow", json={"input": {"workflow": graph}}, timeout=60)
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
    r = httpx.post(server.url + "/workflow", json=ui)
    assert r.status_code == 400 and r.json()["error"]["type"] == "prompt_no_outputs"


def test_object_info_carries_what_comfyuis_editor_draws(runtime):
    info = runtime.registry.object_info(runtime.context())
    assert info["KSampler"]["input"]["required"]["seed"][1]["control_after_generate"] is True
    assert info["RandomNoise"]["input"]["required"]["noise_seed"][1]["control_after_generate"] is True
    assert info["LoadImage"]["input"]["required"]["image"][1]["image_upload"] is True
    assert info["CheckpointLoaderSimple"]["display_name"] == "Load Checkpoint"
    assert info["SaveImage"]["display_name"] == "Save Image" and info["KSampler"]["category"] == "sampling"
