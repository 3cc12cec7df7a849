"""Key images: one PNG per positive finding, the axial slice where its attention peaks.

Why: the Parametric Map and the SEG are the faithful views of where the model looked, but they need
a DICOM viewer. A key image is what a reader can open anywhere (a results folder, a ticket, the web
console) to see at a glance which slice drove a finding: the CT in a window suited to the finding,
the attention overlaid where it is high, a colour bar, and a title with the finding, its probability
and the research-use (and synthetic-model) label. It carries no patient attributes, like
``results.json`` beside it (``docs/results.md`` §2), so it can travel the same way.

:func:`render_key_image` is a pure function of the CT volume (HU, source geometry), the attention map
on the same grid and a :class:`KeyImageMeta`, returning PNG bytes; the pipeline's stage
(:func:`operators.stages.write_case_key_images`) writes the files, and a viewer can call it directly.

Drawn with Pillow and numpy, not matplotlib: matplotlib belongs to the ``train`` extra and is not in
the MAP (``packaging/requirements-map.txt``), while Pillow already comes with highdicom; a fixed
layout needs no plotting library (windowing, the colour map and the blending are a few array
operations, the text is Pillow's bundled font). Pillow is imported inside the renderer, so importing
this module costs nothing at start-up.
"""

from __future__ import annotations

import functools
import io
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from operators.manifest import Concept
    from operators.results import StudyResult, TaskResult
    from operators.volume import Volume

logger = logging.getLogger(__name__)

__all__ = [
    "KEY_IMAGES_DIR",
    "KEY_IMAGE_SIZE",
    "LUNG_WINDOW",
    "SOFT_TISSUE_WINDOW",
    "KeyImageMeta",
    "Window",
    "key_image_file_key",
    "key_image_name",
    "peak_slice",
    "plan_key_images",
    "render_key_image",
    "window_for",
]

#: The key images' folder beside ``results.json``.
KEY_IMAGES_DIR = "key_images"

#: Layout in pixels: the CT fits a square box, the colour bar and its labels sit to its right, the
#: title above and the caption below. Fixed, so every key image has the same size (``KEY_IMAGE_SIZE``).
_BOX = 512
_MARGIN = 16
_TITLE_H = 52
_CAPTION_H = 44
_BAR_W = 16
_BAR_LABELS_W = 80
KEY_IMAGE_SIZE = (_MARGIN + _BOX + _MARGIN + _BAR_W + _BAR_LABELS_W, _TITLE_H + _BOX + _CAPTION_H)
_TEXT_W = KEY_IMAGE_SIZE[0] - 2 * _MARGIN

#: Overlay opacity: enough to read the colour, little enough to see the CT under it.
_ALPHA = 0.45
_BACKGROUND = (0, 0, 0)
_TEXT = (235, 235, 235)
_WARNING = (255, 190, 60)


@dataclass(frozen=True)
class Window:
    """A CT display window: HU ``level`` ± ``width`` / 2 spread over black to white."""

    name: str
    width: float
    level: float

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise ValueError(f"window width must be > 0, got {self.width}")

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """``hu`` as 8-bit grey values (below the window black, above it white)."""
        low = self.level - self.width / 2.0
        grey = (np.asarray(hu, dtype=np.float32) - low) * (255.0 / self.width)
        return np.clip(np.nan_to_num(grey), 0.0, 255.0).round().astype(np.uint8)

    @property
    def label(self) -> str:
        return f"{self.name} window W{self.width:g}/L{self.level:g}"


#: The usual chest CT presets: the lung window shows parenchyma and airways (a soft-tissue window
#: renders the whole lung black); the soft-tissue (mediastinal) window shows heart, vessels, pleural
#: and pericardial fluid, nodes and calcium, and is the default for any other site.
LUNG_WINDOW = Window("lung", 1500.0, -600.0)
SOFT_TISSUE_WINDOW = Window("soft-tissue", 400.0, 40.0)

#: Finding sites read in the lung window (SCT "Lung", "Bronchus"): chosen by the manifest's finding
#: site rather than by task key, so a model with other tasks gets a sensible window too.
_LUNG_SITES = frozenset({("SCT", "39607008"), ("SCT", "955009")})


