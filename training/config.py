"""Training configuration: dataclasses loaded from a YAML recipe, with ``section.key=value`` overrides.

One :class:`RunConfig` describes a whole run (data, model, optimiser, schedule, loop settings). It is
read from a recipe (``training/recipes/*.yaml``), patched by ``--set`` overrides on the command line,
validated strictly (unknown keys are errors that name the key: a typo must not silently fall back to
a default), and written back resolved as ``config.yaml`` next to the checkpoints, so a run can always
be repeated from its output folder. Defaults are the paper's settings (spec §6).

Standard library + PyYAML only: the CLI parses configs without importing torch.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).with_name("recipes")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the dotted key."""


@dataclass
class PretextConfig:
    """Label-free warm start of a random-init backbone (``training.pretext``); ``steps: 0`` = off."""

    steps: int = 0
    #: Side of the block grid whose per-channel means the CLS token predicts.
    grid: int = 6
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    #: Images drawn from each training scan into the pretext set (bounded memory).
    images_per_scan: int = 16


@dataclass
class ModelConfig:
    """Which backbone and hypernetwork to build (``training.model.build_hyperct`` arguments)."""

    #: Bundled config name (``tiny``, ``demo``, ``vitb16``) or a JSON file: random-init backbone.
    backbone: str = "vitb16"
    #: Local DINOv3 folder (the user's download); when set it wins over ``backbone``.
    backbone_path: str | None = None
    head_in_dim: int = 768
    rank: int = 16
    lora_scale: float = 1.0
    zero_init_b: bool = False
    target_types: tuple[str, ...] = ("q", "k", "v", "o", "up", "down")
    dropout: float = 0.05
    attn_implementation: str = "sdpa"
    #: Label-free warm start of a random-init config backbone (demo/tests; docs/training.md §8).
    pretext: PretextConfig = field(default_factory=PretextConfig)


@dataclass
class OptimizerConfig:
    """AdamW as in the released code (spec §6)."""

    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    #: Gradient-norm clip; 0 = off (the paper does not clip).
    grad_clip: float = 0.0
    #: Learning rate of the shared head (LayerNorm + Linear); None = ``lr`` (as the paper).
    head_lr: float | None = None


@dataclass
class ScheduleConfig:
    """LR schedule, stepped once per epoch: ``cosine`` (code, T_max = epochs), ``step`` (paper text), ``constant``."""

    kind: str = "cosine"
    #: Cosine period in epochs; None = the number of epochs.
    t_max: int | None = None
    eta_min: float = 0.0
    step_size: int = 15
    gamma: float = 0.1


@dataclass
class SplitConfig:
    """Patient-level split fractions (spec §2.1: 70/10/20) and its seed."""

    train: float = 0.7
    val: float = 0.1
    test: float = 0.2
    seed: int = 42
    #: Optional CSV (``key,split`` or ``patient_id,split``) that fixes the split instead of drawing it.
    file: str | None = None


@dataclass
class SyntheticConfig:
    """In-memory synthetic studies rendered by ``synth`` directly on the model grid (fast tests/demo)."""

    n_studies: int = 120
    #: Finding names (``synth.tasks.FINDING_NAMES``) drawn per study; each task's label comes from them.
    findings: tuple[str, ...] = ("pleural_effusion", "consolidation", "cardiomegaly", "pericardial_effusion")
    #: Probability that a finding is planted in a study (independently per finding).
    prevalence: float = 0.5
    seed: int = 0
    #: Pairs of studies per patient with complementary findings (matched positives/negatives).
    twins: bool = True
    #: ``model`` (rendered on the model grid; fast) or ``varied`` (spacing, offsets, HFS/FFS vary).
    geometry: str = "model"


