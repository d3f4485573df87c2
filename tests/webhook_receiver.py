"""A real HTTP server on 127.0.0.1 that receives webhooks, for tests.

    with Receiver(answers=[500, 200]) as receiver:   # first request 500, then 200 for ever
        ... receiver.url ...
        receiver.wait_for(2)
        receiver.requests   # [Received(path, headers, body, at), ...]

``answers`` are status codes, or (status, {header: value}) pairs (a redirect, say);
the last one repeats.
"""
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict
    body: bytes
    at: float  # time.monotonic() when it arrived


class Receiver:
    def __init__(self, answers=(200,)):
        self.answers = list(answers)
        self.requests: list[Received] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.requests.append(Received(self.path, dict(self.headers), body, time.monotonic()))
                    answer = receiver.answers[min(len(receiver.requests), len(receiver.answers)) - 1]
                status, headers = answer if isinstance(answer, tuple) else (answer, {})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, count: int, timeout: float = 60.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.requests)} of {count} webhook requests arrived within {timeout:.0f} s")
            time.sleep(0.05)
        return list(self.requests)
