"""Padding-free SFT and DPO batches give the padded batches' losses and gradients on llmlab's
Transformer, with no compute on padding."""

import pytest
import torch

from llmlab.losses import token_logps
from llmlab.models.build import build_model
from llmlab.stages.dpo import model_logits, padfree_sequence_logps
from llmlab.stages.lm import SFTStage
from llmlab.models.padfree import bucket_width, pack_rows, packs_documents

LENS = [9, 5, 12, 3]


def _model(**kw):
    torch.manual_seed(0)
    cfg = {"arch": "transformer", "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
           "d_ff": 64, "max_seq_len": 64, **kw}
    return build_model(cfg, vocab_size=50)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(LENS), max(LENS), dtype=torch.long)
    att = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(LENS):
        ids[i, :n] = torch.randint(1, 50, (n,), generator=g)
        att[i, :n] = 1
        labels[i, n // 2:n] = ids[i, n // 2:n]  # the "completion" half is labelled
    labels[1, :LENS[1]] = ids[1, :LENS[1]]  # and one row whole, its first token included
    return ids, att, labels


def test_pack_rows_layout():
    ids, att, labels = _batch()
    exact = pack_rows(ids, att, labels, bucket=False)
    assert exact.input_ids.shape == (1, sum(LENS))
    assert exact.position_ids[0].tolist() == [i for n in LENS for i in range(n)]
    p = pack_rows(ids, att, labels)  # 29 real tokens, bucketed to 32: a 3-token sequence of its own
    assert p.input_ids.shape == (1, 32) and bucket_width(29) == 32
    assert p.position_ids[0].tolist() == [i for n in LENS for i in range(n)] + [0, 1, 2]
    assert p.labels[0, 29:].tolist() == [-100] * 3 and torch.equal(p.input_ids[0, :29], exact.input_ids[0])
    assert p.lengths.tolist() == LENS and p.seq.numel() == 29
    starts = torch.tensor([0, 9, 14, 26])
    assert (p.labels[0, starts] == -100).all()
    assert p.labels[0, 10:14].tolist() == ids[1, 1:5].tolist()
    with pytest.raises(ValueError, match="right-padded"):
        pack_rows(ids, att.flip(1))


def test_padfree_dpo_logps_equal_padded():
    model = _model().eval()
    assert packs_documents(model)
    ids, att, labels = _batch()
    with torch.no_grad():
        seq, n_tok = padfree_sequence_logps(model, ids, att, labels)
        lp, mask = token_logps(model_logits(model, ids, att), labels)
    assert torch.allclose(seq, lp.sum(-1), atol=1e-5)
    assert torch.equal(n_tok, mask.sum(-1))


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 4}, {"positional_encoding": "alibi"}])
def test_padfree_sft_loss_and_grads_equal_padded(kw):
    ids, att, labels = _batch()
    stage = object.__new__(SFTStage)  # compute_loss reads no stage state

    padded = _model(**kw)
    loss_padded = padded(input_ids=ids, attention_mask=att, labels=labels, use_cache=False).loss
    loss_padded.backward()

    packed = _model(**kw)
    calls = []
    packed.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape), with_kwargs=True)
    loss_packed, _ = stage.compute_loss(packed, {"input_ids": ids, "attention_mask": att, "labels": labels})
    loss_packed.backward()

    assert calls == [torch.Size([1, bucket_width(sum(LENS))])]  # one row: the real tokens + the bucket's 3
    assert torch.allclose(loss_packed, loss_padded, atol=1e-6)
    for (name, a), b in zip(padded.named_parameters(), packed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


@pytest.mark.parametrize("lora", [False, True])
def test_padfree_reward_scores_and_grads_equal_padded(lora):
    from llmlab.models.build import apply_lora
    from llmlab.models.modeling_llmlab import LlmlabForSequenceClassification
    from llmlab.stages.reward import reward_scores

    def rm():
        torch.manual_seed(0)
        cfg = _model().config
        cfg.num_labels = 1
        torch.manual_seed(0)
        m = LlmlabForSequenceClassification(cfg)
        return apply_lora(m, {"r": 4, "alpha": 8, "preset": "all"}) if lora else m

    ids, att, _ = _batch()
    padded, packed = rm(), rm()
    assert packs_documents(packed)
    calls = []
    packed.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape), with_kwargs=True)
    want = padded(input_ids=ids, attention_mask=att).logits.squeeze(-1)
    got = reward_scores(packed, ids, att)
    assert calls == [torch.Size([1, bucket_width(sum(LENS))])]
    assert torch.allclose(got, want, atol=1e-5)
    want.pow(2).sum().backward()
    got.pow(2).sum().backward()
    for (name, a), b in zip(padded.named_parameters(), packed.parameters()):
        if a.requires_grad:
            assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _mamba2():
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    return Mamba2ForCausalLM(Mamba2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, state_size=8,
                                          head_dim=8, expand=2, n_groups=1, num_heads=8, chunk_size=16))


def test_hub_decoders_are_probed_for_packing():
    """transformers' Llama isolates packed sequences by their position ids: padding-free SFT and DPO
    apply to it too, with the padded results; Mamba2 carries state across the row and is refused."""
    ids, att, labels = _batch()
    padded, packed = _llama(), _llama()
    assert packs_documents(packed)
    loss_padded = padded(input_ids=ids, attention_mask=att, labels=labels).loss
    calls = []
    packed.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape), with_kwargs=True)
    loss_packed, _ = object.__new__(SFTStage).compute_loss(packed, {"input_ids": ids, "attention_mask": att,
                                                                    "labels": labels})
    assert calls == [torch.Size([1, bucket_width(sum(LENS))])]
    assert torch.allclose(loss_packed, loss_padded, atol=1e-6)
    loss_padded.backward()
    loss_packed.backward()
    for (name, a), b in zip(padded.named_parameters(), packed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    with torch.no_grad():
        seq, _ = padfree_sequence_logps(packed, ids, att, labels)
        lp, _ = token_logps(model_logits(packed, ids, att), labels)
    assert torch.allclose(seq, lp.sum(-1), atol=1e-5)

    mamba = _mamba2()
    assert not packs_documents(mamba)
    calls.clear()
    mamba.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape), with_kwargs=True)
    object.__new__(SFTStage).compute_loss(mamba, {"input_ids": ids, "attention_mask": att, "labels": labels})
    assert calls == [ids.shape]  # the padded batch


def test_bucket_widths_are_few_multiples_of_16_with_bounded_padding():
    widths = {n: bucket_width(n) for n in range(1, 4097)}
    assert all(n <= w for n, w in widths.items())
    assert all(w % 16 == 0 for w in widths.values())
    assert max((w - n) / n for n, w in widths.items() if n >= 64) <= 0.25
    assert len(set(widths.values())) == 8 + 4 * 5  # 16..128 by 16, then 4 per doubling to 4096
    assert bucket_width(300, cap=256) == 300 and bucket_width(250, cap=256) == 256
