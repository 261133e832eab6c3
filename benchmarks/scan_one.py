"""Wall time of ``tagger scan FILE`` for one new 4-minute MP3: start-up to exit.

    python benchmarks/scan_one.py [--runs 5] [--model BUNDLE]

Each run is the real CLI in a fresh process on a new copy of the file (so it is
classified and tagged, 2 windows by default): first against a database that already
exists (created by ``tagger db upgrade`` beforehand, as on a machine that has scanned
before), then the same number of runs each with a new database (created and migrated
inside the run). Prints each run's wall time, CPU time (user + system, the scan and its
children: less sensitive than wall time to other work on a shared machine) and peak RSS,
and the median; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _library import four_minute_mp3s  # noqa: E402


def one_scan(config: Path, path: Path) -> tuple[float, float, float, str]:
    """(wall s, CPU s of the scan and its children, peak RSS MB, its summary line)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "tagger.cli", "--config", str(config), "scan", str(path)], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this run's own rusage
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode not in (0, 1):
            raise SystemExit(f"scan failed ({proc.returncode}): {err.read()[-2000:]}")
        summary = (out.read().strip().splitlines() or [""])[-1]
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", default="")
    ap.add_argument("--work", default=None, help="folder for the generated MP3 (kept between runs)")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "tagger-bench-mp3"
    src = four_minute_mp3s(work, 1)[0]
    tmp = Path(tempfile.mkdtemp(prefix="tagger-one-"))
    try:
        print(f"{os.cpu_count()} CPUs; one four-minute MP3 ({src.stat().st_size / 1e6:.1f} MB) per scan")
        for fresh in (False, True):
            db = tmp / "existing.db"
            config = tmp / "config.toml"
            walls = []
            for i in range(args.runs):
                if fresh:
                    db = tmp / f"fresh{i}.db"
                config.write_text(f'[database]\npath = "{db}"\n[model]\npath = "{args.model}"\n')
                if not fresh and i == 0:
                    subprocess.run([sys.executable, "-m", "tagger.cli", "--config", str(config), "db", "upgrade"], check=True, capture_output=True)
                target = tmp / f"run{int(fresh)}-{i}" / "track.mp3"
                target.parent.mkdir()
                shutil.copyfile(src, target)
                wall, cpu, rss, line = one_scan(config, target)
                walls.append(wall)
                print(f"  {'new' if fresh else 'existing'} database, run {i + 1}: {wall:.2f} s wall, {cpu:.2f} s CPU, peak RSS {rss:.0f} MB  ({line})", flush=True)
            print(f"{'new' if fresh else 'existing'} database: median {statistics.median(walls):.2f} s, min {min(walls):.2f} s over {len(walls)} runs")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
