"""Load (issue 7, item 9): 10,000 submissions to a real `palimpsest serve` (gunicorn, its
default two processes) on PostgreSQL + Redis + an S3 server, over loopback, with the
job workers paused (the only worker consumes the ``cpu`` queue, to inspect the model;
jobs wait in ``gpu``). Nothing is lost: every 202 has its Job row and exactly one broker
message. Then the queue drains: workers start and every job runs to ``succeeded``,
exactly once.

The jobs edit a tiny generator (16x16, a few kB) with small params (bench/load.py
DEFAULT_PARAMS), so that each run takes a fraction of a second. Running all 10,000 still takes
over 20 minutes on two cores (1289 s measured); the default suite drains a batch of
``DRAIN_DEFAULT`` jobs submitted the same way, and ``--run-slow`` drains all 10,000.

The goal (200 submissions/s, p99 under 100 ms) depends on what else the machine runs,
so the assertions here are floors that only a broken API misses (``MIN_*``); the
figures of each run are printed, and the last quiet run's are in docs/reliability.md.
"""
import base64
import json
import os
import subprocess
import time

import pytest
import redis
from sqlalchemy import func, select

from palimpsest.client import Client
from stack import free_port, services_stack, wait_until
from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Job, JobEvent

from bench.load import job_body, run_load
from job_fixtures import save_generator

pytestmark = pytest.mark.integration

COUNT = 10_000
# Eight clients, each sending its next job as soon as the last is answered (a closed loop):
# the throughput is what the API holds, and the latency includes waiting behind the other
# seven. (An open loop at a fixed rate, bench/load.py --rate, measures latency at that rate.)
CONCURRENCY = 8
DRAIN_DEFAULT = 200
MIN_THROUGHPUT = 50.0  # accepted/s: a quarter of the goal (99/s was seen at load average 6): a broken API, not a busy machine
MAX_P99_MS = 2000.0


@pytest.fixture
def service(tmp_path, empty_postgres_url, redis_url, s3_storage_url, s3_server):
    """The server (two gunicorn processes, as `palimpsest serve` defaults), a worker on
    the cpu queue only, a tenant's key and a ready tiny model."""
    stack = services_stack(tmp_path, empty_postgres_url, redis_url, s3_storage_url, s3_server)
    stack.variables["OMP_NUM_THREADS"] = "1"  # two worker processes on two cores
    stack.migrate()
    broker = redis.Redis.from_url(redis_url)
    clear_queues(broker)
    engine = make_engine(empty_postgres_url)
    try:
        stack.start_worker(queues="cpu")
        port = free_port()
        server = stack.start(stack.palimpsest("serve", "--host", "127.0.0.1", "--port", str(port)), "serve")
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: healthy(url, server), 60, what="serve")
        key = subprocess.run(stack.palimpsest("keys", "create", "--tenant", "load"), env=stack.env, check=True,
                             capture_output=True, text=True).stdout.strip()
        client = Client(url, key)
        model = client.upload_model(save_generator(tmp_path / "tiny.safetensors"))
        wait_until(lambda: client.request("GET", f"/v1/models/{model['id']}").json()["status"] == "ready", 120,
                   what="model inspection")
        yield stack, url, key, model["id"], broker, make_session_factory(engine)
    finally:
        stack.stop_all()
        engine.dispose()
        clear_queues(broker)
        broker.close()


