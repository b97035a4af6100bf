"""The blocks' AdaLayerNorm modulations for a whole sampling run, in one pass (`exact` mode).

Every FLUX block starts with linear(silu(temb)): 19 double blocks x 2 streams x 18432 values
and 38 single blocks x 9216, from 3072 inputs. temb depends only on the timestep, the guidance
and the pooled CLIP vector, and they are known for every step before sampling starts. Called
per step, these are 2128 one-row products that read all 3.2B weights (6.4 GB) again at every
step: 0.058 s of a 3.5 s image on the H200 (bench/results/README.md). Here the engine computes
every step's rows before the first step, reading the weights once. During the run, each layer
returns its precomputed row.

How a compiled block gets its rows:
- The layers call the custom op `ryla::ada_norm_modulation(x, weight, bias)`. It is opaque to
  torch.compile, so the compiled graph is the same for every block and step: no new guards
  and no recompilation.
- At run time the op finds the current call's rows by the weight's address, for the layers of
  a transformer the engine has selected. For any other call it computes the product: another
  model, no plan, a batch of another size.
- The rows are selected for one transformer call and dropped when it returns, so a call the
  engine did not plan can never see another call's rows.

The arithmetic is the same product on the same operands: diffusers' own time embedding, then
silu and linear. Only the GEMM's row count differs, which may round differently on the GPU.
The engine holds its lock while a plan is active; other engines' layers have other addresses.
"""

from __future__ import annotations

import types
from typing import Hashable

import torch
import torch.nn.functional as F
from torch import nn

# weight address -> rows [batch, out] for the transformer call under way
_SELECTED: dict[int, torch.Tensor] = {}

# Larger plans (many steps x large batches x CFG) fall back to per-call products.
MAX_PLAN_BYTES = 512 * 2**20


@torch.library.custom_op("ryla::ada_norm_modulation", mutates_args=())
def ada_norm_modulation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """linear(x, weight, bias) for an AdaLayerNorm's silu(temb): the selected precomputed rows
    where there are some for this weight and shape, else the product."""
    rows = _SELECTED.get(weight.data_ptr())
    if rows is not None and rows.shape == (*x.shape[:-1], weight.shape[0]) and rows.dtype == x.dtype:
        return rows.clone()  # a custom op returns memory of its own
    return F.linear(x, weight, bias)


@ada_norm_modulation.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _modulation_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.ryla.ada_norm_modulation(x, self.weight, self.bias)


def _ada_norm_linears(transformer: nn.Module) -> list[nn.Linear]:
    """The linear layer of each block's AdaLayerNormZero(Single), where it is a plain bf16/fp32
    nn.Linear (fp8 layers, in `fast`, keep their own forward)."""
    from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle

    blocks = [*getattr(transformer, "transformer_blocks", []), *getattr(transformer, "single_transformer_blocks", [])]
    return [norm.linear for block in blocks for norm in block.modules()
            if isinstance(norm, (AdaLayerNormZero, AdaLayerNormZeroSingle)) and getattr(norm, "emb", None) is None
            and type(norm.linear) is nn.Linear and norm.linear.bias is not None]


def use_precomputed_modulation(transformer: nn.Module) -> int:
    """Route the blocks' modulation products through ada_norm_modulation (in place), and
    drop a call's selected rows when the transformer returns. Returns how many layers."""
    layers = _ada_norm_linears(transformer)
    for layer in layers:
        layer.forward = types.MethodType(_modulation_forward, layer)
    if layers and not getattr(transformer, "_ryla_modulation_layers", None):
        transformer.register_forward_hook(lambda module, args, output: _drop(module))
    transformer._ryla_modulation_layers = layers
    return len(layers)


def _drop(transformer: nn.Module) -> None:
    for layer in getattr(transformer, "_ryla_modulation_layers", ()):
        _SELECTED.pop(layer.weight.data_ptr(), None)


def time_embedding(transformer: nn.Module, timestep: torch.Tensor, guidance: torch.Tensor | None,
                   pooled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """temb as FluxTransformer2DModel.forward (diffusers 0.42) computes it from the sampler's
    timestep (sigma) and guidance, in the hidden states' dtype."""
    timestep = timestep.to(dtype) * 1000
    if guidance is None:
        return transformer.time_text_embed(timestep, pooled)
    return transformer.time_text_embed(timestep, guidance.to(dtype) * 1000, pooled)


def _planned_layers(transformer: nn.Module, dtype: torch.dtype) -> list[nn.Linear]:
    """The routed layers whose weights are in the compute dtype (fp8 weight storage casts
    them per call: those compute their own products)."""
    return [layer for layer in getattr(transformer, "_ryla_modulation_layers", ()) if layer.weight.dtype == dtype]


class ModulationPlan:
    """Every planned transformer call's modulation rows, computed at once.

    `calls` maps a key (the engine's: step and conditioning stream) to that call's
    (timestep, guidance or None, pooled) inputs, as the transformer will receive them."""

    def __init__(self, transformer: nn.Module, calls: dict[Hashable, tuple], dtype: torch.dtype):
        self.transformer = transformer
        layers = _planned_layers(transformer, dtype)
        self.rows: dict[Hashable, dict[int, torch.Tensor]] = {key: {} for key in calls}
        if not layers or not calls:
            return
        inputs = list(calls.values())
        if len({guidance is None for _, guidance, _ in inputs}) > 1:
            return  # one embedding call cannot mix guided and unguided inputs
        sizes = [len(timestep) for timestep, _, _ in inputs]
        timestep = torch.cat([timestep for timestep, _, _ in inputs])
        guidance = None if inputs[0][1] is None else torch.cat([guidance for _, guidance, _ in inputs])
        pooled = torch.cat([pooled for _, _, pooled in inputs])
        activation = F.silu(time_embedding(transformer, timestep, guidance, pooled, dtype))
        for layer in layers:
            per_call = F.linear(activation, layer.weight, layer.bias).split(sizes)
            for key, rows in zip(self.rows, per_call):
                self.rows[key][layer.weight.data_ptr()] = rows

    @staticmethod
    def affordable(transformer: nn.Module, calls: int, batch: int, dtype: torch.dtype) -> bool:
        """Some layers to plan, and their rows for `calls` calls fit in MAX_PLAN_BYTES."""
        width = sum(layer.weight.shape[0] for layer in _planned_layers(transformer, dtype))
        return 0 < width * calls * batch * (torch.finfo(dtype).bits // 8) <= MAX_PLAN_BYTES

    def select(self, key: Hashable) -> None:
        """The rows for the next transformer call (dropped when it returns)."""
        _SELECTED.update(self.rows.get(key, {}))

    def close(self) -> None:
        _drop(self.transformer)
        self.rows.clear()
