"""run_evaluate_stage on a tiny trained run: the numbers are llmlab.inference.evaluate's, results.json,
the comparison table, status and inputs helpers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from rich.console import Console

from llmlab.runplan import build_run_plan
from llmlab.stages.evaluate import (
    EvaluateError,
    comparison_table,
    evaluate_inputs,
    evaluate_stage_status,
    evaluation_rows,
    run_evaluate_stage,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluated(trained):
    """``(run_dir, resolved, results)`` of the compare stage run directly."""
    from llmlab.data.tokenizer import load_tokenizer

    _, resolved = trained
    run = Path(resolved["output_dir"])
    paths = {n: run / n for n in resolved["stages"]}
    results = run_evaluate_stage(build_run_plan(resolved), "compare", paths, load_tokenizer(run / "tokenizer"))
    return run, resolved, results


def _strip_seconds(results: dict) -> dict:
    return {m: {ds: {k: v for k, v in met.items() if k != "seconds"} for ds, met in per.items()}
            for m, per in results.items()}


def test_results_cover_every_model_and_dataset_and_are_written(evaluated):
    run, _, results = evaluated
    assert list(results) == ["pretrain", "sft", "dpo"]  # the default: every earlier training stage
    for per in results.values():
        assert list(per) == ["bible", "chat", "chat_pairs", "prompts"]
        assert [per[ds]["kind"] for ds in per] == ["text", "conversation", "preference", "prompt"]
        assert per["bible"]["rows"] == 12 and per["chat"]["rows"] == 12 and per["chat_pairs"]["pairs"] == 12
        assert per["prompts"]["prompts"] == 2
    assert json.loads((run / "compare" / "results.json").read_text()) == results


def test_numbers_equal_llmlab_inference_evaluate_called_directly(evaluated):
    from llmlab.inference.datasets import load_eval_rows
    from llmlab.inference.evaluate import evaluate_model
    from llmlab.inference.generation import GenerationSettings
    from llmlab.inference.loading import load_for_inference

    run, resolved, results = evaluated
    ref, _, _ = load_for_inference(run / "sft" / "final")
    for stage in ("pretrain", "sft", "dpo"):
        model, tok, is_chat = load_for_inference(run / stage / "final")
        for ds in ("bible", "chat"):
            kind, rows = load_eval_rows(ds, limit=12, recipe=resolved)  # what `llmlab eval RUN -d ds` reads
            direct = evaluate_model(model, tok, rows, kind)
            got = results[stage][ds]
            assert got["tokens"] == direct["tokens"] > 0
            assert got["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
            assert got["mean_loss"] == pytest.approx(direct["mean_loss"], rel=1e-6)
            if kind == "text":
                assert got["bits_per_byte"] == pytest.approx(direct["bits_per_byte"], rel=1e-6)
        kind, rows = load_eval_rows("chat_pairs", limit=12, recipe=resolved)
        direct = evaluate_model(model, tok, rows, kind, is_chat=is_chat, reference=ref, beta=0.1)
        got = results[stage]["chat_pairs"]
        for key in ("logp_accuracy", "chosen_logp", "rejected_logp", "reward_accuracy", "reward_margin"):
            assert got[key] == pytest.approx(direct[key], rel=1e-6, abs=1e-9), (stage, key)
        kind, rows = load_eval_rows("prompts", limit=12, recipe=resolved)
        settings = GenerationSettings(max_new_tokens=8, temperature=0.8, seed=resolved["seed"])
        direct = evaluate_model(model, tok, rows, kind, is_chat=is_chat, settings=settings, num_samples=2)
        assert [s["completion"] for s in results[stage]["prompts"]["samples"]] == \
            [s["completion"] for s in direct["samples"]]
    # the reference scored against itself: zero implicit rewards
    assert results["sft"]["chat_pairs"]["reward_margin"] == pytest.approx(0.0, abs=1e-6)


def test_rows_are_the_held_out_split_evenly_spaced(trained):
    from llmlab.data.sources import load_named_dataset

    _, resolved = trained
    held_out = load_named_dataset(resolved, "bible").eval.to_list()
    kind, rows = evaluation_rows(resolved, "bible", 5)
    step = len(held_out) / 5
    assert kind == "text" and rows == [{"text": held_out[int(i * step)]["text"]} for i in range(5)]
    assert evaluation_rows(resolved, "bible", 10_000)[1] == [{"text": r["text"]} for r in held_out]


def test_a_second_evaluation_gives_the_same_numbers(evaluated, tmp_path):
    run, resolved, results = evaluated
    rec = copy.deepcopy(resolved)
    rec["stages"]["compare"]["models"] = ["dpo"]
    rec["stages"]["compare"]["datasets"] = {"chat_pairs": 1, "prompts": 1}
    paths = {n: run / n for n in rec["stages"]} | {"compare": tmp_path / "compare"}
    again = run_evaluate_stage(build_run_plan(rec), "compare", paths)
    assert _strip_seconds(again) == {"dpo": {ds: _strip_seconds(results)["dpo"][ds] for ds in ("chat_pairs", "prompts")}}
    assert (tmp_path / "compare" / "results.json").is_file()


def test_comparison_table_has_a_row_per_model_and_headline_columns(evaluated):
    _, _, results = evaluated
    table = comparison_table(results, title="compare")
    headers = [c.header for c in table.columns]
    assert headers == ["model", "bible\nperplexity", "bible\nbits_per_byte", "chat\nperplexity",
                       "chat_pairs\nlogp_accuracy", "chat_pairs\nreward_accuracy", "chat_pairs\nnll_loss",
                       "prompts\nmean_completion_tokens"]
    assert table.row_count == 3
    console = Console(record=True, width=300, color_system=None)
    console.print(table)
    text = console.export_text()
    assert f"{results['dpo']['bible']['perplexity']:.2f}" in text
    assert all(m in text for m in ("pretrain", "sft", "dpo"))


def test_comparison_table_marks_missing_and_skipped_values():
    results = {"rm": {"pairs": {"kind": "preference", "reward_accuracy": 0.75, "reward_model": True},
                      "bible": {"kind": "text", "rows": 3, "skipped": "a reward model only scores preference data"}},
               "sft": {"pairs": {"kind": "preference", "logp_accuracy": 0.5},
                       "bible": {"kind": "text", "perplexity": 12.345, "bits_per_byte": 1.5}}}
    table = comparison_table(results)
    assert [c.header for c in table.columns] == ["model", "pairs\nlogp_accuracy", "pairs\nreward_accuracy",
                                                 "bible\nperplexity", "bible\nbits_per_byte"]
    cells = [list(c.cells) for c in table.columns]
    assert cells[1] == ["-", "[bold]0.500[/]"] and cells[2] == ["[bold]0.750[/]", "-"]
    assert cells[3] == ["-", "[bold]12.35[/]"]


def test_a_model_stage_without_final_is_an_error(evaluated, tmp_path):
    run, resolved, _ = evaluated
    paths = {n: run / n for n in resolved["stages"]} | {"sft": tmp_path / "sft", "compare": tmp_path / "compare"}
    with pytest.raises(EvaluateError, match="stage sft has no finished output"):
        run_evaluate_stage(build_run_plan(resolved), "compare", paths)
    assert not (tmp_path / "compare" / "results.json").exists()
    with pytest.raises(EvaluateError, match="not an evaluate stage"):
        run_evaluate_stage(build_run_plan(resolved), "dpo", paths)


def test_inputs_and_status_helpers(evaluated, tmp_path):
    from llmlab.fingerprint import stage_fingerprints

    _, resolved, _ = evaluated
    cfg = resolved["stages"]["compare"]
    assert evaluate_inputs(cfg) == {"from": None, "models[0]": "pretrain", "models[1]": "sft", "models[2]": "dpo",
                                    "reference_from": "sft"}
    fp = stage_fingerprints(resolved, list(resolved["stages"]))["compare"]
    d = tmp_path / "compare"
    d.mkdir()
    assert evaluate_stage_status(d, fp)[0] == "pending"
    (d / "stage.json").write_text(json.dumps({"status": "done", "fingerprint": fp["fingerprint"], "parts": fp["parts"]}))
    assert evaluate_stage_status(d, fp) == ("pending", "results.json is missing")
    (d / "results.json").write_text("{}")
    assert evaluate_stage_status(d, fp)[0] == "done"
    other = copy.deepcopy(fp)
    other["fingerprint"] = "0" * 64
    other["parts"]["config"]["max_samples"] = 99
    status, detail = evaluate_stage_status(d, other)
    assert status == "stale" and "max_samples: 12 → 99" in detail
