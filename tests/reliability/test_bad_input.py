"""Bad input (issue 7, item 7): whatever a client sends, the API answers 4xx naming what
to fix, never 5xx, and every answer is one /v1/openapi.json says it may give.

- schemathesis reads the document the app serves and sends generated requests to every
  operation in it (positive and negative), with a valid key, through the app's WSGI
  interface on PostgreSQL. The ids in the paths are sometimes the caller's own, so that
  200 answers are checked too, not only 404s.
- Tables: malformed masks, unknown layers, rank above the number of keys, absurd step
  counts (422 naming the field, on /v1/jobs and as a batch line), and input that once
  reached PostgreSQL (NUL characters, unicode digits, deep JSON: 500s before the fix).
- Checkpoints, against a real `palimpsest serve` (gunicorn) and a real worker on
  PostgreSQL + Redis + an S3 server: a pickle that would create a file when loaded is
  refused at every way in and the file never appears; NaN or infinite weights end the
  model `failed` with the reason; uploads over the limit get 413 and leave nothing.
"""
import base64
import collections
import hashlib
import io
import json
import pickle
import re
import secrets
import subprocess
from pathlib import Path

import boto3
import hypothesis
import pytest
import requests
import schemathesis
import torch
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy import func, select

from api import create_app
from api.auth import create_key
from stack import embedded_stack, services_stack, wait_until
from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Job, Model

from job_fixtures import GENERATOR_CONFIG
from v1_helpers import Tenant, add_artifact, add_job, add_model, add_statistic, model_sha256

ROOT = Path(__file__).resolve().parents[2]
PARAMETER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")  # werkzeug's <converter:name>
# Bounded so that the schemathesis run takes well under a minute on two cores:
# generated requests per operation and mode (positive, negative).
MAX_EXAMPLES = 40


# -- schemathesis over every operation ---------------------------------------------------------

@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, postgres_url):
    """The app on PostgreSQL (embedded SQL broker and file store in a temp dir), a tenant
    with a key, and one resource of each kind for the path parameters."""
    tmp = tmp_path_factory.mktemp("fuzz")
    config = {**embedded_stack(tmp).settings.as_flask_config(), "PALIMPSEST_DATABASE_URL": postgres_url,
              "TESTING": True}
    app = create_app(config)
    owner = Tenant(app, "fuzz")
    model = add_model(app, owner.id)
    job = add_job(app, owner.id, model, "succeeded")
    add_artifact(app, job, "checkpoint", b"weights")
    ids = {
        "model_id": [model],
        "job_id": [job, add_job(app, owner.id, model, "running"), add_job(app, owner.id, model, "queued")],
        "statistic_id": [add_statistic(app, model_sha256(app, model))],
        "name": ["checkpoint", "preview"],
    }
    if "batches.submit_batch" in app.view_functions:
        response = app.test_client().post("/v1/batches", headers={**owner.headers, "Content-Type": "application/jsonl"},
                                          data=json.dumps({"custom_id": "a", "model": model, "layer": "layer3",
                                                           "request": EDIT_BOX}))
        assert response.status_code == 202, response.json
        ids["batch_id"] = [response.json["id"]]
    return app, owner, ids


@pytest.fixture(scope="module")
def api_schema(fuzzed):
    app, owner, ids = fuzzed
    schema = schemathesis.openapi.from_wsgi("/v1/openapi.json", app)

    @schema.hook
    def flatmap_path_parameters(context, path_parameters):
        # Half the time, the caller's own resources instead of generated ids.
        real = {name: st.sampled_from(ids[name]) for name in path_parameters or {} if name in ids}
        if not real:
            return st.just(path_parameters)
        return st.one_of(st.just(path_parameters),
                         st.fixed_dictionaries(real).map(lambda chosen: {**path_parameters, **chosen}))

    @schema.hook
    def flatmap_body(context, body):
        # Half the time, a body that names the caller's model, so validation goes past "no model".
        if not isinstance(body, dict) or "model" not in body:
            return st.just(body)
        return st.sampled_from([body, {**body, "model": ids["model_id"][0]}])

    return schema


