"""Alembic environment for the tagger database.

Two ways in:

* programmatic (``tagger.store.open_db`` / ``tagger db upgrade``): the caller puts an open
  SQLAlchemy connection, already configured with tagger's pragmas, in
  ``config.attributes["connection"]``;
* developers' CLI: ``alembic -c alembic.ini -x db=/path/to/tagger.db upgrade head``
  (without ``-x db=`` the ``sqlalchemy.url`` of alembic.ini is used).
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from tagger.store.db import make_engine
from tagger.store.models import Base

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)  # CLI use only


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite ALTER TABLE is limited: future migrations rebuild tables
        compare_type=True,
        transactional_ddl=True,  # true with tagger's engine (see tagger.store.db)
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    """Run all pending migrations in ONE transaction.

    tagger's engine makes pysqlite leave transactions to SQLAlchemy, so SQLite's DDL is
    transactional: a failed upgrade leaves the old schema intact, and two processes upgrading
    at once serialize on the write lock (the connection begins IMMEDIATE).
    """
    if connection.in_transaction():  # the caller's transaction; the caller commits
        _configure_and_run(connection)
    else:
        with connection.begin():
            _configure_and_run(connection)


def _db_path() -> str:
    db = context.get_x_argument(as_dictionary=True).get("db")
    if db:
        return db
    url = config.get_main_option("sqlalchemy.url") or ""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise SystemExit(f"tagger migrations need a sqlite:/// URL or -x db=PATH, got {url!r}")
    return url[len(prefix) :]


def run_migrations_offline() -> None:
    """``alembic upgrade head --sql``: print the SQL instead of running it."""
    context.configure(
        url=f"sqlite:///{_db_path()}",
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_db_path())
    try:
        with engine.connect().execution_options(tagger_begin="IMMEDIATE") as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
