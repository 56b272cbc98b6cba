"""Measuring on a shared CPU: how many cores other processes use, waiting for them to leave,
and redoing a run they disturbed (benchmarks/llamacpp_shift.py; ``machine`` describes the CPU)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from workers import Progress, emit


def cpu_snap() -> tuple[float, float, float]:
    """(wall s, CPU s busy on the whole machine, CPU s of this process) now."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)  # incl. steal
    t = os.times()
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), t.user + t.system


def others_cores(a, b) -> float:
    """Cores kept busy by OTHER processes between two snapshots (the machine is shared)."""
    wall = b[0] - a[0]
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / wall) if wall > 0 else 0.0


class Contended(Exception):
    """Other processes took CPU during a measured run."""


class Watch:
    """Raises :class:`Contended` when, over a window of ``every_s``, other processes used more
    than ``limit`` cores (``limit`` 0: never)."""

    def __init__(self, limit: float, every_s: float = 2.0):
        self.limit, self.every_s, self.last = limit, every_s, cpu_snap()

    def check(self) -> None:
        if not self.limit or time.perf_counter() - self.last[0] < self.every_s:
            return
        snap = cpu_snap()
        busy = others_cores(self.last, snap)
        self.last = snap
        if busy > self.limit:
            raise Contended(busy)


def measure(run, a: dict, progress: Progress) -> dict:
    """One measured run, on a quiet CPU: wait for other processes to leave it, run, and start
    again if they come back during the run (at most ``--max-retries`` times; the last try
    runs to the end whatever happens, and its contention is reported)."""
    retries = 0
    while True:
        idle = wait_idle(a["wait_idle"])
        last = retries >= a["max_retries"]
        try:
            return dict(run(Watch(0.0 if last else a["abort_above"])), **idle, aborted_tries=retries)
        except Contended as e:
            retries += 1
            progress.undo_run()
            emit("note", f"run aborted: other processes used {float(e.args[0]):.2f} cores; retry {retries}")


def wait_idle(max_wait_s: float, threshold: float = 0.25) -> dict:
    """Wait (at most ``max_wait_s``) until other processes use less than ``threshold`` cores
    over a 1-second window: with OpenMP threads on every core, a single busy neighbour makes
    both engines' barriers stall (rates fall by 10-100x), so a measurement never starts then."""
    start = time.perf_counter()
    while True:
        a = cpu_snap()
        time.sleep(1.0)
        busy = others_cores(a, cpu_snap())
        waited = time.perf_counter() - start
        if busy < threshold or waited >= max_wait_s:
            return dict(idle_wait_s=round(waited, 1), others_cpu_cores_before=round(busy, 3))


def best_run(runs: list[dict]) -> dict:
    """The fastest run (best of N: contention only ever slows a run down), with every run's
    rate and the CPU other processes used during it attached."""
    out = dict(max(runs, key=lambda r: r["decode_tok_s"] or 0))
    out["decode_tok_s_runs"] = [r["decode_tok_s"] for r in runs]
    out["others_cpu_cores_runs"] = [r["others_cpu_cores"] for r in runs]
    return out


def machine() -> dict:
    info = dict(platform=platform.platform(), machine=platform.machine(), python=platform.python_version(),
                cpu_count=os.cpu_count(), cpus_allowed=len(os.sched_getaffinity(0)))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["loadavg_before"] = os.getloadavg()
    return info
