"""The ``palimpsest`` command line: run the service, and the engine's commands.

    palimpsest serve [--with-worker]   the API under gunicorn (plus a worker, for the embedded defaults)
    palimpsest worker [--beat]         a Celery worker (same app as `celery -A workers.main worker`)
    palimpsest beat                    the periodic tasks' scheduler (the reconciler); run one
    palimpsest reconcile               re-send what the broker lost (workers/reconcile.py), once
    palimpsest db upgrade              migrate the metadata database to the newest schema
    palimpsest keys create --tenant T  a new API key (printed once; only its sha256 is kept)
    palimpsest keys list|revoke        the keys (prefixes only), and revoking one
    palimpsest models register-demo    register the bundled demo generator for every tenant
    palimpsest submit|jobs|show|cancel|delete|download, models list|upload|delete,
      batch submit|results|list|show|cancel|delete
                                       the API's client (palimpsest/client.py), over HTTP
    palimpsest edit|stats|sample       the rewriting engine, locally (rewriting/cli.py)

Every command reads the same ``PALIMPSEST_*`` settings (palimpsest/config.py).
This module imports neither torch nor Flask: ``serve`` only starts processes, and the
other commands import what they need when they run.
"""
import ctypes
import functools
import importlib
import json
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import click

from palimpsest.config import load_settings

# Commands that live in rewriting/cli.py. That module imports torch, so it is loaded
# only when one of them runs (or for --help), never for serve/worker/db.
ENGINE_COMMANDS = {"edit": "rewriting.cli", "stats": "rewriting.cli", "sample": "rewriting.cli"}


class PalimpsestGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | {n for n in ENGINE_COMMANDS if self._engine_command(n)})

    def get_command(self, ctx, name):
        return super().get_command(ctx, name) or self._engine_command(name)

    @staticmethod
    def _engine_command(name):
        if name not in ENGINE_COMMANDS:
            return None
        try:
            module = importlib.import_module(ENGINE_COMMANDS[name])
        except ModuleNotFoundError as error:
            if error.name != ENGINE_COMMANDS[name]:
                raise  # rewriting/cli.py exists but something it imports is missing
            return None
        return getattr(module, name, None)


@click.group(cls=PalimpsestGroup)
def main():
    """Palimpsest: rewrite deep generative models, as a service."""


def data_dir() -> Path:
    path = Path(load_settings().data_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", "http_workers", default=2, show_default=True, type=click.IntRange(1),
              help="gunicorn worker processes.")
@click.option("--with-worker", is_flag=True,
              help="Also run a Celery worker (all queues, with the beat), stopped together with the server.")
def serve(host, port, http_workers, with_worker):
    """Run the HTTP API under gunicorn."""
    data_dir()
    commands = [[
        sys.executable, "-m", "gunicorn",
        "--bind", f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "--workers", str(http_workers),
        # Threads, not gunicorn's sync workers: a sync worker that spends over 30 s on one
        # request (a large checkpoint upload streaming to the store) is killed mid-upload.
        "--worker-class", "gthread", "--threads", "8",
        "--access-logfile", "-",
        "api:create_app()",
    ]]
    if with_worker:
        commands.append([sys.executable, "-m", "palimpsest", "worker", "--beat"])
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"Palimpsest API on http://{shown}:{port} (routes under /v1; reference: http://{shown}:{port}/docs)",
               err=True)
    sys.exit(run_together(commands))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--params", default='{"samples": 2000}', show_default=True,
              help="Hyperparameters of the demo edit, as JSON.")
def up(host, port, params):
    """Migrate, register the demo, start the API and a worker, run a real demo edit, keep serving."""
    from palimpsest.up import up as run_up

    sys.exit(run_up(load_settings(), host, port, json_object(params, "--params")))


@main.command()
@click.option("--queues", "-Q", default="gpu,cpu", show_default=True,
              help="Comma-separated queues to consume: gpu (rewriting jobs), cpu (the rest).")
@click.option("--concurrency", "-c", default=1, show_default=True, type=click.IntRange(1),
              help="Task processes. Keep 1 per GPU for the gpu queue.")
@click.option("--hostname", "-n", default=None, help="Node name (default celery@<host>).")
@click.option("--loglevel", "-l", default="info", show_default=True)
@click.option("--beat", "-B", is_flag=True,
              help="Also run the beat (the periodic reconciler) in this worker. Exactly one process of a "
                   "deployment should run it: this flag on one worker, or `palimpsest beat`.")
