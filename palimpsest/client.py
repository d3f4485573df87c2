"""A small HTTP client of the Palimpsest API, and the text the CLI prints.

``palimpsest submit / jobs / show / cancel / delete / download / models / batch`` use it (palimpsest/cli.py).
Errors come back as ``ApiError`` (the server's ``{"error": {code, message, field}}``)
or ``Unreachable``; the CLI prints them on one line and exits 1.

Downloads follow the API's redirect by hand: a presigned S3 URL must be fetched without
our Authorization header (S3 refuses a request signed twice, and the key must not leave
for another host), and the file is streamed to disk and checked against its sha256.
"""
import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from urllib.parse import urljoin

import requests

DEFAULT_URL = "http://127.0.0.1:8000"
CHUNK_SIZE = 1024 * 1024
TERMINAL = ("succeeded", "failed", "cancelled")
BATCH_TERMINAL = ("completed", "failed", "cancelled")
MAX_DETAILS_SHOWN = 20  # a refused batch's bad lines printed by the CLI
BATCH_SUBMIT_TIMEOUT = 600.0  # seconds


class ClientError(Exception):
    """Anything the CLI reports as one line and exit status 1."""


class Unreachable(ClientError):
    pass


class ApiError(ClientError):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, details: list | None = None):
        where = f" (field {field})" if field else ""
        lines = [f"\n  line {d.get('line')}" + (f", {d['field']}" if d.get("field") else "") + f": {d.get('message')}"
                 for d in (details or [])[:MAX_DETAILS_SHOWN]]
        if details and len(details) > MAX_DETAILS_SHOWN:
            lines.append(f"\n  ... and {len(details) - MAX_DETAILS_SHOWN} more")
        super().__init__(f"{status} {code}: {message}{where}" + "".join(lines))
        self.status, self.code, self.message, self.field, self.details = status, code, message, field, details


