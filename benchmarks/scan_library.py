"""``tagger scan`` on a library of 4-minute MP3s, and a no-change re-scan of 100,000 files.

    python benchmarks/scan_library.py [--tracks 200] [--model BUNDLE] [--big 100000] [--windows N] [--workers N]

Each scan runs the real CLI in a child process. Memory: the largest process's peak RSS
(``wait4``'s ``ru_maxrss`` of the scan, which covers the decode workers it waited for)
and the peak of all its processes together (RSS and PSS sums, sampled every 0.25 s from
/proc by ``_procs.Sampler``). Prints figures; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _library import four_minute_mp3s  # noqa: E402
from _procs import Sampler  # noqa: E402


def run_scan(config: Path, root: Path, *extra: str) -> tuple[dict, float, float, Sampler]:
    """One scan in a fresh process: (summary, wall seconds, largest process's peak RSS in MB, sampler)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tagger.cli", "--config", str(config), "scan", "--json", str(root), *extra], stdout=out, stderr=err, text=True
        )
        sampler = Sampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this scan's own rusage (Popen never reaped it)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        sampler.stop()
        out.seek(0)
        err.seek(0)
        if proc.returncode not in (0, 1):
            raise SystemExit(f"scan failed ({proc.returncode}): {err.read()[-2000:]}")
        return json.loads(out.read()), wall, usage.ru_maxrss / 1024, sampler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tracks", type=int, default=200)
    ap.add_argument("--model", default="")
    ap.add_argument("--big", type=int, default=100_000, help="files in the synthetic no-change tree (0: skip)")
    ap.add_argument("--work", default=None, help="folder for generated files (kept between runs)")
    ap.add_argument("--windows", type=int, default=None, help="[model] max_windows (default: the config default)")
    ap.add_argument("--workers", type=int, default=None, help="[model] workers (default: one per CPU)")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "tagger-bench-scan"
    work.mkdir(parents=True, exist_ok=True)
    files = four_minute_mp3s(work / "mp3", max(1, args.tracks))
    lib = files[0].parents[1]
    db = work / "scan.db"
    for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        p.unlink(missing_ok=True)
    config = work / "config.toml"
    model = f'path = "{args.model}"\n'
    if args.windows:
        model += f"max_windows = {args.windows}\n"
    if args.workers:
        model += f"workers = {args.workers}\n"
    config.write_text(f'[database]\npath = "{db}"\n[model]\n{model}')
    # The tags are rewritten by the first scan: start from pristine copies each run.
    for f in files:
        from mutagen.id3 import ID3

        tags = ID3(f)
        if tags.getall("TCON") or tags.getall("TXXX"):
            tags.delall("TCON")
            tags.delall("TXXX:TAGGER_GENRE")
            tags.save(f)
    rss = rss2 = 0.0
    if args.tracks:
        rss, rss2 = library_scans(config, lib, files)
    if args.big:
        big_scan(args, work, files, rss, rss2)


def library_scans(config: Path, lib: Path, files: list[Path]) -> tuple[float, float]:
    print(f"{os.cpu_count()} CPUs; library: {len(files)} four-minute MP3s (192 kb/s) under {lib}")
    s, wall, rss, sampler = run_scan(config, lib)
    n = sum(v for k, v in s["counts"].items() if k != "unchanged")
    print(f"first scan:     {n} tracks in {wall:.1f}s wall = {n / wall:.2f} tracks/s "
          f"(scan's own rate {s['tracks_per_second']}/s); largest process's peak RSS {rss:.0f} MB, "
          f"all {sampler.max_processes} processes together: peak RSS {sampler.peak_rss_sum:.0f} MB, PSS {sampler.peak_pss_sum:.0f} MB; "
          f"counts {s['counts']}")
    s, wall, rss2, _ = run_scan(config, lib)
    print(f"no-change scan: {s['counts']['unchanged']} unchanged in {wall:.2f}s wall "
          f"(scan's own {s['seconds']}s), peak RSS {rss2:.0f} MB")
    return rss, rss2


def big_scan(args, work: Path, files: list[Path], rss: float, rss2: float) -> None:
    if True:
        big = work / "big"
        big_db = work / "big.db"
        marker = big / f".made-{args.big}"
        if not marker.exists():
            print(f"making {args.big} files...", flush=True)
            payload = files[0].read_bytes()[:4096]
            for i in range(args.big):
                d = big / f"artist{i // 1000:03d}" / f"album{(i // 20) % 50:02d}"
                if i % 20 == 0:
                    d.mkdir(parents=True, exist_ok=True)
                (d / f"{i:06d}.mp3").write_bytes(payload)
            marker.touch()
        for p in (big_db, Path(f"{big_db}-wal"), Path(f"{big_db}-shm")):
            p.unlink(missing_ok=True)
        big_cfg = work / "big.toml"
        big_cfg.write_text(f'[database]\npath = "{big_db}"\n[model]\npath = "{args.model}"\n')
        subprocess.run([sys.executable, "-m", "tagger.cli", "--config", str(big_cfg), "db", "upgrade"], check=True, capture_output=True)
        con = sqlite3.connect(big_db)
        rows = []
        for root, _dirs, names in os.walk(big):
            for name in names:
                if name.endswith(".mp3"):
                    p = os.path.join(root, name)
                    st = os.stat(p)
                    rows.append((p, st.st_size, st.st_mtime, "tagged"))
        con.executemany(
            "INSERT INTO tracks (path, size, mtime, status, first_seen, last_scanned, updated_at) "
            "VALUES (?, ?, ?, ?, datetime('now'), datetime('now'), datetime('now'))",
            rows,
        )
        con.commit()
        con.close()
        s, wall, rss3, _ = run_scan(big_cfg, big)
        print(f"no-change re-scan of {s['counts']['unchanged']} files already in the database: "
              f"{s['seconds']:.2f}s inside scan, {wall:.2f}s wall including start-up; peak RSS {rss3:.0f} MB")


if __name__ == "__main__":
    main()
