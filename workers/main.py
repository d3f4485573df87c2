"""Entry point for the ``celery`` command: ``celery -A workers.main worker -Q cpu``.

The one module that builds an app at import time, because ``celery -A`` needs an
attribute to find. ``palimpsest worker`` builds the same app with the same factory.
"""
from palimpsest.config import load_settings
from workers.celery_app import make_celery

app = make_celery(load_settings())
