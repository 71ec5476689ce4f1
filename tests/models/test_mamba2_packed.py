"""Packed (padding-free) rows for transformers' Mamba2 on CPU: llmlab.models.mamba2_packed.

The oracle is transformers' own ``Mamba2ForCausalLM`` (pure PyTorch path), each sequence run alone,
with the same weights: packed logits and gradients must equal it, for any weights.
"""

import json

import pytest
import torch
from transformers import Mamba2ForCausalLM

from llmlab.losses import token_logps
from llmlab.models.build import apply_lora, build_model, load_causal_lm
from llmlab.models.mamba2_packed import PackedMamba2Mixer, enable_packed_mamba2, packed_chunk_scan, sequence_index
from llmlab.models.padfree import model_logits, pack_rows, packs_documents, padfree_sequence_logps
from llmlab.stages.lm import SFTStage
from tests.models.conftest import VOCAB

CHUNK = 16
#: lengths 1, exactly one chunk, and several crossing one or two chunk boundaries of the packed row
LENS = [1, 23, 16, 5, 40, 1, 9, 19]


def _models(**overrides):
    """(llmlab's packed-capable Mamba2, transformers' plain Mamba2 with the same weights)."""
    torch.manual_seed(0)
    spec = {"arch": "mamba2", "d_model": 32, "n_layers": 2, "state_size": 8, "head_dim": 8, "expand": 2,
            "n_groups": 2, "chunk_size": CHUNK, **overrides}
    model = build_model(spec, vocab_size=VOCAB)
    with torch.no_grad():  # random non-default SSM parameters, so no term is trivially 1 or 0
        for name, p in model.named_parameters():
            if name.endswith(("dt_bias", "D", "conv1d.bias")):
                p.uniform_(-1.0, 1.0)
    oracle = Mamba2ForCausalLM(model.config)
    oracle.load_state_dict(model.state_dict())
    return model, oracle


def _seqs(lens=LENS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lens]


def _packed(seqs):
    return torch.cat(seqs)[None], torch.cat([torch.arange(len(s)) for s in seqs])[None]


def _alone(oracle, seqs):
    return torch.cat([oracle(input_ids=s[None], use_cache=False).logits[0] for s in seqs])


def _close(a, b, rtol):
    a, b = a.detach(), b.detach()
    scale = max(1.0, float(b.abs().max()))
    return float((a - b).abs().max()) <= rtol * scale


def test_packed_logits_and_gradients_equal_each_sequence_alone():
    model, oracle = _models()
    assert all(isinstance(layer.mixer, PackedMamba2Mixer) for layer in model.backbone.layers)
    seqs = _seqs()
    ids, pos = _packed(seqs)
    assert ids.shape[1] > 5 * CHUNK and ids.shape[1] % CHUNK  # several chunks, the last one partial
    packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
    alone = _alone(oracle, seqs)
    assert _close(packed, alone, 1e-5)
    weights = torch.randn(alone.shape, generator=torch.Generator().manual_seed(2))
    (packed * weights).sum().backward()
    (alone * weights).sum().backward()
    grads = dict(oracle.named_parameters())
    for name, p in model.named_parameters():
        assert _close(p.grad, grads[name].grad, 1e-4), name


def test_several_packed_rows_and_a_padded_tail_keep_every_sequence_apart():
    """Rows with different numbers of sequences in one batch; and pack_rows' bucket tail (token 0,
    positions from 0) changes nothing before it."""
    model, oracle = _models()
    first, second = _seqs([7, 30, 2], seed=3), _seqs([3, 3, 3, 3, 3, 3, 3, 3, 3, 12], seed=4)
    ids = torch.cat([_packed(first)[0], _packed(second)[0]])
    pos = torch.cat([_packed(first)[1], _packed(second)[1]])
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        assert _close(out[0], _alone(oracle, first), 1e-5)
        assert _close(out[1], _alone(oracle, second), 1e-5)
        rows = torch.nn.utils.rnn.pad_sequence(first + second, batch_first=True)
        att = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in first + second], batch_first=True)
        p = pack_rows(rows, att)
        n = p.seq.numel()
        assert p.input_ids.shape[1] > n  # the bucket tail is there
        tail = model(input_ids=p.input_ids, position_ids=p.position_ids, use_cache=False).logits[0, :n]
    assert _close(tail, _alone(oracle, first + second), 1e-5)


