"""What the speed layer's modules share, and nothing else: the fp8 format's constants and the
start-up probes that decide whether an optional kernel may be used here. A leaf module: it
imports no other part of ryla, so every speed module can import it without a circle."""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

# Hopper's fp8 tensor cores take e4m3 inputs (torch._scaled_mm); its largest finite value.
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


@functools.cache
def triton_kernels_available() -> bool:
    """A GPU, and what ryla.speed.kernels needs to define its kernels: Triton (PyTorch's CUDA
    builds bring it) and torch.library's Triton ops. Callers import ryla.speed.kernels, which
    registers the kernels as torch ops, once this says yes."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
        from torch.library import triton_op, wrap_triton  # noqa: F401
    except ImportError:
        return False
    return True


def agrees_with_pytorch(what: str, run, reference, fallback: str) -> bool:
    """Start-up check of an optional kernel: `run()` on a small input against PyTorch's
    `reference()`. A kernel that cannot build or run here, or computes something else, is not
    used for requests; a warning says why and what runs instead (`fallback`)."""
    try:
        got = run().float()
    except Exception as exc:  # a build for another GPU or PyTorch, a Triton that cannot compile it
        log.warning("%s does not run here (%s); %s", what, exc, fallback)
        return False
    expected = reference().float()
    error = float((got - expected).norm() / expected.norm())
    if error > 0.01:
        log.warning("%s differs from PyTorch's by %.3g; %s", what, error, fallback)
        return False
    return True
