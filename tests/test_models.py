"""Model store, tiny model set, and the file-format converters."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ryla.models import formats
from ryla.models.store import ModelNotFoundError, ModelStore, UnsafeNameError
from ryla.models.tiny import make_tiny_models


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_tiny_is_deterministic(tiny_dir, tmp_path):
    again = make_tiny_models(tmp_path / "again").root
    assert _digest(again) == _digest(tiny_dir)


def test_tiny_files_use_the_real_names_layouts_and_dtypes(tiny_store):
    inventory = tiny_store.inventory()
    assert inventory["checkpoints"] == ["flux1-dev-fp8.safetensors"]
    assert inventory["diffusion_models"] == ["flux1-canny-dev.safetensors", "flux1-depth-dev.safetensors",
                                             "flux1-dev-Q4_K_S.gguf", "flux1-dev-Q8_0.gguf",
                                             "flux1-dev-fp8-e4m3fn-scaled.safetensors",
                                             "flux1-dev-kontext_fp8_scaled.safetensors", "flux1-dev.safetensors",
                                             "flux1-fill-dev.safetensors", "flux1-schnell.safetensors"]
    with safe_open(str(tiny_store.resolve("diffusion_models", "flux1-fill-dev.safetensors")), "pt") as f:
        assert tuple(f.get_slice("img_in.weight").get_shape())[1] == 384  # as the published Fill file
    with safe_open(str(tiny_store.resolve("diffusion_models", "flux1-dev-kontext_fp8_scaled.safetensors")), "pt") as f:
        assert "scaled_fp8" in f.keys() and f.get_tensor("img_in.weight").dtype == torch.float8_e4m3fn
    assert inventory["text_encoders"] == ["clip_l.safetensors", "t5-v1_1-xxl-encoder-Q8_0.gguf", "t5xxl_fp16.safetensors",
                                          "t5xxl_fp8_e4m3fn_scaled.safetensors"]
    assert inventory["vae"] == ["ae.safetensors"]
    with safe_open(str(tiny_store.resolve("checkpoints", "flux1-dev-fp8.safetensors")), "pt") as f:
        keys = set(f.keys())
        qkv = f.get_tensor("model.diffusion_model.double_blocks.0.img_attn.qkv.weight")
        assert qkv.dtype == torch.float8_e4m3fn
    for expected in ("model.diffusion_model.single_blocks.0.linear1.weight",
                     "model.diffusion_model.guidance_in.in_layer.weight",
                     "vae.decoder.conv_in.weight", "vae.encoder.mid.attn_1.q.weight",
                     "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight",
                     "text_encoders.t5xxl.transformer.shared.weight",
                     "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"):
        assert expected in keys
    with safe_open(str(tiny_store.resolve("diffusion_models", "flux1-dev.safetensors")), "pt") as f:
        assert f.get_tensor("img_in.weight").dtype == torch.bfloat16


def test_tiny_set_loads_through_the_real_loaders(runtime):
    engine = runtime.engine
    model, text, vae = engine.load_checkpoint("flux1-dev-fp8.safetensors")
    assert type(model.transformer).__name__ == "FluxTransformer2DModel"
    assert model.transformer.config.guidance_embeds
    assert len(model.transformer.transformer_blocks) == 1 and len(model.transformer.single_transformer_blocks) == 1
    assert type(vae.vae).__name__ == "AutoencoderKL" and vae.vae.config.latent_channels == 16
    assert type(text.clip).__name__ == "CLIPTextModel" and type(text.t5).__name__ == "T5EncoderModel"
    assert all(p.device.type != "meta" for p in model.transformer.parameters())
    split = engine.load_diffusion_model("flux1-dev.safetensors")
    # Two files, one architecture: same weights up to the fp8 rounding of the checkpoint.
    a = dict(split.transformer.named_parameters())["x_embedder.weight"]
    b = dict(model.transformer.named_parameters())["x_embedder.weight"]
    assert torch.allclose(a, b, atol=0.1 * a.abs().max().item())
    engine.load_text_encoders("t5xxl_fp16.safetensors", "clip_l.safetensors")  # either order
    engine.load_vae("ae.safetensors")


def test_transformer_converter_agrees_with_diffusers_at_full_size():
    """Our width-agnostic BFL converter against diffusers' own (which only knows 3072),
    on the full FLUX.1-dev architecture, using meta tensors so nothing is allocated."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from ryla.flux.loading import component_config

    config = {k: v for k, v in component_config("transformer", {}).items() if not k.startswith("_")}
    with init_empty_weights():
        model = FluxTransformer2DModel(**config)
    diffusers_sd = dict(model.state_dict())
    bfl = formats.flux_transformer_to_bfl(diffusers_sd)
    assert bfl["single_blocks.37.linear1.weight"].shape == (3 * 3072 + 4 * 3072, 3072)
    theirs = convert_flux_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v for k, v in bfl.items()})
    ours = formats.flux_transformer_from_bfl(bfl)
    assert set(ours) == set(theirs) == set(diffusers_sd)
    assert all(ours[k].shape == theirs[k].shape == diffusers_sd[k].shape for k in ours)


