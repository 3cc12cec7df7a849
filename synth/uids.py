"""Deterministic DICOM UIDs.

``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` ignores ``entropy_srcs`` (pydicom 3.0
returns a random UUID4 whenever ``prefix`` is None), so it cannot give reproducible ``2.25`` UIDs.
We use name-based UUIDs (RFC 4122 version 5) under the ``2.25`` arc instead: the same inputs always
give the same UID, different inputs practically never collide, and no organisation root is needed.
"""

from __future__ import annotations

import logging
import uuid

log = logging.getLogger(__name__)

#: Fixed namespace of this generator (uuid5(NAMESPACE_URL, "hyperct-node:synth")).
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "hyperct-node:synth")


def synth_uid(*parts: object) -> str:
    """``2.25.<uuid5 as an integer>`` of the parts (joined with a separator so ("1","23") != ("12","3"))."""
    name = "\x1f".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(NAMESPACE, name).int}"


def short_hash(*parts: object, digits: int = 10) -> str:
    """A short decimal digest of the parts (accession numbers, folder names)."""
    name = "\x1f".join(str(p) for p in parts)
    return str(uuid.uuid5(NAMESPACE, name).int % 10**digits).zfill(digits)
