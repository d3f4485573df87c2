"""Edit jobs end to end, over HTTP, with a real `palimpsest serve` and a real worker
subprocess: once on the embedded defaults and once on PostgreSQL + Redis + an S3 server.

Everything goes through the public surface (the HTTP API through ``palimpsest.client``
and the ``palimpsest`` command line); the database is read only to check what the
API cannot show (that a statistic was computed once).
"""
import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select

from palimpsest.client import ApiError, Client
from stack import wait_until

ROOT = Path(__file__).resolve().parents[2]
DEMO_REQUEST = ROOT / "demo" / "requests" / "dome_to_spire.json"
DEMO_WEIGHTS = ROOT / "demo" / "weights" / "generator.safetensors"
# Small enough for CI's two cores, large enough for a visible edit.
FAST = {"samples": 256, "steps": 300}


@pytest.fixture
def service(stack):
    """The stack with an API server, the demo model registered, and two tenants' clients."""
    model_id = stack.register_demo()  # the command itself: tests/integration/test_batches_e2e.py
    server = stack.start_server()
    acme = Client(server.url, stack.create_key("acme"))
    globex = Client(server.url, stack.create_key("globex"))
    return model_id, acme, globex


def demo_body(model_id, **params):
    request = json.loads(DEMO_REQUEST.read_text())
    return {"model": model_id, "layer": request.pop("layer"), "request": request, "params": {**FAST, **params}}


def wait_status(client, job_id, statuses, timeout=120):
    return wait_until(lambda: (j := client.job(job_id))["status"] in statuses and j, timeout, interval=0.2,
                      what=f"{job_id} in {statuses}")


def test_demo_edit_lifecycle(stack, service, tmp_path):
    model_id, acme, globex = service
    body = demo_body(model_id)
    job = acme.submit(body)
    assert job["status"] == "queued"

    final = acme.wait(job["id"], timeout=600)
    assert final["status"] == "succeeded", final
    assert {a["name"] for a in final["artifacts"]} == {"delta", "checkpoint", "preview", "metrics"}

    # the events tell the whole story, in order, each transition once
    events = acme.events(job["id"])
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    transitions = [e["status"] for e in events if e["kind"] == "transition"]
    assert transitions == ["queued", "running", "succeeded"]
    phases = [e["phase"] for e in events if e["kind"] == "progress"]
    for phase in ("statistics", "optimizing", "evaluating", "uploading"):
        assert phase in phases

    # the checkpoint, downloaded through the returned URL (a presigned S3 URL on the
    # services stack), is what the API recorded, and only the target layer changed
    path, sha256, size = acme.download(job["id"], "checkpoint", tmp_path)
    data = path.read_bytes()
    assert (hashlib.sha256(data).hexdigest(), len(data)) == (sha256, size)
    base, edited = load_file(DEMO_WEIGHTS), load_file(path)
    assert base.keys() == edited.keys()
    changed = sorted(name for name in base if not torch.equal(base[name], edited[name]))
    assert changed == [f"{body['layer']}.conv.weight"]

    # the edit shows on held-out seeds where it was meant to: by the demo segmenter,
    # pixels of domes changed far more than pixels elsewhere
    metrics = final["metrics"]
    seg = metrics["segmenter"]
    assert (seg["source_class"], seg["target_class"]) == ("dome", "spire")
    assert seg["source_pixels"] > 0
    assert metrics["constraint_loss"] < metrics["initial_loss"]
    assert_change_is_on_domes(DEMO_WEIGHTS, path, seeds=range(2_000_000, 2_000_016))

    # the same key and body give the same job; another tenant cannot see it
    again = acme.submit(body, idempotency_key="k1")
    assert acme.submit(body, idempotency_key="k1")["id"] == again["id"]
    with pytest.raises(ApiError) as error:
        acme.submit({**body, "params": {**body["params"], "steps": 301}}, idempotency_key="k1")
    assert error.value.status == 422
    for call in (lambda: globex.job(job["id"]), lambda: globex.events(job["id"]),
                 lambda: globex.download(job["id"], "checkpoint", tmp_path / "stolen")):
        with pytest.raises(ApiError) as error:
            call()
        assert error.value.status == 404
    assert not (tmp_path / "stolen").exists()


def assert_change_is_on_domes(base_path, edited_path, seeds):
    from demo.scenes import CLASSES
    from rewriting.checkpoint import load_model
    from rewriting.render import generate

    base, edited = load_model(base_path), load_model(edited_path)
    segmenter = load_model(ROOT / "demo" / "weights" / "segmenter.safetensors")
    seeds = list(seeds)
    with torch.no_grad():
        before, after = generate(base, seeds), generate(edited, seeds)
        domes = segmenter(before).argmax(1) == CLASSES.index("dome")
    change = (after - before).abs().mean(1)  # per pixel
    assert domes.any()
    inside, outside = change[domes].mean().item(), change[~domes].mean().item()
    assert inside > 3 * outside, (inside, outside)


def test_cancel_in_each_state(stack, service):
    model_id, acme, _ = service
    # one worker process: a long job holds it, so the next job stays queued
    running = acme.submit(demo_body(model_id, steps=50_000, plateau_patience=0))
    queued = acme.submit(demo_body(model_id))
    def optimizing():
        job = acme.job(running["id"])
        assert job["status"] in ("queued", "running"), job  # fail fast, not at the timeout
        return job["progress"]["phase"] == "optimizing"

    wait_until(optimizing, 300, interval=0.2, what="the long job optimizing")
    assert acme.job(queued["id"])["status"] == "queued"

    assert acme.cancel(queued["id"])["status"] == "cancelled"
    asked = time.monotonic()
    acme.cancel(running["id"])
    wait_status(acme, running["id"], {"cancelled"}, timeout=30)
    assert time.monotonic() - asked < 10  # "a running one stops within a few seconds"

    # the worker is free again; the cancelled queued job never ran
    done = acme.wait(acme.submit(demo_body(model_id))["id"], timeout=600)
    assert done["status"] == "succeeded"
    assert [e["status"] for e in acme.events(queued["id"]) if e["kind"] == "transition"] == ["queued", "cancelled"]
    with pytest.raises(ApiError) as error:
        acme.cancel(done["id"])
    assert error.value.status == 409


def test_concurrent_jobs_share_one_statistic(stack, service):
    from storage.db import make_engine, make_session_factory, session_scope
    from storage.models import Statistic

    model_id, acme, globex = service
    stack.start_worker()  # two worker processes, so the jobs really run at once
    # the third names the block's convolution: the same keys, so the same statistic
    conv = demo_body(model_id, samples=512, method="closed_form")
    conv["layer"] += ".conv"
    jobs = [(acme, acme.submit(demo_body(model_id, samples=512, steps=50))),
            (globex, globex.submit(demo_body(model_id, samples=512, steps=50))),
            (acme, acme.submit(conv))]
    finals = [client.wait(job["id"], timeout=600) for client, job in jobs]
    assert [f["status"] for f in finals] == ["succeeded"] * 3
    assert len({f["metrics"]["statistic"]["id"] for f in finals}) == 1

    engine = make_engine(stack.settings.database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            # one row for this (model, layer, sample spec), even on the services stack's shared database
            spec = finals[0]["metrics"]["statistic"]["sample_spec"]
            rows = session.scalars(select(Statistic.layer).where(
                Statistic.sample_spec == spec, Statistic.layer.in_([finals[0]["layer"], conv["layer"]]))).all()
            assert rows == [conv["layer"]]  # named by the weight module holding the keys
    finally:
        engine.dispose()
