"""Packed documents on a CPU go through causal SDPA per document (``LlmlabAttention._per_document``)
instead of one SDPA call with a dense block-diagonal mask: the logits and the gradients must be
those of the dense-mask path, and the path must be taken only where it is exact and cheap."""

import torch
import torch.nn.functional as F

from llmlab.models import modeling_llmlab as ml
from tests.models.conftest import VOCAB, make_model


def _positions(lengths_per_row: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])


def _spec(pos: torch.Tensor, **kw) -> ml.AttentionMaskSpec:
    b, t = pos.shape
    doc = F.pad((torch.diff(pos, dim=-1) != 1).long().cumsum(-1), (1, 0))
    args = dict(attention_mask=None, past_len=0, q_len=t, doc_ids=doc, sliding_window=None, slopes=None,
                device=torch.device("cpu"))
    return ml.AttentionMaskSpec(**{**args, **kw})


def _loss_and_grads(model, ids, pos):
    model.zero_grad()
    out = model(input_ids=ids, position_ids=pos, labels=ids)
    out.loss.backward()
    return out.logits.detach(), [p.grad.clone() for p in model.parameters()]


def test_segments_are_the_documents_of_each_row():
    spec = _spec(_positions([[16], [5, 11], [16], [10, 6]]))
    assert spec.document_segments() == [[(0, 16)], [(0, 5), (5, 16)], [(0, 16)], [(0, 10), (10, 16)]]


def test_no_segments_where_the_path_would_be_wrong_or_slow():
    pos = _positions([[16], [5, 11]])
    assert _spec(pos, attention_mask=torch.ones(2, 16, dtype=torch.long)).document_segments() is None
    assert _spec(pos, sliding_window=4).document_segments() is None
    assert _spec(pos, slopes=torch.ones(4)).document_segments() is None
    assert _spec(_positions([[2, 3, 4, 7], [16]])).document_segments() is None  # 5 documents in 2 rows: dense mask
    assert _spec(pos, doc_ids=None).document_segments() is None


def test_per_document_attention_equals_the_dense_mask(monkeypatch):
    model = make_model().train()
    pos = _positions([[16], [5, 11], [16], [9, 7]])
    ids = torch.randint(0, VOCAB, pos.shape, generator=torch.Generator().manual_seed(1))
    calls = []
    real = ml.LlmlabAttention._per_document
    monkeypatch.setattr(ml.LlmlabAttention, "_per_document", lambda self, *a: calls.append(1) or real(self, *a))
    logits, grads = _loss_and_grads(model, ids, pos)
    assert calls, "the per-document path was not taken"
    monkeypatch.setattr(ml.AttentionMaskSpec, "document_segments", lambda self: None)
    ref_logits, ref_grads = _loss_and_grads(model, ids, pos)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-6)
