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
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from app.commands.helpfmt import HyperCTTyper
from app.commands.usage import fail
from app.node.store.jobs import JOB_STATES

if TYPE_CHECKING:
    from app.node.config import NodeConfig
    from app.node.store import NodeStore, OutboxStore

HELP = "Inspect and steer the node's jobs (one per processed study): list, show, retry, purge."
STATUS_HELP = "The node's queue depth, studies and outbox by state, and the last errors."
EXAMPLES = """Examples:
  hyperct jobs list -c node.yaml --state failed
  hyperct jobs show 42 -c node.yaml
  hyperct jobs retry 42 -c node.yaml       # picked up by the running node
  hyperct jobs purge --data-dir node-data --older-than-days 90"""

jobs_app = HyperCTTyper(name="jobs", help=HELP, no_args_is_help=True)

_CONFIG = typer.Option(
    None, "--config", "-c", exists=True, dir_okay=False, help="The node's YAML file (for its data-dir)."
)
_DATA = typer.Option(None, "--data-dir", help="The node's data folder (overrides the config).")


def _folder(config: Path | None, data_dir: Path | None) -> NodeConfig:
    """The node's settings (for its data folder); a bad file or variable is one line, exit 2."""
    from app.node.config import NodeConfig

    try:
        return NodeConfig.load(config, overrides={"data_dir": str(data_dir) if data_dir else None})
    except (ValueError, OSError) as exc:
        fail(exc)


def _batch_outbox_path(folder: Path) -> Path:
    from app.batch.send import OUTBOX_DB

    return folder / OUTBOX_DB


def _batch_outbox(folder: Path) -> OutboxStore | None:
    """The outbox of a ``hyperct process --send-to`` run (``OUT/_batch``), or None."""
    from app.node.store import OutboxStore

    path = _batch_outbox_path(folder)
    return OutboxStore.open(path) if path.exists() else None


def _state(config: Path | None, data_dir: Path | None) -> tuple[NodeStore, NodeConfig]:
    from app.node.store import NodeStore

    cfg = _folder(config, data_dir)
    db = cfg.data_path / "state.sqlite"
    if not db.exists():
        hint = " (a batch outbox: see its studies.csv and sends.csv)" if _batch_outbox_path(cfg.data_path).exists() else ""
        typer.echo(f"error: no node state at {db}{hint}", err=True)
        raise typer.Exit(1)
    return NodeStore(db), cfg


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


@jobs_app.command("list")
def list_jobs(
    config: Path = _CONFIG,
    data_dir: Path = _DATA,
    state_filter: str = typer.Option(None, "--state", help=f"Only jobs in this state ({', '.join(JOB_STATES)})."),
    limit: int = typer.Option(50, "--limit", help="At most this many, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:  # fmt: skip
    """List jobs, newest first."""
    if state_filter is not None:
        state_filter = state_filter.replace("_", "-")  # `not_processed`, as older docs spelt it
    if state_filter is not None and state_filter not in JOB_STATES:
        fail(f"--state {state_filter!r} is not a job state; use one of: {', '.join(JOB_STATES)}")
    state, _ = _state(config, data_dir)
    rows = state.jobs.rows(state_filter, limit)
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
def show(job_id: int = typer.Argument(..., metavar="JOB_ID", help="Job id (from `hyperct jobs list`)."), config: Path = _CONFIG,
         data_dir: Path = _DATA) -> None:  # fmt: skip
    """Everything about one job: study, attempts, outbox rows, errors (JSON)."""
    from app.node.store import StateError

    state, _ = _state(config, data_dir)
    try:
        typer.echo(json.dumps(state.jobs.details(job_id), indent=2, default=str))
    except StateError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@jobs_app.command("retry")
def retry(
    job_id: int = typer.Argument(..., metavar="JOB_ID", help="Job id (from `hyperct jobs list`)."),
    config: Path = _CONFIG,
    data_dir: Path = _DATA,
) -> None:
    """Re-queue a job's failed sends, or run a finished job's study again (picked up by the running node)."""
    from app.node.store import StateError

    state, _ = _state(config, data_dir)
    try:
        typer.echo(state.jobs.retry(job_id))
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
    from app.node.retention import purge_finished

    state, cfg = _state(config, data_dir)
    forgotten = purge_finished(state, cfg.data_path, older_than_days=older_than_days, include_failed=include_failed)
    typer.echo(f"purged {len(forgotten)} study(ies)")


def status(config: Path = _CONFIG, data_dir: Path = _DATA, errors: int = typer.Option(5, "--errors", help="How many recent errors to show."),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:  # fmt: skip
    """Queue depth, studies/jobs/outbox by state, last errors, and the settings that leave the
    node quietly useless (with ``-c``: those are read from the file)."""
    outbox = _batch_outbox(_folder(config, data_dir).data_path)
    if outbox is not None:
        _batch_status(outbox, as_json)
        return
    state, cfg = _state(config, data_dir)
    counts = state.counts()
    jobs = counts["jobs"]
    counts["queue_depth"] = jobs.get("queued", 0) + jobs.get("running", 0)
    counts["last_errors"] = state.journal.last_errors(errors)
    counts["warnings"] = cfg.warnings() if config is not None else []
    if as_json:
        typer.echo(json.dumps(counts, indent=2, default=str))
        return
    for warning in counts["warnings"]:
        typer.echo(f"warning: {warning}")
    typer.echo(
        f"queue depth: {counts['queue_depth']} (queued {jobs.get('queued', 0)}, running {jobs.get('running', 0)})"
    )
    for key in ("studies", "jobs", "outbox"):
        typer.echo(f"{key}: " + (", ".join(f"{k} {v}" for k, v in sorted(counts[key].items())) or "none"))
    typer.echo(f"instances: {counts['instances']} (duplicates {counts['duplicates']})")
    typer.echo("last errors:" if counts["last_errors"] else "last errors: none")
    for e in counts["last_errors"]:
        typer.echo(f"  {_when(e['at'])} {e['kind']}: {e['message'][:300]}")


def _batch_status(outbox: OutboxStore, as_json: bool) -> None:
    """A batch run's outbox: rows and studies by delivery state, and the failed sends."""
    studies: dict[str, int] = {}
    for state in outbox.study_states().values():
        studies[state] = studies.get(state, 0) + 1
    failed = [r for r in outbox.rows() if r["state"] == "failed"]
    by_state = {"studies": studies, "outbox": outbox.counts()}
    outbox.close()
    if as_json:
        typer.echo(json.dumps({**by_state, "failed_sends": failed}, indent=2, default=str))
        return
    for key, counts in by_state.items():
        typer.echo(f"{key}: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"))
    typer.echo("failed sends:" if failed else "failed sends: none")
    for r in failed:
        typer.echo(f"  {r['destination']} {r['path']}: {(r['last_error'] or '')[:300]}")
