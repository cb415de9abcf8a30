"""Small measurement helpers: percentiles, CPU time per component, memory of processes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import psutil


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summary(values: Iterable[float], digits: int = 2) -> dict[str, float | int | None]:
    data = sorted(values)
    out: dict[str, float | int | None] = {"n": len(data)}
    for name, q in (("p50", 50), ("p95", 95), ("p99", 99)):
        value = percentile(data, q)
        out[name] = round(value, digits) if value is not None else None
    out["mean"] = round(sum(data) / len(data), digits) if data else None
    out["max"] = round(data[-1], digits) if data else None
    return out


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class CpuMeter:
    """CPU seconds used by named groups of processes between two snapshots. A group is a
    callable returning its processes now (the PostgreSQL backends come and go)."""

    def __init__(self, groups: dict[str, object]) -> None:
        self.groups = groups
        self.start: dict[str, dict[int, float]] = {}
        self.machine_start = psutil.cpu_times()

    def _snapshot(self) -> dict[str, dict[int, float]]:
        snap: dict[str, dict[int, float]] = {}
        for name, procs in self.groups.items():
            found: dict[int, float] = {}
            for proc in procs():  # type: ignore[operator]
                try:
                    found[proc.pid] = _cpu(proc)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            snap[name] = found
        return snap

    def begin(self) -> None:
        self.start = self._snapshot()
        self.machine_start = psutil.cpu_times()

    def end(self) -> dict[str, float]:
        now = self._snapshot()
        used = {name: round(sum(t - self.start.get(name, {}).get(pid, 0.0) for pid, t in procs.items()), 3)
                for name, procs in now.items()}
        machine = psutil.cpu_times()
        busy = lambda t: t.user + t.system + getattr(t, "nice", 0) + getattr(t, "irq", 0) + getattr(t, "softirq", 0)  # noqa: E731
        idle = lambda t: t.idle + getattr(t, "iowait", 0)  # noqa: E731
        b, i = busy(machine) - busy(self.machine_start), idle(machine) - idle(self.machine_start)
        used["machine_busy_fraction"] = round(b / (b + i), 3) if b + i > 0 else 0.0
        return used


def rss_mb(pid: int) -> float | None:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.NoSuchProcess:
        return None


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx * 60
