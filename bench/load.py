"""Load generator: submit edit jobs to a running API as fast as it takes them (prints figures).

    python bench/load.py --api http://127.0.0.1:8000 --key plm_... --model mdl_... \\
        [--layer layer3] [--count 10000] [--concurrency 16] [--max-seconds 300]

Bounded in count and in time: it stops after ``count`` submissions or ``max_seconds``,
whichever comes first. Each of ``concurrency`` threads keeps one HTTP/1.1 connection
open (``http.client``: little CPU per request, so that on a small machine the server,
not the generator, is measured) and posts ``POST /v1/jobs`` one after another. Every
answer is kept: the status, the job id of a 202, and the latency (from the request
being sent to the whole answer being read). tests/reliability/test_load.py imports
``run_load``; the figures are in docs/reliability.md.
"""
import argparse
import http.client
import json
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# A small copy edit; ``samples`` and ``steps`` keep a run of it short (the drain runs them).
DEFAULT_REQUEST = {
    "operation": "copy",
    "copy": {"seed": 1, "mask": [0.0, 0.0, 0.5, 0.5]},
    "paste": {"seed": 2, "mask": [0.5, 0.5, 1.0, 1.0]},
}
DEFAULT_PARAMS = {"samples": 64, "steps": 5, "held_out": 1}


@dataclass
class LoadResult:
    count: int  # requests sent
    seconds: float  # from the first request sent to the last answer read
    statuses: Counter = field(default_factory=Counter)
    job_ids: list = field(default_factory=list)  # of the 202 answers
    latencies_ms: list = field(default_factory=list)  # of every answer
    errors: list = field(default_factory=list)  # connection failures and non-202 answers (first few)

    @property
    def accepted(self) -> int:
        return self.statuses[202]

    @property
    def throughput(self) -> float:
        """Accepted submissions per second."""
        return self.accepted / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]

    def summary(self) -> dict:
        return {"sent": self.count, "accepted": self.accepted, "statuses": dict(self.statuses),
                "seconds": round(self.seconds, 2), "throughput_per_s": round(self.throughput, 1),
                "p50_ms": round(self.percentile(50), 1), "p99_ms": round(self.percentile(99), 1),
                "max_ms": round(max(self.latencies_ms, default=float("nan")), 1),
                "mean_ms": round(statistics.fmean(self.latencies_ms), 1) if self.latencies_ms else None}


def job_body(model: str, layer: str, request: dict | None = None, params: dict | None = None) -> dict:
    return {"model": model, "layer": layer, "request": request or DEFAULT_REQUEST,
            "params": DEFAULT_PARAMS if params is None else params}


def run_load(api_url: str, key: str, body: dict, count: int = 10_000, concurrency: int = 16,
             rate: float | None = None, max_seconds: float = 300.0, timeout: float = 30.0) -> LoadResult:
    """POST ``body`` to ``/v1/jobs`` ``count`` times over ``concurrency`` connections, or
    until ``max_seconds`` have passed; return every answer's status, id and latency.

    ``rate`` (submissions/s): the i-th request is due at ``i / rate`` seconds after the
    start (an open loop, as independent clients would send them), and its latency counts
    from when it was due, so a server that falls behind shows it in the latencies
    instead of slowing the generator down. Without ``rate``, each connection sends its
    next request as soon as the last is answered (a closed loop: the most it takes)."""
    parts = urlsplit(api_url)
    payload = json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
               "Content-Length": str(len(payload))}
    lock = threading.Lock()
    tickets = iter(range(count))  # each thread takes the next number; next() under the lock
    result = LoadResult(count=0, seconds=0.0)
    start = time.perf_counter()
    deadline = start + max_seconds

    def take() -> float | None:
        """When the next request is due (perf_counter), or None when the run is over."""
        with lock:
            if time.perf_counter() > deadline or (ticket := next(tickets, None)) is None:
                return None
            result.count += 1
        return start + ticket / rate if rate else time.perf_counter()

    def record(status, job_id, latency_ms, error=None):
        with lock:
            result.statuses[status] += 1
            if latency_ms is not None:
                result.latencies_ms.append(latency_ms)
            if job_id is not None:
                result.job_ids.append(job_id)
            if error is not None and len(result.errors) < 20:
                result.errors.append(error)

    def worker():
        connection = None
        while (due := take()) is not None:
            if connection is None:
                connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
            started = due
            try:
                connection.request("POST", "/v1/jobs", body=payload, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                connection = None  # the server closed it (keep-alive timeout, restart): open another
                record("connection_error", None, None, repr(error))
                continue
            latency_ms = (time.perf_counter() - started) * 1000
            if response.status == 202:
                record(202, json.loads(data)["id"], latency_ms)
            else:
                record(response.status, None, latency_ms, data[:300].decode(errors="replace"))
            if response.getheader("Connection", "").lower() == "close":
                connection.close()
                connection = None
        if connection is not None:
            connection.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max_seconds + timeout + 10)
    result.seconds = time.perf_counter() - start
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True, help="an API key (palimpsest keys create --tenant NAME)")
    parser.add_argument("--model", required=True, help="a ready model's id")
    parser.add_argument("--layer", default="layer3")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16, help="connections (threads)")
    parser.add_argument("--rate", type=float, default=None,
                        help="submissions per second to offer (open loop); default: as fast as answered")
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--params", default=json.dumps(DEFAULT_PARAMS), help="the jobs' params, as JSON")
    args = parser.parse_args(argv)
    result = run_load(args.api, args.key, job_body(args.model, args.layer, params=json.loads(args.params)),
                      args.count, args.concurrency, args.rate, args.max_seconds)
    print(json.dumps(result.summary(), indent=2))
    for error in result.errors[:5]:
        print("error:", error)


if __name__ == "__main__":
    main()