# Not checked: positive_data_acceptance, which wants every schema-valid request accepted.
# A well-formed value the server cannot resolve (a model id that does not exist, a cursor
# it never issued, a layer the model lacks) is refused with 422 naming the field, by design.
def refusal_names_the_field(ctx, response, case):
    """Our own check: a 422 says which field to fix (docs/api.md, error bodies)."""
    if response.status_code == 422:
        error = response.json()["error"]
        assert "field" in error, f"422 without a field: {error}"  # "" too: a parameter may be named ""
    return True


def has_inputs(operation) -> bool:
    return bool(operation.body) or any(p.location != "header" or p.name != "Authorization"
                                       for p in operation.iter_parameters())


def operations(schema):
    for result in schema.get_all_operations():
        yield result.ok()  # raises if the document has an operation schemathesis cannot read


def test_every_operation_answers_per_its_schema(fuzzed, api_schema, figures):
    """Every operation, positive and negative cases: no 5xx, and status, content type,
    headers and body as documented (schemathesis' default checks), 422s name a field."""
    app, owner, _ = fuzzed
    failures, labels = [], []
    statuses = collections.defaultdict(collections.Counter)
    for operation in operations(api_schema):
        labels.append(operation.label)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                                 suppress_health_check=list(hypothesis.HealthCheck))
            def check(case):
                response = case.call_and_validate(headers=owner.headers, excluded_checks=[positive_data_acceptance],
                                                  additional_checks=[refusal_names_the_field])
                statuses[operation.label][response.status_code] += 1

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                # Nothing to break in an operation without parameters or body (GET /v1/healthz).
                assert mode == GenerationMode.NEGATIVE and not has_inputs(operation), operation.label
            except (Exception, FailureGroup) as error:  # report every operation that fails, not only the first
                failures.append(f"{operation.label} ({mode.value}): {error}")
    for label, counts in statuses.items():
        print(f"{label}: {dict(sorted(counts.items()))}")
    figures.update(operations=len(labels), requests=sum(sum(c.values()) for c in statuses.values()),
                   statuses=dict(sum(statuses.values(), collections.Counter())))
    documented = {label.split(" ", 1)[1] for label in labels}
    for rule in app.url_map.iter_rules():
        # schemathesis leaves out the document it was read from; reading it is the test of it
        if (rule.rule.startswith("/v1/") or rule.rule == "/docs") and rule.rule != "/v1/openapi.json":
            path = PARAMETER.sub(r"{\1}", rule.rule)
            assert path in documented, f"{rule.rule} was not fuzzed: it is missing from /v1/openapi.json"
    assert not failures, "\n\n".join(failures)
    assert sum(counts[200] for counts in statuses.values()) > 100  # real resources were reached, not only 404s


# -- 422 naming the field: masks, layers, rank, steps ------------------------------------------

def png_url(size=(64, 64), box=(8, 8, 24, 24), mode="L", image_format="PNG") -> str:
    image = Image.new(mode, size, 0)
    if box is not None:
        image.paste(255, box)
    out = io.BytesIO()
    image.save(out, format=image_format)
    kind = image_format.lower()
    return f"data:image/{kind};base64," + base64.b64encode(out.getvalue()).decode()


EDIT_BOX = {"operation": "copy", "copy": {"seed": 1, "mask": [0.1, 0.1, 0.5, 0.5]},
            "paste": {"seed": 2, "mask": [0.5, 0.5, 0.9, 0.9]}}
NAN = float("nan")


def edit(**changes) -> dict:
    return {**EDIT_BOX, **changes}


def paste_mask(mask) -> dict:
    return {"request": edit(paste={"seed": 2, "mask": mask})}