def test_transformer_converter_roundtrips_values():
    sd = {}
    from ryla.models.tiny import _transformer_state_dict

    bfl = _transformer_state_dict()
    diffusers_sd = formats.flux_transformer_from_bfl(bfl)
    back = formats.flux_transformer_to_bfl(diffusers_sd)
    assert set(back) == set(bfl) and all(torch.equal(back[k], bfl[k]) for k in bfl)
    # The final adaLN is stored (shift, scale) by BFL and (scale, shift) by diffusers.
    shift, scale = bfl["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(diffusers_sd["norm_out.linear.weight"], torch.cat([scale, shift]))
    assert sd == {}


def test_vae_inverse_matches_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from ryla.flux.loading import component_config
    from ryla.models.tiny import TINY_VAE, _vae_state_dict

    ldm = _vae_state_dict()
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    converted = convert_ldm_vae_checkpoint(ldm, TINY_VAE)
    from diffusers import AutoencoderKL

    model = AutoencoderKL(**{k: v for k, v in TINY_VAE.items() if not k.startswith("_")})
    assert set(converted) == set(model.state_dict())
    assert component_config("vae", {})["latent_channels"] == 16


def test_a_file_of_the_wrong_architecture_is_refused(tiny_store, tmp_path):
    from safetensors.torch import save_file

    from ryla.flux.loading import build_transformer
    from ryla.models.tensor_files import ModelFormatError, read_tensors

    tensors, meta = read_tensors(tiny_store.resolve("diffusion_models", "flux1-dev.safetensors"))
    tensors["img_in.weight"] = torch.zeros(5, 5)
    with pytest.raises(ModelFormatError, match="img_in|x_embedder"):
        build_transformer(tensors, meta, torch.float32, torch.device("cpu"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelFormatError, match="not a readable safetensors"):
        read_tensors(bad)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelFormatError):
        build_transformer(*read_tensors(tmp_path / "other.safetensors"), torch.float32, torch.device("cpu"))


def test_store_resolves_like_comfyui_and_refuses_escapes(tmp_path):
    store = ModelStore(tmp_path)
    (tmp_path / "loras" / "people").mkdir(parents=True)
    (tmp_path / "loras" / "people" / "anna.safetensors").write_bytes(b"x")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "legacy.safetensors").write_bytes(b"x")
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    assert store.list("loras") == ["people/anna.safetensors"]
    assert store.resolve("loras", "people/anna.safetensors").name == "anna.safetensors"
    assert store.resolve("diffusion_models", "legacy.safetensors").parent.name == "unet"
    for name in ("../secret.safetensors", "/etc/passwd", "people/../../secret.safetensors", "", "a\x00b"):
        with pytest.raises(UnsafeNameError):
            store.resolve("loras", name)
    (tmp_path / "loras" / "link.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(UnsafeNameError):
        store.resolve("loras", "link.safetensors")
    with pytest.raises(ModelNotFoundError, match="people/anna.safetensors"):
        store.resolve("loras", "nobody.safetensors")


def test_open_store_falls_back_to_tiny_once(tmp_path, monkeypatch, tiny_dir, caplog):
    from ryla import runtime

    monkeypatch.setenv("RYLA_TINY_MODELS_DIR", str(tiny_dir))
    monkeypatch.setattr(runtime, "_announced_tiny", False)
    with caplog.at_level("WARNING"):
        first = runtime.open_store(tmp_path / "empty")
        second = runtime.open_store(tmp_path / "empty")
    assert first.tiny and second.root == tiny_dir.resolve()
    assert sum("TINY random-weight" in r.message for r in caplog.records) == 1
    assert json.loads(json.dumps(first.inventory()))["checkpoints"] == ["flux1-dev-fp8.safetensors"]


def test_checkpoint_parts_are_read_ahead_by_one_thread_and_once(tiny_store, monkeypatch):
    """load_checkpoint reads the four parts in a background thread, in build order, while the
    main thread imports; each part is read once, a loaded checkpoint is not read again, and no
    reader thread outlives the load."""
    import threading

    import ryla.models.tensor_files as tensor_files
    from ryla.flux.engine import FluxEngine

    reads = []
    real = tensor_files.read_tensors
    monkeypatch.setattr(tensor_files, "read_tensors",
                        lambda path, prefix="", device="cpu": reads.append((prefix, threading.current_thread().name))
                        or real(path, prefix, device))
    engine = FluxEngine(tiny_store)
    engine.load_checkpoint("flux1-dev-fp8.safetensors")
    assert [prefix for prefix, _ in reads] == ["model.diffusion_model.", "text_encoders.clip_l.transformer.",
                                               "text_encoders.t5xxl.transformer.", "vae."]
    assert all(thread.startswith("ryla-prefetch") for _, thread in reads)
    engine.load_checkpoint("flux1-dev-fp8.safetensors")
    assert len(reads) == 4
    assert not [t for t in threading.enumerate() if t.name.startswith("ryla-prefetch")]


def test_a_checkpoint_that_fails_to_build_leaves_no_reader_behind(tiny_store, tmp_path):
    """The transformer's build fails while the other parts are still being read ahead: the
    load raises the build's error, and the reader is stopped."""
    import threading

    from safetensors.torch import load_file, save_file

    from ryla.flux.engine import FluxEngine
    from ryla.models.tensor_files import ModelFormatError
    from ryla.models.store import ModelStore

    tensors = load_file(str(tiny_store.resolve("checkpoints", "flux1-dev-fp8.safetensors")))
    del tensors["model.diffusion_model.img_in.weight"]
    store = ModelStore(tmp_path)
    store.ensure_layout()
    save_file(tensors, str(tmp_path / "checkpoints" / "broken.safetensors"))
    with pytest.raises(ModelFormatError, match=r"broken.safetensors \(transformer\)"):
        FluxEngine(store).load_checkpoint("broken.safetensors")
    assert not [t for t in threading.enumerate() if t.name.startswith("ryla-prefetch")]


def test_parts_are_read_ahead_only_where_the_gpu_has_room(tiny_store, monkeypatch):
    """On a GPU, reading ahead needs PREFETCH_MEMORY_FACTOR x the file free: the transformer's
    build already holds ~2.1x its fp8 file, and the read-ahead parts join it."""
    from ryla.flux.engine import PREFETCH_MEMORY_FACTOR, FluxEngine

    path = tiny_store.resolve("checkpoints", "flux1-dev-fp8.safetensors")
    size = path.stat().st_size
    engine = FluxEngine(tiny_store, device="cuda")  # only its device is used here
    for free, fits in ((2 * size, False), (int(PREFETCH_MEMORY_FACTOR * size), True)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 10 * free))
        assert engine._prefetch_fits(path) is fits
    assert FluxEngine(tiny_store)._prefetch_fits(path)  # a CPU maps the file: always


