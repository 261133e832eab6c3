"""Exit statuses shared by every command, and the one way a command stops with one.

``tagger.cli`` and the modules that run a command (``tagger.scan``) use these, so a
module below the CLI never needs to import it.

``0`` done; ``1`` done, but some files failed (each listed with its reason and recorded);
``2`` usage or configuration error; ``3`` database locked or unusable; ``130`` interrupted.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, NoReturn

import click

if TYPE_CHECKING:
    from .config import Config
    from .store.db import Database

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_DB, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Say why on stderr, in one line, and exit with ``code``."""
    click.echo(f"tagger: {message}", err=True)
    sys.exit(code)


def open_database(cfg: Config) -> Database:
    """The configured database, migrated; a locked, corrupt or foreign file is a one-line
    error and exit status 3, never a traceback."""
    from .store.db import DatabaseLocked, open_db

    try:
        return open_db(cfg.database.resolved(), busy_timeout=cfg.database.busy_timeout)
    except DatabaseLocked as exc:
        fail(str(exc), EXIT_DB)
    except Exception as exc:
        fail(f"database {cfg.database.resolved()}: {str(exc).splitlines()[0]}", EXIT_DB)
