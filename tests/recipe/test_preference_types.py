"""The new preference types through the recipe machinery: they validate, plan shows the reference
model only where one is loaded, KTO's mismatched pairs count as tokens, each key is in the
fingerprint, and keys of another type are refused."""

from __future__ import annotations

import copy

from llmlab.fingerprint import stage_fingerprints
from llmlab.recipe import load_recipe
from llmlab.recipe.api import stage_order
from tests.tiny import TINY, write_recipe


def _recipe(tmp_path, **extra_stages):
    rec = copy.deepcopy(TINY)
    for name, keys in extra_stages.items():
        rec["stages"][name] = {**copy.deepcopy(TINY["stages"]["dpo"]), "from": "sft", **keys}
    return write_recipe(tmp_path, rec)


def test_new_types_validate_and_plan_their_reference_memory(tmp_path):
    from llmlab.plan import plan_rows

    path = _recipe(tmp_path, orpo={"type": "orpo"}, kto={"type": "kto", "desirable_weight": 1.3},
                   simpo={"loss_type": "simpo", "simpo_gamma": 0.8}, cpo={"loss_type": "cpo", "cpo_alpha": 0.5},
                   kto_lora={"type": "kto", "lora": {"preset": "attention_only", "r": 4}})
    rec, errors = load_recipe(path)
    assert errors == []
    rows = {r["stage"]: r for r in plan_rows(rec)[0]}
    weights = rows["dpo"]["memory"]["weights"]
    assert weights > 0 and rows["dpo"]["memory"]["frozen"] == weights  # a frozen copy
    assert rows["kto"]["memory"]["frozen"] == weights
    for name in ("orpo", "simpo", "cpo", "kto_lora", "sft"):  # reference-free, or the base under LoRA
        assert rows[name]["memory"]["frozen"] == 0, name
    # kto: 2 sequences per pair with gradients plus 2 mismatched ones without: twice dpo's tokens,
    # the same activations
    assert rows["kto"]["tokens"] == 2 * rows["dpo"]["tokens"]
    assert rows["kto"]["memory"]["activations"] == rows["dpo"]["memory"]["activations"]


def test_new_keys_change_the_fingerprint(tmp_path):
    rec, errors = load_recipe(_recipe(tmp_path, kto={"type": "kto"}, simpo={"loss_type": "simpo"}))
    assert errors == []
    order = stage_order(rec)
    before = stage_fingerprints(rec, order)
    for name, key, value in (("kto", "undesirable_weight", 1.5), ("simpo", "simpo_gamma", 1.0)):
        changed = copy.deepcopy(rec)
        changed["stages"][name][key] = value
        assert stage_fingerprints(changed, order)[name]["fingerprint"] != before[name]["fingerprint"], key


def test_keys_of_another_type_or_loss_are_refused(tmp_path):
    _, errors = load_recipe(_recipe(tmp_path, orpo={"type": "orpo", "rpo_alpha": 1.0}))
    assert any("rpo_alpha" in str(e) for e in errors), errors
    _, errors = load_recipe(_recipe(tmp_path, kto={"type": "kto", "loss_type": "simpo"}))
    assert any("loss_type" in str(e) for e in errors), errors
    _, errors = load_recipe(_recipe(tmp_path, dpo2={"loss_type": "kto"}))
    assert any("loss_type" in str(e) for e in errors), errors


def test_kto_takes_unpaired_or_paired_datasets_not_both(tmp_path):
    rec = copy.deepcopy(TINY)
    (tmp_path / "kto.jsonl").write_text('{"prompt": "Hi?", "completion": "Hello.", "label": true}\n')
    rec["datasets"]["unpaired"] = {"path": "kto.jsonl", "format": "unpaired_preference"}
    rec["stages"]["kto"] = {**copy.deepcopy(TINY["stages"]["dpo"]), "type": "kto", "datasets": {"unpaired": 1.0}}
    _, errors = load_recipe(write_recipe(tmp_path, rec))
    assert errors == []
    rec["stages"]["kto"]["datasets"] = {"chat_pairs": 1.0, "unpaired": 1.0}
    _, errors = load_recipe(write_recipe(tmp_path, rec))
    assert any("not both" in str(e) and "unpaired" in str(e) for e in errors), errors
    rec["stages"]["dpo"]["datasets"] = {"unpaired": 1.0}  # only kto takes unpaired rows
    rec["stages"]["kto"]["datasets"] = {"unpaired": 1.0}
    _, errors = load_recipe(write_recipe(tmp_path, rec))
    assert any("a dpo stage cannot use" in str(e) for e in errors), errors


def test_dpo_keys_its_loss_type_does_not_use_are_refused(tmp_path):
    for keys, key in (({"loss_type": "simpo", "reference_from": "sft"}, "reference_from"),
                      ({"loss_type": "cpo", "rpo_alpha": 0.5}, "rpo_alpha"),
                      ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
                      ({"loss_type": "apo_down", "label_smoothing": 0.1}, "label_smoothing")):
        _, errors = load_recipe(_recipe(tmp_path, extra=keys))
        assert any(f"stages.extra.{key}" in str(e) for e in errors), (keys, errors)
    _, errors = load_recipe(_recipe(tmp_path, extra={"loss_type": "cpo", "cpo_alpha": 0.5}))
    assert errors == []
    _, errors = load_recipe(_recipe(tmp_path, extra={"loss_type": "apo_zero", "rpo_alpha": 1.0}))
    assert errors == []
