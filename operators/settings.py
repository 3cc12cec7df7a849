"""Typed settings: the one configuration layer of ``app.yaml``, the node file and training recipes.

Every section of every configuration file is a :class:`Settings` model (pydantic v2). What they
share is decided here, once:

* **unknown keys are refused by name** (``extra="forbid"``): a typo must never silently fall back to
  a default. The message names the section, the key and the keys that section knows;
* **``-`` and ``_`` are the same**: ``min-slices`` and ``min_slices`` name one field (``app.yaml``
  and the node file are hyphenated like holoscan-cli's packager, training recipes use ``_``);
* **one-line messages** (:class:`SettingsError`, a ValueError) such as
  ``node.outbox.destinations[0]: remote node 'PACS@::1:104': write IPv6 hosts in brackets,
  AE@[addr]:port`` or ``optimizer.lr: expected a number, got 'fast'``, printed as they are by the
  CLI;
* **overrides** are dotted keys set on the raw data before validation (:func:`set_dotted`), so
  ``--set key=value``, ``HYPERCT_NODE_<SECTION>_<KEY>`` (:func:`env_key`) and the file are validated
  by the same model, once; :attr:`SettingsError.loc` lets a loader name where a bad value came from;
* **files** are read by :func:`read_yaml` (a syntax error is one line with the file, line and column),
  and a relative ``Path`` setting in a file means a path next to that file (:func:`resolve_paths`).

The models are frozen: a loaded configuration is a value. Values are converted the lenient way
(pydantic's lax mode): ``"2000"`` is a port, ``yes``/``1``/``true`` a boolean, ``1e-3`` (which
PyYAML reads as text) a number, a number where text is expected becomes text.

This module is also where the pipeline's small settings live (:class:`WriterOptions`, the
``outputs`` section, with its :class:`FocalRegion`), kept import-light: the configuration loaders
and the CLI import it without pulling in the writers (highdicom), the model runtime (onnxruntime) or
training (torch).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

__all__ = [
    "CommaList",
    "FocalRegion",
    "Settings",
    "SettingsError",
    "WriterOptions",
    "env_key",
    "merge",
    "names_setting",
    "read_yaml",
    "resolve_paths",
    "set_dotted",
]

S = TypeVar("S", bound="Settings")


class SettingsError(ValueError):
    """A configuration key or value is invalid; the one-line message names the dotted key.

    ``loc`` is where the (first) problem sits below the validated model, as keys and list indexes
    (``("receiver", "port")``), so a loader that merged several sources can say which one gave the
    bad value (a file, an environment variable, an option)."""

    def __init__(self, message: str, loc: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.loc = loc


def _hyphenated(name: str) -> str:
    return name.replace("_", "-")


def _norm(key: object) -> str:
    return str(key).replace("-", "_")


class Settings(BaseModel):
    """Base of every configuration section: strict keys, ``-``/``_`` aliases, frozen values."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=_hyphenated,
        validate_by_name=True,
        validate_by_alias=True,
        frozen=True,
        coerce_numbers_to_str=True,
    )

    def __init__(self, /, *args: Any, **data: Any) -> None:
        """Keyword arguments as usual, positional ones in field order (``TlsConfig(cert, key, ca)``);
        a bad value raises :class:`SettingsError` with the same one-line message as :meth:`from_dict`."""
        if args:
            names = list(type(self).model_fields)
            if len(args) > len(names):
                raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional arguments")
            for name, value in zip(names, args, strict=False):
                if name in data:
                    raise TypeError(f"{type(self).__name__} got {name!r} twice")
                data[name] = value
        try:
            super().__init__(**data)
        except ValidationError as exc:  # one line, as from_dict says it
            raise SettingsError(explain(exc, type(self), type(self).section)) from None

    # Validation of nested sections and from_dict must not go through this __init__ (it would wrap
    # their errors twice): the flag pydantic's own RootModel.__init__ carries for the same reason.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    #: How this section is named in messages (``series-selection``); "" for a whole file.
    section: ClassVar[str] = ""
    #: How keys are written in this model's files: ``-`` (app.yaml, node files) or ``_`` (recipes).
    key_separator: ClassVar[str] = "-"

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any] | None, *, where: str | None = None) -> S:
        """Validate ``data`` (None = every default); ``where`` names the section in messages."""
        where = cls.section if where is None else where
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise SettingsError(f"{where or 'configuration'}: expected a mapping, got {data!r}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise SettingsError(explain(exc, cls, where), tuple(exc.errors()[0]["loc"])) from None

    def to_dict(self, *, hyphenated: bool = False) -> dict[str, Any]:
        """Plain data (lists, strings, numbers) that :meth:`from_dict` reads back unchanged."""
        return self.model_dump(mode="json", by_alias=hyphenated)


def _split_commas(value: Any) -> Any:
    """``"A, B"`` → ``["A", "B"]`` (environment variables and CLI text); lists pass unchanged."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


T = TypeVar("T")
#: A list that may also be written as comma-separated text (``HYPERCT_NODE_RECEIVER_ALLOWED_CALLERS=A,B``).
CommaList = Annotated[tuple[T, ...], BeforeValidator(_split_commas)]


# --------------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------------


def explain(exc: ValidationError, model: type[BaseModel], where: str = "") -> str:
    """One line for a pydantic error: the dotted key and what is wrong (first error, then a count)."""
    errors = exc.errors(include_url=False)
    text = _explain_one(errors[0], model, where)
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return text


def _explain_one(error: Any, model: type[BaseModel], where: str) -> str:
    loc = list(error["loc"])
    if error["type"] == "extra_forbidden" and loc:
        *parent, key = loc
        owner = _model_at(model, parent)
        path = _dotted(where, parent)
        prefix = f"{path}: " if path else ""
        if owner is None:
            return f"{prefix}unknown key {key!r}"
        sep = getattr(owner, "key_separator", "-")
        if _norm(key) in owner.model_fields:
            return f"{prefix}{key!r} is given twice (once with '-', once with '_')"
        known = ", ".join(
            (field.alias or name) if sep == "-" else name for name, field in owner.model_fields.items()
        )
        return f"{prefix}unknown key {key!r} (known: {known})"
    path = _dotted(where, loc)
    message = _message(error)
    return f"{path}: {message}" if path else message


def _dotted(where: str, loc: list[Any]) -> str:
    text = where
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _message(error: Any) -> str:
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    got = f", got {value!r}"
    expected = {
        ("int_parsing", "int_type", "int_from_float"): "expected an integer",
        ("float_parsing", "float_type", "finite_number"): "expected a number",
        ("bool_parsing", "bool_type"): "expected true or false",
        ("string_type",): "expected a string",
        ("list_type", "tuple_type", "set_type", "iterable_type"): "expected a list",
        ("dict_type", "model_type", "model_attributes_type", "dataclass_type"): "expected a mapping",
    }
    for kinds, text in expected.items():
        if kind in kinds:
            return text + got
    if kind == "literal_error":
        return f"must be {str(ctx.get('expected', '')).replace(chr(39), '')}{got}"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        bound = next(iter(ctx.values()), "?")
        bound = format(bound, "g") if isinstance(bound, float) else bound
        return f"must be {bounds[kind]} {bound}{got}"
    if kind == "too_short":
        return f"expected at least {ctx.get('min_length')} value(s), got {ctx.get('actual_length')}"
    if kind == "too_long":
        return f"expected at most {ctx.get('max_length')} value(s), got {ctx.get('actual_length')}"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "missing":
        return "is required"
    return str(error.get("msg", kind))


def _settings_type(annotation: Any) -> type[BaseModel] | None:
    """The model class inside ``annotation`` (``X``, ``X | None``, ``Annotated[X, ...]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, Annotated):
        for arg in typing.get_args(annotation):
            found = _settings_type(arg)
            if found is not None:
                return found
    return None


def _field(model: type[BaseModel], key: object) -> Any:
    return model.model_fields.get(_norm(key)) or next(
        (f for f in model.model_fields.values() if f.alias == key), None
    )


def _model_at(model: type[BaseModel], loc: list[Any]) -> type[BaseModel] | None:
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return None
        if isinstance(part, int):
            continue
        field = _field(current, part)
        current = _settings_type(field.annotation) if field is not None else None
    return current


# --------------------------------------------------------------------------------------------------
# Files: YAML syntax errors in one line, paths relative to the file
# --------------------------------------------------------------------------------------------------


def read_yaml(path: Path) -> Any:
    """The data of a YAML file. A syntax error becomes one line naming the file, line and column:
    PyYAML's own message spans several lines and names ``<unicode string>``, not the file."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        where = f"{_at(exc.problem_mark)}: " if exc.problem_mark else ""
        text = f"{path}: {where}YAML syntax error: {exc.problem or exc.context}"
        if exc.problem and exc.context:  # e.g. "while parsing a flow sequence" opened lines earlier
            text += f" ({exc.context}" + (f", {_at(exc.context_mark)}" if exc.context_mark else "") + ")"
        raise SettingsError(text) from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: YAML syntax error: {exc}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{path}: not UTF-8 text (is it a YAML file?)") from None


def _at(mark: yaml.Mark) -> str:
    """``line 3, column 1`` for a PyYAML mark (1-based, as editors count; PyYAML's are 0-based)."""
    return f"line {mark.line + 1}, column {mark.column + 1}"


def resolve_paths(model: type[BaseModel], data: dict[str, Any], base: Path) -> None:
    """Make every relative ``Path`` setting of ``model`` in ``data`` (a file's raw values), and every
    relative ``Path`` default, relative to ``base`` (the file's folder), in place.

    Why: a file must mean the same whichever folder the shell is in; otherwise ``hyperct status -c
    node.yaml`` finds the node's data from one folder and not from another. Values that come later
    from the environment or the command line are not touched: those are relative to where they are
    typed."""
    for name, field in model.model_fields.items():
        key = next((k for k in data if _norm(k) == name or k == field.alias), name)
        sub = _settings_type(field.annotation)
        if sub is not None:
            section = data.get(key, {})
            if isinstance(section, dict):
                resolve_paths(sub, section, base)
                if section:
                    data[key] = section
            continue
        value = data.get(key, field.default)
        if _is_path(field.annotation) and isinstance(value, str | Path) and _is_relative(value):
            data[key] = str(base / value)


def _is_path(annotation: Any) -> bool:
    """``Path`` or ``Path | None``."""
    return annotation is Path or Path in typing.get_args(annotation)


def _is_relative(value: str | Path) -> bool:
    return bool(str(value)) and not Path(value).is_absolute()


# --------------------------------------------------------------------------------------------------
# Overrides: dotted keys on the raw data, validated with the rest
# --------------------------------------------------------------------------------------------------


def set_dotted(data: dict[str, Any], dotted: str, value: Any, *, where: str | None = None) -> None:
    """``data["a"]["b"] = value`` for ``a.b``, creating sections; a key spelt with ``-`` or ``_`` in
    ``data`` is replaced, not duplicated."""
    parts = dotted.split(".")
    if not dotted or any(not p for p in parts):
        raise SettingsError(f"{where or dotted}: empty key in {dotted!r}")
    node = data
    for i, part in enumerate(parts):
        key = next((k for k in node if _norm(k) == _norm(part)), part)
        if i == len(parts) - 1:
            node[key] = value
            return
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise SettingsError(f"{where or dotted}: {'.'.join(parts[: i + 1])!r} is not a section")
        node = child


def merge(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    """Deep-merge ``src`` into ``dst`` (sections merged, values replaced)."""
    for key, value in src.items():
        same = next((k for k in dst if _norm(k) == _norm(key)), key)
        if isinstance(value, Mapping) and isinstance(dst.get(same), dict):
            merge(dst[same], value)
        else:
            dst[same] = dict(value) if isinstance(value, Mapping) else value


def names_setting(model: type[BaseModel], dotted: str) -> bool:
    """Whether ``dotted`` (``receiver.port``) is a setting of ``model`` (not a section, not unknown)."""
    parts = dotted.split(".")
    field = None
    current: type[BaseModel] | None = model
    for part in parts:
        if current is None:
            return False
        field = _field(current, part)
        if field is None:
            return False
        current = _settings_type(field.annotation)
    return current is None


def env_key(model: type[BaseModel], rest: str) -> str | None:
    """``RECEIVER_ALLOWED_CALLERS`` → ``receiver.allowed_callers``: the setting an environment
    variable names after its prefix (sections matched first), or None when it names none."""
    lower = rest.lower()
    for name, field in model.model_fields.items():
        sub = _settings_type(field.annotation)
        if sub is not None and lower.startswith(name + "_"):
            tail = env_key(sub, lower[len(name) + 1 :])
            if tail is not None:
                return f"{name}.{tail}"
    for name, field in model.model_fields.items():
        key = _norm(field.alias or name)  # the key files use (``logging.json`` for ``as_json``)
        if lower in (name, key) and _settings_type(field.annotation) is None:
            return key
    return None


# --------------------------------------------------------------------------------------------------
# The pipeline's writers (app.yaml section ``outputs``)
# --------------------------------------------------------------------------------------------------


class FocalRegion(Settings):
    """The focal rule of the attention SEG (``app.yaml`` ``outputs.focal``, ``docs/results.md`` §4).

    A region a radiologist would call focal: of the voxels inside the body whose attention passes
    the task's relative threshold, the ``top-percent`` % of the body's voxels with the highest
    attention, at most ``max-volume-ml``, then the ``components`` largest connected components
    (face-connected) of those. The defaults give one blob of at most 50 mL (a 4.6 cm sphere), where
    the relative rule alone covered 747 mL over 102 of 160 slices of the demo study."""

    section: ClassVar[str] = "outputs.focal"

    top_percent: float = Field(default=0.5, gt=0, le=100)
    max_volume_ml: float = Field(default=50.0, gt=0)
    components: int = Field(default=1, ge=1)
    body_threshold_hu: float = -500.0  # tissue; the lungs count as body (enclosed, filled per slice)


class WriterOptions(Settings):
    """What to write (``app.yaml`` section ``outputs``)."""

    section: ClassVar[str] = "outputs"

    seg: bool = True
    segmentation_type: Literal["BINARY", "FRACTIONAL"] = "BINARY"
    text_report: bool = True  # Basic Text SR for PACS that do not render Comprehensive 3D SR
    seg_region: Literal["focal", "relative"] = "focal"
    focal: FocalRegion = FocalRegion()
    parametric_map: bool = True  # the attention map itself, per positive finding (docs/results.md §5)
    parametric_map_max_mb: float | None = Field(default=1000.0, gt=0)  # per study; None = no limit
    key_images: bool = True  # a PNG of each positive finding's peak-attention slice (docs/results.md §11)
