"""The operator console's pages: what the node holds, read through the node's store, rendered on
the server.

Why server-rendered pages and no front-end build: the node is installed from a lock file with pip,
and a page that needs no toolchain, no CDN and no framework is one that still works in ten years on
a hospital's locked-down browser. Every number comes from the same store methods ``hyperct status``
and ``hyperct jobs`` call (:meth:`NodeStore.counts`, :meth:`JobStore.rows`, :meth:`JobStore.details`,
:meth:`Journal.last_errors`), so the console and the CLI can never disagree. Pages show UIDs, states,
timings and errors; no patient attribute is stored by the node beyond PatientID, and the console
does not show it.

Key images are the PNGs the pipeline already wrote next to each job's ``results.json`` (one
renderer, :func:`operators.key_images.render_key_image`, run by the pipeline's key-images stage);
:meth:`Console.key_image` finds one only through ``results.json`` and only inside that job's results
folder, so no request path can reach another file.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jinja2 import DictLoader, Environment, select_autoescape

from app.node.store import NodeStore, StateError
from app.node.store.jobs import JOB_STATES
from app.web.templates import TEMPLATES
from operators.key_images import KEY_IMAGES_DIR, key_image_name

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
#: Jobs in these states can be run again from the console (a job with failed sends always can).
RETRYABLE = ("failed", "not-processed")
PAGE_ROWS = 200


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _duration(row: Mapping[str, Any] | None) -> str:
    if not row or not row.get("started_at") or not row.get("finished_at"):
        return "-"
    return f"{row['finished_at'] - row['started_at']:.1f} s"


def _states(counts: Mapping[str, int] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted((counts or {}).items())) or "none"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _short(uid: str | None) -> str:
    uid = uid or ""
    return uid if len(uid) <= 24 else f"{uid[:8]}…{uid[-12:]}"


def environment() -> Environment:
    """The console's Jinja2 environment: autoescaped, templates from :mod:`app.web.templates`."""
    env = Environment(loader=DictLoader(TEMPLATES), autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters.update(when=_when, duration=_duration, states=_states, size=_size, short=_short)
    return env


class Console:
    """Renders the console's pages from the store; each method returns HTML (None: no such thing)."""

    def __init__(self, store: NodeStore, data_dir: Path, *, status: Callable[[], dict[str, Any]],
                 warnings: list[str], stow_ae: str | None) -> None:  # fmt: skip
        self.store = store
        self.data_dir = Path(data_dir)
        self.status = status
        self.warnings = warnings
        self.stow_ae = stow_ae
        self.env = environment()

    def _render(self, name: str, **context: Any) -> str:
        return self.env.get_template(name).render(**context)

    # -- pages ----------------------------------------------------------------------------------
    def status_page(self, **common: Any) -> str:
        facts = self.facts()
        return self._render("status.html", title="Status", nav="status", **facts, **common)

    def facts(self) -> dict[str, Any]:
        """Everything the status page shows (also ``/api/status``, JSON)."""
        counts = self.store.counts()
        jobs = counts["jobs"]
        live = self.status()
        usage = shutil.disk_usage(self.data_dir)
        worker = dict(live.get("worker", {}))
        worker["running"] = [{"id": j["id"], "study_uid": j["study_uid"]} for j in self.store.jobs.rows("running")]
        return {
            "counts": counts,
            "queue_depth": jobs.get("queued", 0) + jobs.get("running", 0),
            "receiver": live.get("receiver", {}),
            "worker": worker,
            "outbox": {**live.get("outbox", {}), "next_due": self.store.outbox.next_due()},
            "disk": {"free": usage.free, "total": usage.total, "free_fraction": usage.free / usage.total if usage.total else 0.0},
            "errors": self.store.journal.last_errors(10),
            "warnings": self.warnings,
            "stow": self.stow_ae,
        }

    def studies_page(self, **common: Any) -> str:
        studies = self.store.studies.rows(newest_first=True, limit=PAGE_ROWS)
        for study in studies:
            jobs = self.store.jobs.for_study(study["study_uid"])
            study["job"] = jobs[0] if jobs else None
        return self._render("studies.html", title="Studies", nav="studies", studies=studies, **common)

    def study_page(self, study_uid: str, **common: Any) -> str | None:
        study = self.store.studies.get(study_uid)
        if study is None:
            return None
        jobs = self.store.jobs.for_study(study_uid)
        return self._render("study.html", title=f"Study {_short(study_uid)}", nav="studies", study=study,
                            jobs=jobs, results=self.results(jobs, study_uid), **common)  # fmt: skip

    def jobs_page(self, state: str | None = None, **common: Any) -> str:
        state = state if state in JOB_STATES else None
        jobs = self.store.jobs.rows(state, PAGE_ROWS)
        failed_sends = self._jobs_with_failed_sends()
        for job in jobs:
            job["retryable"] = job["state"] in RETRYABLE or job["id"] in failed_sends
        return self._render("jobs.html", title="Jobs", nav="jobs", jobs=jobs, state=state, job_states=JOB_STATES,
                            **common)  # fmt: skip

    def job_page(self, job_id: int, **common: Any) -> str | None:
        try:
            job = self.store.jobs.details(job_id)
        except StateError:
            return None
        job["retryable"] = job["state"] in RETRYABLE or any(r["state"] == "failed" for r in job["outbox"])
        return self._render("job.html", title=f"Job {job_id}", nav="jobs", job=job, **common)

    def outbox_page(self, **common: Any) -> str:
        return self._render("outbox.html", title="Outbox", nav="outbox", rows=self.store.outbox.recent(PAGE_ROWS),
                            counts=self.store.outbox.counts(), **common)  # fmt: skip

    def _jobs_with_failed_sends(self) -> set[int]:
        return {r["job_id"] for r in self.store.outbox.recent(10_000, state="failed") if r["job_id"] is not None}

    # -- results and key images -----------------------------------------------------------------
    def _study_folder(self, job: Mapping[str, Any]) -> Path | None:
        """The job's results folder of its study, if it is inside ``<data-dir>/results``."""
        if not job.get("output_dir"):
            return None
        root = (self.data_dir / "results").resolve()
        folder = (self.data_dir / job["output_dir"] / job["study_uid"]).resolve()
        return folder if folder.is_relative_to(root) and folder.is_dir() else None

    def _results_json(self, job: Mapping[str, Any]) -> tuple[Path, dict[str, Any]] | None:
        folder = self._study_folder(job)
        if folder is None or not (folder / RESULTS_FILE).is_file():
            return None
        try:
            return folder, json.loads((folder / RESULTS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("job %s: cannot read %s: %s", job.get("id"), RESULTS_FILE, exc)
            return None

    def results(self, jobs: list[dict[str, Any]], study_uid: str) -> dict[str, Any] | None:
        """The findings of the newest job of the study that wrote ``results.json``."""
        for job in jobs:
            found = self._results_json(job)
            if found is not None:
                data = found[1]
                return {"job_id": job["id"], "model": data.get("model", {}), "tasks": data.get("tasks", [])}
        return None

    def key_image(self, job_id: int, task_key: str) -> Path | None:
        """The key image of ``task_key`` of job ``job_id``, only as ``results.json`` lists it and only
        inside that job's ``key_images/`` folder (None otherwise)."""
        try:
            name = key_image_name(task_key)
        except ValueError:
            return None
        job = self.store.jobs.get(job_id)
        found = self._results_json(job) if job is not None else None
        if found is None:
            return None
        folder, data = found
        listed = {t.get("key"): t.get("key_image") for t in data.get("tasks", []) if isinstance(t, dict)}
        relative = listed.get(task_key)
        if not isinstance(relative, str):
            return None
        path = (folder / relative).resolve()
        allowed = (folder / KEY_IMAGES_DIR).resolve()
        if path.parent != allowed or path.name != name or not path.is_file():
            return None
        return path
