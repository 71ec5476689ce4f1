"""Behaviour of the llmlab Transformer for every value of every component."""

import pytest
import torch

from llmlab.models.modeling_llmlab import CACHE_FIELD, LlmlabForCausalLM
from tests.models.conftest import VOCAB, make_model

ATOL = 1e-5


def _ids(seed, b=2, t=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g)


def test_forward_backward(variant):
    name, over = variant
    model = make_model(**over).train()
    x = _ids(1)
    out = model(input_ids=x, labels=x)
    assert out.logits.shape == (2, 12, VOCAB)
    assert torch.isfinite(out.loss)
    # at init the loss is close to uniform over the vocabulary
    assert abs(out.loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 0.5
    out.loss.backward()
    for pname, p in model.named_parameters():
        if p.grad is None and ".experts." in pname:
            continue  # an expert no token was routed to this time
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), pname
    # something learns: one SGD step on this batch lowers its loss
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    model.eval()
    assert model(input_ids=x, labels=x).loss < out.loss


def test_causality(variant):
    name, over = variant
    model = make_model(**over)
    x = _ids(2)
    y = x.clone()
    y[:, 6] = (y[:, 6] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert torch.allclose(a[:, :6], b[:, :6], atol=ATOL), name
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-4), f"{name}: token 6 changed nothing"


