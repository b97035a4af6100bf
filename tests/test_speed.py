"""Speed modes on the CPU: what they change in the model, and that images stay the same
(exact) or close (fast), LoRAs included. torch.compile only runs on GPUs, so these check
the transformations the GPU modes are built on; bench/ measures their speed there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lora_files
from ryla.flux.engine import FluxEngine
from ryla.speed.fp8 import Float8Linear, quantize_rows
from ryla.speed.probes import FP8
from ryla.models.tensor_files import read_tensors_streamed
from ryla.runtime import Runtime
from ryla.workflows import FLUX_DEV, flux_lora_graph

PARAMS = dict(prompt="a lighthouse at dusk", width=64, height=64, steps=3, seed=5)


@pytest.fixture(scope="module")
def speed_store(tiny_dir, tmp_path_factory):
    """A private copy of the tiny store with one LoRA, shared by runtimes of each mode."""
    return lora_files.store_with_loras(tiny_dir, tmp_path_factory.mktemp("speed-store"), {"style": (3, ("peft",))},
                                       scale=1.0)


@pytest.fixture(scope="module")
def runtimes(speed_store):
    return {mode: Runtime(speed_store, FluxEngine(speed_store, speed=mode)) for mode in ("eager", "exact", "fast")}


def pixels(runtime, loras=None, **overrides) -> np.ndarray:
    params = {**PARAMS, **overrides}
    graph = flux_lora_graph(loras, **params) if loras else FLUX_DEV.fill(**params)
    return np.asarray(runtime.run(graph).images[0], dtype=np.float32)


def transformer(runtime):
    return runtime.engine.load_checkpoint("flux1-dev-fp8.safetensors")[0].transformer


def test_exact_fuses_qkv_and_keeps_the_image(runtimes):
    exact = pixels(runtimes["exact"])
    names = [name for name, _ in transformer(runtimes["exact"]).named_modules()]
    assert any(name.endswith("attn.to_qkv") for name in names)
    assert not any(name.endswith(("attn.to_q", "attn.add_q_proj")) for name in names)  # no unfused copies kept
    from ryla.speed.attention import FusedInputsFluxAttnProcessor

    processors = {type(m.processor) for m in transformer(runtimes["exact"]).modules() if hasattr(m, "processor")}
    assert processors == {FusedInputsFluxAttnProcessor}
    # float32 on the CPU: one fused matmul instead of three changes rounding only.
    assert np.abs(exact - pixels(runtimes["eager"])).max() <= 1


def test_fast_uses_fp8_layers_and_stays_close(runtimes):
    fast = pixels(runtimes["fast"])
    layers = [m for m in transformer(runtimes["fast"]).modules() if isinstance(m, Float8Linear)]
    assert layers and all(m.weight_fp8.dtype == torch.float8_e4m3fn for m in layers)
    eager = pixels(runtimes["eager"])
    other_seed = pixels(runtimes["eager"], seed=6)
    difference = np.abs(fast - eager).mean()
    assert 0 < difference < np.abs(other_seed - eager).mean() / 4
    from ryla.speed.fp8_attention import Fp8FluxAttnProcessor

    processors = {type(m.processor) for m in transformer(runtimes["fast"]).modules() if hasattr(m, "processor")}
    assert processors == {Fp8FluxAttnProcessor}


def test_loras_on_fused_and_fp8_layers(runtimes):
    for mode in ("exact", "fast"):
        runtime = runtimes[mode]
        base = pixels(runtime)
        assert np.array_equal(pixels(runtime, [("style-peft.safetensors", 0.0)]), base)
        styled = pixels(runtime, [("style-peft.safetensors", 1.0)])
        assert np.abs(styled - base).mean() > 1
        assert np.array_equal(pixels(runtime), base), f"{mode}: base weights not restored exactly"
        # The LoRA does what it does on the eager model.
        eager_styled = pixels(runtimes["eager"], [("style-peft.safetensors", 1.0)])
        assert np.abs(styled - eager_styled).mean() < np.abs(styled - base).mean()


def test_infusenet_gets_the_servers_speed_mode(speed_store):
    controlnet = FluxEngine(speed_store, speed="fast").load_controlnet("InfuseNetModel")
    names = [name for name, _ in controlnet.named_modules()]
    assert any(name.endswith("attn.to_qkv") for name in names)
    assert any(isinstance(m, Float8Linear) for m in controlnet.modules())


def test_fp8_rows_quantise_within_half_a_step():
    weight = torch.randn(16, 64) * torch.logspace(-3, 1, 16)[:, None]
    fp8, scale = quantize_rows(weight)
    error = (fp8.float() * scale[:, None] - weight).abs()
    # e4m3 keeps 3 mantissa bits: relative rounding error at most 2^-4 of each row's scale.
    assert (error <= weight.abs().amax(1, keepdim=True) * 2 ** -4 + 1e-12).all()


@pytest.mark.parametrize("chunk_bytes", [1, 4096, 128 << 20])
def test_streamed_reader_gives_the_files_tensors(tiny_store, chunk_bytes):
    path = tiny_store.resolve("checkpoints", "flux1-dev-fp8.safetensors")
    expected = load_file(str(path))
    tensors, _ = read_tensors_streamed(path, "", "cpu", chunk_bytes=chunk_bytes)
    assert tensors.keys() == expected.keys()
    for key, tensor in expected.items():
        assert tensors[key].dtype == tensor.dtype and tensors[key].shape == tensor.shape
        assert torch.equal(tensors[key].view(torch.uint8), tensor.view(torch.uint8)), key
    vae, _ = read_tensors_streamed(path, "vae.", "cpu")
    assert vae and all(torch.equal(v, expected["vae." + k]) for k, v in vae.items())


def test_streamed_reader_refuses_a_truncated_file(tiny_store, tmp_path):
    from ryla.models.tensor_files import ModelFormatError

    data = tiny_store.resolve("vae", "ae.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="not a valid tensor|ended early"):
        read_tensors_streamed(cut, "", "cpu")


def test_preload_loads_every_part_and_warms_up_compiled_modes(speed_store):
    engine = FluxEngine(speed_store, speed="exact")
    engine.preload("flux1-dev-fp8.safetensors", width=64, height=64)
    assert {name.split(":")[0] for name in engine.loaded_models()} >= {"transformer", "clip_l", "t5xxl", "vae"}
    transformer = engine.load_checkpoint("flux1-dev-fp8.safetensors")[0].transformer
    calls = []
    handle = transformer.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        from ryla.flux.components import FluxModel

        model = FluxModel("flux1-dev-fp8.safetensors", transformer)
        assert engine.warm_up(model, 64, 64) == 0.0 and not calls  # nothing compiled on a CPU: nothing to warm
        engine.speed_info = {**engine.speed_info, "compiled": "repeated blocks"}  # as on a GPU
        assert engine.warm_up(model, 64, 64) > 0 and len(calls) == 1
    finally:
        handle.remove()


@pytest.mark.parametrize("fp8", ["none", "linear", "linear+attention"])
def test_lean_block_forwards_compute_what_diffusers_blocks_do(fp8):
    """Same numbers as diffusers' blocks, also where GELU moves into fp8 quantisation and fp8
    attention's output goes into the output projections without being dequantised first."""
    import copy

    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    from ryla.speed.blocks import use_lean_forwards
    from ryla.speed.fp8 import quantize_linear_layers
    from ryla.speed.fp8_attention import use_fp8_attention

    torch.manual_seed(0)
    stock = torch.nn.ModuleList([FluxSingleTransformerBlock(dim=64, num_attention_heads=2, attention_head_dim=32),
                                 FluxTransformerBlock(dim=64, num_attention_heads=2, attention_head_dim=32)]).eval()
    if fp8 != "none":
        quantize_linear_layers(stock, lambda name: True)
    if fp8 == "linear+attention":
        use_fp8_attention(stock)
    lean = copy.deepcopy(stock)
    assert use_lean_forwards(lean) == 6  # the two blocks; the double block's two feed-forwards and their GELUs
    image, text, temb = torch.randn(1, 16, 64), torch.randn(1, 8, 64), torch.randn(1, 64)
    with torch.no_grad():
        for stock_block, lean_block in zip(stock, lean):
            for expected, got in zip(stock_block(image, text, temb), lean_block(image, text, temb)):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("speed", ["exact", "fast"])
