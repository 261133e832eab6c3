"""The owners' check of issue 17, as they run it: ``ray start`` head + worker on 127.0.0.1.

    python benchmarks/ray_by_hand.py [--tracks 96] [--port 6399] [--work DIR] [--rounds 1]

Each round starts a fresh cluster with the ``ray`` command (a head node on 127.0.0.1:PORT
and a worker node that joins it; each takes every CPU of the machine, as ``ray start``
does), then times, one after the other, ``tagger scan --json --engine ray --address
127.0.0.1:PORT`` of a fresh copy of the library (the cluster's first scan), ``tagger scan
--json`` of another copy (local), and a second Ray scan of a third copy on the same cluster,
then stops the cluster (``ray stop`` also runs first: it stops any Ray cluster this
user runs on the machine). The library is ``_library.four_minute_mp3s`` plus two broken files,
as in ``scan_ray.py``.

For each scan it also prints where the machine's CPU time went while it ran (every
process's user + system time, sampled from /proc every 0.2 s and grouped by process title:
the scan itself, Ray's decode workers, the model actor, Ray Data's own actors, the cluster's
daemons, each with how many of its processes ran), and the idle CPU time: on a 2-core
machine every extra CPU second is wall time.
The genres each scan records are compared with the local scan's. Prints figures; nothing is
asserted. Linux only. Run it with nothing else loading the machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _library import four_minute_mp3s  # noqa: E402
from _procs import stats  # noqa: E402
from scan_ray import LOOPBACK, config, fresh_copy  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
#: The ``ray`` and ``tagger`` commands of the Python running this (the venv with the ray extra).
BIN = Path(sys.executable).parent


def _proc_cpu() -> dict[int, tuple[str, float]]:
    """``pid: (title, CPU seconds so far)`` of every process."""
    out = {}
    for pid, fields in stats().items():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[pid] = (cmd, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def _group(cmd: str, scan_pid: int, pid: int) -> str:
    if pid == scan_pid:
        return "the scan (driver)"
    if cmd.split(" ", 1)[0].endswith(("/raylet", "/gcs_server")):
        # before the next test: a raylet's command line names default_worker.py (the
        # command it starts workers with), and until 2026-12-07 the raylets were counted
        # among the decode workers here
        return "cluster daemons (gcs, raylets, monitors)"
    if cmd.startswith("ray::IDLE") or "default_worker.py" in cmd:
        return "Ray worker processes (decode tasks)"
    if cmd.startswith("ray::"):
        name = cmd[5:].split("(")[0].split(".")[0].split()[0]
        if name in ("_StatsActor", "_AutoscalingCoordinatorActor", "ActorLocationTracker"):
            return "Ray Data's own actors"
        if name.startswith("MapWorker"):
            return "model actor(s)"
        if name == "Writer":
            return "tag writer actor(s)"
        return f"ray::{name}"
    if "forkserver" in cmd or "multiprocessing" in cmd:
        return "local decode workers"
    if "/ray/" in cmd or "ray.util.client" in cmd:
        return "cluster daemons (gcs, raylets, monitors)"
    return "other"


class CpuSampler(threading.Thread):
    """CPU time each process used while the sampler ran (a process's last reading counts)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.first = _proc_cpu()
        self.last: dict[int, tuple[str, float]] = dict(self.first)
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.2):
            for pid, (cmd, cpu) in _proc_cpu().items():
                # A Ray worker renames itself (ray::IDLE, ray::MapWorker(...)) once it has work.
                self.last[pid] = (cmd if cmd.startswith("ray::") or pid not in self.last else self.last[pid][0], cpu)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def used(self, scan_pid: int) -> tuple[Counter[str], Counter[str]]:
        """CPU seconds by process group, and how many processes of each group used any."""
        used: Counter[str] = Counter()
        procs: Counter[str] = Counter()
        for pid, (cmd, cpu) in self.last.items():
            before = self.first.get(pid, (cmd, 0.0))[1]
            if cpu - before > 0:
                group = _group(cmd, scan_pid, pid)
                used[group] += cpu - before
                procs[group] += 1
        return used, procs


