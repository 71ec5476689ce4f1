"""Packed documents through flash-attn's varlen kernel, exercised on CPU up to the kernel call:
the ``cu_seqlens`` / ``max_seqlen`` built from restarting position ids describe exactly the
per-document causal mask, and the model's varlen path (with a reference kernel standing in for
``flash_attn_varlen_func``) gives the logits of the masked SDPA path. The real kernel is compared
in tests/models/test_gpu.py."""

import pytest
import torch
import torch.nn.functional as F

from llmlab.models import modeling_llmlab as ml
from tests.models.conftest import VOCAB, make_model


def _positions(lengths_per_row: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])


ROWS = [[3, 5, 1, 7], [16], [1, 1, 14]]  # three rows of 16 tokens: several documents, one, single tokens


def test_cu_seqlens_describe_the_per_document_mask():
    pos = _positions(ROWS)
    b, t = pos.shape
    step = torch.diff(pos, dim=-1) != 1
    spec = ml.AttentionMaskSpec(None, 0, t, F.pad(step.long().cumsum(-1), (1, 0)), None, None, torch.device("cpu"))
    cu, max_len = spec.varlen_seqlens()
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 8, 9, 16, 32, 33, 34, 48]
    assert max_len == 16
    # the block-diagonal causal mask the kernel applies over the flattened [B * T] tokens ...
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.diff(cu).long())
    idx = torch.arange(b * t)
    varlen = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])
    # ... is the mask the SDPA / eager paths build, row by row, and nothing crosses rows
    allowed = spec.allowed(t)[:, 0]
    for r in range(b):
        rows = slice(r * t, (r + 1) * t)
        assert torch.equal(varlen[rows, rows], allowed[r])
        assert not varlen[rows].sum() - varlen[rows, rows].sum()


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, window_size, alibi_slopes):
    """What flash_attn_varlen_func computes (no window, no ALiBi), one document at a time with SDPA."""
    assert causal and window_size == (-1, -1) and alibi_slopes is None and dropout_p == 0.0
    assert q.dim() == 3 and cu_q.dtype == torch.int32 and int(torch.diff(cu_q).max()) == max_q
    out = torch.empty_like(q)
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (x[s:e].transpose(0, 1)[None].float() for x in (q, k, v))  # [1, heads, n, Dh]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=softmax_scale,
                                           enable_gqa=q.shape[1] != k.shape[1])
        out[s:e] = o[0].transpose(0, 1).to(q.dtype)
    return out


def test_packed_forward_through_the_varlen_path_matches_the_masked_path(monkeypatch):
    model = make_model().to(torch.bfloat16)
    pos = _positions(ROWS)
    ids = torch.randint(0, VOCAB, pos.shape, generator=torch.Generator().manual_seed(0))
    calls = []

    def kernel(*args, **kwargs):
        calls.append(args[3])
        return _reference_varlen(*args, **kwargs)

    with torch.no_grad():
        masked = model(ids, position_ids=pos).logits.float()
        monkeypatch.setattr(ml, "FLASH_DEVICES", ("cuda", "cpu"))
        monkeypatch.setattr(ml, "_flash_attn_varlen_func", kernel)
        varlen = model(ids, position_ids=pos).logits.float()
    assert len(calls) == model.config.n_layers  # every layer took the varlen kernel
    assert calls[0].tolist() == [0, 3, 8, 9, 16, 32, 33, 34, 48]
    assert (varlen - masked).abs().max() < 0.05  # bf16 rounding of two kernels
    with torch.no_grad():  # a padding mask keeps the masked path (varlen takes no padding)
        calls.clear()
        model(ids, attention_mask=torch.ones_like(ids).index_fill_(1, torch.tensor([15]), 0), position_ids=pos)
    assert not calls


@pytest.mark.parametrize("restarts", [False, True])
def test_explicit_positions_need_no_host_sync(monkeypatch, restarts):
    """The packed forward decides nothing from tensor values: no ``bool(tensor)`` / ``.item()``
    on the way (each is a device-to-host sync on a GPU); results equal the plain forward's
    where there is no restart."""
    model = make_model()
    pos = _positions([[4, 12], [16]] if restarts else [[16], [16]])
    ids = torch.randint(0, VOCAB, pos.shape, generator=torch.Generator().manual_seed(1))
    synced = []
    real_bool = torch.Tensor.__bool__

    def spy(self):
        synced.append(self.shape)
        return real_bool(self)

    with torch.no_grad():
        plain = model(ids).logits
        monkeypatch.setattr(torch.Tensor, "__bool__", spy)
        packed = model(ids, position_ids=pos).logits
    assert synced == []
    if not restarts:
        assert torch.allclose(packed, plain, atol=1e-5)
