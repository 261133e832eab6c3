"""Engine / session setup and programmatic Alembic migrations.

Every connection gets, from a ``connect`` event listener: WAL journal (readers never block the
writer), ``synchronous=NORMAL`` (safe with WAL), a busy timeout (a writer waits for another
writer instead of failing at once) and ``foreign_keys=ON`` (off by default in SQLite).

pysqlite's own transaction handling is switched off (``isolation_level=None``) and SQLAlchemy's
``begin`` event emits ``BEGIN`` itself, as the SQLAlchemy docs recommend: that makes DDL
transactional and lets write sessions use ``BEGIN IMMEDIATE``, which takes the write lock up front.
A deferred transaction that reads and then writes fails *immediately* with "database is locked"
when another connection committed in between (the busy timeout does not apply to that case);
an immediate one just waits its turn.
"""

from __future__ import annotations

import importlib.util
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, ExceptionContext
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

DEFAULT_BUSY_TIMEOUT = 30.0
_BEGIN_OPTION = "tagger_begin"  # execution option: "IMMEDIATE" / "DEFERRED"
_MIGRATIONS_PACKAGE = "tagger._migrations"

if sqlite3.sqlite_version_info < (3, 35, 0):  # pragma: no cover - depends on the platform
    raise ImportError(
        f"tagger needs SQLite >= 3.35 (for RETURNING); this Python has {sqlite3.sqlite_version}"
    )


class DatabaseLocked(Exception):
    """Another connection held the write lock for longer than the busy timeout."""


class SchemaTooNew(Exception):
    """The database was migrated by a newer tagger than this one."""


