"""Engine error classes, shared by the math core and the edit front end.

Each class has a stable ``code`` so that the API and the workers can report it
without knowing the engine's internals.
"""


class EngineError(Exception):
    """Base class of every error the rewriting engine raises on purpose."""

    code = "engine_error"


class EditRequestError(EngineError, ValueError):
    """Bad input to an edit; ``field`` names what is wrong (e.g. ``"rank"``)."""

    code = "invalid_request"

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UnknownLayer(EngineError, LookupError):
    """A layer name that the model does not have, or that cannot be edited."""

    code = "unknown_layer"

    def __init__(self, name, valid=()):
        valid = list(valid)
        shown = ", ".join(valid[:40]) + (f", ... ({len(valid)} in all)" if len(valid) > 40 else "")
        super().__init__(f"{name!r} is not an editable layer; editable layers: {shown or '(none)'}")
        self.name = name
        self.valid = valid


class IncompatibleError(EngineError):
    """Statistics or deltas that were made for another model, layer or shape."""

    code = "incompatible"


class CheckpointError(EngineError):
    """A checkpoint, statistic or delta file that cannot be read as one."""

    code = "invalid_checkpoint"


class Cancelled(EngineError):
    """The caller's ``should_stop()`` asked to stop; raised between steps. ``state``: where
    the work stood, to go on from later (``rewriting.insert.InsertState``), or None."""

    code = "cancelled"

    def __init__(self, message="cancelled", state=None):
        super().__init__(message)
        self.state = state
