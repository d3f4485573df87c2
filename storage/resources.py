"""The JSON of a job and of a batch, as ``GET /v1/jobs/{id}`` and ``GET /v1/batches/{id}``
answer and their webhooks carry: one definition for the API and the workers, so a notice
cannot drift from the resource. No Flask here; the API passes its own artifact URLs."""
from datetime import datetime, timedelta

from storage.models import ARTIFACT_NAMES, Artifact, Batch, Job


def iso_time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def expires_at(finished_at: datetime | None, retention_seconds: int) -> str | None:
    """The earliest time retention deletes what ended at ``finished_at`` (``PALIMPSEST_RETENTION_SECONDS``;
    ``storage.deletion.expire``): None when it has not ended or nothing expires. A job that
    another job starts from waits for that one, so it may go later."""
    if finished_at is None or retention_seconds <= 0:
        return None
    return iso_time(finished_at + timedelta(seconds=retention_seconds))


def artifact_path(artifact: Artifact) -> str:
    """The artifact's URL path under the API's address (the workers do not know the host)."""
    return f"/v1/jobs/{artifact.job_id}/artifacts/{artifact.name}"


def artifacts_json(artifacts: list[Artifact], artifact_url=artifact_path) -> list[dict]:
    """A job's artifacts in their documented order, each with ``artifact_url(artifact)``."""
    return [{"name": a.name, "sha256": a.sha256, "size": a.size, "content_type": a.content_type,
             "url": artifact_url(a)} for a in sorted(artifacts, key=lambda a: ARTIFACT_NAMES.index(a.name))]


def job_json(job: Job, artifacts: list[Artifact], artifact_url=artifact_path, retention_seconds: int = 0) -> dict:
    """``retention_seconds``: the deployment's retention, for ``expires_at`` (a batch's member
    goes with its batch: null)."""
    return {
        "id": job.id,
        "status": job.status,
        "model": job.model_id,
        "layer": job.layer,
        "progress": {"phase": job.phase, "step": job.progress_step, "total": job.progress_total,
                     "loss": job.progress_loss},
        "created_at": iso_time(job.created_at),
        "started_at": iso_time(job.started_at),
        "finished_at": iso_time(job.finished_at),
        "expires_at": None if job.batch_id else expires_at(job.finished_at, retention_seconds),
        "error": {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None,
        "metrics": job.metrics,
        "artifacts": artifacts_json(artifacts, artifact_url),
        "base_job": job.base_job_id,
        "priority": job.priority,
        "batch": job.batch_id,
        "params": job.params,
        "webhook": job.webhook_url,
        "cancel_requested": job.cancel_requested,
    }


def batch_json(batch: Batch, retention_seconds: int = 0) -> dict:
    return {
        "id": batch.id,
        "status": batch.status,
        "request_counts": {"total": batch.total_count, "succeeded": batch.succeeded_count,
                           "failed": batch.failed_count, "cancelled": batch.cancelled_count},
        "merge": batch.merge,
        "priority": batch.priority,
        "webhook": batch.webhook_url,
        "error": {"code": batch.error_code, "message": batch.error_message or ""} if batch.error_code else None,
        "created_at": iso_time(batch.created_at),
        "finished_at": iso_time(batch.finished_at),
        "expires_at": expires_at(batch.finished_at, retention_seconds),
    }
