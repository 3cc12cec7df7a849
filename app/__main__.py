"""MAP / SDK entry: ``python -m app -i IN -o OUT -m MODELS`` or the ``HOLOSCAN_*_PATH`` variables.

Exits 0 with ``outcome.json`` when no series is eligible (a workflow manager would retry a
non-zero exit, and a retry cannot make a series eligible); failures exit 1 with the message.
"""

from __future__ import annotations

import logging
import sys

from app.app import EXIT_FAILED, HyperCTApp, exit_code


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every copied module at INFO
    try:
        app = HyperCTApp()  # Holoscan reads sys.argv itself; init_app_context parses -i/-o/-m
        app.run()
    except Exception as exc:  # noqa: BLE001 - report and exit non-zero, never a bare traceback only
        logging.getLogger("app").exception("HyperCT app failed: %s", exc)
        return EXIT_FAILED
    for s in app.summaries:
        logging.getLogger("app").info("study %s: %s %s", s["study_instance_uid"], s["outcome"], s["reason"])
    return exit_code(app.summaries, map_entry=True)


if __name__ == "__main__":
    sys.exit(main())
