import pytest

from api import create_app
from stack import embedded_stack


def embedded_config(tmp_path) -> dict:
    """The embedded defaults (SQLite, SQL broker, file store), all under ``tmp_path``: no server needed."""
    return embedded_stack(tmp_path).settings.as_flask_config()


@pytest.fixture
def config(tmp_path):
    return {**embedded_config(tmp_path), "TESTING": True}


@pytest.fixture
def app(config):
    return create_app(config)


@pytest.fixture
def client(app):
    return app.test_client()
