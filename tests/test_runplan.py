"""The run plan (llmlab.runplan): its dataclasses agree with the schema, it holds the fingerprints
and statuses the rest of llmlab computes, and building it imports no torch."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmlab import runplan, specs, stage_params
from llmlab.recipe import load_recipe_or_raise
from llmlab.recipe.schema import _lookup, allowed_keys, load_schema, resolve_ref
from llmlab.runplan import build_run_plan
from tests.tiny import TINY

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def _schema_classes() -> list[type]:
    mods = (runplan, specs, stage_params)
    return [c for m in mods for c in vars(m).values()
            if isinstance(c, type) and dataclasses.is_dataclass(c) and "SCHEMA" in vars(c)]


def _node(ref: str) -> dict:
    return load_schema() if ref == "#" else _lookup(load_schema(), ref)


def _expected_keys(cls) -> set[str]:
    node = _node(cls.SCHEMA)
    keys = set(allowed_keys(node)) - set(getattr(cls, "ELSEWHERE", ()))
    if node.get("$ref") == "#/$defs/stage_common":  # a stage type's params: its own keys only
        keys -= set(allowed_keys(_node("#/$defs/stage_common")))
    return keys


def _fields(cls) -> dict[str, dataclasses.Field]:
    """Recipe key -> field, for the fields that hold a key of the class's schema section."""
    return {specs._key(f): f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}


def test_there_are_schema_classes_for_every_section():
    names = {c.__name__ for c in _schema_classes()}
    assert {"RunSettings", "TokenizerSpec", "TransformerSpec", "Mamba2Spec", "PretrainedSpec", "DatasetSource",
            "LoraSpec", "DPOParams", "GRPOParams", "PPOParams", "EvaluateParams"} <= names


@pytest.mark.parametrize("cls", _schema_classes(), ids=lambda c: c.__name__)
def test_every_field_is_a_key_of_its_schema_section_and_back(cls):
    assert set(_fields(cls)) == _expected_keys(cls), (
        f"{cls.__name__} and {cls.SCHEMA} disagree: fields only {sorted(set(_fields(cls)) - _expected_keys(cls))}, "
        f"schema keys only {sorted(_expected_keys(cls) - set(_fields(cls)))}")


@pytest.mark.parametrize("cls", _schema_classes(), ids=lambda c: c.__name__)
def test_no_field_types_a_default_of_its_own(cls):
    """A field is None by default only where the schema's default is null (or there is none, for a
    key resolution may leave absent); every other value comes from the resolved recipe."""
    props = {}
    node = _node(cls.SCHEMA)
    for key in _fields(cls):  # the key's schema, through $ref and allOf
        stack = [node]
        while stack and key not in props:
            n = stack.pop()
            if "$ref" in n:
                stack.append(_node(n["$ref"]))
            if key in n.get("properties", {}):
                props[key] = resolve_ref(n["properties"][key])
            stack.extend(n.get("allOf", []))
    for key, f in _fields(cls).items():
        assert f.default_factory is dataclasses.MISSING, f"{cls.__name__}.{f.name}: a default factory"
        if f.default is dataclasses.MISSING:
            continue
        assert f.default is None, f"{cls.__name__}.{f.name}: default {f.default!r} typed beside the schema"
        assert props[key].get("default") is None, (
            f"{cls.__name__}.{f.name}: None by default, but the schema's default is {props[key]['default']!r}")


def test_every_stage_params_class_is_registered_under_its_schema_type():
    for stage_type, cls in stage_params.STAGE_PARAMS.items():
        assert cls.SCHEMA == f"#/$defs/stage_{stage_type}"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_plan_holds_the_fingerprints_and_statuses_of_the_recipe(path, tmp_path):
    from llmlab.fingerprint import stage_fingerprints, stage_inputs
    from llmlab.stage_specs import stage_spec
    from llmlab.status import results_stage_status, stage_status

    def status(n):  # the rule by hand: a stage that trains has steps, one that does not a results file
        spec, d = stage_spec(rec["stages"][n]["type"]), tmp_path / "run" / n
        if spec.trains:
            return stage_status(d, fps[n], rec["stages"][n]["max_steps"])
        return results_stage_status(d, fps[n], spec.results_file)

    rec = load_recipe_or_raise(path, env={})
    rec["output_dir"] = str(tmp_path / "run")
    plan = build_run_plan(rec)
    order = list(rec["stages"])
    assert plan.order == order
    assert plan.fingerprints() == stage_fingerprints(rec, order)
    fps = stage_fingerprints(rec, order)
    assert plan.statuses() == {n: status(n) for n in order}
    for s in plan.stages:
        assert s.inputs == stage_inputs(rec, s.name, order)
        assert s.layout.dir == tmp_path / "run" / s.name
        assert (s.training is None) == (not s.spec.trains)
    assert plan.settings.seed == rec["seed"] and plan.settings.output_dir == tmp_path / "run"
    assert type(plan.model).__name__ == {"transformer": "TransformerSpec", "mamba2": "Mamba2Spec",
                                         None: "PretrainedSpec"}[rec["model"].get("arch")]


