"""The Palimpsest HTTP API: ``create_app()`` builds it; nothing is built at import.

Never imports torch, not even indirectly: the API process stays small, and jobs
reach the engine only through the broker (tests check this in a subprocess).
"""
from pathlib import Path

from flask import Flask

from palimpsest.config import load_settings

MAX_REQUEST_BYTES = 16 * 1024 * 1024  # edit requests carry PNG masks as data URLs; uploads: PALIMPSEST_MAX_UPLOAD_BYTES


def create_app(test_config=None) -> Flask:
    """Configuration: ``Settings`` from the ``PALIMPSEST_*`` environment (as Flask keys
    ``PALIMPSEST_DATABASE_URL`` and so on), then ``test_config`` over it."""
    app = Flask(__name__)
    app.config.from_mapping(load_settings().as_flask_config())
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    if test_config is not None:
        app.config.from_mapping(test_config)
    Path(app.config["PALIMPSEST_DATA_DIR"]).mkdir(parents=True, exist_ok=True)

    from storage import db
    from storage.objects import open_store
    from workers.celery_app import celery_init_app

    db.init_app(app)
    app.extensions["palimpsest_store"] = open_store(
        app.config["PALIMPSEST_STORAGE_URL"], app.config["PALIMPSEST_S3_ENDPOINT_URL"]
    )
    celery_init_app(app)

    from api import auth, batches, errors, health, inputs, jobs, models, openapi, statistics

    app.extensions["palimpsest_ready_models"] = models.ready_models()
    errors.init_app(app)
    auth.init_app(app)  # every /v1 route needs a key unless auth.PUBLIC_ENDPOINTS lists it
    inputs.init_app(app)  # then input no view could use (NUL characters, deep JSON) is refused
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    # One small blueprint each, with OPENAPI_PATHS beside its views so /v1/openapi.json stays complete.
    app.register_blueprint(models.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(statistics.bp)
    app.register_blueprint(batches.bp)
    return app
