"""LoRAs: formats, exact application, the store, /flux-lora and /loras."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

import lora_files
from ryla.models.lora_format import LoraFormatError
from ryla.models.loras import InvalidLoraId, LoraNotFound, LoraStore
from ryla.workflows import FLUX_DEV, flux_lora_graph
from conftest import image_difference

BASE = dict(prompt="a portrait", width=64, height=64, steps=3, seed=21)


@pytest.fixture(scope="module")
def lora_runtime(tiny_dir, tmp_path_factory):
    """A runtime on a private copy of the tiny store, with LoRAs A and B in each format."""
    from ryla.runtime import Runtime

    formats = ("kohya", "comfyui", "peft")
    return Runtime(lora_files.store_with_loras(tiny_dir, tmp_path_factory.mktemp("lora-store"),
                                               {"a": (1, formats), "b": (2, formats)}))


def image(runtime, loras=None, **overrides):
    params = {**BASE, **overrides}
    graph = flux_lora_graph(loras, **params) if loras else FLUX_DEV.fill(**params)
    return runtime.run(graph).images[0].tobytes()


def test_equivalent_weights_give_the_same_image_in_all_three_formats(lora_runtime):
    images = {fmt: image(lora_runtime, [(f"a-{fmt}.safetensors", 1.0)]) for fmt in ("kohya", "comfyui", "peft")}
    assert images["kohya"] == images["comfyui"] == images["peft"]
    assert images["kohya"] != image(lora_runtime)


def test_strength_zero_is_the_base_model_exactly_and_swaps_do_not_drift(lora_runtime):
    base = image(lora_runtime)
    assert image(lora_runtime, [("a-kohya.safetensors", 0.0)]) == base
    a, b = image(lora_runtime, [("a-kohya.safetensors", 1.0)]), image(lora_runtime, [("b-kohya.safetensors", 1.0)])
    assert a != b and a != base
    for _ in range(3):
        image(lora_runtime, [("a-peft.safetensors", 0.7)])
        image(lora_runtime, [("b-comfyui.safetensors", 1.3)])
    assert image(lora_runtime) == base
    assert image(lora_runtime, [("a-kohya.safetensors", 1.0)]) == a


def test_stacking_two_loras(lora_runtime):
    a = image(lora_runtime, [("a-kohya.safetensors", 1.0)])
    b = image(lora_runtime, [("b-kohya.safetensors", 1.0)])
    both = image(lora_runtime, [("a-kohya.safetensors", 1.0), ("b-kohya.safetensors", 1.0)])
    assert both not in (a, b)
    assert both == image(lora_runtime, [("a-kohya.safetensors", 1.0), ("b-kohya.safetensors", 1.0)])


def test_switching_loras_never_reloads_the_base_model(lora_runtime):
    image(lora_runtime)
    loads = lora_runtime.engine.stats.loads
    for name in ("a-kohya", "b-peft", "a-comfyui", "b-kohya"):
        image(lora_runtime, [(f"{name}.safetensors", 1.0)])
    assert lora_runtime.engine.stats.loads == loads


def test_alpha_scales_the_update(lora_runtime, tmp_path):
    lora = lora_files.make_lora(lora_runtime.store, 5, rank=4)
    root = lora_runtime.store.folder("loras")
    lora_files.write(lora, "kohya", root / "half-kohya.safetensors", alpha=2.0)  # alpha/rank = 0.5
    lora_files.write(lora, "kohya", root / "full-kohya.safetensors")
    assert image(lora_runtime, [("half-kohya.safetensors", 1.0)]) == image(lora_runtime,
                                                                           [("full-kohya.safetensors", 0.5)])


def test_interleaved_threads_match_runs_alone(lora_runtime):
    alone = {name: image(lora_runtime, [(f"{name}-kohya.safetensors", 1.0)]) for name in ("a", "b")}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: (n, image(lora_runtime, [(f"{n}-kohya.safetensors", 1.0)])),
                                ["a", "b"] * 4))
    assert all(result == alone[name] for name, result in results)


# ------------------------------------------------------------------ fp8-valued weights

def e4m3_neighbours(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The e4m3 values just below and just above each entry (from the 256 codes, not from the
    code under test)."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = torch.unique(codes[torch.isfinite(codes)])
    index = torch.searchsorted(grid, value.contiguous(), right=True)
    below = grid[(index - 1).clamp(min=0)]
    above = torch.where(grid[(index - 1).clamp(min=0)] == value, value, grid[index.clamp(max=len(grid) - 1)])
    return below, above


def check_stochastic_e4m3_rounding(rounded: torch.Tensor, exact: torch.Tensor, rounding) -> None:
    """Properties any stochastic rounding onto the e4m3 grid has: every value on the grid and
    one of its input's two neighbours; values on the grid unchanged; unbiased; the same seed the
    same bits, another seed other bits."""
    below, above = e4m3_neighbours(exact)
    assert torch.equal(rounded, rounded.to(torch.float8_e4m3fn).float())
    assert ((rounded == below) | (rounded == above)).all()
    assert (below != above).float().mean() > 0.99
    on_grid = exact.to(torch.float8_e4m3fn).float()
    assert torch.equal(rounding(on_grid, 7), on_grid)
    # 0.3 of the way from 1.0 to the next value (1.125): up three times in ten
    fraction = (rounding(torch.full((20000,), 1.0 + 0.3 * 0.125), 7) > 1).float().mean()
    assert 0.28 < fraction < 0.32, fraction
    assert torch.equal(rounding(exact, 5), rounding(exact, 5))
    assert (rounding(exact, 5) != rounding(exact, 6)).float().mean() > 0.1


def e4m3_test_values() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp8 weights (normal and subnormal magnitudes, both signs, some past the largest value
    once a delta is added) and a LoRA-sized float32 delta."""
    generator = torch.Generator().manual_seed(3)
    original = (torch.randn(96, 80, generator=generator) * torch.logspace(-3, 2, 96)[:, None]).to(torch.float8_e4m3fn)
    delta = torch.randn(96, 80, generator=generator) * torch.logspace(-4, 1.5, 96)[:, None]
    return original, delta, original.float() + 0.7 * delta