def window_for(finding_site: Concept | None) -> Window:
    """The window a finding's key image uses: the lung window for lung and airway sites, else the
    soft-tissue window."""
    if finding_site is not None and (finding_site.scheme_designator, finding_site.value) in _LUNG_SITES:
        return LUNG_WINDOW
    return SOFT_TISSUE_WINDOW


@dataclass(frozen=True, eq=False)
class KeyImageMeta:
    """What a key image says besides its pixels.

    ``pixel_spacing_mm`` is (row step, column step), as DICOM PixelSpacing, so the image keeps the
    patient's proportions. ``direction`` is the volume's direction cosines (``Volume.direction``,
    columns = LPS directions of increasing column, row, slice index): with it the slice is shown the
    radiological way (patient's right on the image's left, anterior up) and labelled R/L/A/P; None
    shows it as stored. ``overlay_fraction``: attention below this fraction of the map's peak is not
    coloured (the task's relative saliency threshold, so the colour covers the relative region of
    ``docs/results.md`` §4 on that slice).
    """

    finding: str
    probability: float
    threshold: float
    synthetic: bool = False
    window: Window = SOFT_TISSUE_WINDOW
    overlay_fraction: float = 0.5
    pixel_spacing_mm: tuple[float, float] = (1.0, 1.0)
    direction: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.overlay_fraction <= 1.0:
            raise ValueError(f"overlay_fraction must be in (0, 1], got {self.overlay_fraction}")
        if min(self.pixel_spacing_mm) <= 0:
            raise ValueError(f"pixel_spacing_mm must be > 0, got {self.pixel_spacing_mm}")

    @classmethod
    def of(cls, task: TaskResult, volume: Volume, *, synthetic: bool) -> KeyImageMeta:
        """The meta of one finding of a study: its window, its saliency threshold, the volume's
        pixel spacing and orientation."""
        col_mm, row_mm = (float(s) for s in volume.spacing[:2])
        return cls(
            finding=task.name,
            probability=task.probability,
            threshold=task.threshold,
            synthetic=synthetic,
            window=window_for(task.finding_site),
            overlay_fraction=task.effective_saliency_threshold,
            pixel_spacing_mm=(row_mm, col_mm),
            direction=volume.direction,
        )


def key_image_file_key(task_key: str) -> str:
    """The ``StudyCase.files`` / ``outcome.json`` key of one finding's key image (not a DICOM kind,
    so ``study_case.dicom_file_keys`` never sends it)."""
    return f"key_image:{task_key}"


_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def key_image_name(task_key: str) -> str:
    """The file name of a finding's key image; task keys are snake_case (the manifest checks), but
    a key is a file name here, so anything that could leave the folder is refused."""
    if not _SAFE_NAME.fullmatch(task_key):
        raise ValueError(f"task key {task_key!r} cannot name a key image file")
    return f"{task_key}.png"


def plan_key_images(result: StudyResult) -> list[TaskResult]:
    """The findings that get a key image, in task order: present, saliency allowed, an attention map
    with some attention (the Parametric Maps' rule, ``pmap_writer.plan_maps``)."""
    return [
        t
        for t in result.tasks
        if t.present and t.saliency and t.attention is not None and float(np.max(t.attention)) > 0.0
    ]


def peak_slice(attention: np.ndarray) -> int:
    """The slice index (axis 0) holding the map's maximum; the first one when several share it."""
    a = np.asarray(attention)
    if a.ndim != 3 or a.size == 0:
        raise ValueError(f"attention must be a non-empty [slices, rows, cols] array, got shape {a.shape}")
    flat = int(np.argmax(a))
    if not float(a.flat[flat]) > 0.0:
        raise ValueError("the attention map has no positive value: no peak to show")
    return flat // (a.shape[1] * a.shape[2])