def _is_locked_error(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return "database is locked" in msg or "database table is locked" in msg


def _locked(path: str | Path, timeout: float) -> DatabaseLocked:
    return DatabaseLocked(
        f"database {path} is locked: another process held the write lock for more than "
        f"{timeout:g} s (busy timeout)"
    )


def make_engine(path: str | Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> Engine:
    """Engine for one SQLite file with the pragmas above; ``path`` is used as given."""
    path = Path(path)
    engine = create_engine(
        f"sqlite:///{path}",
        connect_args={"timeout": busy_timeout, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, record: ConnectionPoolEntry) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see module doc)
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            cur.execute("PRAGMA foreign_keys = ON")
            mode = cur.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode is not None and str(mode[0]).lower() != "wal":  # pragma: no cover
                raise RuntimeError(f"could not switch {path} to WAL (journal_mode={mode[0]})")
            cur.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.OperationalError as exc:
            if _is_locked_error(exc):
                raise _locked(path, busy_timeout) from exc
            raise
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    @event.listens_for(engine, "handle_error")
    def _on_error(ctx: ExceptionContext) -> DatabaseLocked | None:
        if isinstance(ctx.original_exception, sqlite3.OperationalError) and _is_locked_error(
            ctx.original_exception
        ):
            return _locked(path, busy_timeout)
        return None

    return engine


@dataclass
class Database:
    """An open tagger database: the engine plus a session factory.

    ``session()`` is a unit of work: commit on success, rollback on error. Write sessions
    (the default) start with ``BEGIN IMMEDIATE``; pass ``write=False`` for long reads so they
    don't hold the write lock.
    """

    path: Path
    engine: Engine
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT
    _write_factory: sessionmaker[Session] = field(init=False, repr=False)
    _read_factory: sessionmaker[Session] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._write_factory = sessionmaker(
            bind=self.engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"}),
            expire_on_commit=False,
        )
        self._read_factory = sessionmaker(bind=self.engine, expire_on_commit=False)

    @contextmanager
    def session(self, *, write: bool = True) -> Iterator[Session]:
        factory = self._write_factory if write else self._read_factory
        with factory() as session:
            try:
                yield session
                session.commit()
            except OperationalError as exc:  # handle_error covers most paths; belt and braces
                session.rollback()
                if _is_locked_error(exc):
                    raise _locked(self.path, self.busy_timeout) from exc
                raise
            except BaseException:
                session.rollback()
                raise

    def maintenance(self) -> tuple[int, int, int]:
        """Periodic upkeep for the daemon: fold the WAL back into the main file (it only
        shrinks when a checkpoint finds no readers) and refresh SQLite's planner statistics.
        Returns ``PRAGMA wal_checkpoint``'s (busy, wal pages, checkpointed pages)."""
        raw = self.engine.raw_connection()  # driver-level autocommit: no BEGIN around these
        try:
            driver = raw.driver_connection
            assert driver is not None
            busy, log, done = driver.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            driver.execute("PRAGMA optimize")
            return int(busy), int(log), int(done)
        finally:
            raw.close()

    def dispose(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dispose()


def open_db(
    path: str | Path,
    *,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    upgrade: bool = True,
) -> Database:
    """Open (creating if needed) the database at ``path`` and migrate it to head.

    Every command goes through here, so a new tagger version upgrades the schema the first
    time any command touches an old database.
    """
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(path, busy_timeout=busy_timeout)
    db = Database(path=path, engine=engine, busy_timeout=busy_timeout)
    if upgrade:
        try:
            _upgrade_engine(engine, "head")
        except BaseException:
            engine.dispose()
            raise
    return db


# --------------------------------------------------------------------------- migrations


def migrations_dir() -> Path:
    """The Alembic script directory (env.py, versions/).

    Installed (``pip install .``), ``migrations/`` ships as the package ``tagger._migrations``
    (see ``[tool.setuptools]`` in pyproject.toml); in a plain source checkout it is the
    ``migrations/`` folder next to the ``tagger`` package.
    """
    try:
        spec = importlib.util.find_spec(_MIGRATIONS_PACKAGE)
    except ImportError:  # pragma: no cover
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / "env.py").is_file():
                return Path(loc)
    here = Path(__file__).resolve().parents[2] / "migrations"
    if (here / "env.py").is_file():
        return here
    raise FileNotFoundError(  # pragma: no cover
        "tagger's Alembic migrations were not found (neither the tagger._migrations package "
        f"nor {here}); reinstall tagger"
    )


def alembic_config(
    path: str | Path | None = None, *, connection: Connection | None = None
) -> Config:
    """An Alembic ``Config`` built in code (no alembic.ini needed at runtime)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    if path is not None:
        url = f"sqlite:///{Path(path).expanduser().absolute()}"
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _script_directory() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest migration this tagger version ships."""
    head = _script_directory().get_current_head()
    assert head is not None
    return head


def _current_revision(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


#: The newest migration's revision, as ``head_revision()`` reads it from ``migrations/``
#: (``tests/test_store.py`` holds the two equal). Lets ``open_db`` see that a database
#: is current without importing Alembic, which took 0.2 s of every one-file scan.
SCHEMA_HEAD = "0003"


def _stamped_revisions(conn: Connection) -> set[str]:
    """The revisions in ``alembic_version``, read with plain SQL (empty for a new file)."""
    known = conn.execute(
        text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'")
    ).first()
    if known is None:
        return set()
    return {row[0] for row in conn.execute(text("SELECT version_num FROM alembic_version"))}


def _upgrade_engine(engine: Engine, rev: str) -> None:
    if rev == "head":
        with engine.connect() as conn:
            if _stamped_revisions(conn) == {SCHEMA_HEAD}:
                return  # current: neither Alembic nor env.py needed
    from alembic import command

    with engine.connect() as conn:
        cur = _current_revision(conn)
    script = _script_directory()
    if cur == script.get_current_head() and rev == "head":
        return  # fast path: no env.py run when already current
    if cur is not None and cur not in {s.revision for s in script.walk_revisions()}:
        raise SchemaTooNew(
            f"database {engine.url.database} has schema revision {cur}, which this tagger "
            f"does not know (its newest is {script.get_current_head()}): upgrade tagger"
        )
    # IMMEDIATE: two processes upgrading at once serialize; the second then sees head.
    with engine.connect().execution_options(**{_BEGIN_OPTION: "IMMEDIATE"}) as conn, conn.begin():
        command.upgrade(alembic_config(connection=conn), rev)


def upgrade(
    path: str | Path, rev: str = "head", *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
) -> str | None:
    """``tagger db upgrade``: migrate to ``rev``; returns the revision now current."""
    engine = make_engine(Path(path).expanduser().absolute(), busy_timeout=busy_timeout)
    try:
        _upgrade_engine(engine, rev)
        with engine.connect() as conn:
            return _current_revision(conn)
    finally:
        engine.dispose()


def downgrade(
    path: str | Path, rev: str, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
) -> str | None:
    """Migrate down to ``rev`` (``"base"`` drops every table); returns the revision now current."""
    from alembic import command

    engine = make_engine(Path(path).expanduser().absolute(), busy_timeout=busy_timeout)
    try:
        with (
            engine.connect().execution_options(**{_BEGIN_OPTION: "IMMEDIATE"}) as conn,
            conn.begin(),
        ):
            command.downgrade(alembic_config(connection=conn), rev)
        with engine.connect() as conn:
            return _current_revision(conn)
    finally:
        engine.dispose()


def current(path: str | Path) -> tuple[str | None, str]:
    """``tagger db current``: (revision of the database or None if unversioned, head revision)."""
    path = Path(path).expanduser().absolute()
    if not path.exists():  # don't create an empty database just to report on it
        return None, head_revision()
    engine = make_engine(path)
    try:
        with engine.connect() as conn:
            return _current_revision(conn), head_revision()
    finally:
        engine.dispose()
