"""torch.compile of the llmlab Transformer's training forward: one graph up to the logits, for
plain and for packed batches (position ids restarting per document), and the same loss and
gradients as eager (`compile: true`, docs/performance.md "Pretraining: llmlab vs LitGPT")."""

import pytest
import torch

from tests.models.conftest import VOCAB, make_model


def _batch(packed: bool):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    pos = torch.arange(12).repeat(2, 1)
    if packed:  # row 0: documents of 5 and 7 tokens; row 1: one document continued from before
        pos[0, 5:] = torch.arange(7)
        pos[1] += 4
    return {"input_ids": ids, "position_ids": pos, "labels": ids.clone()}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("pe", ["rope", "yarn"])
def test_training_forward_is_one_graph(packed, pe):
    """fullgraph=True raises on any graph break; the logits equal eager's."""
    import torch._dynamo as dynamo

    scaling = {"rope_scaling": {"factor": 2.0, "original_max_seq_len": 8}} if pe == "yarn" else {}
    model = make_model(positional_encoding=pe, **scaling).train()
    b = _batch(packed)
    dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    got = compiled(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
    want = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-6)
    dynamo.reset()


def test_compiled_loss_and_gradients_equal_eager():
    """With labels the graph ends at the logits and the chunked CPU loss runs eagerly (one break,
    there); loss and every gradient match eager (inductor fuses and reorders float ops)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    model = make_model(tie_embeddings=False).train()
    b = _batch(packed=True)
    loss = model(**b, use_cache=False).loss
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(model)
    got_loss = compiled(**b, use_cache=False).loss
    got_loss.backward()
    assert counters["stats"]["unique_graphs"] >= 1
    breaks = [r for r in counters["graph_break"] if "_chunked_cross_entropy" not in r]
    assert not breaks, breaks
    assert torch.allclose(got_loss, loss, rtol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want[n], atol=1e-5, rtol=1e-4), n
    dynamo.reset()
