"""Training configuration: typed sections loaded from a YAML recipe, with ``section.key=value`` overrides.

One :class:`RunConfig` describes a whole run (data, model, optimiser, schedule, loop settings). It is
read from a recipe (``training/recipes/*.yaml``), patched by ``--set`` overrides on the command line,
validated strictly (unknown keys are errors that name the key: a typo must not silently fall back to
a default), and written back resolved as ``config.yaml`` next to the checkpoints, so a run can always
be repeated from its output folder. Defaults are the paper's settings (spec §6).

The sections are :class:`operators.settings.Settings` models, the same typed layer as ``app.yaml``
and the node file (keys may be written with ``_`` or ``-``). Pydantic and PyYAML only: the CLI
parses configs without importing torch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from operators.series_selection import SelectionRules
from operators.settings import CommaList, Settings, SettingsError, merge, set_dotted

logger = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).with_name("recipes")

#: A configuration value or key is invalid; the message names the dotted key.
ConfigError = SettingsError


class _Section(Settings):
    key_separator: ClassVar[str] = "_"  # recipes write keys with underscores


class FractionTarget(_Section):
    """One pretext target: per block of a ``grid × grid`` grid, the share of the middle channel's pixels
    below ``below_hu`` and/or above ``above_hu`` (both: the band between; HU, read back through the
    preprocessing window)."""

    grid: int = Field(ge=1)
    below_hu: float | None = None
    above_hu: float | None = None
    #: Count only pixels inside the body: not in the air connected to the image border (a flood fill
    #: of < -940 HU from the edge, ``training.pretext.outside_air``). Gas or low-attenuation lung then
    #: varies with what is in the body, not with the body's outline (off: the outline dominates).
    interior: bool = False
    #: Weight of this target's columns in the CLS regression, against 1 for each block-mean column: a
    #: few sparse targets next to 48 block means are otherwise the first thing the CLS drops (§8).
    weight: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _thresholds(self) -> FractionTarget:
        if self.below_hu is None and self.above_hu is None:
            raise ValueError("give below_hu, above_hu or both")
        if self.below_hu is not None and self.above_hu is not None and self.above_hu >= self.below_hu:
            raise ValueError("a band needs above_hu < below_hu")
        return self


class PretextConfig(_Section):
    """Label-free warm start of a random-init backbone (``training.pretext``); ``steps: 0`` = off."""

    steps: int = Field(default=0, ge=0)
    #: Side of the block grid whose per-channel means the CLS token predicts.
    grid: int = Field(default=6, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = 0.01
    #: Images drawn from each training scan into the pretext set (bounded memory).
    images_per_scan: int = Field(default=16, ge=1)
    #: Voxel-fraction targets besides the block means: small dark or bright things (emphysema, calcified
    #: plaques, metal) hardly move a block mean (docs/training.md §8).
    fractions: tuple[FractionTarget, ...] = ()
    #: Weight of a dense term (0 = off): every patch token also regresses its own patch's per-channel
    #: means and fractions, so the local statistics stay in the tokens the CLS attends to.
    patch_weight: float = Field(default=0.0, ge=0)


class ModelConfig(_Section):
    """Which backbone and hypernetwork to build (``training.model.build_hyperct`` arguments)."""

    #: Bundled config name (``tiny``, ``demo``, ``vitb16``) or a JSON file: random-init backbone.
    backbone: str = "vitb16"
    #: Local DINOv3 folder (the user's download); when set it wins over ``backbone``.
    backbone_path: str | None = None
    head_in_dim: int = Field(default=768, ge=1)
    rank: int = Field(default=16, ge=1)
    lora_scale: float = 1.0
    zero_init_b: bool = False
    target_types: CommaList[str] = ("q", "k", "v", "o", "up", "down")
    dropout: float = 0.05
    attn_implementation: str = "sdpa"
    #: Label-free warm start of a random-init config backbone (demo/tests; docs/training.md §8).
    pretext: PretextConfig = PretextConfig()


class OptimizerConfig(_Section):
    """AdamW as in the released code (spec §6)."""

    lr: float = Field(default=1e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = Field(default=0.0, ge=0)
    #: Gradient-norm clip; 0 = off (the paper does not clip).
    grad_clip: float = Field(default=0.0, ge=0)
    #: Learning rate of the shared head (LayerNorm + Linear); None = ``lr`` (as the paper).
    head_lr: float | None = Field(default=None, gt=0)

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"must be in [0, 1), got {list(value)}")
        return value


class ScheduleConfig(_Section):
    """LR schedule, stepped once per epoch: ``cosine`` (code, T_max = epochs), ``step`` (paper text), ``constant``."""

    kind: Literal["cosine", "step", "constant"] = "cosine"
    #: Cosine period in epochs; None = the number of epochs.
    t_max: int | None = None
    eta_min: float = 0.0
    step_size: int = 15
    gamma: float = 0.1


class SplitConfig(_Section):
    """Patient-level split fractions (spec §2.1: 70/10/20) and its seed."""

    #: ``official`` (CT-RATE): test = CT-RATE's ``valid`` patients, val = ``val`` of its ``train``
    #: patients, train = the rest, so results sit beside published CT-RATE numbers. ``random``: the
    #: fractions over all patients. ``auto``: official for ``data.kind: ctrate``, random otherwise.
    kind: Literal["auto", "random", "official"] = "auto"
    train: float = 0.7
    val: float = 0.1
    test: float = 0.2
    seed: int = 42
    #: Optional CSV (``key,split`` or ``patient_id,split``) that fixes the split instead of drawing it.
    file: str | None = None

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.kind == "official":  # only val is drawn (from the official train patients)
            if not 0 <= self.val < 1:
                raise ValueError(f"val must be in [0, 1) for the official split, got {self.val:g}")
            return self
        fractions = (self.train, self.val, self.test)
        if not (all(f >= 0 for f in fractions) and self.train > 0):
            raise ValueError("fractions must be >= 0, train > 0")
        if abs(sum(fractions) - 1.0) >= 1e-6:
            raise ValueError(f"train + val + test must be 1, got {sum(fractions):g}")
        return self


class SyntheticConfig(_Section):
    """In-memory synthetic studies rendered by ``synth`` directly on the model grid (fast tests/demo)."""

    n_studies: int = Field(default=120, ge=1)
    #: Finding names (``synth.tasks.FINDING_NAMES``) drawn per study; each task's label comes from them.
    findings: CommaList[str] = ("pleural_effusion", "consolidation", "cardiomegaly", "pericardial_effusion")
    #: Probability that a finding is planted in a study (independently per finding).
    prevalence: float = Field(default=0.5, gt=0, lt=1)
    seed: int = 0
    #: Pairs of studies per patient with complementary findings (matched positives/negatives).
    twins: bool = True
    #: ``model`` (rendered on the model grid; fast) or ``varied`` (spacing, offsets, HFS/FFS vary).
    geometry: Literal["model", "varied"] = "model"


class CtRateConfig(_Section):
    """How CT-RATE is read (docs/training.md §CT-RATE)."""

    #: ``auto`` decides per file from its header; ``original``/``fixed`` insist on one release.
    release: Literal["auto", "original", "fixed"] = "auto"
    #: ``one-per-scan``: the lowest reconstruction number with usable geometry; ``all``: every one.
    reconstructions: Literal["one-per-scan", "all"] = "one-per-scan"
    #: CT-RATE splits to read (their label/metadata CSVs are found under ``data.root``);
    #: empty = every split whose label CSV is there.
    splits: CommaList[Literal["train", "valid"]] = ()


class DataConfig(_Section):
    """Where the scans and labels come from (docs/training.md §Data)."""

    #: ``ctrate`` (NIfTI + CT-RATE CSVs), ``dicom`` (series folders + label CSV), ``synthetic``
    #: (in-memory phantoms) or ``synthetic_dicom`` (a folder written by ``hyperct synth``).
    kind: Literal["ctrate", "dicom", "synthetic", "synthetic_dicom"] = "ctrate"
    #: CT-RATE's ``dataset`` folder (ctrate), DICOM root (dicom, synthetic_dicom).
    root: str | None = None
    #: Label CSV(s): keyed CSV (dicom; one file), ``labels.csv`` (synthetic_dicom; default at the root),
    #: CT-RATE's per-split ``*_predicted_labels.csv`` (ctrate; default: found under ``root``).
    labels: CommaList[str] = ()
    #: CT-RATE metadata CSV(s) (default: ``metadata/{train,validation}_metadata.csv`` under ``root``).
    metadata: CommaList[str] = ()
    ctrate: CtRateConfig = CtRateConfig()
    #: Extra label CSVs keyed like ``labels`` (e.g. the output of ``hyperct labels echo``); joined on the key.
    extra_labels: CommaList[str] = ()
    #: Key column of the label CSVs for DICOM: ``StudyInstanceUID`` or ``AccessionNumber``.
    key_column: str = "StudyInstanceUID"
    #: Task keys to train (registry keys); empty = every task with a label column in the data.
    tasks: CommaList[str] = ()
    split: SplitConfig = SplitConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    #: Series-selection rules (``app.yaml``'s ``series-selection`` keys); {} = the serving defaults.
    series_selection: SelectionRules = SelectionRules()
    #: Disk cache of preprocessed inputs; None = ``<out_dir>/cache``.
    cache_dir: str | None = None
    #: Training augmentation (random in-plane shift + flip, spec §3.1 step 3).
    augment: bool = True
    #: Go on past unreadable volumes / bad label rows (warn, count) instead of stopping.
    skip_bad: bool = False
    #: Processes that read + preprocess volumes into the cache before training (0 = this process).
    workers: int = Field(default=0, ge=0)
    #: DataLoader worker processes per training process: a number (0 = the main process), or ``auto``
    #: = 0 on the CPU (the step uses every core) and on CUDA enough to build batches faster than the
    #: card steps (``training.device.resolve_loader_workers``). The ratio is in ``metrics.csv``.
    loader_workers: int | Literal["auto"] = "auto"
    #: Batches each loader worker builds ahead (torch's ``prefetch_factor``; only with workers).
    prefetch_factor: int = Field(default=2, ge=1)

    @field_validator("loader_workers", mode="before")
    @classmethod
    def _auto_or_count(cls, value: Any) -> int | str:
        if value == "auto":
            return value
        try:
            count = int(str(value))
        except ValueError:
            count = -1
        if count < 0:
            raise ValueError(f"must be auto or an integer >= 0, got {value!r}")
        return count

    #: Training only: each scan contributes a random subset of this many of its images per step
    #: (0 = all images, the paper). Validation, evaluation and serving always use every image; the
    #: masked mean pools any number of images, so this only makes a step cheaper (docs/training.md §8).
    train_images: int = Field(default=0, ge=0)
    #: Training only: how often each task is drawn for a scan, relative to 1 for a task not named
    #: (default: uniform among a scan's labelled tasks, the paper). Spends more of the steps on tasks
    #: that are slower to learn; validation and serving are not affected.
    task_weights: dict[str, Annotated[float, Field(gt=0)]] = {}


class RunConfig(_Section):
    """A complete training run. Paper settings by default (spec §6)."""

    name: str = "hyperct"
    seed: int = 42
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=8, ge=1)
    eval_batch_size: int = Field(default=8, ge=1)
    #: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: ``auto`` = bf16 autocast on CUDA, fp32 on the CPU; ``fp32`` (as the released code, spec O-17)
    #: or ``bf16`` (autocast: weights, optimiser and loss stay fp32) explicitly.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: TF32 tensor-core matmuls and cuDNN convolutions for fp32 work on CUDA (no effect on the CPU).
    tf32: bool = True
    #: Torch CPU threads; 0 = torch's default.
    threads: int = 0
    #: Evaluate on validation every N epochs (best epoch = highest mean validation AUROC).
    eval_every: int = Field(default=1, ge=1)
    #: Keep ``epoch_XXX.pt`` for every epoch (``last.pt`` is always kept for ``--resume``).
    keep_epoch_checkpoints: bool = False
    #: Task sampling per scan: ``uniform_valid`` (code: uniform over the scan's valid tasks).
    task_sampling: Literal["uniform_valid"] = "uniform_valid"
    progress: bool = True
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    data: DataConfig = DataConfig()
    #: Overrides of ``operators.preprocessing.PreprocessingConfig`` fields ({} = the serving defaults).
    preprocessing: dict[str, Any] = {}

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.model.pretext.steps and self.model.backbone_path:
            raise ValueError(
                "model.pretext.steps: a pretrained backbone folder (model.backbone_path) is never "
                "re-pretrained: set steps to 0"
            )
        if self.preprocessing:
            import dataclasses

            from operators.preprocessing import PreprocessingConfig, PreprocessingConfigError

            known = {f.name for f in dataclasses.fields(PreprocessingConfig)}
            unknown = sorted(set(self.preprocessing) - known)
            if unknown:
                raise ValueError(f"preprocessing: unknown key(s) {', '.join(unknown)}")
            try:
                PreprocessingConfig(**self.preprocessing)
            except PreprocessingConfigError as exc:
                raise ValueError(f"preprocessing: {exc}") from None
        return self

    def check_data_sources(self) -> RunConfig:
        """What a run needs beyond well-formed values: the data paths its ``data.kind`` reads."""
        d = self.data
        if d.kind in ("ctrate", "dicom", "synthetic_dicom") and not d.root:
            raise ConfigError(f"data.root: is required for data.kind={d.kind}")
        if d.kind == "dicom" and not d.labels:
            raise ConfigError(f"data.labels: is required for data.kind={d.kind}")
        if d.kind != "ctrate" and len(d.labels) > 1:
            raise ConfigError(f"data.labels: one file for data.kind={d.kind}, got {len(d.labels)}")
        if d.split.kind == "official" and d.kind != "ctrate":
            raise ConfigError("data.split.kind: official is CT-RATE's own split (data.kind: ctrate)")
        stray = sorted(set(d.task_weights) - set(d.tasks)) if d.tasks else []
        if stray:
            raise ConfigError(f"data.task_weights: {', '.join(stray)} not in data.tasks ({', '.join(d.tasks)})")
        return self

    # -- (de)serialisation --------------------------------------------------------------------------
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
        merge(data, dict(extra))
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value, where=item)
    return RunConfig.from_dict(data).check_data_sources()


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
