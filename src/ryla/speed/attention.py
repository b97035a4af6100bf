"""bf16 attention for the `exact` speed mode: Q/K normalisation, RoPE and layout in one kernel.

diffusers' FluxAttnProcessor normalises Q and K per head, concatenates the text and image
streams, applies RoPE, then (through its cuDNN backend) copies Q, K and V to [batch, heads,
seq, dim] and the output back; compiled, that is five to seven elementwise kernels around
each attention, 0.19 s of a 3.7 s image on the H200 (bench/results/README.md). Here one
kernel (ryla.speed.kernels.flux_attention_inputs) reads the fused projections once and writes
Q, K and V where attention reads them, in [batch, seq, heads, dim] memory order: cuDNN's
attention takes them as transposed views and writes its output in the same order, so the
output projection reads it as it is.

The arithmetic is diffusers': RMSNorm in float32 with the norm's weight, FLUX's interleaved
RoPE in float32, one rounding to the compute dtype at the end (diffusers rounds once more,
between the norm and RoPE: the difference is within one bf16 step).

Without Triton or a GPU (CPUs), or in another dtype than bf16, the same arithmetic runs as
PyTorch operations.

Attention itself: FlashAttention-3 where its Hopper kernels are installed (the flash_attn_3
package, or the build xformers 0.0.34 ships inside its wheel; both use PyTorch's stable ABI,
so one build serves later PyTorch versions too), else PyTorch's cuDNN attention. FA3 reads
and writes [batch, seq, heads, dim] as they are, with any row stride: in single blocks (one
stream, nothing to concatenate) it reads V straight from the projection's output, and the
kernel writes only Q and K.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


log = logging.getLogger(__name__)


@functools.cache
def flash_attention_3_available() -> bool:
    """`torch.ops.flash_attn_3.fwd` on a Hopper GPU (FA3's kernels are built for sm90 only)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        return False
    if not _has_flash_attention_3():
        _load_flash_attention_3()
    return _has_flash_attention_3() and _flash_attention_3_agrees_with_pytorch()


def _flash_attention_3_agrees_with_pytorch(device: str = "cuda") -> bool:
    """One small attention through FA3 and through PyTorch (ryla.speed.probes.agrees_with_pytorch)."""
    from ryla.speed.probes import agrees_with_pytorch

    generator = torch.Generator(device=device).manual_seed(0)
    q, k = (torch.randn(1, 256, 2, 128, generator=generator, device=device).to(torch.bfloat16) for _ in range(2))
    # V as single blocks pass it: a view into the projection's output, rows 3x wider than V's
    v = torch.randn(1, 256, 3 * 2 * 128, generator=generator, device=device).to(torch.bfloat16)
    v = v[..., 2 * 256:].unflatten(-1, (2, 128))
    return agrees_with_pytorch(
        "FlashAttention-3", lambda: flash_attention_3(q, k, v, 128 ** -0.5),
        lambda: F.scaled_dot_product_attention(*(x.transpose(1, 2).float() for x in (q, k, v))).transpose(1, 2),
        "using cuDNN attention")


def _has_flash_attention_3() -> bool:
    try:
        return hasattr(torch.ops.flash_attn_3, "fwd")
    except (AttributeError, RuntimeError):
        return False


def _load_flash_attention_3() -> None:
    """The flash_attn_3 package's extension, else the copy inside xformers' package folder,
    loaded as a library (without importing xformers, whose own extension is tied to one
    PyTorch version)."""
    try:
        import flash_attn_3._C  # noqa: F401  (registers torch.ops.flash_attn_3)
        return
    except ImportError:
        pass
    library = _package_file("xformers", "flash_attn_3", "_C.so")
    if library is None:
        return
    _preload_cuda12_runtime(library.parent)
    try:
        # as an extension module of its own name: dlopen plus its init function, which
        # registers torch.ops.flash_attn_3, without running xformers/__init__.py
        spec = importlib.util.spec_from_file_location("xformers.flash_attn_3._C", library)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        log.info("FlashAttention-3 loaded from %s", library)
    except (ImportError, OSError) as exc:
        log.warning("FlashAttention-3 in %s could not be loaded (%s); using cuDNN attention", library, exc)


def _package_file(package: str, *parts: str) -> Path | None:
    """A file inside an installed package's folder (any of a namespace package's folders),
    found without importing the package."""
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder).joinpath(*parts)
        if path.exists():
            return path
    return None


