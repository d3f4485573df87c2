"""Cursor pagination for the list routes (jobs, batches): newest first, by the keyset
(created_at, id), so a page never skips or repeats a row while new ones arrive.
``next_cursor`` is opaque to clients: base64 of that pair."""
import base64
import binascii
import json
from datetime import datetime, timezone

from sqlalchemy import and_, or_

from api.errors import ValidationError
from api.inputs import bounded_int, text_problem
from storage.db import get_session

DEFAULT_LIMIT, MAX_LIMIT = 20, 100
PAGE_ARGS = ("cursor", "limit")

OPENAPI_PARAMETERS = [
    {"name": "cursor", "in": "query", "schema": {"type": "string"}, "description": "next_cursor of the previous page"},
    {"name": "limit", "in": "query",
     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}},
]


def encode_cursor(row) -> str:
    raw = json.dumps([row.created_at.isoformat(), row.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created_at, row_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        # in UTC, so that a date at the edge of the calendar fails here, not in the query
        when = datetime.fromisoformat(created_at).astimezone(timezone.utc)
        if not isinstance(row_id, str) or text_problem(row_id) is not None:
            raise ValueError(cursor)
    except (ValueError, TypeError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise ValidationError("is not a cursor this API returned (next_cursor)", field="cursor") from None
    return when, row_id


def page(query, entity, args) -> tuple[list, str | None]:
    """One page of ``query`` (a select of ``entity``) after ``args['cursor']``, at most
    ``args['limit']`` rows; and the cursor of the next page, or None on the last."""
    limit = bounded_int(args.get("limit", str(DEFAULT_LIMIT)), 1, MAX_LIMIT, "limit")
    if (cursor := args.get("cursor")) is not None:
        when, row_id = decode_cursor(cursor)
        query = query.where(or_(entity.created_at < when, and_(entity.created_at == when, entity.id < row_id)))
    rows = list(get_session().scalars(query.order_by(entity.created_at.desc(), entity.id.desc()).limit(limit + 1)))
    return rows[:limit], (encode_cursor(rows[limit - 1]) if len(rows) > limit else None)
