"""Celery workers: the app factory (``celery_app``), tasks, and device selection.

Start one with ``palimpsest worker`` or ``celery -A workers.main worker``.
"""
from workers.celery_app import celery_init_app, make_celery

__all__ = ["celery_init_app", "make_celery"]
