"""API keys: ``Authorization: Bearer <key>`` on every ``/v1`` route but the public ones.

A key reads ``plm_<prefix>_<secret>``. The database keeps only the key's sha256 and its
``prefix`` (to find the row), so a copy of the database gives no usable key. The key is
checked before any view runs: a route added later is protected unless it is listed in
``PUBLIC_ENDPOINTS``. The request's tenant is then ``current_tenant_id()``.

``create_key``, ``key_rows`` and ``revoke_key`` are what ``palimpsest keys create|list|revoke``
run; they need no Flask app.
"""
import hashlib
import hmac
import re
import secrets

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import Unauthorized
from storage.models import ApiKey, Tenant, utcnow

KEY_FORMAT = re.compile(r"^plm_([0-9a-f]{12})_[A-Za-z0-9_-]{43}$")
# Blueprint endpoints that answer without a key: probes and the API's own description.
PUBLIC_ENDPOINTS = {"health.healthz", "health.readyz", "openapi.openapi_json", "openapi.docs"}


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh key and its lookup prefix."""
    prefix = secrets.token_hex(6)
    return f"plm_{prefix}_{secrets.token_urlsafe(32)}", prefix


def create_key(session: Session, tenant_name: str, key_name: str | None = None) -> tuple[str, ApiKey]:
    """Add a key for the tenant called ``tenant_name`` (made if missing); return the clear
    key, which is not kept anywhere, and its row. The caller commits."""
    tenant = session.scalars(select(Tenant).where(Tenant.name == tenant_name)).first()
    if tenant is None:
        try:
            with session.begin_nested():
                tenant = Tenant(name=tenant_name)
                session.add(tenant)
        except IntegrityError:
            # Another ``keys create`` made the tenant since our select (names are unique).
            tenant = session.scalars(select(Tenant).where(Tenant.name == tenant_name)).one()
    key, prefix = new_key()
    row = ApiKey(tenant_id=tenant.id, name=key_name, prefix=prefix, key_sha256=key_sha256(key))
    session.add(row)
    session.flush()
    return key, row


def key_rows(session: Session, tenant_name: str | None = None) -> list:
    """(tenant name, prefix, name, created_at, revoked_at) of every key, or one tenant's."""
    query = (select(Tenant.name.label("tenant"), ApiKey.prefix, ApiKey.name, ApiKey.created_at, ApiKey.revoked_at)
             .join(Tenant, Tenant.id == ApiKey.tenant_id).order_by(Tenant.name, ApiKey.created_at))
    if tenant_name is not None:
        query = query.where(Tenant.name == tenant_name)
    return list(session.execute(query))


def revoke_key(session: Session, key_or_prefix: str) -> bool:
    """Revoke a key named by the whole key, or by ``plm_<prefix>`` as ``keys list`` shows it
    (or the bare 12-digit prefix); False when no live key matches. The API refuses it from
    the next request on: keys are checked on every request, never cached."""
    match = KEY_FORMAT.fullmatch(key_or_prefix)
    prefix = match.group(1) if match else key_or_prefix.removeprefix("plm_")
    return session.execute(update(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
                           .values(revoked_at=utcnow())).rowcount == 1


def tenant_for_key(session: Session, key: str) -> str | None:
    """The tenant id a live key belongs to, or None for an unknown, malformed or revoked key."""
    match = KEY_FORMAT.fullmatch(key)
    if match is None:
        return None
    # Three columns, not the ORM entity: this runs on every request.
    row = session.execute(select(ApiKey.tenant_id, ApiKey.key_sha256, ApiKey.revoked_at)
                          .where(ApiKey.prefix == match.group(1))).first()
    if row is None or row.revoked_at is not None:
        return None
    return row.tenant_id if hmac.compare_digest(row.key_sha256, key_sha256(key)) else None


def authenticate():
    """``before_request``: find the tenant of the request's key, or answer 401."""
    from flask import g, request

    from storage.db import get_session

    # Unknown routes keep their 404 (and wrong methods their 405); public routes need no key.
    if request.routing_exception is not None or request.endpoint in PUBLIC_ENDPOINTS:
        return
    if not request.path.startswith("/v1/"):
        return
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("send an API key: Authorization: Bearer <key>")
    tenant_id = tenant_for_key(get_session(), key.strip())
    if tenant_id is None:
        raise Unauthorized("unknown or revoked API key")
    g.tenant_id = tenant_id


def current_tenant_id() -> str:
    from flask import g

    return g.tenant_id


def init_app(app) -> None:
    app.before_request(authenticate)


OPENAPI_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "An API key from `palimpsest keys create --tenant NAME`."}
}