def test_the_plan_is_frozen(tmp_path):
    plan = build_run_plan(load_recipe_or_raise(RECIPES[0], env={}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.stages[0].fingerprint = "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.model.d_model = 1


def _tiny(tmp_path, mutate=None) -> dict:
    rec = copy.deepcopy(TINY)
    rec["output_dir"] = "run"
    if mutate:
        mutate(rec)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(rec, sort_keys=False))
    return load_recipe_or_raise(path, env={})


def test_a_stage_without_lora_continues_an_unmerged_adapter_through_the_chain(tmp_path):
    def mutate(rec):
        rec["stages"]["sft"]["lora"] = {"preset": "attention_only", "r": 4, "merge": False}
        rec["stages"]["dpo2"] = copy.deepcopy(rec["stages"]["dpo"])

    plan = build_run_plan(_tiny(tmp_path, mutate))
    assert plan.stage("pretrain").lora is None and plan.stage("pretrain").init.adapter_from is None
    assert plan.stage("sft").lora.r == 4 and plan.stage("sft").init.adapter_from is None
    for name, frm in (("dpo", "sft"), ("dpo2", "dpo")):  # dpo continues sft's adapter, dpo2 the one dpo saved
        assert plan.stage(name).init.adapter_from == frm
        assert plan.stage(name).lora == plan.stage("sft").lora  # sft's LoRA config, trained on
    assert plan.stage("dpo2").init.weights_from == "dpo"


def test_a_merged_adapter_is_not_continued(tmp_path):
    plan = build_run_plan(_tiny(tmp_path, lambda rec: rec["stages"]["sft"].update(lora={"r": 4})))
    assert plan.stage("sft").lora.merge is True
    assert plan.stage("dpo").lora is None and plan.stage("dpo").init.adapter_from is None


def test_values_come_from_the_schema_defaults(tmp_path):
    plan = build_run_plan(_tiny(tmp_path))
    defaults = load_schema()["$defs"]
    assert plan.stage("dpo").params.loss_type == defaults["stage_dpo"]["properties"]["loss_type"]["default"]
    assert plan.stage("sft").training.keep_last == defaults["stage_common"]["properties"]["keep_last"]["default"]
    assert plan.datasets["bible"].filters.dedup == "none" and plan.datasets["bible"].kind == "builtin"
    assert plan.model.rope_theta == defaults["model_transformer"]["properties"]["rope_theta"]["default"]


def test_building_the_plan_imports_no_torch():
    code = ("import sys, json; from llmlab.recipe import load_recipe_or_raise; "
            "from llmlab.runplan import build_run_plan; "
            f"p = build_run_plan(load_recipe_or_raise({str(ROOT / 'recipes' / 'quickstart.yaml')!r})); "
            "p.statuses(); print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert json.loads(out.stdout) == []


def test_schema_filled_and_top_level_take_the_schemas_defaults():
    from llmlab.schemafile import schema_filled, top_level

    ds = schema_filled("#/$defs/dataset", {"builtin": "kjv"}, nulls=True)
    props = load_schema()["$defs"]["dataset"]["properties"]
    assert ds["split"] == props["split"]["default"] and ds["eval_split"] == props["eval_split"]["default"]
    assert ds["subset"] is None and ds["filters"]["min_length"] is None  # null defaults present with nulls
    assert "subset" not in schema_filled("#/$defs/dataset", {"builtin": "kjv"})
    assert top_level({}, "seed") == load_schema()["properties"]["seed"]["default"]
    assert top_level({"seed": 5}, "seed") == 5


def test_a_bare_model_section_gets_the_schemas_defaults_not_the_codes():
    from llmlab.models.params import as_model_spec

    spec = as_model_spec({"arch": "transformer", "d_model": 64, "n_heads": 4})
    props = load_schema()["$defs"]["model_transformer"]["properties"]
    assert (spec.d_model, spec.n_layers, spec.activation) == (64, props["n_layers"]["default"],
                                                             props["activation"]["default"])
    with pytest.raises(ValueError, match="needs arch"):
        as_model_spec({})
