"""``tagger scan --engine ray`` against a local scan of the same files on the same cores.

    python benchmarks/scan_ray.py [--tracks 96] [--nodes 1,2,4] [--cpus-per-node N] [--work DIR]

A library of four-minute MP3s (``_library.four_minute_mp3s``) and two broken files; each
scan gets a fresh copy of it (the first scan writes tags). First a local scan, then a Ray
scan on a cluster of 2 simulated nodes on this machine (the issue's set-up: a head and a
worker node, each with ``--cpus-per-node`` CPUs, default all of them, as ``ray start``
gives), then a table for each ``--nodes`` count, then the local scan again (the machine may
be shared: the two local figures bracket what the load did meanwhile).

The clusters are ``ray.cluster_utils.Cluster`` nodes, every address on 127.0.0.1, started
before and stopped after each scan (their start-up is printed, not counted: a cluster is
started once and scanned many times). Each scan is the real CLI in a child process.
Memory: the scan's peak RSS (``wait4``) and the peak PSS summed over every process of the
scan and of the cluster (sampled from /proc every 0.25 s for a local scan, every second for
a Ray scan and its cluster). The genres written are compared
with the local scan's. Prints figures; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _library import four_minute_mp3s  # noqa: E402
from _procs import Sampler, processes  # noqa: E402

LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # keep Ray's nodes on 127.0.0.1 (docs/cluster.md)


class TreeSampler(threading.Thread):
    """Peak PSS of every process below ``pid`` (``pid`` itself left out).

    Once a second: reading smaps of the thirty-odd processes of a cluster takes CPU time
    from the scan being measured."""

    def __init__(self, pid: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_pss = pid, interval, 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            procs = [p for p in processes(self.pid) if p.pid != self.pid]
            self.peak_pss = max(self.peak_pss, sum(p.pss_mb for p in procs))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def fresh_copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    (dst / "broken1.mp3").write_bytes(b"not audio at all")
    (dst / "broken2.mp3").write_bytes(b"ID3" + bytes(range(256)) * 80)
    return dst


def config(work: Path, name: str) -> Path:
    db = work / f"{name}.db"
    for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        p.unlink(missing_ok=True)
    cfg = work / f"{name}.toml"
    cfg.write_text(f'[database]\npath = "{db}"\n')
    return cfg


def scan(cfg: Path, lib: Path, *extra: str, tree: int | None = None) -> tuple[dict, float, float, float]:
    """(summary, wall s, scan's peak RSS MB, peak PSS MB of the scan and of ``tree``'s processes)."""
    env = {**os.environ, **LOOPBACK}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "tagger.cli", "--config", str(cfg), "scan", "--json", str(lib), *extra], stdout=out, stderr=err, text=True, env=env)
        sampler = TreeSampler(tree) if tree is not None else Sampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        sampler.stop()
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if code not in (0, 1):
            raise SystemExit(f"scan failed ({code}): {err.read()[-3000:]}")
        pss = sampler.peak_pss if tree is not None else sampler.peak_pss_sum
        return json.loads(out.read()), wall, usage.ru_maxrss / 1024, pss


def genres(cfg: Path, lib: Path) -> dict[str, str]:
    db = cfg.with_suffix(".db")
    con = sqlite3.connect(db)
    rows = con.execute("SELECT t.path, p.top_genre FROM tracks t LEFT JOIN predictions p ON p.track_id = t.id").fetchall()
    con.close()
    return {str(Path(p).relative_to(lib)): g for p, g in rows}


def start_cluster(nodes: int, cpus: int):
    os.environ.update(LOOPBACK)
    from ray.cluster_utils import Cluster

    args = {"num_cpus": cpus, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    t = time.perf_counter()
    c = Cluster(initialize_head=True, head_node_args=args)
    for _ in range(nodes - 1):
        c.add_node(**args)
    return c, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tracks", type=int, default=96)
    ap.add_argument("--nodes", default="1,2,4", help="simulated node counts for the table")
    ap.add_argument("--cpus-per-node", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", default=None, help="folder for generated files (kept between runs)")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "tagger-bench-ray"
    work.mkdir(parents=True, exist_ok=True)
    files = four_minute_mp3s(work / "mp3", args.tracks)
    src = files[0].parents[1]
    n = len(files) + 2
    print(f"{os.cpu_count()} CPUs, no GPU; {len(files)} four-minute MP3s (192 kb/s) + 2 broken files; "
          f"simulated nodes get {args.cpus_per_node} CPUs each")

    def local(label: str) -> tuple[float, dict[str, str]]:
        lib = fresh_copy(src, work / "lib-local")
        cfg = config(work, "local")
        s, wall, rss, pss = scan(cfg, lib)
        print(f"{label}: {n} files in {wall:.1f}s wall = {n / wall:.2f} tracks/s; peak RSS {rss:.0f} MB (scan), "
              f"peak PSS {pss:.0f} MB (all its processes); counts {s['counts']}")
        return wall, genres(cfg, lib)

    def on_ray(nodes: int) -> tuple[float, float, float, dict[str, str], dict]:
        lib = fresh_copy(src, work / "lib-ray")
        cfg = config(work, "ray")
        cluster, started = start_cluster(nodes, args.cpus_per_node)
        try:
            s, wall, rss, pss = scan(cfg, lib, "--engine", "ray", "--address", cluster.address, tree=os.getpid())
        finally:
            cluster.shutdown()
        return wall, rss, pss, genres(cfg, lib), {"started": started, "counts": s["counts"]}

    wall_local, ref = local("local scan")
    rows = []
    for k in [2] + [int(x) for x in args.nodes.split(",") if x.strip() and int(x) != 2]:
        wall, rss, pss, got, info = on_ray(k)
        same = sum(ref[p] == got.get(p) for p in ref)
        rows.append((k, wall, rss, pss, same, info))
        if k == 2:
            print(f"Ray scan, head + 1 worker node: {n} files in {wall:.1f}s wall = {n / wall:.2f} tracks/s "
                  f"({wall / wall_local:.2f}x the local scan's wall time); peak RSS {rss:.0f} MB (driver), "
                  f"peak PSS {pss:.0f} MB (driver and every cluster process); cluster start {info['started']:.1f}s (not counted); "
                  f"same top genre as local on {same}/{len(ref)} files; counts {info['counts']}")
    wall_local2, _ = local("local scan again")
    print()
    print("| nodes (simulated, this machine) | CPUs in the cluster | wall s | tracks/s | x local | peak PSS MB (driver + cluster) | same genres |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    mean_local = (wall_local + wall_local2) / 2
    print(f"| local scan (no Ray) | {os.cpu_count()} cores | {wall_local:.1f} / {wall_local2:.1f} | {n / mean_local:.2f} | 1.00 | - | - |")
    for k, wall, _rss, pss, same, _info in sorted(rows):
        print(f"| {k} | {k * args.cpus_per_node} | {wall:.1f} | {n / wall:.2f} | {wall / mean_local:.2f} | {pss:.0f} | {same}/{len(ref)} |")


if __name__ == "__main__":
    main()
