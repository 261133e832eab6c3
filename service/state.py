"""Where the daemon keeps its lock and state files: next to the database.

``tagger.db.daemon.lock`` is held (``flock``) while ``tagger serve`` runs, which is how
``tagger status`` tells whether it runs; ``tagger.db.daemon.json`` says which folders it
watches and how.
"""

from __future__ import annotations

from pathlib import Path


def lock_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".daemon.lock")


def state_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".daemon.json")