# (id, change to a valid body on the demo model (None drops the field), code, field)
REFUSED = [
    # masks
    ("box-three-numbers", paste_mask([0.1, 0.1, 0.5]), "invalid_request", "request.paste.mask"),
    ("box-five-numbers", paste_mask([0.1, 0.1, 0.5, 0.5, 0.5]), "invalid_request", "request.paste.mask"),
    ("box-outside-the-image", paste_mask([0.0, 0.0, 1.5, 1.0]), "invalid_request", "request.paste.mask"),
    ("box-negative", paste_mask([-0.1, 0.0, 0.5, 0.5]), "invalid_request", "request.paste.mask"),
    ("box-nan", paste_mask([NAN, 0.0, 0.5, 0.5]), "invalid_request", "request.paste.mask"),
    ("box-inverted", paste_mask([0.5, 0.5, 0.1, 0.1]), "invalid_request", "request.paste.mask"),
    ("box-no-area", paste_mask([0.5, 0.1, 0.5, 0.9]), "invalid_request", "request.paste.mask"),
    ("box-strings", paste_mask(["0", "0", "1", "1"]), "invalid_request", "request.paste.mask"),
    ("box-booleans", paste_mask([False, False, True, True]), "invalid_request", "request.paste.mask"),
    ("mask-null", paste_mask(None), "invalid_request", "request.paste.mask"),
    ("mask-object", paste_mask({"x": 1}), "invalid_request", "request.paste.mask"),
    ("mask-http-url", paste_mask("http://127.0.0.1:9/mask.png"), "invalid_request", "request.paste.mask"),
    ("mask-file-url", paste_mask("file:///etc/passwd"), "invalid_request", "request.paste.mask"),
    ("mask-jpeg", paste_mask(png_url(image_format="JPEG")), "invalid_request", "request.paste.mask"),
    ("mask-gif-called-png", paste_mask(png_url(image_format="GIF").replace("image/gif", "image/png")),
     "invalid_request", "request.paste.mask"),
    ("mask-bad-base64", paste_mask("data:image/png;base64,!!notbase64!!"), "invalid_request", "request.paste.mask"),
    ("mask-truncated-png", paste_mask(png_url()[:60]), "invalid_request", "request.paste.mask"),
    ("mask-empty-png", paste_mask(png_url(box=None)), "invalid_request", "request.paste.mask"),
    ("mask-decompression-bomb", paste_mask(png_url(size=(5000, 5000), box=(0, 0, 10, 10), mode="1")),
     "invalid_request", "request.paste.mask"),
    ("mask-in-context", {"request": edit(context=[{"seed": 3, "mask": [0.1, 0.1, 0.5, 0.5]},
                                                  {"seed": 4, "mask": [1, 1, 0, 0]}])},
     "invalid_request", "request.context[1].mask"),
    ("mask-copy-region", {"request": edit(copy={"seed": 1, "mask": "blue"})}, "invalid_request", "request.copy.mask"),
    ("mask-original-format", {"request": {"object": [1, [0, 0, 1, 1]], "paste": [2, [0, 0, 2, 2]]}},
     "invalid_request", "request.paste.mask"),
    # layers
    ("layer-unknown", {"layer": "layer99"}, "unknown_layer", "layer"),
    ("layer-wrong-case", {"layer": "LAYER4"}, "unknown_layer", "layer"),
    ("layer-trailing-space", {"layer": "layer4 "}, "unknown_layer", "layer"),
    ("layer-a-path", {"layer": "layer4/../layer3"}, "unknown_layer", "layer"),
    ("layer-python-attribute", {"layer": "__class__"}, "unknown_layer", "layer"),
    ("layer-a-parameter", {"layer": "layer4.conv.weight"}, "unknown_layer", "layer"),
    ("layer-only-in-request", {"layer": None, "request": edit(layer="nope")}, "unknown_layer", "layer"),
    ("layer-empty", {"layer": ""}, "validation_error", "layer"),
    ("layer-a-number", {"layer": 4}, "validation_error", "layer"),
    # rank above the number of keys (layer4 keys are 8x8: a box of 0.1 covers one cell)
    ("rank-above-keys", {"request": edit(paste={"seed": 2, "mask": [0.0, 0.0, 0.1, 0.1]}), "params": {"rank": 2}},
     "invalid_request", "params.rank"),
    ("rank-above-keys-of-context", {"request": edit(context=[{"seed": 3, "mask": [0.0, 0.0, 0.1, 0.1]},
                                                             {"seed": 4, "mask": [0.9, 0.9, 1.0, 1.0]}]),
                                    "params": {"rank": 3}}, "invalid_request", "params.rank"),
    ("rank-above-key-dimension", {"request": edit(paste={"seed": 2, "mask": [0, 0, 1, 1]},
                                                  context=[{"seed": s, "mask": [0, 0, 1, 1]} for s in range(5)]),
                                  "params": {"rank": 257}}, "invalid_request", "params.rank"),
    ("rank-linear-layer", {"layer": "fc", "params": {"rank": 2}}, "invalid_request", "params.rank"),
    ("rank-in-request", {"request": edit(paste={"seed": 2, "mask": [0.0, 0.0, 0.1, 0.1]}, params={"rank": 2})},
     "invalid_request", "params.rank"),
    ("rank-zero", {"params": {"rank": 0}}, "invalid_request", "params.rank"),
    ("rank-fraction", {"params": {"rank": 1.5}}, "invalid_request", "params.rank"),
    ("rank-string", {"params": {"rank": "2"}}, "invalid_request", "params.rank"),
    # absurd step counts
    ("steps-zero", {"params": {"steps": 0}}, "invalid_request", "params.steps"),
    ("steps-negative", {"params": {"steps": -300}}, "invalid_request", "params.steps"),
    ("steps-ten-million", {"params": {"steps": 10_000_000}}, "invalid_request", "params.steps"),
    ("steps-googol", {"params": {"steps": 10**100}}, "invalid_request", "params.steps"),
    ("steps-huge-float", {"params": {"steps": 1e308}}, "invalid_request", "params.steps"),
    ("steps-infinite", {"params": {"steps": float("inf")}}, "invalid_request", "params.steps"),
    ("steps-nan", {"params": {"steps": NAN}}, "invalid_request", "params.steps"),
    ("steps-fraction", {"params": {"steps": 2.5}}, "invalid_request", "params.steps"),
    ("steps-string", {"params": {"steps": "300"}}, "invalid_request", "params.steps"),
    ("steps-boolean", {"params": {"steps": True}}, "invalid_request", "params.steps"),
    ("steps-null", {"params": {"steps": None}}, "invalid_request", "params.steps"),
    ("steps-in-request", {"request": edit(params={"steps": 10**9})}, "invalid_request", "request.params.steps"),
    ("samples-absurd", {"params": {"samples": 10**9}}, "invalid_request", "params.samples"),
    ("held-out-absurd", {"params": {"held_out": 10**6}}, "invalid_request", "params.held_out"),
]