def render_key_image(
    hu: np.ndarray, attention: np.ndarray, meta: KeyImageMeta, *, slice_index: int | None = None
) -> bytes:
    """A PNG (``KEY_IMAGE_SIZE``) of slice ``slice_index`` (default: :func:`peak_slice`) of ``hu``
    ([slices, rows, cols], HU) in ``meta.window``, with ``attention`` (same shape) overlaid where it
    is at least ``meta.overlay_fraction`` of its peak.

    The PNG's text chunks repeat the title and name the slice (``hyperct:slice_index``, 0-based, in
    the volume's slice order), so a reader of the file knows which slice it shows.
    """
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    hu, attention = np.asarray(hu), np.asarray(attention)
    if hu.ndim != 3 or attention.shape != hu.shape:
        raise ValueError(f"hu {hu.shape} and attention {attention.shape} must be the same 3-D shape")
    k = peak_slice(attention) if slice_index is None else int(slice_index)
    if not 0 <= k < hu.shape[0]:
        raise ValueError(f"slice_index {k} is outside 0..{hu.shape[0] - 1}")
    peak = float(np.max(attention))
    relative = (
        np.asarray(attention[k], dtype=np.float32) / peak if peak > 0 else np.zeros(hu.shape[1:], np.float32)
    )

    canvas = Image.new("RGB", KEY_IMAGE_SIZE, _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    _draw_slice(canvas, draw, meta.window.apply(hu[k]), relative, meta)
    _colour_bar(canvas, draw, meta.overlay_fraction)
    title, label = _draw_title(draw, meta)
    captions = (
        f"slice {k + 1} of {hu.shape[0]}, {meta.window.label}",
        f"colour: attention >= {meta.overlay_fraction:.0%} of its peak (where the model looked, not a lesion outline)",
    )
    for i, line in enumerate(captions):
        at = (_MARGIN, _TITLE_H + _BOX + 6 + 18 * i)
        draw.text(at, _fit(draw, line, _font(13), _TEXT_W), fill=_TEXT, font=_font(13))

    info = PngInfo()
    info.add_text("Title", title)
    info.add_text("Description", f"{label}. {captions[0]}. {captions[1]}.")
    info.add_text("Software", "HyperCT Node")
    info.add_text("hyperct:slice_index", str(k))
    out = io.BytesIO()
    canvas.save(out, "PNG", pnginfo=info)
    logger.debug("key image of %s: slice %d of %d, %d bytes", meta.finding, k, hu.shape[0], out.tell())
    return out.getvalue()


def _draw_slice(canvas: Any, draw: Any, grey: np.ndarray, relative: np.ndarray, meta: KeyImageMeta) -> None:
    """The windowed slice with the overlay blended in, turned the radiological way, scaled to the
    patient's proportions and centred in the CT box, with R/L/A/P letters when the orientation is
    known (white on black, so they are never mistaken for overlay)."""
    from PIL import Image

    grey, relative, spacing, edges = _oriented(grey, relative, meta)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    coloured = relative >= meta.overlay_fraction
    colours = _jet((relative[coloured] - meta.overlay_fraction) / max(1.0 - meta.overlay_fraction, 1e-6))
    rgb[coloured] = (1.0 - _ALPHA) * rgb[coloured] + _ALPHA * colours

    height_mm, width_mm = grey.shape[0] * spacing[0], grey.shape[1] * spacing[1]
    scale = _BOX / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    plane = Image.fromarray(rgb.round().astype(np.uint8), "RGB").resize(size, Image.Resampling.BILINEAR)
    left, top = _MARGIN + (_BOX - size[0]) // 2, _TITLE_H + (_BOX - size[1]) // 2
    canvas.paste(plane, (left, top))
    if edges is None:
        return
    west, east, north, south = edges
    mid_x, mid_y = left + size[0] // 2, top + size[1] // 2
    letter = dict(fill=_TEXT, font=_font(13), stroke_width=2, stroke_fill=_BACKGROUND)
    draw.text((left + 4, mid_y), west, anchor="lm", **letter)
    draw.text((left + size[0] - 4, mid_y), east, anchor="rm", **letter)
    draw.text((mid_x, top + 4), north, anchor="mt", **letter)
    draw.text((mid_x, top + size[1] - 4), south, anchor="mb", **letter)


def _draw_title(draw: Any, meta: KeyImageMeta) -> tuple[str, str]:
    """The finding with its probability and threshold, and the research-use label below it (amber
    when the model is synthetic); returns both texts for the PNG's metadata."""
    numbers = f": probability {meta.probability:.3f} (threshold {meta.threshold:.3f})"
    label = "Research use only, not for diagnosis"
    if meta.synthetic:
        label += ". SYNTHETIC DEMO, NOT CLINICAL"
    big, small = _font(17), _font(13)
    name = _fit(draw, meta.finding, big, _TEXT_W - int(draw.textlength(numbers, font=big)))
    draw.text((_MARGIN, 8), name + numbers, fill=_TEXT, font=big)
    draw.text(
        (_MARGIN, 30),
        _fit(draw, label, small, _TEXT_W),
        fill=_WARNING if meta.synthetic else _TEXT,
        font=small,
    )
    return meta.finding + numbers, label


def _oriented(
    grey: np.ndarray, relative: np.ndarray, meta: KeyImageMeta
) -> tuple[np.ndarray, np.ndarray, tuple[float, float], tuple[str, str, str, str] | None]:
    """The slice turned the radiological way when the direction is known: columns running toward
    the patient's left, rows toward posterior (an axial source may store either flipped, or rows and
    columns swapped). Returns both planes, the (row, column) spacing and the edge letters (left,
    right, top, bottom) or None."""
    spacing = meta.pixel_spacing_mm
    if meta.direction is None:
        return grey, relative, spacing, None
    d = np.asarray(meta.direction, dtype=np.float64)
    cols, rows = d[:, 0], d[:, 1]
    if abs(cols[0]) < abs(rows[0]):  # columns run along A/P: swap rows and columns
        grey, relative = grey.T, relative.T
        cols, rows = rows, cols
        spacing = (spacing[1], spacing[0])
    if cols[0] < 0:
        grey, relative = grey[:, ::-1], relative[:, ::-1]
    if rows[1] < 0:
        grey, relative = grey[::-1], relative[::-1]
    return np.ascontiguousarray(grey), np.ascontiguousarray(relative), spacing, ("R", "L", "A", "P")


def _jet(x: np.ndarray) -> np.ndarray:
    """The jet colour map (blue → cyan → yellow → red) of ``x`` in [0, 1], as RGB 0..255 rows: the
    usual saliency overlay, and none of its colours is a grey that could pass for CT."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # red, green, blue peaks
    return np.clip(1.5 - np.abs(4.0 * x - 4.0 * centres), 0.0, 1.0) * 255.0


def _colour_bar(canvas: Any, draw: Any, fraction: float) -> None:
    """The overlay's scale beside the CT: its colours from the cut-off (bottom) to the peak (top),
    unblended, labelled with the fractions of the peak they stand for."""
    from PIL import Image

    x0 = _MARGIN + _BOX + _MARGIN
    column = _jet(np.linspace(1.0, 0.0, _BOX, dtype=np.float32)).round().astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(column[:, None, :], _BAR_W, axis=1), "RGB"), (x0, _TITLE_H))
    text_x, font = x0 + _BAR_W + 4, _font(13)
    draw.text((text_x, _TITLE_H), "peak", fill=_TEXT, font=font, anchor="lt")
    draw.text((text_x, _TITLE_H + _BOX // 2), "attention", fill=_TEXT, font=font, anchor="lm")
    draw.text((text_x, _TITLE_H + _BOX), f"{fraction:.0%}", fill=_TEXT, font=font, anchor="lb")


@functools.lru_cache(maxsize=4)
def _font(size: int) -> Any:
    """Pillow's bundled FreeType font at ``size`` px (Pillow >= 10.1; Pillow's wheels carry
    FreeType), which the text anchors need."""
    from PIL import ImageFont

    return ImageFont.load_default(size)


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    """``text`` shortened with "..." to fit ``width`` pixels (a long finding name gives way, never
    the probability after it)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "..."
