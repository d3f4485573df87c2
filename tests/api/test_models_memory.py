"""A 1 GB checkpoint upload through `palimpsest serve` (gunicorn) keeps the API worker
process under 200 MB resident: the body streams from the socket to the store.

Slow (about a minute: 1 GiB hashed, written and fsynced); run with --run-slow. It prints
the figures: the worker's resident memory before the upload and its peak (VmHWM).
"""
import json
import struct
import threading
import time
from pathlib import Path

import psutil
import pytest

from api.auth import create_key
from palimpsest.client import Client
from stack import embedded_stack
from storage.db import make_engine, make_session_factory, session_scope

LIMIT_BYTES = 200 * 1000 * 1000


def sparse_safetensors(path: Path, data_bytes: int) -> int:
    """A valid safetensors file holding one zero U8 tensor of ``data_bytes`` (sparse on disk)."""
    header = json.dumps({"__metadata__": {"architecture": "demo-gan"},
                         "w": {"dtype": "U8", "shape": [data_bytes], "data_offsets": [0, data_bytes]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header)) + header)
        file.truncate(8 + len(header) + data_bytes)
    return path.stat().st_size


def peak_rss(pid: int) -> int:
    """VmHWM: the process's peak resident set since it started, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


@pytest.mark.slow
@pytest.mark.integration
def test_one_gigabyte_upload_stays_under_200_mb(tmp_path):
    stack = embedded_stack(tmp_path)
    stack.migrate()
    engine = make_engine(stack.settings.database_url)
    with session_scope(make_session_factory(engine)) as session:
        key, _ = create_key(session, "big uploads")
    engine.dispose()
    server = stack.start_server()
    try:
        master = psutil.Process(server.pid)
        workers = [p for p in master.children(recursive=True) if "gunicorn" in " ".join(p.cmdline())
                   and p.parent().pid != server.pid]
        assert len(workers) == 1, [p.cmdline() for p in master.children(recursive=True)]
        worker = workers[0]
        client = Client(server.url, key, timeout=600)
        client.models()  # a first request: the worker has loaded everything it needs
        before = worker.memory_info().rss
        size = sparse_safetensors(tmp_path / "big.safetensors", 1024**3)
        samples, done = [], threading.Event()

        def sample():
            while not done.is_set():
                samples.append(worker.memory_info().rss)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        try:
            model = client.upload_model(tmp_path / "big.safetensors", name="big")
        finally:
            done.set()
            sampler.join()
        seconds = time.monotonic() - started
        peak = peak_rss(worker.pid)
        print(f"\n1 GiB upload ({size} bytes) in {seconds:.1f} s: API worker RSS {before / 1e6:.0f} MB before, "
              f"{max(samples) / 1e6:.0f} MB highest sampled, peak (VmHWM) {peak / 1e6:.0f} MB")
        assert model["size"] == size and model["status"] == "pending"
        assert peak < LIMIT_BYTES, f"API worker peaked at {peak / 1e6:.0f} MB"
    finally:
        stack.stop_all()
