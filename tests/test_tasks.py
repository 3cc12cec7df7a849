"""The task registry (training/tasks.json + training/tasks.py): content, codes, validation, subset."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from training.tasks import DEFAULT_PATH, STANDARD_SCHEMES, EchoRule, TaskRegistry, TaskRegistryError

REPO = Path(__file__).resolve().parents[1]

SPEC_ORDER = [
    "reduced_rv_systolic_function",
    "reduced_lv_systolic_function",
    "pulmonary_hypertension",
    "atrial_chamber_enlargement",
    "ventricular_enlargement",
    "left_atrial_filling_pressure",
    "right_atrial_filling_pressure",
    "medical_material",
    "arterial_wall_calcification",
    "cardiomegaly",
    "pericardial_effusion",
    "coronary_artery_wall_calcification",
    "hiatal_hernia",
    "lymphadenopathy",
    "emphysema",
    "atelectasis",
    "lung_nodule",
    "lung_opacity",
    "pulmonary_fibrotic_sequela",
    "pleural_effusion",
    "mosaic_attenuation_pattern",
    "peribronchial_thickening",
    "consolidation",
    "bronchiectasis",
    "interlobular_septal_thickening",
]

CT_RATE_COLUMNS = [
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
]


@pytest.fixture(scope="module")
def registry() -> TaskRegistry:
    return TaskRegistry.load()


@pytest.fixture()
def raw() -> dict:
    return json.loads(DEFAULT_PATH.read_text(encoding="utf-8"))


def _rule(reg: TaskRegistry, key: str) -> EchoRule:
    rule = reg.by_key(key).echo_rule
    assert rule is not None, key
    return rule


def _all_concepts(reg: TaskRegistry):
    for t in reg:
        yield t, "concept", t.concept
        if t.finding_site is not None:
            yield t, "finding_site", t.finding_site


# ---------------------------------------------------------------------------------------------
# Content
# ---------------------------------------------------------------------------------------------


def test_registry_loads_25_tasks_in_spec_order(registry: TaskRegistry) -> None:
    assert len(registry) == 25
    assert list(registry.keys) == SPEC_ORDER
    assert [t.index for t in registry] == list(range(25))
    assert registry.by_index(0).key == "reduced_rv_systolic_function"
    assert registry.by_index(6).key == "right_atrial_filling_pressure"
    assert registry.by_index(7).key == "medical_material"
    assert registry.by_index(24).key == "interlobular_septal_thickening"
    assert registry.source == "tasks.json"


def test_default_path_is_packaged_next_to_module() -> None:
    assert DEFAULT_PATH == REPO / "training" / "tasks.json"
    assert TaskRegistry.load(DEFAULT_PATH).keys == TaskRegistry.load().keys


def test_groups(registry: TaskRegistry) -> None:
    assert [t.key for t in registry.by_group("cardiac")] == SPEC_ORDER[:7]
    assert [t.key for t in registry.by_group("radiology")] == SPEC_ORDER[7:]


def test_radiology_names_are_ct_rate_columns(registry: TaskRegistry) -> None:
    radiology = registry.by_group("radiology")
    assert [t.name for t in radiology] == CT_RATE_COLUMNS
    assert [t.label_column for t in radiology] == CT_RATE_COLUMNS
    for t in radiology:
        assert t.echo_rule is None
        assert t.saliency is True


def test_cardiac_tasks_are_predicted_echo_findings(registry: TaskRegistry) -> None:
    for t in registry.by_group("cardiac"):
        assert t.label_column is None
        assert t.echo_rule is not None and t.echo_rule.criteria
        assert t.saliency is False, t.key
        assert t.definition.startswith("Predicted "), t.key
        assert t.concept.scheme_designator == "99HYPERCT", t.key
        assert t.concept.meaning.startswith("Predicted ") and "echo" in t.concept.meaning, t.key
        assert t.finding_site is not None and t.finding_site.scheme_designator == "SCT"


def test_definitions_are_one_ascii_line(registry: TaskRegistry) -> None:
    for t in registry:
        assert t.definition and "\n" not in t.definition and t.definition.isascii(), t.key
        assert "{" not in t.definition, f"{t.key}: unresolved placeholder"


# ---------------------------------------------------------------------------------------------
# Codes
# ---------------------------------------------------------------------------------------------


def _pydicom_meanings(scheme: str) -> dict[str, set[str]]:
    from pydicom.sr.codedict import codes

    out: dict[str, set[str]] = {}
    for code in getattr(codes, scheme).concepts.values():
        out.setdefault(code.value, set()).add(code.meaning)
    return out


def test_sct_and_dcm_codes_known_to_pydicom_match_their_meaning(registry: TaskRegistry) -> None:
    known = {s: _pydicom_meanings(s) for s in ("SCT", "DCM")}
    checked = 0
    for t, part, c in _all_concepts(registry):
        if c.scheme_designator in known and c.value in known[c.scheme_designator]:
            meanings = known[c.scheme_designator][c.value]
            assert c.meaning in meanings, f"{t.key}.{part}: {c} but pydicom says {sorted(meanings)}"
            checked += 1
    assert checked >= 30  # most codes (findings and sites) are checkable offline


def test_pydicom_verification_notes_resolve(registry: TaskRegistry) -> None:
    """Every ``pydicom:SCHEME.Keyword`` note names the very code and meaning used."""
    from pydicom.sr.codedict import codes

    for t, part, c in _all_concepts(registry):
        assert c.verification, f"{t.key}.{part}: no verification note"
        kind = c.verification.split(":", 1)[0]
        assert kind in {"pydicom", "radlex", "corroborated", "private"}, f"{t.key}.{part}: {c.verification}"
        if kind == "pydicom":
            scheme, keyword = c.verification.split(":", 1)[1].split(".", 1)
            code = getattr(getattr(codes, scheme), keyword)
            assert (code.value, code.scheme_designator, code.meaning) == (
                c.value,
                c.scheme_designator,
                c.meaning,
            ), f"{t.key}.{part}"
        if kind == "private":
            assert c.scheme_designator.startswith("99"), f"{t.key}.{part}"


def test_cardiomegaly_avoids_the_conflicting_dicom_code(registry: TaskRegistry) -> None:
    """DICOM CID 12248 calls SCT 287272002 'Cardiomegaly', DICOM's SNOMED table calls it something else."""
    meanings = _pydicom_meanings("SCT")["287272002"]
    assert "Enlarged septal foramen of heart (disorder)" in meanings  # why it is not used
    assert registry.by_key("cardiomegaly").concept.value != "287272002"


