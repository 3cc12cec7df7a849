"""The model manifest: the only contract between ``training/`` (which writes it) and serving.

A model folder (``models/hyperct/``) holds ``manifest.json`` and the ONNX files it names. The
manifest is versioned and validated on load; every error names the field (and the task) at fault,
because a half-valid model that serves wrong codes or wrong preprocessing is worse than none.
Serving reads tasks, codes, thresholds and preprocessing parameters from here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
TASK_GROUPS = ("radiology", "cardiac")
MODEL_FORMATS = ("merged", "factored")
PRECISIONS = ("fp32", "fp16", "int8")
IO_DTYPES = ("float32", "float16", "bool", "int64")
#: Inputs/outputs every model declares; the factored format adds the ``task`` input.
REQUIRED_INPUTS = ("images", "mask")
REQUIRED_OUTPUTS = ("logit",)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KEY = re.compile(r"^[a-z][a-z0-9_]*$")


class ManifestError(ValueError):
    """A model manifest or model folder is not usable; the message names what is wrong."""


@dataclass(frozen=True)
class Concept:
    """A coded concept (DICOM code sequence item) for the SR."""

    value: str
    scheme_designator: str
    meaning: str
    scheme_version: str | None = None


@dataclass(frozen=True)
class CodingScheme:
    """A private coding scheme to declare in the SR's CodingSchemeIdentificationSequence."""

    designator: str
    name: str
    responsible_organization: str = ""
    version: str = ""


@dataclass(frozen=True)
class DataFile:
    """A file a task's ONNX model needs besides itself (ONNX external data, for models over 2 GB)."""

    file: str
    sha256: str


@dataclass(frozen=True)
class TaskEntry:
    """One task the model serves.

    ``graph_task_index`` is the value fed to the ``task`` input of a factored model (all tasks share
    one file); ``threshold_source`` says where ``threshold`` came from (a default 0.5 is not a
    calibrated operating point).
    """

    index: int
    key: str
    name: str
    group: str
    definition: str
    concept: Concept
    file: str
    sha256: str
    threshold: float
    saliency: bool = True
    finding_site: Concept | None = None
    saliency_threshold: float | None = None
    validation_auroc: float | None = None
    prevalence: float | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    threshold_source: str = ""
    graph_task_index: int | None = None
    external_data: tuple[DataFile, ...] = ()

    def files(self) -> tuple[tuple[str, str], ...]:
        """``(file, sha256)`` of the model file and its external data files."""
        return ((self.file, self.sha256), *((d.file, d.sha256) for d in self.external_data))


@dataclass(frozen=True)
class ModelManifest:
    """A parsed, validated manifest (see ``docs/model-manifest.md``)."""

    schema_version: int
    name: str
    version: str
    created: str
    format: str
    precision: str
    backbone: dict[str, Any]
    preprocessing: dict[str, Any]
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    tasks: tuple[TaskEntry, ...]
    intended_use: str
    licences: tuple[dict[str, str], ...]
    training_data: dict[str, Any]
    coding_schemes: tuple[CodingScheme, ...] = ()
    synthetic: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def task(self, key: str) -> TaskEntry:
        for t in self.tasks:
            if t.key == key:
                return t
        raise KeyError(f"model {self.name} has no task {key!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"] = [asdict(t) for t in self.tasks]
        for t in d["tasks"]:
            t["external_data"] = list(t["external_data"])
        d["licences"] = list(self.licences)
        d["coding_schemes"] = [asdict(c) for c in self.coding_schemes]
        extra = d.pop("extra")
        d.update(extra)
        return d


def _require(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ManifestError(f"{where}: missing required field {key!r}")
    value = d[key]
    if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool) and typ in (int, float)):
        names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise ManifestError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def _concept(d: Any, where: str) -> Concept:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: must be an object with value, scheme_designator, meaning")
    return Concept(
        value=_require(d, "value", str, where),
        scheme_designator=_require(d, "scheme_designator", str, where),
        meaning=_require(d, "meaning", str, where),
        scheme_version=d.get("scheme_version"),
    )