def test_freed_gpu_memory_is_released_after_each_build_only(tiny_store, monkeypatch):
    """A GPU engine hands what a build freed (fp8 copies, q/k/v after fusing, bf16 weights
    after quantising) back to the driver once per new model, not on every lookup; a CPU
    engine has nothing to release."""
    from ryla.flux.engine import FluxEngine

    released = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(True))
    engine = FluxEngine(tiny_store, device="cuda")  # only its device is used here
    assert engine._cached(("part", "a"), lambda: "built") == "built"
    assert engine._cached(("part", "a"), lambda: "built again") == "built"
    assert len(released) == 1
    FluxEngine(tiny_store, device="cpu")._cached(("part", "a"), lambda: "built")
    assert len(released) == 1


def test_a_checkpoint_load_releases_freed_gpu_memory_once_and_only_when_it_builds(tiny_store, monkeypatch):
    """Released once after all four parts (not per part, while parts read ahead may still be
    copied to the GPU), and not again when a request finds the checkpoint loaded: between
    requests, releasing would hand back other requests' activation blocks."""
    import ryla.flux.engine as engine_module

    releases = []
    monkeypatch.setattr(engine_module, "release_freed_gpu_memory", releases.append)
    engine = engine_module.FluxEngine(tiny_store)
    engine.load_checkpoint("flux1-dev-fp8.safetensors")
    assert releases == [engine.device]
    engine.load_checkpoint("flux1-dev-fp8.safetensors")
    assert releases == [engine.device]