def test_stochastic_rounding_onto_the_e4m3_grid():
    """ComfyUI writes a LoRA-patched fp8 weight back with stochastic rounding
    (comfy/float.py stochastic_rounding); ryla's PyTorch form of that rule."""
    from ryla.flux.lora import round_to_e4m3_grid

    _, _, exact = e4m3_test_values()
    check_stochastic_e4m3_rounding(round_to_e4m3_grid(exact, 11), exact, round_to_e4m3_grid)
    assert round_to_e4m3_grid(torch.tensor([1e4, -1e4, 0.0]), 1).tolist() == [448.0, -448.0, 0.0]


def test_stochastic_e4m3_kernel_runs_in_tritons_interpreter(tmp_path):
    """The GPU's one-pass kernel (ryla.speed.kernels.add_round_to_e4m3_grid) in Triton's CPU
    interpreter: the same properties, from an fp8 or bf16 original into float32, bf16 or fp8."""
    pytest.importorskip("triton")
    from test_speed import run_in_tritons_interpreter

    run_in_tritons_interpreter(tmp_path, f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import torch
from ryla.speed.kernels import add_round_to_e4m3_grid
from test_lora import check_stochastic_e4m3_rounding, e4m3_test_values

def rounding(value, seed):
    out = torch.empty_like(value)
    add_round_to_e4m3_grid(value, torch.zeros_like(value), 0.0, seed, out)
    return out

original, delta, exact = e4m3_test_values()
out = torch.empty(original.shape)
add_round_to_e4m3_grid(original, delta, 0.7, 11, out)
check_stochastic_e4m3_rounding(out, exact, lambda value, seed: rounding(value, seed))
for source in (original, original.bfloat16()):
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        other = torch.empty(original.shape, dtype=dtype)
        add_round_to_e4m3_grid(source, delta, 0.7, 11, other)
        assert torch.equal(other.float(), out)

# The one-pass kernel: the LoRAs' sum computed tile by tile (one to four terms, ranks
# that are not powers of two, 16-bit and float32 factors), never written to memory.
from ryla.speed.kernels import fused_lora_fits, lora_onto_e4m3_grid
generator = torch.Generator().manual_seed(4)
rows, cols = original.shape
terms = [((torch.randn(rank, cols, generator=generator) * 0.3).half(), (torch.randn(rows, rank, generator=generator) * 0.3).half(), s)
         for rank, s in ((8, 0.7), (20, -1.3), (64, 0.25), (3, 2.0))]
terms[1] = (terms[1][0].float(), terms[1][1].float(), terms[1][2])
for count in (1, 2, 4):
    chosen = terms[:count]
    assert fused_lora_fits(chosen, rows, cols)
    exact = original.float() + sum(s * (up.double() @ down.double()) for down, up, s in chosen).float()
    got = torch.empty(rows, cols)
    lora_onto_e4m3_grid(original, chosen, 11, got)
    check_stochastic_e4m3_rounding(got, exact, lambda value, seed: rounding(value, seed))
    again = torch.empty(rows, cols, dtype=torch.bfloat16)
    lora_onto_e4m3_grid(original.bfloat16(), chosen, 11, again)
    assert torch.equal(again.float(), got)
assert not fused_lora_fits(terms + terms[:1], rows, cols)  # five LoRAs: the product first
assert not fused_lora_fits(terms[:1], rows, cols - 1)
print("ok")
""", timeout=300)


def test_loras_on_fp8_valued_layers_round_onto_the_grid_and_restore_exactly():
    """A layer marked as holding fp8 values: the patched weight is back on the e4m3 grid, its
    original kept in fp8; switching away and back gives the same bits; restore gives the
    original bits; an unmarked layer beside it is patched as before (float32 sum, one rounding)."""
    from ryla.flux.lora import E4M3_VALUED_LAYERS, WeightPatcher

    generator = torch.Generator().manual_seed(1)
    module = torch.nn.ModuleDict({"marked": torch.nn.Linear(48, 32, bias=False),
                                  "plain": torch.nn.Linear(48, 32, bias=False)}).to(torch.bfloat16)
    with torch.no_grad():
        for layer in module.values():
            layer.weight.copy_((torch.randn(32, 48, generator=generator) * 0.05).to(torch.float8_e4m3fn))
    setattr(module, E4M3_VALUED_LAYERS, frozenset({"marked"}))
    base = {name: layer.weight.clone() for name, layer in module.items()}
    lora = lambda seed: {name: (torch.randn(4, 48, generator=torch.Generator().manual_seed(seed)) * 0.1,  # noqa: E731
                                torch.randn(32, 4, generator=torch.Generator().manual_seed(seed + 1)) * 0.1, 1.0)
                         for name in ("marked", "plain")}
    patcher = WeightPatcher(module)
    patcher.apply(("a",), [(lora(1), 0.8)])
    marked, plain = module["marked"].weight.clone(), module["plain"].weight.clone()
    assert patcher.originals["marked"].dtype == torch.float8_e4m3fn
    assert torch.equal(patcher.originals["marked"].float(), base["marked"].float())
    assert torch.equal(marked, marked.to(torch.float8_e4m3fn).to(torch.bfloat16)) and not torch.equal(marked, base["marked"])
    down, up, _ = lora(1)["plain"]
    assert torch.equal(plain, torch.add(base["plain"], up @ down, alpha=0.8).to(torch.bfloat16))  # rounded once
    assert not torch.equal(plain, plain.to(torch.float8_e4m3fn).to(torch.bfloat16))
    for _ in range(3):
        patcher.apply(("b",), [(lora(5), 1.2)])
        patcher.apply(("a",), [(lora(1), 0.8)])
    assert torch.equal(module["marked"].weight, marked) and torch.equal(module["plain"].weight, plain)
    patcher.restore()
    assert all(torch.equal(module[name].weight, base[name]) for name in base)


def test_an_fp8_checkpoints_loras_stay_fp8_valued_where_comfyui_keeps_fp8_storage(tiny_dir, tmp_path, monkeypatch,
                                                                                  lora_runtime):
    """On a GPU with fp8 compute ComfyUI keeps flux1-dev-fp8's weights in fp8, so a LoRA's sum
    is rounded back into fp8 there. The same request on the tiny checkpoint, with that decision
    taken as on such a GPU: the patched layers hold e4m3 values (so the image differs a little
    from the float32-rounded one), strength 0 and going back are exact, and swaps never drift."""
    from ryla.flux import loading
    from ryla.runtime import Runtime

    rounded_in_float32 = image(lora_runtime, [("a-kohya.safetensors", 1.0)])  # built as on a CPU
    monkeypatch.setattr(loading, "comfyui_keeps_fp8_storage", lambda device: True)
    runtime = Runtime(lora_files.store_with_loras(tiny_dir, tmp_path / "store", {"a": (1, ("kohya",)),
                                                                                  "b": (2, ("kohya",))}))
    base = image(runtime)
    a = image(runtime, [("a-kohya.safetensors", 1.0)])
    transformer = runtime.engine.load_checkpoint("flux1-dev-fp8.safetensors")[0].transformer
    patched = [name for names in lora_files.SPLITS.values() for name in names]
    for name in patched:
        weight = transformer.get_submodule(name).weight
        assert torch.equal(weight, weight.to(torch.float8_e4m3fn).to(weight.dtype)), name
    assert a != base and a != rounded_in_float32
    pixels = lambda raw: torch.frombuffer(bytearray(raw), dtype=torch.uint8).float()  # noqa: E731
    assert (pixels(a) - pixels(rounded_in_float32)).abs().mean() < (pixels(a) - pixels(base)).abs().mean() / 2
    assert image(runtime, [("a-kohya.safetensors", 0.0)]) == base
    for _ in range(2):
        image(runtime, [("b-kohya.safetensors", 1.3)])
        image(runtime, [("a-kohya.safetensors", 0.6), ("b-kohya.safetensors", 1.0)])
    assert image(runtime, [("a-kohya.safetensors", 1.0)]) == a
    assert image(runtime) == base


def test_loras_on_weights_stored_in_fp8(lora_runtime):
    """UNETLoader's fp8_e4m3fn weight_dtype keeps the weights themselves in fp8: a LoRA is
    rounded into them stochastically, as ComfyUI does, and switching back restores them."""
    def fp8_graph(name: str, strength: float) -> dict:
        graph = flux_lora_graph([(name, strength)], **BASE)
        graph["30"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors",
                                                              "weight_dtype": "fp8_e4m3fn"}}
        graph["10"]["inputs"]["model"] = ["30", 0]
        return graph

    run = lambda name, strength: lora_runtime.run(fp8_graph(name, strength)).images[0].tobytes()  # noqa: E731
    base = run("a-kohya.safetensors", 0.0)
    transformer = lora_runtime.engine.load_diffusion_model("flux1-dev.safetensors", "fp8_e4m3fn").transformer
    layer = transformer.get_submodule(lora_files.SPLITS["double_blocks.0.img_attn.proj"][0])
    original = layer.weight.clone()
    assert original.dtype == torch.float8_e4m3fn
    a = run("a-kohya.safetensors", 1.0)
    assert a != base and not torch.equal(layer.weight.view(torch.uint8), original.view(torch.uint8))
    run("b-kohya.safetensors", 1.0)
    assert run("a-kohya.safetensors", 1.0) == a
    assert run("a-kohya.safetensors", 0.0) == base
    assert torch.equal(layer.weight.view(torch.uint8), original.view(torch.uint8))


# ------------------------------------------------------------------------------ the store


@pytest.fixture()
def store(lora_runtime, tmp_path):
    return LoraStore(tmp_path / "loras", lora_runtime.engine.lora_target_shapes)


def test_store_add_list_remove_with_metadata(store, lora_runtime, tmp_path):
    source = lora_files.write(lora_files.make_lora(lora_runtime.store, 3), "kohya", tmp_path / "Anna v2.safetensors")
    meta = store.add_file(source, trigger_word="ohwx")
    assert meta["id"] == "Anna-v2" and meta["format"] == "kohya" and meta["rank"] == 4
    assert meta["trigger_word"] == "ohwx" and len(meta["sha256"]) == 64 and meta["size"] == source.stat().st_size
    assert "attn.to_q" in meta["target_layers"] and meta["added_at"].endswith("Z")
    assert [m["id"] for m in store.list()] == ["Anna-v2"]
    store.remove("Anna-v2")
    assert store.list() == [] and sorted(p.name for p in store.folder.iterdir()) == []
    with pytest.raises(LoraNotFound):
        store.remove("Anna-v2")


@pytest.mark.parametrize("bad_id", ["../x", "..", ".", "/etc/passwd", "", "a/b", "x" * 129, ".hidden", "a b"])
def test_bad_ids_are_refused_before_touching_disk(store, bad_id):
    for call in (lambda: store.get(bad_id), lambda: store.remove(bad_id),
                 lambda: store.add_chunks(iter([b"x"]), bad_id)):
        with pytest.raises(InvalidLoraId):
            call()
    assert not store.folder.exists()


def test_bad_files_are_rejected_and_leave_nothing(store, lora_runtime, tmp_path):
    good = lora_files.write(lora_files.make_lora(lora_runtime.store, 4), "peft", tmp_path / "g.safetensors").read_bytes()
    cases = {
        "corrupt": b"\x00garbage" * 100,
        "cut-off": good[: len(good) // 2],
        "empty": b"",
    }
    for lora_id, data in cases.items():
        with pytest.raises(LoraFormatError):
            store.add_chunks(iter([data]), lora_id)
    from safetensors.torch import save_file

    save_file({"transformer.nope.lora_A.weight": torch.zeros(4, 8), "transformer.nope.lora_B.weight": torch.zeros(8, 4)},
              str(tmp_path / "keys.safetensors"))
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)},
              str(tmp_path / "shapes.safetensors"))
    with pytest.raises(LoraFormatError, match="not a linear layer"):
        store.add_file(tmp_path / "keys.safetensors")
    with pytest.raises(LoraFormatError, match="another model"):
        store.add_file(tmp_path / "shapes.safetensors")
    assert store.list() == [] and list(store.folder.iterdir()) == []


# ------------------------------------------------------------------------------ HTTP


def upload(server, lora_id, data, trigger=None, filename="x.safetensors"):
    fields = {"id": lora_id} if lora_id else {}
    if trigger:
        fields["trigger_word"] = trigger
    return httpx.post(server.url + "/loras", data=fields, files={"file": (filename, data)}, timeout=60)


@pytest.fixture(scope="module")
def uploaded(server, tiny_store, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    ids = {}
    for name, seed, fmt in (("http-a", 11, "kohya"), ("http-b", 12, "peft")):
        data = lora_files.write(lora_files.make_lora(tiny_store, seed), fmt, folder / f"{name}.safetensors").read_bytes()
        r = upload(server, name, data)
        assert r.status_code == 201, r.text
        ids[name] = r.json()
    yield ids
    for name in ids:
        httpx.delete(f"{server.url}/loras/{name}")


FLUX = {"prompt": "a portrait", "width": 64, "height": 64, "steps": 3, "seed": 5, "output_format": "png"}


def test_flux_lora_endpoint(server, uploaded):
    base = httpx.post(server.url + "/flux-dev", json=FLUX, timeout=60).content
    zero = httpx.post(server.url + "/flux-lora", json={**FLUX, "lora_id": "http-a", "lora_strength": 0}, timeout=60)
    assert zero.status_code == 200, zero.text
    assert image_difference(zero.content, base) <= 2
    a = httpx.post(server.url + "/flux-lora", json={**FLUX, "lora_id": "http-a"}, timeout=60).content
    a2 = httpx.post(server.url + "/flux-lora", json={**FLUX, "lora_id": "http-a"}, timeout=60).content
    b = httpx.post(server.url + "/flux-lora", json={**FLUX, "lora_id": "http-b"}, timeout=60).content
    assert a == a2 and a != b and a != base
    stacked = httpx.post(server.url + "/flux-lora", json={**FLUX, "lora_id": "http-a",
                                                          "loras": [{"id": "http-b", "strength": 0.8}]}, timeout=60)
    assert stacked.status_code == 200 and stacked.content not in (a, b)
    listing = httpx.get(server.url + "/loras").json()["loras"]
    assert {"http-a", "http-b"} <= {entry["id"] for entry in listing}


def test_interleaved_concurrent_requests_match_running_alone(server, uploaded):
    def call(lora_id):
        return httpx.post(server.url + "/flux-lora", json={**FLUX, "lora_id": lora_id}, timeout=120).content

    alone = {i: call(i) for i in ("http-a", "http-b")}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        order = ["http-a", "http-b"] * 3
        results = list(pool.map(call, order))
    assert all(result == alone[i] for i, result in zip(order, results))


def test_trigger_word_goes_into_the_prompt_once(server, tiny_store, tmp_path):
    data = lora_files.write(lora_files.make_lora(tiny_store, 13), "comfyui", tmp_path / "t.safetensors").read_bytes()
    assert upload(server, "http-trigger", data, trigger="ohwx").status_code == 201
    try:
        r = httpx.post(server.url + "/flux-lora", json={**FLUX, "lora_id": "http-trigger"}, timeout=60)
        assert r.headers["x-prompt"] == "ohwx, a portrait"
        r = httpx.post(server.url + "/flux-lora", json={**FLUX, "prompt": "photo of OHWX", "lora_id": "http-trigger"},
                       timeout=60)
        assert r.headers["x-prompt"] == "photo of OHWX"
        r = httpx.post(server.url + "/flux-lora", json={**FLUX, "lora_id": "http-trigger", "trigger_word": "zzq"},
                       timeout=60)
        assert r.headers["x-prompt"] == "zzq, a portrait"
    finally:
        httpx.delete(server.url + "/loras/http-trigger")


def test_lora_errors_over_http(server, tiny_dir):
    r = httpx.post(server.url + "/flux-lora", json={**FLUX, "lora_id": "nobody"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "lora_not_found"
    r = httpx.post(server.url + "/flux-lora", json={**FLUX, "lora_id": "../x"}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("lora_id")
    for path in ("/loras/..%2Fsecret", "/loras/.hidden", "/loras/nobody"):
        assert 400 <= httpx.delete(server.url + path).status_code < 500
    r = upload(server, "../evil", b"data")
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_lora_id"
    r = upload(server, "corrupt", b"\x00not a safetensors file" * 10)
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_lora"
    r = httpx.post(server.url + "/loras", data={"id": "nofile"}, timeout=30)
    assert r.status_code == 422
    listing = {e["id"] for e in httpx.get(server.url + "/loras").json()["loras"]}
    assert not {"corrupt", "nofile", "evil"} & listing
    assert not [p for p in (tiny_dir / "loras").iterdir() if p.name.startswith(".")]


def test_an_upload_cut_off_mid_body_stores_nothing(server, tiny_dir):
    body = b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"cut.safetensors\"\r\n\r\n" + b"x" * 5000
    host, port = "127.0.0.1", server.port
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST /loras HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
                     b"Content-Length: 1000000\r\n\r\n" + body)
    import time

    time.sleep(1.0)
    assert "cut" not in {e["id"] for e in httpx.get(server.url + "/loras").json()["loras"]}
    assert not [p for p in (tiny_dir / "loras").iterdir() if p.name.startswith(".")]
    assert httpx.get(server.url + "/health").status_code == 200


def test_upload_over_the_limit_gets_413(strict_server):
    key = {"Authorization": "Bearer s3cret-key"}
    big = {"file": ("big.safetensors", b"x" * 300_000)}
    r = httpx.post(strict_server.url + "/loras", headers=key, files=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"

    def chunks():  # no Content-Length: the limit holds while streaming
        yield b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.safetensors\"\r\n\r\n"
        for _ in range(50):
            yield b"x" * 10_000

    r = httpx.post(strict_server.url + "/loras", headers={**key, "content-type": "multipart/form-data; boundary=B"},
                   content=chunks(), timeout=30)
    assert r.status_code == 413
    # The general 64 KiB limit does not apply to uploads: a 100 kB upload is judged on content.
    r = httpx.post(strict_server.url + "/loras", headers=key, files={"file": ("m.safetensors", b"x" * 100_000)})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_lora"


# ------------------------------------------------------------------------------ CLIs


def test_ryla_loras_cli(cli_env, tiny_store, tmp_path):
    env = {**cli_env, "RYLA_TINY_MODELS_DIR": str(tmp_path / "tiny")}
    shutil.copytree(tiny_store.root, tmp_path / "tiny", ignore=shutil.ignore_patterns("loras"))
    source = lora_files.write(lora_files.make_lora(tiny_store, 9), "kohya", tmp_path / "mia.safetensors")

    def ryla(*args):
        return subprocess.run([sys.executable, "-m", "ryla.cli.main", "loras", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    added = ryla("add", str(source), "--trigger-word", "mia")
    assert added.returncode == 0, added.stderr
    listed = ryla("list", "--json")
    assert [e["id"] for e in json.loads(listed.stdout)] == ["mia"]
    assert "already exists" in ryla("add", str(source)).stderr or ryla("add", str(source)).returncode == 1
    bad = ryla("add", str(tmp_path / "missing.safetensors"))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert ryla("remove", "mia").returncode == 0
    assert json.loads(ryla("list", "--json").stdout) == []
    gone = ryla("remove", "mia")
    assert gone.returncode == 1 and "no LoRA" in gone.stderr


def test_ryla_client_loras_and_flux_lora(server, tiny_store, tmp_path):
    source = lora_files.write(lora_files.make_lora(tiny_store, 14), "peft", tmp_path / "cli-lora.safetensors")

    def client(*args):
        return subprocess.run([sys.executable, "-m", "ryla.cli.client", "--url", server.url, *args],
                              capture_output=True, text=True, timeout=120)

    r = client("loras", "add", str(source), "--id", "cli-lora", "--trigger-word", "clz")
    assert r.returncode == 0, r.stderr
    assert "cli-lora" in client("loras", "list").stdout
    r = client("flux-lora", "--prompt", "x", "--lora-id", "cli-lora", "--width", "64", "--height", "64",
               "--steps", "2", "--seed", "1", "--output", str(tmp_path / "o.jpg"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.jpg").stat().st_size > 0
    missing = client("flux-lora", "--prompt", "x", "--lora-id", "nobody", "--output", str(tmp_path / "n.jpg"))
    assert missing.returncode == 1 and "lora_not_found" in missing.stderr
    assert client("loras", "remove", "cli-lora").returncode == 0
    assert "cli-lora" not in client("loras", "list").stdout