def test_every_concept_builds_highdicom_and_pydicom_objects(registry: TaskRegistry) -> None:
    from highdicom.sr import CodedConcept as HdCodedConcept
    from pydicom.sr.coding import Code

    for t, part, c in _all_concepts(registry):
        hd = c.to_highdicom()
        assert isinstance(hd, HdCodedConcept), f"{t.key}.{part}"
        assert (hd.value, hd.scheme_designator, hd.meaning) == (c.value, c.scheme_designator, c.meaning)
        code = c.to_pydicom_code()
        assert isinstance(code, Code)
        assert (code.value, code.scheme_designator, code.meaning) == (c.value, c.scheme_designator, c.meaning)
        assert hd == code, f"{t.key}.{part}: highdicom and pydicom disagree"


def test_schemes_are_standard_or_declared(registry: TaskRegistry) -> None:
    declared = {s.designator for s in registry.coding_schemes}
    assert declared == {"99HYPERCT"}
    for t, part, c in _all_concepts(registry):
        assert c.scheme_designator in STANDARD_SCHEMES | declared, f"{t.key}.{part}"


def test_private_scheme_declaration(registry: TaskRegistry) -> None:
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    (scheme,) = registry.coding_schemes
    assert scheme.name and scheme.responsible_organization == "HyperCT Node project" and scheme.version
    item = scheme.to_highdicom()
    assert isinstance(item, CodingSchemeIdentificationItem)
    assert item.CodingSchemeDesignator == "99HYPERCT"
    assert item.CodingSchemeResponsibleOrganization == "HyperCT Node project"
    assert registry.coding_schemes_for_manifest() == [scheme.to_dict()]