def test_bf16_autocast_packed_matches_alone_and_stays_finite():
    model, oracle = _models()
    seqs = _seqs()
    ids, pos = _packed(seqs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        alone = _alone(oracle, seqs)
        packed.float().pow(2).mean().backward()
    assert torch.isfinite(packed).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # bf16 einsums round differently when the sequences sit at other offsets in their chunks
    assert _close(packed, alone, 3e-2)


def test_scan_is_stable_when_decays_underflow():
    """Huge A * dt: every cross-position decay underflows to exactly 0, with no NaN in the output or
    the gradients (no -inf - -inf; segment sums are never differences of prefix sums)."""
    g = torch.Generator().manual_seed(5)
    b, L, h, p, n = 1, 40, 4, 3, 5
    x = torch.randn(b, L, h, p, generator=g, requires_grad=True)
    dt = torch.full((b, L, h), 50.0, requires_grad=True)
    A = torch.full((h,), -1e4)
    B, C = torch.randn(b, L, 1, n, generator=g), torch.randn(b, L, 1, n, generator=g)
    D = torch.randn(h, generator=g)
    seq = sequence_index(torch.cat([torch.arange(13), torch.arange(27)])[None])
    y = packed_chunk_scan(x, dt, A, B, C, D, seq, chunk_size=8)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(dt.grad).all()
    # only the diagonal term survives: y_t = (C_t . B_t) dt_t x_t + D x_t
    own = (C[..., 0, :] * B[..., 0, :]).sum(-1)[..., None, None] * dt[..., None] * x + D[:, None] * x
    assert torch.allclose(y, own, atol=1e-4)


def test_unpacked_forwards_and_generation_are_transformers_own():
    model, oracle = _models()
    model.eval()
    oracle.eval()
    ids = torch.randint(0, VOCAB, (3, 37), generator=torch.Generator().manual_seed(6))
    att = torch.ones_like(ids)
    att[1, 30:] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": att}, {"position_ids": torch.arange(37).expand(3, -1)}):
            assert torch.equal(model(input_ids=ids, use_cache=False, **kwargs).logits,
                               oracle(input_ids=ids, use_cache=False, **kwargs).logits), kwargs
        a = model.generate(ids[:, :9], max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = oracle.generate(ids[:, :9], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
    ids_, pos = _packed(_seqs([4, 5]))
    with pytest.raises(ValueError, match="use_cache=False"):
        model(input_ids=ids_, position_ids=pos, use_cache=True)


def test_saved_model_is_a_plain_mamba2_and_loads_packing_again(tmp_path):
    model, oracle = _models()
    assert packs_documents(model) and not packs_documents(oracle)
    enable_packed_mamba2(model)  # idempotent: no second set of hooks
    assert len(model._forward_pre_hooks) == 1 and len(model.backbone._forward_pre_hooks) == 1
    assert set(model.state_dict()) == set(oracle.state_dict())
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Mamba2ForCausalLM"]
    plain = Mamba2ForCausalLM.from_pretrained(tmp_path).eval()
    assert all(type(layer.mixer).__module__.startswith("transformers") for layer in plain.backbone.layers)
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    loaded = load_causal_lm(tmp_path).eval()
    assert packs_documents(loaded)
    seqs = _seqs()
    with torch.no_grad():
        assert _close(loaded(input_ids=_packed(seqs)[0], position_ids=_packed(seqs)[1], use_cache=False).logits[0],
                      _alone(plain, seqs), 1e-5)


def _batch():
    seqs = _seqs([9, 21, 1, 14], seed=8)
    ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    att = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
    labels = ids.masked_fill(att == 0, -100)
    labels[:, :3] = -100
    return ids, att, labels


@pytest.mark.parametrize("variant", ["plain", "gradient_checkpointing", "lora"])
def test_sft_and_dpo_stage_paths_pack_mamba2_with_the_padded_results(variant):
    """The sft loss and the dpo sequence log-probs through padfree.py equal the padded batch on
    transformers' own Mamba2; also with gradient checkpointing (the recomputed forward keeps the
    sequences apart) and with a LoRA adapter on in_proj (peft)."""
    model, oracle = _models(gradient_checkpointing=variant == "gradient_checkpointing")
    if variant == "lora":
        model = apply_lora(model, {"preset": "all", "r": 4, "alpha": 8})
        oracle = apply_lora(oracle, {"preset": "all", "r": 4, "alpha": 8})
        oracle.load_state_dict(model.state_dict())
    assert packs_documents(model)
    ids, att, labels = _batch()
    calls = []
    model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape), with_kwargs=True)
    loss, _ = object.__new__(SFTStage).compute_loss(model, {"input_ids": ids, "attention_mask": att, "labels": labels})
    assert calls == [torch.Size([1, 48])]  # 45 real tokens in a 48-token row, not 4 x 21
    padded = oracle(input_ids=ids, attention_mask=att, labels=labels).loss
    assert _close(loss, padded, 1e-5)
    loss.backward()
    padded.backward()
    grads = {n: p.grad for n, p in oracle.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert _close(p.grad, grads[name], 1e-4), name
    with torch.no_grad():
        seq, _ = padfree_sequence_logps(model, ids, att, labels)
        lp, _ = token_logps(model_logits(oracle, ids, att), labels)
    assert _close(seq, lp.sum(-1), 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("training", [False, True])
def test_packed_on_cuda_equals_alone(training):
    """On a GPU: the mamba_ssm kernels with seq_idx where installed (training: the fused
    split-conv-scan kernel), else the pure-PyTorch packed path; each sequence as if alone."""
    model, oracle = _models()
    model, oracle = model.cuda().train(training), oracle.cuda().train(training)
    seqs = [s.cuda() for s in _seqs()]
    ids, pos = _packed(seqs)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos.cuda(), use_cache=False).logits[0]
        alone = _alone(oracle, seqs)
    assert _close(packed, alone, 1e-3)
