"""The CPU training loss (``ChunkedCrossEntropy`` behind ``causal_lm_loss``) equals
``F.cross_entropy``: value and gradient, fp32 and bf16 logits, ignored labels, a mean or a sum over
``num_items_in_batch``, and more rows than one chunk."""

import pytest
import torch
import torch.nn.functional as F

from llmlab.models.modeling_llmlab import ChunkedCrossEntropy, causal_lm_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 37])
def test_chunked_loss_equals_cross_entropy(dtype, num_items):
    g = torch.Generator().manual_seed(0)
    rows = 3 * 50  # more than ChunkedCrossEntropy.CHUNK rows, not a multiple of it
    assert rows > ChunkedCrossEntropy.CHUNK and rows % ChunkedCrossEntropy.CHUNK
    logits = (3 * torch.randn(3, 50, 97, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, 97, (3, 50), generator=g)
    labels[0, :7] = -100
    loss = causal_lm_loss(logits, labels, num_items)
    loss.backward()
    grad, logits.grad = logits.grad.clone(), None
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    ref = F.cross_entropy(logits.reshape(-1, 97).float(), shifted, ignore_index=-100,
                          reduction="mean" if num_items is None else "sum")
    ref = ref if num_items is None else ref / num_items
    ref.backward()
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert torch.allclose(loss, ref, atol=1e-5, rtol=1e-6)
    assert torch.allclose(grad.float(), logits.grad.float(), atol=1e-7 if dtype == torch.float32 else 1e-3)


def test_unchunked_where_a_second_derivative_is_needed():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    loss = causal_lm_loss(logits, labels, chunked=False)
    (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
    assert grad.requires_grad  # F.cross_entropy's backward is differentiable again (Sophia)