def test_preload_warms_the_text_encoders_and_the_vae_in_compiled_modes(tiny_store):
    """In a compiled mode, preload also runs T5 and the decoder once (their first calls load
    kernels), so the first request does not; uncompiled modes skip it."""
    from ryla.flux.engine import FluxEngine

    eager = FluxEngine(tiny_store)
    eager.preload("flux1-dev-fp8.safetensors", 64, 64)
    assert eager.stats.prompt_cache_misses == 0
    compiled = FluxEngine(tiny_store)
    compiled.load_checkpoint("flux1-dev-fp8.safetensors")
    compiled.speed_info["compiled"] = "as on a GPU"  # what a compiled mode's speed_info says after loading
    compiled.preload("flux1-dev-fp8.safetensors", 64, 64)
    assert compiled.stats.prompt_cache_misses == 1
    _, text_encoder, _ = compiled.load_checkpoint("flux1-dev-fp8.safetensors")
    compiled.encode(text_encoder, "")
    assert compiled.stats.prompt_cache_hits == 1


def test_comfyuis_scaled_fp8_files_load_and_match_their_bf16_weights(runtime, tiny_store):
    """Comfy-Org's scaled fp8 layout (the `scaled_fp8` marker, float8 weights with float32
    `scale_weight`), for the transformer (UNETLoader) and T5 (DualCLIPLoader): the same image
    as the bf16/fp16 files of the same weights, within fp8's rounding, and not identical (the
    scaled files were the ones used)."""
    import copy
    import json
    from pathlib import Path

    import numpy as np

    from ryla.models import formats
    from ryla.models.tensor_files import read_tensors
    from ryla.models.tiny import SCALED_T5XXL, SCALED_TRANSFORMER

    tensors, _ = read_tensors(tiny_store.resolve("diffusion_models", SCALED_TRANSFORMER))
    assert formats.SCALED_FP8_MARKER in tensors and tensors["img_in.weight"].dtype == torch.float8_e4m3fn
    assert tensors["img_in.scale_weight"].dtype == torch.float32
    graph = json.loads((Path(__file__).parent / "workflows" / "clip_text_encode_flux.json").read_text())
    scaled = copy.deepcopy(graph)
    scaled["10"]["inputs"]["unet_name"] = SCALED_TRANSFORMER
    scaled["11"]["inputs"]["clip_name1"] = SCALED_T5XXL
    reference = np.concatenate([np.asarray(i, dtype=np.float64) for i in runtime.run(graph).images])
    result = np.concatenate([np.asarray(i, dtype=np.float64) for i in runtime.run(scaled).images])
    error = np.linalg.norm(result - reference) / np.linalg.norm(reference)
    assert 0 < error <= 0.05, error


