"""The training-memory estimate counts what a run holds (issue 24, item 5): the Mamba2 scan's float32
intermediates, frozen reference / reward copies, the process's fixed cost; and a stage planned far
beyond the machine's memory is refused before anything trains. Formulas are pinned on numbers
computed by hand, not on a measurement. Each test failed on the code of 2026-12-06."""

from __future__ import annotations

import copy

from llmlab.models.params import (CPU_RUNTIME_BYTES, count_parameters, mamba2_scan_elements_per_token,
                                  training_memory)
from tests.tiny import TINY, write_recipe

MAMBA = {"arch": "mamba2", "d_model": 64, "n_layers": 2, "state_size": 16, "head_dim": 16, "expand": 2,
         "conv_kernel": 4, "n_groups": 1, "chunk_size": 32, "max_seq_len": 64}


def test_mamba2_scan_elements_by_hand():
    # H = 2*64/16 = 8 heads, P = 16, N = 16, Q = 32, 2 layers:
    # 8*H*P = 1024, 3*H*N = 384, 6*H*Q = 1536, 3*H*P*N/Q = 192  ->  3136 per layer
    assert mamba2_scan_elements_per_token(MAMBA) == 2 * 3136


def test_mamba2_activations_add_the_float32_scan_even_in_bf16():
    vocab = 100
    p = count_parameters(MAMBA, vocab)
    fp32 = training_memory(MAMBA, vocab, 2, 64, p, "adamw", "fp32")
    bf16 = training_memory(MAMBA, vocab, 2, 64, p, "adamw", "bf16")
    scan = 2 * 64 * 2 * 3136 * 4  # B*T tokens x elements x 4 bytes, whatever the autocast dtype
    # the rest of the activations halves in bf16; the scan and the fp32 logits do not
    logits = 3 * 2 * 64 * vocab * 4
    assert fp32["activations"] - scan - logits == 2 * (bf16["activations"] - scan - logits)
    ckpt = training_memory({**MAMBA, "gradient_checkpointing": True}, vocab, 2, 64, p, "adamw", "fp32")
    assert ckpt["activations"] < fp32["activations"] - scan // 2  # one layer's scan, not both


def test_frozen_copies_and_runtime_parts():
    vocab = 100
    p = count_parameters(MAMBA, vocab)
    base = training_memory(MAMBA, vocab, 2, 64, p)
    assert base["frozen"] == 0 and base["runtime"] == 0
    two = training_memory(MAMBA, vocab, 2, 64, p, frozen_copies=2, runtime_bytes=123)
    assert two["frozen"] == 2 * 4 * p and two["runtime"] == 123
    assert {k: v for k, v in two.items() if k not in ("frozen", "runtime")} == \
        {k: v for k, v in base.items() if k not in ("frozen", "runtime")}


def _recipe(tmp_path, **stage_updates):
    from llmlab.recipe import load_recipe

    rec = copy.deepcopy(TINY)
    for name, upd in stage_updates.items():
        rec["stages"][name].update(upd)
    resolved, errors = load_recipe(write_recipe(tmp_path, rec))
    assert errors == []
    return resolved


def test_frozen_copies_per_stage(tmp_path):
    from llmlab.plan import frozen_copies

    rec = _recipe(tmp_path)
    assert [frozen_copies(rec, n) for n in ("pretrain", "sft", "dpo")] == [0, 0, 1]  # dpo's reference copy
    lora = _recipe(tmp_path, dpo={"lora": {"r": 4}})
    assert frozen_copies(lora, "dpo") == 0  # the reference is the base with its adapters disabled
    both = _recipe(tmp_path, dpo={"lora": {"r": 4}, "reference_from": "pretrain"})
    assert frozen_copies(both, "dpo") == 1


def test_stage_memory_adds_the_runtime_on_a_cpu_only(tmp_path):
    from llmlab.plan import model_params, stage_memory

    rec = _recipe(tmp_path)
    vocab = 512
    params = model_params(rec, vocab)
    _, cpu = stage_memory(rec, "dpo", params, vocab, device="cpu")
    _, gpu = stage_memory(rec, "dpo", params, vocab, device="cuda")
    assert cpu["runtime"] == CPU_RUNTIME_BYTES and gpu["runtime"] == 0
    assert cpu["frozen"] == cpu["weights"] == 4 * params
    assert sum(cpu.values()) - sum(gpu.values()) == CPU_RUNTIME_BYTES


def test_unfittable_message_past_twice_the_total(tmp_path):
    from llmlab.plan import REFUSE_FACTOR, model_params, stage_memory, unfittable_message, vocab_size_for

    rec = _recipe(tmp_path)
    vocab = vocab_size_for(rec)
    need = sum(stage_memory(rec, "dpo", model_params(rec, vocab), vocab, device="cpu")[1].values())
    stages = ["pretrain", "sft", "dpo"]
    assert unfittable_message(rec, stages, "cpu", total=(int(need / REFUSE_FACTOR) + 1, "x")) is None
    said = unfittable_message(rec, stages, "cpu", total=(int(need / REFUSE_FACTOR) - 1, "this machine has in all"))
    assert said is not None and said.startswith("stage dpo:") and f"{need / 2 ** 30:.1f} GiB" in said
    # two processes sharing a CPU's RAM need twice as much
    assert unfittable_message(rec, stages, "cpu", processes_here=2, total=(need - 1, "x")) is not None
    assert unfittable_message(rec, stages, "cpu", processes_here=1, total=(need - 1, "x")) is None


