"""Benchmark ``tagger serve``: latency from a file's last write to its tag, and throughput.

Starts the daemon (a real ``python -m tagger serve`` process) on a temporary folder with
the default ``[daemon]`` settings (``settle_seconds = 5``, ``max_wait = 2``,
``batch_size = 64``) and then

1. writes ``--files`` files one at a time, each after the previous one was tagged, and
   measures the time from the end of the file's last write to its tag being written
   (``tag_writes.written_at``): median and p95. With the defaults this is the settle time
   plus the classification of one file;
2. copies a burst of ``--burst`` files into a new folder as fast as it can and measures
   the sustained rate while tagging (files / time between the first and the last tag) and
   the time from the end of the copy to the last tag.

With ``--release S`` the daemon's ``idle_release`` is ``S`` seconds and every file (and
the burst) is written only after the daemon has released its model and decode processes:
the latency then includes bringing them back.

The audio is synthetic: ``--seconds`` (default 30) long mono 22.05 kHz FLAC, one window
per file, every file with its own bytes (a different TITLE tag).

    python benchmarks/daemon_latency.py                       # the shipped model
    python benchmarks/daemon_latency.py --model runs/model --files 10 --burst 100
    python benchmarks/daemon_latency.py --json results.json
    python benchmarks/daemon_latency.py --release 2 --files 10 --burst 100   # after an idle release

Prints a summary (and writes JSON with ``--json``). Nothing outside a temporary folder is
touched; ``--keep`` keeps it (database and daemon log) for a look.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def utc_ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def written(db: Path) -> dict[str, str]:
    """path -> written_at of its (first) real tag write."""
    for _ in range(100):
        try:
            con = sqlite3.connect(db, timeout=30)
            try:
                rows = con.execute(
                    "SELECT t.path, min(w.written_at) FROM tag_writes w JOIN tracks t ON t.id = w.track_id WHERE w.dry_run = 0 GROUP BY t.id"
                ).fetchall()
                return dict(rows)
            finally:
                con.close()
        except sqlite3.OperationalError:
            time.sleep(0.1)
    raise RuntimeError("cannot read the database")


def make_files(template: Path, folder: Path, n: int, prefix: str) -> list[Path]:
    import mutagen.flac

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"{prefix}{i:04}.flac"
        shutil.copyfile(template, p)
        f = mutagen.flac.FLAC(p)
        f["title"] = f"{prefix} {i}"
        f.save()
        out.append(p)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model bundle (default: [model] path '' = the shipped model)")
    ap.add_argument("--files", type=int, default=20, help="latency samples (default 20)")
    ap.add_argument("--burst", type=int, default=500, help="files in the burst (default 500; 0 skips it)")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each audio file")
    ap.add_argument("--settle", type=float, default=None, help="override settle_seconds (default: the config default, 5)")
    ap.add_argument("--workers", type=int, default=0, help="[model] workers (default 0: CPUs - 1)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--json", dest="json_out", help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--release", type=float, default=None, help="[daemon] idle_release; write each file only after a release")
    args = ap.parse_args()

    import helpers  # tests/helpers.py: synthetic audio

    from tagger.config import DaemonConfig
    from tagger.model.bundle import default_bundle_dir

    model = Path(args.model).absolute() if args.model else default_bundle_dir()
    if not (model / "model.onnx").is_file():
        print(f"no model bundle at {model}: pass --model PATH", file=sys.stderr)
        return 2
    defaults = DaemonConfig()
    settle = args.settle if args.settle is not None else defaults.settle_seconds
    tmp = Path(tempfile.mkdtemp(prefix="tagger-bench-"))
    music = tmp / "music"
    music.mkdir()
    db = tmp / "tagger.db"
    cfg = tmp / "config.toml"
    cfg.write_text(
        f'[library]\nfolders = ["{music}"]\n[database]\npath = "{db}"\n'
        f'[model]\npath = "{model}"\nworkers = {args.workers}\n'
        f"[tags]\nmin_confidence = 0.0\n[daemon]\nsettle_seconds = {settle}\n"
        + (f"idle_release = {args.release}\n" if args.release is not None else "")
    )
    template = helpers.write_synth(tmp / "template.flac", args.seconds)
    staging = tmp / "staging"
    lat_src = make_files(template, staging / "lat", args.files, "lat")
    burst_src = make_files(template, staging / "burst", args.burst, "burst") if args.burst else []

    log = open(tmp / "daemon.log", "wb")  # noqa: SIM115
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM", "INVOCATION_ID"):
        env.pop(var, None)
    t_start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "tagger", "--config", str(cfg), "serve"], stdout=log, stderr=log, env=env, start_new_session=True)
    results: dict = {"model": str(model), "settle_seconds": settle, "max_wait": defaults.max_wait, "batch_size": defaults.batch_size, "audio_seconds": args.seconds, "cpus": os.cpu_count()}
    try:
        deadline = time.monotonic() + 300
        while "ready: watching" not in (tmp / "daemon.log").read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the daemon did not start; see " + str(tmp / "daemon.log"))
            time.sleep(0.2)
        results["startup_seconds"] = round(time.monotonic() - t_start, 1)
        print(f"daemon ready in {results['startup_seconds']} s; model {model}", flush=True)

        released = [0]  # idle releases seen so far

        def after_release() -> None:
            """With --release: wait until the daemon has released since the last wait."""
            if args.release is None:
                return
            deadline = time.monotonic() + args.release + 120
            while (n := (tmp / "daemon.log").read_text(errors="replace").count("stopped the decode processes")) <= released[0]:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not release its model")
                time.sleep(0.1)
            released[0] = n

        if args.release is not None:
            results["idle_release"] = args.release
        # 1. latency, one file at a time
        lats = []
        for src in lat_src:
            after_release()
            dest = music / src.name
            data = src.read_bytes()
            with open(dest, "wb") as f:
                f.write(data)
            last_write = time.time()
            deadline = time.monotonic() + args.timeout
            while str(dest) not in (w := written(db)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{dest} was not tagged")
                time.sleep(0.05)
            lats.append(utc_ts(w[str(dest)]) - last_write)
            print(f"  {dest.name}: {lats[-1]:.2f} s", flush=True)
        if lats:
            results["latency"] = {
                "n": len(lats),
                "median_s": round(statistics.median(lats), 2),
                "p95_s": round(percentile(lats, 0.95), 2),
                "min_s": round(min(lats), 2),
                "max_s": round(max(lats), 2),
            }

        # 2. a burst
        if burst_src:
            dest_dir = music / "burst"
            dest_dir.mkdir()
            after_release()
            t0 = time.time()
            for src in burst_src:
                shutil.copyfile(src, dest_dir / src.name)
            t1 = time.time()
            want = {str(dest_dir / s.name) for s in burst_src}
            deadline = time.monotonic() + args.timeout
            while True:
                w = written(db)
                done = [utc_ts(w[p]) for p in want if p in w]
                if len(done) == len(want):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"burst: only {len(done)} of {len(want)} tagged")
                time.sleep(0.5)
            first, last = min(done), max(done)
            results["burst"] = {
                "files": len(want),
                "copy_seconds": round(t1 - t0, 2),
                "first_tag_after_copy_s": round(first - t1, 2),
                "last_tag_after_copy_s": round(last - t1, 2),
                "tagging_seconds": round(last - first, 2),
                "tracks_per_second": round((len(want) - 1) / (last - first), 2) if last > first else None,
                "end_to_end_tracks_per_second": round(len(want) / (last - t0), 2),
            }
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                results["exit_status"] = proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                results["exit_status"] = "killed"
        log.close()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            results["folder"] = str(tmp)

    print(json.dumps(results, indent=1))
    if "latency" in results:
        lat = results["latency"]
        print(f"latency last write -> tag: median {lat['median_s']} s, p95 {lat['p95_s']} s (n={lat['n']}, settle_seconds={settle})"
              + (f", each file written after an idle release ({args.release:g} s)" if args.release is not None else ""))
    if "burst" in results:
        b = results["burst"]
        print(
            f"burst of {b['files']}: {b['tracks_per_second']} tracks/s while tagging; first tag {b['first_tag_after_copy_s']} s "
            f"and last tag {b['last_tag_after_copy_s']} s after the copy ended"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
