"""KTO's unpaired preference data (``prompt/completion/label``): detection, normalisation, batches
with the completion labelled and ``desirable`` set from each row; pairs and unpaired rows do not mix."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.data.formats import BadRow, detect_format, norm_unpaired_preference
from llmlab.data.pipeline import IGNORE_INDEX, build_stage_data
from llmlab.data.tokenizer import IM_END
from tests.data.conftest import make_recipe


def test_detect_and_normalise():
    assert detect_format(["prompt", "completion", "label"]) == "unpaired_preference"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    row = norm_unpaired_preference({"prompt": "Hi?", "completion": "Hello.", "label": 1})
    assert row == {"prompt": [{"role": "user", "content": "Hi?"}],
                   "completion": [{"role": "assistant", "content": "Hello."}], "label": True}
    for bad, match in (({"prompt": "a", "completion": "b"}, "missing field 'label'"),
                       ({"prompt": "a", "completion": "b", "label": "yes"}, "not true/false"),
                       ({"prompt": "a", "completion": [{"role": "user", "content": "b"}], "label": False},
                        "expected 'assistant'")):
        with pytest.raises(BadRow, match=match):
            norm_unpaired_preference(bad)


def _unpaired_file(path, n: int = 40) -> str:
    rows = [{"prompt": f"Question {i}?", "completion": f"{'Good' if i % 3 else 'Bad'} answer {i}.",
             "label": bool(i % 3)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _kto_recipe(tmp_path, datasets: dict) -> dict:
    rec = make_recipe(tmp_path)
    rec["datasets"]["unpaired"] = {"path": _unpaired_file(tmp_path / "kto.jsonl"), "eval_split": 0.2}
    rec["stages"]["kto"] = {"type": "kto", "datasets": datasets, "seq_len": 128, "batch_size": 8,
                            "max_steps": 4, "eval_steps": 1}
    return rec


def test_kto_batches_from_unpaired_rows(tmp_path, tokenizer):
    data = build_stage_data(_kto_recipe(tmp_path, {"unpaired": 1.0}), "kto", tokenizer)
    assert data.family == "unpaired_preference"
    b = data.train_batch(0)
    assert set(b) == {"input_ids", "attention_mask", "labels", "desirable"}
    assert b["desirable"].dtype == torch.bool and b["desirable"].shape == (8,)
    for i in range(8):
        completion = tokenizer.decode(b["labels"][i][b["labels"][i] != IGNORE_INDEX])
        assert completion.endswith(IM_END)
        # the label travels with its own row: "Good" completions are the desirable ones
        assert completion.startswith("Good") == bool(b["desirable"][i])
        prompt = tokenizer.decode(b["input_ids"][i][: int((b["labels"][i] != IGNORE_INDEX).nonzero()[0])])
        assert prompt.endswith("<|im_start|>assistant\n") and "Question" in prompt
    assert data.eval_batches() and "desirable" in data.eval_batches()[0]


def test_kto_on_pairs_keeps_pair_batches_and_refuses_a_mix(tmp_path, tokenizer):
    data = build_stage_data(_kto_recipe(tmp_path, {"chat_pairs": 1.0}), "kto", tokenizer)
    assert data.family == "pair" and "chosen_input_ids" in data.train_batch(0)
    with pytest.raises(ValueError, match="takes unpaired_preference rows or preference rows, not both"):
        build_stage_data(_kto_recipe(tmp_path, {"chat_pairs": 1.0, "unpaired": 1.0}), "kto", tokenizer)
