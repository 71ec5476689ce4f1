"""Loading any stage's output for inference: final/, adapter/, run dir + stage; the chat rule."""

from __future__ import annotations

import shutil

import pytest
import torch

from llmlab.inference.loading import ModelLoadError, load_for_inference, locate_model


def test_final_dir_of_pretrain_is_a_base_model(tiny_run):
    model, tok, is_chat = load_for_inference(tiny_run / "pretrain" / "final")
    assert not is_chat
    assert not model.training
    assert tok.chat_template  # the template exists, but the model was never fine-tuned


def test_run_dir_plus_stage_loads_the_chat_model(tiny_run):
    model, _, is_chat = load_for_inference(tiny_run, stage="sft")
    assert is_chat
    ref, _, _ = load_for_inference(tiny_run / "sft" / "final")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_adapter_base_comes_from_the_recipe_and_adapter_is_applied(tiny_run):
    # adapter_config.json names a hub id that is not on this machine: the base must come from the
    # run recipe's `from: sft`, and the hub must not be contacted.
    loc = locate_model(tiny_run / "lora" / "adapter")
    assert loc.model_dir == (tiny_run / "sft" / "final").resolve()
    merged, _, is_chat = load_for_inference(loc)
    assert is_chat

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_run / "sft" / "final")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        plain = base(ids).logits
        peft = PeftModel.from_pretrained(base, tiny_run / "lora" / "adapter").eval()(ids).logits
        got = merged(ids).logits
    assert torch.allclose(got, peft, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-4)  # the adapter changed something


def test_run_dir_without_stage_takes_the_last_finished_stage(tiny_run):
    loc = locate_model(tiny_run)
    assert loc.stage_name == "lora" and loc.adapter_dir is not None
    assert any("last finished stage" in n for n in loc.notes)


def test_errors_name_what_is_missing(tiny_run, tmp_path):
    with pytest.raises(ModelLoadError, match="no stage 'dpo'.*pretrain"):
        locate_model(tiny_run, stage="dpo")
    with pytest.raises(ModelLoadError, match="no such file"):
        locate_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="not a model directory"):
        locate_model(tmp_path)


def test_foreign_checkpoint_chat_rule(tiny_run, tmp_path):
    # No llmlab stage metadata: a chat template means chat, none means base.
    d = tmp_path / "foreign"
    shutil.copytree(tiny_run / "sft" / "final", d)
    assert load_for_inference(d)[2] is True
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = None
    tok.save_pretrained(d)
    for f in d.glob("chat_template.*"):
        f.unlink()
    assert load_for_inference(d)[2] is False


def test_loading_a_final_tokenizer_never_asks_a_question(tiny_run, tmp_path):
    """A final/ of llmlab's own model carries an auto_map in config.json; transformers' AutoTokenizer
    then asks "run the custom code? [y/N]" unless trust_remote_code is decided. llmlab's tokenizer
    loading (tokenizer.from_pretrained: a final/) decides it: no code, no question."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from llmlab.models.build import build_model

    from .conftest import subprocess_env

    tok = AutoTokenizer.from_pretrained(tiny_run / "tokenizer")
    final = tmp_path / "final"
    build_model({"arch": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "max_seq_len": 64},
                tokenizer=tok).save_pretrained(final)
    tok.save_pretrained(final)
    assert "auto_map" in (final / "config.json").read_text()
    script = ("import builtins, sys\n"
              "def ask(*a, **k):\n    print('ASKED', flush=True); sys.exit(3)\n"
              "builtins.input = ask\n"
              "from llmlab.data.tokenizer import _load_pretrained\n"
              "t = _load_pretrained({'from_pretrained': sys.argv[1]}, [], None)\n"
              "print('OK', len(t))\n")
    r = subprocess.run([sys.executable, "-c", script, str(final)], capture_output=True, text=True, timeout=120,
                       env=subprocess_env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and f"OK {len(tok)}" in r.stdout, r.stdout + r.stderr[-2000:]


@pytest.mark.parametrize("model_keys, stage_keys, want", [
    ({"max_seq_len": 96}, {"seq_len": 64}, 96),  # what build.py writes: model.max_seq_len
    ({}, {"seq_len": 64}, 64),  # a from_pretrained model: the stage's seq_len
    ({}, {}, None),  # nothing known: serve falls back to UNDECLARED_CONTEXT, as before
])
def test_a_mamba2_final_without_a_context_gets_the_recipes(tmp_path, model_keys, stage_keys, want):
    """A Mamba2 trained before config.json carried max_seq_len: serve used 2048 and chat/generate no
    limit; the loader takes the context from the run's recipe.resolved.yaml."""
    import json

    import yaml
    from transformers import Mamba2ForCausalLM

    from llmlab.inference.generation import context_limit
    from llmlab.layout import RESOLVED_HEADER
    from llmlab.models.build import mamba2_config

    from .conftest import build_tokenizer, kjv_verses

    tok = build_tokenizer(kjv_verses(100))
    cfg = mamba2_config({"arch": "mamba2", "d_model": 32, "n_layers": 1, "state_size": 16, "head_dim": 16,
                         "expand": 2, "chunk_size": 16}, len(tok), {"eos_token_id": tok.eos_token_id})
    final = tmp_path / "run" / "pretrain" / "final"
    Mamba2ForCausalLM(cfg).save_pretrained(final)
    tok.save_pretrained(final)
    assert "max_seq_len" not in json.loads((final / "config.json").read_text())
    (final.parent / "stage.json").write_text(json.dumps({"status": "done", "type": "pretrain"}))
    recipe = {"name": "old", "model": {"arch": "mamba2", "d_model": 32, **model_keys},
              "stages": {"pretrain": {"type": "pretrain", **stage_keys}}}
    (tmp_path / "run" / "recipe.resolved.yaml").write_text(RESOLVED_HEADER + " x\n" + yaml.safe_dump(recipe))
    loc = locate_model(tmp_path / "run", "pretrain")
    model, _, _ = load_for_inference(loc, device="cpu")
    assert context_limit(model) == want
    assert any("declares no context" in n for n in loc.notes) == (want is not None)