def test_the_speed_modes_blocks_trace_whole_under_the_pinned_torch(speed):
    """torch.compile traces each block of a speed mode as one graph (fullgraph, as the GPU modes
    compile them), with the torch and diffusers pinned, and the traced blocks compute what the
    blocks compute. (diffusers marks its block classes allow_in_graph; under torch 2.13 a lean
    forward that reached diffusers' forward through the block's class broke the trace.)"""
    from diffusers import FluxTransformer2DModel

    from ryla.speed.modes import optimize_transformer

    torch.manual_seed(0)
    lean = FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                                  guidance_embeds=True, axes_dims_rope=(16, 24, 24)).eval()
    for module in lean.modules():
        if isinstance(module, torch.nn.RMSNorm) and module.weight is not None:
            module.weight.data.uniform_(0.5, 2.0)
    optimize_transformer(lean, speed, compile=False)
    image, text, temb = torch.randn(1, 32, 128), torch.randn(1, 8, 128), torch.randn(1, 128)
    positions = torch.randn(40, 32).cumsum(0).repeat_interleave(2, dim=-1)
    rotary = (positions.cos(), positions.sin())
    torch._dynamo.reset()
    with torch.no_grad():
        for block in (*lean.transformer_blocks, *lean.single_transformer_blocks):
            traced = torch.compile(block, fullgraph=True, backend="aot_eager")
            for got, want in zip(traced(image, text, temb, image_rotary_emb=rotary),
                                 block(image, text, temb, image_rotary_emb=rotary)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("repeat", [False, True])
def test_blocks_add_controlnet_residuals_as_diffusers_loop_does(repeat):
    """A transformer whose blocks add their ControlNet residuals themselves
    (ryla.speed.blocks.with_block_residuals) gives, bit for bit, what the same blocks give with
    the residuals added in diffusers' FluxTransformer2DModel.forward loop: residuals
    spread over the blocks as its loop spreads them (every ceil(blocks / residuals)-th block
    the next one, or in turn for XLabs' repeat), with and without residuals, and none left on
    the blocks after a call."""
    import copy

    from diffusers import FluxTransformer2DModel

    from ryla.speed.blocks import RESIDUAL, use_lean_forwards

    torch.manual_seed(0)
    stock = FluxTransformer2DModel(in_channels=16, num_layers=3, num_single_layers=5, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                                   guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    use_lean_forwards(stock, block_residuals=False)  # lean blocks, residuals added in diffusers' loop
    lean = copy.deepcopy(stock)
    use_lean_forwards(lean)
    tokens, text = 16, 8
    inputs = dict(hidden_states=torch.randn(1, tokens, 16), encoder_hidden_states=torch.randn(1, text, 32),
                  pooled_projections=torch.randn(1, 24), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                  img_ids=torch.randn(tokens, 3), txt_ids=torch.zeros(text, 3), return_dict=False)
    residuals = dict(controlnet_block_samples=[torch.randn(1, tokens, 32) for _ in range(2)],
                     controlnet_single_block_samples=[torch.randn(1, tokens, 32) for _ in range(2)],
                     controlnet_blocks_repeat=repeat)
    with torch.no_grad():
        for given in (residuals, {}, residuals):
            expected, got = stock(**inputs, **given)[0], lean(**inputs, **given)[0]
            assert torch.equal(got, expected)
            assert all(getattr(block, RESIDUAL) is None
                       for block in [*lean.transformer_blocks, *lean.single_transformer_blocks])
        assert not torch.equal(lean(**inputs, **residuals)[0], lean(**inputs)[0])


def test_fp8_weight_storage_works_with_speed_modes(speed_store):
    """UNETLoader's weight_dtype fp8 keeps weights in fp8 and casts each layer when it runs;
    the speed mode's fused and split layers must see the cast weights too."""
    from ryla.flux.components import Cond

    latents = {}
    for mode in ("eager", "exact"):
        engine = FluxEngine(speed_store, speed=mode)
        model = engine.load_diffusion_model("flux1-dev.safetensors", "fp8_e4m3fn")
        config = model.transformer.config
        generator = torch.Generator().manual_seed(0)
        cond = Cond(t5=torch.randn(1, 16, config.joint_attention_dim, generator=generator),
                    pooled=torch.randn(1, config.pooled_projection_dim, generator=generator))
        noise = torch.randn(1, 16, 8, 8, generator=generator)
        latents[mode] = engine.sample(model, (cond,), None, torch.zeros_like(noise), noise,
                                      torch.tensor([1.0, 0.5, 0.0]), 1.0)
    torch.testing.assert_close(latents["exact"], latents["eager"], rtol=1e-4, atol=1e-4)


def flux_block_pair(dtype=torch.float32):
    """A FLUX single block and double block (2 heads of 64), with RMSNorm weights other than
    ones, as in trained models."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([FluxSingleTransformerBlock(dim=128, num_attention_heads=2, attention_head_dim=64),
                                  FluxTransformerBlock(dim=128, num_attention_heads=2, attention_head_dim=64)])
    for module in blocks.modules():
        if isinstance(module, torch.nn.RMSNorm) and module.weight is not None:
            module.weight.data.uniform_(0.5, 2.0)
    return blocks.eval().to(dtype)


def paired_block_outputs(stock, changed, dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(stock's, changed's) outputs of each block on the same inputs: text and image streams,
    RoPE on (FLUX's tables: each angle serves a pair of columns)."""
    image, text, temb = (torch.randn(*shape).to(dtype) for shape in ((1, 32, 128), (1, 8, 128), (1, 128)))
    positions = torch.randn(40, 32).cumsum(0).repeat_interleave(2, dim=-1)
    rotary = (positions.cos(), positions.sin())
    pairs = []
    with torch.no_grad():
        for stock_block, changed_block in zip(stock, changed):
            pairs += zip(stock_block(image, text, temb, image_rotary_emb=rotary),
                         changed_block(image, text, temb, image_rotary_emb=rotary))
    return pairs


def test_fp8_attention_stays_within_fp8_error_of_attention():
    """Both FLUX block kinds, text and image streams, RoPE on: the fp8 processor's output is
    close to diffusers' attention, and not identical to it (Q, K, V really went through e4m3)."""
    import copy

    from ryla.speed.fp8_attention import use_fp8_attention

    stock = flux_block_pair()
    fp8 = copy.deepcopy(stock)
    assert use_fp8_attention(fp8) == 2
    for expected, got in paired_block_outputs(stock, fp8):
        error = ((got - expected).norm() / expected.norm()).item()
        assert 0 < error < 0.03


def test_fp8_attention_scale_bound_holds_for_the_worst_head_vector():
    """A head vector with all its weight on one entry reaches the bound sqrt(head_dim) *
    max|norm weight| exactly; RoPE cannot push it higher. So it maps to e4m3's largest value,
    unclipped, and smaller entries keep their relative precision."""
    from diffusers.models.normalization import RMSNorm

    from ryla.speed.fp8 import FP8_MAX, to_fp8
    from ryla.speed.attention import rope_float
    from ryla.speed.fp8_attention import _norm_weight_bound

    dim = 64
    norm = RMSNorm(dim, eps=1e-6)
    norm.weight.data = torch.linspace(0.5, 1.5, dim)
    x = torch.zeros(1, 3, 1, dim)
    x[..., -1] = 5.0  # the entry with the largest weight
    x[0, 1, 0, :] = torch.randn(dim)  # an ordinary vector beside it
    angles = torch.rand(3, dim // 2).repeat_interleave(2, dim=-1) * 6.28
    rotated = rope_float(norm(x), (angles.cos(), angles.sin()))
    scale = _norm_weight_bound(norm) * dim ** 0.5 / FP8_MAX
    assert rotated.abs().max() <= scale * FP8_MAX * (1 + 1e-6)
    quantized = to_fp8(rotated, scale).float() * scale
    assert torch.allclose(quantized, rotated, rtol=0.07, atol=1e-6)  # e4m3: 3 mantissa bits


def test_fused_attention_inputs_compute_what_diffusers_attention_does(monkeypatch):
    """exact's attention processor (Q/K norms, RoPE and layout in one step) against diffusers'
    FluxAttnProcessor: both block kinds, text and image streams, RoPE on, norms with weights
    other than ones. On the CPU the inputs come from the PyTorch version of the kernel's
    arithmetic; masks and unfused projections go through diffusers' processor."""
    import copy

    import ryla.speed.attention as attention

    stock = flux_block_pair()
    fused = copy.deepcopy(stock)
    for block in fused:
        block.attn.fuse_projections()
    assert attention.use_fused_attention_inputs(fused) == 2
    prepared = []
    reference = attention.reference_attention_inputs
    monkeypatch.setattr(attention, "reference_attention_inputs", lambda *a: prepared.append(a) or reference(*a))
    for expected, got in paired_block_outputs(stock, fused):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(prepared) == 2
    unfused = copy.deepcopy(stock)  # no to_qkv: diffusers' processor
    attention.use_fused_attention_inputs(unfused)
    for expected, got in paired_block_outputs(stock, unfused):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert len(prepared) == 2


# FlashAttention-3's forward op as its Hopper build declares it (the schema xformers checks).
FA3_FORWARD_SCHEMA = (
    "fwd(Tensor q, Tensor k, Tensor v, Tensor(k_new!)? k_new=None, Tensor(v_new!)? v_new=None, Tensor? q_v=None, "
    "Tensor(out!)? out=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, Tensor? cu_seqlens_k_new=None, "
    "Tensor? seqused_q=None, Tensor? seqused_k=None, int? max_seqlen_q=None, int? max_seqlen_k=None, "
    "Tensor? page_table=None, Tensor? kv_batch_idx=None, Tensor? leftpad_k=None, Tensor? rotary_cos=None, "
    "Tensor? rotary_sin=None, Tensor? seqlens_rotary=None, Tensor? q_descale=None, Tensor? k_descale=None, "
    "Tensor? v_descale=None, float? softmax_scale=None, bool is_causal=False, int window_size_left=-1, "
    "int window_size_right=-1, int attention_chunk=0, float softcap=0., bool is_rotary_interleaved=False, "
    "Tensor? scheduler_metadata=None, int num_splits=0, bool? pack_gqa=None, int sm_margin=0) "
    "-> (Tensor(out!), Tensor, Tensor, Tensor)")


@pytest.fixture(scope="module")
def fake_flash_attention_3():
    """torch.ops.flash_attn_3.fwd with FA3's schema, computed by PyTorch's attention on the CPU
    (FA3's kernels are Hopper-only): what ryla's FA3 path calls, the calls it got, and a
    switch that makes it wrong."""
    if hasattr(torch.ops.flash_attn_3, "fwd"):
        pytest.skip("a real flash_attn_3 is loaded")
    calls, state = [], {"broken": False}

    def forward(q, k, v, *args):
        scale = args[20] if len(args) > 20 else None
        calls.append({"shape": tuple(q.shape), "scale": scale, "args": len(args) + 3, "v_row_stride": v.stride(1)})
        if state["broken"]:
            return v.contiguous(), torch.zeros(q.shape[0], q.shape[2], q.shape[1]), torch.empty(0), torch.empty(0)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1])
        return out.transpose(1, 2).contiguous(), lse, torch.empty(0), torch.empty(0)

    library = torch.library.Library("flash_attn_3", "DEF")
    library.define(FA3_FORWARD_SCHEMA)
    library.impl("fwd", forward, "CPU")
    yield calls, state
    library._destroy()


def test_flash_attention_3_path_computes_attention_on_our_layout(fake_flash_attention_3):
    """With FlashAttention-3 present, exact's processor hands it [batch, seq, heads, dim]
    views of the prepared buffer and FLUX's scale (in single blocks, V straight from the
    projection's output, rows 3x wider); the blocks' outputs match diffusers'. The start-up
    check accepts a build that computes attention and refuses one that does not."""
    import copy

    from ryla.speed.attention import FusedInputsFluxAttnProcessor, use_fused_attention_inputs

    stock = flux_block_pair(torch.bfloat16)
    fused = copy.deepcopy(stock)
    for block in fused:
        block.attn.fuse_projections()
    use_fused_attention_inputs(fused)
    processors = [m.processor for m in fused.modules() if isinstance(getattr(m, "processor", None),
                                                                        FusedInputsFluxAttnProcessor)]
    assert len(processors) == 2 and not any(p.flash_attention_3 for p in processors)  # no GPU here
    for processor in processors:
        processor.flash_attention_3 = True  # as on a Hopper GPU with FA3 installed
    for expected, got in paired_block_outputs(stock, fused, torch.bfloat16):
        assert ((got.float() - expected.float()).norm() / expected.float().norm()).item() < 0.01
    calls, state = fake_flash_attention_3
    assert [c["shape"] for c in calls] == [(1, 40, 2, 64), (1, 40, 2, 64)]
    assert all(c["scale"] == pytest.approx(64 ** -0.5) for c in calls)
    # the single block's V is read in place; the double block's is copied beside its text rows
    assert [c["v_row_stride"] for c in calls] == [3 * 2 * 64, 2 * 64]

    from ryla.speed.attention import _flash_attention_3_agrees_with_pytorch

    assert _flash_attention_3_agrees_with_pytorch("cpu")
    state["broken"] = True
    try:
        assert not _flash_attention_3_agrees_with_pytorch("cpu")
    finally:
        state["broken"] = False


def test_fast_group_norms_keep_the_vae_decode():
    """The VAE's GroupNorms with the SiLU after them moved inside: every norm of the tiny VAE
    changes, the blocks' own SiLUs go, and decoding gives the same bits (on the CPU the norms
    run PyTorch's GroupNorm, so this checks the rewiring; the kernel has its own test)."""
    import copy

    from diffusers import AutoencoderKL

    from ryla.flux.loading import _public
    from ryla.speed.vae_norms import use_fast_group_norms
    from ryla.models.tiny import TINY_VAE

    torch.manual_seed(0)
    vae = AutoencoderKL(**_public(TINY_VAE)).eval()
    fast = copy.deepcopy(vae)
    norms = [m for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert use_fast_group_norms(fast) == len(norms)
    assert not any(isinstance(m, torch.nn.SiLU) for m in fast.decoder.modules())
    latent = torch.randn(1, TINY_VAE["latent_channels"], 8, 8)
    with torch.no_grad():
        assert torch.equal(fast.decode(latent).sample, vae.decode(latent).sample)
        image = torch.rand(1, 3, 32, 32) * 2 - 1
        assert torch.equal(fast.encode(image).latent_dist.mode(), vae.encode(image).latent_dist.mode())


@pytest.mark.parametrize("channels_last_kernel_agrees", [True, False])
def test_compiled_modes_put_the_vae_in_channels_last_where_its_kernel_agrees(monkeypatch, channels_last_kernel_agrees):
    """optimize_vae: in channels-last (where that layout's start-up check passes, as on the
    H200: a lower decode peak) and otherwise NCHW, decoding and encoding the same either way;
    eager leaves the VAE alone. The GPU checks are replaced here, the layouts are real."""
    import copy

    from diffusers import AutoencoderKL

    from ryla.speed import vae_norms
    from ryla.flux.loading import _public
    from ryla.speed.modes import optimize_vae
    from ryla.models.tiny import TINY_VAE

    monkeypatch.setattr(vae_norms, "fast_group_norm_available", lambda: True)
    monkeypatch.setattr(vae_norms, "channels_last_group_norm_available", lambda: channels_last_kernel_agrees)
    torch.manual_seed(0)
    vae = AutoencoderKL(**_public(TINY_VAE)).eval()
    optimized, eager = copy.deepcopy(vae), copy.deepcopy(vae)
    info = optimize_vae(optimized, "exact")
    assert optimize_vae(eager, "eager") == {}
    conv = optimized.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last_kernel_agrees
    assert eager.decoder.conv_in.weight.is_contiguous()
    assert info.get("vae_memory_format") == ("channels_last" if channels_last_kernel_agrees else None)
    latent = torch.randn(1, TINY_VAE["latent_channels"], 8, 8)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        decoded = optimized.decode(latent).sample
        assert decoded.is_contiguous(memory_format=torch.channels_last) == channels_last_kernel_agrees
        torch.testing.assert_close(decoded, vae.decode(latent).sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(optimized.encode(image).latent_dist.mode(), vae.encode(image).latent_dist.mode(),
                                   rtol=1e-5, atol=1e-5)


def run_in_tritons_interpreter(tmp_path, source: str, timeout: int) -> None:
    """Run a check script in a fresh Python with TRITON_INTERPRET=1 (the interpreter is chosen
    when kernels are defined, so not in this process); it must print "ok" last."""
    import os
    import subprocess
    import sys

    script = tmp_path / "kernel_check.py"
    script.write_text(source)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_group_norm_kernel_runs_in_tritons_interpreter(tmp_path):
    """ryla.speed.kernels' two-pass GroupNorm (+ SiLU) in Triton's CPU interpreter against
    PyTorch, in NCHW and in channels-last: groups split into several chunks, a mean far from
    zero, two images; the start-up checks accept it and refuse a kernel that computes something
    else."""
    pytest.importorskip("triton")
    run_in_tritons_interpreter(tmp_path, """
import torch, torch.nn.functional as F
from ryla.speed.kernels import group_norm
from ryla.speed.vae_norms import _agrees_with_pytorch
torch.manual_seed(0)
for shape, groups, silu, offset in (((1, 4, 64, 64), 2, True, 0.0), ((2, 12, 9, 7), 3, False, 30.0),
                                    ((1, 8, 40, 40), 4, True, 5.0)):
    x = (torch.randn(shape) * 2 + offset).to(torch.bfloat16)
    weight, bias = (torch.rand(shape[1]) + 0.5).to(torch.bfloat16), torch.randn(shape[1]).to(torch.bfloat16)
    got = group_norm(x, groups, weight, bias, 1e-6, silu).float()
    expected = F.group_norm(x.float(), groups, weight.float(), bias.float(), 1e-6)
    expected = F.silu(expected) if silu else expected
    assert ((got - expected).abs() <= expected.abs() * 2 ** -7 + 0.02).all(), (got - expected).abs().max()
    # channels-last ([batch, H, W, channels] in memory): its own kernels, the same numbers
    last = group_norm(x.contiguous(memory_format=torch.channels_last), groups, weight, bias, 1e-6, silu)
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert ((last.float() - expected).abs() <= expected.abs() * 2 ** -7 + 0.02).all()
    assert ((last.float() - got).abs() <= got.abs() * 2 ** -7 + 0.01).all()
assert _agrees_with_pytorch(group_norm, "cpu")
assert _agrees_with_pytorch(group_norm, "cpu", channels_last=True)
assert not _agrees_with_pytorch(lambda x, *args, **kwargs: x.clone(), "cpu")
assert not _agrees_with_pytorch(lambda x, *args, **kwargs: x.clone(), "cpu", channels_last=True)
print("ok")
""", timeout=300)


def test_attention_inputs_kernel_runs_in_tritons_interpreter(tmp_path):
    """ryla.speed.kernels' attention-inputs kernel in Triton's CPU interpreter against the
    PyTorch arithmetic: one and two batch entries, with and without a text stream and RoPE,
    an input whose rows are wider than Q, K and V, one head or all heads a program, with and
    without V. V is copied bit for bit; Q and K are within one bf16 step (the interpreter rounds
    to bf16 its own way). Other dtypes are refused."""
    pytest.importorskip("triton")
    run_in_tritons_interpreter(tmp_path, """
import itertools, torch
from ryla.speed.attention import reference_attention_inputs
from ryla.speed.kernels import launch_attention_inputs
torch.manual_seed(0)
heads, dim = 3, 16
for text_rows, rope, batch, all_heads in itertools.product((0, 6), (True, False), (1, 2), (True, False)):
    rows = 37
    wide = (torch.randn(batch, rows, 3 * heads * dim + 8) * 3).to(torch.bfloat16)
    qkv = wide[..., 4:4 + 3 * heads * dim]
    text = torch.randn(batch, text_rows, 3 * heads * dim).to(torch.bfloat16) if text_rows else None
    weights = [torch.rand(dim).to(torch.bfloat16) + 0.5 for _ in range(4)]
    angles = torch.randn(text_rows + rows, dim // 2).repeat_interleave(2, 1)
    cos, sin = (angles.cos(), angles.sin()) if rope else (None, None)
    expected = reference_attention_inputs(qkv.float(), weights[0], weights[1], text.float() if text_rows else None,
                                          weights[2], weights[3], cos, sin, dim, 1e-6)
    out = torch.full((3, batch, text_rows + rows, heads, dim), float("nan"), dtype=torch.bfloat16)
    if text_rows:
        launch_attention_inputs(text, weights[2], weights[3], cos, sin, out, 0, 1e-6, block_rows=16,
                                all_heads=all_heads)
    launch_attention_inputs(qkv, weights[0], weights[1], cos, sin, out, text_rows, 1e-6, block_rows=16,
                            all_heads=all_heads)
    assert torch.equal(out[2], expected[2].to(torch.bfloat16))
    error = (out[:2].float() - expected[:2]).abs()
    assert (error <= expected[:2].abs() * 2 ** -7 + 1e-6).all(), error.max()
    if not text_rows:  # Q and K only (single blocks with FA3 read V in place)
        only_qk = torch.full((2, batch, rows, heads, dim), float("nan"), dtype=torch.bfloat16)
        launch_attention_inputs(qkv, weights[0], weights[1], cos, sin, only_qk, 0, 1e-6, block_rows=16,
                                all_heads=all_heads)
        assert torch.equal(only_qk, out[:2])
try:
    launch_attention_inputs(qkv.float(), *weights[:2], None, None, out.float(), 0, 1e-6)
except ValueError as exc:
    assert "float32" in str(exc)
else:
    raise AssertionError("float32 accepted")
print("ok")
""", timeout=240)


def test_gelu_quantize_kernel_runs_in_tritons_interpreter(tmp_path):
    """ryla.speed.kernels' one-pass GELU + per-row fp8 scaling, run by Triton's CPU interpreter
    (a fresh process: the interpreter is chosen when kernels are defined), against PyTorch.
    The output is float32 here: the interpreter's own fp8 rounding differs from the GPU's."""
    pytest.importorskip("triton")
    run_in_tritons_interpreter(tmp_path, """
import itertools, torch, torch.nn.functional as F
from ryla.speed.kernels import FP8_MAX, TUNING_CONFIGS, launch_gelu_quantize_rows
torch.manual_seed(0)
wide = torch.randn(4, 3000, dtype=torch.bfloat16) * 4
for x, gelu, config in itertools.product((wide[:, 100:2600], wide), (True, False), TUNING_CONFIGS):
    if True:  # a column slice (row stride > width) and a whole tensor; one-pass and chunked
        out, scale = torch.empty(x.shape), torch.empty(x.shape[0], 1)
        launch_gelu_quantize_rows(x, out, scale, gelu, config)
        y = F.gelu(x.float(), approximate="tanh") if gelu else x.float()
        expected_scale = y.abs().amax(1, keepdim=True) / FP8_MAX
        torch.testing.assert_close(scale, expected_scale, rtol=1e-6, atol=0)
        torch.testing.assert_close(out, y / expected_scale, rtol=1e-5, atol=1e-4)
        assert out.abs().max() <= FP8_MAX
print("ok")
""", timeout=240)


@pytest.mark.slow
def test_serve_fast_over_http_reports_fp8_and_stays_close_to_eager(server, server_env, tmp_path):
    """`ryla serve --speed fast` end to end: /health says what the mode did (fp8 layers, fp8
    attention and which kernel runs it), and /flux-dev's image is close to the default (eager)
    server's for the same request, but not the same bytes."""
    import io

    import httpx
    from PIL import Image

    from conftest import Server

    request = {"prompt": "a red fox in the snow", "width": 128, "height": 128, "steps": 3, "seed": 11,
               "output_format": "png"}
    fast = Server(server_env, "--speed", "fast", log_path=tmp_path / "fast.log")
    try:
        speed = httpx.get(fast.url + "/health", timeout=10).json()["speed"]
        fast_image = httpx.post(fast.url + "/flux-dev", json=request, timeout=120)
    finally:
        fast.stop()
    assert speed["speed"] == "fast" and speed["fused_qkv"] and speed["fp8_linear_layers"] > 0
    assert speed["attention"] == "fp8 (PyTorch SDPA on dequantised fp8)"  # no Hopper GPU here
    eager_image = httpx.post(server.url + "/flux-dev", json=request, timeout=120)
    assert fast_image.status_code == eager_image.status_code == 200
    assert fast_image.content != eager_image.content
    fast_pixels, eager_pixels = (np.asarray(Image.open(io.BytesIO(r.content)), dtype=np.float32)
                                 for r in (fast_image, eager_image))
    other_seed = httpx.post(server.url + "/flux-dev", json={**request, "seed": 12}, timeout=120)
    other_pixels = np.asarray(Image.open(io.BytesIO(other_seed.content)), dtype=np.float32)
    difference = np.abs(fast_pixels - eager_pixels).mean()
    # of 255 (0.09 measured): fp8 rounding, not another image (another seed: ~57)
    assert difference < 1 < np.abs(other_pixels - eager_pixels).mean()


def test_wide_row_reductions_become_persistent_in_inductors_heuristics():
    """FLUX's 3072-wide LayerNorm rows get one-pass reductions; wider rows, column-wise
    reductions and cooperative ones are left to Inductor's own rule."""
    import sympy
    import torch._inductor.config as inductor_config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    from ryla.speed.inductor_heuristics import PERSISTENT_ROW_LIMIT, persistent_row_reduction
    from ryla.speed.modes import use_wide_persistent_reductions

    assert persistent_row_reduction(3072, True, False) is True
    assert persistent_row_reduction(sympy.Integer(PERSISTENT_ROW_LIMIT), True, False) is True
    assert persistent_row_reduction(2 * PERSISTENT_ROW_LIMIT, True, False) is None
    assert persistent_row_reduction(3072, False, False) is None
    assert persistent_row_reduction(3072, True, True) is None
    assert persistent_row_reduction(sympy.Symbol("s0"), True, False) is None

    class RowReduction:  # what Inductor asks about: a kernel's reduction features
        def __init__(self, width):
            self.reduction_numel = sympy.Integer(width)

        def get_reduction_hint(self):
            return ReductionHint.INNER

    try:
        assert use_wide_persistent_reductions()
        assert V.choices.should_use_persistent_reduction(RowReduction(3072), False)
        assert V.choices.uuid() == f"ryla-persistent-rows-{PERSISTENT_ROW_LIMIT}"  # keys the compile cache
        if hasattr(inductor_config, "inductor_choices_class"):  # other threads' compiles too
            assert inductor_config.inductor_choices_class().should_use_persistent_reduction(RowReduction(3072), False)
    finally:
        if hasattr(inductor_config, "inductor_choices_class"):
            inductor_config.inductor_choices_class = None
        V.set_choices_handler(InductorChoices())


def test_precomputed_modulation_serves_every_call_and_keeps_the_latents(runtimes, monkeypatch):
    """exact computes the blocks' modulations for all steps before sampling: with CFG, two
    positive conditionings and a batch of 2, every block's modulation in every call comes from
    the plan, the latents match per-call products, and nothing stays selected afterwards."""
    from ryla.speed import modulation
    from ryla.flux.components import Cond

    engine = runtimes["exact"].engine
    model = engine.load_checkpoint("flux1-dev-fp8.safetensors")[0]
    layers = model.transformer._ryla_modulation_layers
    blocks = len(model.transformer.transformer_blocks) * 2 + len(model.transformer.single_transformer_blocks)
    assert len(layers) == blocks
    config = model.transformer.config
    generator = torch.Generator().manual_seed(0)

    def cond(guidance):
        return Cond(t5=torch.randn(1, 16, config.joint_attention_dim, generator=generator),
                    pooled=torch.randn(1, config.pooled_projection_dim, generator=generator), guidance=guidance)

    positive, negative = (cond(3.5), cond(2.0)), (cond(None),)
    noise = torch.randn(2, 16, 8, 8, generator=generator)
    sigmas = torch.tensor([1.0, 0.7, 0.3, 0.0])
    served = []  # per modulation call: did it get planned rows, and are they the product?

    def observe(layer, args, output):
        planned = modulation._SELECTED.get(layer.weight.data_ptr())
        served.append(planned is not None and torch.allclose(
            output, torch.nn.functional.linear(args[0], layer.weight, layer.bias), rtol=1e-5, atol=1e-6))

    hooks = [layer.register_forward_hook(observe) for layer in layers]
    try:
        planned = engine.sample(model, positive, negative, torch.zeros_like(noise), noise, sigmas, 2.5)
        calls = 3 * (len(positive) + len(negative))
        assert len(served) == calls * blocks and all(served)
        assert not modulation._SELECTED
        served.clear()
        monkeypatch.setattr(modulation, "MAX_PLAN_BYTES", 0)  # too large a plan: per-call products
        per_call = engine.sample(model, positive, negative, torch.zeros_like(noise), noise, sigmas, 2.5)
        assert len(served) == calls * blocks and not any(served)
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(planned, per_call, rtol=1e-5, atol=1e-5)


def test_modulation_rows_are_dropped_when_the_transformer_returns(runtimes):
    """A transformer call the engine did not plan never sees another call's rows."""
    from ryla.speed import modulation

    transformer = runtimes["exact"].engine.load_checkpoint("flux1-dev-fp8.safetensors")[0].transformer
    config = transformer.config
    calls = {"only": (torch.tensor([0.5]), torch.tensor([3.5]), torch.randn(1, config.pooled_projection_dim))}
    plan = modulation.ModulationPlan(transformer, calls, torch.float32)
    plan.select("only")
    assert len(modulation._SELECTED) == len(transformer._ryla_modulation_layers)
    tokens = 4
    with torch.inference_mode():
        transformer(hidden_states=torch.randn(1, tokens, config.in_channels),
                    encoder_hidden_states=torch.randn(1, 3, config.joint_attention_dim),
                    pooled_projections=calls["only"][2], timestep=calls["only"][0], guidance=calls["only"][1],
                    img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(3, 3), return_dict=False)
    assert not modulation._SELECTED
    plan.close()


def test_compiled_blocks_read_the_selected_modulation_rows_without_recompiling():
    """Inside a torch.compile'd block the modulation is looked up when the block runs: rows
    selected for one call, then another, give each call its rows, with no recompilation."""
    from ryla.speed import modulation

    single, double = flux_block_pair()
    holder = torch.nn.Module()
    holder.transformer_blocks, holder.single_transformer_blocks = torch.nn.ModuleList([double]), torch.nn.ModuleList([single])
    assert modulation.use_precomputed_modulation(holder) == 3
    generator = torch.Generator().manual_seed(1)
    image, text = torch.randn(1, 8, 128, generator=generator), torch.randn(1, 4, 128, generator=generator)
    embeddings = [torch.randn(1, 128, generator=generator) for _ in range(3)]
    linear = single.norm.linear
    with torch.inference_mode():
        expected = [single(image, text, emb) for emb in embeddings[:2]]  # nothing selected: computed
        compiled = torch.compile(single, fullgraph=True, backend="inductor")
        torch._dynamo.reset()
        with torch._dynamo.config.patch(error_on_recompile=True):
            for emb, reference in zip(embeddings[:2], expected):
                modulation._SELECTED[linear.weight.data_ptr()] = F.linear(F.silu(emb), linear.weight, linear.bias)
                try:
                    out = compiled(image, text, embeddings[2])  # another temb: the selected rows decide
                finally:
                    modulation._SELECTED.clear()
                for got, want in zip(out, reference):
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("speed", ["exact", "fast"])
def test_model_code_imported_ahead_leaves_loading_nothing_to_import(tiny_dir, speed):
    """Modal's memory snapshot is taken after import_model_code: a module that loading or the
    speed mode still imports afterwards is imported again at every cold start. The imports
    start no thread."""
    import subprocess
    import sys

    probe = f"""
import sys
from pathlib import Path
from ryla.flux.engine import FluxEngine, import_model_code
from ryla.models.store import ModelStore
import_model_code({speed!r})
import threading, torch
# what a memory snapshot cannot hold: threads (Inductor's compile workers start with the first
# compile, not at import) and a CUDA context
assert threading.active_count() == 1 and not torch.cuda.is_initialized()
loaded = {{id(module) for module in sys.modules.values()}}
engine = FluxEngine(ModelStore(Path({str(tiny_dir)!r}), tiny=True), speed={speed!r})
engine.preload("flux1-dev-fp8.safetensors", 64, 64)
# by module object: transformers registers its *_fast tokenizer names as aliases of loaded modules
late = [name for name, module in list(sys.modules.items()) if id(module) not in loaded
        and name.startswith(("diffusers.", "ryla.", "torch._dynamo", "torch._inductor", "transformers.models.clip",
                            "transformers.models.t5"))]
print(sorted(late))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_dequantize_add_quantize_kernel_runs_in_tritons_interpreter(tmp_path):
    """The fast mode's LoRA kernel (ryla.speed.kernels.add_quantize_rows_grouped) in Triton's
    CPU interpreter: fp8 rows times their scales plus factor x the LoRA product, then new row
    scales and values, against PyTorch's quantize_rows of the same sum; rows wider than one
    block, a row slice of a fused layer, a bf16 product (ryla's), and three layers in one
    launch, each at its own place in memory, then again through one table of their addresses
    made once (as a kept SwitchPlan launches). float32 output, as for gelu_quantize_rows."""
    pytest.importorskip("triton")
    run_in_tritons_interpreter(tmp_path, """
import torch
from ryla.speed.fp8 import quantize_rows
from ryla.speed.kernels import (FP8_MAX, add_quantize_rows_grouped, add_quantize_rows_table, dequantize_add_quantize_rows,
                                row_pointer_table)
torch.manual_seed(0)

def check(fp8, scale, product, factor, out, out_scale):
    y = fp8.float() * scale[:, None] + factor * product.float()
    expected_scale = y.abs().amax(1) / FP8_MAX
    torch.testing.assert_close(out_scale, expected_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(out, y / expected_scale[:, None], rtol=1e-5, atol=1e-4)

weight = torch.randn(12, 5000) * 0.05
fp8, scale = quantize_rows(weight)
delta = torch.randn(12, 5000) * 0.01
for rows, product in ((slice(None), delta), (slice(4, 8), delta), (slice(None), delta.bfloat16())):
    out, out_scale = torch.empty(fp8[rows].shape), torch.empty(fp8[rows].shape[0])
    dequantize_add_quantize_rows(fp8[rows], scale[rows], product[rows], 0.7, out, out_scale, block=2048)
    check(fp8[rows], scale[rows], product[rows], 0.7, out, out_scale)
# three layers of 4 rows in one launch: two whole layers and rows 4-7 of a fused one
layers = [quantize_rows(torch.randn(4, 300) * 0.05) for _ in range(2)]
fused, fused_scale = quantize_rows(torch.randn(12, 300) * 0.05)
originals = layers + [(fused[4:8], fused_scale[4:8])]
products = (torch.randn(3, 4, 300) * 0.01).bfloat16()
outs = [(torch.empty(4, 300), torch.empty(4)) for _ in range(3)]
add_quantize_rows_grouped(originals, products, 1.0, outs, block=128, num_warps=4)
for (w, s), product, (out, out_scale) in zip(originals, products, outs):
    check(w, s, product, 1.0, out, out_scale)
# one table of the layers' addresses, made once, serves later launches with other products
table = row_pointer_table(originals, outs)
for _ in range(2):
    products = (torch.randn(3, 4, 300) * 0.01).bfloat16()
    add_quantize_rows_table(table, products, 0.5, torch.float32, block=128, num_warps=4)
    for (w, s), product, (out, out_scale) in zip(originals, products, outs):
        check(w, s, product, 0.5, out, out_scale)
print("ok")
""", timeout=240)


def test_fast_mode_layers_take_loras_in_groups_of_one_shape():
    """WeightPatcher on fast mode's fp8 layers: layers of one shape and one set of LoRA ranks and
    scales get their products from one batched GEMM (in launches of at most
    FP8_ROWS_GROUP_BYTES of products), and each comes out as patching it alone would: layers of
    two shapes, a LoRA covering some of them, another with a different scale on the rest."""
    from unittest import mock

    from ryla.flux import lora
    from ryla.flux.lora import WeightPatcher
    from ryla.speed.fp8 import Float8Linear

    torch.manual_seed(0)
    shapes = [(32, 48)] * 4 + [(16, 32)] * 2
    model = torch.nn.ModuleDict({str(i): Float8Linear(torch.nn.Linear(i_, o, dtype=torch.bfloat16))
                                 for i, (o, i_) in enumerate(shapes)})
    originals = {name: (m.weight_fp8.clone(), m.weight_scale.clone()) for name, m in model.items()}

    def factors(name, rank):
        rows, cols = shapes[int(name)]
        return (torch.randn(rank, cols).half().float(), torch.randn(rows, rank).half().float())

    a = {name: (*factors(name, 4), 0.25) for name in ("0", "1", "2", "4", "5")}
    b = {name: (*factors(name, 8), 0.5) for name in ("3",)}
    batched = []
    real_bmm = torch.bmm
    with mock.patch.object(lora, "FP8_ROWS_GROUP_BYTES", 2 * 32 * 48 * 2), \
            mock.patch.object(torch, "bmm", side_effect=lambda x, y: batched.append(x.shape[0]) or real_bmm(x, y)):
        WeightPatcher(model).apply(("a", "b"), [(a, 0.8), (b, 1.0)])
    # shape 32x48 with a: layers 0, 1, 2 in launches of two; with b: layer 3; shape 16x32: 4 and 5
    assert sorted(batched) == [1, 1, 2, 2], batched
    for name, m in model.items():
        down, up, scale = a[name] if name in a else b[name]
        strength = 0.8 if name in a else 1.0
        product = ((up * (scale * strength)).bfloat16().float() @ down.bfloat16().float()).bfloat16().float()
        weight_fp8, weight_scale = originals[name]
        expected, expected_scale = quantize_rows(weight_fp8.float() * weight_scale[:, None] + product)
        assert torch.equal(m.weight_fp8.view(torch.uint8), expected.view(torch.uint8)), name
        torch.testing.assert_close(m.weight_scale, expected_scale, rtol=0, atol=0)


def test_fast_mode_switch_plans_are_kept_and_give_the_same_bits():
    """A set of LoRAs met again switches from its kept SwitchPlan (factors stacked, scaled and
    cast once, nothing stacked again) to the same bits as the first time; a switch to a LoRA on
    fewer layers and the switch back to none restore the originals bit for bit (one
    multi-tensor copy); a plan larger than the patcher's memory bound is not kept."""
    from unittest import mock

    from ryla.flux.lora import WeightPatcher
    from ryla.speed.fp8 import Float8Linear

    torch.manual_seed(0)
    shapes = [(32, 48)] * 3 + [(16, 32)]
    model = torch.nn.ModuleDict({str(i): Float8Linear(torch.nn.Linear(i_, o, dtype=torch.bfloat16))
                                 for i, (o, i_) in enumerate(shapes)})

    def bits():
        return {name: (m.weight_fp8.view(torch.uint8).clone(), m.weight_scale.clone()) for name, m in model.items()}

    def lora(names, rank=4):
        return {n: (torch.randn(rank, shapes[int(n)][1]).half().float(),
                    torch.randn(shapes[int(n)][0], rank).half().float(), 0.5) for n in names}

    def same(x, y):
        return all(torch.equal(x[n][0], y[n][0]) and torch.equal(x[n][1], y[n][1]) for n in x)

    base = bits()
    a, b = lora("0123"), lora("12")
    patcher = WeightPatcher(model)
    stacks = []
    real_stack = torch.stack
    with mock.patch.object(torch, "stack", side_effect=lambda *x, **k: stacks.append(1) or real_stack(*x, **k)):
        patcher.apply(("a",), [(a, 1.0)])
        first_a = bits()
        patcher.apply(("b",), [(b, 1.0)])
        first_b = bits()
        assert same({n: first_b[n] for n in "03"}, {n: base[n] for n in "03"})  # only a touched them
        planned = len(stacks)
        assert planned and len(patcher.plans) == 2
        for _ in range(3):
            patcher.apply(("a",), [(a, 1.0)])
            assert same(bits(), first_a)
            patcher.apply(("b",), [(b, 1.0)])
            assert same(bits(), first_b)
        assert len(stacks) == planned  # every switch after the first two from kept plans
        patcher.apply((), [])
        assert same(bits(), base)
        patcher.plans.clear()
        patcher.plans.max_bytes = patcher.plans.size = 1  # no plan fits
        patcher.apply(("a",), [(a, 1.0)])
        assert same(bits(), first_a) and len(patcher.plans) == 0 and len(stacks) > planned


def test_plan_memory_setting(monkeypatch, speed_store):
    """RYLA_LORA_PLAN_MEMORY: a share of the GPU's memory for kept switch plans, 0 keeping none
    (every switch plans again, to the same bits); anything else than a number from 0 to 1 stops
    the engine at construction with the setting named."""
    import copy

    from ryla.flux.lora import SWITCH_PLAN_MEMORY_SHARE, WeightPatcher, plan_memory_share
    from ryla.speed.fp8 import Float8Linear

    assert plan_memory_share(None) == plan_memory_share(" ") == SWITCH_PLAN_MEMORY_SHARE
    assert plan_memory_share("0") == 0.0 and plan_memory_share("0.2") == 0.2
    for bad in ("abc", "-0.1", "1.5", "nan", "5%"):
        with pytest.raises(ValueError, match="RYLA_LORA_PLAN_MEMORY"):
            plan_memory_share(bad)
    monkeypatch.setenv("RYLA_LORA_PLAN_MEMORY", "lots")
    with pytest.raises(ValueError, match="RYLA_LORA_PLAN_MEMORY='lots'"):
        FluxEngine(speed_store)

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"0": Float8Linear(torch.nn.Linear(48, 32, dtype=torch.bfloat16))})
    lora = {"0": (torch.randn(4, 48).half().float(), torch.randn(32, 4).half().float(), 0.5)}
    kept, unkept = WeightPatcher(model), WeightPatcher(copy.deepcopy(model), 0.0)
    for patcher in (kept, unkept):
        patcher.apply(("a",), [(lora, 1.0)])
        patcher.apply((), [])
        patcher.apply(("a",), [(lora, 1.0)])
    assert len(kept.plans) == 2 and len(unkept.plans) == 0
    assert torch.equal(kept.module["0"].weight_fp8.view(torch.uint8), unkept.module["0"].weight_fp8.view(torch.uint8))


def test_lru_cache_bounds_entries_by_count_and_by_bytes():
    from ryla.caches import LruCache

    cache = LruCache(3, max_bytes=100)
    for key, size in (("a", 40), ("b", 40), ("c", 10)):
        cache.put(key, key.upper(), size)
    assert cache.get("a") == "A" and cache.bytes == 90
    cache.put("d", "D", 30)  # 120 bytes: the least recently used (b) leaves
    assert cache.get("b") is None and cache.bytes == 80 and len(cache) == 3
    cache.put("e", "E", 5)  # four entries: c, now the oldest, leaves
    assert cache.get("c") is None and [cache.get(k) for k in "ade"] == ["A", "D", "E"]
    cache.put("f", "F", 101)  # larger than the bound alone: not kept, nothing else lost
    assert cache.get("f") is None and cache.bytes == 75
    cache.put("a", "A2", 1)  # replacing an entry counts its new size only
    assert cache.get("a") == "A2" and cache.bytes == 36


def test_lora_switches_write_original_plus_the_products_rounded_once():
    """WeightPatcher: each targeted layer becomes bf16(original + sum of scale x up @ down),
    the sum in float32 and one rounding (as ComfyUI's calculate_weight on a float32 copy),
    written from the saved original in one pass (no restore first): a switch to another LoRA
    equals applying it alone; layers only the previous LoRA touched get their original bits;
    stacking sums both products; going back to no LoRA restores every bit. The fp8 layer gets
    quantize_rows of its dequantised original plus the product, one bf16 GEMM of the LoRAs'
    factors side by side (one LoRA's too)."""
    from ryla.flux.lora import WeightPatcher
    from ryla.speed.fp8 import Float8Linear

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.Linear(64, 32)).to(torch.bfloat16)
    model[1] = Float8Linear(model[1])
    originals = {name: p.clone() for name, p in model.state_dict().items()}

    def lora(seed, names=("0", "1")):
        g = torch.Generator().manual_seed(seed)
        shapes = {"0": (64, 48), "1": (32, 64)}
        return {n: (torch.randn(4, shapes[n][1], generator=g).half().float(),
                    torch.randn(shapes[n][0], 4, generator=g).half().float(), 0.5) for n in names}

    a, b = lora(1, ("0",)), lora(2)
    patcher = WeightPatcher(model)

    def expected_linear(*terms):
        total = sum(strength * scale * (up @ down) for (down, up, scale), strength in terms)
        return (originals["0.weight"].float() + total).to(torch.bfloat16)

    patcher.apply(("a",), [(a, 1.0)])
    assert torch.equal(model[0].weight, expected_linear((a["0"], 1.0)))
    assert torch.equal(model[1].weight_fp8, originals["1.weight_fp8"])  # untouched
    patcher.apply(("b",), [(b, 0.8)])
    assert torch.equal(model[0].weight, expected_linear((b["0"], 0.8)))
    down, up, scale = b["1"]
    dequantized = originals["1.weight_fp8"].float() * originals["1.weight_scale"][:, None]

    def bf16_product(ups, downs):  # factors in bf16 (ups scaled first), summed in float32, written in bf16
        return (torch.cat(ups, dim=1).bfloat16().float() @ torch.cat(downs).bfloat16().float()).bfloat16().float()

    fp8, fp8_scale = quantize_rows(dequantized + bf16_product([up * (0.8 * scale)], [down]))
    assert torch.equal(model[1].weight_fp8.view(torch.uint8), fp8.view(torch.uint8))
    torch.testing.assert_close(model[1].weight_scale, fp8_scale)
    patcher.apply(("a",), [(a, 1.0)])  # layer 1 was only b's: its original comes back
    assert torch.equal(model[1].weight_fp8.view(torch.uint8), originals["1.weight_fp8"].view(torch.uint8))
    patcher.apply(("a", "b"), [(a, 1.0), (b, -0.5)])
    torch.testing.assert_close(model[0].weight.float(), expected_linear((a["0"], 1.0), (b["0"], -0.5)).float(),
                               rtol=0, atol=2 ** -8)  # fp32 sums in another order: at most one bf16 step
    patcher.apply(("b", "b"), [(b, 0.8), (b, -0.3)])  # stacked on the fp8 layer: one GEMM of rank 8
    fp8, fp8_scale = quantize_rows(dequantized + bf16_product([up * 0.5 * 0.8, up * 0.5 * -0.3], [down, down]))
    assert torch.equal(model[1].weight_fp8.view(torch.uint8), fp8.view(torch.uint8))
    # ... which is the float32 sum to within fp8 rounding (3 mantissa bits of each row's scale)
    within = (model[1].weight_fp8.float() * model[1].weight_scale[:, None] - (dequantized + 0.5 * 0.5 * (up @ down))).abs()
    assert (within <= model[1].weight_scale[:, None] * 448 * 2 ** -4).all()
    # One matrix product for the two stacked LoRAs on the fp8 layer (two on the bf16 one: its
    # float32 sum keeps ComfyUI's order).
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountProducts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm,
                                       torch.ops.aten.addmm_):
                products.append(tuple(args[0].shape[-2:] if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm)
                                      else args[1].shape))
            return func(*args, **(kwargs or {}))

    products = []
    patcher.apply((), [])
    with CountProducts():
        patcher.apply(("a", "b"), [(a, 1.0), (b, -0.5)])
    assert sorted(products) == [(32, 4), (64, 4), (64, 4)], products  # layer 1: rank 4, a has no layer 1
    products.clear()
    with CountProducts():
        patcher.apply(("b", "b"), [(b, 0.8), (b, -0.3)])
    assert sorted(products) == [(32, 8), (64, 4), (64, 4)], products  # layer 1: one product, rank 4 + 4
    patcher.apply((), [])
    for name, value in model.state_dict().items():
        assert torch.equal(value.view(torch.uint8) if value.dtype == FP8 else value, originals[name].view(
            torch.uint8) if value.dtype == FP8 else originals[name]), name

