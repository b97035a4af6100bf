"""Context parallelism for the FLUX transformer: one image's tokens spread over N processes
(one per GPU), Ulysses-style (DeepSpeed-Ulysses, Jacobs et al. 2023, arXiv:2309.14509).

Each process keeps a contiguous share of the text tokens and of the image tokens through the
whole transformer: projections, norms, modulation, MLPs and RoPE are per token, so they run on
the share alone. Only attention needs every token: around it, one all-to-all turns
"my tokens, all heads" into "all tokens, my heads" (Q, K, V) and a second turns the output back.
Attention over a set of keys does not depend on their order, and each token's rotary
embedding is applied before the exchange, so the shares need no reordering. The output
projection's result is gathered once at the end (`proj_out`), which is where diffusers'
context-parallel plan for FluxTransformer2DModel splits and gathers too
(`FluxTransformer2DModel._cp_plan`); this module does it itself so that ryla's own attention
processors (fused inputs, cuDNN / FlashAttention-3, fp8) keep running, inside compiled blocks
(functional collectives trace into the graph).

Shares may differ by a token (any image size works); the heads must divide by N (FLUX.1 has
24: N = 2, 3, 4, 6, 8). The collectives are torch.distributed's, over NCCL on GPUs and gloo on
CPUs (the tests).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

log = logging.getLogger(__name__)


def shares(total: int, world: int) -> list[int]:
    """Token counts of each rank's contiguous share: as even as possible, the first ranks one
    more where `total` does not divide."""
    base, extra = divmod(total, world)
    return [base + (1 if rank < extra else 0) for rank in range(world)]


@dataclass(frozen=True)
class ContextParallel:
    """This process's place in a context-parallel group."""

    group: dist.ProcessGroup
    rank: int
    world: int

    @classmethod
    def from_default_group(cls) -> ContextParallel:
        return cls(dist.group.WORLD, dist.get_rank(), dist.get_world_size())

    def local(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's share of x along dim."""
        sizes = shares(x.shape[dim], self.world)
        start = sum(sizes[: self.rank])
        return x.narrow(dim, start, sizes[self.rank])

    def to_heads(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """[batch, my tokens, heads, dim] -> [batch, all tokens, my heads, dim]; `sizes`: every
        rank's token count (the all tokens axis is rank 0's tokens, then rank 1's, ...)."""
        batch, tokens, heads, dim = x.shape
        if heads % self.world:
            raise ValueError(f"context parallel over {self.world} processes needs heads divisible by it, got {heads}")
        # [world, my tokens, batch, my heads, dim]: the first axis says which rank it goes to
        send = x.reshape(batch, tokens, self.world, heads // self.world, dim).permute(2, 1, 0, 3, 4)
        received = _all_to_all(send.reshape(self.world * tokens, -1), sizes, [tokens] * self.world, self.group)
        return received.reshape(sum(sizes), batch, heads // self.world, dim).transpose(0, 1)

    def to_tokens(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """The inverse: [batch, all tokens, my heads, dim] -> [batch, my tokens, heads, dim]."""
        batch, _, my_heads, dim = x.shape
        tokens = sizes[self.rank]
        send = x.transpose(0, 1).reshape(sum(sizes), -1)
        received = _all_to_all(send, [tokens] * self.world, sizes, self.group)
        # [world (source rank = head group), my tokens, batch, my heads, dim]
        received = received.reshape(self.world, tokens, batch, my_heads, dim)
        return received.permute(2, 1, 0, 3, 4).reshape(batch, tokens, self.world * my_heads, dim)

    def gather_tokens(self, x: torch.Tensor, dim: int, total: int) -> torch.Tensor:
        """Every rank's share of x along dim, concatenated in rank order (on every rank)."""
        sizes = shares(total, self.world)
        longest = max(sizes)
        if x.shape[dim] < longest:  # all_gather takes equal shapes: pad, then cut each share
            pad = list(x.shape)
            pad[dim] = longest - x.shape[dim]
            x = torch.cat([x, x.new_zeros(pad)], dim)
        gathered = funcol.all_gather_tensor(x.contiguous(), gather_dim=dim, group=self.group)
        gathered = funcol.wait_tensor(gathered) if isinstance(gathered, funcol.AsyncCollectiveTensor) else gathered
        parts = gathered.split(longest, dim)
        return torch.cat([part.narrow(dim, 0, size) for part, size in zip(parts, sizes)], dim)

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """The largest of x over the group (an fp8 scale every rank must share)."""
        reduced = funcol.all_reduce(x, "max", self.group)
        return funcol.wait_tensor(reduced) if isinstance(reduced, funcol.AsyncCollectiveTensor) else reduced

    def sizes_for(self, local_tokens: int) -> list[int]:
        """Every rank's token count in an attention call, from this rank's. Shares of text and
        image are each split by `shares`, so rank r holds text_r + image_r tokens: derived
        from the totals the transformer's hook recorded."""
        text, image = _CURRENT_TOTALS[id(self)]
        sizes = [t + i for t, i in zip(shares(text, self.world), shares(image, self.world))]
        if sizes[self.rank] != local_tokens:  # a single block's image-only call, or another layout
            raise RuntimeError(f"context parallel: {local_tokens} tokens here, the plan says {sizes[self.rank]}")
        return sizes


def _all_to_all(x: torch.Tensor, output_sizes: list[int], input_sizes: list[int], group) -> torch.Tensor:
    """funcol.all_to_all_single on dim 0 (traceable by torch.compile); fp8 travels as bytes."""
    dtype = x.dtype
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        x = x.view(torch.uint8)
    out = funcol.all_to_all_single(x.contiguous(), output_sizes, input_sizes, group)
    out = funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out
    return out.view(dtype) if out.dtype != dtype else out


# id(ContextParallel) -> (text tokens, image tokens) of the forward pass running now
_CURRENT_TOTALS: dict[int, tuple[int, int]] = {}


def enable_context_parallel(transformer: torch.nn.Module, parallel: ContextParallel) -> int:
    """Make a FluxTransformer2DModel compute on this rank's share of the tokens, exchanging
    around attention and gathering its output: call on every rank with the same inputs, get
    the same output everywhere. The attention processors must be ryla's (the exact and fast
    speed modes install them); returns how many attention layers take part."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    layers = 0
    for module in transformer.modules():
        if isinstance(module, FluxAttention):
            processor = module.processor
            if not hasattr(processor, "context_parallel"):
                raise ValueError(f"context parallel needs ryla's attention processors (exact or fast speed mode), "
                                 f"not {type(processor).__name__}")
            processor.context_parallel = parallel
            layers += 1
    original = transformer.forward

    @functools.wraps(original)
    def forward(hidden_states, encoder_hidden_states=None, *args, img_ids=None, txt_ids=None,
                controlnet_block_samples=None, controlnet_single_block_samples=None, **kwargs):
        image_tokens, text_tokens = hidden_states.shape[1], encoder_hidden_states.shape[1]
        _CURRENT_TOTALS[id(parallel)] = (text_tokens, image_tokens)
        share = functools.partial(parallel.local, dim=1)
        # InfuseNet's residuals (identity) are per image token: each rank adds its share
        blocks = None if controlnet_block_samples is None else [share(r) for r in controlnet_block_samples]
        singles = None if controlnet_single_block_samples is None else [share(r) for r in
                                                                          controlnet_single_block_samples]
        out = original(share(hidden_states), share(encoder_hidden_states), *args,
                       img_ids=parallel.local(img_ids, 0), txt_ids=parallel.local(txt_ids, 0),
                       controlnet_block_samples=blocks, controlnet_single_block_samples=singles, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample
        full = parallel.gather_tokens(sample, 1, image_tokens)
        if isinstance(out, tuple):
            return (full, *out[1:])
        out.sample = full
        return out

    transformer.forward = forward
    log.info("context parallel: rank %d of %d, %d attention layers", parallel.rank, parallel.world, layers)
    return layers
