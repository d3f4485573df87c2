"""Shard scaling: one sharded statistic computed by 1 worker process, then by 2.

    python bench/shard_scaling.py [--samples 8192] [--shard 1024] [--layer layer4] [--repeat 2]

Production-shaped and real: a fresh PostgreSQL database, a Redis db of its own (the
tests' lock, so it never shares one with a running test session), a file store, the
demo generator registered, and ``palimpsest worker`` processes (concurrency 1, torch
threads 1 each through ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, checked in a child).
Each run asks for a new statistic (its own seeds) with ``compute_statistic``, as
``POST /v1/statistics`` does; the worker that takes it splits it into shards of
``--shard`` images, sends one ``compute_shard`` task per shard, and computes shards
itself; a second worker takes the shard tasks. The time is from the send to the row's
``ready`` (merge included), polled every 50 ms. Runs alternate 1 and 2 workers; the best
of ``--repeat`` each is kept. Prints the figures, the load average before and after, and
how many shards each worker computed (from its log), and the workers' CPU seconds.

On a loaded machine the wall-time ratio says little about cores: with the kernel's
autogroup scheduling each worker (its own session) gets one share of the CPUs, so two
workers get two shares whether or not two cores are free. The CPU seconds show the work
the split adds (a second model load, the merge, more messages).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

THREADS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def production_stack(tmp: Path, database_url: str, redis_url: str, **variables):
    from stack import Stack

    data_dir = tmp / "var"
    return Stack("bench", data_dir, {
        "PALIMPSEST_DATA_DIR": str(data_dir), "PALIMPSEST_DATABASE_URL": database_url,
        "PALIMPSEST_BROKER_URL": redis_url, "PALIMPSEST_STORAGE_URL": f"file://{tmp}/objects",
        "PALIMPSEST_DEVICE": "cpu", **THREADS_ENV, **variables})


def worker_threads(env: dict) -> int:
    """torch's intra-op threads in a process started with ``env``."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def services(tmp: Path):
    """(database url, redis url) context: a fresh database and a claimed Redis db, as the tests use."""
    from contextlib import contextmanager

    import redis

    from conftest import REDIS_SERVER, claimed_redis_db, postgres_database

    @contextmanager
    def both():
        with postgres_database() as database_url, claimed_redis_db() as number:
            url = f"{REDIS_SERVER}/{number}"
            client = redis.Redis.from_url(url)
            client.flushdb()
            try:
                yield database_url, url
            finally:
                client.flushdb()
                client.close()
    return both()


def time_statistic(stack, session_factory, sha256: str, layer: str, spec: str) -> float:
    from storage.db import session_scope
    from storage.models import Statistic
    from storage.statistics import insert_statistic

    with session_scope(session_factory) as session:
        stat_id = insert_statistic(session, sha256, layer, spec).id
    celery = stack.celery()
    start = time.perf_counter()
    celery.send_task("workers.statistics.compute_statistic", args=[stat_id])
    while True:
        with session_scope(session_factory) as session:
            stat = session.get(Statistic, stat_id)
            if stat.status == "ready":
                return time.perf_counter() - start
            if stat.status == "failed" and stat.shard_count is None:
                raise RuntimeError(f"statistic failed: {stat.error}")
        time.sleep(0.05)


def cpu_seconds(processes) -> float:
    """User + system CPU time of these processes (psutil.Process), those gone since counting 0."""
    import psutil

    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def shards_computed(process) -> int:
    return len(re.findall(r"computed shd_\w+ over", process.log()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--shard", type=int, default=1024)
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from rewriting.checkpoint import file_sha256
    from storage.db import make_engine, make_session_factory
    from storage.statistics import sample_spec
    from workers.models import register_model_file

    weights = ROOT / "demo" / "weights" / "generator.safetensors"
    tmp = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    with services(tmp) as (database_url, redis_url):
        stack = production_stack(tmp, database_url, redis_url, PALIMPSEST_SHARD_SAMPLES=str(args.shard))
        stack.migrate()
        session_factory = make_session_factory(make_engine(database_url))
        register_model_file(session_factory, stack.store(), weights, name="demo")
        sha256 = file_sha256(weights)
        threads = worker_threads(stack.env)
        load_before = os.getloadavg()
        print(f"statistic: {args.samples} images of {args.layer} (demo generator), shards of {args.shard} "
              f"({-(-args.samples // args.shard)} shards); torch threads per worker: {threads}; "
              f"cpus: {os.cpu_count()}; load average before: {load_before[0]:.2f} {load_before[1]:.2f}")
        best = {1: float("inf"), 2: float("inf")}
        run = 0
        try:
            for _ in range(args.repeat):
                for count in (1, 2):
                    workers = [stack.start_worker(queues="gpu") for _ in range(count)]
                    spec = sample_spec(args.samples, start=100_000 + run * args.samples)  # new seeds each run
                    cpu_start = sum(cpu_seconds(w.tree()) for w in workers)
                    seconds = time_statistic(stack, session_factory, sha256, args.layer, spec)
                    cpu = sum(cpu_seconds(w.tree()) for w in workers) - cpu_start
                    shards = [shards_computed(w) for w in workers]
                    print(f"  {count} worker{'s' if count > 1 else ' '}: {seconds:7.2f} s  "
                          f"({args.samples / seconds:6.0f} images/s; {cpu:6.1f} CPU s; shards per worker {shards}; "
                          f"load average {os.getloadavg()[0]:.2f})", flush=True)
                    best[count] = min(best[count], seconds)
                    for worker in workers:
                        worker.terminate()
                    stack.stop_all()
                    run += 1
        finally:
            stack.stop_all()
        load_after = os.getloadavg()
        print(f"best: 1 worker {best[1]:.2f} s, 2 workers {best[2]:.2f} s: speedup {best[1] / best[2]:.2f}x "
              f"(goal >= 1.7x); load average after: {load_after[0]:.2f} {load_after[1]:.2f}")


if __name__ == "__main__":
    main()
