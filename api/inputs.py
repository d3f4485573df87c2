"""Input no view could use, refused before a view sees it (``init_app``).

- NUL characters: PostgreSQL text cannot hold them, so an id, a filter or a name with
  one would fail inside a query (a 500) instead of being refused. A path with one
  answers 404 (no resource has such an id); a query parameter or a string of a JSON
  body a view reads answers 422 naming the field.
- Lone surrogates (JSON allows ``"\\ud800"``): no database or hash can encode them as
  UTF-8, so a string or key with one answers 422 naming the field, as a NUL does.
- JSON nested deeper than ``MAX_JSON_DEPTH``: no field of the API nests that far, and
  deep enough nesting crashes the parser (RecursionError), so it answers 400.
"""
import flask
from flask import request

from api.errors import BadRequest, NotFound, ValidationError

MAX_JSON_DEPTH = 32


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored (a NUL, a lone surrogate), else None."""
    if "\x00" in text:
        return "must not contain NUL characters"
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return "must be valid Unicode (a lone surrogate such as \\ud800 cannot be stored)"
    return None


def json_problem(body) -> tuple[str, str] | None:
    """(field, reason) for the first string that cannot be stored or a level nested too
    deep, else None."""
    stack = [(body, "", 1)]
    while stack:
        value, field, depth = stack.pop()
        if isinstance(value, str):
            if (reason := text_problem(value)) is not None:
                return field, reason
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return field, f"nests deeper than {MAX_JSON_DEPTH} levels"
            items = value.items() if isinstance(value, dict) else ((f"[{i}]", v) for i, v in enumerate(value))
            for key, item in items:
                if (reason := text_problem(key)) is not None:
                    return field or key, f"has a key that {reason}"
                path = key if not field else f"{field}{key}" if key.startswith("[") else f"{field}.{key}"
                stack.append((item, path, depth + 1))
    return None


def known_only(names, allowed, what: str = "query parameter") -> None:
    """422 naming the first of ``names`` (query parameters, or a JSON body's fields) that is
    not in ``allowed``: a misspelt filter must not silently widen a listing."""
    for name in names:
        if name not in allowed:
            raise ValidationError(f"unknown {what}; expected {', '.join(allowed)}", field=name)


def bounded_int(value: str, low: int, high: int, field: str, hint: str = "") -> int:
    """An integer query or form option in [low, high]; 422 naming ``field`` otherwise.
    The length is checked before ``int()``, which refuses strings over 4,300 digits."""
    digits = value.lstrip("0") or "0"
    if (not (value.isascii() and value.isdigit())  # "²".isdigit()
            or len(digits) > len(str(high)) or not low <= int(digits) <= high):
        raise ValidationError(f"must be an integer in [{low}, {high}]{hint}, not {value[:40]!r}", field=field)
    return int(digits)


def json_body() -> dict:
    """The request's JSON body, which must be an object (400 otherwise)."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


class Request(flask.Request):
    """The app's request: a JSON body a view reads is checked as it is parsed, so a
    route that reads no body (a cancel) answers the same whatever body comes with it."""

    def get_json(self, force=False, silent=False, cache=True):
        try:
            body = super().get_json(force=force, silent=silent, cache=cache)
        except RecursionError:
            raise BadRequest(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels") from None
        problem = json_problem(body)
        if problem is not None:
            field, reason = problem
            if reason.startswith("nests"):
                raise BadRequest(f"the JSON body {reason}" + (f" (at {field})" if field else ""))
            raise ValidationError(reason, field=field)
        return body


def check_request() -> None:
    """``before_request``: the path and the query string."""
    if "\x00" in request.path:
        raise NotFound("no resource has this id")
    for name, value in request.args.items(multi=True):
        if "\x00" in name or "\x00" in value:
            raise ValidationError("must not contain NUL characters", field=name)


def init_app(app) -> None:
    app.request_class = Request
    app.before_request(check_request)
