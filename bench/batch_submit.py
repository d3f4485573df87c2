"""Batch submission time: POST /v1/batches with N lines (default 1,000), and where it goes.

    python bench/batch_submit.py [--lines 1000] [--repeat 3]
        [--database-url postgresql://...] [--broker-url redis://...]

Default: the embedded stack (SQLite file, kombu's SQL broker, file store) in a temporary
directory. The app is the real one (``create_app``), called in-process through Flask's
test client, so the figure is the server's work: read and split the body, validate every
line (``api.jobs.validate_job``), store the input, insert the batch and its N jobs (with
their first events) in one transaction, and send N ``run_job`` messages. Each line is the
demo's dome_to_spire request. Phases are timed by wrapping the module's functions.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

LAYERS = [{"name": "layer4", "kind": "conv", "param": "layer4.conv.weight", "key_channels": 128,
           "key_size": [16, 16], "value_channels": 128, "value_size": [16, 16]}]


def timed(module, name, spent):
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
    setattr(module, name, wrapper)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--broker-url", default=None)
    args = parser.parse_args()

    import api.batches
    from api import create_app
    from api.auth import create_key
    from stack import embedded_stack
    from storage import lifecycle, migrate
    from storage.db import session_scope
    from storage.models import Model

    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    config = {**embedded_stack(tmp).settings.as_flask_config(), "PALIMPSEST_BATCH_MAX_LINES": args.lines}
    if args.database_url:
        config["PALIMPSEST_DATABASE_URL"] = args.database_url
    if args.broker_url:
        config["PALIMPSEST_BROKER_URL"] = args.broker_url
    migrate.upgrade(config["PALIMPSEST_DATABASE_URL"])
    app = create_app(config)
    with session_scope(app.extensions["palimpsest_db"].session_factory) as session:
        key, _ = create_key(session, "bench")
        model = Model(tenant_id=None, name="demo", architecture="demo-gan", config={}, sha256="0" * 64, size=1,
                      object_key="k", layers=LAYERS, status="ready")
        session.add(model)
        session.flush()
        model_id = model.id
    request = json.loads((ROOT / "demo" / "requests" / "dome_to_spire.json").read_text())
    layer = request.pop("layer")
    body = "".join(json.dumps({"custom_id": f"edit-{i}", "model": model_id, "layer": layer, "request": request,
                               "params": {"samples": 256, "steps": 100}}) + "\n" for i in range(args.lines)).encode()

    spent = {}
    for name in ("split_lines", "validate_lines", "send_members"):
        timed(api.batches, name, spent)
    timed(lifecycle, "create_job", spent)  # api.batches calls it through the module
    client = app.test_client()
    headers = {"Authorization": f"Bearer {key}"}
    database, broker = (app.config[name].split(":")[0] for name in ("PALIMPSEST_DATABASE_URL", "PALIMPSEST_BROKER_URL"))
    print(f"POST /v1/batches, {args.lines} lines ({len(body) / 1024:.0f} KiB), database {database}, broker {broker}")
    totals = []
    for run in range(args.repeat):
        spent.clear()
        start = time.perf_counter()
        response = client.post("/v1/batches", data=body, content_type="application/jsonl", headers=headers)
        total = time.perf_counter() - start
        assert response.status_code == 202, response.json
        totals.append(total)
        rest = total - sum(spent.values())
        print(f"  run {run + 1}: {total:.2f} s  (validate {spent['validate_lines']:.2f} s, insert jobs "
              f"{spent['create_job']:.2f} s, send {spent['send_members']:.2f} s, split {spent['split_lines']:.3f} s, "
              f"rest incl. commit and input store {rest:.2f} s)")
    print(f"median {statistics.median(totals):.2f} s = {args.lines / statistics.median(totals):.0f} lines/s")


if __name__ == "__main__":
    main()
