"""The pool process's SIGTERM handler: a group's SIGTERM waits for the warm shutdown; any
other goes to the handler it replaced. The real signals are in
tests/reliability/test_fault_shutdown.py; here the handler is called directly."""
import signal
import threading
import time

import pytest

from workers.heartbeat import ShutdownNotice, sigterm_handler


@pytest.fixture
def previous():
    calls = []

    def billiards(signum, frame):
        calls.append(signum)

    original = signal.getsignal(signal.SIGTERM)
    billiards.calls = calls
    yield billiards
    signal.signal(signal.SIGTERM, original)


def test_a_sigterm_during_a_warm_shutdown_is_deferred_once(previous):
    notice = ShutdownNotice()
    notice.announce()
    sigterm_handler(notice, previous)(signal.SIGTERM, None)
    assert previous.calls == []
    # a second SIGTERM goes to the handler it replaced
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_sigterm_without_a_warm_shutdown_goes_to_the_replaced_handler(previous):
    start = time.monotonic()
    sigterm_handler(ShutdownNotice(), previous, wait_s=0.2)(signal.SIGTERM, None)
    assert previous.calls == [signal.SIGTERM]
    assert 0.2 <= time.monotonic() - start < 1.0


def test_the_notice_is_waited_for(previous):
    notice = ShutdownNotice()
    threading.Timer(0.1, notice.announce).start()
    start = time.monotonic()
    sigterm_handler(notice, previous, wait_s=5.0)(signal.SIGTERM, None)
    assert previous.calls == []
    assert time.monotonic() - start < 1.0


def test_only_a_warm_shutdown_is_announced(tmp_path):
    from palimpsest.config import load_settings
    from workers.celery_app import announce_shutdown, make_celery

    app = make_celery(load_settings({"PALIMPSEST_DATA_DIR": str(tmp_path / "var")}))
    with app:  # the current app, as in the worker's main process
        announce_shutdown(how="Cold")
        assert not app.shutdown_notice.wait(0)
        announce_shutdown(how="Warm")
        assert app.shutdown_notice.wait(0)
