"""Alembic revision scripts (hand-written; keep them in step with tagger/store/models.py)."""
