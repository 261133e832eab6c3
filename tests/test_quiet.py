"""Quiet by default (issue "Trust" §5): stderr holds tagger's own lines only.

Every command that loaded the model printed TensorFlow's absl start-up lines; the
daemon's log got a watchdog ``RuntimeWarning`` per folder when a tree was copied in,
and "leaked semaphore" warnings from the resource tracker of a killed predecessor.
Real commands, real audio, no log setting in the environment.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("TAGGER_CONFIG", "TF_CPP_MIN_LOG_LEVEL", "PYTHONWARNINGS")}
ENV["CUDA_VISIBLE_DEVICES"] = ""

#: What ``tagger scan`` itself writes to a stderr that is not a terminal: progress lines.
PROGRESS = re.compile(r"\d+/\d+ files, [\d.]+ tracks/s, eta \d+s")
#: The daemon's own log lines (service/logs.py, outside journald).
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) tagger[\w.]*: ")


def test_scan_prints_only_its_own_lines(shared_audio: Path, tmp_path: Path) -> None:
    """The shipped model on real clips: stderr is tagger's progress, stdout its summary."""
    lib = tmp_path / "lib"
    lib.mkdir()
    for genre in ("jazz", "metal", "classical"):
        shutil.copyfile(shared_audio / genre / f"{genre}.00002.flac", lib / f"{genre}.flac")
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[model]\nworkers = 1\nmax_windows = 1\n[database]\npath = "{tmp_path / "t.db"}"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "tagger.cli", "--config", str(cfg), "scan", str(lib)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    others = [line for line in proc.stderr.splitlines() if not PROGRESS.fullmatch(line)]
    assert others == [], proc.stderr
    assert re.fullmatch(r"(\d+ [\w-]+(, )?)+ in [\d.]+s \([\d.]+ tracks/s\)\n", proc.stdout), proc.stdout


@pytest.mark.slow
def test_daemon_log_holds_only_its_own_lines(tiny_bundle: Path, tmp_path: Path) -> None:
    """A folder tree copied in, then kill -9 and a restart: no third-party line in either log."""
    from test_daemon import Env, scalar, wait_until

    tpl = helpers.write_synth(tmp_path / "tpl.flac", 6.0)
    tree = tmp_path / "tree"
    for a in range(8):
        for b in range(8):
            (tree / f"A{a}" / f"B{b}").mkdir(parents=True)
        shutil.copyfile(tpl, tree / f"A{a}" / "B0" / "x.flac")
    env = Env(tmp_path, tiny_bundle)
    try:
        d = env.start()
        shutil.copytree(tree, env.music / "tree")
        wait_until(lambda: scalar(env.db, "SELECT count(*) FROM tag_writes") == 8, 90, "the tree tagged", proc=d)
        d.signal(signal.SIGKILL)
        d.popen.wait(10)
        time.sleep(3)  # the resource tracker of the killed daemon cleans up (and used to say so)
        d2 = env.start()
        assert d2.stop() == 0
        for log in (d.log, d2.log):
            text = log.read_text()
            others = [line for line in text.splitlines() if not LOG_LINE.match(line)]
            assert others == [], text
            assert "ready: watching" in text
    finally:
        env.cleanup()