def _idle() -> float:
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[4]) + int(fields[5])) / TICK


def timed_scan(cfg: Path, lib: Path, *extra: str) -> tuple[float, tuple[Counter[str], Counter[str]], float, int]:
    """(wall s, (CPU s, processes) by process group, idle CPU s of the machine, exit status)."""
    sampler = CpuSampler()
    sampler.start()
    idle = _idle()
    t = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "tagger"), "--config", str(cfg), "scan", "--json", str(lib), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate()
    wall = time.perf_counter() - t
    idle = _idle() - idle
    sampler.stop()
    if proc.returncode not in (0, 1):
        raise SystemExit(f"scan failed ({proc.returncode}): {err[-3000:]}")
    return wall, sampler.used(proc.pid), idle, proc.returncode


def recorded(cfg: Path, lib: Path) -> dict[str, tuple[str, str | None]]:
    """``{file: (status, top genre)}`` as the scan recorded them."""
    con = sqlite3.connect(cfg.with_suffix(".db"))
    rows = con.execute("SELECT path, status, top_genre FROM track_genres").fetchall()
    con.close()
    return {str(Path(p).relative_to(lib)): (s, g) for p, s, g in rows}


def ray_cmd(*args: str, loopback: bool) -> None:
    env = dict(os.environ)
    if loopback:
        env.update(LOOPBACK)
    else:
        # The worker must join without it (docs/cluster.md, "On one machine").
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    subprocess.run([str(BIN / "ray"), *args], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tracks", type=int, default=96)
    ap.add_argument("--port", type=int, default=6399)
    ap.add_argument("--work", default=None, help="folder for generated files (kept between runs)")
    ap.add_argument("--rounds", type=int, default=1, help="fresh clusters, one after the other")
    args = ap.parse_args()
    if not (BIN / "ray").exists() or not (BIN / "tagger").exists():
        raise SystemExit(f"no `ray` or `tagger` command in {BIN}: run it with the venv's python, with the ray extra installed")
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "tagger-bench-ray-by-hand"
    work.mkdir(parents=True, exist_ok=True)
    src = four_minute_mp3s(work / "mp3", args.tracks)[0].parents[1]  # the library folder
    address = f"127.0.0.1:{args.port}"
    print(f"{args.tracks} four-minute MP3s + 2 broken files; {os.cpu_count()} CPUs; cluster: ray start head + worker at {address}")
    for round_ in range(1, args.rounds + 1):
        ray_cmd("stop", loopback=False)
        ray_cmd("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(args.port), "--include-dashboard", "false", loopback=True)
        ray_cmd("start", "--address", f"{socket.gethostname()}:{args.port}", loopback=False)
        try:
            runs = []
            for name, extra in (("ray, first scan", ("--engine", "ray", "--address", address)), ("local", ()), ("ray, second scan", ("--engine", "ray", "--address", address))):
                lib = fresh_copy(src, work / name.replace(", ", "-").replace(" ", "-"))
                cfg = config(work, lib.name)
                wall, used, idle, code = timed_scan(cfg, lib, *extra)
                runs.append((name, lib, cfg, wall, used, idle, code))
        finally:
            ray_cmd("stop", loopback=False)
        local = next(r for r in runs if r[0] == "local")
        want = recorded(local[2], local[1])
        print(f"\nround {round_}")
        for name, lib, cfg, wall, used, idle, code in runs:
            got = recorded(cfg, lib)
            same = sum(got.get(k) == v for k, v in want.items())
            print(f"  {name:17} {wall:6.1f} s  x local {wall / local[3]:.2f}  exit {code}  recorded {len(got)}  same status and top genre as local {same}/{len(want)}")
            cpu, procs = used
            print(f"      CPU {sum(cpu.values()):5.1f} s, idle {idle:4.1f} s: " + ", ".join(f"{k} {v:.1f} ({procs[k]} proc.)" for k, v in cpu.most_common() if v >= 0.05))


if __name__ == "__main__":
    main()
