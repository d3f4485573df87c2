"""Alembic migrations (env.py, versions/); run them through storage.migrate."""
