"""Behaviour of load_recipe: good recipes, misspellings, extends, --set, ${VAR}, defaults, paths."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import yaml

from llmlab.recipe import RecipeError, RecipeLoadError, dump_resolved, load_recipe, load_recipe_or_raise, stage_order
from llmlab.recipe.optim_auto import auto_lr, auto_warmup, non_embedding_parameters

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"

MINI = """\
name: mini
tokenizer:
  train: {datasets: [bible], vocab_size: 512}
model:
  arch: transformer
  d_model: 64
  n_layers: 2
  n_heads: 4
  max_seq_len: 128
datasets:
  bible: {builtin: kjv}
  chat: {builtin: chatterbot}
stages:
  pretrain:
    type: pretrain
    datasets: {bible: 1.0}
    max_steps: 10
  sft:
    type: sft
    datasets: {chat: 1.0}
    max_steps: 10
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def ok(path, *overrides, env=None) -> dict:
    resolved, errors = load_recipe(path, list(overrides), env=env)
    assert not errors, "\n".join(map(str, errors))
    return resolved


def errs(path, *overrides, env=None) -> list[RecipeError]:
    resolved, errors = load_recipe(path, list(overrides), env=env)
    assert resolved is None and errors
    return errors


# ------------------------------------------------------------------ shipped recipes


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate_clean(path):
    ok(path, env={})


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_name_the_schema(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first == "# yaml-language-server: $schema=../schemas/recipe.schema.json"


@pytest.mark.parametrize("old,new,suggestion", [
    ("  n_kv_heads: 2", "  n_kv_head: 2", "n_kv_heads"),
    ("    eval_steps: 9 ", "    eval_stpes: 9 ", "eval_steps"),
    ("  norm_type: rmsnorm", "  norm_type: rmsnrom", "rmsnorm"),
    ("    beta: 0.1", "    betta: 0.1", "beta"),
])
def test_misspelling_in_quickstart_points_at_its_line(tmp_path, old, new, suggestion):
    text = QUICKSTART.read_text(encoding="utf-8")
    assert text.count(old) == 1
    edited = text.replace(old, new)
    line = edited[: edited.index(new)].count("\n") + 1  # the misspelt key is on new's first line
    path = write(tmp_path / "quickstart.yaml", edited)
    errors = errs(path)
    key = new.strip().split(":")[0]
    hits = [e for e in errors if e.line == line]
    assert len(hits) == 1, errors  # (other errors may follow from the key now missing, on other lines)
    (e,) = hits
    assert e.file == str(path) and key in e.message
    assert f"(did you mean {suggestion!r}?)" in e.message
    assert str(e).startswith(f"{path}:{line}:")


# ------------------------------------------------------------------ errors


def test_error_string_format():
    e = RecipeError("r.yaml", 3, 5, "model.d_model", "bad")
    assert str(e) == "r.yaml:3:5: error: model.d_model: bad"
    assert e.to_dict() == {"file": "r.yaml", "line": 3, "col": 5, "path": "model.d_model", "message": "bad"}


def test_all_errors_at_once_sorted_by_line(tmp_path):
    text = MINI.replace("  n_heads: 4", "  n_heads: 5").replace("type: sft", "type: sfft").replace("name: mini", "name: mini\nseeed: 1")
    errors = errs(write(tmp_path / "r.yaml", text))
    assert [e.path for e in errors] == ["seeed", "model.d_model", "stages.sft.type"]
    assert [e.line for e in errors] == sorted(e.line for e in errors)


def test_load_recipe_or_raise(tmp_path):
    with pytest.raises(RecipeLoadError) as info:
        load_recipe_or_raise(write(tmp_path / "r.yaml", MINI.replace("d_model: 64", "d_model: 66")))
    assert info.value.errors and "d_model (66)" in str(info.value)
    assert load_recipe_or_raise(write(tmp_path / "ok.yaml", MINI))["name"] == "mini"


def test_yaml_one_point_two_floats(tmp_path):
    r = ok(write(tmp_path / "r.yaml", MINI + "    optimizer: {lr: 1e-5}\n"))
    assert r["stages"]["sft"]["optimizer"]["lr"] == pytest.approx(1e-5)


# ------------------------------------------------------------------ defaults and resolution


def test_defaults_are_filled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = ok(write(tmp_path / "sub" / "r.yaml", MINI + "    optimizer: {name: lion}\n    scheduler: {name: polynomial}\n"))
    m = r["model"]
    assert m["n_kv_heads"] == 4 and m["attention_type"] == "mha"
    assert m["d_ff"] == 64 * math.ceil(8 * 64 / 3 / 64) == 192  # swiglu default
    assert m["positional_encoding"] == "rope" and m["norm_type"] == "rmsnorm" and m["tie_embeddings"] is True
    assert "sliding_window" not in m and "n_experts" not in m  # null defaults stay absent
    pre, sft = r["stages"]["pretrain"], r["stages"]["sft"]
    # lr: auto in a pretrain stage with adamw (llmlab.recipe.optim_auto); sft's lion keeps the old 3e-4
    lr = auto_lr(non_embedding_parameters(m))
    assert pre["optimizer"] == {"name": "adamw", "lr": lr, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}
    assert pre["scheduler"] == {"name": "cosine", "warmup_steps": auto_warmup(0.95, pre["max_steps"]), "min_lr_ratio": 0.1}
    assert sft["optimizer"]["lr"] == 3e-4 and sft["optimizer"]["weight_decay"] == 0.0
    assert sft["optimizer"]["beta2"] == 0.99 and "eps" not in sft["optimizer"]
    assert sft["scheduler"] == {"name": "polynomial", "warmup_steps": 0, "power": 1.0}
    assert pre["seq_len"] == 128 and pre["batch_size"] == 8 and pre["log_every"] == 10
    assert "from" not in pre and sft["from"] == "pretrain"
    assert sft["truncation"] == "drop" and "beta" not in sft and "lora" not in sft
    assert r["datasets"]["bible"]["filters"] == {"dedup": "none", "minhash_threshold": 0.85}
    assert r["tokenizer"]["chat_template"] == "auto" and r["tokenizer"]["train"]["min_frequency"] == 2
    assert r["logging"] == {"report_to": [], "log_every": 10}
    assert r["output_dir"] == str(tmp_path / "runs" / "mini")
    assert "extends" not in r
    assert stage_order(r) == ["pretrain", "sft"]


def test_computed_defaults_follow_other_keys(tmp_path):
    text = MINI.replace("  n_heads: 4\n", "  n_heads: 4\n  n_kv_heads: 1\n  activation: gelu\n") + \
        "  grpo:\n    type: grpo\n    datasets: {chat: 1.0}\n    max_steps: 5\n    batch_size: 6\n    reward: [{function: 'mod:fn'}]\n" \
        "logging: {log_every: 3}\n"
    r = ok(write(tmp_path / "r.yaml", text))
    assert r["model"]["attention_type"] == "mqa" and r["model"]["d_ff"] == 256
    g = r["stages"]["grpo"]
    assert g["mini_batch_size"] == 6 and g["log_every"] == 3 and g["from"] == "sft" and g["group_size"] == 4
    assert g["reward"] == [{"function": "mod:fn", "weight": 1.0}]


def test_paths_are_made_absolute_relative_to_the_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "proj" / "tok").mkdir(parents=True)
    (tmp_path / "proj" / "data").mkdir()
    (tmp_path / "proj" / "data" / "chat.jsonl").write_text("")  # validate checks that local data exists
    text = MINI.replace("  train: {datasets: [bible], vocab_size: 512}", "  from_pretrained: tok") \
        .replace("  chat: {builtin: chatterbot}", "  chat: {path: data/chat.jsonl, format: messages}") + "output_dir: out/here\n"
    r = ok(write(tmp_path / "proj" / "r.yaml", text))
    assert r["tokenizer"]["from_pretrained"] == str(tmp_path / "proj" / "tok")
    assert r["datasets"]["chat"]["path"] == str(tmp_path / "proj" / "data" / "chat.jsonl")
    assert r["output_dir"] == str(tmp_path / "proj" / "out" / "here")
    hub = ok(write(tmp_path / "proj" / "h.yaml", text.replace("from_pretrained: tok", "from_pretrained: org/tokenizer")))
    assert hub["tokenizer"]["from_pretrained"] == "org/tokenizer"  # not a local path: a hub id


