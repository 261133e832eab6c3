"""The systemd units: ``systemd-analyze verify`` passes, hardening and lifecycle are there.

``verify`` needs the ``ExecStart`` binary to exist, so it checks a copy of each unit whose
``ExecStart`` runs this environment's ``tagger``. systemd is installed from apt when it is
missing and we are root (set ``TAGGER_TEST_NO_APT=1`` to skip instead).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = {"tagger.service": "system", "tagger-user.service": "user"}


@pytest.fixture(scope="module")
def analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get") and not os.environ.get("TAGGER_TEST_NO_APT"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "systemd"], env=env, capture_output=True, timeout=900)
        exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    return exe


def tagger_exe() -> str:
    exe = Path(sys.executable).with_name("tagger")
    return str(exe) if exe.exists() else shutil.which("tagger") or "/bin/true"


def parse(path: Path) -> dict[str, list[str]]:
    """``{Key: [values...]}`` over all sections (comments and blank lines dropped)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def local_copy(unit: str, tmp_path: Path) -> Path:
    text = (ROOT / "systemd" / unit).read_text()
    lines = []
    for line in text.splitlines():
        if line.startswith("ExecStart="):
            args = line.split(None, 1)[0].split("=", 1)[1]
            rest = line[len("ExecStart=") + len(args) :]
            line = f"ExecStart={tagger_exe()}{rest}"
        lines.append(line)
    out = tmp_path / unit
    out.write_text("\n".join(lines) + "\n")
    return out


def run_analyze(analyze: str, unit: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """systemd-analyze (``--user`` for the user unit) with a private runtime directory."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(run), "SYSTEMD_LOG_COLOR": "0"}
    cmd = [analyze, *(["--user"] if UNITS[unit] == "user" else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("unit", list(UNITS))
def test_unit_verifies_cleanly(unit: str, analyze: str, tmp_path: Path):
    copy = local_copy(unit, tmp_path)
    res = run_analyze(analyze, unit, tmp_path, "verify", str(copy))
    # verify exits 0 even for unknown keys or bad values: those are warnings, so any
    # output mentioning the unit is a failure too.
    noise = [ln for ln in (res.stdout + res.stderr).splitlines() if unit in ln or "Unknown" in ln or "Failed" in ln]
    assert res.returncode == 0 and not noise, res.stdout + res.stderr


@pytest.mark.parametrize("unit", list(UNITS))
def test_unit_is_hardened_and_speaks_notify(unit: str):
    keys = parse(ROOT / "systemd" / unit)
    one = {k: v[-1] for k, v in keys.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert "serve" in one["ExecStart"] and one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(one["WatchdogSec"]) > 0 and one["Restart"] == "on-failure" and one["KillMode"] == "mixed"
    assert int(one["TimeoutStopSec"]) >= 30  # the daemon's own bound is 25 s
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "read-only",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_UNIX",
        "SystemCallFilter": "@system-service",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
    }.items():
        assert value in keys.get(key, []), f"{unit}: {key}={value} missing"
    assert keys["ReadWritePaths"], "the music folders must be writable"
    if UNITS[unit] == "system":
        assert one["User"] == "tagger" and one["StateDirectory"] == "tagger"
        assert one["WantedBy"] == "multi-user.target"
    else:
        assert "User" not in one and one["WantedBy"] == "default.target"
        assert any(".local/share/tagger" in p for p in keys["ReadWritePaths"])


@pytest.mark.parametrize("unit", list(UNITS))
def test_unit_exposure_is_low(unit: str, analyze: str, tmp_path: Path):
    copy = local_copy(unit, tmp_path)
    res = run_analyze(analyze, unit, tmp_path, "security", "--offline=true", "--no-pager", str(copy))
    if "--offline" in res.stderr and "unrecognized" in res.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    line = [ln for ln in res.stdout.splitlines() if "Overall exposure level" in ln]
    assert line, res.stdout + res.stderr
    score = float(line[0].split(":")[1].split()[0])
    assert score <= 2.5, line[0]