@pytest.fixture(scope="module")
def demo(fuzzed):
    """The bundled demo generator, registered as the workers do (its layers from a real inspection)."""
    from demo.artifacts import GENERATOR_PATH
    from workers.models import register_model_file

    app, _, _ = fuzzed
    model_id = register_model_file(app.extensions["palimpsest_db"].session_factory,
                                   app.extensions["palimpsest_store"], GENERATOR_PATH, name="demo")
    return app, Tenant(app, "bad-input"), model_id


def post_json(client, path, body, tenant, **kwargs):
    # json.dumps writes NaN and Infinity as bare words, which Python's parser (Flask's) reads back
    return client.post(path, data=json.dumps(body), content_type="application/json", headers=tenant.headers,
                       **kwargs)


def job_count(app) -> int:
    with session_scope(app.extensions["palimpsest_db"].session_factory) as session:
        return session.scalar(select(func.count()).select_from(Job))


@pytest.mark.parametrize("change, code, field", [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_bad_edit_is_refused_naming_the_field(demo, change, code, field):
    app, tenant, model_id = demo
    client = app.test_client()
    body = {"model": model_id, "layer": "layer4", "request": EDIT_BOX}
    for key, value in change.items():
        if value is None:
            body.pop(key)
        else:
            body[key] = value
    before = job_count(app)
    response = post_json(client, "/v1/jobs", body, tenant)
    assert response.status_code == 422, response.json
    assert response.json["error"]["code"] == code
    assert response.json["error"]["field"] == field, response.json
    assert response.json["error"]["message"]

    if "batches.submit_batch" in app.view_functions:
        # the same line in a batch, after a good one: refused whole, the bad line named with the field
        good = {"custom_id": "good", "model": model_id, "layer": "layer4", "request": EDIT_BOX}
        lines = "\n".join(json.dumps(line) for line in (good, {"custom_id": "bad", **body}))
        batch = client.post("/v1/batches", data=lines, content_type="application/jsonl", headers=tenant.headers)
        assert batch.status_code == 422, batch.json
        assert batch.json["error"]["details"] == [{"line": 2, "field": field,
                                                   "message": response.json["error"]["message"]}]
    assert job_count(app) == before


def test_the_valid_body_of_the_table_is_accepted(demo):
    """The table's changes are what is refused: the body they change is a good one."""
    app, tenant, model_id = demo
    response = post_json(app.test_client(), "/v1/jobs", {"model": model_id, "layer": "layer4", "request": EDIT_BOX},
                         tenant)
    assert response.status_code == 202, response.json


@pytest.mark.parametrize("body, code, field", [
    ({"layer": "layer99"}, "unknown_layer", "layer"),
    ({"layer": None}, "unknown_layer", "layer"),
    ({"layer": "layer4", "samples": 0}, "validation_error", "samples"),
    ({"layer": "layer4", "samples": 10**12}, "validation_error", "samples"),
    ({"layer": "layer4", "samples": 2.5}, "validation_error", "samples"),
])
def test_bad_statistic_request_is_refused_naming_the_field(demo, body, code, field):
    app, tenant, model_id = demo
    response = post_json(app.test_client(), "/v1/statistics", {"model": model_id, **body}, tenant)
    assert response.status_code == 422, response.json
    assert (response.json["error"]["code"], response.json["error"]["field"]) == (code, field)


# -- input that once reached PostgreSQL and answered 500 ---------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("method, path, body, status, field", [
    ("GET", "/v1/jobs/job%00x", None, 404, None),
    ("GET", "/v1/models/mdl%00x", None, 404, None),
    ("GET", "/v1/statistics/sts%00x", None, 404, None),
    ("GET", "/v1/jobs/@job/artifacts/a%00b", None, 404, None),
    ("GET", "/v1/jobs?model=a%00b", None, 422, "model"),
    ("GET", "/v1/jobs?batch=a%00b", None, 422, "batch"),
    ("GET", "/v1/statistics?layer=a%00b", None, 422, "layer"),
    ("GET", "/v1/jobs?limit=%C2%B2", None, 422, "limit"),  # "²".isdigit() is True; int("²") fails
    ("GET", "/v1/jobs/@job/events?after=%C2%B2", None, 422, "after"),
    ("GET", "/v1/jobs/@job/events?after=99999999999999999999", None, 422, "after"),  # past int32
    ("GET", "/v1/jobs/@job/events?after=" + "9" * 5000, None, 422, "after"),  # past int()'s 4,300 digits
    ("GET", "/v1/jobs/@job/events?colour=red", None, 422, "colour"),
    ("GET", "/v1/jobs?cursor=" + base64.urlsafe_b64encode(b'["2020-01-01T00:00:00+00:00", "a\\u0000"]').decode(),
     None, 422, "cursor"),
    ("POST", "/v1/jobs", {"model": "mdl\x00x", "request": EDIT_BOX}, 422, "model"),
    ("POST", "/v1/jobs", {"model": "@model", "layer": "layer4", "request": EDIT_BOX, "base": {"job": "j\x00"}},
     422, "base.job"),
    ("POST", "/v1/jobs", {"model": "@model", "layer": "layer4", "request": EDIT_BOX,
                          "params": {"source_class": "dome\x00"}}, 422, "params.source_class"),
    ("POST", "/v1/jobs", DEEP, 400, None),
    # JSON can spell a lone surrogate, which no UTF-8 column or hash can encode
    ("POST", "/v1/jobs", '{"model": "@model", "request": {"note": "\\udc00"}}', 422, "request.note"),
    ("POST", "/v1/jobs", '{"model": "@model", "request": {"\\ud800": 1}}', 422, "request"),
    ("POST", "/v1/statistics", '{"model": "\\ud800", "layer": "layer4"}', 422, "model"),
    ("POST", "/v1/statistics", {"model": "mdl\x00x", "layer": "layer4"}, 422, "model"),
    ("POST", "/v1/models", {"object_key": "tenants/x/a\x00b"}, 422, "object_key"),
    ("POST", "/v1/models", {"object_key": "tenants/x/a", "config": json.loads("[" * 40 + "]" * 40)}, 400, None),
])
def test_input_postgresql_cannot_hold_is_refused(demo, method, path, body, status, field):
    app, tenant, model_id = demo
    job = add_job(app, tenant.id, model_id, "succeeded")
    path = path.replace("@job", job)
    if isinstance(body, dict):
        body = json.loads(json.dumps(body).replace("@model", model_id))
    elif isinstance(body, str):
        body = body.replace("@model", model_id)
    response = app.test_client().open(path, method=method, headers=tenant.headers,
                                      **({} if body is None else {"data": body if isinstance(body, str)
                                                                   else json.dumps(body),
                                                                   "content_type": "application/json"}))
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.json["error"].get("field") == field


