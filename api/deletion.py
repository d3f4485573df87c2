"""What the DELETE routes share: ``storage.deletion``'s refusals turned into 409s.

A delete commits in the request's transaction. An ``IntegrityError`` at the commit means a
row that depends on the deleted one was committed meanwhile (a job submitted on the model,
or naming the job as its base): the foreign key refused the delete, and nothing changed.
"""
from contextlib import contextmanager

from sqlalchemy.exc import IntegrityError

from api.errors import InUse
from storage import deletion
from storage.db import get_session


@contextmanager
def committed(what: str, not_finished):
    """Run the body's deletes and commit them; ``not_finished``: the 409 for a job or batch
    still under way."""
    session = get_session()
    try:
        yield session
        session.commit()
    except deletion.NotFinished as error:
        session.rollback()
        raise not_finished(str(error)) from None
    except deletion.InUse as error:
        session.rollback()
        raise InUse(str(error)) from None
    except IntegrityError:
        session.rollback()
        raise InUse(f"{what} gained a dependent while it was being deleted (a new job names it); "
                    "nothing was deleted") from None
