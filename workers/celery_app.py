"""The Celery app, built from the same ``Settings`` as the API.

``make_celery(settings)`` needs no Flask: the worker entry points (``palimpsest
worker`` and ``celery -A workers.main worker``) call it directly. The API calls
``celery_init_app(app)``, which builds the same app from the Flask config and only
ever *sends* tasks, by name, so the API process never imports the task modules.

Queues: ``gpu`` (rewriting jobs; one worker process per GPU) and ``cpu``
(everything else). Reliability settings, and why:

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a task is acknowledged only
  after it finishes, so a worker killed mid-task (OOM, node lost) leaves the message
  to be delivered again instead of losing the job. Tasks must therefore be safe to
  run twice; they take ids and check the job's state in the database first.
- ``worker_prefetch_multiplier = 1``: a worker reserves one task at a time, so a
  long GPU job does not hold queued jobs hostage behind it.
- ``task_ignore_result``: no result backend; the database is the source of truth.
- ``visibility_timeout`` (Redis only): Redis re-delivers an unacknowledged message
  after this many seconds. It must exceed the hard time limit, otherwise a long
  task still running would also start on a second worker. Set it with
  ``PALIMPSEST_BROKER_VISIBILITY_TIMEOUT`` (default 7200 s > 3900 s hard limit).
  kombu's SQLAlchemy transport passes transport options to ``create_engine``, so
  none are set for the embedded broker.
- Shutdown: SIGTERM gives a warm shutdown, which waits for the running task. A job (or a
  statistic, or a shard) hands itself back after ``PALIMPSEST_WORKER_SHUTDOWN_GRACE_SECONDS`` instead
  (``PalimpsestCelery.shutdown_notice``, ``announce_shutdown``; docs/workers.md, Shutdown), also
  when the SIGTERM reaches the pool processes too (``hand_back_on_group_sigterm``).
"""
import logging
import signal
from dataclasses import fields
from functools import cached_property
from pathlib import Path

from billiard.process import current_process
from celery import Celery, Task, current_app, signals
from kombu import Exchange, Queue

from palimpsest.config import Settings

QUEUES = ("gpu", "cpu")

# Task name -> queue. Tasks are sent by name from the API, so routes live here.
TASK_ROUTES = {
    "workers.tasks.probe": {"queue": "cpu"},
    "workers.jobs.run_job": {"queue": "gpu"},
    "workers.statistics.compute_statistic": {"queue": "gpu"},
    "workers.statistics.compute_shard": {"queue": "gpu"},
    "workers.merge.merge_batch": {"queue": "gpu"},
    "workers.models.inspect_model": {"queue": "cpu"},
    "workers.reconcile.reconcile": {"queue": "cpu"},
    "workers.webhooks.deliver_webhook": {"queue": "cpu"},
}
# Modules a worker imports at start, registering their tasks (the API imports none of them).
TASK_MODULES = ["workers.tasks", "workers.jobs", "workers.statistics", "workers.models", "workers.webhooks",
                "workers.reconcile", "workers.merge"]


log = logging.getLogger(__name__)


class PalimpsestTask(Task):
    """Every task of the app: once it has ended, the worker's disk cache is brought back
    under ``PALIMPSEST_CACHE_DISK_MB`` (least recently used files first)."""

    def after_return(self, status, retval, task_id, args, kwargs, einfo):
        from workers.artifacts import cache_dir, prune_cache

        settings = self.app.settings
        try:
            deleted = prune_cache(cache_dir(settings.data_dir), settings.cache_disk_mb * 1024**2,
                                  stale_partial_s=settings.task_time_limit)
        except OSError:  # a full or read-only disk must not fail the task that just ended
            log.warning("could not prune the disk cache", exc_info=True)
            return
        if deleted:
            log.info("disk cache: deleted %d least recently used files", len(deleted))


class PalimpsestCelery(Celery):
    """A Celery app that carries its ``Settings`` and opens the store on first use.

    Resources are opened lazily, inside the task, so that each prefork child
    opens its own (database engines and HTTP clients do not survive a fork).
    """

    def __init__(self, settings: Settings, **kwargs):
        from workers.heartbeat import ShutdownNotice

        super().__init__(**kwargs)
        self.settings = settings
        # made here, in the worker's main process before its pool forks: the children share it
        self.shutdown_notice = ShutdownNotice()

    @cached_property
    def store(self):
        from storage.objects import open_store

        return open_store(self.settings.storage_url, self.settings.s3_endpoint_url)

    @cached_property
    def session_factory(self):
        from storage.db import make_engine, make_session_factory

        return make_session_factory(make_engine(self.settings.database_url))

    @cached_property
    def cache(self):
        """This process's warm models and statistics (``workers.cache``)."""
        from workers.cache import WorkerCache

        return WorkerCache.from_settings(self.settings)


