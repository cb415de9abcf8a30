"""The worker process tunes CPython's cyclic garbage collector once its modules are loaded
(worker.gctune.tune_gc): the start-up heap frozen, young collections every GC_YOUNG_THRESHOLD net
allocations. Run in a child interpreter: freezing is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import asyncio, gc, json
import worker.__main__ as main
import worker.app

seen = {}

async def fake_serve(settings, database_url):
    seen["threshold"] = gc.get_threshold()
    seen["frozen"] = gc.get_freeze_count()
    # cyclic garbage made after tuning is still collected
    class Node: pass
    a, b = Node(), Node()
    a.other, b.other = b, a
    del a, b
    seen["collected"] = gc.collect()

worker.app.serve = fake_serve
before = {"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}
settings = main._settings().model_copy(update={"replicate_api_token": "x"})
asyncio.run(main._run_async(settings, None))
print(json.dumps({"before": before, "during": seen}))
"""


def test_worker_run_freezes_the_start_up_heap_and_collects_young_objects_less_often() -> None:
    from worker.gctune import GC_YOUNG_THRESHOLD

    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "DATABASE_URL": "postgresql://127.0.0.1:9/none"})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["before"]["frozen"] == 0 and result["before"]["threshold"][0] < GC_YOUNG_THRESHOLD
    assert result["during"]["threshold"][0] == GC_YOUNG_THRESHOLD
    assert result["during"]["threshold"][1:] == result["before"]["threshold"][1:]  # older generations as they were
    assert result["during"]["frozen"] > 10_000  # modules, classes, functions of the loaded worker
    assert result["during"]["collected"] >= 2  # objects made after the freeze are not frozen


def test_the_metrics_show_the_collector_and_the_processs_memory() -> None:
    """What an operator watches to see the tuning at work and memory stay flat."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from worker.observability import Metrics

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(generate_latest(Metrics().registry).decode())
               for s in family.samples}
    assert samples[("process_resident_memory_bytes", ())] > 10_000_000
    assert samples[("process_open_fds", ())] > 0
    assert {("python_gc_collections_total", (("generation", g),)) for g in "012"} <= samples.keys()
