"""Memory of the idle ``tagger serve`` daemon: every process of it, before and after work.

Starts the daemon (a real ``python -m tagger serve``) on an empty temporary folder with the
shipped model and the default decode workers, and reads /proc:

1. idle after start-up (the model is checked; its session and the decode processes start on
   the first file);
2. while tagging ``--files`` real 30-second GTZAN clips copied in at once (sampled peak);
3. idle again, ``--idle`` seconds after they are all tagged (before the idle release);
4. idle for good: after ``[daemon] idle_release`` (``--release``, default the daemon's
   60 s) the decode processes stop and the model's working memory is released.

For each: RSS and PSS of the daemon, its fork server, decode workers and helpers, and the
sums (RSS counts shared pages in every process; PSS shares them out).

    python benchmarks/daemon_memory.py [--files 40] [--idle 5] [--release 60] [--model BUNDLE]

Prints figures; nothing is asserted. Needs ../shared (the GTZAN clips).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _library import clips  # noqa: E402
from _procs import Sampler, processes, report  # noqa: E402


def tagged(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=30) as con:
            return con.execute("SELECT count(*) FROM tracks WHERE status IN ('tagged', 'classified', 'kept', 'failed')").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=40, help="clips to tag between the two idle readings")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds to wait before an idle reading")
    ap.add_argument("--model", default="", help="model bundle (default: the shipped model)")
    ap.add_argument("--release", type=float, default=60.0, help="[daemon] idle_release seconds (0: never release)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tagger-mem-"))
    music, db, cfg = tmp / "music", tmp / "tagger.db", tmp / "config.toml"
    music.mkdir()
    cfg.write_text(
        f'[library]\nfolders = ["{music}"]\n[database]\npath = "{db}"\n[model]\npath = "{args.model}"\n'
        "[tags]\nmin_confidence = 0.0\n[daemon]\nsettle_seconds = 1.0\n"
        f"idle_release = {args.release}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM", "INVOCATION_ID", "TAGGER_CONFIG")}
    log_path = tmp / "daemon.log"
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "tagger", "--config", str(cfg), "serve"], stdout=log, stderr=log, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "ready: watching" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the daemon did not start:\n" + log_path.read_text(errors="replace")[-2000:])
            time.sleep(0.2)
        time.sleep(min(args.idle, args.release - 1) if args.release > 1 else args.idle)
        print(f"{os.cpu_count()} CPUs; idle daemon after start-up:")
        print(report(processes(proc.pid)), flush=True)
        released = "stopped the decode processes"
        releases = log_path.read_text(errors="replace").count(released)
        if args.files:
            src = clips()[: args.files]
            sampler = Sampler(proc.pid)
            sampler.start()
            t0 = time.monotonic()
            for i, c in enumerate(src):
                shutil.copyfile(c, music / f"{i:04d}-{c.name}")
            while tagged(db) < len(src):
                if proc.poll() is not None or time.monotonic() > deadline + 600:
                    raise SystemExit("the daemon stopped tagging:\n" + log_path.read_text(errors="replace")[-2000:])
                time.sleep(0.2)
            took = time.monotonic() - t0
            sampler.stop()
            print(f"while tagging {len(src)} clips ({took:.1f} s): peak RSS sum {sampler.peak_rss_sum:.0f} MB, "
                  f"peak PSS sum {sampler.peak_pss_sum:.0f} MB, largest process {sampler.peak_single_rss:.0f} MB")
            time.sleep(args.idle)
            print(f"idle again, {args.idle:g} s after the last tag:")
            print(report(processes(proc.pid)), flush=True)
        if args.release > 0:
            while log_path.read_text(errors="replace").count(released) <= (releases if args.files else 0):
                if proc.poll() is not None or time.monotonic() > deadline + 900 + args.release:
                    raise SystemExit("the daemon did not release its memory:\n" + log_path.read_text(errors="replace")[-2000:])
                time.sleep(0.5)
            time.sleep(2.0)
            print(f"idle for good, after the idle release ({args.release:g} s):")
            print(report(processes(proc.pid)), flush=True)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
