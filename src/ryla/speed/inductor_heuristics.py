"""ryla's changes to Inductor's code-generation heuristics (the compiled speed modes).

FLUX's LayerNorms (with the modulation and residual around them) reduce rows of 3072 values.
Inductor makes one-pass (persistent) Triton reductions only up to 1024 values a row, so these
loop, reading each row twice: 0.15 s an image at ~1.6-2 TB/s on the H200. Inductor's
multi-kernel mode, which compiles both and picks at run time, made them ~30 % faster but cost
host time; raising the limit for row-wise reductions did the same without it (0.153 -> 0.098 s
of kernel time an image, bench/results/README.md). Installed through Inductor's documented
hook for out-of-tree heuristics (InductorChoices); imported only where Inductor is.
"""

from __future__ import annotations

from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint

# Rows up to this wide are normalised by one-pass reductions.
PERSISTENT_ROW_LIMIT = 4096


def persistent_row_reduction(reduction_numel, hint_is_inner: bool, cooperative: bool) -> bool | None:
    """ryla's rule on top of Inductor's: an inner (row-wise) reduction at most
    PERSISTENT_ROW_LIMIT wide is done in one pass. None where Inductor's own rule decides
    (wider rows, column-wise or cooperative reductions, symbolic widths)."""
    if not hint_is_inner or cooperative:
        return None
    if isinstance(reduction_numel, int) or getattr(reduction_numel, "is_Integer", False):
        return True if int(reduction_numel) <= PERSISTENT_ROW_LIMIT else None
    return None


class WideRowChoices(InductorChoices):
    """InductorChoices with persistent_row_reduction's rule first. A module-level class: the
    compile cache pickles its key, which holds this class where PyTorch keys on it."""

    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction) -> bool:
        if inductor_config.triton.persistent_reductions:
            ours = persistent_row_reduction(features.reduction_numel,
                                            features.get_reduction_hint() == ReductionHint.INNER,
                                            cooperative_reduction)
            if ours is not None:
                return ours
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    def uuid(self) -> str:  # the compile cache's key for these heuristics (PyTorch >= 2.12)
        return f"ryla-persistent-rows-{PERSISTENT_ROW_LIMIT}"
