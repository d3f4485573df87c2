"""docker-compose.yml and the Dockerfile, checked by reading them (Docker does not run here)."""
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from palimpsest.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
PALIMPSEST_SERVICES = ("migrate", "api", "worker-gpu", "worker-cpu")
ONE_SHOT = ("migrate", "minio-bucket")
NEEDED = ("PALIMPSEST_DATA_DIR", "PALIMPSEST_DATABASE_URL", "PALIMPSEST_BROKER_URL", "PALIMPSEST_STORAGE_URL",
          "PALIMPSEST_S3_ENDPOINT_URL", "PALIMPSEST_DEVICE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def interpolate(value):
    """Compose's ``${NAME:-default}`` with an empty host environment: the default."""
    if isinstance(value, str):
        return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
    return value


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


def env(service) -> dict:
    return {k: interpolate(v) for k, v in (service.get("environment") or {}).items()}


def command(service) -> str:
    cmd = service.get("command", "")
    return " ".join(cmd) if isinstance(cmd, list) else cmd


def test_the_services_of_a_deployment(services):
    assert set(services) == {"migrate", "api", "worker-gpu", "worker-cpu", "redis", "postgres", "minio",
                             "minio-bucket", "flower"}


def test_every_long_running_service_has_a_health_check(services):
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service["restart"] == "no"
            continue
        check = service.get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
        assert service["restart"] == "unless-stopped"


def test_api_health_check_is_readiness(services):
    assert "/v1/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    assert command(services["api"]).startswith("palimpsest serve --host 0.0.0.0 --port 8000")
    assert "8000:8000" in services["api"]["ports"]


def test_gpu_worker_reserves_one_gpu_for_one_process(services):
    worker = services["worker-gpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "--queues gpu --concurrency 1" in command(worker)
    assert env(worker)["PALIMPSEST_DEVICE"] == "cuda"
    assert "--destination gpu@" in worker["healthcheck"]["test"][1]


def test_cpu_worker_takes_the_cpu_queue_without_a_gpu(services):
    worker = services["worker-cpu"]
    assert "--queues cpu" in command(worker)
    assert "deploy" not in worker
    assert env(worker)["PALIMPSEST_DEVICE"] == "cpu"
    assert "--destination cpu@" in worker["healthcheck"]["test"][1]


def test_exactly_one_service_runs_the_beat(services):
    """The reconciler (docs/reliability.md) is sent by the beat; one beat per deployment."""
    beats = [name for name, service in services.items() if "--beat" in command(service).split()
             or command(service).startswith("palimpsest beat")]
    assert beats == ["worker-cpu"]
    assert services["worker-cpu"].get("deploy", {}).get("replicas", 1) == 1


def test_redis_persists_append_only(services, compose):
    redis = services["redis"]
    assert "--appendonly yes" in command(redis)
    assert "redis-data:/data" in redis["volumes"]
    assert "redis-data" in compose["volumes"]


def test_postgres_and_minio_keep_data_in_volumes(services, compose):
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "minio-data:/data" in services["minio"]["volumes"]
    assert {"postgres-data", "minio-data"} <= set(compose["volumes"])


def test_every_palimpsest_service_gets_the_same_configuration(services):
    configs = {name: env(services[name]) for name in PALIMPSEST_SERVICES}
    for name, variables in configs.items():
        missing = [v for v in NEEDED if not variables.get(v)]
        assert not missing, f"{name} lacks {missing}"
        load_settings(variables)  # and they parse
    shared = [{k: v for k, v in c.items() if k != "PALIMPSEST_DEVICE"} for c in configs.values()]
    assert all(c == shared[0] for c in shared)


def test_configuration_points_at_the_services(services):
    variables = env(services["api"])
    postgres_env = env(services["postgres"])
    database = urlsplit(variables["PALIMPSEST_DATABASE_URL"])
    assert database.scheme == "postgresql+psycopg"
    assert (database.hostname, database.port) == ("postgres", 5432)
    assert (database.username, database.password, database.path) == (
        postgres_env["POSTGRES_USER"], postgres_env["POSTGRES_PASSWORD"], "/" + postgres_env["POSTGRES_DB"])

    broker = urlsplit(variables["PALIMPSEST_BROKER_URL"])
    assert (broker.scheme, broker.hostname) == ("redis", "redis")
    assert env(services["flower"])["CELERY_BROKER_URL"] == variables["PALIMPSEST_BROKER_URL"]

    assert urlsplit(variables["PALIMPSEST_S3_ENDPOINT_URL"]).hostname == "minio"
    bucket = urlsplit(variables["PALIMPSEST_STORAGE_URL"]).hostname
    assert f"local/{bucket}" in command(services["minio-bucket"])  # the bucket that gets created
    minio_env = env(services["minio"])
    assert (variables["AWS_ACCESS_KEY_ID"], variables["AWS_SECRET_ACCESS_KEY"]) == (
        minio_env["MINIO_ROOT_USER"], minio_env["MINIO_ROOT_PASSWORD"])
    assert env(services["minio-bucket"]) == minio_env

    settings = load_settings(variables)
    assert settings.broker_visibility_timeout > settings.task_time_limit  # no double delivery of long jobs


def test_depends_on_waits_for_the_right_condition(services):
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services
            expected = "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            assert spec == {"condition": expected}, f"{name} -> {dependency}"
    for name in ("api", "worker-gpu", "worker-cpu"):
        assert {"migrate", "postgres", "redis", "minio-bucket"} <= set(services[name]["depends_on"]), name
    assert set(services["migrate"]["depends_on"]) == {"postgres"}
    assert set(services["minio-bucket"]["depends_on"]) == {"minio"}


def test_palimpsest_services_share_one_image(services):
    images = {services[name]["image"] for name in PALIMPSEST_SERVICES}
    assert images == {"palimpsest:latest"}
    assert all(services[name]["build"] == "." for name in PALIMPSEST_SERVICES)
    assert all(services[name]["init"] is True for name in PALIMPSEST_SERVICES)


def test_dockerfile_installs_cpu_torch_by_default_and_drops_root():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert "ARG TORCH_VERSION=2.13.0" in dockerfile
    assert "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu" in dockerfile  # documented
    assert re.search(r"^USER palimpsest$", dockerfile, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "var", ".git"} <= set(ignored)
    assert "README.md" not in ignored  # pyproject's readme, needed by `pip install .`
