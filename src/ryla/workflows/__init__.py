"""Workflow templates: real ComfyUI API-format graphs, filled from typed parameters.

Each template has bindings: which node inputs a typed parameter sets. The typed endpoints
and `ryla generate` fill a template and hand it to the same executor as /workflow.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class Template:
    name: str
    bindings: dict[str, tuple[tuple[str, str], ...]]  # parameter -> (node id, input name)...

    @property
    def graph(self) -> dict:
        return _load(self.name)

    def fill(self, **params: Any) -> dict:
        """A copy of the graph with the given parameters set; unknown parameters are an error."""
        unknown = set(params) - set(self.bindings)
        if unknown:
            raise KeyError(f"template {self.name} has no parameters {sorted(unknown)}")
        graph = copy.deepcopy(self.graph)
        for param, value in params.items():
            if value is None:
                continue
            for node_id, input_name in self.bindings[param]:
                graph[node_id]["inputs"][input_name] = value
        return graph


@cache
def _load(name: str) -> dict:
    return json.loads(resources.files("ryla.workflows").joinpath(f"{name}.json").read_text())


FLUX_DEV = Template("flux_dev", {
    "checkpoint": (("1", "ckpt_name"),),
    "prompt": (("2", "text"),),
    "guidance": (("3", "guidance"),),
    "negative_prompt": (("4", "text"),),
    "width": (("5", "width"), ("6", "width")),
    "height": (("5", "height"), ("6", "height")),
    "batch_size": (("5", "batch_size"),),
    "seed": (("7", "seed"),),
    "steps": (("7", "steps"),),
    "cfg": (("7", "cfg"),),
    "scheduler": (("7", "scheduler"),),
    "denoise": (("7", "denoise"),),
    "filename_prefix": (("9", "filename_prefix"),),
})


FLUX_LORA = Template("flux_lora", {
    **FLUX_DEV.bindings,
    "lora_name": (("10", "lora_name"),),
    "lora_strength": (("10", "strength_model"), ("10", "strength_clip")),
    "filename_prefix": (("9", "filename_prefix"),),
})


def flux_lora_graph(loras: list[tuple[str, float]], **params: Any) -> dict:
    """The FLUX_LORA template with one LoraLoader per LoRA, chained in order (ComfyUI stacks
    LoRAs the same way). `loras` is [(file name, strength), ...], at least one."""
    (first_name, first_strength), *rest = loras
    graph = FLUX_LORA.fill(lora_name=first_name, lora_strength=first_strength, **params)
    last = "10"
    for index, (name, strength) in enumerate(rest):
        node_id = str(11 + index)
        graph[node_id] = {"class_type": "LoraLoader", "inputs": {
            "model": [last, 0], "clip": [last, 1], "lora_name": name,
            "strength_model": strength, "strength_clip": strength}, "_meta": {"title": f"Load LoRA {index + 2}"}}
        last = node_id
    graph["2"]["inputs"]["clip"] = graph["4"]["inputs"]["clip"] = [last, 1]
    graph["6"]["inputs"]["model"] = [last, 0]
    return graph


def with_loras(graph: dict, loras: list[tuple[str, float]], loader: str = "1") -> dict:
    """Any template with LoraLoaders chained after its checkpoint loader (node `loader`): every
    input that took the checkpoint's MODEL or CLIP takes the last LoRA's instead, as a ComfyUI
    user wires it by hand. `loras` is [(file name, strength), ...]."""
    graph = copy.deepcopy(graph)
    model, clip = [loader, 0], [loader, 1]
    consumers = [(node, name) for node in graph.values() for name, value in node["inputs"].items()
                 if value in (model, clip)]
    used = {int(node_id) for node_id in graph if node_id.isdigit()}
    next_id = max(used, default=0) + 1
    for index, (name, strength) in enumerate(loras):
        node_id = str(next_id + index)
        graph[node_id] = {"class_type": "LoraLoader", "inputs": {
            "model": model, "clip": clip, "lora_name": name, "strength_model": strength, "strength_clip": strength},
            "_meta": {"title": f"Load LoRA {index + 1}"}}
        model, clip = [node_id, 0], [node_id, 1]
    for node, name in consumers:
        node["inputs"][name] = model if node["inputs"][name][1] == 0 else clip
    return graph


def with_trigger_words(prompt: str, words: list[str]) -> str:
    """Put each trigger word into the prompt once: prepended unless already there."""
    missing = [w for w in dict.fromkeys(w.strip() for w in words if w and w.strip())
               if not re.search(rf"(?<![\w]){re.escape(w)}(?![\w])", prompt, flags=re.IGNORECASE)]
    return ", ".join(missing + [prompt]) if missing else prompt


# FLUX.1 Kontext dev, as ComfyUI's flux_kontext_dev_basic template builds it (the image scaled to
# a Kontext training size, encoded, given as ReferenceLatent and sampled from at denoise 1, an
# empty negative), with the text encoders and VAE of the store's checkpoint.
FLUX_KONTEXT = Template("flux_kontext", {
    "checkpoint": (("1", "ckpt_name"),),
    "kontext_model": (("10", "unet_name"),),
    "prompt": (("2", "text"),),
    "guidance": (("3", "guidance"),),
    "batch_size": (("5", "amount"),),
    "seed": (("7", "seed"),),
    "steps": (("7", "steps"),),
    "filename_prefix": (("9", "filename_prefix"),),
})


# FLUX.1 Fill dev's guidance in BFL's examples and ComfyUI's flux_fill_inpaint_example
FILL_GUIDANCE = 30.0


def with_fill_inpainting(graph: dict, fill_model: str, guidance: float | None = None) -> dict:
    """An inpainting graph (with_image_input's, mask given) moved onto FLUX.1 Fill dev, as
    ComfyUI's flux_fill_inpaint_example builds it: the transformer from UNETLoader (`fill_model`)
    through DifferentialDiffusion, wherever the checkpoint's MODEL went (LoRAs included; CLIP
    and VAE stay the checkpoint's); SetLatentNoiseMask replaced by InpaintModelConditioning,
    which gives Fill the masked image and the mask and the sampler its conditioning and latent;
    FluxGuidance set to `guidance` (Fill's own 30 when None)."""
    graph = copy.deepcopy(graph)
    next_id = max(int(node_id) for node_id in graph if node_id.isdigit()) + 1
    loader, diffusion, inpaint = (str(next_id + i) for i in range(3))
    for node in graph.values():
        for name, value in node["inputs"].items():
            if value == ["1", 0]:
                node["inputs"][name] = [diffusion, 0]
    graph[loader] = {"class_type": "UNETLoader", "inputs": {"unet_name": fill_model, "weight_dtype": "default"},
                     "_meta": {"title": "Load Diffusion Model (Fill)"}}
    graph[diffusion] = {"class_type": "DifferentialDiffusion", "inputs": {"model": [loader, 0]},
                        "_meta": {"title": "Differential Diffusion"}}
    sampler = graph["7"]["inputs"]
    noise_mask = graph.pop("23")["inputs"]  # SetLatentNoiseMask: the encoded image and the mask
    graph[inpaint] = {"class_type": "InpaintModelConditioning", "inputs": {
        "positive": sampler["positive"], "negative": sampler["negative"], "vae": ["1", 2], "pixels": ["20", 0],
        "mask": noise_mask["mask"], "noise_mask": True}, "_meta": {"title": "InpaintModelConditioning"}}
    sampler.update(positive=[inpaint, 0], negative=[inpaint, 1])
    for node in graph.values():
        for name, value in node["inputs"].items():
            if value == ["23", 0]:
                node["inputs"][name] = [inpaint, 2]
    for node in graph.values():
        if node["class_type"] == "FluxGuidance":
            node["inputs"]["guidance"] = FILL_GUIDANCE if guidance is None else guidance
    return graph


def flux_kontext_graph(loras: list[tuple[str, float]] = (), **params: Any) -> dict:
    """The FLUX_KONTEXT template; each LoRA file (in order) on the transformer only, through
    LoraLoaderModelOnly, as ComfyUI's Kontext LoRA graphs apply them."""
    graph = FLUX_KONTEXT.fill(**params)
    model = ["10", 0]
    for index, (name, strength) in enumerate(loras):
        node_id = str(60 + index)
        graph[node_id] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": model, "lora_name": name, "strength_model": strength},
            "_meta": {"title": f"LoraLoaderModelOnly {index + 1}"}}
        model = [node_id, 0]
    graph["7"]["inputs"]["model"] = model
    return graph


FLUX_INSTANTID = Template("flux_instantid", {
    **FLUX_DEV.bindings,
    "instantid_strength": (("14", "ip_weight"),),
    "controlnet_strength": (("14", "cn_strength"),),
    "face_provider": (("12", "provider"),),
    "filename_prefix": (("9", "filename_prefix"),),
})


def flux_instantid_graph(pose: bool = False, **params: Any) -> dict:
    """The FLUX_INSTANTID template; with pose, a second LoadImage ("pose") feeds image_kps."""
    graph = FLUX_INSTANTID.fill(**params)
    if pose:
        graph["15"] = {"class_type": "LoadImage", "inputs": {"image": "pose"}, "_meta": {"title": "Pose face"}}
        graph["14"]["inputs"]["image_kps"] = ["15", 0]
    return graph


def with_image_input(graph: dict, strength: float, width: int, height: int, mask: bool = False,
                     batch_size: int = 1) -> dict:
    """A text-to-image template made image-to-image, the way ComfyUI's img2img and inpainting
    examples build it: the request's image ("image") through VAEEncode into the KSampler with
    denoise = strength; with a mask ("mask", white = redraw) through LoadImageMask and
    SetLatentNoiseMask; a batch repeats the latent (RepeatLatentBatch), each image with its
    own noise. The empty latent goes; ModelSamplingFlux gets the image's size."""
    graph = copy.deepcopy(graph)
    del graph["5"]  # EmptySD3LatentImage
    graph["20"] = {"class_type": "LoadImage", "inputs": {"image": "image"}, "_meta": {"title": "Load Image"}}
    graph["21"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["1", 2]},
                   "_meta": {"title": "VAE Encode"}}
    latent = ["21", 0]
    if mask:
        graph["22"] = {"class_type": "LoadImageMask", "inputs": {"image": "mask", "channel": "red"},
                       "_meta": {"title": "Load Image (as Mask)"}}
        graph["23"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": latent, "mask": ["22", 0]},
                       "_meta": {"title": "Set Latent Noise Mask"}}
        latent = ["23", 0]
    if batch_size > 1:
        graph["24"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": latent, "amount": batch_size},
                       "_meta": {"title": "Repeat Latent Batch"}}
        latent = ["24", 0]
    graph["6"]["inputs"].update(width=width, height=height)
    graph["7"]["inputs"].update(latent_image=latent, denoise=strength)
    return graph