def _probability(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ManifestError(f"{where}: must be a number in [0, 1], got {value!r}")
    return float(value)


def _sha256(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise ManifestError(f"{where}: sha256 must be 64 lower-case hex digits")
    return value


def _data_files(value: Any, where: str) -> tuple[DataFile, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ManifestError(f"{where}: external_data must be a list of {{file, sha256}} objects")
    out = []
    for j, item in enumerate(value):
        w = f"{where}.external_data[{j}]"
        if not isinstance(item, dict):
            raise ManifestError(f"{w}: must be an object with file and sha256")
        out.append(DataFile(file=_require(item, "file", str, w), sha256=_sha256(item.get("sha256"), w)))
    return tuple(out)


def _io_spec(section: Any, required: tuple[str, ...], where: str) -> dict[str, Any]:
    """``{name: {dtype, shape, ...}}``; shape entries are ints or a named dynamic dimension."""
    if not isinstance(section, dict):
        raise ManifestError(f"manifest: field {where!r} must be an object of name -> {{dtype, shape}}")
    for name in required:
        if name not in section:
            raise ManifestError(f"{where}: missing required entry {name!r}")
    for name, spec in section.items():
        w = f"{where}.{name}"
        if not isinstance(spec, dict):
            raise ManifestError(f"{w}: must be an object with dtype and shape")
        dtype = _require(spec, "dtype", str, w)
        if dtype not in IO_DTYPES:
            raise ManifestError(f"{w}: dtype must be one of {IO_DTYPES}, got {dtype!r}")
        shape = _require(spec, "shape", list, w)
        for dim in shape:
            named = isinstance(dim, str) and bool(dim)
            sized = isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0
            if not (named or sized):
                raise ManifestError(f"{w}: shape entries must be sizes >= 0 or dimension names, got {dim!r}")
    return section


def _task(d: Any, i: int) -> TaskEntry:
    where = f"tasks[{i}]"
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: must be an object")
    key = _require(d, "key", str, where)
    where = f"tasks[{i}] ({key})"
    if not _KEY.match(key):
        raise ManifestError(f"{where}: key must be snake_case")
    group = _require(d, "group", str, where)
    if group not in TASK_GROUPS:
        raise ManifestError(f"{where}: group must be one of {TASK_GROUPS}, got {group!r}")
    sha = _sha256(_require(d, "sha256", str, where), where)
    graph_index = d.get("graph_task_index")
    if graph_index is not None and (
        isinstance(graph_index, bool) or not isinstance(graph_index, int) or graph_index < 0
    ):
        raise ManifestError(f"{where}: graph_task_index must be an integer >= 0, got {graph_index!r}")
    source = d.get("threshold_source", "")
    if not isinstance(source, str):
        raise ManifestError(f"{where}: threshold_source must be a string")
    site = d.get("finding_site")
    thresholds = d.get("thresholds", {})
    if not isinstance(thresholds, dict):
        raise ManifestError(f"{where}: thresholds must be an object of name -> probability")
    return TaskEntry(
        index=_require(d, "index", int, where),
        key=key,
        name=_require(d, "name", str, where),
        group=group,
        definition=_require(d, "definition", str, where),
        concept=_concept(d.get("concept"), f"{where}.concept"),
        file=_require(d, "file", str, where),
        sha256=sha,
        threshold=_probability(d.get("threshold"), f"{where}.threshold"),
        saliency=bool(d.get("saliency", True)),
        finding_site=_concept(site, f"{where}.finding_site") if site is not None else None,
        saliency_threshold=(
            _probability(d["saliency_threshold"], f"{where}.saliency_threshold")
            if d.get("saliency_threshold") is not None
            else None
        ),
        validation_auroc=(
            _probability(d["validation_auroc"], f"{where}.validation_auroc")
            if d.get("validation_auroc") is not None
            else None
        ),
        prevalence=(
            _probability(d["prevalence"], f"{where}.prevalence") if d.get("prevalence") is not None else None
        ),
        thresholds={str(k): _probability(v, f"{where}.thresholds.{k}") for k, v in thresholds.items()},
        threshold_source=source,
        graph_task_index=graph_index,
        external_data=_data_files(d.get("external_data"), where),
    )


_KNOWN = {
    "schema_version", "name", "version", "created", "format", "precision", "backbone", "preprocessing",
    "inputs", "outputs", "tasks", "intended_use", "licences", "training_data", "coding_schemes",
    "synthetic",
}  # fmt: skip


def parse_manifest(data: Any) -> ModelManifest:
    """Validate a manifest dict; raises :class:`ManifestError` naming the first problem."""
    if not isinstance(data, dict):
        raise ManifestError("manifest: must be a JSON object")
    version = data.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ManifestError(
            f"manifest: unknown schema_version {version!r} (this HyperCT Node reads {SUPPORTED_SCHEMA_VERSIONS})"
        )
    fmt = _require(data, "format", str, "manifest")
    if fmt not in MODEL_FORMATS:
        raise ManifestError(f"manifest: format must be one of {MODEL_FORMATS}, got {fmt!r}")
    raw_tasks = _require(data, "tasks", list, "manifest")
    if not raw_tasks:
        raise ManifestError("manifest: tasks is empty; a model serves at least one task")
    tasks = tuple(_task(t, i) for i, t in enumerate(raw_tasks))
    keys = [t.key for t in tasks]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ManifestError(f"manifest: duplicate task keys {dupes}")
    schemes = tuple(
        CodingScheme(
            designator=_require(s, "designator", str, f"coding_schemes[{i}]"),
            name=_require(s, "name", str, f"coding_schemes[{i}]"),
            responsible_organization=s.get("responsible_organization", ""),
            version=s.get("version", ""),
        )
        for i, s in enumerate(data.get("coding_schemes", []))
    )
    declared = {s.designator for s in schemes}
    for t in tasks:
        for c in (t.concept, t.finding_site):
            if c is not None and c.scheme_designator.startswith("99") and c.scheme_designator not in declared:
                raise ManifestError(
                    f"tasks ({t.key}): private coding scheme {c.scheme_designator!r} is not declared in coding_schemes"
                )
    precision = _require(data, "precision", str, "manifest")
    if precision not in PRECISIONS:
        raise ManifestError(f"manifest: precision must be one of {PRECISIONS}, got {precision!r}")
    inputs = _io_spec(
        _require(data, "inputs", dict, "manifest"),
        REQUIRED_INPUTS + (("task",) if fmt == "factored" else ()),
        "inputs",
    )
    outputs = _io_spec(_require(data, "outputs", dict, "manifest"), REQUIRED_OUTPUTS, "outputs")
    if fmt == "factored":
        files = {t.file for t in tasks}
        if len(files) != 1:
            raise ManifestError(f"manifest: a factored model has one file for all tasks, got {sorted(files)}")
        for t in tasks:
            if t.graph_task_index is None:
                raise ManifestError(f"tasks ({t.key}): a factored model needs graph_task_index")
        rows = [t.graph_task_index for t in tasks]
        if len(set(rows)) != len(rows):
            raise ManifestError("manifest: graph_task_index values of a factored model must be distinct")
    licences = _require(data, "licences", list, "manifest")
    for i, lic in enumerate(licences):
        if not isinstance(lic, dict) or "name" not in lic:
            raise ManifestError(f"licences[{i}]: must be an object with at least a 'name'")
    return ModelManifest(
        schema_version=version,
        name=_require(data, "name", str, "manifest"),
        version=_require(data, "version", str, "manifest"),
        created=_require(data, "created", str, "manifest"),
        format=fmt,
        precision=precision,
        backbone=_require(data, "backbone", dict, "manifest"),
        preprocessing=_require(data, "preprocessing", dict, "manifest"),
        inputs=inputs,
        outputs=outputs,
        tasks=tasks,
        intended_use=_require(data, "intended_use", str, "manifest"),
        licences=tuple(licences),
        training_data=_require(data, "training_data", dict, "manifest"),
        coding_schemes=schemes,
        synthetic=bool(data.get("synthetic", False)),
        extra={k: v for k, v in data.items() if k not in _KNOWN},
    )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed (model files can pass 300 MB)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_sha256(model_dir: Path) -> str:
    """SHA-256 of the manifest file itself: identifies a model build in SRs and UIDs."""
    return sha256_file(Path(model_dir) / MANIFEST_NAME)


def find_model_dir(path: Path) -> Path:
    """Accept the model folder itself or a models root holding ``hyperct/`` (the MAP layout)."""
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return path
    if (path / "hyperct" / MANIFEST_NAME).is_file():
        return path / "hyperct"
    raise ManifestError(f"{path}: no {MANIFEST_NAME} here or in {path / 'hyperct'}")


def load_manifest(path: Path, *, verify_files: bool = True) -> ModelManifest:
    """Load and validate the manifest of a model folder; optionally check every file's hash."""
    model_dir = find_model_dir(path)
    file = model_dir / MANIFEST_NAME
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{file}: not valid JSON ({e})") from e
    manifest = parse_manifest(data)
    if verify_files:
        verify_task_files(manifest, model_dir)
    return manifest


def check_model(path: Path) -> Path:
    """The model folder at ``path`` (or its ``hyperct/``), with a valid manifest and every file it
    names present, without hashing them (the runner does that when it loads the model). Costs
    milliseconds, so a command checks its model before it starts any work: a node that listens
    without a usable model, or a run that fails after the graph started, helps nobody."""
    model_dir = find_model_dir(path)
    manifest = load_manifest(model_dir, verify_files=False)
    for t in manifest.tasks:
        for name, _ in t.files():
            _task_file(model_dir, t.key, name)
    return model_dir


def _task_file(model_dir: Path, task: str, name: str) -> Path:
    """A task's file, refused when it points outside the model folder or is missing."""
    root = Path(model_dir).resolve()
    f = (root / name).resolve()
    if root not in f.parents:
        raise ManifestError(f"tasks ({task}): file {name!r} points outside the model folder")
    if not f.is_file():
        raise ManifestError(f"tasks ({task}): file {name} is missing from {model_dir}")
    return f


def verify_task_files(manifest: ModelManifest, model_dir: Path) -> None:
    """Every task file (and its external data) exists, stays inside the model folder, and has the
    recorded SHA-256. A file shared by several tasks (factored format) is hashed once."""
    hashes: dict[Path, str] = {}
    for t in manifest.tasks:
        for name, expected in t.files():
            f = _task_file(model_dir, t.key, name)
            if f not in hashes:
                hashes[f] = sha256_file(f)
            got = hashes[f]
            if got != expected:
                raise ManifestError(
                    f"tasks ({t.key}): SHA-256 mismatch for {name}: manifest {expected[:12]}…, file {got[:12]}…"
                )