def _preload_cuda12_runtime(folder: Path) -> None:
    """xformers 0.0.34's FA3 build links the CUDA 12 runtime (libcudart.so.12), which PyTorch's
    CUDA 12 builds bring and its CUDA 13 builds do not (seen on the H200 with torch 2.11+cu130);
    the driver serves both runtimes. Looked for as already loadable, then next to the FA3 build
    (where bench/fetch_flash_attention_3.sh puts it), then in
    nvidia-cuda-runtime-cu12's package folder. Next to the build, not in site-packages: with
    that wheel installed beside a CUDA 13 PyTorch, cudnn-frontend declines fp8 attention
    ("Multiple libcudart libraries found"), which is the `fast` mode's."""
    import ctypes

    for candidate in ("libcudart.so.12", folder / "libcudart.so.12",
                      _package_file("nvidia", "cuda_runtime", "lib", "libcudart.so.12")):
        if candidate is None or (isinstance(candidate, Path) and not candidate.exists()):
            continue
        try:
            ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            continue


@torch.library.custom_op("ryla::flash_attention_3", mutates_args=())
def flash_attention_3(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      softmax_scale: float) -> torch.Tensor:
    """softmax(Q K^T * softmax_scale) V for [batch, seq, heads, dim] tensors (last dim
    contiguous), through FlashAttention-3's forward kernel; the output is [batch, seq, heads,
    dim], contiguous. A custom op of our own so that torch.compile knows its output's shape
    (FA3's op comes without one)."""
    return torch.ops.flash_attn_3.fwd(query, key, value, softmax_scale=softmax_scale)[0].contiguous()


@flash_attention_3.register_fake
def _(query, key, value, softmax_scale):
    return query.new_empty(query.shape)


def fused_attention_inputs_available() -> bool:
    """torch.ops.ryla.flux_attention_inputs is registered: Triton on a GPU, and importing
    ryla.speed.kernels (which registers it) succeeds."""
    from ryla.speed.probes import triton_kernels_available

    if not triton_kernels_available():
        return False
    try:
        import ryla.speed.kernels  # noqa: F401
    except ImportError:
        return False
    return True


def reference_attention_inputs(qkv: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor,
                               text_qkv: torch.Tensor | None, text_weight_q: torch.Tensor | None,
                               text_weight_k: torch.Tensor | None, cos: torch.Tensor | None,
                               sin: torch.Tensor | None, head_dim: int, eps: float,
                               with_value: bool = True) -> torch.Tensor:
    """What the kernel computes, in PyTorch: [3, batch, seq, heads, head_dim] ([2, ...]
    without `with_value`)."""
    def split(projection, norm_weight_q, norm_weight_k):
        q, k, v = projection.float().unflatten(-1, (3, -1, head_dim)).unbind(2)
        return _rms_norm(q, norm_weight_q, eps), _rms_norm(k, norm_weight_k, eps), v

    q, k, v = split(qkv, weight_q, weight_k)
    if text_qkv is not None:
        text_q, text_k, text_v = split(text_qkv, text_weight_q, text_weight_k)
        q, k, v = torch.cat([text_q, q], 1), torch.cat([text_k, k], 1), torch.cat([text_v, v], 1)
    if cos is not None:
        q, k = rope_float(q, (cos, sin)), rope_float(k, (cos, sin))
    return torch.stack([q, k, v] if with_value else [q, k]).to(qkv.dtype)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rope_float(x: torch.Tensor, rotary_emb) -> torch.Tensor:
    """FLUX's RoPE on [batch, seq, heads, dim] (diffusers' apply_rotary_emb, real form, pairs
    interleaved), kept in float32 so that the result is rounded once, by the caller."""
    cos, sin = rotary_emb
    cos, sin = cos[None, :, None, :].to(x.device), sin[None, :, None, :].to(x.device)
    real, imag = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return x.float() * cos + rotated * sin


