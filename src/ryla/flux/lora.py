"""Exact per-request application of LoRAs (converted by ryla.models.lora_format) to the FLUX
transformer and CLIP-L.

The weights of the targeted layers are patched in place,
W <- W + strength * (alpha / rank) * up @ down, computed in float32 and rounded once (fast
mode's fp8 rows: a bf16 product, then requantised; patch_fp8_rows). The untouched originals
are kept (only for layers some LoRA has touched), so switching LoRAs or going back to the
base model restores the exact original bits: no drift over many swaps, strength 0 is the
base model exactly, and a compiled transformer keeps its graph (same tensors, new values).
One lock serialises patching and use, so concurrent requests cannot see each other's LoRAs.

Rounded once into what: where ComfyUI would keep a layer's weights in fp8 (an fp8 checkpoint
such as flux1-dev-fp8 on a GPU with fp8 compute, or UNETLoader's fp8_e4m3fn weight_dtype:
comfy/model_management.py unet_dtype), it writes a patched weight back into fp8 with
stochastic rounding, seeded by the weight's name (comfy/model_patcher.py
patch_weight_to_device -> comfy/float.py stochastic_rounding). ryla computes such layers in
bf16 but holds the same kind of values: the sum is stochastically rounded onto the e4m3 grid
(seeded by the layer's name, so the same LoRAs always give the same bits), and the originals
are kept in fp8, half the memory, losslessly. The random stream is not ComfyUI's (its own
differs between its comfy_kitchen kernel and its PyTorch fallback): the rule is the same, the
bits are not.
"""

from __future__ import annotations

import logging
import os
import time
import zlib

import torch

from ryla.caches import LruCache
from ryla.speed.modes import FUSED_PROJECTION_ROWS
from ryla.speed.probes import FP8, FP8_MAX, triton_kernels_available


