"""Configuration: built-in defaults, overridden by one TOML file.

The file is ``--config PATH``, else ``$TAGGER_CONFIG``, else
``$XDG_CONFIG_HOME/tagger/config.toml`` when it exists. ``config.toml`` at the
repository root documents every key with its default. Unknown keys are errors:
a typo that silently does nothing is worse than a refusal.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from .vocabulary import DISPLAY


class ConfigError(Exception):
    """The configuration file is missing, malformed or has unknown keys or bad values."""


def _xdg(var: str, default: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / default


@dataclass
class LibraryConfig:
    folders: list[str] = field(default_factory=lambda: ["~/Music"])
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    follow_symlinks: bool = True


@dataclass
class DatabaseConfig:
    path: str = ""
    busy_timeout: float = 30.0

    def resolved(self) -> Path:
        if self.path:
            return Path(os.path.expandvars(self.path)).expanduser()
        return _xdg("XDG_DATA_HOME", ".local/share") / "tagger" / "tagger.db"


@dataclass
class ModelConfig:
    path: str = ""
    batch_size: int = 64
    max_windows: int = 1
    workers: int = 0


@dataclass
class TagsConfig:
    policy: str = "keep"
    top_k: int = 1
    min_confidence: float = 0.60
    separator: str = "; "
    #: How labels are written (labels not named here: tagger.vocabulary.DISPLAY).
    names: dict[str, str] = field(default_factory=lambda: dict(DISPLAY))


@dataclass
class LearnConfig:
    """``tagger learn``: the owner's spellings folded into one label, and the smallest label kept."""

    min_tracks: int = 15
    aliases: dict[str, str] = field(default_factory=dict)


@dataclass
class DaemonConfig:
    settle_seconds: float = 5.0
    batch_size: int = 64
    max_wait: float = 2.0
    observer: str = "auto"  # auto | inotify | polling
    polling_interval: float = 10.0
    polling_folders: list[str] = field(default_factory=list)
    rescan_cron: str = "30 3 * * *"
    max_attempts: int = 5
    backoff_base: float = 30.0
    stale_claim_seconds: float = 120.0
    upkeep_minutes: float = 60.0
    #: After this many seconds with nothing to do, stop the decode processes and drop the
    #: model's working memory (both return on the next file); 0 keeps them loaded.
    idle_release: float = 60.0
    ignore_patterns: list[str] = field(
        default_factory=lambda: ["*.part", "*.crdownload", "*.tmp", "*~", ".*", "*.download", "*.partial"]
    )


@dataclass
class RayConfig:
    address: str = "auto"
    model_actors: int = 0


@dataclass
class Config:
    library: LibraryConfig = field(default_factory=LibraryConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tags: TagsConfig = field(default_factory=TagsConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    source: Path | None = None

    def folders(self) -> list[Path]:
        return [Path(os.path.expandvars(f)).expanduser() for f in self.library.folders]


def _apply(obj: Any, data: dict[str, Any], where: str) -> None:
    known = {f.name: f for f in fields(obj) if f.name != "source"}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"unknown setting {where}{key}")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"[{where}{key}] must be a table")
            _apply(current, value, f"{where}{key}.")
            continue
        if isinstance(current, bool) != isinstance(value, bool) or (
            isinstance(current, (int, float)) and not isinstance(value, (int, float))
        ):
            raise ConfigError(f"{where}{key} must be {type(current).__name__}, got {value!r}")
        if isinstance(current, list) and not isinstance(value, list):
            raise ConfigError(f"{where}{key} must be a list, got {value!r}")
        if isinstance(current, str) and not isinstance(value, str):
            raise ConfigError(f"{where}{key} must be a string, got {value!r}")
        if isinstance(current, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} must be a table")
            value = {**current, **value}
        if isinstance(current, float) and isinstance(value, int):
            value = float(value)
        setattr(obj, key, value)


def _validate(cfg: Config) -> None:
    if cfg.tags.policy not in {"keep", "merge", "replace"}:
        raise ConfigError(f"tags.policy must be keep, merge or replace, got {cfg.tags.policy!r}")
    if cfg.daemon.observer not in {"auto", "inotify", "polling"}:
        raise ConfigError(f"daemon.observer must be auto, inotify or polling, got {cfg.daemon.observer!r}")
    if cfg.model.batch_size < 1 or cfg.model.max_windows < 1 or cfg.tags.top_k < 1:
        raise ConfigError("model.batch_size, model.max_windows and tags.top_k must be at least 1")
    if not 0.0 <= cfg.tags.min_confidence <= 1.0:
        raise ConfigError("tags.min_confidence must be between 0 and 1")
    if cfg.learn.min_tracks < 1:
        raise ConfigError("learn.min_tracks must be at least 1")
    bad = [k for k, v in cfg.learn.aliases.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ConfigError(f"learn.aliases: {bad[0]!r} must name a genre (a non-empty string)")


def config_path(explicit: str | Path | None = None) -> Path | None:
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("TAGGER_CONFIG")
    if env:
        return Path(env).expanduser()
    user = _xdg("XDG_CONFIG_HOME", ".config") / "tagger" / "config.toml"
    return user if user.is_file() else None


def load_config(explicit: str | Path | None = None) -> Config:
    cfg = Config()
    path = config_path(explicit)
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        _apply(cfg, data, "")
        cfg.source = path
    _validate(cfg)
    return cfg
