"""A serving process's start with CPython's cyclic garbage collector held back, and what the
start built kept out of later collections.

Starting ryla imports torch, diffusers, transformers and FastAPI and builds the models: some
600,000 Python objects that live as long as the process, and few cycles to free. CPython's
collector (Modules/gcmodule.c) runs a young-generation pass every 700 net allocations and a
full pass over every tracked object every so often. Importing the serving stack on a 2-core
machine ran 1,542 collections: 7.3 s of imports against 5.8 s with the young generation's
threshold at 100,000 (34 collections; bench/results/README.md, "Cold start"). Once started, a
full pass over those objects takes 0.3 s there, a pause that lands in whichever request is
running when it comes.

So `begin()` raises the young generation's threshold for the start, and `finish()`, once the
models are loaded, moves every object alive into the permanent generation that collections
skip (gc.freeze, which the CPython documentation describes for long-lived start-up state) and
puts the thresholds back. No full collection first: it would cost the 0.3 s again, and the
cyclic garbage a start leaves is a few hundred objects (635 after importing the serving stack),
frozen with the rest. At exit the objects are unfrozen, so native extensions that check at
shutdown that their objects were freed (Triton's nanobind bindings) find them freed.
"""

from __future__ import annotations

import atexit
import gc

# Young-generation allocations between collections while the process starts.
STARTUP_GEN0_THRESHOLD = 100_000

_thresholds_before: tuple[int, ...] | None = None
_unfreeze_registered = False


def begin() -> None:
    """Hold the collector back (call first thing in a serving process or a one-shot command)."""
    global _thresholds_before
    if _thresholds_before is None:
        _thresholds_before = gc.get_threshold()
        gc.set_threshold(STARTUP_GEN0_THRESHOLD, *_thresholds_before[1:])


def finish() -> None:
    """The start is over: freeze what it built and collect as usual from now on."""
    global _thresholds_before, _unfreeze_registered
    gc.freeze()
    if _thresholds_before is not None:
        gc.set_threshold(*_thresholds_before)
        _thresholds_before = None
    if not _unfreeze_registered:
        atexit.register(gc.unfreeze)
        _unfreeze_registered = True
