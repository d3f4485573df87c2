"""Read a ``multipart/form-data`` body part by part, as streams, without buffering it.

Werkzeug's form parser spools every file part to a temporary file before the view
runs; a checkpoint upload instead goes straight from the socket to the object store.
``MultipartReader(request.stream, boundary)`` yields ``Part`` objects in body order;
each part is a read-only stream over its data, valid until the next part is taken.
Memory stays at about one chunk whatever the body's size.
"""
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData, Preamble

from api.errors import BadRequest, ValidationError

CHUNK_SIZE = 1024 * 1024
MAX_PARTS = 32


class Part:
    """One part: ``name``, ``filename`` (None for a plain field), ``headers``, and ``read``."""

    def __init__(self, reader: "MultipartReader", name: str, filename: str | None, headers):
        self._reader = reader
        self.name = name if name is not None else ""  # a part without a name: errors name field ""
        self.filename = filename
        self.headers = headers
        self._buffer = bytearray()
        self._ended = False

    def read(self, n: int | None = -1) -> bytes:
        """Up to ``n`` bytes of the part's data (all that is left when ``n`` < 0); b"" at its end."""
        want = None if n is None or n < 0 else n
        while not self._ended and (want is None or len(self._buffer) < want):
            event = self._reader._next_event()
            if not isinstance(event, Data):
                raise BadRequest(f"multipart body: unexpected {type(event).__name__} inside part {self.name!r}")
            self._buffer += event.data
            self._ended = not event.more_data
        take = len(self._buffer) if want is None else min(want, len(self._buffer))
        data = bytes(self._buffer[:take])
        del self._buffer[:take]
        return data

    def read_text(self, limit: int) -> str:
        """The whole part as UTF-8 text, refused past ``limit`` bytes (plain fields are small)."""
        data = self.read(limit + 1)
        if len(data) > limit:
            raise ValidationError(f"form field longer than {limit} bytes", field=self.name)
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise ValidationError("form field is not UTF-8 text", field=self.name) from None

    def drain(self) -> None:
        while self.read(CHUNK_SIZE):
            pass


class MultipartReader:
    def __init__(self, stream, boundary: str, chunk_size: int = CHUNK_SIZE):
        self._stream = stream
        self._decoder = MultipartDecoder(boundary.encode("latin-1"), max_parts=MAX_PARTS)
        self._chunk_size = chunk_size
        self._part: Part | None = None

    def _next_event(self):
        while True:
            try:
                event = self._decoder.next_event()
            except ValueError as e:  # a truncated or malformed body
                raise BadRequest(f"multipart body cannot be read: {e}") from None
            if not isinstance(event, NeedData):
                return event
            chunk = self._stream.read(self._chunk_size)
            self._decoder.receive_data(chunk or None)

    def __iter__(self):
        while True:
            if self._part is not None:
                self._part.drain()  # the caller skipped the rest of it
                self._part = None
            event = self._next_event()
            if isinstance(event, Preamble):
                continue
            if isinstance(event, Epilogue):
                return
            if not isinstance(event, (Field, File)):
                raise BadRequest(f"multipart body: unexpected {type(event).__name__}")
            self._part = Part(self, event.name, event.filename if isinstance(event, File) else None, event.headers)
            yield self._part