def test_run_refuses_a_model_far_beyond_memory_before_training(tmp_path, monkeypatch, capsys):
    import llmlab.plan as plan
    from llmlab.commands.run import run_command

    monkeypatch.setattr(plan, "total_memory", lambda device_type: (1 << 20, "this machine has in all"))
    path = write_recipe(tmp_path)
    assert run_command(path) == 1
    said = " ".join(capsys.readouterr().out.split())
    assert "error: stage pretrain: its planned peak training memory" in said
    assert "more than 2x the 0.0 GiB this machine has in all" in said
    run = tmp_path / "run"
    assert not (run / "tokenizer").exists() and not (run / "pretrain").exists()  # nothing built or trained


def test_plan_memory_table_shows_every_part(tmp_path):
    from llmlab.plan import memory_table, plan_rows

    rec = _recipe(tmp_path)
    rows, facts = plan_rows(rec)
    table = memory_table(rows, facts)
    headers = [c.header for c in table.columns]
    assert "frozen" in headers and "runtime" in headers
    dpo = next(r for r in rows if r["stage"] == "dpo")
    assert dpo["memory_bytes"] == sum(dpo["memory"].values())


def test_pretrained_dims_and_activations_by_hand():
    from llmlab.models.params import pretrained_dims

    d, kv, f, vocab = 8, 4, 16, 50
    shapes = [("model.embed_tokens.weight", [vocab, d]), ("model.norm.weight", [d])]
    for i in range(3):
        shapes += [(f"model.layers.{i}.self_attn.q_proj.weight", [d, d]),
                   (f"model.layers.{i}.self_attn.k_proj.weight", [kv, d]),
                   (f"model.layers.{i}.self_attn.v_proj.weight", [kv, d]),
                   (f"model.layers.{i}.mlp.gate_proj.weight", [f, d]),
                   (f"model.layers.{i}.mlp.up_proj.weight", [f, d])]
    dims = pretrained_dims(shapes)
    assert dims == {"d_model": d, "n_layers": 3, "kv_dim": kv, "d_ff": f, "gated": True, "vocab": vocab}
    assert pretrained_dims([("transformer.h.0.attn.c_attn.weight", [d, 3 * d])]) is None  # not Llama-like
    # per token: 3 layers x (6d + 2kv + 2d + 4f) = 3 x (48 + 8 + 16 + 64) = 408 elements
    from llmlab.models.params import activation_elements_per_token

    assert activation_elements_per_token(dims, 5) == 408


def test_stage_memory_of_a_pretrained_checkpoint(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmlab.plan import model_params, stage_memory

    cfg = LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "ckpt")
    import copy

    from llmlab.recipe import load_recipe
    from tests.tiny import TINY, write_recipe

    rec = copy.deepcopy(TINY)  # a resolved recipe: the plan is built from it
    rec.update(model={"from_pretrained": str(tmp_path / "ckpt")}, device="cpu", precision="fp32",
               datasets={"chat": TINY["datasets"]["chat"]},
               tokenizer={"train": {**TINY["tokenizer"]["train"], "datasets": ["chat"]}, "chat_template": "chatml"},
               stages={"sft": {**TINY["stages"]["sft"], "seq_len": 8, "batch_size": 2, "optimizer": {"name": "adamw"}}})
    rec, errors = load_recipe(write_recipe(tmp_path, rec))
    assert not errors, errors
    params = model_params(rec, None)
    assert params == sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    _, parts = stage_memory(rec, "sft", params, None)
    # kv_dim = 1 head x 4 = 4: 408 elements per token (as above), 2 x 8 = 16 tokens, fp32; logits 3 x 16 x 50 x 4
    assert parts["activations"] == 16 * 408 * 4 + 3 * 16 * 50 * 4
    assert parts["weights"] == 4 * params and parts["optimizer"] == 8 * params
    assert parts["runtime"] == CPU_RUNTIME_BYTES and parts["frozen"] == 0


def test_grpo_activations_count_every_completion_of_the_group():
    from llmlab.plan import model_params, stage_memory
    from llmlab.recipe import load_recipe

    acts = []
    for g in (4, 8):
        rec, errors = load_recipe("recipes/sft_grpo.yaml", [f"stages.grpo.group_size={g}"])
        assert errors == []
        acts.append(stage_memory(rec, "grpo", model_params(rec, 512), 512, device="cpu")[1]["activations"])
    assert acts[1] == 2 * acts[0]  # batch_size prompts x group_size completions, all linear in tokens