def test_no_two_tasks_share_finding_and_site(registry: TaskRegistry) -> None:
    seen = set()
    for t in registry:
        site = t.finding_site and (t.finding_site.scheme_designator, t.finding_site.value)
        ident = (t.concept.scheme_designator, t.concept.value, site)
        assert ident not in seen, t.key
        seen.add(ident)


# ---------------------------------------------------------------------------------------------
# Echo rules and the LAVI parameter
# ---------------------------------------------------------------------------------------------

NAN = math.nan


@pytest.mark.parametrize(
    ("key", "row", "expected"),
    [
        ("reduced_rv_systolic_function", {"ECHO_rv_systolic_function_value": "normal"}, 0.0),
        ("reduced_rv_systolic_function", {"ECHO_rv_systolic_function_value": " Normal "}, 0.0),
        ("reduced_rv_systolic_function", {"ECHO_rv_systolic_function_value": "mildly reduced"}, 1.0),
        ("reduced_rv_systolic_function", {"ECHO_rv_systolic_function_value": None}, None),
        ("reduced_lv_systolic_function", {"ECHO_lvef_value": 49.9}, 1.0),
        ("reduced_lv_systolic_function", {"ECHO_lvef_value": 50}, 0.0),
        ("reduced_lv_systolic_function", {"ECHO_lvef_value": NAN}, None),
        ("pulmonary_hypertension", {"ECHO_pasp_value": 36}, 1.0),
        ("pulmonary_hypertension", {"ECHO_pasp_value": 35}, 0.0),
        ("atrial_chamber_enlargement", {"ECHO_la_volume_index_value": 34.5}, 1.0),
        ("atrial_chamber_enlargement", {"ECHO_la_volume_index_value": 34}, 0.0),
        ("ventricular_enlargement", {"ECHO_lv_d_measurement": 5.5, "Patients_Sex": "F"}, 1.0),
        ("ventricular_enlargement", {"ECHO_lv_d_measurement": 5.5, "Patients_Sex": "M"}, 0.0),
        ("ventricular_enlargement", {"ECHO_lv_d_measurement": 6.0, "Patients_Sex": "M"}, 1.0),
        # sex neither F nor M: no cut-off applies, so missing (the released code gives 0; we do not
        # add unverifiable negatives, docs/evaluation.md 1.4)
        ("ventricular_enlargement", {"ECHO_lv_d_measurement": 7.0, "Patients_Sex": "O"}, None),
        ("ventricular_enlargement", {"ECHO_lv_d_measurement": 7.0, "Patients_Sex": None}, None),
        ("ventricular_enlargement", {"ECHO_lv_d_measurement": None, "Patients_Sex": "F"}, None),
        ("left_atrial_filling_pressure", {"ECHO_e_a_ratio": 2.0}, 1.0),
        ("left_atrial_filling_pressure", {"ECHO_e_a_ratio": 1.0, "ECHO_tr_max_velocity_value": 2.9}, 1.0),
        ("left_atrial_filling_pressure", {"ECHO_la_volume_index_value": 40}, 1.0),
        ("left_atrial_filling_pressure", {"ECHO_e_a_ratio": 1.0, "ECHO_la_volume_index_value": NAN}, 0.0),
        ("left_atrial_filling_pressure", {}, None),
        ("right_atrial_filling_pressure", {"ECHO_tr_max_velocity_value": 3.5}, 1.0),
        ("right_atrial_filling_pressure", {"ECHO_tr_max_velocity_value": 3.4}, 0.0),
    ],
)
def test_echo_rules_follow_spec(registry: TaskRegistry, key: str, row: dict, expected: float | None) -> None:
    assert _rule(registry, key).evaluate(row) == expected