@dataclass
class DataConfig:
    """Where the scans and labels come from (docs/training.md §Data)."""

    #: ``ctrate`` (NIfTI + CT-RATE CSVs), ``dicom`` (series folders + label CSV), ``synthetic``
    #: (in-memory phantoms) or ``synthetic_dicom`` (a folder written by ``hyperct synth``).
    kind: str = "ctrate"
    #: Volumes folder (ctrate), DICOM root (dicom, synthetic_dicom).
    root: str | None = None
    #: Label CSV: ``multi_abnormality_labels.csv`` (ctrate), keyed CSV (dicom), ``labels.csv`` (synthetic_dicom).
    labels: str | None = None
    #: CT-RATE metadata CSV (VolumeName, RescaleSlope, RescaleIntercept, ...).
    metadata: str | None = None
    #: Extra label CSVs keyed like ``labels`` (e.g. the output of ``hyperct labels echo``); joined on the key.
    extra_labels: tuple[str, ...] = ()
    #: Key column of the label CSVs for DICOM: ``StudyInstanceUID`` or ``AccessionNumber``.
    key_column: str = "StudyInstanceUID"
    #: Task keys to train (registry keys); empty = every task with a label column in the data.
    tasks: tuple[str, ...] = ()
    split: SplitConfig = field(default_factory=SplitConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    #: Series-selection rules (``operators.series_selection.SelectionRules.from_dict``); {} = serving defaults.
    series_selection: dict[str, Any] = field(default_factory=dict)
    #: Disk cache of preprocessed inputs; None = ``<out_dir>/cache``.
    cache_dir: str | None = None
    #: Training augmentation (random in-plane shift + flip, spec §3.1 step 3).
    augment: bool = True
    #: Go on past unreadable volumes / bad label rows (warn, count) instead of stopping.
    skip_bad: bool = False
    #: Processes that read + preprocess volumes into the cache before training (0 = this process).
    workers: int = 0
    #: DataLoader worker processes (0 = main process; cached reads are cheap, so 0 is usually best).
    loader_workers: int = 0
    #: Training only: each scan contributes a random subset of this many of its images per step
    #: (0 = all images, the paper). Validation, evaluation and serving always use every image; the
    #: masked mean pools any number of images, so this only makes a step cheaper (docs/training.md §8).
    train_images: int = 0


@dataclass
class RunConfig:
    """A complete training run. Paper settings by default (spec §6)."""

    name: str = "hyperct"
    seed: int = 42
    epochs: int = 20
    batch_size: int = 8
    eval_batch_size: int = 8
    #: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    device: str = "auto"
    #: ``fp32`` (as the code) or ``bf16`` (autocast; a deviation, spec O-17).
    precision: str = "fp32"
    #: Torch CPU threads; 0 = torch's default.
    threads: int = 0
    #: Evaluate on validation every N epochs (best epoch = highest mean validation AUROC).
    eval_every: int = 1
    #: Keep ``epoch_XXX.pt`` for every epoch (``last.pt`` is always kept for ``--resume``).
    keep_epoch_checkpoints: bool = False
    #: Task sampling per scan: ``uniform_valid`` (code: uniform over the scan's valid tasks).
    task_sampling: str = "uniform_valid"
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    #: Overrides of ``operators.preprocessing.PreprocessingConfig`` fields ({} = the serving defaults).
    preprocessing: dict[str, Any] = field(default_factory=dict)

    # -- validation ---------------------------------------------------------------------------------
    def validate(self) -> RunConfig:
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{key}: {msg}")

        need(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        need(self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        need(self.eval_every >= 1, "eval_every", f"must be >= 1, got {self.eval_every}")
        need(
            self.device in ("auto", "cpu", "cuda"),
            "device",
            f"must be auto, cpu or cuda, got {self.device!r}",
        )
        need(self.precision in ("fp32", "bf16"), "precision", f"must be fp32 or bf16, got {self.precision!r}")
        need(self.task_sampling == "uniform_valid", "task_sampling", "only 'uniform_valid' is implemented")
        need(self.optimizer.lr > 0, "optimizer.lr", f"must be > 0, got {self.optimizer.lr}")
        need(all(0 <= b < 1 for b in self.optimizer.betas), "optimizer.betas", "must be in [0, 1)")
        need(self.optimizer.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
        need(self.optimizer.grad_clip >= 0, "optimizer.grad_clip", "must be >= 0")
        need(
            self.schedule.kind in ("cosine", "step", "constant"),
            "schedule.kind",
            f"must be cosine, step or constant, got {self.schedule.kind!r}",
        )
        need(self.model.rank >= 1, "model.rank", "must be >= 1")
        pt = self.model.pretext
        need(pt.steps >= 0, "model.pretext.steps", f"must be >= 0, got {pt.steps}")
        need(pt.grid >= 1 and pt.batch_size >= 1 and pt.images_per_scan >= 1 and pt.lr > 0, "model.pretext",
             "grid, batch_size, images_per_scan and lr must be > 0")  # fmt: skip
        need(not (pt.steps and self.model.backbone_path), "model.pretext.steps",
             "a pretrained backbone folder (model.backbone_path) is never re-pretrained: set steps to 0")  # fmt: skip
        need(self.data.train_images >= 0, "data.train_images", f"must be >= 0, got {self.data.train_images}")
        need(self.model.head_in_dim >= 1, "model.head_in_dim", "must be >= 1")
        d = self.data
        need(
            d.kind in ("ctrate", "dicom", "synthetic", "synthetic_dicom"),
            "data.kind",
            f"must be ctrate, dicom, synthetic or synthetic_dicom, got {d.kind!r}",
        )
        s = d.split
        fr = (s.train, s.val, s.test)
        need(all(f >= 0 for f in fr) and s.train > 0, "data.split", "fractions must be >= 0, train > 0")
        need(abs(sum(fr) - 1.0) < 1e-6, "data.split", f"train + val + test must be 1, got {sum(fr):g}")
        syn = d.synthetic
        need(syn.n_studies >= 1, "data.synthetic.n_studies", "must be >= 1")
        need(0 < syn.prevalence < 1, "data.synthetic.prevalence", "must be in (0, 1)")
        need(syn.geometry in ("model", "varied"), "data.synthetic.geometry", "must be model or varied")
        need(d.workers >= 0, "data.workers", "must be >= 0")
        need(d.loader_workers >= 0, "data.loader_workers", "must be >= 0")
        if d.kind in ("ctrate", "dicom", "synthetic_dicom"):
            need(bool(d.root), "data.root", f"is required for data.kind={d.kind}")
            if d.kind != "synthetic_dicom":
                need(bool(d.labels), "data.labels", f"is required for data.kind={d.kind}")
        if self.preprocessing:
            from operators.preprocessing import PreprocessingConfig, PreprocessingConfigError

            known = {f.name for f in dataclasses.fields(PreprocessingConfig)}
            unknown = sorted(set(self.preprocessing) - known)
            need(not unknown, "preprocessing", f"unknown key(s) {', '.join(unknown)}")
            try:
                PreprocessingConfig(**self.preprocessing)
            except PreprocessingConfigError as exc:
                raise ConfigError(str(exc)) from None
        return self

    # -- (de)serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RunConfig:
        return _build(cls, dict(data or {}), "")

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_yaml(), encoding="utf-8")
        return p


# --------------------------------------------------------------------------------------------------
# Loading, overrides
# --------------------------------------------------------------------------------------------------


def recipe_path(name_or_path: str | Path) -> Path:
    """A bundled recipe name (``demo``, ``paper``) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe file {str(p)!r} does not exist")
        return p
    bundled = RECIPES_DIR / f"{name_or_path}.yaml"
    if not bundled.is_file():
        names = ", ".join(sorted(q.stem for q in RECIPES_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown recipe {str(name_or_path)!r} (bundled: {names}; or give a .yaml path)")
    return bundled


def load_config(
    recipe: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    extra: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Recipe (or the defaults) → apply ``extra`` (nested dict) → apply ``key=value`` overrides → validate."""
    import yaml

    data: dict[str, Any] = {}
    if recipe is not None:
        path = recipe_path(recipe)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path.name}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path.name}: the top level must be a mapping")
        data = loaded or {}
    if extra:
        _merge(data, dict(extra))
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    return RunConfig.from_dict(data).validate()


def parse_override(item: str) -> tuple[str, Any]:
    """``optimizer.lr=1e-3`` → (``optimizer.lr``, 0.001); the value is parsed as YAML (lists, bools, null)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _merge(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


# --------------------------------------------------------------------------------------------------
# Strict dataclass construction from plain data
# --------------------------------------------------------------------------------------------------


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (known in {prefix.rstrip('.') or 'the top level'}: "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, f"{key}.")  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            if value is None:
                raise ConfigError(f"{key}: expected a list, got null")
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, Sequence):
                raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value, strict=True))
    if origin is dict or tp is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value
