"""`palimpsest up`: the whole service on this machine, ending with a real edit.

What `make run` calls. On the configured settings (the embedded defaults unless
``PALIMPSEST_*`` say otherwise) it migrates the database, registers the bundled
demo generator, makes an API key for the tenant ``local`` (saved in the data
directory, mode 0600), starts ``palimpsest serve --with-worker``, submits the
bundled dome-to-spire edit through the HTTP API like any client, follows it to the
end, downloads its preview and checkpoint, says where they are, and keeps serving
until interrupted.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from palimpsest.client import Client, ClientError, format_progress

DEMO_REQUEST = Path(__file__).resolve().parent.parent / "demo" / "requests" / "dome_to_spire.json"
DEMO_TENANT = "local"


def prepare(settings) -> tuple[str, str]:
    """Migrate, register the demo, make a key; returns (demo model id, API key)."""
    from api.auth import create_key
    from storage.db import make_engine, make_session_factory, session_scope
    from storage.migrate import upgrade
    from storage.objects import open_store
    from workers.models import register_demo  # loads torch: this is a command, not the API

    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        session_factory = make_session_factory(engine)
        model_id = register_demo(session_factory, open_store(settings.storage_url, settings.s3_endpoint_url))
        with session_scope(session_factory) as session:
            key, _ = create_key(session, DEMO_TENANT, "palimpsest up")
    finally:
        engine.dispose()
    key_file = Path(settings.data_dir) / f"{DEMO_TENANT}.key"
    key_file.touch(mode=0o600)
    key_file.write_text(key + "\n")
    return model_id, key


def wait_ready(client: Client, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise click.ClickException(f"the server exited ({server.returncode}) before it was ready")
        try:
            if client.request("GET", "/v1/readyz").status_code == 200:
                return
        except ClientError:
            pass
        time.sleep(0.5)
    raise click.ClickException(f"{client.url}/v1/readyz did not answer 200 within {timeout:.0f} s")


def demo_edit(client: Client, model_id: str, out_dir: Path, params: dict) -> dict:
    """Submit the bundled edit, follow it with a progress line, download its results."""
    import json

    request = json.loads(DEMO_REQUEST.read_text())
    body = {"model": model_id, "layer": request.pop("layer"), "request": request, "params": params}
    job = client.submit(body)
    click.echo(f"submitted the demo edit (dome -> spire) as {job['id']}", err=True)
    job = client.wait(job["id"], on_update=lambda j: click.echo("\r\033[K" + format_progress(j), nl=False, err=True))
    click.echo("", err=True)
    if job["status"] != "succeeded":
        error = job.get("error") or {}
        raise click.ClickException(f"demo edit {job['status']}: {error.get('code')}: {error.get('message')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, suffix in (("preview", ".png"), ("checkpoint", ".safetensors"), ("metrics", ".json")):
        path, _, _ = client.download(job["id"], name, out_dir / f"dome_to_spire{suffix}")
        click.echo(f"  {name:<10} {path}")
    return job


def up(settings, host: str, port: int, params: dict) -> int:
    model_id, key = prepare(settings)
    url = f"http://{host}:{port}"
    log_path = Path(settings.data_dir) / "logs" / "serve.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:  # the server's and worker's logs; the terminal keeps the progress line
        server = subprocess.Popen(
            [sys.executable, "-m", "palimpsest", "serve", "--with-worker", "--host", host, "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own group: stopped whole, with its worker
        )

    def stop(*_):
        try:
            os.killpg(server.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        client = Client(url, key)
        wait_ready(client, server)
        click.echo(f"Palimpsest is up at {url} (routes under /v1; docs: {url}/docs); API key for tenant "
                   f"'{DEMO_TENANT}' in {Path(settings.data_dir) / (DEMO_TENANT + '.key')}; logs in {log_path}")
        job = demo_edit(client, model_id, Path(settings.data_dir) / "demo", params)
        metrics = job.get("metrics") or {}
        figures = {**metrics, **(metrics.get("segmenter") or {})}
        names = ("initial_loss", "constraint_loss", "held_out_change", "edit_success", "unwanted_pixel_change")
        click.echo(f"demo edit {job['id']} succeeded: "
                   + ", ".join(f"{k} {figures[k]:.3f}" for k in names if isinstance(figures.get(k), (int, float))))
        click.echo("before/after image: the preview above; rewritten checkpoint: the checkpoint above. "
                   "Still serving; Ctrl-C stops.")
        return server.wait()
    except BaseException:
        stop()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
