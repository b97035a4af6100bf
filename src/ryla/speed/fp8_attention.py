"""fp8 attention for the `fast` speed mode: cuDNN's fp8 flash attention on Hopper.

Attention is a quarter of a FLUX step in `fast` mode once the linear layers are fp8
(bench/results/README.md). cuDNN runs it in fp8 (e4m3 Q, K, V and probabilities, float32
softmax and accumulation) on Hopper's fp8 tensor cores; PyTorch does not expose that kernel,
cudnn-frontend's Python graph API does. FlashAttention-3, the other Hopper fp8 kernel, has no
installable build.

Scales, one per tensor, chosen so that nothing overflows and nothing has to be measured
before the cast:

- Q and K come out of an RMSNorm: every head vector has norm sqrt(head_dim) before the norm's
  weight, and RoPE rotates pairs of entries, which keeps their norm. So no entry exceeds
  sqrt(head_dim) * max|weight|, a bound known before the projection runs.
- V has no such bound: its scale is its absolute maximum (one reduction).
- The softmax probabilities, before normalisation, are at most 1 (flash attention subtracts
  each row's running maximum), so they are scaled by 448 (e4m3's largest value).
- The output is fp8 too, on V's scale (each of its rows is an average of V's rows), and goes
  into the fp8 output projections without a second quantisation pass.

Where cuDNN, cudnn-frontend or a Hopper GPU is missing, or cuDNN declines a shape, the same
quantised tensors go through PyTorch's attention instead (dequantised), so the numbers are
those of fp8 inputs everywhere: the CPU tests check the scaling on that path.
"""

from __future__ import annotations

import functools
import logging
import math
import threading

import torch
import torch.nn.functional as F

from ryla.speed.attention import rope_float
from ryla.speed.fp8 import Float8Linear, to_fp8
from ryla.speed.probes import FP8, FP8_MAX

log = logging.getLogger(__name__)


@functools.cache
def cudnn_fp8_attention_available() -> bool:
    """A Hopper-class GPU and cudnn-frontend's Python package."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        return False
    try:
        import cudnn  # noqa: F401  (nvidia-cudnn-frontend)
    except ImportError:
        return False
    return True


class _CudnnGraphs:
    """Built cuDNN fp8 attention graphs, one per shape and layout. Building one takes
    milliseconds; a server builds one per image size (and one for InfuseNet's)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._graphs: dict = {}
        self._declined: set = set()
        self._buffers: list = []

    def run(self, q, k, v, out, descale_q, descale_k, descale_v, scale_o, attn_scale: float) -> bool:
        """Attention into `out` (fp8, [batch, seq, heads, dim]); False where cuDNN declines."""
        key = (q.device.index, q.shape, k.shape, q.stride(), k.stride(), v.stride(), attn_scale)
        entry = self._graphs.get(key)
        if entry is None:
            if key in self._declined:
                return False
            with self._lock:
                entry = self._graphs.get(key)
                if entry is None:
                    try:
                        entry = self._graphs[key] = self._build(q, k, v, attn_scale)
                    except Exception as exc:  # this cuDNN declines the shape: the caller falls back
                        log.warning("cuDNN fp8 attention unavailable for %s (%s); using PyTorch attention",
                                    tuple(q.shape), exc)
                        self._declined.add(key)
                        return False
        import cudnn

        graph, uids, constants, workspace, handle = entry
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        # uids and raw pointers: the least Python work per call (1,596 calls per image)
        graph.execute({uids[0]: q.data_ptr(), uids[1]: k.data_ptr(), uids[2]: v.data_ptr(), uids[3]: out.data_ptr(),
                       uids[4]: descale_q.data_ptr(), uids[5]: descale_k.data_ptr(),
                       uids[6]: descale_v.data_ptr(), uids[7]: scale_o.data_ptr(), **constants},
                      workspace, handle=handle)
        return True

    @staticmethod
    def _bhsd(shape, stride) -> tuple[list[int], list[int]]:
        """cuDNN wants [batch, heads, seq, dim]; ours are [batch, seq, heads, dim] (no copy)."""
        (b, s, h, d), (sb, ss, sh, sd) = shape, stride
        return [b, h, s, d], [sb, sh, ss, sd]

    def _build(self, q, k, v, attn_scale: float):
        import cudnn

        handle = cudnn.create_handle()
        graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        tensors = {}
        for name, tensor in (("q", q), ("k", k), ("v", v)):
            dim, stride = self._bhsd(tensor.shape, tensor.stride())
            tensors[name] = graph.tensor(name=name, dim=dim, stride=stride, data_type=cudnn.data_type.FP8_E4M3)
        for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
            tensors[name] = graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1],
                                         data_type=cudnn.data_type.FLOAT)
        o, _, amax_s, amax_o = graph.sdpa_fp8(
            q=tensors["q"], k=tensors["k"], v=tensors["v"], descale_q=tensors["descale_q"],
            descale_k=tensors["descale_k"], descale_v=tensors["descale_v"], descale_s=tensors["descale_s"],
            scale_s=tensors["scale_s"], scale_o=tensors["scale_o"], is_inference=True, attn_scale=attn_scale,
            use_causal_mask=False)
        dim, stride = self._bhsd(q.shape, _contiguous_strides(q.shape))
        o.set_output(True).set_dim(dim).set_stride(stride).set_data_type(cudnn.data_type.FP8_E4M3)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
        tensors.update(o=o, amax_s=amax_s, amax_o=amax_o)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()

        def scalar(value):
            return torch.full((1, 1, 1, 1), value, dtype=torch.float32, device=q.device)

        # the probabilities' scales, and amax outputs (written, unused); kept alive here
        buffers = {"descale_s": scalar(1.0 / FP8_MAX), "scale_s": scalar(FP8_MAX), "amax_s": scalar(0.0),
                   "amax_o": scalar(0.0)}
        self._buffers.append(buffers)
        constants = {tensors[name].get_uid(): buffer.data_ptr() for name, buffer in buffers.items()}
        uids = [tensors[name].get_uid() for name in ("q", "k", "v", "o", "descale_q", "descale_k", "descale_v",
                                                       "scale_o")]
        workspace = torch.empty(max(graph.get_workspace_size(), 1), device=q.device, dtype=torch.uint8)
        self._buffers.append(workspace)
        log.info("cuDNN fp8 attention graph built for %s", tuple(q.shape))
        return graph, uids, constants, workspace.data_ptr(), handle


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


