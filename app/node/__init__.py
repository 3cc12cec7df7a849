"""The DICOM node behind ``hyperct serve``: durable receive, study completion, worker, outbox.

See docs/node.md. Modules: ``config`` (YAML + env + CLI), ``spool`` (durable files), ``store``
(SQLite), ``scheduler`` (quiet period), ``worker`` (the pipeline, models loaded once), ``outbox``
(C-STORE with retries), ``recovery`` (restart and rebuild), ``retention`` (purge), ``service`` (all
of it). Its HTTP face (probes, metrics, console, STOW-RS) is :mod:`app.web`.
"""
