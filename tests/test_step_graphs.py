"""Whole transformer steps replayed from graphs (ryla.speed.graphs), as fast mode does on a GPU.

A CPU has no CUDA graphs, so these tests capture by keeping what a CUDA graph keeps: the step
function as it was when captured (its closure frozen) and its own copies of the inputs; a
replay runs that function on those copies, and later calls can only change the copies. A step
that read anything of its request other than its inputs (the first request's prompt, face or
LoRA) would then give the captured request's numbers, and these comparisons with the eager
engine would fail. The real CUDA capture is checked on a GPU by bench/step_graphs_check.py.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import lora_files
from ryla.speed.graphs import CapturedStep, StepGraphs, StepGraphsSettingError, step_graphs_wanted
from ryla.workflows import FLUX_DEV, flux_instantid_graph, flux_lora_graph

BASE = dict(width=64, height=64, steps=3)


def keep_like_a_cuda_graph(step, inputs) -> CapturedStep:
    static = {name: None if tensor is None else tensor.clone() for name, tensor in inputs.items()}
    output = step(**static)

    def replay():
        output.copy_(step(**static))

    return CapturedStep(replay, static, output)


def png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def faces() -> dict[str, bytes]:
    from skimage import data

    astronaut = data.astronaut()
    return {"astronaut": png(astronaut), "mirrored": png(astronaut[:, ::-1])}


@pytest.fixture(scope="module")
def runtimes(tiny_dir, tmp_path_factory):
    """Two runtimes on one store with LoRAs a and b: one eager, one replaying its steps."""
    from ryla.runtime import Runtime

    store = lora_files.store_with_loras(tiny_dir, tmp_path_factory.mktemp("graph-store"), {"a": (1, ("kohya",)),
                                                                                          "b": (2, ("kohya",))})
    eager, graphed = Runtime(store), Runtime(store)
    graphed.engine.step_graphs = True
    graphed.engine.step_graph_capture = keep_like_a_cuda_graph
    return eager, graphed


def requests() -> list[tuple[str, dict, dict]]:
    """A studio's mix: plain, a LoRA, another LoRA, two faces, two stacked LoRAs, plain again."""
    return [
        ("plain", FLUX_DEV.fill(prompt="a red fox", seed=1, **BASE), {}),
        ("lora a", flux_lora_graph([("a-kohya.safetensors", 1.0)], prompt="a portrait", seed=2, **BASE), {}),
        ("lora b", flux_lora_graph([("b-kohya.safetensors", 0.8)], prompt="a portrait", seed=2, **BASE), {}),
        ("face", flux_instantid_graph(prompt="a portrait photo", seed=3, **BASE), {"reference": "astronaut"}),
        ("other face", flux_instantid_graph(prompt="an astronaut", seed=4, controlnet_strength=0.6, **BASE),
         {"reference": "mirrored"}),
        ("stacked", flux_lora_graph([("a-kohya.safetensors", 0.5), ("b-kohya.safetensors", 0.7)],
                                    prompt="a portrait", seed=5, **BASE), {}),
        ("plain again", FLUX_DEV.fill(prompt="a blue fox", seed=6, **BASE), {}),
    ]


def test_replayed_steps_give_the_eager_images_request_after_request(runtimes, faces):
    """Each request's image from replayed steps is the eager engine's, bit for bit, through
    LoRA switches, two faces and two identity strengths: what a replay computes comes from its
    inputs and the weights as they are now, never from the request it was captured in."""
    eager, graphed = runtimes
    for name, graph, images in requests():
        uploads = {key: faces[value] for key, value in images.items()}
        expected = eager.run(graph, eager.context(request_images=uploads)).images[0]
        got = graphed.run(graph, graphed.context(request_images=uploads)).images[0]
        assert np.array_equal(np.asarray(got), np.asarray(expected)), name
    model, _, _ = graphed.engine.load_checkpoint("flux1-dev-fp8.safetensors")
    graphs = model.transformer._ryla_step_graphs
    # plain and identity steps, at two identity strengths, each captured once and replayed
    assert graphs.captures == 3 and graphs.replays >= 10 and not graphs.disabled


def test_a_key_runs_eagerly_once_then_replays():
    calls = []

    def step(x, y=None):
        calls.append(x.data_ptr())
        return x * 2 if y is None else x * y

    graphs = StepGraphs(capture=keep_like_a_cuda_graph)
    first, second, third = torch.ones(3), torch.full((3,), 2.0), torch.full((3,), 5.0)
    assert torch.equal(graphs.run("k", step, {"x": first, "y": None}), first * 2) and graphs.captures == 0
    out = graphs.run("k", step, {"x": second, "y": None})
    assert torch.equal(out, second * 2) and graphs.captures == 1
    replayed = graphs.run("k", step, {"x": third, "y": None})
    assert torch.equal(replayed, third * 2) and torch.equal(out, second * 2), "outputs are copies"
    # another shape is another graph, seen once before it is captured
    graphs.run("k", step, {"x": torch.ones(4), "y": None})
    assert graphs.captures == 1 and len(graphs) == 1
    # a replay read the captured copy of x, never the caller's tensor
    assert calls[-1] not in (first.data_ptr(), second.data_ptr(), third.data_ptr())


def test_a_failed_capture_turns_graphs_off_and_the_step_runs(caplog):
    def refuse(step, inputs):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = StepGraphs(capture=refuse)
    x = torch.arange(3.0)
    graphs.run("k", lambda x: x + 1, {"x": x})
    with caplog.at_level(logging.WARNING, logger="ryla.speed.graphs"):
        assert torch.equal(graphs.run("k", lambda x: x + 1, {"x": x}), x + 1)
    assert graphs.disabled and "CUDA graphs of the transformer step are off" in caplog.text


def test_graphs_are_kept_within_their_bound():
    graphs = StepGraphs(capture=keep_like_a_cuda_graph, size=2)
    for key in ("a", "b", "c"):
        for _ in range(2):
            graphs.run(key, lambda x: x + 1, {"x": torch.zeros(2)})
    assert len(graphs) == 2 and graphs.captures == 3


def test_which_engines_replay_steps(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("RYLA_CUDA_GRAPHS", raising=False)
    assert step_graphs_wanted("fast", cuda, context_parallel=False)
    assert not any([step_graphs_wanted("exact", cuda, False), step_graphs_wanted("turbo", cuda, False),
                    step_graphs_wanted("fast", cpu, False), step_graphs_wanted("fast", cuda, True)])
    monkeypatch.setenv("RYLA_CUDA_GRAPHS", "0")
    assert not step_graphs_wanted("fast", cuda, False)
    monkeypatch.setenv("RYLA_CUDA_GRAPHS", "yes")
    with pytest.raises(StepGraphsSettingError, match="RYLA_CUDA_GRAPHS='yes'"):
        step_graphs_wanted("fast", cuda, False)
