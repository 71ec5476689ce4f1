"""Oracle: an exported Llama/Mistral checkpoint, loaded with plain transformers, gives our logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, MistralForCausalLM

from llmlab.models.export import export_command, export_model
from tests.models.conftest import VOCAB, make_model


def _export_and_compare(tmp_path, to, cls, **over):
    model = make_model(seed=1, **over)
    # give the norms non-trivial weights so a mix-up would show
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    src, dst = tmp_path / "src", tmp_path / "dst"
    model.save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")
    export_model(src, to, dst)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == to and "auto_map" not in cfg
    assert (dst / "tokenizer_config.json").exists() and not (dst / "modeling_llmlab.py").exists()
    native = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    assert type(native) is cls
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x).logits, native(x).logits
        diff = (ours - theirs).abs().max().item()
        gen_ours = model.generate(x[:, :5], max_new_tokens=10, do_sample=False, pad_token_id=0)
        gen_theirs = native.generate(x[:, :5], max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert diff < 1e-4, diff
    assert torch.equal(gen_ours, gen_theirs)
    return diff


@pytest.mark.parametrize("over", [
    dict(),
    dict(tie_embeddings=False, attention_bias=True, mlp_bias=True, rope_theta=1000.0),
    dict(attention_type="mqa", n_kv_heads=1),
    dict(positional_encoding="yarn", rope_scaling={"factor": 4.0, "original_max_seq_len": 16}),
], ids=["gqa_tied", "untied_biases", "mqa", "yarn"])
def test_export_llama_same_logits(tmp_path, over):
    _export_and_compare(tmp_path, "llama", LlamaForCausalLM, **over)


@pytest.mark.parametrize("window", [4, None])
def test_export_mistral_with_sliding_window_same_logits(tmp_path, window):
    _export_and_compare(tmp_path, "mistral", MistralForCausalLM, sliding_window=window)


@pytest.mark.parametrize("over,to,named", [
    (dict(norm_type="layernorm"), "llama", "norm_type"),
    (dict(activation="gelu"), "llama", "activation"),
    (dict(positional_encoding="alibi"), "llama", "positional_encoding"),
    (dict(n_experts=2), "llama", "n_experts"),
    (dict(sliding_window=4), "llama", "sliding_window"),
    (dict(attention_bias=True), "mistral", "attention_bias"),
])
def test_export_mismatch_names_the_component(tmp_path, over, to, named):
    make_model(**over).save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match=named):
        export_model(tmp_path / "src", to, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    assert export_command(tmp_path / "src", to, tmp_path / "dst") == 1


def test_export_command_success_and_bad_target(tmp_path, capsys):
    make_model().save_pretrained(tmp_path / "src")
    assert export_command(tmp_path / "src", "llama", tmp_path / "dst") == 0
    assert (tmp_path / "dst" / "model.safetensors").exists()
    assert export_command(tmp_path / "src", "gpt2", tmp_path / "dst2") == 1
    assert "gpt2" in capsys.readouterr().err


def test_export_writes_over_nothing_of_the_users(tmp_path, capsys):
    """export wrote config.json and model.safetensors over whatever OUT_DIR held: a user's folder
    is refused with a list of its files (not one byte changes), also the model's own folder; an
    earlier export is replaced, but not a user's file dropped into it."""
    from llmlab.ownership import NotOwnedError, owns

    make_model().save_pretrained(tmp_path / "src")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": 1}')
    (mine / "notes.txt").write_text("mine")
    for out in (mine, tmp_path / "src"):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        with pytest.raises(NotOwnedError, match="config.json"):
            export_model(tmp_path / "src", "llama", out)
        assert export_command(tmp_path / "src", "llama", out) == 1
        assert "config.json" in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    dst = export_model(tmp_path / "src", "llama", tmp_path / "dst")
    assert owns(dst, "export")
    assert export_command(tmp_path / "src", "mistral", dst) == 0  # its own earlier export: replaced
    assert json.loads((dst / "config.json").read_text())["model_type"] == "mistral"
    (dst / "notes.txt").write_text("mine")
    assert export_command(tmp_path / "src", "llama", dst) == 1 and "notes.txt" in capsys.readouterr().err
    assert (dst / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "mine", "src"]  # no .dst.tmp left