def test_dump_resolved_round_trips(tmp_path):
    r = ok(QUICKSTART)
    assert yaml.safe_load(dump_resolved(r)) == r
    assert list(yaml.safe_load(dump_resolved(r))["stages"]) == ["pretrain", "sft", "dpo", "compare"]


# ------------------------------------------------------------------ extends


BASE = MINI.replace("name: mini\n", "name: base\n") + "    optimizer: {name: adamw, lr: 1.0e-3, beta2: 0.98}\n"


def test_extends_merges_stages_by_name_and_replaces_lists(tmp_path):
    write(tmp_path / "base" / "base.yaml", BASE.replace("  bible: {builtin: kjv}", "  bible: {builtin: kjv}\n  local: {path: data/x.txt, format: text}"))
    write(tmp_path / "base" / "data" / "x.txt", "In the beginning\n")  # validate checks that local data exists
    child = write(tmp_path / "child.yaml", """\
extends: base/base.yaml
name: child
tokenizer:
  train: {datasets: [local]}
stages:
  sft:
    max_steps: 99
    optimizer: {lr: 1.0e-5}
  dpo:
    type: dpo
    datasets: {pairs: 1.0}
    max_steps: 3
datasets:
  pairs: {builtin: chatterbot_pairs}
""")
    r = ok(child)
    assert r["name"] == "child" and "extends" not in r
    assert stage_order(r) == ["pretrain", "sft", "dpo"]
    sft = r["stages"]["sft"]
    assert sft["max_steps"] == 99 and sft["type"] == "sft" and sft["datasets"] == {"chat": 1.0}
    assert sft["optimizer"]["lr"] == 1e-5 and sft["optimizer"]["beta2"] == 0.98  # deep-merged
    assert r["tokenizer"]["train"] == {"datasets": ["local"], "vocab_size": 512, "min_frequency": 2}  # list replaced
    assert r["datasets"]["local"]["path"] == str(tmp_path / "base" / "data" / "x.txt")  # relative to the base file