def worker(queues, concurrency, hostname, loglevel, beat):
    """Run a Celery worker (the same as `celery -A workers.main worker`)."""
    from workers.celery_app import QUEUES, make_celery

    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(names) - set(QUEUES))
    if not names or unknown:
        raise click.BadParameter(f"queues must be among {', '.join(QUEUES)}, not {', '.join(unknown) or 'none'}",
                                 param_hint="--queues")
    data_dir()
    argv = ["worker", f"--queues={','.join(names)}", f"--concurrency={concurrency}", f"--loglevel={loglevel}"]
    if hostname:
        argv.append(f"--hostname={hostname}")
    if beat:
        argv.append("--beat")
    make_celery(load_settings()).worker_main(argv)


@main.command()
@click.option("--loglevel", "-l", default="info", show_default=True)
def beat(loglevel):
    """Run the beat: it sends the periodic tasks (the reconciler, every
    PALIMPSEST_RECONCILE_INTERVAL_SECONDS). Run exactly one per deployment."""
    from workers.celery_app import make_celery

    data_dir()  # the schedule file lives there
    make_celery(load_settings()).start(["beat", f"--loglevel={loglevel}"])


@main.command()
@click.option("--all-queued", is_flag=True,
              help="Also re-send every queued job when the broker cannot be listed (not Redis, not the "
                   "embedded broker): for after its messages were lost. Duplicates are harmless.")
def reconcile(all_queued):
    """Re-send every job the database holds as queued or running with no live lease and no
    message in the broker, and statistics likewise; fail jobs whose workers died too often;
    sweep batches (recount, and re-send lost merges and webhooks). The beat runs the same
    pass periodically (docs/reliability.md)."""
    from workers.celery_app import make_celery
    from workers.reconcile import reconcile_once

    data_dir()
    celery = make_celery(load_settings())
    report = reconcile_once(celery.session_factory, celery, celery.settings, all_queued=all_queued)
    for job_id in report.resent_jobs:
        click.echo(f"re-sent job {job_id}")
    for job_id in report.failed_jobs:
        click.echo(f"failed job {job_id} (worker_lost)")
    for statistic_id in report.resent_statistics:
        click.echo(f"re-sent statistic {statistic_id}")
    click.echo(str(report), err=True)


@main.group()
def db():
    """The metadata database."""


@db.command()
@click.option("--revision", default="head", show_default=True)
def upgrade(revision):
    """Apply Alembic migrations up to REVISION."""
    from storage.migrate import upgrade as migrate_up

    data_dir()  # the default SQLite file lives there
    settings = load_settings()
    migrate_up(settings.database_url, revision)
    click.echo(f"database at {revision}", err=True)


@db.command()
@click.argument("revision")
def downgrade(revision):
    """Revert Alembic migrations down to REVISION (e.g. -1, base)."""
    from storage.migrate import downgrade as migrate_down

    migrate_down(load_settings().database_url, revision)
    click.echo(f"database at {revision}", err=True)