_GRAPHS = _CudnnGraphs()


def _reference_attention(q, k, v, descale_q, descale_k, descale_v, attn_scale: float) -> torch.Tensor:
    """The same fp8 inputs through PyTorch's attention (dequantised): CPUs, other GPUs, and
    shapes cuDNN declines."""
    def dequantised(x, descale):  # [batch, heads, seq, dim], as SDPA takes them
        return dequantize(x, descale, torch.bfloat16).transpose(1, 2)

    out = F.scaled_dot_product_attention(dequantised(q, descale_q), dequantised(k, descale_k),
                                         dequantised(v, descale_v), scale=attn_scale)
    return out.transpose(1, 2)


@torch.library.custom_op("ryla::attention_fp8", mutates_args=())
def attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor,
                  descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor,
                  attn_scale: float) -> torch.Tensor:
    """softmax(Q K^T * attn_scale) V for fp8 Q, K, V of shape [batch, seq, heads, dim], each
    multiplied by its descale ([1, 1, 1, 1] float32). Returns O * scale_o in fp8, [batch, seq,
    heads, dim] contiguous. With scale_o = 1 / descale_v nothing overflows: every row of O is
    an average of V's rows."""
    out = torch.empty(q.shape, dtype=FP8, device=q.device)
    if q.is_cuda and cudnn_fp8_attention_available():
        if _GRAPHS.run(q, k, v, out, descale_q, descale_k, descale_v, scale_o, attn_scale):
            return out
    reference = _reference_attention(q, k, v, descale_q, descale_k, descale_v, attn_scale)
    out.copy_(to_fp8(reference, torch.reciprocal(scale_o)))
    return out


@attention_fp8.register_fake
def _(q, k, v, descale_q, descale_k, descale_v, scale_o, attn_scale):
    return torch.empty(q.shape, dtype=FP8, device=q.device)


def _norm_weight_bound(*norms) -> torch.Tensor:
    """max |weight| over RMSNorms (1 for norms without a weight)."""
    bounds = [norm.weight.detach().abs().amax().float() for norm in norms
              if norm is not None and getattr(norm, "weight", None) is not None]
    return torch.stack(bounds).amax() if bounds else torch.tensor(1.0)