def test_form_fields_postgresql_cannot_hold_are_refused(demo, tmp_path):
    app, tenant, _ = demo
    data = tiny_generator(tmp_path / "g.safetensors").read_bytes()
    client = app.test_client()
    for form, field in [({"name": "a\x00b"}, "name"), ({}, "file"),  # the file's name is the default name
                        ({"config": json.dumps({"channels": "\x00"})}, "config"),
                        ({"config": "[" * 5000 + "]" * 5000}, "config")]:
        filename = "g\x00.safetensors" if field == "file" else "g.safetensors"
        response = client.post("/v1/models", headers=tenant.headers, content_type="multipart/form-data",
                               data={**form, "file": (io.BytesIO(data), filename)})
        assert response.status_code == 422, response.json
        assert response.json["error"]["field"] == field


# -- checkpoints, against a real server and worker ---------------------------------------------

MAX_UPLOAD = 1 << 20  # PALIMPSEST_MAX_UPLOAD_BYTES of the live server


def tiny_generator(path, poison: float | None = None):
    """The workers' tiny demo-gan (16x16 images, a few kB; tests/workers/job_fixtures.py),
    with ``poison`` in one weight."""
    from demo.generator import Generator
    from rewriting.checkpoint import save_model

    model = Generator(**GENERATOR_CONFIG)
    if poison is not None:
        with torch.no_grad():
            model.layer2.conv.weight[0, 0, 0, 0] = poison
    save_model(model, path, "demo-gan", GENERATOR_CONFIG)
    return path