def test_lavi_threshold_defaults_to_paper_and_is_configurable(registry: TaskRegistry) -> None:
    def lavi(reg: TaskRegistry, key: str) -> float:
        (c,) = [c for c in _rule(reg, key).criteria if c.field == "ECHO_la_volume_index_value"]
        assert c.parameter == "lavi_threshold" and c.threshold is not None
        return c.threshold

    assert registry.parameters["lavi_threshold"] == 34
    assert (
        lavi(registry, "atrial_chamber_enlargement") == lavi(registry, "left_atrial_filling_pressure") == 34
    )
    assert "LAVI > 34 mL/m2" in registry.by_key("atrial_chamber_enlargement").definition
    code = registry.with_parameters(lavi_threshold=35)
    assert lavi(code, "atrial_chamber_enlargement") == lavi(code, "left_atrial_filling_pressure") == 35
    assert "LAVI > 35 mL/m2" in code.by_key("left_atrial_filling_pressure").definition
    assert _rule(code, "atrial_chamber_enlargement").evaluate({"ECHO_la_volume_index_value": 34.5}) == 0
    assert TaskRegistry.load(lavi_threshold=35).parameters["lavi_threshold"] == 35
    # the concept does not change with the threshold; the definition and the rule do
    assert (
        code.by_key("atrial_chamber_enlargement").concept
        == registry.by_key("atrial_chamber_enlargement").concept
    )
    with pytest.raises(TaskRegistryError, match="lavi_threshold.*allowed choices"):
        registry.with_parameters(lavi_threshold=40)
    with pytest.raises(TaskRegistryError, match="unknown parameter 'lvef'"):
        TaskRegistry.load(lvef=45)


# ---------------------------------------------------------------------------------------------
# Subset and manifest
# ---------------------------------------------------------------------------------------------


def test_subset_keeps_order_and_index(registry: TaskRegistry) -> None:
    sub = registry.subset(["emphysema", "cardiomegaly", "medical_material"])
    assert sub.keys == ("medical_material", "cardiomegaly", "emphysema")  # registry order
    assert [t.index for t in sub] == [7, 9, 14]  # task-embedding rows, unchanged
    assert sub.by_index(14).key == "emphysema"
    with pytest.raises(IndexError):
        sub.by_index(0)
    ct_rate = registry.subset(t.key for t in registry.by_group("radiology"))
    assert len(ct_rate) == 18 and not ct_rate.by_group("cardiac")
    assert registry.subset(["emphysema"]).coding_schemes_for_manifest() == []  # no private code used
    assert sub.with_parameters(lavi_threshold=35).keys == sub.keys


def test_subset_refuses_unknown_and_repeated_keys(registry: TaskRegistry) -> None:
    with pytest.raises(TaskRegistryError, match="unknown task key.*'pneumothorax'"):
        registry.subset(["emphysema", "pneumothorax"])
    with pytest.raises(TaskRegistryError, match="given twice.*'emphysema'"):
        registry.subset(["emphysema", "emphysema"])
    with pytest.raises(TaskRegistryError, match="no task keys"):
        registry.subset([])
    with pytest.raises(KeyError, match="pneumothorax"):
        registry.by_key("pneumothorax")


def test_manifest_entries_are_plain_json(registry: TaskRegistry) -> None:
    entries = registry.to_manifest_entries()
    assert json.loads(json.dumps(entries)) == entries
    assert [e["key"] for e in entries] == SPEC_ORDER
    e = entries[SPEC_ORDER.index("pleural_effusion")]
    assert e["concept"] == {"value": "60046008", "scheme_designator": "SCT", "meaning": "Pleural effusion"}
    assert e["finding_site"]["meaning"] == "Pleura" and e["label_column"] == "Pleural effusion"
    assert "verification" not in json.dumps(entries)
    lv = entries[1]
    assert lv["echo_rule"]["criteria"][0] == {
        "field": "ECHO_lvef_value", "operator": "<", "threshold": 50.0, "units": "%", "ucum": "%",
    }  # fmt: skip
    assert "finding_site" not in entries[SPEC_ORDER.index("medical_material")]


