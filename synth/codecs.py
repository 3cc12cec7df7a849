"""Transfer syntaxes the generator can write, and how each one is encoded.

Native syntaxes (explicit/implicit VR little endian, deflated) are written by our own fast writer.
RLE and JPEG 2000 lossless frames come from pydicom's encoders (pylibjpeg-rle / pylibjpeg-openjpeg).
JPEG lossless SV1 and JPEG-LS lossless come from DCMTK (``dcmcjpeg`` / ``dcmcjpls``), an independent
encoder, which transcodes files we first write as explicit VR little endian. All of them are
lossless on 12-bit unsigned data, so every syntax decodes to the same stored pixels.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Syntax:
    """One supported transfer syntax."""

    key: str
    uid: str
    label: str
    implicit: bool = False
    deflated: bool = False
    encapsulated: bool = False
    encoder: str = "native"  # native | pydicom | dcmtk
    tool: str | None = None
    tool_args: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()


SYNTAXES: dict[str, Syntax] = {
    s.key: s
    for s in (
        Syntax(
            "explicit", "1.2.840.10008.1.2.1", "Explicit VR Little Endian", aliases=("explicit-le", "evrle")
        ),
        Syntax(
            "implicit",
            "1.2.840.10008.1.2",
            "Implicit VR Little Endian",
            implicit=True,
            aliases=("implicit-le", "ivrle"),
        ),
        Syntax(
            "deflated",
            "1.2.840.10008.1.2.1.99",
            "Deflated Explicit VR Little Endian",
            deflated=True,
            aliases=("deflate",),
        ),
        Syntax(
            "jpeg-lossless",
            "1.2.840.10008.1.2.4.70",
            "JPEG Lossless, Non-Hierarchical, First-Order Prediction (SV1)",
            encapsulated=True,
            encoder="dcmtk",
            tool="dcmcjpeg",
            tool_args=("+e1", "+un", "-q"),
            aliases=("jpeg", "jpeg-sv1", "jpeg-ll"),
        ),
        Syntax(
            "jpeg-ls",
            "1.2.840.10008.1.2.4.80",
            "JPEG-LS Lossless",
            encapsulated=True,
            encoder="dcmtk",
            tool="dcmcjpls",
            tool_args=("+el", "+un", "-q"),
            aliases=("jpegls", "jpeg-ls-lossless", "jls"),
        ),
        Syntax(
            "rle",
            "1.2.840.10008.1.2.5",
            "RLE Lossless",
            encapsulated=True,
            encoder="pydicom",
            aliases=("rle-lossless",),
        ),
        Syntax(
            "j2k",
            "1.2.840.10008.1.2.4.90",
            "JPEG 2000 Lossless",
            encapsulated=True,
            encoder="pydicom",
            aliases=("jpeg2000", "jpeg-2000", "j2k-lossless"),
        ),
    )
}


def resolve_syntax(name: str) -> Syntax:
    """A syntax by key, alias or UID (case-insensitive); ``ValueError`` lists the valid names."""
    key = name.strip().lower().replace("_", "-")
    for s in SYNTAXES.values():
        if key in (s.key, s.uid, *s.aliases):
            return s
    raise ValueError(f"unknown transfer syntax {name!r}; valid: {', '.join(SYNTAXES)} (or their UIDs)")


def require_tool(tool: str) -> str:
    """Path of a DCMTK binary, or a clear ``RuntimeError`` saying how to install it."""
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(
            f"{tool} (DCMTK) is needed for this transfer syntax but is not on PATH; install it with `apt-get install dcmtk`"
        )
    return path


def encode_frame(syntax: Syntax, pixels: np.ndarray, bits_stored: int) -> bytes:
    """One encapsulated frame of a 2D uint16 array with pydicom's encoder for ``syntax``."""
    from pydicom.pixels import get_encoder

    enc = get_encoder(syntax.uid)
    plugin = "pylibjpeg" if "pylibjpeg" in enc.available_plugins else ""
    rows, cols = pixels.shape
    return enc.encode(
        np.ascontiguousarray(pixels),
        encoding_plugin=plugin,
        rows=rows,
        columns=cols,
        samples_per_pixel=1,
        bits_allocated=16,
        bits_stored=bits_stored,
        pixel_representation=0,
        photometric_interpretation="MONOCHROME2",
        number_of_frames=1,
    )


def dcmtk_transcode(syntax: Syntax, pairs: Sequence[tuple[Path, Path]], jobs: int | None = None) -> None:
    """Run the DCMTK encoder of ``syntax`` on (input, output) file pairs, a few processes at a time."""
    assert syntax.tool is not None
    tool = require_tool(syntax.tool)
    jobs = jobs or max(1, os.cpu_count() or 1)

    def run(pair: tuple[Path, Path]) -> None:
        src, dst = pair
        proc = subprocess.run(
            [tool, *syntax.tool_args, str(src), str(dst)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or not dst.exists():
            raise RuntimeError(
                f"{syntax.tool} failed on {src.name} (exit {proc.returncode}): {proc.stderr.strip()[:500]}"
            )

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(run, pairs))