@contextmanager
def database_session():
    """A transaction on the configured metadata database, for the operator's commands."""
    from storage.db import make_engine, make_session_factory, session_scope

    data_dir()
    engine = make_engine(load_settings().database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            yield session
    finally:
        engine.dispose()


@main.group()
def keys():
    """API keys."""


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant name; made if it does not exist yet.")
@click.option("--name", default=None, help="A label for the key (e.g. where it is used).")
def create_key_command(tenant, name):
    """Print a new API key for TENANT. It is shown once: only its sha256 is stored."""
    from api.auth import create_key

    with database_session() as session:
        key, row = create_key(session, tenant, name)
        tenant_id = row.tenant_id
    click.echo(f"new key for tenant {tenant} ({tenant_id}); it is not stored, keep it:", err=True)
    click.echo(key)


@keys.command("list")
@click.option("--tenant", default=None, help="Only this tenant's keys.")
def list_keys_command(tenant):
    """List keys: tenant, prefix, name, created, revoked. The keys themselves are not stored."""
    from api.auth import key_rows

    with database_session() as session:
        rows = key_rows(session, tenant)
    for row in rows:
        revoked = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "live"
        click.echo(f"{row.tenant}\tplm_{row.prefix}\t{row.name or '-'}\t{row.created_at:%Y-%m-%d %H:%M}\t{revoked}")


@keys.command("revoke")
@click.argument("key")
def revoke_key_command(key):
    """Revoke KEY (the whole key, or plm_<prefix> as `keys list` shows it): the API refuses
    it from the next request on."""
    from api.auth import revoke_key

    with database_session() as session:
        done = revoke_key(session, key)
    if not done:
        raise click.ClickException(f"no live key matches {key!r}")
    click.echo(f"revoked {key[:16]}", err=True)


@main.group()
def models():
    """Models: list, upload, register the demo."""


@models.command("register-demo")
def register_demo_command():
    """Register the bundled demo generator (and segmenter) for every tenant; print its id."""
    from storage.db import make_engine, make_session_factory
    from storage.objects import open_store
    from workers.models import register_demo  # loads torch: a command, never the API

    data_dir()
    settings = load_settings()
    engine = make_engine(settings.database_url)
    try:
        model_id = register_demo(make_session_factory(engine),
                                 open_store(settings.storage_url, settings.s3_endpoint_url))
    except FileNotFoundError as error:
        raise click.ClickException(str(error)) from None
    finally:
        engine.dispose()
    click.echo(model_id)


# -- the API's client ---------------------------------------------------------------------

DEFAULT_API_URL = "http://127.0.0.1:8000"  # where `palimpsest serve` listens by default


def api_command(group, name):
    """A client command: --api and --key options, and API errors as one line (exit 1)."""
    def decorate(function):
        @group.command(name, help=function.__doc__)
        @click.option("--api", envvar="PALIMPSEST_API_URL", default=DEFAULT_API_URL, show_default=True,
                      help="API base URL (env PALIMPSEST_API_URL).")
        @click.option("--key", envvar="PALIMPSEST_API_KEY", default=None,
                      help="API key (env PALIMPSEST_API_KEY); from `palimpsest keys create`.")
        @functools.wraps(function)
        def command(api, key, **kwargs):
            from palimpsest.client import Client, ClientError

            try:
                return function(Client(api, key), **kwargs)
            except ClientError as error:
                raise click.ClickException(str(error)) from None
        return command
    return decorate


def echo_pages(fetch, filters, key, cursor, all_pages, as_json, format_rows, command):
    """Print a list route's page from ``cursor`` (or every page) of ``fetch(**filters,
    cursor=...)``, as JSON or a table; the command for the next page (the same filters)
    goes to stderr."""
    found = []
    while True:
        page = fetch(**filters, cursor=cursor)
        found += page[key]
        cursor = page["next_cursor"]
        if not all_pages or cursor is None:
            break
    click.echo(json.dumps({key: found, "next_cursor": cursor}, indent=2) if as_json else format_rows(found))
    if cursor is not None and not as_json:
        options = "".join(f" --{name} {shlex.quote(str(value))}" for name, value in filters.items() if value is not None)
        click.echo(f"more: {command}{options} --cursor {cursor}", err=True)


def json_object(value, what):
    try:
        obj = json.loads(value)
    except ValueError as error:
        raise click.BadParameter(f"not JSON: {error}", param_hint=what) from None
    if not isinstance(obj, dict):
        raise click.BadParameter("must be a JSON object", param_hint=what)
    return obj


@api_command(main, "submit")
@click.argument("request_file", type=click.File("r"))
@click.option("--model", required=True, help="Model id, or the name of one model (palimpsest models list).")
@click.option("--layer", default=None, help="Layer to edit (default: the request's own \"layer\").")
@click.option("--params", default=None, help='Hyperparameters as JSON, e.g. \'{"rank": 1, "steps": 500}\'.')
@click.option("--priority", default=None, type=click.IntRange(0, 9), help="0-9, higher runs sooner (default 5).")
@click.option("--base", "base_job", default=None, help="Start from this succeeded job's output.")
@click.option("--webhook", default=None, help="URL told when the job ends.")
@click.option("--idempotency-key", default=None, help="Resubmitting with the same key returns the same job.")
@click.option("--wait", is_flag=True, help="Follow the job until it ends, with a progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
def submit(client, request_file, model, layer, params, priority, base_job, webhook, idempotency_key, wait, as_json):
    """Submit an edit (REQUEST_FILE: native or original rewriting format) as a job."""
    from palimpsest.client import format_job

    body = {"model": client.resolve_model(model), "request": json_object(request_file.read(), "REQUEST_FILE")}
    for field, value in (("layer", layer), ("priority", priority), ("webhook", webhook)):
        if value is not None:
            body[field] = value
    if params is not None:
        body["params"] = json_object(params, "--params")
    if base_job is not None:
        body["base"] = {"job": base_job}
    job = client.submit(body, idempotency_key)
    click.echo(f"submitted {job['id']}", err=True)
    if wait:
        job = follow(client, job["id"])
    click.echo(json.dumps(job, indent=2) if as_json else format_job(job) if wait else job["id"])
    if wait and job["status"] != "succeeded":
        sys.exit(1)


def follow(client, job_id, interval=1.0):
    """Poll a job to its end, drawing one progress line (redrawn in place on a terminal)."""
    from palimpsest.client import format_progress

    tty = sys.stderr.isatty()
    last = [None]

    def update(job):
        line = format_progress(job)
        if tty:
            click.echo("\r\033[K" + line, nl=False, err=True)
        elif (job["status"], job["progress"]["phase"]) != last[0]:
            click.echo(line, err=True)
        last[0] = (job["status"], job["progress"]["phase"])

    job = client.wait(job_id, update, interval)
    if tty:
        click.echo("", err=True)
    return job


@api_command(main, "jobs")
@click.option("--status", default=None, type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]))
@click.option("--model", default=None, help="Only jobs on this model id.")
@click.option("--batch", default=None, help="Only jobs of this batch id.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 100), help="Jobs per page.")
@click.option("--cursor", default=None, help="Page to show (next_cursor of the previous one).")
@click.option("--all", "all_pages", is_flag=True, help="Every page.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def jobs(client, status, model, batch, limit, cursor, all_pages, as_json):
    """List your jobs, newest first."""
    from palimpsest.client import format_jobs

    echo_pages(client.jobs, dict(status=status, model=model, batch=batch, limit=limit),
               "jobs", cursor, all_pages, as_json, format_jobs, "palimpsest jobs")


@api_command(main, "show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(client, job_id, as_json):
    """Show a job: status, progress, error, metrics, artifacts."""
    from palimpsest.client import format_job

    job = client.job(job_id)
    click.echo(json.dumps(job, indent=2) if as_json else format_job(job))


@api_command(main, "cancel")
@click.argument("job_id")
def cancel(client, job_id):
    """Cancel a job: a queued one never runs, a running one stops at its next step."""
    job = client.cancel(job_id)
    click.echo(f"{job['id']} {job['status']}" + (" (stopping)" if job["status"] == "running" else ""))


@api_command(main, "delete")
@click.argument("job_id")
def delete_job(client, job_id):
    """Delete an ended job and its artifacts (a running one: cancel it first)."""
    client.delete_job(job_id)
    click.echo(f"{job_id} deleted")


@api_command(main, "download")
@click.argument("job_id")
@click.argument("name", type=click.Choice(["delta", "checkpoint", "preview", "metrics"]))
@click.option("--out", default=".", show_default=True, type=click.Path(dir_okay=True, writable=True),
              help="File to write, or a directory for <job>-<name>.<ext>.")
def download(client, job_id, name, out):
    """Download artifact NAME of a job (checked against its sha256)."""
    path, sha256, size = client.download(job_id, name, out)
    click.echo(f"{path}  {size} bytes  sha256 {sha256}")


@api_command(models, "list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_models(client, as_json):
    """Models you can use (yours and the shared ones)."""
    from palimpsest.client import format_models

    found = client.models()
    click.echo(json.dumps(found, indent=2) if as_json else format_models(found))


@api_command(models, "upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", default=None, help="Default: the file name.")
@click.option("--architecture", default=None, help="Default: the file's metadata.")
@click.option("--config", "config_json", default=None, help="Constructor arguments as JSON; default: the file's.")
def upload_model(client, path, name, architecture, config_json):
    """Upload a safetensors checkpoint (streamed); it is usable once a worker has inspected it."""
    model = client.upload_model(path, name=name, architecture=architecture, config=config_json)
    click.echo(f"{model['id']} {model['status']} sha256 {model['sha256']}")


@api_command(models, "delete")
@click.argument("model_id")
def delete_model(client, model_id):
    """Delete one of your models and its checkpoint (once no job names it)."""
    client.delete_model(model_id)
    click.echo(f"{model_id} deleted")


# -- batches ------------------------------------------------------------------------------

@main.group()
def batch():
    """Batches: many edits in one JSONL file (docs/batches.md)."""


@api_command(batch, "submit")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--merge", is_flag=True, help="Solve the edits on each model and layer jointly into one model.")
@click.option("--webhook", default=None, help="URL told when the batch ends (an allowed host).")
@click.option("--priority", default=None, type=click.IntRange(0, 9), help="0-9, higher runs sooner (default 2).")
@click.option("--wait", is_flag=True, help="Follow the batch until it ends, with a progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the batch as JSON.")
def submit_batch(client, path, merge, webhook, priority, wait, as_json):
    """Submit PATH, a JSONL file of {custom_id, model, layer, request, params} lines, as one batch.
    With --wait, exits 1 unless every edit succeeded."""
    from palimpsest.client import format_batch

    found = client.submit_batch(path, merge=merge or None, webhook=webhook, priority=priority)
    click.echo(f"submitted {found['id']} ({found['request_counts']['total']} edits)", err=True)
    if wait:
        found = follow_batch(client, found["id"])
    click.echo(json.dumps(found, indent=2) if as_json else format_batch(found) if wait else found["id"])
    counts = found["request_counts"]
    if wait and (found["status"] != "completed" or counts["succeeded"] != counts["total"]):
        sys.exit(1)


def follow_batch(client, batch_id, interval=1.0):
    """Poll a batch to its end, drawing a progress bar over its request counts (redrawn in
    place on a terminal, else a line whenever the counts change)."""
    from palimpsest.client import format_batch_progress

    tty = sys.stderr.isatty()
    last = [None]

    def update(found):
        line = format_batch_progress(found)
        if tty:
            click.echo("\r\033[K" + line, nl=False, err=True)
        elif line != last[0]:
            click.echo(line, err=True)
        last[0] = line

    found = client.wait_batch(batch_id, update, interval)
    if tty:
        click.echo("", err=True)
    return found


@api_command(batch, "results")
@click.argument("batch_id")
def batch_results(client, batch_id):
    """Write the batch's results as JSONL to stdout: one line per custom_id."""
    for line in client.batch_results(batch_id):
        click.echo(line, nl=False)  # bytes, as received


@api_command(batch, "list")
@click.option("--status", default=None, type=click.Choice(["validating", "in_progress", "finalizing", "completed",
                                                           "failed", "cancelling", "cancelled"]))
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 100), help="Batches per page.")
@click.option("--cursor", default=None, help="Page to show (next_cursor of the previous one).")
@click.option("--all", "all_pages", is_flag=True, help="Every page.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_batches(client, status, limit, cursor, all_pages, as_json):
    """List your batches, newest first."""
    from palimpsest.client import format_batches

    echo_pages(client.batches, dict(status=status, limit=limit),
               "batches", cursor, all_pages, as_json, format_batches, "palimpsest batch list")


@api_command(batch, "show")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show_batch(client, batch_id, as_json):
    """Show a batch: status and request counts."""
    from palimpsest.client import format_batch

    found = client.batch(batch_id)
    click.echo(json.dumps(found, indent=2) if as_json else format_batch(found))


@api_command(batch, "cancel")
@click.argument("batch_id")
def cancel_batch(client, batch_id):
    """Cancel a batch: queued edits never run, running ones stop at their next step."""
    found = client.cancel_batch(batch_id)
    click.echo(f"{found['id']} {found['status']}")


@api_command(batch, "delete")
@click.argument("batch_id")
def delete_batch(client, batch_id):
    """Delete an ended batch with its edits and their artifacts."""
    client.delete_batch(batch_id)
    click.echo(f"{batch_id} deleted")


# -- running several processes as one ------------------------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1


def _die_with_parent():
    """In the child, before exec: receive SIGTERM if this supervisor dies, even by
    SIGKILL, so that no server or worker outlives it (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run_together(commands: list[list[str]], grace_s: float = 30.0) -> int:
    """Run ``commands`` as child processes (same process group) until one exits or
    this process gets SIGTERM/SIGINT/SIGHUP; then stop the others with SIGTERM, and
    SIGKILL whatever is still running after ``grace_s``.

    Returns 0 when stopped by a signal, else the exit status of the first child to
    exit (128 + N if signal N killed it; 1 if it exited 0: a server should not stop
    by itself).
    """
    stop = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum)) for sig in STOP_SIGNALS}
    procs = []
    status = 0
    try:
        for command in commands:
            procs.append(subprocess.Popen(command, preexec_fn=_die_with_parent))
        while not stop:
            exited = [p for p in procs if p.poll() is not None]
            if exited:
                code = exited[0].returncode
                status = code if code > 0 else 128 - code if code < 0 else 1
                click.echo(f"{' '.join(exited[0].args[1:4])} exited ({code}); stopping the rest", err=True)
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace_s
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status
