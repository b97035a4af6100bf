"""Leaner forwards for FLUX's blocks in the compiled speed modes: the same arithmetic with less
memory traffic around the MLP (the profile in bench/results/README.md says why).

- A single block concatenates its attention output (3072 wide) with its GELU'd MLP activation
  (12288 wide) only to multiply the 15360-wide result by proj_out. Here proj_out is applied as
  two products over column ranges of its weight, summed: the same matrix product split along
  K, without writing (and, in fp8, quantising) the concatenation.
- On CUDA with bf16 weights, GELU (tanh) runs in the matrix product's epilogue
  (torch._addmm_activation, cuBLASLt), on the float32 accumulator, instead of a pass over the
  bf16 result: in the single blocks' proj_mlp and the double blocks' feed-forward.
- With fp8 layers (`fast`), GELU runs inside the quantisation of the down projection's input
  instead (Float8Linear.forward_columns(gelu=True)): one pass over the activation, not two.
- A ControlNet's residual (InfuseNet's, for identity) is added inside the block that it
  follows, not after it in diffusers' FluxTransformer2DModel.forward loop: compiled, the add
  joins the block's last elementwise kernel instead of being a kernel of its own, 57 a step
  (the transformer's forward hands each block its residual: with_block_residuals).

Weights are not copied or moved: the products read column ranges of the layers' own weights,
so LoRA patching (which edits those weights in place) applies unchanged. Weights stored in
another dtype than the computation's (UNETLoader's fp8 weight_dtype, which diffusers casts
when a layer is called) are cast here, where a layer is used without being called.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ryla.speed.fp8 import Float8Linear
from ryla.speed.fp8_attention import Fp8FluxAttnProcessor, project


def _gelu_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(linear(x)), with GELU in the GEMM epilogue where cuBLASLt can do it."""
    if isinstance(linear, nn.Linear) and x.is_cuda and linear.bias is not None and linear.weight.dtype == x.dtype:
        flat = x.reshape(-1, x.shape[-1])
        out = torch._addmm_activation(linear.bias, flat, linear.weight.t(), use_gelu=True)
        return out.reshape(*x.shape[:-1], out.shape[-1])
    return F.gelu(linear(x), approximate="tanh")


def _linear_columns(linear: nn.Module, x: torch.Tensor, columns: slice, bias: bool) -> torch.Tensor:
    """x @ weight[:, columns].T (+ bias): one K-range of a linear layer's product."""
    if isinstance(linear, Float8Linear):
        return linear.forward_columns(x, columns, bias)
    bias_or_none = linear.bias.to(x.dtype) if bias and linear.bias is not None else None
    return F.linear(x, linear.weight[:, columns].to(x.dtype), bias_or_none)


# The residual a block adds to its image tokens' output (None: none): set on every block for one
# transformer call by with_block_residuals, read inside the block's (compiled) forward. Dynamo
# guards on whether it is None and on its shape and dtype, so a step with residuals and one
# without are two graphs per block class, not a recompile a step.
RESIDUAL = "ryla_controlnet_residual"


def _add_residual(block, hidden_states: torch.Tensor) -> torch.Tensor:
    residual = getattr(block, RESIDUAL, None)
    return hidden_states if residual is None else hidden_states + residual


# diffusers' own FluxTransformerBlock.forward, kept by use_lean_forwards. A compiled lean forward
# must not reach it through the class: diffusers marks its block classes allow_in_graph
# (diffusers/utils/torch_utils.py maybe_allow_in_graph), and Dynamo in torch 2.13 then treats
# the class as one opaque callable and refuses to call an attribute of it.
_diffusers_double_forward = None


def double_block_forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                         image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                         joint_attention_kwargs: dict[str, Any] | None = None):
    """diffusers' FluxTransformerBlock.forward, then the block's ControlNet residual added."""
    encoder_hidden_states, hidden_states = _diffusers_double_forward(
        self, hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
        image_rotary_emb=image_rotary_emb, joint_attention_kwargs=joint_attention_kwargs)
    return encoder_hidden_states, _add_residual(self, hidden_states)