def linear_shapes(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """name -> (out_features, in_features) of every linear layer (works on meta modules).
    Layers fused by fuse_qkv_projections are listed under their unfused names, which is
    what LoRA files target."""
    shapes = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) or hasattr(m, "weight_fp8"):
            shapes[name] = (m.out_features, m.in_features)
        if getattr(m, "fused_projections", False):
            for leaf, (fused_name, _) in FUSED_PROJECTION_ROWS.items():
                fused = getattr(m, fused_name, None)
                if fused is not None:
                    shapes[f"{name}.{leaf}"] = (fused.out_features // 3, fused.in_features)
    return shapes


log = logging.getLogger(__name__)

# The attribute a loader sets on a module whose layers (these names, as LoRA files target
# them) hold float8_e4m3fn values in a wider dtype, where ComfyUI would store them in fp8.
E4M3_VALUED_LAYERS = "ryla_e4m3_valued_layers"


# What a module keeps of its recent switches (SwitchPlan): at most this many sets of LoRAs, and
# at most a share of the GPU's memory for their fp8 factors (one rank-64 LoRA on all of
# FLUX.1-dev's 494 block layers: ~0.7 GB in bf16; two stacked ~1.4 GB; the default 5 % of an
# H200, 7 GB, holds a studio's handful of characters). RYLA_LORA_PLAN_MEMORY sets the share
# (0 keeps no plans: every switch works its plan out again, as the first one does).
SWITCH_PLANS = 8
SWITCH_PLAN_MEMORY_SHARE = 0.05


class PlanMemorySettingError(ValueError):
    """RYLA_LORA_PLAN_MEMORY holds something other than a share from 0 to 1."""


def plan_memory_share_from_environment() -> float:
    return plan_memory_share(os.environ.get("RYLA_LORA_PLAN_MEMORY"))


def plan_memory_share(value: str | None) -> float:
    """RYLA_LORA_PLAN_MEMORY's value as a share of the GPU's memory (unset or empty: the
    default); a PlanMemorySettingError naming the setting for anything but a number from 0 to 1."""
    if value is None or not value.strip():
        return SWITCH_PLAN_MEMORY_SHARE
    try:
        share = float(value)
    except ValueError:
        share = float("nan")
    if not 0.0 <= share <= 1.0:  # NaN fails too
        raise PlanMemorySettingError(f"RYLA_LORA_PLAN_MEMORY={value!r}: a share of the GPU's memory from 0 to 1 (default "
                         f"{SWITCH_PLAN_MEMORY_SHARE}) for the LoRA switch plans kept; 0 keeps none")
    return share


class SwitchPlan:
    """What switching a module to one set of LoRAs takes, worked out once and kept for the next
    time the set comes (the key says the files, their versions and strengths): the layers it
    targets, where each is (so no lookups by name), and for fast mode's fp8 layers their LoRA
    factors already stacked, scaled and in bf16 with the table of the layers' addresses, so a
    switch is two launches a group of layers and almost no Python (Fp8RowsChunk)."""

    def __init__(self, names: frozenset, targets: dict, fp8_chunks: list):
        self.names = names
        self.targets = targets  # name -> (layer, rows, on the e4m3 grid) of the layers not in fp8_chunks
        self.fp8_chunks = fp8_chunks
        self.fp8_layers = sum(len(chunk.outs) for chunk in fp8_chunks)
        self.nbytes = sum(chunk.nbytes for chunk in fp8_chunks)


class WeightPatcher:
    """Applies a set of (LoraWeights, strength) to one module's layers, restoring exactly."""

    def __init__(self, module: torch.nn.Module, plan_memory_share: float = SWITCH_PLAN_MEMORY_SHARE):
        self.module = module
        self.originals: dict[str, object] = {}
        self.applied_key: tuple = ()
        self.touched: set[str] = set()
        self.e4m3_valued: frozenset[str] = frozenset(getattr(module, E4M3_VALUED_LAYERS, ()))
        # name -> views of fast mode's fp8 rows and scales that a patch writes into: the same on
        # every switch (patches write in place), so made once
        self.fp8_row_views: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.plans = LruCache(SWITCH_PLANS if plan_memory_share else 0, _plan_memory(module, plan_memory_share))

    def _on_e4m3_grid(self, name: str, layer: torch.nn.Module) -> bool:
        """Whether `name`'s patched weights go back onto the e4m3 grid: plain layers whose
        values are fp8 (an fp8 file where ComfyUI keeps fp8 storage) or stored in fp8 (fp8
        weight_dtype). Layers with their own fp8 format (fast mode's per-row scales) round
        as that format does."""
        if hasattr(layer, "rows_view"):
            return False
        return name in self.e4m3_valued or layer.weight.dtype == FP8

    def _target(self, name: str) -> tuple[torch.nn.Module, slice]:
        """The layer holding `name`'s weights, and its rows. After fuse_qkv_projections, q, k
        and v are rows of one to_qkv (or to_added_qkv) layer."""
        parent_name, _, leaf = name.rpartition(".")
        parent = self.module.get_submodule(parent_name) if parent_name else self.module
        if getattr(parent, "fused_projections", False) and leaf in FUSED_PROJECTION_ROWS:
            fused_name, index = FUSED_PROJECTION_ROWS[leaf]
            fused = getattr(parent, fused_name)
            rows = fused.out_features // 3
            return fused, slice(index * rows, (index + 1) * rows)
        return self.module.get_submodule(name), slice(None)

    @torch.no_grad()
    def apply(self, key: tuple, patches: list[tuple[dict, float]]) -> None:
        """Make the module's weights base + the given patches. `key` identifies the set, so
        the same LoRAs on consecutive requests cost nothing.

        One pass over the layers a switch involves: a layer the new set targets is written
        straight from its saved original (original + the sum of its LoRAs' products, in
        float32, rounded once, as comfy/lora.py calculate_weight computes on a float32 copy);
        a layer only the previous set touched gets its original back. Nothing is restored
        first and patched after, so a switch reads and writes each weight once."""
        if key == self.applied_key:
            return
        start = time.perf_counter()
        terms: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        for layers, strength in patches:
            if strength == 0:
                continue
            for name, (down, up, scale) in layers.items():
                terms.setdefault(name, []).append((down, up, scale * strength))
        plan = self.plans.get(key)
        cached = plan is not None
        if plan is None:
            plan = self._plan(terms)
            self.plans.put(key, plan, plan.nbytes)
        restored = self.touched - plan.names
        self._restore(restored)
        with _exact_tf32():
            for name, (layer, rows, on_grid) in plan.targets.items():
                if on_grid:
                    _set_rows_on_e4m3_grid(layer, rows, self.originals[name], terms[name], layer_seed(name))
                else:
                    _set_rows(layer, rows, self.originals[name], terms[name])
        run_fp8_rows(plan.fp8_chunks)
        # The host's part: the kernels are queued, not done (a GPU-bound switch queues fast)
        log.info("LoRA switch: %d layers patched, %d restored (%d fp8 layers in %d launches, %s), queued in %.1f ms",
                 len(plan.names), len(restored), plan.fp8_layers, len(plan.fp8_chunks),
                 "planned before" if cached else "planned now", (time.perf_counter() - start) * 1000)
        self.touched = set(plan.names)
        self.applied_key = key

    def _plan(self, terms: dict[str, list]) -> SwitchPlan:
        """The SwitchPlan for these layers' LoRA terms. Saves the originals of layers no LoRA
        touched until now (their weights are the original)."""
        targets, fp8_jobs = {}, []
        for name, layer_terms in terms.items():
            layer, rows = self._target(name)
            on_grid = self._on_e4m3_grid(name, layer)
            if name not in self.originals:
                self.originals[name] = _save_rows(layer, rows, on_grid)
            if hasattr(layer, "rows_view"):  # fp8 storage with row scales (ryla.speed.fp8.Float8Linear)
                fp8_jobs.append((self.originals[name], self._fp8_rows(name, layer, rows), layer_terms))
            else:
                targets[name] = (layer, rows, on_grid)
        return SwitchPlan(frozenset(terms), targets, plan_fp8_rows(fp8_jobs))

    def _fp8_rows(self, name: str, layer, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        views = self.fp8_row_views.get(name)
        if views is None:
            views = self.fp8_row_views[name] = layer.rows_view(rows)
        return views

    def _restore(self, names) -> None:
        """The originals back into these layers: fast mode's fp8 rows and scales by one
        multi-tensor copy (a few launches for hundreds of layers), others layer by layer."""
        destinations, sources = [], []
        for name in names:
            views = self.fp8_row_views.get(name)
            if views is not None:
                destinations.extend(views)
                sources.extend(self.originals[name])
            else:
                layer, rows = self._target(name)
                _load_rows(layer, rows, self.originals[name])
        if destinations:
            torch._foreach_copy_(destinations, sources)

    @torch.no_grad()
    def restore(self) -> None:
        self._restore(self.touched)
        self.touched = set()
        self.applied_key = ()


def _plan_memory(module: torch.nn.Module, share: float) -> int | None:
    """`share` of the module's GPU, in bytes; no bound off the GPU (the CPU path keeps no fp8
    stacks worth counting: the tiny models)."""
    parameter = next(module.parameters(), None)
    if parameter is None or parameter.device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(parameter.device).total_memory * share)


class _exact_tf32:
    """TF32 for the LoRA products, on CUDA: a factor read from a 16-bit file (fp16's 10
    mantissa bits, bf16's 7) is exact in TF32's 10, so each product is exact and only the
    float32 accumulation rounds, as in full float32, at tensor-core speed. Restored after; the
    engine's lock keeps sampling out meanwhile. (bench/lora_patch.py: the whole switch of 494
    full-size layers takes 68 ms on an H200, against 183 ms computed in plain float32 with a
    restore pass first.)"""

    def __enter__(self):
        self.before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.before


def lora_delta(terms: list[tuple[torch.Tensor, torch.Tensor, float]], device: torch.device) -> tuple[torch.Tensor, float]:
    """The sum of scale * up @ down over a layer's LoRAs in float32, as (product, factor): one
    LoRA's scale is left to the caller to apply while adding (no extra pass over the product)."""
    (down, up, scale), *rest = terms
    delta = torch.mm(up.to(device, torch.float32), down.to(device, torch.float32))
    if not rest:
        return delta, scale
    delta.mul_(scale)
    for down, up, scale in rest:
        delta.addmm_(up.to(device, torch.float32), down.to(device, torch.float32), alpha=scale)
    return delta, 1.0


# Fast mode's layers are patched in groups of one shape and one set of LoRA ranks and scales,
# each group's products in one batched GEMM and its rows in one kernel launch: one LoRA's 494
# layers take ~50 launches of the row kernel (~350 in all) instead of ~1,000-2,000. Done layer
# by layer, the switch was bound by the host issuing kernels, not by the GPU running them
# (bench/lora_patch.py --profile on the H200: 63-72 ms for 26 ms of GPU work with bf16 products;
# grouped, 24 ms). At most this many bytes of products a launch.
FP8_ROWS_GROUP_BYTES = 512 << 20


class Fp8RowsChunk:
    """Layers of one shape patched by one batched product and one row-kernel launch: their LoRA
    factors side by side ([L, rows, rank] ups, each LoRA's scaled, and [L, rank, cols] downs, in
    bf16), their originals and outs, and on a GPU with Triton the table of their addresses."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, originals: list, outs: list):
        self.up, self.down, self.originals, self.outs = up, down, originals, outs
        self.pointers = None
        if up.is_cuda and triton_kernels_available():
            from ryla.speed.kernels import row_pointer_table

            self.pointers = row_pointer_table(originals, outs)
        self.nbytes = up.nbytes + down.nbytes

    def run(self) -> None:
        delta = torch.bmm(self.up, self.down)
        if self.pointers is not None:
            from ryla.speed.kernels import add_quantize_rows_table

            add_quantize_rows_table(self.pointers, delta, 1.0, self.outs[0][0].dtype)
            return
        from ryla.speed.fp8 import quantize_rows

        for (weight_fp8, weight_scale), product, (out, out_scale) in zip(self.originals, delta, self.outs):
            weight, scale = quantize_rows(weight_fp8.float() * weight_scale[:, None] + product.float())
            out.copy_(weight)
            out_scale.copy_(scale)


def plan_fp8_rows(jobs: list[tuple[tuple, tuple, list]]) -> list[Fp8RowsChunk]:
    """Fast mode's layers (ryla.speed.fp8.Float8Linear: fp8 weights with one scale per row)
    with LoRAs, grouped into Fp8RowsChunks: each job is (original (fp8 rows, scales), out (the
    layer's fp8 rows, scales), terms [(down, up, scale)]), and running the chunks makes out
    quantize_rows(original dequantised + sum of scale * up @ down). The product is one bf16
    GEMM of the LoRAs' factors side by side, each `up` scaled first: sum_i s_i up_i @ down_i =
    [s_1 up_1 | s_2 up_2] @ [down_1; down_2], exact products summed in float32, written in bf16.
    bf16 is enough here: the sum is then rounded to e4m3 with the row's scale, 3 mantissa bits
    of the row's largest weight, far coarser than bf16's 8 bits of the product."""
    groups: dict[tuple, list] = {}
    for original, out, terms in jobs:
        key = (tuple(out[0].shape), out[0].device, tuple((down.shape[0], scale) for down, _, scale in terms))
        groups.setdefault(key, []).append((original, out, [(down, up) for down, up, _ in terms]))
    chunks = []
    for ((rows, cols), device, term_keys), members in groups.items():
        per_launch = max(1, FP8_ROWS_GROUP_BYTES // (rows * cols * 2))
        rank = sum(term_rank for term_rank, _ in term_keys)
        for start in range(0, len(members), per_launch):
            chunk = members[start:start + per_launch]
            # each LoRA's factors stacked, scaled and written in bf16 straight into its columns
            # (up) or rows (down) of the side-by-side factors
            up = torch.empty(len(chunk), rows, rank, device=device, dtype=torch.bfloat16)
            down = torch.empty(len(chunk), rank, cols, device=device, dtype=torch.bfloat16)
            offset = 0
            for i, (term_rank, scale) in enumerate(term_keys):
                torch.mul(torch.stack([factors[i][1] for _, _, factors in chunk]).to(device, torch.float32), scale,
                          out=up[:, :, offset:offset + term_rank])
                down[:, offset:offset + term_rank] = torch.stack([factors[i][0] for _, _, factors in chunk]).to(device)
                offset += term_rank
            chunks.append(Fp8RowsChunk(up, down, [original for original, _, _ in chunk], [out for _, out, _ in chunk]))
    return chunks


def run_fp8_rows(chunks: list[Fp8RowsChunk]) -> None:
    for chunk in chunks:
        chunk.run()


def patch_fp8_rows(jobs: list[tuple[tuple, tuple, list]]) -> int:
    """plan_fp8_rows, then run: the layers patched at once. Returns the number of row-kernel
    launches."""
    chunks = plan_fp8_rows(jobs)
    run_fp8_rows(chunks)
    return len(chunks)


# Row operations on a plain Linear, or on a layer that provides its own (Float8Linear).

def _save_rows(layer, rows: slice, on_e4m3_grid: bool = False):
    if hasattr(layer, "save_rows"):
        return layer.save_rows(rows)
    if on_e4m3_grid:  # fp8 values: kept in fp8, exactly and in half the memory
        return layer.weight[rows].detach().to(FP8, copy=True)
    return layer.weight[rows].detach().clone()


def _load_rows(layer, rows: slice, saved) -> None:
    if hasattr(layer, "load_rows"):
        layer.load_rows(rows, saved)
    else:
        layer.weight[rows] = saved


def _set_rows(layer, rows: slice, original, terms) -> None:
    """rows <- original + sum of scale * up @ down, the sum in float32, rounded once into the
    weight's dtype (torch.add computes a bf16 + float32 sum in float32 and writes bf16)."""
    weight = layer.weight
    delta, scale = lora_delta(terms, weight.device)
    torch.add(original, delta, alpha=scale, out=weight[rows])


def layer_seed(name: str) -> int:
    """A stable seed per layer name (CRC-32, as ComfyUI's comfy/utils.py string_to_seed; not
    Python's hash(), which changes per process)."""
    return zlib.crc32(name.encode())


def round_to_e4m3_grid(value: torch.Tensor, seed: int) -> torch.Tensor:
    """value (float32) stochastically rounded onto the float8_e4m3fn grid, in float32: each
    entry goes to one of its two neighbouring e4m3 values, up with probability equal to its
    distance from the lower one over their spacing, so the rounding is unbiased; saturates at
    +-448 (ComfyUI's comfy/float.py stochastic_rounding, as for manual_stochastic_round_to_float8).
    The PyTorch form, for CPUs and GPUs without Triton; ryla.speed.kernels has the one-pass
    kernel (with another random stream)."""
    magnitude = value.abs()
    # floor(log2 |v|) (frexp's mantissa is in [0.5, 1)), at least e4m3's smallest normal exponent
    exponent = (torch.frexp(magnitude).exponent - 1).clamp_(min=-6)
    spacing = torch.ldexp(torch.ones_like(magnitude), exponent - 3)  # three mantissa bits
    generator = torch.Generator(device=value.device).manual_seed(seed)
    noise = torch.rand(value.shape, generator=generator, device=value.device)
    rounded = torch.floor(magnitude / spacing + noise).mul_(spacing).clamp_(max=FP8_MAX)
    return torch.where(value < 0, -rounded, rounded)


def _set_rows_on_e4m3_grid(layer, rows: slice, original: torch.Tensor, terms, seed: int) -> None:
    """rows <- original + the LoRAs' sum, in float32, stochastically rounded onto the e4m3
    grid and stored in the weight's dtype (exact: every e4m3 value is a bf16 value). On a GPU
    with Triton one kernel adds the product computed first and rounds; for stacked LoRAs one
    kernel computes their sum tile by tile and writes the rows (faster there, not for one)."""
    weight = layer.weight
    out = weight[rows]
    kernels = weight.is_cuda and triton_kernels_available()
    if kernels and len(terms) > 1 and _stacked_in_one_pass(original, terms, seed, out):
        return
    delta, factor = lora_delta(terms, weight.device)
    if kernels:
        from ryla.speed.kernels import add_round_to_e4m3_grid

        add_round_to_e4m3_grid(original, delta, factor, seed, out)
        return
    out.copy_(round_to_e4m3_grid(torch.add(original.float(), delta, alpha=factor), seed))


_one_pass_kernel_failed = False


def _stacked_in_one_pass(original: torch.Tensor, terms, seed: int, out: torch.Tensor) -> bool:
    """Stacked LoRAs by ryla.speed.kernels.lora_onto_e4m3_grid; False where it does not take
    them (more LoRAs or a wider rank than it handles). Should the kernel fail on some GPU (it
    fails to compile before writing anything), the two-step path serves from then on, with a
    warning."""
    global _one_pass_kernel_failed
    from ryla.speed.kernels import fused_lora_fits, lora_onto_e4m3_grid

    terms = [(down.to(out.device), up.to(out.device), scale) for down, up, scale in terms]
    if _one_pass_kernel_failed or not (out.is_contiguous() and fused_lora_fits(terms, *out.shape)):
        return False
    try:
        lora_onto_e4m3_grid(original, terms, seed, out)
    except Exception:  # a Triton that cannot compile it here
        log.warning("the one-pass kernel for stacked LoRAs failed on this GPU; stacked LoRAs compute the "
                    "product first from now on", exc_info=True)
        _one_pass_kernel_failed = True
        return False
    return True