class Fp8FluxAttnProcessor:
    """diffusers' FluxAttnProcessor (0.42) with fp8 attention: same projections, norms and
    RoPE, then Q, K, V in e4m3 with the scales above. Handles fused and unfused projections,
    double blocks (text + image streams) and single blocks."""

    _attention_backend = None
    _parallel_config = None
    # ryla.speed.context_parallel: set on every rank of a context-parallel group
    context_parallel = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("fp8 attention takes no attention mask (FLUX passes none)")
        out, scale = self.attend(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        if encoder_hidden_states is None:
            return dequantize(out, scale, hidden_states.dtype)
        text_len = encoder_hidden_states.shape[1]
        hidden_states = attn.to_out[1](project(attn.to_out[0], out[:, text_len:], scale, hidden_states.dtype))
        encoder_hidden_states = project(attn.to_add_out, out[:, :text_len], scale, hidden_states.dtype)
        return hidden_states, encoder_hidden_states

    def attend(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
               image_rotary_emb) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention output before the output projection: fp8 [batch, seq, heads * dim] (text
        tokens first where there are any) and its scale ([1, 1, 1, 1] float32)."""
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        q_norms, k_norms = [attn.norm_q], [attn.norm_k]
        if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value.unflatten(-1, (-1, attn.head_dim)), value], dim=1)
            q_norms.append(attn.norm_added_q)
            k_norms.append(attn.norm_added_k)
        if image_rotary_emb is not None:
            query, key = rope_float(query, image_rotary_emb), rope_float(key, image_rotary_emb)

        parallel = self.context_parallel
        if parallel is not None:  # my tokens, all heads -> all tokens, my heads (and back after)
            sizes = parallel.sizes_for(query.shape[1])
            query, key, value = (parallel.to_heads(x, sizes) for x in (query, key, value))
        head_bound = math.sqrt(attn.head_dim) / FP8_MAX
        scale_q = (_norm_weight_bound(*q_norms).to(query.device) * head_bound).reshape(1, 1, 1, 1)
        scale_k = (_norm_weight_bound(*k_norms).to(key.device) * head_bound).reshape(1, 1, 1, 1)
        amax_v = value.abs().amax().float()
        if parallel is not None:
            # one V scale for all heads, as on one GPU: each token's output row holds every
            # rank's heads, and the output projection reads it with a single scale
            amax_v = parallel.max(amax_v)
        scale_v = (amax_v.clamp(min=1e-12) / FP8_MAX).reshape(1, 1, 1, 1)
        out = torch.ops.ryla.attention_fp8(
            to_fp8(query, scale_q), to_fp8(key, scale_k), to_fp8(value, scale_v),
            scale_q, scale_k, scale_v, torch.reciprocal(scale_v), 1.0 / math.sqrt(attn.head_dim))
        if parallel is not None:
            out = parallel.to_tokens(out, sizes)
        return out.flatten(2, 3), scale_v


def dequantize(x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (x_fp8.float() * scale.reshape(())).to(dtype)


def project(linear: torch.nn.Module, x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
            columns: slice = slice(None), bias: bool = True) -> torch.Tensor:
    """linear(x) for fp8 attention output x [batch, seq, width]: an fp8 layer takes it as it
    is (one scale for all rows), others get it dequantised. `columns` (fp8 layers only): the
    product over that range of the layer's inputs, as Float8Linear.forward_columns."""
    if isinstance(linear, Float8Linear):
        rows = x_fp8.reshape(-1, x_fp8.shape[-1])
        return linear.forward_fp8(rows, scale, dtype, columns, bias).reshape(*x_fp8.shape[:-1], -1)
    if columns != slice(None) or not bias:
        raise ValueError("a column range or no bias needs an fp8 layer")
    return linear(dequantize(x_fp8, scale, dtype))


def use_fp8_attention(model: torch.nn.Module) -> int:
    """Give every FLUX attention module in `model` the fp8 processor; returns how many."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    changed = 0
    for module in model.modules():
        if isinstance(module, FluxAttention):
            module.set_processor(Fp8FluxAttnProcessor())
            changed += 1
    return changed