class Client:
    def __init__(self, url: str = DEFAULT_URL, key: str | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/").removesuffix("/v1")  # every path names /v1 itself
        self.timeout = timeout
        self.session = requests.Session()
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        """``method path``; a 4xx/5xx answer raises ``ApiError``."""
        try:
            response = self.session.request(method, urljoin(self.url + "/", path.lstrip("/")),
                                            timeout=kwargs.pop("timeout", self.timeout), **kwargs)
        except requests.ConnectionError as error:
            raise Unreachable(f"cannot reach the Palimpsest API at {self.url} (is `palimpsest serve` running? "
                              f"set --api or PALIMPSEST_API_URL): {error.__class__.__name__}") from None
        except requests.Timeout:
            raise Unreachable(f"the Palimpsest API at {self.url} did not answer within {self.timeout:.0f} s") from None
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                raise ApiError(response.status_code, error["code"], error["message"], error.get("field"),
                               error.get("details"))
            except (ValueError, KeyError, TypeError):
                raise ApiError(response.status_code, "http_error", response.text[:200] or response.reason) from None
        return response

    # -- jobs --------------------------------------------------------------------------

    def submit(self, body: dict, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/v1/jobs", json=body, headers=headers).json()

    def jobs(self, **filters) -> dict:
        params = {k: v for k, v in filters.items() if v is not None}
        return self.request("GET", "/v1/jobs", params=params).json()

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def delete_job(self, job_id: str) -> None:
        self.request("DELETE", f"/v1/jobs/{job_id}")

    def events(self, job_id: str, after: int = 0) -> list[dict]:
        return self.request("GET", f"/v1/jobs/{job_id}/events", params={"after": after}).json()["events"]

    def wait(self, job_id: str, on_update=None, interval: float = 1.0, timeout: float | None = None) -> dict:
        """Poll until the job ends; ``on_update(job)`` after each poll. Returns the final job."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(f"job {job_id} still {job['status']} after {timeout:.0f} s")
            time.sleep(interval)

    def download(self, job_id: str, name: str, out: str | os.PathLike) -> tuple[Path, str, int]:
        """Save artifact ``name`` of the job at ``out``; returns (path, sha256, size). The file
        appears only once complete and checked against the sha256 the API recorded."""
        artifacts = {a["name"]: a for a in self.job(job_id)["artifacts"]}
        if name not in artifacts:
            raise ClientError(f"job {job_id} has no artifact {name!r}; it has: {', '.join(artifacts) or 'none'}")
        expected = artifacts[name]["sha256"]
        response = self.request("GET", f"/v1/jobs/{job_id}/artifacts/{name}", stream=True, allow_redirects=False)
        if response.is_redirect:
            location = response.headers["Location"]
            response.close()
            try:  # a presigned URL: no API key goes along
                response = requests.get(location, stream=True, timeout=self.timeout)
            except requests.RequestException as error:
                raise Unreachable(f"cannot download from the object store: {error}") from None
            if response.status_code != 200:
                raise ClientError(f"the object store answered {response.status_code} for {name}")
        path = Path(out)
        if path.is_dir():
            path = path / f"{job_id}-{name}{EXTENSIONS.get(name, '')}"
        partial = path.with_name(f".{path.name}.partial-{secrets.token_hex(4)}")
        digest, size = hashlib.sha256(), 0
        try:
            with response, open(partial, "wb") as file:
                try:
                    for chunk in response.iter_content(CHUNK_SIZE):
                        digest.update(chunk)
                        file.write(chunk)
                        size += len(chunk)
                except requests.RequestException as error:
                    raise ClientError(f"download of {name} broke off after {size} bytes: {error}") from None
            if digest.hexdigest() != expected:
                raise ClientError(f"downloaded {name} has sha256 {digest.hexdigest()}, the API recorded {expected}")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path, expected, size

    # -- batches -----------------------------------------------------------------------

    def submit_batch(self, path: str | os.PathLike, merge: bool | None = None, webhook: str | None = None,
                     priority: int | None = None) -> dict:
        """Submit a JSONL file of edits, streamed from disk, as one batch."""
        params = {"merge": None if merge is None else str(merge).lower(), "webhook": webhook, "priority": priority}
        with open(path, "rb") as file:
            # the server validates, inserts and queues every line before it answers: minutes for a large batch
            return self.request("POST", "/v1/batches", data=file, headers={"Content-Type": "application/jsonl"},
                                params={k: v for k, v in params.items() if v is not None},
                                timeout=max(self.timeout, BATCH_SUBMIT_TIMEOUT)).json()

    def batches(self, **filters) -> dict:
        return self.request("GET", "/v1/batches", params={k: v for k, v in filters.items() if v is not None}).json()

    def batch(self, batch_id: str) -> dict:
        return self.request("GET", f"/v1/batches/{batch_id}").json()

    def cancel_batch(self, batch_id: str) -> dict:
        return self.request("POST", f"/v1/batches/{batch_id}/cancel").json()

    def delete_batch(self, batch_id: str) -> None:
        self.request("DELETE", f"/v1/batches/{batch_id}")

    def batch_results(self, batch_id: str):
        """The results JSONL, line by line (bytes, newline included), as it streams in."""
        response = self.request("GET", f"/v1/batches/{batch_id}/results", stream=True)
        with response:
            try:
                for line in response.iter_lines():
                    if line:
                        yield line + b"\n"
            except requests.RequestException as error:
                raise ClientError(f"the results of batch {batch_id} broke off: {error}") from None

    def wait_batch(self, batch_id: str, on_update=None, interval: float = 1.0, timeout: float | None = None) -> dict:
        """Poll until the batch ends; ``on_update(batch)`` after each poll. Returns the final batch."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self.batch(batch_id)
            if on_update is not None:
                on_update(batch)
            if batch["status"] in BATCH_TERMINAL:
                return batch
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(f"batch {batch_id} still {batch['status']} after {timeout:.0f} s")
            time.sleep(interval)

    # -- models ------------------------------------------------------------------------

    def models(self) -> list[dict]:
        return self.request("GET", "/v1/models").json()["models"]

    def delete_model(self, model_id: str) -> None:
        self.request("DELETE", f"/v1/models/{model_id}")

    def resolve_model(self, model: str) -> str:
        """A model id, or the name of exactly one model this key can see."""
        if model.startswith("mdl_"):
            return model
        named = [m["id"] for m in self.models() if m["name"] == model]
        if len(named) != 1:
            raise ClientError(f"{len(named)} models are named {model!r}; give the id (palimpsest models list)")
        return named[0]

    def upload_model(self, path: str | os.PathLike, **fields) -> dict:
        """Upload a checkpoint, streamed from disk (never read whole into memory)."""
        fields = {k: v for k, v in fields.items() if v is not None}
        if quoted_filename(Path(path).name) != Path(path).name:
            fields.setdefault("name", Path(path).name)  # the server would take the escaped name
        body = MultipartFile(path, fields)
        return self.request("POST", "/v1/models", data=body,
                            headers={"Content-Type": body.content_type}).json()


EXTENSIONS = {"delta": ".safetensors", "checkpoint": ".safetensors", "preview": ".png", "metrics": ".json"}


def quoted_filename(name: str) -> str:
    """``name`` as a quoted multipart ``filename``: a quote or line break would end the
    header early, so they are percent-escaped as browsers do (WHATWG)."""
    return name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


class MultipartFile:
    """A ``multipart/form-data`` body of small fields and one file part named ``file``,
    read from disk in chunks. ``requests`` streams it (it has ``__iter__`` and a length)."""

    def __init__(self, path: str | os.PathLike, fields: dict[str, str]):
        self.path = Path(path)
        boundary = secrets.token_hex(16)
        self.content_type = f"multipart/form-data; boundary={boundary}"
        head = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
                        for name, value in fields.items())
        head += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="{quoted_filename(self.path.name)}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n").encode()
        self._head, self._tail = head, f"\r\n--{boundary}--\r\n".encode()
        self._length = len(head) + self.path.stat().st_size + len(self._tail)

    def __len__(self) -> int:
        return self._length

    def __iter__(self):
        yield self._head
        with open(self.path, "rb") as file:
            while chunk := file.read(CHUNK_SIZE):
                yield chunk
        yield self._tail


