"""``hyperct serve``: run the DICOM node (see docs/node.md).

Everything the user gave is checked before anything is created or listens, and a problem is one
line naming the culprit, exit 2: the file (YAML syntax with line and column, keys and values by
name), the environment variable, the ports, the model (:meth:`NodeService.check`).

Wire with::

    from app.commands import serve as serve_cmd
    cli.command("serve", help=serve_cmd.HELP)(serve_cmd.serve)
"""

from __future__ import annotations

from pathlib import Path

import typer

from app.commands.usage import fail

HELP = (
    "Run the DICOM node: receive studies by C-STORE (C-ECHO too), spool them durably, process each "
    "study after a quiet period with HyperCT, and send SR + SEG to the destinations, retrying from a "
    "persistent outbox. Settings come from the YAML file (its 'node:' section), then "
    "HYPERCT_NODE_<SECTION>_<KEY> environment variables, then these options. SIGTERM stops "
    "gracefully. Research use only."
)
SHORT_HELP = "Run the DICOM node: receive studies (C-STORE), run HyperCT, send SR + SEG back."
EXAMPLES = """Examples:
  hyperct serve -c node.yaml                 # settings: docs/node.md
  hyperct serve -c node.yaml --print-config  # the effective settings
  hyperct serve -c node.yaml --web           # console on 127.0.0.1:8080
  hyperct serve -m models --allow MODALITY -d PACS@pacs.example:104
  HYPERCT_NODE_RECEIVER_PORT=11113 hyperct serve -c node.yaml"""


def serve(
    config: Path = typer.Option(None, "--config", "-c", exists=True, dir_okay=False,
                                help="YAML file with a 'node:' section (or a node-only file). See docs/node.md."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Folder for state.sqlite, spool/, results/ (setting node.data-dir)."),
    ae_title: str = typer.Option(None, "--ae-title", help="Our AE title, checked as the called AE (setting receiver.ae-title, HYPERCT)."),
    bind: str = typer.Option(None, "--bind", help="Address the SCP listens on (setting receiver.bind, 127.0.0.1)."),
    port: int = typer.Option(None, "--port", "-p", help="DICOM port (setting receiver.port, 11112)."),
    allow: list[str] = typer.Option(None, "--allow", help="Allowed calling AE, 'AE' or 'AE@host' (repeat) (setting receiver.allowed-callers); others are rejected at association."),
    accept_any_caller: bool = typer.Option(None, "--accept-any-caller/--allow-list-only", help="Accept every calling AE (test benches only) (setting receiver.accept-any-caller, off)."),
    model: Path = typer.Option(None, "--model", "-m", help="Model folder with manifest.json (setting worker.model, ./models; with --config: next to the file)."),
    app_config: Path = typer.Option(None, "--app-config", help="app.yaml for the pipeline (setting worker.app-config, $HOLOSCAN_CONFIG_PATH or the repo's)."),
    destination: list[str] = typer.Option(None, "--destination", "-d", help="Where results go, AE@host:port (repeat) (setting outbox.destinations)."),
    calling_ae: str = typer.Option(None, "--calling-ae", help="Our AE title when sending results (setting outbox.calling-ae, HYPERCT)."),
    quiet_period: float = typer.Option(None, "--quiet-period", help="Seconds without a new instance before a study is complete (setting completion.quiet-period-s, 30)."),
    late_arrivals: str = typer.Option(None, "--late-arrivals", help="CT instances after completion: reprocess | ignore (both logged) (setting completion.late-arrivals, reprocess)."),
    retention: str = typer.Option(None, "--retention", help="Spool after results are delivered: delete | keep (setting spool.retention, keep)."),
    keep_days: float = typer.Option(None, "--keep-days", help="With --retention keep: days before removal, 0 = forever (setting spool.keep-days, 7)."),
    health_port: int = typer.Option(None, "--health-port", help="HTTP /healthz /readyz /metrics port, 0 = off (setting health.port, 8081)."),
    web: bool = typer.Option(None, "--web/--no-web", help="Serve the operator console and DICOMweb STOW-RS (setting web.enabled, off). See docs/web.md."),
    web_port: int = typer.Option(None, "--web-port", help="Console and STOW-RS port (setting web.port, 8080); bound to web.bind, 127.0.0.1."),
    log_level: str = typer.Option(None, "--log-level", help="DEBUG, INFO, WARNING, ERROR (setting logging.level, INFO)."),
    log_json: bool = typer.Option(None, "--log-json/--log-text", help="One JSON object per log line (setting logging.json, off). Logs carry UIDs, never patient names."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the effective settings as YAML and exit."),
) -> None:  # fmt: skip
    """Run the node until SIGTERM/SIGINT."""
    import yaml

    from app.node.config import NodeConfig

    overrides = {
        "data_dir": str(data_dir) if data_dir else None,
        "receiver.ae_title": ae_title,
        "receiver.bind": bind,
        "receiver.port": port,
        "receiver.allowed_callers": list(allow) if allow else None,
        "receiver.accept_any_caller": accept_any_caller,
        "worker.model": str(model) if model else None,
        "worker.app_config": str(app_config) if app_config else None,
        "outbox.destinations": list(destination) if destination else None,
        "outbox.calling_ae": calling_ae,
        "completion.quiet_period_s": quiet_period,
        "completion.late_arrivals": late_arrivals,
        "spool.retention": retention,
        "spool.keep_days": keep_days,
        "health.port": health_port,
        "web.enabled": web,
        "web.port": web_port,
        "logging.level": log_level,
        "logging.json": log_json,
    }
    try:
        cfg = NodeConfig.load(config, overrides=overrides)
    except (ValueError, OSError) as exc:
        fail(exc)
    if print_config:
        typer.echo(yaml.safe_dump({"node": cfg.to_dict()}, sort_keys=False))
        raise typer.Exit(0)
    from app.node.service import NodeService, StartError, configure_logging

    configure_logging(cfg.logging.level, cfg.logging.as_json)
    try:
        NodeService(cfg).serve_forever()
    except StartError as exc:
        fail(exc)
