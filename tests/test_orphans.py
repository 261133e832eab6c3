"""No orphans (issue "Trust" §4): helpers exit within seconds when their parent dies.

A ``kill -9`` (or the OOM killer) of ``tagger scan`` used to leave the fork server,
the decode workers and multiprocessing's resource tracker running with parent 1,
about 200 MB each time. Processes are read from ``/proc`` (Linux only).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
ENV.pop("TAGGER_CONFIG", None)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the name may hold spaces and parentheses
    return int(fields[1]), fields[0]


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(st[0], []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def running(pids: set[int]) -> set[int]:
    """Those still running (a zombie has exited; whoever adopted it reaps it)."""
    return {p for p in pids if (st := _stat(p)) is not None and st[1] != "Z"}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := running(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_die_with_parent() -> None:
    """The call the training jobs make: a grandchild goes when its parent is killed."""
    armed = "from tagger.lifeline import die_with_parent; import time; print(die_with_parent(), flush=True); time.sleep(120)"
    middle = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {armed!r}]); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env=ENV, start_new_session=True,
    )  # fmt: skip
    try:
        assert middle.stdout is not None and middle.stdout.readline().strip() == "True"
        kids = descendants(middle.pid)
        assert len(kids) == 1
        middle.kill()
        middle.wait()
        assert not wait_gone(kids, 5), "the grandchild outlived its parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(middle.pid, signal.SIGKILL)


def test_kill_9_of_a_scan_leaves_no_process(tiny_bundle: Path, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    one = helpers.write_synth(tmp_path / "one.flac", 20.0)
    for i in range(60):  # far more than get decoded before the kill
        shutil.copyfile(one, lib / f"t{i:02}.flac")
    db = tmp_path / "t.db"
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[model]\npath = "{tiny_bundle}"\nworkers = 2\nbatch_size = 1\n'
        f'[database]\npath = "{db}"\n[tags]\nmin_confidence = 0.0\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tagger.cli", "--config", str(cfg), "scan", str(lib)],
        cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while True:  # mid-scan: a track recorded, the fork server and both workers up
            assert proc.poll() is None, "the scan ended before it was killed"
            assert time.monotonic() < deadline, f"no scan in progress: {[cmdline(p) for p in descendants(proc.pid)]}"
            seen |= descendants(proc.pid)
            servers = [p for p in seen if "multiprocessing.forkserver" in cmdline(p)]
            workers = [p for p in seen if _stat(p) and _stat(p)[0] in servers]
            try:
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
                done = con.execute("SELECT count(*) FROM tracks WHERE status = 'tagged'").fetchone()[0]
                con.close()
            except sqlite3.OperationalError:
                done = 0
            if done and len(workers) >= 2:
                break
            time.sleep(0.1)
        assert any("resource_tracker" in cmdline(p) for p in seen), [cmdline(p) for p in seen]
        proc.kill()
        proc.wait()
        left = wait_gone(seen, 5)
        assert not left, f"outlived the scan: {[cmdline(p) for p in left]}"
    finally:  # a failed run must not leave them behind either: they keep its process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
