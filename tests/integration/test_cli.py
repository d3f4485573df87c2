"""The `palimpsest` command line: argument checks, lazy engine commands, and the
supervisor behind `serve --with-worker`."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from click.testing import CliRunner

from palimpsest.cli import main, run_together

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def test_worker_refuses_unknown_queue():
    result = CliRunner().invoke(main, ["worker", "--queues", "gpu,fast"])
    assert result.exit_code == 2
    assert "fast" in result.output and "--queues" in result.output


def test_help_lists_service_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("serve", "worker", "db"):
        assert name in result.output


SERVE_HELP = """
import json, sys
from palimpsest.cli import main
main(["serve", "--help"], standalone_mode=False)
main(["worker", "--help"], standalone_mode=False)
print(json.dumps("torch" in sys.modules))
"""


def test_service_commands_do_not_import_torch():
    done = subprocess.run([sys.executable, "-c", SERVE_HELP], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) is False


@pytest.mark.skipif(importlib.util.find_spec("rewriting.cli") is None, reason="rewriting/cli.py not written yet")
def test_engine_commands_are_reachable():
    result = CliRunner().invoke(main, ["--help"])
    for name in ("edit", "stats", "sample"):
        assert name in result.output
        assert CliRunner().invoke(main, [name, "--help"]).exit_code == 0


def live_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


def test_run_together_stops_the_rest_when_one_exits():
    already = live_children()  # the session's own servers (an S3 server, say) are not ours to judge
    started = time.monotonic()
    status = run_together([SLEEPER, [sys.executable, "-c", "import sys; sys.exit(3)"]], grace_s=10)
    assert status == 3
    assert time.monotonic() - started < 15
    assert not live_children() - already


def test_run_together_stops_all_on_sigterm():
    children = []

    already = {p.pid for p in psutil.Process().children()}

    def ours():
        return [p for p in psutil.Process().children() if p.pid not in already]

    def stop_soon():
        wait = time.monotonic() + 20
        while len(ours()) < 2 and time.monotonic() < wait:
            time.sleep(0.05)
        children.extend(ours())
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=stop_soon, daemon=True).start()
    assert run_together([SLEEPER, SLEEPER], grace_s=10) == 0
    assert len(children) == 2
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert signal.getsignal(signal.SIGTERM) == before  # handler restored
