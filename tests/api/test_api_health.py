import pytest

from api import create_app
from stack import free_port


def test_factory_takes_test_config(app, config):
    assert app.testing
    assert app.config["PALIMPSEST_BROKER_URL"] == config["PALIMPSEST_BROKER_URL"]
    assert app.extensions["celery"].conf.broker_url == config["PALIMPSEST_BROKER_URL"]
    assert (app.extensions["palimpsest_db"].engine.url.database
            == config["PALIMPSEST_DATABASE_URL"].removeprefix("sqlite:///"))


def test_factory_reads_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PALIMPSEST_DATA_DIR", str(tmp_path / "from-env"))
    monkeypatch.delenv("PALIMPSEST_DATABASE_URL", raising=False)
    app = create_app()
    assert app.config["PALIMPSEST_DATABASE_URL"] == f"sqlite:///{tmp_path}/from-env/palimpsest.db"
    assert (tmp_path / "from-env").is_dir()  # data dir made on start


def test_healthz(client):
    response = client.get("/v1/healthz")
    assert response.status_code == 200
    assert response.json == {"status": "ok"}


def test_readyz_on_embedded_defaults(client):
    response = client.get("/v1/readyz")
    assert response.status_code == 200, response.json
    assert response.json == {
        "status": "ready",
        "failed": [],
        "checks": {"database": {"status": "ok"}, "broker": {"status": "ok"}, "store": {"status": "ok"}},
    }


def closed_port_broker(tmp_path):
    return {"PALIMPSEST_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}


def unopenable_database(tmp_path):
    (tmp_path / "a-directory.db").mkdir()  # SQLite cannot open a directory as its file
    return {"PALIMPSEST_DATABASE_URL": f"sqlite:///{tmp_path}/a-directory.db"}


def store_under_a_file(tmp_path):
    (tmp_path / "plain-file").write_text("not a directory")
    return {"PALIMPSEST_STORAGE_URL": f"file://{tmp_path}/plain-file/objects"}


def closed_port_s3(tmp_path):
    return {"PALIMPSEST_STORAGE_URL": "s3://bucket/prefix", "PALIMPSEST_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}


@pytest.mark.parametrize("break_it, failed", [
    (closed_port_broker, "broker"),
    (unopenable_database, "database"),
    (store_under_a_file, "store"),
    (closed_port_s3, "store"),
])
def test_readyz_503_names_the_failed_check(config, tmp_path, monkeypatch, break_it, failed):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    app = create_app({**config, **break_it(tmp_path)})
    response = app.test_client().get("/v1/readyz")
    assert response.status_code == 503
    assert response.json["status"] == "unavailable"
    assert response.json["failed"] == [failed]
    assert response.json["checks"][failed]["status"] == "failed"
    assert response.json["checks"][failed]["error"]  # says why
    others = set(response.json["checks"]) - {failed}
    assert all(response.json["checks"][name] == {"status": "ok"} for name in others)