class CreatesFile:
    """Unpickling this creates ``path``: what a malicious checkpoint would do on torch.load."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def live(tmp_path_factory, postgres_url, redis_url, s3_server):
    """`palimpsest serve` and a `palimpsest worker` (queue cpu: model inspection) on
    PostgreSQL, Redis and a fresh bucket of the S3 server; a tenant's key."""
    bucket = f"palimpsest-bad-input-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    stack = services_stack(tmp_path_factory.mktemp("live"), postgres_url, redis_url, f"s3://{bucket}/objects",
                           s3_server)
    stack.variables["PALIMPSEST_MAX_UPLOAD_BYTES"] = str(MAX_UPLOAD)
    stack.migrate()
    engine = make_engine(postgres_url)
    sessions = make_session_factory(engine)
    with session_scope(sessions) as session:
        key, row = create_key(session, f"live-{secrets.token_hex(3)}")
        tenant_id = row.tenant_id
    try:
        stack.start_worker(queues="cpu")
        server = stack.start_server()
        yield stack, server.url, {"Authorization": f"Bearer {key}"}, tenant_id, sessions
    finally:
        stack.stop_all()
        engine.dispose()


def tenant_objects(stack, tenant_id) -> list[str]:
    store = stack.store()
    listed = store.client.list_objects_v2(Bucket=store.bucket, Prefix=f"{store.prefix}/tenants/{tenant_id}/")
    return [item["Key"] for item in listed.get("Contents", [])]


