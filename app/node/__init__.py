"""The DICOM node behind ``hyperct serve``: durable receive, study completion, worker, outbox.

See docs/node.md. Modules: ``config`` (YAML + env + CLI), ``spool`` (durable files), ``state``
(SQLite), ``scheduler`` (quiet period), ``worker`` (the pipeline, models loaded once), ``outbox``
(C-STORE with retries), ``recovery`` (restart and rebuild), ``health`` (HTTP), ``service`` (all of it).
"""
