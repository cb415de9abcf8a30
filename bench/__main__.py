"""python -m bench [--quick] [--out DIR] [--only pipeline,peer,scale]

Full run (`make bench`): pipeline at 1, 10, 100 and 1,000 conversations × 1 and 2 workers ×
simulated latency 0 and 2 s; Procrastinate against our claim-and-complete cycle; 100,000 threads
and 2,000,000 messages under RLS. Writes bench/results/report.json and report.png.

--quick: small sizes for a smoke test (about 2 minutes), written to bench/results/quick/."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import peer, pipeline, report, scale
from bench.cluster import BenchCluster

RESULTS = Path(__file__).resolve().parent / "results"

FULL = {
    "conversations": [1, 10, 100, 1000], "workers": [1, 2], "latencies": [0.0, 2.0],
    "warmup_s": 5.0, "duration_s": 20.0, "soak_duration_s": 60.0,
    # (conversations, workers, latency, variant): the same point with one suspected cost taken away
    "variants": [(100, 1, 0.0, "paced"), (100, 2, 0.0, "paced"), (100, 2, 0.0, "no_streaming"),
                 (1000, 2, 2.0, "no_streaming"), (1000, 2, 2.0, "unbudgeted_streaming"),
                 (1000, 2, 2.0, "every_reply_streams")],
    "peer_jobs": 5000, "peer_concurrency": 32, "peer_connections": 8,
    "scale_threads": 100_000, "scale_iterations": 2000,
}
QUICK = {
    "conversations": [1, 10], "workers": [1, 2], "latencies": [0.0, 0.5],
    "warmup_s": 1.0, "duration_s": 3.0, "soak_duration_s": 3.0,
    "variants": [(10, 2, 0.0, "paced"), (10, 2, 0.0, "no_streaming")],
    "peer_jobs": 500, "peer_concurrency": 32, "peer_connections": 8,
    "scale_threads": 2000, "scale_iterations": 200,
}


def ad_hoc(spec: str, duration: float | None) -> dict[str, Any]:
    """--points 100x2x0,1000x2x2:no_streaming → only these points (no grid, no soak)."""
    variants = []
    for item in spec.split(","):
        shape, _, variant = item.strip().partition(":")
        conv, workers, latency = shape.split("x")
        variants.append((int(conv), int(workers), float(latency), variant or "default"))
    extra: dict[str, Any] = {"conversations": [], "workers": [], "latencies": [], "variants": variants}
    if duration:
        extra["duration_s"] = duration
    return extra


def points(cfg: dict[str, Any]) -> list[pipeline.Point]:
    out = []
    top_conv, top_latency = max(cfg["conversations"], default=0), max(cfg["latencies"], default=0.0)
    for latency in cfg["latencies"]:
        for workers in cfg["workers"]:
            for conv in cfg["conversations"]:
                soak = conv == top_conv and latency == top_latency
                out.append(pipeline.Point(conv, workers, latency, cfg["warmup_s"],
                                          cfg["soak_duration_s"] if soak else cfg["duration_s"], soak))
    for conv, workers, latency, variant in cfg["variants"]:
        soak = conv == top_conv and latency == top_latency  # the top point without streaming is soaked too
        out.append(pipeline.Point(conv, workers, latency, cfg["warmup_s"],
                                  cfg["soak_duration_s"] if soak else cfg["duration_s"], soak, variant))
    return out


def code_state() -> dict[str, Any]:
    """Which code was measured: the commit and whether the worker/SQL files differ from it (the
    worker is developed while benchmarks run)."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "worker", "supabase"], cwd=root,
                               capture_output=True, text=True).stdout.split("\n")
    except OSError:
        return {}
    digest = hashlib.sha256()
    for path in sorted([*root.glob("worker/*.py"), *root.glob("supabase/migrations/*.sql")]):
        digest.update(path.read_bytes())
    return {"head": head, "uncommitted_worker_or_sql_changes": [d for d in dirty if d.strip()],
            "worker_and_migrations_sha256": digest.hexdigest()[:16]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--out", type=Path, help="where report.json and report.png go")
    parser.add_argument("--only", default="pipeline,peer,scale", help="comma-separated parts to run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary cluster folder and worker logs")
    parser.add_argument("--points", help="ad-hoc pipeline points instead of the configured grid, e.g. "
                                         "100x2x0,1000x2x2 (conversations x workers x latency[:variant])")
    parser.add_argument("--duration", type=float, help="measured window of each ad-hoc point, seconds")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.points:
        cfg = {**cfg, **ad_hoc(args.points, args.duration)}
        args.out = args.out or RESULTS / "adhoc"
    out_dir = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    began = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:7.1f}s] {message}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="assistant-bench-"))
    workdir = tmp / "work"
    workdir.mkdir()
    cluster = BenchCluster(tmp / "postgres")
    result: dict[str, Any] = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full", "config": cfg, "machine": report.machine(),
        "method": {
            "latency": "commit timestamp of the reply row minus commit timestamp of the user message row "
                       "(track_commit_timestamp), for user messages committed inside the measured window",
            "overhead": "latency minus the simulated model latency",
            "conversation": "closed loop: insert a message through RLS as PostgREST does (one request), wait for "
                            "its reply (bench-only NOTIFY trigger on assistant replies), send the next",
            "replies_per_second": "reply rows committed inside the measured window / window length",
            "peak_inflight_predictions": "most create requests open at once at the simulator "
                                         f"(Prefer: wait={pipeline.PREFER_WAIT_SECONDS} >= model latency)",
            "worker_rss": "psutil RSS of each `python -m worker run` process every 0.5 s",
            "cpu": "CPU seconds of each component inside the window (psutil), per reply; all share 2 cores",
            "database": "embedded PostgreSQL, LocalDatabase(fast=True): fsync, synchronous_commit and "
                        "full_page_writes off; shared_buffers 2GB",
        },
    }
    try:
        log(f"cluster in {tmp}")
        cluster.start()
        template = cluster.migrated_template()
        result["machine"]["postgres"] = cluster.server_version()
        result["machine"]["postgres_settings"] = cluster.settings()
        result["code"] = code_state()
        if parts & {"pipeline", "peer"}:
            cluster.create_database("bench_pipeline", template)
        if "pipeline" in parts:
            pts = points(cfg)
            log(f"pipeline: {len(pts)} points")
            started = time.monotonic()
            result["pipeline"] = {"points": asyncio.run(pipeline.run(cluster, "bench_pipeline", workdir, pts, log)),
                                  "seconds": round(time.monotonic() - started, 1)}
        if "peer" in parts:
            log(f"peer: Procrastinate vs our claim-and-complete cycle, {cfg['peer_jobs']} no-op jobs each")
            started = time.monotonic()
            result["peer"] = peer.run(cluster, "bench_pipeline", cfg["peer_jobs"], cfg["peer_concurrency"],
                                      cfg["peer_connections"], log)
            result["peer"]["seconds"] = round(time.monotonic() - started, 1)
        if "scale" in parts:
            log(f"database at scale: {cfg['scale_threads']:,} threads")
            cluster.create_database("bench_scale", template)
            started = time.monotonic()
            result["database_at_scale"] = scale.run(cluster, "bench_scale", cfg["scale_threads"],
                                                    cfg["scale_iterations"], log)
            result["database_at_scale"]["seconds"] = round(time.monotonic() - started, 1)
    finally:
        cluster.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["duration_seconds"] = round(time.monotonic() - began, 1)
    if result.get("code"):
        after = code_state()
        result["code"]["head_at_end"] = after["head"]
        result["code"]["changed_during_run"] = after != {k: v for k, v in result["code"].items() if k in after}
    result["targets"] = report.targets(result)
    json_path = report.write_json(result, out_dir)
    png_path = report.draw(result, out_dir)
    log(f"wrote {json_path} and {png_path} in {result['duration_seconds'] / 60:.1f} min")
    for t in result["targets"]:
        verdict = {True: "met", False: "NOT met", None: "-"}[t["met"]]
        shown = "" if t.get("decides", True) else f" — reported beside the target: {t.get('why', '')}"
        print(f"  [{verdict:>7}] {t['name']}: {t['value']} (target {t['target']}){shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