def upload(url, headers, data: bytes, filename="model.safetensors", **fields):
    return requests.post(f"{url}/v1/models", headers=headers, files={"file": (filename, data)}, data=fields,
                         timeout=60)


def wait_model(url, headers, model_id, timeout=120) -> dict:
    def done():
        model = requests.get(f"{url}/v1/models/{model_id}", headers=headers, timeout=10).json()
        return model if model["status"] != "pending" else None

    return wait_until(done, timeout, interval=0.2, what=f"inspection of {model_id}")


UNPICKLING = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle|\bjoblib\b|\bdill\b|\bshelve\b|"
                        r"accept_content.*pickle")


def test_no_service_code_unpickles():
    """The service's sources call nothing that unpickles (the tests above prove the refusals;
    this keeps a later change from adding a loader beside them)."""
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for package in ("api", "workers", "storage", "rewriting", "demo", "palimpsest", "bench")
             for path in sorted((ROOT / package).rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if UNPICKLING.search(line)]
    assert found == []


@pytest.mark.integration
def test_pickled_checkpoint_is_refused_unread_at_every_way_in(live, tmp_path):
    """A checkpoint that creates a file when unpickled (as torch.load would): at each way in,
    it is refused, and the file never appears."""
    stack, url, headers, tenant_id, sessions = live
    marker = tmp_path / "unpickled"
    payloads = {"pickle": pickle.dumps({"state_dict": CreatesFile(marker)}, protocol=4)}
    zipped = io.BytesIO()
    torch.save({"state_dict": CreatesFile(marker)}, zipped)  # torch.save's zip, holding the same pickle
    payloads["torch-zip"] = zipped.getvalue()
    pickle.loads(pickle.dumps(CreatesFile(tmp_path / "probe")))  # the payload does work when unpickled
    assert (tmp_path / "probe").exists()

    from rewriting.checkpoint import load_model
    from rewriting.errors import CheckpointError
    from workers.models import ModelRefused, inspect_file

    for name, data in payloads.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        # 1. uploaded over HTTP: refused by its first bytes, before anything is stored
        response = upload(url, headers, data, architecture="demo-gan")
        assert response.status_code == 422, response.text
        assert (response.json()["error"]["code"], response.json()["error"]["field"]) == ("invalid_checkpoint", "file")
        assert not [key for key in tenant_objects(stack, tenant_id) if "/models/" in key]
        # 2. registered by object key, already in the tenant's space: refused the same way
        key = f"tenants/{tenant_id}/incoming/{name}.safetensors"
        stack.store().put(key, io.BytesIO(data))
        response = requests.post(f"{url}/v1/models", headers=headers, json={"object_key": key}, timeout=30)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "invalid_checkpoint"
        # 3. a pending model that points at it (as if stored before these checks): the worker refuses it
        with session_scope(sessions) as session:
            row = Model(tenant_id=tenant_id, name=name, architecture="demo-gan", config={},
                        sha256=hashlib.sha256(data).hexdigest(), size=len(data), object_key=key)
            session.add(row)
            session.flush()
            model_id = row.id
        stack.celery().send_task("workers.models.inspect_model", args=[model_id])
        model = wait_model(url, headers, model_id)
        assert model["status"] == "failed" and "not a safetensors file" in model["error"], model
        # 4. the engine and the inspection, handed the file directly
        with pytest.raises(CheckpointError):
            load_model(path)
        with pytest.raises(ModelRefused, match="not a safetensors file"):
            inspect_file(path)
        # 5. the command line's upload
        done = subprocess.run(stack.palimpsest("models", "upload", str(path), "--architecture", "demo-gan"),
                              env={**stack.env, "PALIMPSEST_API_URL": url,
                                   "PALIMPSEST_API_KEY": headers["Authorization"].split()[1]},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "invalid_checkpoint" in done.stderr + done.stdout, done
        assert not marker.exists(), f"{name}: something unpickled the checkpoint"
    assert not marker.exists()


@pytest.mark.integration
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_end_the_model_failed(live, tmp_path, poison):
    stack, url, headers, tenant_id, _ = live
    response = upload(url, headers, tiny_generator(tmp_path / "bad.safetensors", poison).read_bytes())
    assert response.status_code == 202, response.text  # a well-formed file: the worker looks inside
    model = wait_model(url, headers, response.json()["id"])
    assert model["status"] == "failed" and model["layers"] == []
    assert model["error"] == "file: tensor 'layer2.conv.weight' holds NaN or infinite values"
    job = requests.post(f"{url}/v1/jobs", headers=headers, timeout=30,
                        json={"model": model["id"], "layer": "layer3", "request": EDIT_BOX})
    assert job.status_code == 409, job.text
    error = job.json()["error"]
    assert (error["code"], error["field"]) == ("model_not_ready", "model")
    assert "NaN" in error["message"]
    # the same worker passes a sound checkpoint: it is the weights that are refused
    good = upload(url, headers, tiny_generator(tmp_path / "good.safetensors").read_bytes())
    assert wait_model(url, headers, good.json()["id"])["status"] == "ready"


@pytest.mark.integration
def test_oversized_uploads_get_413_and_leave_nothing(live, tmp_path):
    stack, url, headers, tenant_id, sessions = live
    big = tiny_generator(tmp_path / "g.safetensors").read_bytes()
    big = big + b"\0" * (2 * MAX_UPLOAD)  # (the size would not match the header either: the limit comes first)
    with session_scope(sessions) as session:
        models_before = session.scalar(select(func.count()).select_from(Model).where(Model.tenant_id == tenant_id))
    before = tenant_objects(stack, tenant_id)

    # with a Content-Length: refused before the body is read
    response = upload(url, headers, big, architecture="demo-gan")
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "payload_too_large"

    # chunked (no Content-Length): cut off at the limit while it streams to the store
    boundary = "b0undary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="g.safetensors"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def chunks():
        yield head
        for start in range(0, len(big), 64 * 1024):
            yield big[start:start + 64 * 1024]
        yield f"\r\n--{boundary}--\r\n".encode()

    response = requests.post(f"{url}/v1/models", data=chunks(), timeout=60,
                             headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413, response.text

    # a JSON body over the API's 16 MiB request limit
    response = requests.post(f"{url}/v1/jobs", headers={**headers, "Content-Type": "application/json"}, timeout=60,
                             data=json.dumps({"model": "x", "request": {"pad": "x" * (17 << 20)}}))
    assert response.status_code == 413, response.text

    assert tenant_objects(stack, tenant_id) == before  # no object, not even a partial one
    with session_scope(sessions) as session:
        assert session.scalar(select(func.count()).select_from(Model)
                              .where(Model.tenant_id == tenant_id)) == models_before
    # and the server still takes an upload under the limit
    assert upload(url, headers, tiny_generator(tmp_path / "ok.safetensors").read_bytes()).status_code == 202
