"""CPython's cyclic garbage collector, tuned for a long-running asyncio process (measured on
CPython 3.11, the version the worker is built and benchmarked on).

The worker's heap is mostly long-lived (modules, pools) plus what the runs in flight hold for the
seconds a prediction takes. With CPython's default threshold (a young collection every 700 net
container allocations), every run's objects went through all three generations, and each full
collection traversed the ~120,000 objects of the start-up heap. Measured at 1,000 streamed
conversations: 14% of the worker's CPU went to the collector. With the start-up heap frozen and a
young collection every 10,000 net allocations, it is 2-3% (bench/README.md, "Garbage
collection"); 50,000 (under 1%) measured no better within the benchmark's spread.

Acyclic garbage is freed by reference counting as before; only objects in reference cycles wait
for the collector. A successful reply leaves none (a test checks it). A failed request or run
does leave some: its exception's traceback holds frames that hold the exception (about 26 objects
for a create answered 500 and retried, about 120 for a run that fails). The threshold bounds what
waits to 10,000 objects, a few MB in a storm of failures."""

from __future__ import annotations

import gc

GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Call once the process's modules are loaded: what exists moves to the permanent generation
    (the collector no longer traverses it), and young collections come less often."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
