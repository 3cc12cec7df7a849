"""The task registry: which tasks HyperCT predicts, how each is labelled and how it is coded in the SR.

Tasks are data. ``training/tasks.json`` lists the 25 tasks of the paper in the order of the
task-embedding table (spec 2.3); a user adds a task by adding an entry there (see ``docs/tasks.md``),
not by editing the model. This module loads and strictly validates that file and turns it into the
task entries of the model manifest. Serving reads tasks from the manifest, never from ``training/``.

Kept cheap to import: standard library only (no torch, numpy, pydicom or highdicom at import time;
the converters to pydicom / highdicom objects import those lazily).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_PATH",
    "STANDARD_SCHEMES",
    "CodedConcept",
    "CodingScheme",
    "EchoCriterion",
    "EchoRule",
    "Task",
    "TaskRegistry",
    "TaskRegistryError",
]

DEFAULT_PATH = Path(__file__).with_name("tasks.json")
SUPPORTED_SCHEMA_VERSIONS = (1,)
GROUPS = ("cardiac", "radiology")
#: Coding scheme designators of PS3.16 Table 8-1 that a task may use without declaring them.
STANDARD_SCHEMES = frozenset({"SCT", "DCM", "RADLEX", "LN", "UCUM", "NCIt", "UMLS", "FMA"})
OPERATORS = ("<", "<=", ">", ">=", "==", "!=")
NORMALIZERS = ("casefold_strip",)
MISSING_WHEN = ("any_null", "all_null")

_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
_PRIVATE = re.compile(r"^99[A-Z0-9_]{1,14}$")  # DICOM PS3.3 8.2: private designators start with "99"
_SCTID = re.compile(r"^[1-9][0-9]{5,17}$")
_RADLEX = re.compile(r"^RID[0-9]+$")
_CODE_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_SH_MAX = 16  # Code Value (0008,0100) is SH
_LO_MAX = 64  # Code Meaning (0008,0104) is LO

_TOP_KEYS = {"schema_version", "description", "parameters", "coding_schemes", "tasks"}
_SCHEME_KEYS = {"designator", "name", "responsible_organization", "version", "description"}
_TASK_KEYS = {
    "index", "key", "name", "short_name", "group", "label_column", "definition", "concept",
    "finding_site", "echo_rule", "saliency", "notes",
}  # fmt: skip
_CONCEPT_KEYS = {"value", "scheme_designator", "meaning", "scheme_version", "verification"}
_RULE_KEYS = {"combine", "missing_when", "criteria", "source"}
_CRITERION_KEYS = {
    "field",
    "operator",
    "threshold",
    "value",
    "normalize",
    "units",
    "ucum",
    "when",
    "parameter",
}
_PARAM_KEYS = {"default", "choices", "units", "description"}


class TaskRegistryError(ValueError):
    """The task registry is not valid; the message names the task and the field at fault."""


# --------------------------------------------------------------------------------------------------
# Value objects
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodedConcept:
    """A coded concept (one item of a DICOM code sequence)."""

    value: str
    scheme_designator: str
    meaning: str
    scheme_version: str | None = None
    #: How the code was checked (``pydicom:SCT.Keyword``, ``radlex:…``, ``corroborated:…``,
    #: ``private:…``). Documentation only: not part of the concept's identity, not in the manifest.
    verification: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, str]:
        """The manifest / JSON form (without the verification note)."""
        d = {"value": self.value, "scheme_designator": self.scheme_designator, "meaning": self.meaning}
        if self.scheme_version:
            d["scheme_version"] = self.scheme_version
        return d

    def to_pydicom_code(self) -> Any:
        """``pydicom.sr.coding.Code`` (pydicom imported lazily)."""
        from pydicom.sr.coding import Code

        return Code(self.value, self.scheme_designator, self.meaning, self.scheme_version)

    def to_highdicom(self) -> Any:
        """``highdicom.sr.CodedConcept`` (highdicom imported lazily)."""
        from highdicom.sr import CodedConcept as HdCodedConcept

        return HdCodedConcept(self.value, self.scheme_designator, self.meaning, self.scheme_version)

    def __str__(self) -> str:
        return f"({self.value}, {self.scheme_designator}, {self.meaning!r})"


@dataclass(frozen=True)
class CodingScheme:
    """A private coding scheme, declared in the SR's Coding Scheme Identification Sequence."""

    designator: str
    name: str
    responsible_organization: str = ""
    version: str = ""
    description: str = ""

    def to_dict(self) -> dict[str, str]:
        """The manifest form (the fields ``operators.manifest.CodingScheme`` reads)."""
        return {
            "designator": self.designator,
            "name": self.name,
            "responsible_organization": self.responsible_organization,
            "version": self.version,
        }

    def to_highdicom(self) -> Any:
        """``highdicom.coding_schemes.CodingSchemeIdentificationItem`` (imported lazily)."""
        from highdicom.coding_schemes import CodingSchemeIdentificationItem

        return CodingSchemeIdentificationItem(
            designator=self.designator,
            name=self.name or None,
            version=self.version or None,
            responsible_organization=self.responsible_organization or None,
        )