def test_manifest_entries_parse_as_manifest_tasks(registry: TaskRegistry) -> None:
    """Contract with the serving side: operators.manifest accepts what the registry exports."""
    import operators.manifest as manifest

    tasks = [
        {**e, "file": f"{e['key']}.onnx", "sha256": "0" * 64, "threshold": 0.5}
        for e in registry.to_manifest_entries()
    ]
    data = {
        "schema_version": 1, "name": "t", "version": "0", "created": "2026-01-01", "format": "merged",
        "precision": "fp32", "backbone": {}, "preprocessing": {}, "tasks": tasks,
        "inputs": {"images": {"dtype": "float32", "shape": ["N", 3, 144, 144]}, "mask": {"dtype": "bool", "shape": ["N"]}},
        "outputs": {"logit": {"dtype": "float32", "shape": [1]}},
        "intended_use": "test", "licences": [{"name": "test"}], "training_data": {},
        "coding_schemes": registry.coding_schemes_for_manifest(),
    }  # fmt: skip
    parsed = manifest.parse_manifest(data)
    assert [t.key for t in parsed.tasks] == SPEC_ORDER
    assert parsed.task("cardiomegaly").concept.value == registry.by_key("cardiomegaly").concept.value
    assert parsed.task("lung_nodule").finding_site.meaning == "Lung"
    with pytest.raises(manifest.ManifestError, match="99HYPERCT"):
        manifest.parse_manifest({**data, "coding_schemes": []})


