"""``tagger scan --engine ray`` on a real two-node Ray cluster on 127.0.0.1.

One cluster for the module (``ray.cluster_utils.Cluster``: a head and a worker node, two
CPUs each, every address on loopback), stopped at the end. Real audio (30-second shared
GTZAN clips as MP3), the shipped model, the real command in a subprocess; results are read
back with ``sqlite3`` and mutagen. A local scan of an identical copy is the reference.
Skips without the ``ray`` extra.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import helpers
import pytest
from mutagen.id3 import ID3
from mutagen.mp3 import MP3

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install '.[ray]')")
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "NO_COLOR": "1"}
ENV.pop("TAGGER_CONFIG", None)
ENV.pop("RAY_ADDRESS", None)
#: Ray on Linux swaps 127.0.0.1 for the machine's network address unless told not to.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
GENRES = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "reggae")


@pytest.fixture(scope="module")
def cluster():
    """A head and one worker node on 127.0.0.1; stopped (every process) at the end."""
    saved = {k: os.environ.get(k) for k in LOOPBACK}
    os.environ.update(LOOPBACK)
    from ray.cluster_utils import Cluster

    args = {"num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False, "object_store_memory": 200 * 2**20}
    c = Cluster(initialize_head=True, head_node_args=args)
    try:
        c.worker = c.add_node(**args)
        yield c
    finally:
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def mp3s(shared_audio: Path, ffmpeg: str, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Sixteen 30-second MP3s (two clips of each of eight genres), untagged."""
    out = tmp_path_factory.mktemp("mp3s")
    files = []
    for g in GENRES:
        for clip in sorted((shared_audio / g).glob("*.flac"))[:2]:
            path = out / f"{clip.stem}.mp3"
            helpers.run_ffmpeg("-i", clip, "-map_metadata", "-1", "-c:a", "libmp3lame", "-b:a", "96k", path)
            files.append(path)
    return files


def _library(folder: Path, files: list[Path], broken: bool = True) -> Path:
    folder.mkdir(parents=True)
    for f in files:
        shutil.copyfile(f, folder / f.name)
    if broken:
        (folder / "broken.mp3").write_bytes(b"ID3" + os.urandom(5000))
    return folder


def _config(folder: Path, db: Path) -> Path:
    cfg = folder / "config.toml"
    cfg.write_text(f'[database]\npath = "{db}"\n\n[tags]\nmin_confidence = 0.0\n')
    return cfg


