"""The worker tasks the API sends: by name (the API never imports a task module), with
one id, and only after the row the task reads has been committed. Queues come from
``workers.celery_app.TASK_ROUTES``."""
from flask import current_app
from kombu.exceptions import OperationalError

from api.errors import ServiceUnavailable
from workers.celery_app import MAX_PRIORITY, broker_priority  # noqa: F401  (re-exported for the views)

RUN_JOB = "workers.jobs.run_job"
COMPUTE_STATISTIC = "workers.statistics.compute_statistic"
INSPECT_MODEL = "workers.models.inspect_model"

DEFAULT_PRIORITY = 5


def send_task(name: str, object_id: str, priority: int | None = None) -> None:
    """Send ``name(object_id)``; raise ``ServiceUnavailable`` when the broker cannot take it."""
    options = {} if priority is None else {"priority": broker_priority(priority)}
    try:
        current_app.extensions["celery"].send_task(name, args=[object_id], **options)
    except (OperationalError, OSError) as error:
        current_app.logger.error("could not send %s(%s): %s", name, object_id, error)
        raise ServiceUnavailable("the job queue is unavailable; try again later") from error