@pytest.mark.parametrize("pe", ["rope", "alibi", "sinusoidal", "yarn"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_sliding_window_one_layer(pe, backend):
    """With one layer and window w, logits at t depend only on tokens t-w+1 .. t."""
    w = 3
    scaling = {"rope_scaling": {"factor": 2.0, "original_max_seq_len": 8}} if pe == "yarn" else {}
    model = make_model(n_layers=1, sliding_window=w, positional_encoding=pe, **scaling)
    model.config.attn_backend = backend
    x = _ids(3, b=1, t=12)
    with torch.no_grad():
        base = model(x).logits
        for j in range(12):
            y = x.clone()
            y[0, j] = (y[0, j] + 7) % VOCAB
            diff = (model(y).logits - base).abs().amax(-1)[0]
            for t in range(12):
                inside = t - w + 1 <= j <= t
                if inside:
                    assert diff[t] > 1e-6, (j, t)
                else:
                    assert diff[t] <= ATOL, (j, t)


def test_sliding_window_receptive_field_grows_with_depth():
    """L layers of window w: token t sees back to t - L(w-1), not further."""
    w, layers = 3, 2
    model = make_model(n_layers=layers, sliding_window=w)
    x = _ids(4, b=1, t=12)
    t = 11
    reach = t - layers * (w - 1)
    with torch.no_grad():
        base = model(x).logits[0, t]
        for j in range(12):
            y = x.clone()
            y[0, j] = (y[0, j] + 5) % VOCAB
            d = (model(y).logits[0, t] - base).abs().max()
            assert (d > 1e-6) == (j >= reach), j


def _expand_kv_weight(w, n_kv, n_rep, head_dim):
    d_in = w.shape[-1]
    return w.view(n_kv, head_dim, d_in).repeat_interleave(n_rep, dim=0).reshape(n_kv * n_rep * head_dim, d_in)


@pytest.mark.parametrize("kind,n_kv", [("mqa", 1), ("gqa", 2)])
@pytest.mark.parametrize("pe", ["rope", "alibi"])
def test_mqa_gqa_equal_mha_with_repeated_kv(kind, n_kv, pe):
    small = make_model(attention_type=kind, n_kv_heads=n_kv, positional_encoding=pe, attention_bias=True)
    big = make_model(attention_type="mha", n_kv_heads=4, positional_encoding=pe, attention_bias=True)
    sd = small.state_dict()
    new = {}
    n_rep, hd = 4 // n_kv, 32 // 4
    for k, v in sd.items():
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            v = _expand_kv_weight(v, n_kv, n_rep, hd)
        elif k.endswith(("k_proj.bias", "v_proj.bias")):
            v = v.view(n_kv, hd).repeat_interleave(n_rep, dim=0).reshape(-1)
        new[k] = v
    big.load_state_dict(new)
    x = _ids(5)
    with torch.no_grad():
        assert torch.allclose(small(x).logits, big(x).logits, atol=ATOL)


def test_kv_cache_decoding_equals_full_recomputation(variant):
    name, over = variant
    model = make_model(**over)
    x = _ids(6, t=11)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        out = model(x[:, :5], use_cache=True)
        pieces = [out.logits]
        cache = getattr(out, CACHE_FIELD)
        # one token, then a chunk of two, then one at a time; the cache passed under both names
        # generate has used (cache= since transformers 5.2x, past_key_values= before), with and
        # without cache_position
        for i, (s, e) in enumerate([(5, 6), (6, 8), (8, 9), (9, 10), (10, 11)]):
            name_kw = "cache" if i % 2 == 0 else "past_key_values"
            extra = {"cache_position": torch.arange(s, e)} if i >= 3 else {}
            out = model(x[:, s:e], use_cache=True, **{name_kw: cache}, **extra)
            assert getattr(out, CACHE_FIELD) is cache
            pieces.append(out.logits)
    assert torch.allclose(torch.cat(pieces, 1), full, atol=ATOL), name


def test_generate_with_and_without_cache(variant):
    name, over = variant
    model = make_model(**over)
    x = _ids(7, t=6)
    with torch.no_grad():
        a = model.generate(x, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        b = model.generate(x, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert a.shape == (2, 14)
    assert torch.equal(a, b), name


@pytest.mark.parametrize("pe", ["rope", "alibi", "sinusoidal", "yarn"])
@pytest.mark.parametrize("window", [None, 3])
def test_left_padded_batch_equals_unpadded_rows(pe, window):
    """Padding is invisible: a left-padded row gives the logits and greedy continuation of the row
    run alone (positions come from the attention mask, as in generate)."""
    scaling = {"rope_scaling": {"factor": 2.0, "original_max_seq_len": 8}} if pe == "yarn" else {}
    model = make_model(positional_encoding=pe, sliding_window=window, **scaling)
    long, short = _ids(8, b=1, t=7), _ids(9, b=1, t=4)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        assert torch.allclose(padded[0], model(long).logits[0], atol=ATOL)
        assert torch.allclose(padded[1, 3:], model(short).logits[0], atol=ATOL)
        gen = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        alone = model.generate(short, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(gen[1, 3:], alone[0])


@pytest.mark.parametrize("pe", ["rope", "alibi", "sinusoidal", "yarn"])
def test_packed_documents_are_independent(pe):
    """Packed pretraining: position ids restart per document and attention stays inside it."""
    scaling = {"rope_scaling": {"factor": 2.0, "original_max_seq_len": 8}} if pe == "yarn" else {}
    model = make_model(positional_encoding=pe, **scaling)
    d1, d2 = _ids(10, b=1, t=5), _ids(11, b=1, t=7)
    packed = torch.cat([d1, d2], 1)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=pos).logits
        assert torch.allclose(out[0, :5], model(d1).logits[0], atol=ATOL)
        assert torch.allclose(out[0, 5:], model(d2).logits[0], atol=ATOL)
        # packed and right-padded, with a padding mask
        padded = torch.cat([packed, torch.zeros(1, 3, dtype=torch.long)], 1)
        mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 3)], 1).long()
        pos = torch.cat([pos, torch.zeros(1, 3, dtype=torch.long)], 1)
        out = model(padded, attention_mask=mask, position_ids=pos).logits
        assert torch.allclose(out[0, 5:12], model(d2).logits[0], atol=ATOL)


@pytest.mark.parametrize("pe", ["rope", "sinusoidal", "yarn"])
def test_position_ids_are_used(pe):
    scaling = {"rope_scaling": {"factor": 2.0, "original_max_seq_len": 8}} if pe == "yarn" else {}
    model = make_model(positional_encoding=pe, **scaling)
    x = _ids(12, b=1, t=6)
    with torch.no_grad():
        a = model(x).logits
        b = model(x, position_ids=torch.arange(3, 9)[None]).logits
    if pe == "sinusoidal":
        assert not torch.allclose(a, b, atol=1e-4)  # absolute positions
    else:
        assert torch.allclose(a, b, atol=1e-4)  # RoPE is relative: a shift changes nothing
        c = model(x, position_ids=torch.tensor([[0, 1, 2, 3, 5, 6]])).logits  # a gap does
        assert not torch.allclose(a[:, 5], c[:, 5], atol=1e-4)


@pytest.mark.parametrize("over", [dict(), dict(positional_encoding="alibi"), dict(sliding_window=3),
                                  dict(positional_encoding="alibi", sliding_window=2, n_kv_heads=1, attention_type="mqa")])
def test_sdpa_equals_eager(over):
    model = make_model(**over)
    x = _ids(13)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    with torch.no_grad():
        model.config.attn_backend = "sdpa"
        a = model(x, attention_mask=mask).logits
        a2 = model(x).logits
        model.config.attn_backend = "eager"
        b = model(x, attention_mask=mask).logits
        b2 = model(x).logits
    assert torch.allclose(a[:, 4:], b[:, 4:], atol=ATOL)
    assert torch.allclose(a2, b2, atol=ATOL)


def test_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model = make_model()
    x = _ids(14)
    labels = x.clone()
    labels[:, :4] = -100
    out = model(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, VOCAB)
    target = labels[:, 1:].reshape(-1)
    keep = target != -100
    ref = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    assert torch.allclose(out.loss, ref, atol=1e-6)


def test_scaled_init_of_residual_projections():
    model = make_model(seed=0, d_model=128, n_heads=4, n_kv_heads=4, d_ff=512, n_layers=8)
    std = model.config.init_std
    layer = model.model.layers[0]
    assert abs(layer.self_attn.q_proj.weight.std().item() - std) < 0.1 * std
    expected = std / (2 * 8) ** 0.5
    assert abs(layer.self_attn.o_proj.weight.std().item() - expected) < 0.1 * expected
    assert abs(layer.mlp.down_proj.weight.std().item() - expected) < 0.1 * expected
    assert torch.all(layer.input_layernorm.weight == 1)


def test_tied_and_untied_embeddings():
    tied = make_model()
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    untied = make_model(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_gradient_checkpointing_same_gradients():
    x = _ids(15)
    grads = []
    for ckpt in (False, True):
        model = make_model(n_experts=2, experts_per_token=1).train()
        if ckpt:
            from llmlab.models.build import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        model(x, labels=x).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_config_errors_are_clear():
    from llmlab.models.configuration_llmlab import LlmlabConfig

    with pytest.raises(ValueError, match="n_kv_heads"):
        LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=3, attention_type="gqa")
    with pytest.raises(ValueError, match="mqa"):
        LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=2, attention_type="mqa")
    with pytest.raises(ValueError, match="positional_encoding"):
        LlmlabConfig(positional_encoding="learned")
    with pytest.raises(ValueError, match="yarn"):
        LlmlabConfig(positional_encoding="yarn")


def test_hf_attribute_names():
    model = make_model()
    c = model.config
    assert (c.hidden_size, c.num_attention_heads, c.num_hidden_layers, c.num_key_value_heads,
            c.intermediate_size, c.max_position_embeddings) == (32, 4, 2, 2, 64, 64)
    assert isinstance(model, LlmlabForCausalLM)


@pytest.mark.parametrize("over", [dict(), dict(positional_encoding="alibi"), dict(positional_encoding="sinusoidal")])
def test_static_cache_generate_equals_dynamic(over):
    """cache_implementation="static" (pre-allocated buffers for torch.compile) decodes the same."""
    model = make_model(**over)
    x = _ids(16, t=6)
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dynamic = model.generate(x, **kw)
        static = model.generate(x, cache_implementation="static", **kw)
    assert torch.equal(dynamic, static)
    with pytest.raises(NotImplementedError, match="static sliding-window"):
        make_model(sliding_window=3).generate(x, cache_implementation="static", max_new_tokens=2, pad_token_id=0)