def _is_null(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


@dataclass(frozen=True)
class EchoCriterion:
    """One comparison of an echo field, e.g. ``ECHO_lvef_value < 50 %``."""

    field: str
    operator: str
    threshold: float | None = None
    value: str | None = None
    normalize: str | None = None
    units: str | None = None
    ucum: str | None = None
    #: Only applies when ``row[when_field]`` is one of ``when_in`` (e.g. sex-specific cut-offs).
    when_field: str | None = None
    when_in: tuple[str, ...] = ()
    #: Name of the registry parameter that sets ``threshold`` (e.g. ``lavi_threshold``).
    parameter: str | None = None

    def applies(self, row: Mapping[str, Any]) -> bool:
        if self.when_field is None:
            return True
        v = row.get(self.when_field)
        return not _is_null(v) and str(v).strip() in self.when_in

    def met(self, row: Mapping[str, Any]) -> bool:
        """True when the criterion applies and holds; a null field never meets it."""
        if not self.applies(row):
            return False
        v = row.get(self.field)
        if _is_null(v):
            return False
        if self.value is not None:
            a: Any = str(v)
            b: Any = self.value
            if self.normalize == "casefold_strip":
                a, b = a.strip().casefold(), b.strip().casefold()
        else:
            a, b = float(v), float(self.threshold)  # type: ignore[arg-type]
        return {
            "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b,
        }[self.operator]  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"field": self.field, "operator": self.operator}
        if self.threshold is not None:
            d["threshold"] = self.threshold
        if self.value is not None:
            d["value"] = self.value
        if self.normalize:
            d["normalize"] = self.normalize
        d["units"] = self.units
        d["ucum"] = self.ucum
        if self.when_field is not None:
            d["when"] = {"field": self.when_field, "in": list(self.when_in)}
        if self.parameter:
            d["parameter"] = self.parameter
        return d


@dataclass(frozen=True)
class EchoRule:
    """Machine-readable label rule of a cardiac task: positive if ANY criterion is met.

    ``missing_when``: ``any_null`` (the label is missing if any field the rule reads is null) or
    ``all_null`` (missing only if all are null; a null component then counts as "not met").

    Conditional criteria (``when``): if a row's value of a ``when`` field is non-null but in none of
    the ``when.in`` sets the rule lists for that field, the rule cannot decide and the label is
    missing. Values are compared as :meth:`EchoCriterion.applies` does (``str(v).strip()``, case
    sensitive), so for ventricular enlargement a sex other than ``"F"``/``"M"`` (e.g. ``"O"``) gives
    None. Deliberate deviation from the released code, which gives 0 there: a negative whose cut-off is
    unknown is unverifiable (docs/evaluation.md, 1.4).

    This is the one implementation of the 7 echo-derived labels: ``training/echo_labels.py``
    evaluates these rules, it does not re-implement them.
    """

    criteria: tuple[EchoCriterion, ...]
    missing_when: str = "any_null"
    combine: str = "any"
    source: str = ""

    @property
    def fields(self) -> tuple[str, ...]:
        """Every row field the rule reads, in order, without repeats."""
        out: list[str] = []
        for c in self.criteria:
            for f in (c.field, c.when_field):
                if f is not None and f not in out:
                    out.append(f)
        return tuple(out)

    def evaluate(self, row: Mapping[str, Any]) -> float | None:
        """1.0 / 0.0, or None when the label is missing (spec 2.3 / 2.4; see the class docstring)."""
        nulls = [_is_null(row.get(f)) for f in self.fields]
        if (self.missing_when == "any_null" and any(nulls)) or (
            self.missing_when == "all_null" and all(nulls)
        ):
            return None
        for when_field, allowed in self._when_values.items():
            v = row.get(when_field)
            if not _is_null(v) and str(v).strip() not in allowed:
                return None  # e.g. sex neither F nor M: no cut-off applies, so the rule cannot decide
        return 1.0 if any(c.met(row) for c in self.criteria) else 0.0

    @property
    def _when_values(self) -> dict[str, frozenset[str]]:
        """``when`` field -> every value any criterion of this rule conditions on."""
        out: dict[str, set[str]] = {}
        for c in self.criteria:
            if c.when_field is not None:
                out.setdefault(c.when_field, set()).update(c.when_in)
        return {f: frozenset(v) for f, v in out.items()}

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"combine": self.combine, "missing_when": self.missing_when}
        if self.source:
            d["source"] = self.source
        d["criteria"] = [c.to_dict() for c in self.criteria]
        return d


