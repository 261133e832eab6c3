"""Alembic migrations for the tagger database.

Installed as the package ``tagger._migrations`` (see pyproject.toml) so that
``tagger.store.open_db`` can find them after a non-editable ``pip install``.
"""
