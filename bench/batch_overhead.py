"""Batch overhead: N edits on one model and layer as one batch through the service, next to
the same engine work done in-process, in the same run.

    python bench/batch_overhead.py [--edits 200] [--steps 20] [--samples 2048] [--shard 1024]

The batch: a fresh PostgreSQL database, a Redis db of its own, a file store, the demo
generator (with its segmenter) registered, ``palimpsest serve`` and 2 ``palimpsest
worker`` processes (concurrency 1, torch threads 1 each: the machine's two cores). The
JSONL goes to ``POST /v1/batches`` (the client's ``submit_batch``); its members cycle
through the four demo requests (all at layer4) with params ``{samples, steps,
held_out: 2}``, so they share one statistic (split into shards of ``--shard`` images).
Its wall time runs from the POST to the client seeing ``completed`` (polled every
0.2 s): validation, queueing, one statistic, every job's claim, progress, load (warm),
edit, evaluation, materialized checkpoint and uploads, and the batch's finalization.

The baseline, in the same run (once before the batch and once after, averaged, since the
machine's load drifts), is the same engine work with the
same parallelism and no service: as many plain processes as workers (a ``spawn`` pool,
torch threads 1 each, each in its own session like each worker, models loaded before the
clock starts) compute the statistic's
shards with ``compute_second_moment`` (merged, as the workers merge), then every edit
with the engine calls a job makes: ``run_edit``, ``workers.jobs.evaluate`` (metrics on
the held-out seeds with the segmenter, and the preview), ``rewriting.delta.materialize``
of the checkpoint and the delta's bytes. So the difference is the service itself: HTTP,
validation, database, broker, leases and heartbeats, progress and events, the store,
and the batch's bookkeeping.

Prints both, the overhead in percent (goal: at most 10%), the load average at each step,
and the mean job time seen by the workers. Wall time on a shared machine follows the
other processes' load, so it also prints CPU seconds (user + system): the baseline's
processes after their models were loaded, against the workers' and the API server's
process trees from the submission to the end (PostgreSQL and Redis are not counted).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from shard_scaling import cpu_seconds, production_stack, services, worker_threads  # noqa: E402

REQUESTS = ["dome_to_spire", "spire_to_dome", "add_tree", "erase_trees"]


def edit_lines(model_id: str, edits: int, params: dict) -> list[dict]:
    requests = [json.loads((ROOT / "demo" / "requests" / f"{name}.json").read_text()) for name in REQUESTS]
    lines = []
    for i in range(edits):
        request = dict(requests[i % len(requests)])
        layer = request.pop("layer")
        lines.append({"custom_id": f"edit-{i:04d}", "model": model_id, "layer": layer, "request": request,
                      "params": params})
    return lines


def phase_means(events) -> dict:
    """Mean seconds a job spends from each of its events to the next (claim, then each phase's
    milestone, to the end), from the job_events timestamps."""
    spans, last = {}, {}
    for job_id, kind, status, phase, at in events:
        name = status if kind == "transition" else phase
        if job_id in last:
            previous, since = last[job_id]
            name = f"{name} done" if name == previous else name  # optimizing: a milestone at each end
            spans.setdefault(previous, []).append((at - since).total_seconds())
        last[job_id] = (name, at)
    return {name: sum(v) / len(v) for name, v in spans.items() if name != "queued"}


def run_batch(stack, session_factory, lines, tmp: Path, workers: int) -> dict:
    from sqlalchemy import select

    from api.auth import create_key
    from palimpsest.client import Client
    from storage.db import session_scope
    from storage.models import Batch, Job, JobEvent

    with session_scope(session_factory) as session:
        key, _ = create_key(session, "bench")
    path = tmp / "edits.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    server = stack.start_server()
    processes = [server] + [stack.start_worker(queues="gpu,cpu") for _ in range(workers)]
    client = Client(server.url, key)
    cpu_start = sum(cpu_seconds(p.tree()) for p in processes)
    start = time.perf_counter()
    batch = client.submit_batch(path)
    final = client.wait_batch(batch["id"], interval=0.2, timeout=24 * 3600)
    wall = time.perf_counter() - start
    cpu = sum(cpu_seconds(p.tree()) for p in processes) - cpu_start
    with session_scope(session_factory) as session:
        row = session.get(Batch, batch["id"])
        jobs = session.scalars(select(Job).where(Job.batch_id == batch["id"])).all()
        events = session.execute(select(JobEvent.job_id, JobEvent.kind, JobEvent.status, JobEvent.phase,
                                        JobEvent.created_at).join(Job, Job.id == JobEvent.job_id)
                                 .where(Job.batch_id == batch["id"]).order_by(JobEvent.job_id, JobEvent.seq)).all()
    stack.stop_all()
    durations = [(j.finished_at - j.started_at).total_seconds() for j in jobs if j.started_at and j.finished_at]
    return {"wall": wall, "cpu": cpu, "phases": phase_means(events), "status": final["status"], "counts": final["request_counts"],
            "recorded": (row.finished_at - row.created_at).total_seconds(),
            "job_mean": sum(durations) / max(len(durations), 1)}


# --- the baseline: the same engine calls in plain processes -----------------------------------
# One pool process per worker, torch threads 1 each, models loaded before the clock starts.
# Module globals hold each child's models: a benchmark script, not service code.

CHILD = {}


def _child_init(ready):
    import torch

    from rewriting.checkpoint import file_sha256, load_model

    # Its own session, as each worker process has (palimpsest worker under tests/stack.py): with the
    # kernel's autogroup scheduling, CPU time is shared between sessions, so a shared one would give
    # the baseline one share of a loaded machine where the workers get one each.
    os.setsid()
    torch.set_num_threads(1)
    weights = ROOT / "demo" / "weights" / "generator.safetensors"
    CHILD.update(weights=weights, model=load_model(weights), base_sha256=file_sha256(weights),
                 segmenter=load_model(ROOT / "demo" / "weights" / "segmenter.safetensors"), moments={})
    with ready.get_lock():
        ready.value += 1


def _wait_ready(pool, ready, processes: int) -> list:
    """The pool's processes (psutil), once every one has loaded its models."""
    import psutil

    while ready.value < processes:
        time.sleep(0.05)
    return [psutil.Process(p.pid) for p in pool._pool]  # noqa: SLF001 (the pool's own list of workers)


