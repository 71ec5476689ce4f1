"""Mixture-of-experts feed-forward: top-k routing, equivalence with the dense block, aux loss."""

import torch
import torch.nn.functional as F

from llmlab.models.modeling_llmlab import LlmlabMLP
from tests.models.conftest import VOCAB, make_model


def _ids(b=2, t=10, seed=0):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def test_each_token_goes_to_exactly_k_experts():
    k, n_exp = 2, 4
    model = make_model(n_experts=n_exp, experts_per_token=k)
    moe = model.model.layers[0].mlp
    seen = {}
    hooks = [moe.router.register_forward_hook(lambda m, i, o: seen.__setitem__("logits", o.detach()))]
    hooks.append(moe.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0].detach())))
    rows = {}
    for e, expert in enumerate(moe.experts):
        hooks.append(expert.register_forward_hook(lambda m, i, o, e=e: rows.__setitem__(e, i[0].detach())))
    with torch.no_grad():
        model(_ids())
    for h in hooks:
        h.remove()
    logits, x = seen["logits"], seen["x"].reshape(-1, 32)
    n_tokens = x.shape[0]
    chosen = logits.topk(k, dim=-1).indices  # [N, k]
    # every expert processed exactly the tokens whose top-k contains it
    total = 0
    for e in range(n_exp):
        expected = x[(chosen == e).any(-1)]
        got = rows.get(e, torch.empty(0, 32))
        assert got.shape[0] == expected.shape[0]
        assert torch.equal(got, expected)
        total += got.shape[0]
    assert total == n_tokens * k
    # and the block's output is the renormalised mixture of those k experts
    probs = torch.softmax(logits, -1)
    top_p, top_i = probs.topk(k, -1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    with torch.no_grad():
        ref = torch.stack([sum(top_p[t, j] * moe.experts[int(top_i[t, j])](x[t]) for j in range(k))
                           for t in range(n_tokens)])
        out, _ = moe(seen["x"])
    assert torch.allclose(out.reshape(-1, 32), ref, atol=1e-6)


def test_one_expert_equals_dense_ffn():
    for act in ("swiglu", "gelu"):
        dense = make_model(activation=act)
        moe = make_model(activation=act, n_experts=1, experts_per_token=1)
        state = {}
        for name, value in dense.state_dict().items():
            state[name.replace(".mlp.", ".mlp.experts.0.")] = value
        for name, value in moe.state_dict().items():
            if ".router." in name:
                state[name] = value
        moe.load_state_dict(state)
        x = _ids()
        with torch.no_grad():
            assert torch.allclose(dense(x).logits, moe(x).logits, atol=1e-6)
        assert isinstance(moe.model.layers[0].mlp.experts[0], LlmlabMLP)


def test_aux_loss_reaches_total_loss():
    coef = 0.5
    model = make_model(n_experts=4, experts_per_token=2, router_aux_loss_coef=coef).train()
    x = _ids()
    out = model(x, labels=x)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    assert torch.allclose(out.loss, lm + coef * out.aux_loss, atol=1e-6)
    # the aux term alone sends gradient to every router
    out.aux_loss.backward()
    for layer in model.model.layers:
        assert layer.mlp.router.weight.grad.abs().sum() > 0


def test_aux_loss_is_one_for_uniform_routing_and_ignores_padding():
    model = make_model(n_experts=4, experts_per_token=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.weight.zero_()
        assert torch.allclose(model(_ids()).aux_loss, torch.tensor(1.0))
    # with a trained-looking router, the aux loss of a padded batch equals that of its real tokens
    model = make_model(n_experts=4, experts_per_token=1)
    short = _ids(b=1, t=5, seed=3)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1).long()
    with torch.no_grad():
        assert torch.allclose(model(padded, attention_mask=mask).aux_loss, model(short).aux_loss, atol=1e-6)
        assert not torch.allclose(model(padded).aux_loss, model(short).aux_loss, atol=1e-6)


def test_dense_model_has_no_aux_loss():
    x = _ids()
    out = make_model()(x, labels=x)
    assert out.aux_loss is None