def healthy(url, server) -> bool:
    import requests

    assert server.alive(), server.log()[-3000:]
    try:
        return requests.get(f"{url}/v1/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def queue_keys(broker, queue: str) -> list[bytes]:
    """kombu's Redis transport keeps a queue as one list per priority step: ``gpu``, ``gpu\\x06\\x161``..."""
    return [queue.encode()] + sorted(broker.keys(f"{queue}\x06\x16*"))


def clear_queues(broker) -> None:
    for queue in ("gpu", "cpu"):
        for key in queue_keys(broker, queue):
            broker.delete(key)
    broker.delete("unacked", "unacked_index")


def queued_job_ids(broker, queue="gpu") -> list[str]:
    """The job id of every ``run_job`` message waiting in ``queue``."""
    ids = []
    for key in queue_keys(broker, queue):
        for raw in broker.lrange(key, 0, -1):
            message = json.loads(raw)
            assert message["headers"]["task"] == "workers.jobs.run_job"
            args, _, _ = json.loads(base64.b64decode(message["body"]))
            ids.append(args[0])
    return ids


def load_figures(result) -> str:
    load1, load5, _ = os.getloadavg()
    return (f"{result.count} sent, {result.accepted} accepted in {result.seconds:.1f} s: "
            f"{result.throughput:.1f}/s, p50 {result.percentile(50):.1f} ms, p99 {result.percentile(99):.1f} ms, "
            f"max {max(result.latencies_ms):.1f} ms; statuses {dict(result.statuses)}; "
            f"load average {load1:.1f} (1 min) {load5:.1f} (5 min) on {os.cpu_count()} cores")


def submit_paused(service, figures, count: int, rate: float | None = None):
    """Submit ``count`` jobs with no worker on their queue; check none is lost; the result."""
    stack, url, key, model_id, broker, sessions = service
    result = run_load(url, key, job_body(model_id, "layer3"), count=count, concurrency=CONCURRENCY, rate=rate,
                      max_seconds=max(300.0, 3 * count / (rate or MIN_THROUGHPUT)))
    print(f"\nload: {load_figures(result)}")
    figures.update(sent=result.count, accepted=result.accepted, seconds=round(result.seconds, 1),
                   throughput_per_s=round(result.throughput, 1), p50_ms=round(result.percentile(50), 1),
                   p99_ms=round(result.percentile(99), 1), max_ms=round(max(result.latencies_ms), 1),
                   concurrency=CONCURRENCY, load_average_1min=round(os.getloadavg()[0], 1))
    assert result.count == count, "the generator stopped at its time bound"
    assert result.accepted == count, (dict(result.statuses), result.errors[:5])
    assert len(set(result.job_ids)) == count
    # every 202 has its row, queued, and exactly one message in the broker
    with session_scope(sessions) as session:
        rows = dict(session.execute(select(Job.id, Job.status)).all())
    assert set(rows) == set(result.job_ids) and set(rows.values()) == {"queued"}
    messages = queued_job_ids(broker)
    assert len(messages) == count and set(messages) == set(result.job_ids)
    figures.update(job_rows=len(rows), broker_messages=len(messages), lost=count - len(set(messages)))
    return result


def drain(service, figures, job_ids: list[str], workers: int = 2, timeout: float = 600.0) -> float:
    """Start ``workers`` worker processes on the gpu queue; wait until every job has run;
    check each ran exactly once; the seconds from the first worker's start to the last end."""
    stack, url, key, model_id, broker, sessions = service
    started = time.monotonic()
    for _ in range(workers):
        stack.start_worker(queues="gpu")
    ready = time.monotonic() - started

    def finished():
        with session_scope(sessions) as session:
            return session.scalar(select(func.count()).select_from(Job)
                                  .where(Job.status.in_(("succeeded", "failed", "cancelled")))) == len(job_ids)

    wait_until(finished, timeout, interval=1.0, what=f"{len(job_ids)} jobs drained")
    seconds = time.monotonic() - started
    with session_scope(sessions) as session:
        statuses = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        transitions = session.execute(
            select(JobEvent.job_id, func.count()).where(JobEvent.kind == "transition").group_by(JobEvent.job_id)).all()
        attempts = dict(session.execute(select(Job.attempts, func.count()).group_by(Job.attempts)).all())
    assert statuses == {"succeeded": len(job_ids)}, statuses
    assert {count for _, count in transitions} == {3}  # queued, running, succeeded: each once
    assert attempts == {1: len(job_ids)}, attempts  # no job ran twice
    assert queued_job_ids(broker) == [] and not broker.hlen("unacked")
    print(f"drain: {len(job_ids)} jobs by {workers} worker processes in {seconds:.1f} s "
          f"({len(job_ids) / seconds:.1f} jobs/s, including worker start)")
    figures.update(drained=len(job_ids), drain_workers=workers, workers_ready_s=round(ready, 1),
                   drain_seconds=round(seconds, 1),
                   drain_jobs_per_s=round(len(job_ids) / seconds, 2))
    return seconds


def test_ten_thousand_submissions_are_held_and_none_lost(service, figures):
    result = submit_paused(service, figures, COUNT)
    assert result.throughput >= MIN_THROUGHPUT, load_figures(result)
    assert result.percentile(99) <= MAX_P99_MS, load_figures(result)


def test_the_queue_drains(service, figures):
    """A batch submitted the same way with the workers paused, then drained."""
    result = submit_paused(service, figures, DRAIN_DEFAULT)
    drain(service, figures, result.job_ids)


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)
def test_ten_thousand_jobs_drain(service, figures):
    result = submit_paused(service, figures, COUNT)
    drain(service, figures, result.job_ids, timeout=2 * 3600)