@pytest.mark.parametrize("keys,named", [
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
      "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (10, 768)},
     "Stable Diffusion 1.x checkpoint"),
    ({"conditioner.embedders.1.model.ln_final.weight": (1280,), "model.diffusion_model.input_blocks.0.0.weight":
      (320, 4, 3, 3)}, "Stable Diffusion XL checkpoint"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4, 4)}, "Stable Diffusion 3 checkpoint"),
])
def test_a_checkpoint_of_another_family_is_named_on_the_cli_and_over_http(keys, named, cli_env, server, tmp_path):
    import shutil
    import subprocess
    import sys

    import httpx
    from safetensors.torch import save_file

    from ryla.workflows import FLUX_DEV

    tensors = {key: torch.zeros(shape) for key, shape in keys.items()}
    # the CLI, on a copy of the tiny store holding the file
    store = tmp_path / "store"
    shutil.copytree(cli_env["RYLA_TINY_MODELS_DIR"], store)
    save_file(tensors, str(store / "checkpoints" / "other.safetensors"))
    result = subprocess.run([sys.executable, "-m", "ryla.cli.main", "generate", "--prompt", "x", "--width", "64",
                             "--height", "64", "--steps", "1", "--checkpoint", "other.safetensors"],
                            env={**cli_env, "RYLA_MODELS_DIR": str(store)}, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and named in result.stderr and "Traceback" not in result.stderr, result.stderr
    # over HTTP: the server's store is the session's tiny set; the file goes in for this test
    health = httpx.get(server.url + "/health").json()
    target = Path(health["models_dir"]) / "checkpoints" / f"other-{abs(hash(named))}.safetensors"
    save_file(tensors, str(target))
    try:
        graph = FLUX_DEV.fill(prompt="x", width=64, height=64, steps=1, seed=1, checkpoint=target.name)
        response = httpx.post(server.url + "/workflow", json=graph, timeout=120)
        assert 400 <= response.status_code < 500 and named in response.text, response.text
    finally:
        target.unlink()


def test_flux_schnell_loads_from_its_weights_and_samples_with_its_own_shift(runtime):
    """FLUX.1-schnell (no guidance embedding) through UNETLoader, in the shape of ComfyUI's
    schnell example (no FluxGuidance, no ModelSamplingFlux, 4 steps): the config comes from
    the weights, and the schedule uses schnell's shift of 1.0 (comfy/supported_models.py
    FluxSchnell), not dev's 1.15."""
    from ryla.flux import sampling
    from ryla.models.tiny import SCHNELL_TRANSFORMER

    graph = {
        "10": {"class_type": "UNETLoader", "inputs": {"unet_name": SCHNELL_TRANSFORMER, "weight_dtype": "default"}},
        "11": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl_fp16.safetensors",
                                                         "clip_name2": "clip_l.safetensors", "type": "flux"}},
        "12": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["11", 0]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["11", 0]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["10", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                  "latent_image": ["5", 0], "seed": 1, "steps": 4, "cfg": 1.0,
                                                  "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["12", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "schnell"}},
    }
    result = runtime.run(graph)
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    model = runtime.engine.load_diffusion_model(SCHNELL_TRANSFORMER)
    assert model.transformer.config.guidance_embeds is False and model.sampling_shift == 1.0
    dev = runtime.engine.load_diffusion_model("flux1-dev.safetensors")
    assert dev.sampling_shift == sampling.DEFAULT_SHIFT == 1.15


def test_a_diffusers_transformer_folder_loads_through_unetloader(runtime, server):
    """black-forest-labs/FLUX.1-dev's transformer/ layout (config.json, shards, their index;
    diffusers' own key names) in diffusion_models/: UNETLoader lists the folder, not its
    shards, and the image is the one the same weights give from the BFL single file."""
    import copy
    import json
    from pathlib import Path

    import httpx

    from ryla.models.tiny import DIFFUSERS_TRANSFORMER

    graph = json.loads((Path(__file__).parent / "workflows" / "clip_text_encode_flux.json").read_text())
    folder = copy.deepcopy(graph)
    folder["10"]["inputs"]["unet_name"] = DIFFUSERS_TRANSFORMER
    reference = runtime.run(graph).images
    result = runtime.run(folder).images
    assert [image.tobytes() for image in result] == [image.tobytes() for image in reference]
    choices = httpx.get(server.url + "/object_info/UNETLoader").json()["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert DIFFUSERS_TRANSFORMER in choices and not [c for c in choices if c.startswith(DIFFUSERS_TRANSFORMER + "/")]
    assert DIFFUSERS_TRANSFORMER in httpx.get(server.url + "/models/diffusion_models").json()
