"""Shared by the benchmarks: the memory of a process and all its descendants, from /proc.

RSS counts a page shared by several processes (the fork server's and the decode
workers' copy-on-write pages, shared libraries) once in each of them; PSS divides
it among them, so the PSS sum is what the processes together take from the machine.
Linux only.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass


@dataclass
class Proc:
    pid: int
    name: str
    rss_mb: float
    pss_mb: float


def stats() -> dict[int, list[str]]:
    """Every process's ``/proc/PID/stat`` fields after its name (``[0]`` the state, ``[1]`` the
    parent, ``[11]``/``[12]`` user/system CPU in clock ticks); processes that vanish are left out."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        out[int(entry)] = stat[stat.rindex(")") + 2 :].split()
    return out


def descendants(pid: int) -> list[tuple[int, int]]:
    """``(pid, depth)`` of ``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for p, fields in stats().items():
        children.setdefault(int(fields[1]), []).append(p)
    out, todo = [], [(pid, 0)]
    while todo:
        p, depth = todo.pop()
        out.append((p, depth))
        todo.extend((c, depth + 1) for c in children.get(p, []))
    return out


def _kb(path: str, key: str) -> float:
    with open(path) as f:
        for line in f:
            if line.startswith(key):
                return float(line.split()[1])
    return 0.0


def processes(pid: int) -> list[Proc]:
    """Memory of ``pid`` and its descendants (processes that vanish meanwhile are left out)."""
    out = []
    for p, depth in descendants(pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            rss = _kb(f"/proc/{p}/status", "VmRSS:")
            pss = _kb(f"/proc/{p}/smaps_rollup", "Pss:")
        except OSError:
            continue
        out.append(Proc(p, _short(cmd, depth), rss / 1024, pss / 1024))
    return out


def _short(cmd: str, depth: int) -> str:
    if "multiprocessing.forkserver" in cmd:  # workers are forked from the fork server: same command line
        return "fork server" if depth == 1 else "decode worker"
    if "multiprocessing.resource_tracker" in cmd:
        return "resource tracker"
    if depth == 0 and "tagger" in cmd:
        return "tagger " + next((c for c in ("serve", "scan") if c in cmd.split()), "")
    return cmd[:40]


def report(procs: list[Proc]) -> str:
    lines = [f"    {p.name:<18} pid {p.pid:>7}  RSS {p.rss_mb:7.1f} MB  PSS {p.pss_mb:7.1f} MB" for p in sorted(procs, key=lambda p: -p.rss_mb)]
    lines.append(f"    {'all ' + str(len(procs)) + ' processes':<30}  RSS {sum(p.rss_mb for p in procs):7.1f} MB  PSS {sum(p.pss_mb for p in procs):7.1f} MB")
    return "\n".join(lines)


class Sampler(threading.Thread):
    """Samples a process tree every ``interval`` s; keeps the peak sums and the largest process."""

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss_sum = self.peak_pss_sum = self.peak_single_rss = 0.0
        self.max_processes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            procs = processes(self.pid)
            if procs:
                self.peak_rss_sum = max(self.peak_rss_sum, sum(p.rss_mb for p in procs))
                self.peak_pss_sum = max(self.peak_pss_sum, sum(p.pss_mb for p in procs))
                self.peak_single_rss = max(self.peak_single_rss, max(p.rss_mb for p in procs))
                self.max_processes = max(self.max_processes, len(procs))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
