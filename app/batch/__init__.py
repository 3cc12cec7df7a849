"""Batch reprocessing of archives (``hyperct process ARCHIVE OUT``).

discover (walk any layout, unpack zips into a bounded cache) → index (header-only SQLite index of
studies, series and files) → runner (prefetching pipeline over the filtered studies, the same stage
code as ``hyperct run``) → ledger (resumable, one transaction per study) → table (findings CSV +
Parquet, errors.csv).
"""