@dataclass(frozen=True)
class Task:
    """One task: what the model predicts and how the SR codes it."""

    index: int  # position in the full registry = row of the task-embedding table; stable under subset()
    key: str
    name: str
    group: str
    definition: str
    concept: CodedConcept
    saliency: bool
    label_column: str | None = None
    short_name: str = ""
    finding_site: CodedConcept | None = None
    echo_rule: EchoRule | None = None
    notes: str = ""

    def to_manifest_entry(self) -> dict[str, Any]:
        """Plain dict for the model manifest's ``tasks`` (export adds file, sha256, threshold)."""
        d: dict[str, Any] = {
            "index": self.index,
            "key": self.key,
            "name": self.name,
            "group": self.group,
            "definition": self.definition,
            "concept": self.concept.to_dict(),
        }
        if self.finding_site is not None:
            d["finding_site"] = self.finding_site.to_dict()
        d["saliency"] = self.saliency
        d["label_column"] = self.label_column
        if self.echo_rule is not None:
            d["echo_rule"] = self.echo_rule.to_dict()
        return d


# --------------------------------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------------------------------


def _fail(where: str, msg: str) -> TaskRegistryError:
    return TaskRegistryError(f"{where}: {msg}")


def _unknown_keys(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise _fail(where, f"unknown field(s) {extra} (allowed: {sorted(allowed)})")


def _req(d: Mapping[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d or d[key] is None:
        raise _fail(where, f"missing required field {key!r}")
    v = d[key]
    if isinstance(v, bool) and typ is not bool and (typ in (int, float) or typ == (int, float)):
        raise _fail(f"{where}.{key}", f"must be a number, got {v!r}")
    if not isinstance(v, typ):
        names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise _fail(f"{where}.{key}", f"must be {names}, got {type(v).__name__}")
    if isinstance(v, str) and not v.strip():
        raise _fail(f"{where}.{key}", "must not be empty")
    return v


def _opt_str(d: Mapping[str, Any], key: str, where: str) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v.strip():
        raise _fail(f"{where}.{key}", f"must be a non-empty string or null, got {v!r}")
    return v


def _ascii_line(s: str, where: str, max_len: int | None = None) -> None:
    if not s.isascii() or not s.isprintable() or "\\" in s:
        raise _fail(where, f"must be one line of printable ASCII without backslash, got {s!r}")
    if max_len is not None and len(s) > max_len:
        raise _fail(where, f"is {len(s)} characters; DICOM allows at most {max_len}: {s!r}")


def _concept(d: Any, where: str, private: set[str]) -> CodedConcept:
    if not isinstance(d, dict):
        raise _fail(where, "must be an object with value, scheme_designator, meaning")
    _unknown_keys(d, _CONCEPT_KEYS, where)
    value = _req(d, "value", str, where)
    scheme = _req(d, "scheme_designator", str, where)
    meaning = _req(d, "meaning", str, where)
    if scheme.startswith("99"):
        if scheme not in private:
            raise _fail(
                f"{where}.scheme_designator",
                f"private coding scheme {scheme!r} is not declared in coding_schemes (declared: {sorted(private)})",
            )
    elif scheme not in STANDARD_SCHEMES:
        raise _fail(
            f"{where}.scheme_designator",
            f"unknown coding scheme {scheme!r}; use one of {sorted(STANDARD_SCHEMES)} "
            "or declare a private scheme starting with '99' in coding_schemes",
        )
    if scheme == "SCT" and not _SCTID.match(value):
        raise _fail(f"{where}.value", f"{value!r} is not a SNOMED CT concept id (6-18 digits)")
    if scheme == "RADLEX" and not _RADLEX.match(value):
        raise _fail(f"{where}.value", f"{value!r} is not a RadLex id (RID followed by digits)")
    if not _CODE_VALUE.match(value) or len(value) > _SH_MAX:
        raise _fail(f"{where}.value", f"{value!r} must be 1-{_SH_MAX} letters, digits, '.', '_' or '-'")
    _ascii_line(meaning, f"{where}.meaning", _LO_MAX)
    version = _opt_str(d, "scheme_version", where)
    verification = d.get("verification", "")
    if not isinstance(verification, str):
        raise _fail(f"{where}.verification", "must be a string")
    return CodedConcept(value, scheme, meaning, version, verification)


def _criterion(d: Any, where: str, params: Mapping[str, float]) -> EchoCriterion:
    if not isinstance(d, dict):
        raise _fail(where, "must be an object")
    _unknown_keys(d, _CRITERION_KEYS, where)
    fld = _req(d, "field", str, where)
    op = _req(d, "operator", str, where)
    if op not in OPERATORS:
        raise _fail(f"{where}.operator", f"must be one of {OPERATORS}, got {op!r}")
    has_thr, has_val = d.get("threshold") is not None, d.get("value") is not None
    if has_thr == has_val:
        raise _fail(where, "needs exactly one of 'threshold' (number) or 'value' (text)")
    threshold = None
    value = None
    if has_thr:
        threshold = float(_req(d, "threshold", (int, float), where))
    else:
        value = _req(d, "value", str, where)
        if op not in ("==", "!="):
            raise _fail(f"{where}.operator", f"a text 'value' only supports == and !=, got {op!r}")
    normalize = _opt_str(d, "normalize", where)
    if normalize is not None and normalize not in NORMALIZERS:
        raise _fail(f"{where}.normalize", f"must be one of {NORMALIZERS}, got {normalize!r}")
    parameter = _opt_str(d, "parameter", where)
    if parameter is not None:
        if parameter not in params:
            raise _fail(f"{where}.parameter", f"unknown parameter {parameter!r} (known: {sorted(params)})")
        if threshold is None:
            raise _fail(f"{where}.parameter", "a parameter sets a numeric threshold; this criterion has none")
        threshold = float(params[parameter])
    when_field: str | None = None
    when_in: tuple[str, ...] = ()
    when = d.get("when")
    if when is not None:
        if not isinstance(when, dict) or set(when) != {"field", "in"} or not isinstance(when["in"], list):
            raise _fail(f"{where}.when", "must be {'field': <column>, 'in': [<values>]}")
        when_field = _req(when, "field", str, f"{where}.when")
        when_in = tuple(str(x) for x in when["in"])
        if not when_in:
            raise _fail(f"{where}.when.in", "must not be empty")
    return EchoCriterion(
        field=fld, operator=op, threshold=threshold, value=value, normalize=normalize,
        units=_opt_str(d, "units", where), ucum=_opt_str(d, "ucum", where),
        when_field=when_field, when_in=when_in, parameter=parameter,
    )  # fmt: skip


def _echo_rule(d: Any, where: str, params: Mapping[str, float]) -> EchoRule:
    if not isinstance(d, dict):
        raise _fail(where, "must be an object with combine, missing_when, criteria")
    _unknown_keys(d, _RULE_KEYS, where)
    combine = d.get("combine", "any")
    if combine != "any":
        raise _fail(f"{where}.combine", f"only 'any' is supported, got {combine!r}")
    missing = d.get("missing_when", "any_null")
    if missing not in MISSING_WHEN:
        raise _fail(f"{where}.missing_when", f"must be one of {MISSING_WHEN}, got {missing!r}")
    crits = _req(d, "criteria", list, where)
    if not crits:
        raise _fail(f"{where}.criteria", "must not be empty")
    source = d.get("source", "")
    if not isinstance(source, str):
        raise _fail(f"{where}.source", "must be a string")
    return EchoRule(
        criteria=tuple(_criterion(c, f"{where}.criteria[{i}]", params) for i, c in enumerate(crits)),
        missing_when=missing,
        combine=combine,
        source=source,
    )


def _task(d: Any, i: int, private: set[str], params: Mapping[str, float]) -> Task:
    where = f"tasks[{i}]"
    if not isinstance(d, dict):
        raise _fail(where, "must be an object")
    key = _req(d, "key", str, where)
    where = f"tasks[{i}] ({key})"
    _unknown_keys(d, _TASK_KEYS, where)
    if not _KEY.match(key):
        raise _fail(f"{where}.key", "must be snake_case (a-z, 0-9, _; starting with a letter)")
    if "index" in d and (not isinstance(d["index"], int) or isinstance(d["index"], bool) or d["index"] != i):
        raise _fail(f"{where}.index", f"is {d['index']!r} but the task is at position {i} (index = position)")
    group = _req(d, "group", str, where)
    if group not in GROUPS:
        raise _fail(f"{where}.group", f"unknown group {group!r}; must be one of {GROUPS}")
    name = _req(d, "name", str, where)
    _ascii_line(name, f"{where}.name", _LO_MAX)
    definition = _req(d, "definition", str, where)
    for p in _PLACEHOLDER.findall(definition):
        if p not in params:
            raise _fail(f"{where}.definition", f"unknown placeholder {{{p}}} (parameters: {sorted(params)})")
    definition = _PLACEHOLDER.sub(lambda m: f"{params[m.group(1)]:g}", definition)
    _ascii_line(definition, f"{where}.definition")
    if "concept" not in d or d["concept"] is None:
        raise _fail(f"{where}.concept", "missing required field 'concept' (the coded finding for the SR)")
    concept = _concept(d["concept"], f"{where}.concept", private)
    site = d.get("finding_site")
    finding_site = _concept(site, f"{where}.finding_site", private) if site is not None else None
    saliency = d.get("saliency")
    if not isinstance(saliency, bool):
        raise _fail(f"{where}.saliency", f"must be true or false, got {saliency!r}")
    label_column = d.get("label_column")
    rule = d.get("echo_rule")
    if group == "radiology":
        if not isinstance(label_column, str) or not label_column.strip():
            raise _fail(
                f"{where}.label_column", "a radiology task needs its label column (CT-RATE column name)"
            )
        if rule is not None:
            raise _fail(f"{where}.echo_rule", "only cardiac tasks have an echo rule")
    else:
        if label_column is not None:
            raise _fail(
                f"{where}.label_column", "must be null for a cardiac task (labels come from echo_rule)"
            )
        if rule is None:
            raise _fail(f"{where}.echo_rule", "a cardiac task needs an echo rule")
        if saliency:
            raise _fail(
                f"{where}.saliency", "must be false for an echo-derived task (no image region to show)"
            )
    short_name = d.get("short_name", "")
    notes = d.get("notes", "")
    for k, v in (("short_name", short_name), ("notes", notes)):
        if not isinstance(v, str):
            raise _fail(f"{where}.{k}", "must be a string")
    return Task(
        index=i, key=key, name=name, group=group, definition=definition, concept=concept, saliency=saliency,
        label_column=label_column, short_name=short_name, finding_site=finding_site,
        echo_rule=_echo_rule(rule, f"{where}.echo_rule", params) if rule is not None else None, notes=notes,
    )  # fmt: skip


def _parameters(d: Any, overrides: Mapping[str, float]) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise _fail("parameters", "must be an object of name -> {default, choices, units, description}")
    values: dict[str, float] = {}
    specs: dict[str, dict[str, Any]] = {}
    for name, spec in d.items():
        where = f"parameters.{name}"
        if not isinstance(spec, dict):
            raise _fail(where, "must be an object")
        _unknown_keys(spec, _PARAM_KEYS, where)
        default = float(_req(spec, "default", (int, float), where))
        choices = spec.get("choices")
        if choices is not None and (
            not isinstance(choices, list) or not all(isinstance(c, int | float) for c in choices)
        ):
            raise _fail(f"{where}.choices", "must be a list of numbers")
        values[name] = default
        specs[name] = dict(spec)
    for name, value in overrides.items():
        if name not in values:
            raise TaskRegistryError(f"parameters: unknown parameter {name!r} (known: {sorted(values)})")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TaskRegistryError(f"parameters.{name}: must be a number, got {value!r}")
        choices = specs[name].get("choices")
        if choices is not None and value not in choices:
            raise TaskRegistryError(
                f"parameters.{name}: {value!r} is not one of the allowed choices {choices}"
            )
        values[name] = float(value)
    return values, specs


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskRegistry:
    """An ordered, validated set of tasks plus the private coding schemes their codes use."""

    tasks: tuple[Task, ...]
    coding_schemes: tuple[CodingScheme, ...] = ()
    schema_version: int = 1
    parameters: Mapping[str, float] = field(default_factory=dict)
    source: str = ""
    _raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None, **parameters: float) -> TaskRegistry:
        """Load and validate a registry file (default: the packaged ``training/tasks.json``).

        Keyword arguments override registry parameters, e.g. ``load(lavi_threshold=35)``.
        """
        file = Path(path) if path is not None else DEFAULT_PATH
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise TaskRegistryError(f"{file}: task registry file not found") from e
        except json.JSONDecodeError as e:
            raise TaskRegistryError(f"{file}: not valid JSON ({e})") from e
        return cls.from_dict(data, source=file.name, **parameters)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<dict>", **parameters: float) -> TaskRegistry:
        """Validate a registry given as a dict (the parsed JSON). Raises :class:`TaskRegistryError`."""
        if not isinstance(data, dict):
            raise TaskRegistryError("registry: must be a JSON object")
        _unknown_keys(data, _TOP_KEYS, "registry")
        version = data.get("schema_version")
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise TaskRegistryError(
                f"registry.schema_version: unsupported {version!r} (this code reads {SUPPORTED_SCHEMA_VERSIONS})"
            )
        values, _ = _parameters(data.get("parameters"), parameters)

        raw_schemes = data.get("coding_schemes", [])
        if not isinstance(raw_schemes, list):
            raise TaskRegistryError("coding_schemes: must be a list")
        schemes: list[CodingScheme] = []
        for i, s in enumerate(raw_schemes):
            where = f"coding_schemes[{i}]"
            if not isinstance(s, dict):
                raise _fail(where, "must be an object")
            _unknown_keys(s, _SCHEME_KEYS, where)
            designator = _req(s, "designator", str, where)
            where = f"coding_schemes[{i}] ({designator})"
            if not _PRIVATE.match(designator):
                raise _fail(
                    f"{where}.designator",
                    "a declared scheme must be private: '99' then up to 14 of A-Z, 0-9, _ (DICOM PS3.3 8.2)",
                )
            if designator in {c.designator for c in schemes}:
                raise _fail(f"{where}.designator", "declared twice")
            extras = {}
            for k in ("responsible_organization", "version", "description"):
                v = s.get(k, "")
                if not isinstance(v, str):
                    raise _fail(f"{where}.{k}", "must be a string")
                extras[k] = v
            schemes.append(CodingScheme(designator=designator, name=_req(s, "name", str, where), **extras))
        private = {s.designator for s in schemes}

        raw_tasks = _req(data, "tasks", list, "registry")
        if not raw_tasks:
            raise TaskRegistryError("registry.tasks: must not be empty")
        tasks = tuple(_task(t, i, private, values) for i, t in enumerate(raw_tasks))
        cls._check_unique(tasks)
        return cls(
            tasks=tasks,
            coding_schemes=tuple(schemes),
            schema_version=version,
            parameters=dict(values),
            source=source,
            _raw=data,
        )

    @staticmethod
    def _check_unique(tasks: Sequence[Task]) -> None:
        seen_key: dict[str, int] = {}
        seen_name: dict[str, int] = {}
        seen_col: dict[str, int] = {}
        seen_code: dict[tuple[Any, ...], int] = {}
        for t in tasks:
            where = f"tasks[{t.index}] ({t.key})"
            if t.key in seen_key:
                raise _fail(f"{where}.key", f"duplicate key (also tasks[{seen_key[t.key]}])")
            seen_key[t.key] = t.index
            if t.name in seen_name:
                raise _fail(f"{where}.name", f"duplicate name {t.name!r} (also tasks[{seen_name[t.name]}])")
            seen_name[t.name] = t.index
            if t.label_column is not None:
                if t.label_column in seen_col:
                    raise _fail(
                        f"{where}.label_column", f"duplicate (also tasks[{seen_col[t.label_column]}])"
                    )
                seen_col[t.label_column] = t.index
            # two tasks with the same finding and site could not be told apart in the SR
            site = t.finding_site
            ident = (
                t.concept.scheme_designator,
                t.concept.value,
                site and (site.scheme_designator, site.value),
            )
            if ident in seen_code:
                raise _fail(
                    f"{where}.concept",
                    f"same concept and finding site as tasks[{seen_code[ident]}]; the SR could not tell them apart",
                )
            seen_code[ident] = t.index
        # a code value must not carry two meanings within the registry
        meanings: dict[tuple[str, str], tuple[str, str]] = {}
        for t in tasks:
            for part, c in (("concept", t.concept), ("finding_site", t.finding_site)):
                if c is None:
                    continue
                k = (c.scheme_designator, c.value)
                if k in meanings and meanings[k][0] != c.meaning:
                    raise _fail(
                        f"tasks[{t.index}] ({t.key}).{part}.meaning",
                        f"{c.meaning!r} differs from {meanings[k][0]!r} used for the same code in {meanings[k][1]}",
                    )
                meanings.setdefault(k, (c.meaning, t.key))

    # -- access --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __contains__(self, key: object) -> bool:
        return any(t.key == key for t in self.tasks)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(t.key for t in self.tasks)

    def by_key(self, key: str) -> Task:
        for t in self.tasks:
            if t.key == key:
                return t
        raise KeyError(f"no task {key!r} in the registry (tasks: {', '.join(self.keys)})")

    def by_index(self, index: int) -> Task:
        """The task with this registry index (``Task.index``, stable under :meth:`subset`)."""
        for t in self.tasks:
            if t.index == index:
                return t
        raise IndexError(f"no task with index {index} (indices: {[t.index for t in self.tasks]})")

    def by_group(self, group: str) -> tuple[Task, ...]:
        if group not in GROUPS:
            raise ValueError(f"unknown group {group!r}; must be one of {GROUPS}")
        return tuple(t for t in self.tasks if t.group == group)

    def subset(self, keys: Iterable[str]) -> TaskRegistry:
        """A registry with only these tasks (e.g. the 18 radiology tasks of a CT-RATE model).

        Tasks keep their registry order and their ``index`` (the task-embedding row); unknown or
        repeated keys are refused.
        """
        wanted = list(keys)
        if not wanted:
            raise TaskRegistryError("subset: no task keys given")
        unknown = [k for k in wanted if k not in self]
        if unknown:
            raise TaskRegistryError(f"subset: unknown task key(s) {unknown} (tasks: {', '.join(self.keys)})")
        dupes = sorted({k for k in wanted if wanted.count(k) > 1})
        if dupes:
            raise TaskRegistryError(f"subset: task key(s) given twice {dupes}")
        chosen = set(wanted)
        return replace(self, tasks=tuple(t for t in self.tasks if t.key in chosen))

    def with_parameters(self, **parameters: float) -> TaskRegistry:
        """The same registry with parameters changed (e.g. ``lavi_threshold=35``), re-validated."""
        if not self._raw:
            raise TaskRegistryError("with_parameters: this registry was not built from a registry file")
        full = TaskRegistry.from_dict(self._raw, source=self.source, **{**self.parameters, **parameters})
        return full.subset(self.keys) if len(full) != len(self) else full

    # -- export --------------------------------------------------------------------------------

    def used_coding_schemes(self) -> tuple[CodingScheme, ...]:
        """The declared private schemes that these tasks' codes actually use."""
        used = {
            c.scheme_designator
            for t in self.tasks
            for c in (t.concept, t.finding_site)
            if c is not None
        }  # fmt: skip
        return tuple(s for s in self.coding_schemes if s.designator in used)

    def to_manifest_entries(self) -> list[dict[str, Any]]:
        """Plain dicts for the manifest's ``tasks``; export adds ``file``, ``sha256`` and ``threshold``."""
        return [t.to_manifest_entry() for t in self.tasks]

    def coding_schemes_for_manifest(self) -> list[dict[str, str]]:
        """Plain dicts for the manifest's ``coding_schemes`` (the private schemes in use)."""
        return [s.to_dict() for s in self.used_coding_schemes()]