def _child_shard(job):
    from rewriting.statistics import compute_second_moment

    layer, seeds, path = job
    compute_second_moment(CHILD["model"], layer, f"{seeds.start}-{seeds.stop - 1}",
                          model_sha256=CHILD["base_sha256"]).save(path)
    return path


def _child_edit(job):
    from rewriting.delta import materialize
    from rewriting.edit import run_edit
    from rewriting.requests import parse_request
    from rewriting.statistics import SecondMoment
    from workers.jobs import evaluate, segmenter_classes
    from workers.params import split_params

    line, moment_path, out = job
    if moment_path not in CHILD["moments"]:
        CHILD["moments"][moment_path] = SecondMoment.load(moment_path)
    model, segmenter = CHILD["model"], CHILD["segmenter"]
    edit_params, options = split_params(line["params"], 5000)
    request = parse_request(line["request"], params=edit_params)
    result = run_edit(model, line["layer"], request, CHILD["moments"][moment_path], params=request.params,
                      base_sha256=CHILD["base_sha256"])
    evaluate(model, segmenter, result, request, options, segmenter_classes(segmenter, options))
    materialize(CHILD["weights"], [result.delta], out)
    result.delta.to_bytes()
    return result.constraint_loss


def run_baseline(lines, samples_spec: str, shard: int, processes: int) -> dict:
    """One statistic (the same shards, merged) plus every edit, over ``processes`` plain processes."""
    import multiprocessing

    from rewriting.statistics import SecondMoment
    from storage.statistics import parse_sample_spec
    from workers.statistics import shard_ranges

    layer = lines[0]["layer"]
    context = multiprocessing.get_context("spawn")
    ready = context.Value("i", 0)
    with tempfile.TemporaryDirectory() as tmp, context.Pool(processes, initializer=_child_init,
                                                             initargs=(ready,)) as pool:
        children = _wait_ready(pool, ready, processes)
        cpu_start = cpu_seconds(children)
        start = time.perf_counter()
        ranges = shard_ranges(parse_sample_spec(samples_spec), shard)
        parts = pool.map(_child_shard, [(layer, r, f"{tmp}/part{i}.safetensors") for i, r in enumerate(ranges)],
                         chunksize=1)
        moment = SecondMoment.load(parts[0])
        for part in parts[1:]:
            moment.merge(SecondMoment.load(part))
        moment.save(f"{tmp}/moment.safetensors")
        statistic = time.perf_counter() - start
        start = time.perf_counter()
        pool.map(_child_edit, [(line, f"{tmp}/moment.safetensors", f"{tmp}/model-{i}.safetensors")
                               for i, line in enumerate(lines)], chunksize=1)
        edits = time.perf_counter() - start
        cpu = cpu_seconds(children) - cpu_start
    return {"statistic": statistic, "edits": edits, "cpu": cpu}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edits", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--shard", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from storage.db import make_engine, make_session_factory
    from storage.statistics import sample_spec
    from workers.models import register_demo

    params = {"samples": args.samples, "steps": args.steps, "held_out": 2}
    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-overhead-"))
    with services(tmp) as (database_url, redis_url):
        stack = production_stack(tmp, database_url, redis_url, PALIMPSEST_SHARD_SAMPLES=str(args.shard),
                                 PALIMPSEST_BATCH_MAX_LINES=str(max(args.edits, 1000)))
        stack.migrate()
        session_factory = make_session_factory(make_engine(database_url))
        model_id = register_demo(session_factory, stack.store())
        lines = edit_lines(model_id, args.edits, params)
        load_before = os.getloadavg()
        print(f"{args.edits} edits of the demo generator at {lines[0]['layer']} (the 4 demo requests in turn), "
              f"params {params}; statistic sharded by {args.shard}; {args.workers} workers with "
              f"{worker_threads(stack.env)} torch thread each; cpus {os.cpu_count()}; "
              f"load average before {load_before[0]:.2f} {load_before[1]:.2f}", flush=True)
        runs = {}

        def baseline(when):
            result = run_baseline(lines, sample_spec(args.samples), args.shard, args.workers)
            print(f"baseline {when} ({args.workers} plain processes, 1 torch thread each): statistic "
                  f"{result['statistic']:.1f} s + {args.edits} edits {result['edits']:.1f} s "
                  f"({args.workers * result['edits'] / args.edits:.2f} s each) = "
                  f"{result['statistic'] + result['edits']:.1f} s; {result['cpu']:.1f} CPU s; "
                  f"load average now {os.getloadavg()[0]:.2f}", flush=True)
            return result

        runs["before"] = baseline("before")
        try:
            batch = run_batch(stack, session_factory, lines, tmp, args.workers)
        finally:
            stack.stop_all()
        print(f"batch: {batch['status']} {batch['counts']} in {batch['wall']:.1f} s (recorded created->finished "
              f"{batch['recorded']:.1f} s); mean job time on a worker {batch['job_mean']:.2f} s; "
              f"{batch['cpu']:.1f} CPU s in the workers and the API server (PostgreSQL and Redis not counted); "
              f"load average now {os.getloadavg()[0]:.2f}", flush=True)
        print("  mean seconds from each job event to the next: "
              + ", ".join(f"{name} {seconds:.3f}" for name, seconds in batch["phases"].items()), flush=True)
        runs["after"] = baseline("after")
    wall = sum(r["statistic"] + r["edits"] for r in runs.values()) / len(runs)
    cpu = sum(r["cpu"] for r in runs.values()) / len(runs)
    print(f"overhead: batch {batch['wall']:.1f} s vs baseline {wall:.1f} s (mean of before and after) = "
          f"{100 * (batch['wall'] / wall - 1):+.1f}% wall (goal <= +10%); "
          f"CPU {batch['cpu']:.1f} s vs {cpu:.1f} s = {100 * (batch['cpu'] / cpu - 1):+.1f}%")


if __name__ == "__main__":
    main()