def attention_inputs(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                     image_rotary_emb, kernel: bool,
                     value_in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V of a FLUX attention with fused projections, each [batch, seq, heads, head_dim]
    (text tokens first in double blocks), views into one buffer. `kernel`: Triton's (on the
    GPU), else PyTorch operations. `value_in_place`: where there is one stream (single
    blocks), V is a view into the projection's output, whose rows are 3x wider than V's (for an
    attention kernel that takes any row stride: FA3), instead of a copy."""
    qkv = attn.to_qkv(hidden_states)
    text = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
    value_in_place = value_in_place and not text
    text_qkv = attn.to_added_qkv(encoder_hidden_states) if text else None
    cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
    if cos is not None:
        cos, sin = cos.to(qkv.device, torch.float32), sin.to(qkv.device, torch.float32)
    args = (qkv, attn.norm_q.weight, attn.norm_k.weight, text_qkv,
            attn.norm_added_q.weight if text else None, attn.norm_added_k.weight if text else None,
            cos, sin, attn.head_dim, attn.norm_q.eps or torch.finfo(torch.float32).eps, not value_in_place)
    if kernel and qkv.is_cuda and qkv.dtype == torch.bfloat16:
        stacked = torch.ops.ryla.flux_attention_inputs(*args)
    else:
        stacked = reference_attention_inputs(*args)
    if not value_in_place:
        return stacked.unbind(0)
    query, key = stacked.unbind(0)
    return query, key, qkv[..., 2 * qkv.shape[-1] // 3:].unflatten(-1, (-1, attn.head_dim))


def _takes_fused_inputs(attn) -> bool:
    """Fused projections and weighted RMSNorms (how FLUX is built): the fused path's inputs."""
    norms = [attn.norm_q, attn.norm_k]
    if attn.added_kv_proj_dim is not None:
        norms += [attn.norm_added_q, attn.norm_added_k]
    return (getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv")
            and (attn.added_kv_proj_dim is None or hasattr(attn, "to_added_qkv"))
            and all(isinstance(n, torch.nn.RMSNorm) and n.weight is not None for n in norms))


class FusedInputsFluxAttnProcessor:
    """diffusers' FluxAttnProcessor (0.42) with the inputs prepared by one kernel and the
    output left in the layout the output projection reads. Attention itself is FlashAttention-3
    where it is installed, else PyTorch's (cuDNN's where diffusers' backend says
    `_native_cudnn`). Attention masks and layers without fused projections go through
    diffusers' processor."""

    _parallel_config = None
    # ryla.speed.context_parallel: set on every rank of a context-parallel group
    context_parallel = None

    def __init__(self):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        self._diffusers = FluxAttnProcessor()
        self._backend, self._cudnn = None, False
        # decided here, outside compiled code
        self._kernel = fused_attention_inputs_available()
        self.flash_attention_3 = flash_attention_3_available()

    @property
    def _attention_backend(self):
        return self._backend

    @_attention_backend.setter
    def _attention_backend(self, backend) -> None:  # diffusers' set_attention_backend sets this
        self._backend = backend
        self._cudnn = str(getattr(backend, "value", backend)) == "_native_cudnn"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        if attention_mask is not None or self._parallel_config is not None or not _takes_fused_inputs(attn):
            self._diffusers._attention_backend = self._attention_backend
            self._diffusers._parallel_config = self._parallel_config
            return self._diffusers(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        flash_attention_3 = self.flash_attention_3 and hidden_states.dtype in (torch.bfloat16, torch.float16)
        parallel = self.context_parallel
        query, key, value = attention_inputs(attn, hidden_states, encoder_hidden_states, image_rotary_emb,
                                             self._kernel, value_in_place=flash_attention_3 and parallel is None)
        if parallel is not None:  # my tokens, all heads -> all tokens, my heads (and back after)
            sizes = parallel.sizes_for(query.shape[1])
            query, key, value = (parallel.to_heads(x, sizes) for x in (query, key, value))
        if flash_attention_3:
            out = torch.ops.ryla.flash_attention_3(query, key, value, attn.head_dim ** -0.5)
        else:
            out = _attend(query, key, value, self._cudnn)
        if parallel is not None:
            out = parallel.to_tokens(out, sizes)
        out = out.flatten(2, 3)
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        hidden_states = attn.to_out[1](attn.to_out[0](out[:, text_len:]))
        return hidden_states, attn.to_add_out(out[:, :text_len])


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cudnn: bool) -> torch.Tensor:
    """SDPA on [batch, seq, heads, dim] tensors through transposed views; cuDNN allocates its
    output in the query's memory order, so the result is [batch, seq, heads, dim] with no copy."""
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    if cudnn:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


def use_fused_attention_inputs(model: torch.nn.Module) -> int:
    """Give every FLUX attention module in `model` the processor above, keeping the attention
    backend diffusers chose for it; returns how many."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    changed = 0
    for module in model.modules():
        if isinstance(module, FluxAttention):
            processor = FusedInputsFluxAttnProcessor()
            processor._attention_backend = getattr(module.processor, "_attention_backend", None)
            module.set_processor(processor)
            changed += 1
    return changed
