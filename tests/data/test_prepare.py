"""``llmlab prepare`` on the Lumi-Lab recipe with its hub corpus swapped for a max_tokens-bounded
local text stream: tokenised once, idempotent, shown by ``llmlab plan``, used by ``llmlab run``."""

from __future__ import annotations

import json
from pathlib import Path

from llmlab.data.prepare import dataset_plan
from llmlab.data.sources import kjv_chapters
from llmlab.data.store import TokenStore
from llmlab.plan import plan_rows
from llmlab.commands.data import prepare_command
from llmlab.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
LUMI = ROOT / "recipes" / "lumi_tiny_23m.yaml"


def _overrides(tmp_path: Path) -> list[str]:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in kjv_chapters()[:120]))
    return [f"datasets.fineweb={{path: {corpus}, format: text, streaming: true, max_tokens: 30000, eval_split: 0.05}}",
            "tokenizer.train.vocab_size=1024", "device=cpu", "precision=fp32", "compile=false",
            f"output_dir={tmp_path / 'run'}"]


def test_prepare_a_bounded_slice_then_plan_shows_it(tmp_path, capsys):
    sets = _overrides(tmp_path)
    assert prepare_command(LUMI, overrides=sets) == 0
    rec, errors = load_recipe(LUMI, sets)
    assert not errors
    stores = [TokenStore(p.parent) for p in (tmp_path / "run" / "cache" / "tokens").glob("*/manifest.json")]
    train = next(s for s in stores if s.manifest["split"] == "train")
    ev = next(s for s in stores if s.manifest["split"] == "eval")
    last = train.document(train.documents - 1).size
    assert train.tokens >= 30000 > train.tokens - last  # stopped at the bound, not at the file's end
    assert train.manifest["dtype"] == "uint16" and 0 < ev.documents < train.documents
    stamp = {p: p.stat().st_mtime_ns for p in train.path.iterdir()}
    assert prepare_command(LUMI, overrides=sets) == 0  # idempotent: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in train.path.iterdir()} == stamp
    rows, _ = plan_rows(rec)
    (ds,) = dataset_plan(rec, rows)
    assert (ds["documents"], ds["tokens"]) == (train.documents, train.tokens)
    assert abs(ds["epochs"] - rows[0]["tokens"] / train.tokens) < 1e-9
    capsys.readouterr()
    assert prepare_command(LUMI, overrides=sets, stage="nope") == 1
    assert "stages.nope: no such stage" in capsys.readouterr().out


def test_a_damaged_store_is_named_not_read(tmp_path, capsys):
    """A shard whose bytes changed fails ``prepare --verify`` naming the file; a shard of the wrong
    size fails on open (no silent garbage batches)."""
    import numpy as np
    import pytest

    from llmlab.data.store import StoreError

    sets = _overrides(tmp_path)
    assert prepare_command(LUMI, overrides=sets, verify=True) == 0
    train = next(TokenStore(p.parent) for p in (tmp_path / "run" / "cache" / "tokens").glob("*/manifest.json")
                 if json.loads(p.read_text())["split"] == "train")
    shard = train.path / train.manifest["shards"][0]["tokens_file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one token id changed, same size
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert prepare_command(LUMI, overrides=sets, verify=True) == 1
    assert f"{shard}: sha256 differs" in capsys.readouterr().out.replace("\n", "")
    np.save(shard, np.zeros(5, dtype=np.uint16))  # a shard of another size
    with pytest.raises(StoreError, match="different number of tokens"):
        TokenStore(train.path).window(0, 4)