# -- what the CLI prints ----------------------------------------------------------------

def format_progress(job: dict, width: int = 24) -> str:
    """One line: status, phase, a bar when the step count is known, loss."""
    progress = job["progress"]
    parts = [job["status"]]
    if job["status"] == "running" and progress["phase"]:
        parts.append(progress["phase"])
    step, total = progress["step"], progress["total"]
    if job["status"] == "running" and step is not None and total:
        filled = min(width, round(width * step / total))
        parts.append(f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total}")
    if progress["loss"] is not None and job["status"] == "running":
        parts.append(f"loss {progress['loss']:.4g}")
    if job.get("cancel_requested") and job["status"] == "running":
        parts.append("(cancelling)")
    return " ".join(parts)


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [header] + rows
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in lines)


def format_jobs(jobs: list[dict]) -> str:
    if not jobs:
        return "no jobs"
    rows = []
    for job in jobs:
        progress = job["progress"]
        step = f"{progress['step']}/{progress['total']}" if progress["step"] is not None and progress["total"] else ""
        rows.append([job["id"], job["status"], (progress["phase"] or "") if job["status"] == "running" else "", step,
                     f"{progress['loss']:.4g}" if progress["loss"] is not None else "", job["model"], job["layer"],
                     job["created_at"][:19].replace("T", " ")])
    return format_table(rows, ["ID", "STATUS", "PHASE", "STEP", "LOSS", "MODEL", "LAYER", "CREATED (UTC)"])


def format_job(job: dict) -> str:
    lines = [f"job       {job['id']}",
             f"status    {format_progress(job)}",
             f"model     {job['model']}  layer {job['layer']}  priority {job['priority']}"]
    if job["base_job"]:
        lines.append(f"base      {job['base_job']}")
    if job["batch"]:
        lines.append(f"batch     {job['batch']}")
    for label, key in (("created", "created_at"), ("started", "started_at"), ("finished", "finished_at")):
        if job[key]:
            lines.append(f"{label:<9} {job[key]}")
    if job["error"]:
        lines.append(f"error     {job['error']['code']}: {job['error']['message']}")
    if job["metrics"]:
        lines.append("metrics   " + json.dumps(job["metrics"], sort_keys=True))
    for artifact in job["artifacts"]:
        lines.append(f"artifact  {artifact['name']:<10} {_size(artifact['size']):>9}  sha256 {artifact['sha256']}")
    return "\n".join(lines)


def format_batch_progress(batch: dict, width: int = 24) -> str:
    """One line: status, a bar over the members that have ended, and the counts."""
    counts = batch["request_counts"]
    ended = counts["succeeded"] + counts["failed"] + counts["cancelled"]
    total = counts["total"] or 1
    filled = min(width, round(width * ended / total))
    return (f"{batch['status']} [{'#' * filled}{'.' * (width - filled)}] {ended}/{counts['total']} "
            f"({counts['succeeded']} succeeded, {counts['failed']} failed, {counts['cancelled']} cancelled)")


def format_batches(batches: list[dict]) -> str:
    if not batches:
        return "no batches"
    rows = [[b["id"], b["status"], str(b["request_counts"]["total"]), str(b["request_counts"]["succeeded"]),
             str(b["request_counts"]["failed"]), str(b["request_counts"]["cancelled"]), "yes" if b["merge"] else "",
             b["created_at"][:19].replace("T", " ")] for b in batches]
    return format_table(rows, ["ID", "STATUS", "TOTAL", "SUCCEEDED", "FAILED", "CANCELLED", "MERGE", "CREATED (UTC)"])


def format_batch(batch: dict) -> str:
    lines = [f"batch     {batch['id']}",
             f"status    {format_batch_progress(batch)}",
             f"priority  {batch['priority']}  merge {'yes' if batch['merge'] else 'no'}"]
    if batch["webhook"]:
        lines.append(f"webhook   {batch['webhook']}")
    for label, key in (("created", "created_at"), ("finished", "finished_at")):
        if batch[key]:
            lines.append(f"{label:<9} {batch[key]}")
    if batch["error"]:
        lines.append(f"error     {batch['error']['code']}: {batch['error']['message']}")
    return "\n".join(lines)


def format_models(models: list[dict]) -> str:
    if not models:
        return "no models"
    rows = [[m["id"], m["name"], m["status"], m["architecture"], _size(m["size"]), str(len(m["layers"])),
             "yes" if m["shared"] else ""] for m in models]
    return format_table(rows, ["ID", "NAME", "STATUS", "ARCHITECTURE", "SIZE", "LAYERS", "SHARED"])


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
