"""GGUF files as city96's ComfyUI-GGUF reads them: UnetLoaderGGUF and DualCLIPLoaderGGUF, Q8_0
and Q4_K. The Q4_K blocks ryla writes for its tiny files are read back by two independent
decoders (gguf-py's numpy reference and diffusers' torch one), and the models loaded from
GGUF are compared with the same weights in bf16/fp16: within the quantisation error, not
identical. The Kontext graph in the shape of a published GGUF workflow runs in
tests/test_workflows.py (flux_kontext_gguf.json)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from ryla.models import gguf_files
from ryla.models.tensor_files import ModelFormatError
from ryla.models.tiny import GGUF_Q4K_TRANSFORMER, GGUF_Q8_T5XXL, GGUF_Q8_TRANSFORMER, wide_transformer_state_dict

WORKFLOWS = Path(__file__).parent / "workflows"


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_q4_k_blocks_decode_the_same_in_gguf_py_and_diffusers():
    import gguf
    from diffusers.quantizers.gguf.utils import GGML_QUANT_SIZES, dequantize_functions
    from gguf import quants

    rng = np.random.default_rng(0)
    values = rng.standard_normal((6, 768)).astype(np.float32)
    values[1] = np.abs(values[1])  # a row with no negative values (min clamps to 0)
    values[2] = 0.0  # and one of zeros (scales of 0)
    values[3] *= 1e3
    blocks = gguf_files.quantize_q4_k(values)
    assert blocks.shape == (6, 768 // 256 * 144) and blocks.dtype == np.uint8
    kind = gguf.GGMLQuantizationType.Q4_K
    reference = quants.dequantize(blocks, kind)
    block_size, type_size = GGML_QUANT_SIZES[kind]
    ours = dequantize_functions[kind](torch.from_numpy(blocks).reshape(-1, type_size), block_size, type_size,
                                      dtype=torch.float32).reshape(values.shape).numpy()
    np.testing.assert_array_equal(ours, reference)
    assert not reference[2].any()
    for row in (0, 1, 3, 4):  # 4 bits per value: a few percent of the row's size
        error = np.linalg.norm(reference[row] - values[row]) / np.linalg.norm(values[row])
        assert 0 < error < 0.1, (row, error)
    with pytest.raises(ValueError, match="multiple of 256"):
        gguf_files.quantize_q4_k(values[:, :100])


def test_tiny_gguf_files_are_in_city96s_layout(tiny_store):
    import gguf

    transformer = gguf.GGUFReader(str(tiny_store.resolve("diffusion_models", GGUF_Q8_TRANSFORMER)))
    assert gguf_files.architecture(tiny_store.resolve("diffusion_models", GGUF_Q8_TRANSFORMER)) == "flux"
    types = {t.name: t.tensor_type.name for t in transformer.tensors}
    assert types["double_blocks.0.img_attn.qkv.weight"] == "Q8_0" and types["img_in.bias"] == "F32"
    q4 = gguf.GGUFReader(str(tiny_store.resolve("diffusion_models", GGUF_Q4K_TRANSFORMER)))
    q4_types = {t.name: t.tensor_type.name for t in q4.tensors}
    assert q4_types["double_blocks.0.img_attn.qkv.weight"] == "Q4_K"
    assert q4_types["txt_in.weight"] == "BF16"  # 32 values a row fit no super-block
    t5 = gguf.GGUFReader(str(tiny_store.resolve("text_encoders", GGUF_Q8_T5XXL)))
    assert gguf_files.architecture(tiny_store.resolve("text_encoders", GGUF_Q8_T5XXL)) == "t5encoder"
    names = {t.name for t in t5.tensors}
    assert {"token_embd.weight", "enc.blk.0.attn_q.weight", "enc.blk.0.attn_rel_b.weight",
            "enc.blk.1.ffn_gate.weight", "enc.output_norm.weight"} <= names


def test_gguf_models_match_their_unquantised_weights(runtime, tiny_store):
    """Q8_0 and Q4_K transformers and the Q8_0 T5 give what the same weights give unquantised,
    within the quantisation's error: one velocity for the transformers, the prompt embedding
    for T5; and Q4_K's weights are exactly what gguf-py's reference decoder reads."""
    import gguf
    from gguf import quants

    from ryla.flux.loading import build_transformer

    engine = runtime.engine
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=generator)
    text = engine.load_text_encoders("clip_l.safetensors", "t5xxl_fp16.safetensors")
    cond = engine.encode(text, "a cat").with_options(guidance=3.5)

    def velocity(model):
        return engine._velocity_fn(model, x.shape)(x, 0.6, (cond,), None, 1, 0, "cond")

    bf16 = velocity(engine.load_diffusion_model("flux1-dev.safetensors"))
    q8 = velocity(engine.load_diffusion_model(GGUF_Q8_TRANSFORMER))
    assert 0 < _relative(q8, bf16) < 0.02

    path = tiny_store.resolve("diffusion_models", GGUF_Q4K_TRANSFORMER)
    wide = {k: v.to(torch.bfloat16) for k, v in wide_transformer_state_dict().items()}
    _, meta = gguf_files.read_gguf(path)
    unquantised = velocity(type(engine.load_diffusion_model(GGUF_Q4K_TRANSFORMER))(
        "wide-bf16", build_transformer(wide, meta, engine.dtype, engine.device)))
    q4 = velocity(engine.load_diffusion_model(GGUF_Q4K_TRANSFORMER))
    assert 0 < _relative(q4, unquantised) < 0.15
    assert _relative(q4, unquantised) > _relative(q8, bf16)  # 4 bits are coarser than 8
    tensors, _ = gguf_files.read_gguf(path)
    entry = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "single_blocks.0.linear1.weight")
    np.testing.assert_array_equal(tensors["single_blocks.0.linear1.weight"].numpy(),
                                  quants.dequantize(entry.data, entry.tensor_type))

    # T5: each Q8_0 weight is within 0.6 % of its fp16 value; two random layers amplify that
    # to about 2 % in the embedding, well under ComfyUI's scaled fp8 file of the same weights.
    t5_gguf = engine.load_text_encoders("clip_l.safetensors", GGUF_Q8_T5XXL)
    quantised = engine.encode(t5_gguf, "a cat")
    fp8 = engine.encode(engine.load_text_encoders("clip_l.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors"), "a cat")
    assert 0 < _relative(quantised.t5, cond.t5) < min(0.05, _relative(fp8.t5, cond.t5) / 2)
    torch.testing.assert_close(quantised.pooled, cond.pooled)  # CLIP-L is the same file


def test_gguf_loaders_list_only_what_they_load(server):
    info = httpx.get(server.url + "/object_info").json()

    def choices(node, name):
        return info[node]["input"]["required"][name][0]

    assert choices("UnetLoaderGGUF", "unet_name") == [GGUF_Q4K_TRANSFORMER, GGUF_Q8_TRANSFORMER]
    assert not [n for n in choices("UNETLoader", "unet_name") if n.endswith(".gguf")]
    assert not [n for n in choices("DualCLIPLoader", "clip_name1") if n.endswith(".gguf")]
    both = choices("DualCLIPLoaderGGUF", "clip_name1")
    assert GGUF_Q8_T5XXL in both and "clip_l.safetensors" in both
    advanced = info["UnetLoaderGGUFAdvanced"]["input"]["required"]
    assert set(advanced) == {"unet_name", "dequant_dtype", "patch_dtype", "patch_on_device"}


def _bad_ggufs(tiny_store, folder: Path) -> dict[str, str]:
    """File name -> what the refusal must name."""
    good = tiny_store.resolve("diffusion_models", GGUF_Q8_TRANSFORMER).read_bytes()
    (folder / "bad-1.gguf").write_bytes(np.random.default_rng(1).bytes(4000))  # random bytes
    (folder / "bad-2.gguf").write_bytes(good[: len(good) // 2])  # an interrupted download
    gguf_files.write_gguf(folder / "bad-3.gguf", {"input_blocks.0.0.weight": torch.ones(4, 32)}, "sdxl", "Q8_0")
    # and the same for safetensors files, through UNETLoader
    (folder / "bad-4.safetensors").write_bytes(np.random.default_rng(2).bytes(4000))
    safetensors = tiny_store.resolve("diffusion_models", "flux1-dev.safetensors").read_bytes()
    (folder / "bad-5.safetensors").write_bytes(safetensors[: len(safetensors) // 2])
    return {"bad-1.gguf": "not a readable GGUF file", "bad-2.gguf": "damaged or truncated GGUF file",
            "bad-3.gguf": "Stable Diffusion XL", "bad-4.safetensors": "not a readable safetensors file",
            "bad-5.safetensors": "not a readable safetensors file"}


def _graph(unet_name: str) -> dict:
    graph = json.loads((WORKFLOWS / "flux_kontext_gguf.json").read_text())
    if unet_name.endswith(".gguf"):
        graph["31"]["inputs"]["unet_name"] = unet_name
    else:
        graph["31"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}}
    return graph


def test_broken_and_foreign_model_files_are_4xx_naming_the_problem(server, tiny_store, tmp_path, cli_env):
    """Random bytes, a file cut off halfway and another architecture's file, as GGUF and as
    safetensors: over HTTP and from the CLI a client error that names the problem, no
    traceback."""
    import shutil

    health = httpx.get(server.url + "/health").json()
    folder = Path(health["models_dir"]) / "diffusion_models"
    cases = _bad_ggufs(tiny_store, folder)
    (tmp_path / "input.png").write_bytes(_png())
    image = base64.b64encode(_png()).decode()
    try:
        for name, named in cases.items():
            response = httpx.post(server.url + "/workflow", json={"prompt": _graph(name), "images": {"input.png": image}},
                                  timeout=120)
            assert 400 <= response.status_code < 500 and named in response.text, (name, response.text)
    finally:
        for name in cases:
            (folder / name).unlink()
    # the CLI, on a copy of the tiny store holding the files
    store = tmp_path / "store"
    shutil.copytree(cli_env["RYLA_TINY_MODELS_DIR"], store)
    _bad_ggufs(tiny_store, store / "diffusion_models")
    # from the CLI, one of each kind of breakage (each run starts a Python)
    for name, named in ((n, cases[n]) for n in ("bad-1.gguf", "bad-3.gguf", "bad-5.safetensors")):
        workflow = tmp_path / f"{name}.json"
        workflow.write_text(json.dumps(_graph(name)))
        result = subprocess.run([sys.executable, "-m", "ryla.cli.main", "run-workflow", str(workflow), "--image",
                                 f"input.png={tmp_path / 'input.png'}", "--output-dir", str(tmp_path / "out")],
                                env={**cli_env, "RYLA_MODELS_DIR": str(store)}, cwd=tmp_path, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode != 0 and named in result.stderr and "Traceback" not in result.stderr, result.stderr


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_loaders_and_model_lists_hold_what_each_loader_can_load(server, tiny_store):
    """A LoRA and a VAE dropped into diffusion_models/, a T5 into vae/: /object_info's and
    GET /models/{folder}'s lists leave them out (read from the files' tensor names); naming
    one anyway passes validation and gets the loader's own reason (a 4xx naming what it is);
    .gguf files are listed under ComfyUI-GGUF's unet_gguf and clip_gguf keys only."""
    import shutil

    health = httpx.get(server.url + "/health").json()
    root = Path(health["models_dir"])
    lora = root / "diffusion_models" / "stray-lora.safetensors"
    vae = root / "diffusion_models" / "stray-vae.safetensors"
    t5 = root / "vae" / "stray-t5.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(96, 4)}, str(lora))
    shutil.copy(tiny_store.resolve("vae", "ae.safetensors"), vae)
    shutil.copy(tiny_store.resolve("text_encoders", "t5xxl_fp16.safetensors"), t5)
    try:
        info = httpx.get(server.url + "/object_info").json()
        unets = info["UNETLoader"]["input"]["required"]["unet_name"][0]
        assert "flux1-dev.safetensors" in unets and not {lora.name, vae.name} & set(unets)
        assert t5.name not in info["VAELoader"]["input"]["required"]["vae_name"][0]
        listed = httpx.get(server.url + "/models/diffusion_models").json()
        assert "flux1-dev.safetensors" in listed and not [n for n in listed if n.startswith("stray") or
                                                          n.endswith(".gguf")]
        assert httpx.get(server.url + "/models/unet_gguf").json() == [GGUF_Q4K_TRANSFORMER, GGUF_Q8_TRANSFORMER]
        assert httpx.get(server.url + "/models/clip_gguf").json() == [GGUF_Q8_T5XXL]
        assert "unet_gguf" in httpx.get(server.url + "/models").json()
        graph = json.loads((WORKFLOWS / "flux_kontext_gguf.json").read_text())
        graph["31"] = {"class_type": "UNETLoader", "inputs": {"unet_name": lora.name, "weight_dtype": "default"}}
        image = base64.b64encode(_png()).decode()
        response = httpx.post(server.url + "/workflow", json={"prompt": graph, "images": {"input.png": image}},
                              timeout=120)
        assert 400 <= response.status_code < 500 and "LoRA" in response.text, response.text
    finally:
        for path in (lora, vae, t5):
            path.unlink(missing_ok=True)