def _per_block(samples, blocks: int, repeat: bool) -> list:
    """Which of a ControlNet's residuals each of `blocks` blocks adds, as diffusers'
    FluxTransformer2DModel.forward picks them: every ceil(blocks / len)-th block moves to the next
    residual, or (XLabs ControlNets: controlnet_blocks_repeat) the residuals repeat in turn."""
    if samples is None:
        return [None] * blocks
    if repeat:
        return [samples[i % len(samples)] for i in range(blocks)]
    interval = int(math.ceil(blocks / len(samples)))
    return [samples[i // interval] for i in range(blocks)]


def with_block_residuals(model: nn.Module) -> bool:
    """Make a FluxTransformer2DModel hand its ControlNet residuals to its blocks (which add them
    in their own forwards, above) instead of adding them in its loop: the same sums, in the same
    order. The model's forward keeps its signature; callers (the engine, context parallel's
    wrapper) pass controlnet_block_samples as before. Returns whether the model takes them so
    (a FluxControlNetModel, which makes residuals, does not)."""
    forward = model.forward
    if "controlnet_block_samples" not in inspect.signature(forward).parameters:
        return False
    doubles, singles = list(model.transformer_blocks), list(model.single_transformer_blocks)

    @functools.wraps(forward)
    def forward_with_block_residuals(*args, controlnet_block_samples=None, controlnet_single_block_samples=None,
                                     controlnet_blocks_repeat=False, **kwargs):
        given = list(zip(doubles, _per_block(controlnet_block_samples, len(doubles), controlnet_blocks_repeat)))
        given += zip(singles, _per_block(controlnet_single_block_samples, len(singles), False))
        for block, residual in given:
            setattr(block, RESIDUAL, residual)
        try:
            return forward(*args, **kwargs)
        finally:
            for block, _ in given:
                setattr(block, RESIDUAL, None)

    model.forward = forward_with_block_residuals
    return True


def single_block_forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                         image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                         joint_attention_kwargs: dict[str, Any] | None = None):
    """diffusers' FluxSingleTransformerBlock.forward (0.42), with proj_out split along K, then the
    block's ControlNet residual added to its image tokens."""
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    fp8_out = isinstance(self.proj_out, Float8Linear)
    # fp8: the GELU is applied while proj_out quantises its input
    mlp_hidden_states = self.proj_mlp(norm_hidden_states) if fp8_out else _gelu_linear(self.proj_mlp, norm_hidden_states)
    processor = getattr(self.attn, "processor", None)
    if fp8_out and isinstance(processor, Fp8FluxAttnProcessor) and not joint_attention_kwargs:
        # fp8 attention's output goes into proj_out as it is: no dequantise-requantise pass
        attn_fp8, attn_scale = processor.attend(self.attn, norm_hidden_states, None, image_rotary_emb)
        width = attn_fp8.shape[-1]
        attn_projected = project(self.proj_out, attn_fp8, attn_scale, hidden_states.dtype, slice(0, width))
    else:
        attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                                **(joint_attention_kwargs or {}))
        width = attn_output.shape[-1]
        attn_projected = _linear_columns(self.proj_out, attn_output, slice(0, width), bias=True)
    if fp8_out:
        mlp_projected = self.proj_out.forward_columns(mlp_hidden_states, slice(width, None), bias=False, gelu=True)
    else:
        mlp_projected = _linear_columns(self.proj_out, mlp_hidden_states, slice(width, None), bias=False)
    projected = attn_projected + mlp_projected
    hidden_states = residual + gate.unsqueeze(1) * projected
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], _add_residual(self, hidden_states[:, text_seq_len:])


def gelu_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """diffusers' tanh-GELU activation module (projection, then GELU), epilogue-fused."""
    return _gelu_linear(self.proj, hidden_states)


def feed_forward_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' FeedForward with a tanh-GELU activation ([GELU, Dropout, Linear, ...]): with
    an fp8 down projection, the GELU is applied while that layer quantises its input."""
    activation, down = self.net[0], self.net[2]
    if isinstance(down, Float8Linear):
        return down.forward_columns(activation.proj(hidden_states), slice(None), gelu=True)
    for module in self.net:
        hidden_states = module(hidden_states)
    return hidden_states


def use_lean_forwards(model: nn.Module, block_residuals: bool = True) -> int:
    """Give every FLUX block, every tanh-GELU activation and the feed-forwards that hold one the
    forwards above, and a transformer the residual hand-over (with_block_residuals; not with
    `block_residuals` off). Returns how many modules changed. The blocks keep their classes (regional compilation and LoRA
    targeting find them by class and name)."""
    from diffusers.models.activations import GELU
    from diffusers.models.attention import FeedForward
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    global _diffusers_double_forward
    _diffusers_double_forward = FluxTransformerBlock.forward

    def tanh_gelu(module) -> bool:
        return isinstance(module, GELU) and module.approximate == "tanh"

    changed = int(block_residuals and hasattr(model, "single_transformer_blocks") and with_block_residuals(model))
    for module in model.modules():
        if isinstance(module, FluxSingleTransformerBlock):
            module.forward = types.MethodType(single_block_forward, module)
        elif isinstance(module, FluxTransformerBlock):
            module.forward = types.MethodType(double_block_forward, module)
        elif tanh_gelu(module):
            module.forward = types.MethodType(gelu_forward, module)
        elif (isinstance(module, FeedForward) and len(module.net) >= 3 and tanh_gelu(module.net[0])
              and all(isinstance(m, nn.Dropout) for m in list(module.net)[1:2] + list(module.net)[3:])):
            module.forward = types.MethodType(feed_forward_forward, module)
        else:
            continue
        changed += 1
    return changed