def _scan(cfg: Path, *args: str, expect: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tagger.cli", "--config", str(cfg), "scan", "--json", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, f"{proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def _rows(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _recorded(db: Path, root: Path) -> dict[str, tuple[str, str | None]]:
    """``{file name: (status, top genre)}`` from the database."""
    sql = "SELECT t.path, t.status, p.top_genre FROM tracks t LEFT JOIN predictions p ON p.track_id = t.id"
    return {str(Path(p).relative_to(root)): (s, g) for p, s, g in _rows(db, sql)}


def _genre_tag(path: Path) -> list[str]:
    tags = ID3(path)
    return [str(v) for f in tags.getall("TCON") for v in f.text]


def test_one_node_cluster(mp3s: list[Path], tmp_path: Path) -> None:
    """A cluster of one node of one CPU finishes: the model actor leaves room to decode beside
    it (half a CPU each), and ``[ray] model_actors = 3`` starts only the one that fits. (A node
    of two CPUs alone is what the lost-worker test below leaves.)

    Runs before the module's two-node cluster starts, so that the two never share the cores.
    """
    saved = {k: os.environ.get(k) for k in LOOPBACK}
    os.environ.update(LOOPBACK)
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False, "object_store_memory": 200 * 2**20})
    try:
        lib = _library(tmp_path / "lib", mp3s[:4], broken=False)
        cfg = _config(tmp_path, tmp_path / "t.db")
        cfg.write_text(cfg.read_text() + "\n[ray]\nmodel_actors = 3\n")
        s = _scan(cfg, "--engine", "ray", "--address", c.address, str(lib), expect=0)
    finally:
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert s["counts"]["tagged"] == 4
    assert {st for st, _ in _recorded(tmp_path / "t.db", lib).values()} == {"tagged"}


def test_same_as_a_local_scan(cluster, mp3s: list[Path], tmp_path: Path) -> None:
    """Same genres, same tags in the files, same summary; the broken file reported and recorded."""
    local, remote = _library(tmp_path / "local", mp3s), _library(tmp_path / "ray", mp3s)
    a = _scan(_config(tmp_path / "local", tmp_path / "local.db"), str(local), expect=1)
    b = _scan(_config(tmp_path / "ray", tmp_path / "ray.db"), "--engine", "ray", "--address", cluster.address, str(remote), expect=1)
    assert a["counts"] == b["counts"]
    assert b["counts"]["tagged"] == len(mp3s) and b["counts"]["failed"] == 1
    assert [Path(f["path"]).name for f in b["failures"]] == ["broken.mp3"]
    assert b["failures"][0]["reason"] == a["failures"][0]["reason"]
    ra, rb = _recorded(tmp_path / "local.db", local), _recorded(tmp_path / "ray.db", remote)
    assert ra == rb and len(rb) == len(mp3s) + 1
    assert rb["broken.mp3"][0] == "failed"
    assert len({g for _, g in rb.values() if g}) >= 3  # real genres, not one answer for everything
    for f in mp3s:
        assert _genre_tag(remote / f.name) == _genre_tag(local / f.name) != []
    # Everything is recorded: a second run finds nothing to do (the broken file is not retried
    # while unchanged), as after a local scan.
    again = _scan(_config(tmp_path / "ray", tmp_path / "ray.db"), "--engine", "ray", "--address", cluster.address, str(remote), expect=0)
    assert again["counts"]["unchanged"] == len(mp3s) + 1 and again["files"] == []


def test_without_ray_or_a_cluster(tmp_path: Path) -> None:
    """No Ray installed: one line naming the extra, exit 2. No cluster at the address: the same."""
    lib = _library(tmp_path / "lib", [], broken=True)
    cfg = _config(tmp_path, tmp_path / "t.db")
    code = "import sys; sys.modules['ray'] = None; from tagger.cli import main; main()"  # as if not installed
    proc = subprocess.run([sys.executable, "-c", code, "--config", str(cfg), "scan", "--engine", "ray", str(lib)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "tagger: --engine ray needs Ray: pip install 'tagger[ray]'"
    import socket

    with socket.socket() as s:  # a port nothing listens at
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tagger.cli", "--config", str(cfg), "scan", "--engine", "ray", "--address", f"127.0.0.1:{port}", str(lib)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"tagger: no Ray cluster at 127.0.0.1:{port}")
    assert time.monotonic() - t < 60
    assert _rows(tmp_path / "t.db", "SELECT count(*) FROM tracks") == [(0,)]  # nothing decoded, nothing recorded
    # A Ray Client address: refused in one line (a driver runs on a node of the cluster)
    proc = subprocess.run([sys.executable, "-m", "tagger.cli", "--config", str(cfg), "scan", "--engine", "ray", "--address", f"ray://127.0.0.1:{port}", str(lib)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"tagger: ray://127.0.0.1:{port}: Ray Client addresses are not supported"), proc.stderr


def test_a_node_that_misses_a_file(cluster) -> None:
    """A path the node does not have is a per-file error that names the node, not a hang."""
    import ray

    from tagger import ray_engine

    ray.init(address=cluster.address, log_to_driver=False)
    try:
        row = ray.get(ray.remote(ray_engine.decode_row).remote({"path": "/nonexistent/tagger-ray/x.mp3"}, 2), timeout=120)
    finally:
        ray.shutdown()
    assert row["n"] == 0 and row["error"].startswith("no such file on node ") and "same path" in row["error"]


def _kill_decode_tasks(stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL every Ray worker process while it runs a decode task (its title says so)."""
    while not stop.is_set():
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if not f.read().startswith(b"ray::Map(decode_row)"):
                        continue
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
            except OSError:
                pass
        stop.wait(0.02)


def test_a_decode_process_that_keeps_dying(cluster, mp3s: list[Path], tmp_path: Path) -> None:
    """Decode tasks whose worker process dies every time (a decoder's crash, the OOM killer):
    the scan does not stall (Ray Data would retry them forever); after its retries, each
    file is run again alone, then recorded failed with a one-line reason; exit status 1."""
    from tagger import ray_engine

    lib = _library(tmp_path / "lib", mp3s[:3], broken=False)
    db = tmp_path / "t.db"
    cfg = _config(tmp_path, db)
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_decode_tasks, args=(stop, killed), daemon=True)
    watcher.start()
    try:
        cmd = [sys.executable, "-m", "tagger.cli", "--config", str(cfg), "scan", "--json", "--engine", "ray", "--address", cluster.address, str(lib)]
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        stop.set()
        watcher.join()
    assert proc.returncode == 1, f"{proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # two files a task at first, each run 1 + DECODE_RETRIES times, then each file alone
    assert len(killed) >= 2 * 4 + 3 * 4
    summary = json.loads(proc.stdout)
    assert summary["counts"]["failed"] == 3, summary["counts"]
    rows = _rows(db, "SELECT status, last_error FROM tracks")
    assert len(rows) == 3
    assert {s for s, _ in rows} == {"failed"}
    assert {e for _, e in rows} == {ray_engine.TASK_FAILED}
    for f in mp3s[:3]:
        assert _genre_tag(lib / f.name) == []


def test_worker_node_lost_mid_scan(cluster, mp3s: list[Path], tmp_path: Path) -> None:
    """The worker node is killed mid-run: its work runs again on the head, every file is tagged once."""
    lib = _library(tmp_path / "lib", mp3s, broken=False)
    db = tmp_path / "t.db"
    cfg = _config(tmp_path, db)
    cmd = [sys.executable, "-m", "tagger.cli", "--config", str(cfg), "scan", "--json", "--engine", "ray", "--address", cluster.address, str(lib)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    holder = None
    try:
        # Once a first file is recorded, hold the database's write lock: the scan parks at
        # its next write while the cluster keeps working; the node dies meanwhile.
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no file was recorded in time"
            try:
                holder = holder or sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=30, isolation_level=None)
                done = holder.execute("SELECT count(*) FROM tracks WHERE status != 'pending'").fetchone()[0]
                if done:
                    holder.execute("BEGIN IMMEDIATE")
                    break
            except sqlite3.OperationalError:
                pass
            time.sleep(0.02)
        assert done < len(mp3s)
        cluster.remove_node(cluster.worker, allow_graceful=False)
        time.sleep(1)
        holder.execute("COMMIT")
        out, err = proc.communicate(timeout=400)
    finally:
        if holder is not None:
            holder.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert out.startswith("{"), (out[:3000], err[-3000:])
    summary = json.loads(out)
    assert summary["counts"]["tagged"] == len(mp3s), summary["counts"]
    assert {s for s, _ in _recorded(db, lib).values()} == {"tagged"}
    writes = _rows(db, "SELECT t.path, count(*) FROM tag_writes w JOIN tracks t ON t.id = w.track_id WHERE w.dry_run = 0 GROUP BY t.path")
    assert sorted(Path(p).name for p, _ in writes) == sorted(f.name for f in mp3s)
    assert {n for _, n in writes} == {1}  # once each
    for f in mp3s:
        assert _genre_tag(lib / f.name) != []
        assert MP3(lib / f.name).info.length > 25  # whole: a write cut off with its node never replaced a file
    # A write cut off with its node may leave its temporary copy (as a kill -9 does locally).
    assert {p.name.split(".tagger-tmp")[0].rsplit(".", 1)[0][1:] for p in lib.glob(".*.tagger-tmp")} <= {f.name for f in mp3s}