@signals.worker_shutting_down.connect
def announce_shutdown(sender=None, sig=None, how=None, **kwargs):
    """In the worker's main process, from its signal handler (SIGTERM, SIGINT): tell the pool
    processes, whose jobs hand themselves back after the grace period. Only a warm shutdown:
    a cold one (SIGQUIT) kills the running tasks at once, with a SIGTERM that a pool process
    must not take for its process group's (``hand_back_on_group_sigterm``). The signal names
    the worker's host name only; the app is the process's current one (the worker's)."""
    notice = getattr(current_app._get_current_object(), "shutdown_notice", None)
    if notice is not None and how == "Warm":
        notice.announce()


@signals.task_prerun.connect
def hand_back_on_group_sigterm(sender=None, **kwargs):
    """In a pool process, before its first task: a SIGTERM that the main process got too
    starts the same hand-back as one sent to the main process alone, instead of killing this
    process and the job it runs (``workers.heartbeat.sigterm_handler``). Installed here, not at
    ``worker_process_init``, because billiard sets its own handler after that signal."""
    from workers.heartbeat import sigterm_handler

    notice = getattr(sender.app, "shutdown_notice", None)
    if notice is None or current_process().name == "MainProcess":  # the solo pool: Celery's handler stays
        return
    current = signal.getsignal(signal.SIGTERM)
    if not hasattr(current, "defers_to"):
        signal.signal(signal.SIGTERM, sigterm_handler(notice, current))


MAX_PRIORITY = 9


def broker_priority(priority: int) -> int:
    """A job's priority (0..9, 9 runs first) as a message priority: kombu's Redis
    transport serves priority 0 first. Every sender (API, batches, reconciler) uses this."""
    return MAX_PRIORITY - priority


def broker_transport_options(settings: Settings) -> dict:
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # Ten real priority levels (kombu's default folds them into four), highest first.
        return {"visibility_timeout": settings.broker_visibility_timeout,
                "priority_steps": list(range(10)), "queue_order_strategy": "priority"}
    if settings.broker_url.startswith("sqs://"):
        return {"visibility_timeout": settings.broker_visibility_timeout}
    return {}


def make_celery(settings: Settings) -> PalimpsestCelery:
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)  # the embedded broker's SQLite file lives there
    celery = PalimpsestCelery(settings, main="palimpsest", include=TASK_MODULES, task_cls=PalimpsestTask)
    celery.conf.update(
        broker_url=settings.broker_url,
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        # One direct exchange per queue, routing key = queue name: a task routed to gpu can only land in gpu.
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue="cpu",
        task_routes=TASK_ROUTES,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_soft_time_limit=settings.task_soft_time_limit or None,
        task_time_limit=settings.task_time_limit,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        # Workers' task events feed Flower's task list. The API sends no task-sent event:
        # it would cost a second Redis publish per submission (13% of the API's CPU per
        # submission, docs/reliability.md), and queued jobs are listed by GET /v1/jobs.
        worker_send_task_events=True,
        task_send_sent_event=False,
        # The beat (`palimpsest worker --beat`, or `palimpsest beat`): the reconciler, every
        # reconcile_interval_seconds (workers/reconcile.py).
        beat_schedule=reconcile_schedule(settings),
        beat_schedule_filename=str(Path(settings.data_dir) / "celerybeat-schedule"),
    )
    return celery


def reconcile_schedule(settings: Settings) -> dict:
    """The reconciler; a pass not started within one interval is dropped (the next one comes)."""
    interval = float(settings.reconcile_interval_seconds)
    return {"reconcile": {"task": "workers.reconcile.reconcile", "schedule": interval,
                          "options": {"expires": interval}}}


def settings_from_config(config) -> Settings:
    """The ``Settings`` a Flask app was configured with (keys ``PALIMPSEST_*``)."""
    return Settings(**{f.name: config[f"PALIMPSEST_{f.name.upper()}"] for f in fields(Settings)})


def celery_init_app(app) -> PalimpsestCelery:
    celery = make_celery(settings_from_config(app.config))
    app.extensions["celery"] = celery
    return celery