def test_module_does_not_import_heavy_packages() -> None:
    code = (
        "import sys; import training.tasks as t; t.TaskRegistry.load(); "
        "heavy = [m for m in ('torch', 'numpy', 'pydicom', 'highdicom', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ---------------------------------------------------------------------------------------------
# Invalid registries are refused with a message naming the task and field
# ---------------------------------------------------------------------------------------------


def _task_entry(raw: dict, key: str) -> dict:
    return next(t for t in raw["tasks"] if t["key"] == key)


def _refused(raw: dict, *patterns: str) -> None:
    with pytest.raises(TaskRegistryError) as e:
        TaskRegistry.from_dict(raw)
    for p in patterns:
        assert p in str(e.value), f"{p!r} not in {str(e.value)!r}"


def test_duplicate_key_refused(raw: dict) -> None:
    _task_entry(raw, "emphysema")["key"] = "atelectasis"
    _refused(raw, "(atelectasis).key", "duplicate key")


def test_unknown_scheme_refused(raw: dict) -> None:
    _task_entry(raw, "emphysema")["concept"]["scheme_designator"] = "SNOMED"
    _refused(raw, "tasks[14] (emphysema).concept.scheme_designator", "unknown coding scheme 'SNOMED'")


def test_undeclared_private_scheme_refused(raw: dict) -> None:
    raw["coding_schemes"] = []
    _refused(
        raw,
        "tasks[0] (reduced_rv_systolic_function).concept.scheme_designator",
        "'99HYPERCT' is not declared",
    )


def test_bad_private_designator_refused(raw: dict) -> None:
    raw["coding_schemes"][0]["designator"] = "HYPERCT"
    _refused(raw, "coding_schemes[0] (HYPERCT).designator", "'99'")


def test_missing_concept_refused(raw: dict) -> None:
    del _task_entry(raw, "cardiomegaly")["concept"]
    _refused(raw, "tasks[9] (cardiomegaly).concept", "missing required field 'concept'")


def test_missing_concept_field_refused(raw: dict) -> None:
    del _task_entry(raw, "cardiomegaly")["concept"]["meaning"]
    _refused(raw, "tasks[9] (cardiomegaly).concept", "missing required field 'meaning'")


def test_unknown_group_refused(raw: dict) -> None:
    _task_entry(raw, "lung_nodule")["group"] = "pulmonary"
    _refused(raw, "tasks[16] (lung_nodule).group", "unknown group 'pulmonary'")


@pytest.mark.parametrize(
    ("key", "mutate", "expected"),
    [
        ("cardiomegaly", lambda t: t["concept"].update(value="RID1"), "(cardiomegaly).concept.value"),
        ("emphysema", lambda t: t["concept"].update(value="4799"), "not a RadLex id"),
        ("emphysema", lambda t: t["concept"].update(meaning="x" * 65), "at most 64"),
        ("emphysema", lambda t: t["concept"].update(meaning="emphys\u00e8me"), "printable ASCII"),
        ("emphysema", lambda t: t.update(colour="red"), "(emphysema): unknown field(s) ['colour']"),
        ("emphysema", lambda t: t.update(index=3), "(emphysema).index"),
        ("emphysema", lambda t: t.update(saliency="yes"), "(emphysema).saliency"),
        ("emphysema", lambda t: t.update(label_column=None), "(emphysema).label_column"),
        ("emphysema", lambda t: t.update(key="Emphysema"), "snake_case"),
        (
            "lung_nodule",
            lambda t: t.update(
                concept=dict(t["concept"], value="112001", scheme_designator="DCM", meaning="Opacity")
            ),
            None,
        ),
        ("ventricular_enlargement", lambda t: t.update(saliency=True), "(ventricular_enlargement).saliency"),
        ("ventricular_enlargement", lambda t: t.pop("echo_rule"), "(ventricular_enlargement).echo_rule"),
        (
            "ventricular_enlargement",
            lambda t: t["echo_rule"]["criteria"][0].update(operator="~"),
            "(ventricular_enlargement).echo_rule.criteria[0].operator",
        ),
        (
            "atrial_chamber_enlargement",
            lambda t: t["echo_rule"]["criteria"][0].update(parameter="lavi"),
            "unknown parameter 'lavi'",
        ),
        (
            "atrial_chamber_enlargement",
            lambda t: t.update(definition="LAVI > {lavi} mL/m2"),
            "unknown placeholder {lavi}",
        ),
        ("medical_material", lambda t: t.update(echo_rule={"criteria": []}), "(medical_material).echo_rule"),
    ],
)
def test_invalid_task_fields_refused(raw: dict, key: str, mutate, expected: str | None) -> None:
    mutate(_task_entry(raw, key))
    if expected is None:  # lung_nodule made identical to lung_opacity: same concept and site
        _refused(raw, "(lung_opacity).concept", "could not tell them apart")
    else:
        _refused(raw, expected)


def test_same_code_with_two_meanings_refused(raw: dict) -> None:
    _task_entry(raw, "coronary_artery_wall_calcification")["concept"]["meaning"] = "Vascular calcification"
    _refused(
        raw, "(coronary_artery_wall_calcification).concept.meaning", "differs from 'Vascular Calcification'"
    )


def test_top_level_errors(raw: dict) -> None:
    bad = copy.deepcopy(raw)
    bad["schema_version"] = 99
    _refused(bad, "schema_version", "99")
    bad = copy.deepcopy(raw)
    bad["taks"] = []
    _refused(bad, "registry: unknown field(s) ['taks']")
    bad = copy.deepcopy(raw)
    bad["tasks"] = []
    _refused(bad, "registry.tasks: must not be empty")


def test_load_reports_file_problems(tmp_path: Path) -> None:
    with pytest.raises(TaskRegistryError, match="not found"):
        TaskRegistry.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TaskRegistryError, match="not valid JSON"):
        TaskRegistry.load(bad)


def test_user_can_add_a_task(raw: dict, tmp_path: Path) -> None:
    """The documented way to extend the registry: append an entry, no code change."""
    raw["tasks"].append(
        {
            "key": "pneumothorax",
            "name": "Pneumothorax",
            "group": "radiology",
            "label_column": "Pneumothorax",
            "definition": "Air in the pleural space",
            "concept": {"value": "36118008", "scheme_designator": "SCT", "meaning": "Pneumothorax",
                        "verification": "pydicom:SCT.Pneumothorax"},
            "finding_site": {"value": "3120008", "scheme_designator": "SCT", "meaning": "Pleura"},
            "saliency": True,
        }
    )  # fmt: skip
    f = tmp_path / "tasks.json"
    f.write_text(json.dumps(raw))
    reg = TaskRegistry.load(f)
    assert len(reg) == 26 and reg.by_index(25).key == "pneumothorax"
    assert (
        reg.by_key("pneumothorax").concept.to_pydicom_code()
        == reg.by_key("pneumothorax").concept.to_highdicom()
    )
