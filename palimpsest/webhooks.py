"""Webhook URLs and signatures, shared by the API (which refuses a URL whose host is not
allowed), the sender (``workers/webhooks.py``, which checks again and signs) and anyone
who receives them (``verify``). Standard library only: no Flask, no torch.

Every webhook is a POST with a JSON body and the header::

    Palimpsest-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">

keyed with ``PALIMPSEST_WEBHOOK_SECRET``. A receiver recomputes the HMAC over the exact
bytes it received, compares in constant time, and refuses an old ``t`` (replays): that is
``verify(secret, header, body)``.
"""
import hashlib
import hmac
import time
from urllib.parse import urlsplit

SIGNATURE_HEADER = "Palimpsest-Signature"
TOLERANCE_SECONDS = 300  # how old a signature ``verify`` accepts
MAX_URL_LENGTH = 2048  # Job.webhook_url, Batch.webhook_url


class InvalidSignature(Exception):
    pass


def url_problem(url, allowed_hosts) -> str | None:
    """Why ``url`` may not receive webhooks, or None when it may.

    It must be a plain http(s) URL (no user name or password, no backslash, no spaces:
    forms that parsers read differently) whose host is on ``allowed_hosts``: an exact
    name or address (case-insensitive), or ``*.example.com`` for its subdomains. An empty
    allow-list allows nothing.
    """
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        return f"must be an http(s) URL of at most {MAX_URL_LENGTH} characters"
    if not url.isascii() or not url.isprintable() or any(c in url for c in " \\"):
        return "must be a plain ASCII URL without spaces or backslashes"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # a malformed port raises here
    except ValueError:
        return f"is not a valid URL: {url!r}"
    if parts.scheme not in ("http", "https") or not host:
        return f"must be an http(s) URL with a host, not {url!r}"
    if "@" in parts.netloc:
        return "must not carry a user name or password"
    if not host_allowed(host, allowed_hosts):
        allowed = ", ".join(allowed_hosts) if allowed_hosts else "none (PALIMPSEST_WEBHOOK_ALLOWED_HOSTS is empty)"
        return f"host {host!r} is not on the webhook allow-list; allowed: {allowed}"
    return None


def host_allowed(host: str, allowed_hosts) -> bool:
    host = host.lower().rstrip(".")
    for allowed in allowed_hosts:
        allowed = allowed.lower().rstrip(".")
        if allowed.startswith("*."):
            if host.endswith(allowed[1:]) and host != allowed[2:]:
                return True
        elif host == allowed:
            return True
    return False


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>.<body>"``."""
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``Palimpsest-Signature`` header value for ``body``."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    return f"t={timestamp},v1={signature(secret, body, timestamp)}"


def verify(secret: str, header: str, body: bytes, tolerance: float = TOLERANCE_SECONDS,
           now: float | None = None) -> int:
    """Check a ``Palimpsest-Signature`` header against the body received; return its
    timestamp. Raises ``InvalidSignature`` when it does not match or is too old."""
    try:
        fields = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(fields["t"])
        given = fields["v1"]
    except (ValueError, KeyError, AttributeError):
        raise InvalidSignature("malformed signature header") from None
    if not hmac.compare_digest(given, signature(secret, body, timestamp)):
        raise InvalidSignature("signature does not match the body")
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance:
        raise InvalidSignature(f"signature timestamp {timestamp} is more than {tolerance:.0f} s from now")
    return timestamp
