"""LoRA per stage: merged weights equal base + adapter; a merged SFT feeds DPO; unmerged keeps adapter/."""

import copy
import json

import pytest
import torch

from llmlab.layout import RunLayout
from llmlab.commands.run import run_command
from tests.tiny import TINY, write_recipe

pytestmark = pytest.mark.slow


def test_merged_logits_equal_base_plus_adapter():
    from llmlab.models.build import apply_lora, build_model

    torch.manual_seed(0)
    model = build_model(TINY["model"], vocab_size=300)
    peft_model = apply_lora(model, {"preset": "all", "r": 4, "alpha": 8, "dropout": 0.0}, "transformer_gated")
    with torch.no_grad():  # LoRA B starts at zero; make the adapter do something
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x = torch.randint(0, 300, (2, 16))
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(input_ids=x).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=x).logits
        merged = peft_model.merge_and_unload()
        after = merged(input_ids=x).logits
    assert (before - base).abs().max() > 1e-3  # the adapter matters
    assert (before - after).abs().max() < 1e-4


def _lora_recipe(merge: bool):
    rec = copy.deepcopy(TINY)
    rec["stages"]["pretrain"]["max_steps"] = 10
    rec["stages"]["sft"]["lora"] = {"preset": "all", "r": 4, "alpha": 8, "merge": merge}
    rec["stages"]["sft"]["optimizer"]["lr"] = 5e-3
    rec["stages"]["dpo"]["max_steps"] = 4
    return rec


def test_lora_sft_merged_then_dpo(tmp_path):
    assert run_command(write_recipe(tmp_path, _lora_recipe(True))) == 0
    from safetensors.torch import load_file

    sft = tmp_path / "run" / "sft"
    keys = load_file(str(sft / "final" / "model.safetensors")).keys()
    assert not any("lora" in k for k in keys)
    assert not (sft / "adapter").exists()
    pre = load_file(str(tmp_path / "run" / "pretrain" / "final" / "model.safetensors"))
    post = load_file(str(sft / "final" / "model.safetensors"))
    changed = [k for k in pre if not torch.equal(pre[k], post[k])]
    assert changed and all(("proj" in k) for k in changed)  # only adapted projections moved
    assert json.loads((tmp_path / "run" / "dpo" / "stage.json").read_text())["status"] == "done"


def test_lora_unmerged_keeps_adapter(tmp_path):
    rec = _lora_recipe(False)
    rec["stages"] = {k: rec["stages"][k] for k in ("pretrain", "sft")}
    assert run_command(write_recipe(tmp_path, rec)) == 0
    adapter = tmp_path / "run" / "sft" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "sft" / "final" / "config.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_qlora_without_gpu_fails_clearly_and_keeps_finished_stages(tmp_path, capsys):
    rec = _lora_recipe(True)
    rec["stages"] = {k: rec["stages"][k] for k in ("pretrain", "sft")}
    rec["stages"]["sft"]["lora"]["quantize"] = "4bit"
    assert run_command(write_recipe(tmp_path, rec)) == 1
    out = capsys.readouterr().out
    assert "lora.quantize" in out and "CUDA GPU" in out
    assert json.loads((tmp_path / "run" / "pretrain" / "stage.json").read_text())["status"] == "done"


def test_unmerged_adapter_is_trained_further_by_the_next_stage(tmp_path):
    from safetensors.torch import load_file

    rec = _lora_recipe(False)  # sft keeps its adapter; dpo has no lora of its own
    assert run_command(write_recipe(tmp_path, rec)) == 0
    run = tmp_path / "run"
    dpo = json.loads((run / "dpo" / "stage.json").read_text())
    layout = RunLayout(run)  # stage.json records paths inside the run relative to it
    assert layout.locate(dpo["init_adapter"]) == run / "sft" / "adapter"
    assert layout.locate(dpo["init_path"]) == run / "pretrain" / "final"  # the adapter's base, not sft's merged weights
    sft_ad = load_file(str(run / "sft" / "adapter" / "adapter_model.safetensors"))
    dpo_ad = load_file(str(run / "dpo" / "adapter" / "adapter_model.safetensors"))
    assert sft_ad.keys() == dpo_ad.keys()
    assert any(not torch.equal(sft_ad[k], dpo_ad[k]) for k in sft_ad)  # dpo trained the same adapter further
    # only the adapter moved: dpo's merged weights differ from pretrain's only in adapted projections
    pre = load_file(str(run / "pretrain" / "final" / "model.safetensors"))
    post = load_file(str(run / "dpo" / "final" / "model.safetensors"))
    assert all(torch.equal(pre[k], post[k]) for k in pre if "proj" not in k)
