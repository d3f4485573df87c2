"""Celery tasks. Each takes ids (strings), never ORM objects or tensors, and reaches
the database and the object store through the app it runs in (``self.app``).

Queues are assigned in ``workers.celery_app.TASK_ROUTES``, by task name.
"""
import io
import json
import os
import time

from celery import shared_task


@shared_task(bind=True, name="workers.tasks.probe")
def probe(self, key: str) -> None:
    """Write a small JSON object at ``key`` in the object store.

    Proves the wiring end to end: the message went through the broker, a worker
    picked it up from the ``cpu`` queue, and that worker can write to the store.
    Running it twice is harmless (the second write replaces the first).
    """
    body = {"worker": self.request.hostname, "pid": os.getpid(), "written_at": time.time()}
    self.app.store.put(key, io.BytesIO(json.dumps(body).encode()), content_type="application/json")