def test_extends_replaces_a_mapping_whose_kind_changes(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    r = ok(write(tmp_path / "c.yaml", "extends: base.yaml\nstages:\n  sft:\n    optimizer: {name: muon}\n"))
    assert r["stages"]["sft"]["optimizer"] == {"name": "muon", "lr": 3e-4, "weight_decay": 0.0, "momentum": 0.95, "nesterov": True,
                                                 "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}


def test_extends_errors_point_into_the_right_file(tmp_path):
    base = write(tmp_path / "base.yaml", BASE.replace("n_layers: 2", "n_layres: 2"))
    child = write(tmp_path / "c.yaml", "extends: base.yaml\nname: c\nseeed: 3\n")
    errors = errs(child)
    by_path = {e.path: e for e in errors}
    assert by_path["seeed"].file == str(child) and by_path["seeed"].line == 3
    e = by_path["model.n_layres"]
    assert Path(e.file).resolve() == base.resolve() and e.line == 7 and "did you mean 'n_layers'" in e.message


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\nname: a\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    errors = errs(tmp_path / "a.yaml")
    assert any("cycle" in e.message for e in errors)


# ------------------------------------------------------------------ --set


def test_set_overrides_by_stage_name(tmp_path):
    path = write(tmp_path / "r.yaml", MINI)
    r = ok(path, "stages.sft.optimizer.lr=1e-5", "model.n_layers=6", "stages.sft.datasets={chat: 2}",
           "stages.pretrain.optimizer.name=sophia")
    assert r["stages"]["sft"]["optimizer"]["lr"] == pytest.approx(1e-5)
    assert r["model"]["n_layers"] == 6
    assert r["stages"]["sft"]["datasets"] == {"chat": 2}
    assert r["stages"]["pretrain"]["optimizer"]["rho"] == 0.04


def test_set_errors_point_at_set(tmp_path):
    path = write(tmp_path / "r.yaml", MINI)
    errors = errs(path, "model.n_layers=2", "stages.sfft.optimizer.lr=1e-5", "stages.sft.max_steps=lots", "nonsense")
    s = [str(e) for e in errors]
    assert any(x.startswith("--set:2:1: error: stages.sfft: no stage named 'sfft' (did you mean 'sft'?)") for x in s), s
    assert any(x.startswith("--set:3:1: error: stages.sft.max_steps: expected an integer, got a string 'lots'") for x in s), s
    assert any(x.startswith("--set:4:1: error: ") and "KEY=VALUE" in x for x in s), s
    assert all(e.file == "--set" for e in errors)


def test_set_rho_with_adamw_is_an_error(tmp_path):
    errors = errs(write(tmp_path / "r.yaml", MINI), "stages.sft.optimizer.rho=0.1")
    assert "'rho' is only valid for optimizer sophia, not adamw" in errors[0].message


# ------------------------------------------------------------------ ${VAR}


def test_env_substitution(tmp_path):
    text = MINI.replace("name: mini", "name: ${RUN_NAME:-mini}").replace("max_steps: 10\n  sft", "max_steps: ${STEPS}\n  sft") \
        + "output_dir: ${OUT:-runs}/$${literal}\n"
    r = ok(write(tmp_path / "r.yaml", text), env={"STEPS": "42"})
    assert r["name"] == "mini"
    assert r["stages"]["pretrain"]["max_steps"] == 42  # a whole-string placeholder is read as YAML
    assert r["output_dir"].endswith("runs/${literal}")
    r2 = ok(write(tmp_path / "r.yaml", text), env={"STEPS": "7", "RUN_NAME": "other"})
    assert r2["name"] == "other" and r2["stages"]["pretrain"]["max_steps"] == 7


def test_env_missing_is_one_error_on_its_line(tmp_path):
    text = MINI.replace("max_steps: 10\n  sft", "max_steps: ${STEPS}\n  sft")
    errors = errs(write(tmp_path / "r.yaml", text), env={})
    assert len(errors) == 1 and errors[0].line == 17 and "'STEPS' is not set" in errors[0].message


# ------------------------------------------------------------------ duplicate keys, YAML errors


def test_duplicate_keys_are_errors(tmp_path):
    errors = errs(write(tmp_path / "r.yaml", MINI.replace("  n_heads: 4\n", "  n_heads: 4\n  n_heads: 8\n")))
    assert errors[0].line == 9 and "duplicate key 'n_heads' (first defined on line 8)" in errors[0].message


def test_empty_recipe(tmp_path):
    errors = errs(write(tmp_path / "r.yaml", "# nothing\n"))
    assert "empty" in errors[0].message


# ------------------------------------------------------------------ speed


def test_validate_is_fast():
    load_recipe(QUICKSTART)  # warm caches (schema, imports)
    t0 = time.perf_counter()
    for _ in range(5):
        load_recipe(QUICKSTART)
    assert (time.perf_counter() - t0) / 5 < 0.5


def test_yaml_one_point_two_booleans(tmp_path):
    r = ok(write(tmp_path / "r.yaml", MINI + "    gradient_accumulation_steps: 2\n    save_best_only: false\n"
                 .replace("save_best_only: false", "reset_optimizer: true")))
    assert r["stages"]["sft"]["reset_optimizer"] is True
    errors = errs(write(tmp_path / "b.yaml", MINI + "    reset_optimizer: yes\n"))
    assert "expected true or false, got a string 'yes'" in errors[0].message
