"""``hyperct jobs list|show|retry|purge`` and ``hyperct status``: the node's state, read from its
database (safe while the node runs: SQLite WAL readers never block it).

Wire with::

    from app.commands import jobs as jobs_cmd
    cli.add_typer(jobs_cmd.jobs_app, name="jobs", help=jobs_cmd.HELP)
    cli.command("status", help=jobs_cmd.STATUS_HELP)(jobs_cmd.status)
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import typer

HELP = "Inspect and steer the node's jobs (one per processed study): list, show, retry, purge."
STATUS_HELP = "The node's queue depth, studies and outbox by state, and the last errors."

jobs_app = typer.Typer(name="jobs", help=HELP, no_args_is_help=True, add_completion=False)

_CONFIG = typer.Option(
    None, "--config", "-c", exists=True, dir_okay=False, help="The node's YAML file (for its data-dir)."
)
_DATA = typer.Option(None, "--data-dir", help="The node's data folder (overrides the config).")


def _state(config: Path | None, data_dir: Path | None):  # type: ignore[no-untyped-def]
    from app.node.config import NodeConfig
    from app.node.state import State

    cfg = NodeConfig.load(config, overrides={"data_dir": str(data_dir) if data_dir else None})
    db = cfg.data_path / "state.sqlite"
    if not db.exists():
        typer.echo(f"error: no node state at {db}", err=True)
        raise typer.Exit(1)
    return State(db), cfg


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


@jobs_app.command("list")
def list_jobs(
    config: Path = _CONFIG,
    data_dir: Path = _DATA,
    state_filter: str = typer.Option(None, "--state", help="Only jobs in this state (queued, running, done, failed, not_processed, superseded)."),
    limit: int = typer.Option(50, "--limit", help="At most this many, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:  # fmt: skip
    """List jobs, newest first."""
    state, _ = _state(config, data_dir)
    rows = state.jobs(state_filter, limit)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    typer.echo(f"{'id':>5}  {'state':<13} {'tries':>5}  {'created':<19}  study / reason")
    for r in rows:
        typer.echo(
            f"{r['id']:>5}  {r['state']:<13} {r['attempts']:>5}  {_when(r['created_at']):<19}  {r['study_uid']}"
        )
        if r["reason"]:
            typer.echo(f"{'':>34}{r['reason'][:200]}")


@jobs_app.command("show")
def show(job_id: int = typer.Argument(..., help="Job id (from `hyperct jobs list`)."), config: Path = _CONFIG,
         data_dir: Path = _DATA) -> None:  # fmt: skip
    """Everything about one job: study, attempts, outbox rows, errors (JSON)."""
    from app.node.state import StateError

    state, _ = _state(config, data_dir)
    try:
        typer.echo(json.dumps(state.job_details(job_id), indent=2, default=str))
    except StateError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@jobs_app.command("retry")
def retry(
    job_id: int = typer.Argument(..., help="Job id."), config: Path = _CONFIG, data_dir: Path = _DATA
) -> None:
    """Re-queue a job's failed sends, or run a finished job's study again (picked up by the running node)."""
    from app.node.state import StateError

    state, _ = _state(config, data_dir)
    try:
        typer.echo(state.retry_job(job_id))
    except StateError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@jobs_app.command("purge")
def purge(
    config: Path = _CONFIG,
    data_dir: Path = _DATA,
    older_than_days: float = typer.Option(30.0, "--older-than-days", help="Only studies finished at least this long ago."),
    include_failed: bool = typer.Option(False, "--include-failed", help="Also forget failed studies (they are kept by default)."),
) -> None:  # fmt: skip
    """Forget finished studies: rows, spool and results folders."""
    state, cfg = _state(config, data_dir)
    states = ("done", "not_processed", "stored", *(("failed",) if include_failed else ()))
    jobs = {r["study_uid"]: [] for r in state.studies()}
    for j in state.jobs(limit=1_000_000):
        jobs.setdefault(j["study_uid"], []).append(j["id"])
    uids = state.purge(older_than_s=older_than_days * 86400.0, states=states)
    for uid in uids:
        shutil.rmtree(cfg.data_path / "spool" / uid, ignore_errors=True)
        for jid in jobs.get(uid, []):
            shutil.rmtree(cfg.data_path / "results" / str(jid), ignore_errors=True)
    typer.echo(f"purged {len(uids)} study(ies)")


def status(config: Path = _CONFIG, data_dir: Path = _DATA, errors: int = typer.Option(5, "--errors", help="How many recent errors to show."),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:  # fmt: skip
    """Queue depth, studies/jobs/outbox by state, last errors."""
    state, _ = _state(config, data_dir)
    counts = state.counts()
    jobs = counts["jobs"]
    counts["queue_depth"] = jobs.get("queued", 0) + jobs.get("running", 0)
    counts["last_errors"] = state.last_errors(errors)
    if as_json:
        typer.echo(json.dumps(counts, indent=2, default=str))
        return
    typer.echo(
        f"queue depth: {counts['queue_depth']} (queued {jobs.get('queued', 0)}, running {jobs.get('running', 0)})"
    )
    for key in ("studies", "jobs", "outbox"):
        typer.echo(f"{key}: " + (", ".join(f"{k} {v}" for k, v in sorted(counts[key].items())) or "none"))
    typer.echo(f"instances: {counts['instances']} (duplicates {counts['duplicates']})")
    typer.echo("last errors:" if counts["last_errors"] else "last errors: none")
    for e in counts["last_errors"]:
        typer.echo(f"  {_when(e['at'])} {e['kind']}: {e['message'][:300]}")
