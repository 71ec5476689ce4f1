"""Seeded sampling of completions for online RL (grpo, ppo).

A manual sampling loop over a KV cache, drawing every token from an explicit ``torch.Generator``:
the completions of a rollout are a pure function of (weights, prompts, seed), which is what an exact
resume needs (no global RNG state is read or advanced).

Prompts arrive left-padded (``[B, P]``). Positions are counted from the first real token
(``position_ids = cumsum(mask) - 1``), both here and when the loss recomputes log-probabilities
(:func:`sequence_forward`), so the two agree token for token.
"""

from __future__ import annotations

import zlib

import torch


def rollout_seed(seed: int, stage_name: str, rollout: int, salt: str = "rollout") -> int:
    """A stable 63-bit seed for (recipe seed, stage, rollout index) — independent of PYTHONHASHSEED."""
    return (zlib.crc32(f"{seed}:{stage_name}:{salt}".encode()) << 31) ^ (rollout * 2654435761 % (1 << 31))


def make_generator(seed: int, device) -> torch.Generator:
    device = torch.device(device)
    gen = torch.Generator(device=device.type if device.type != "mps" else "cpu")
    gen.manual_seed(int(seed) & ((1 << 63) - 1))
    return gen


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` positions counted from the first real token of each row (left padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p; Holtzman et al. 2020) filtering of ``[B, V]`` logits (-inf outside)."""
    if top_k and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop_sorted = (probs.cumsum(-1) - probs) > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def cache_argument(model) -> str | None:
    """The keyword under which ``model.forward`` takes a KV cache, or None when it takes none.

    transformers >= 5.2x names it ``cache`` (``past_key_values`` is a deprecated alias there, and a
    model that only has ``**kwargs`` would swallow the wrong name silently); older models and
    transformers 4.x use ``past_key_values``. A PEFT wrapper is looked through to the model it wraps.
    """
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def returned_cache(out):
    """The KV cache a forward returned: the ``cache`` field (transformers >= 5.2x) or ``past_key_values``."""
    for name in ("cache", "past_key_values"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    return None


def _forward(model, input_ids, attention_mask, position_ids, cache_name: str | None, past=None):
    """Logits ``[B, T, V]`` and the returned cache (None without ``cache_name``)."""
    kw = {"use_cache": cache_name is not None}
    if cache_name is not None and past is not None:
        kw[cache_name] = past
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits, (returned_cache(out) if cache_name is not None else None)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of ``probs`` ``[B, V]`` (rows need not be normalised) → ids ``[B]``.

    Inverse-CDF sampling: one uniform per row from ``generator`` (on the generator's device, so a
    CPU generator never pulls the probabilities off the GPU) and a ``searchsorted`` in the running
    sum. Same distribution as ``torch.multinomial`` (tested); 16x faster on CPU for a 32 x 4,096
    draw (0.20 vs 3.35 ms). Never returns a zero-probability id.
    """
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=generator.device, dtype=cdf.dtype)
    u = u.to(cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
           generator: torch.Generator, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           eos_token_id: int | list[int] | None = None, pad_token_id: int = 0,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one completion per prompt row.

    Args:
        model: a causal LM taking ``input_ids, attention_mask, position_ids, use_cache`` and a KV cache
            under the name :func:`cache_argument` finds (without one, every step recomputes the sequence).
        prompt_ids: ``[B, P]`` left-padded prompt tokens; prompt_mask: ``[B, P]``.
        max_new_tokens: completion length cap ``N``.
        generator: the source of randomness (seeded per rollout by the caller).
        temperature: 0 means greedy; top_k: 0 means off; top_p: 1.0 means off.
        eos_token_id: one id or several; a row stops after emitting one.
        pad_token_id: written after a row stopped.

    Returns:
        ``(completion_ids, completion_mask)``, each ``[B, N']`` with ``N' <= N`` (right-padded; the
        mask covers the tokens up to and including the EOS).
    """
    was_training = model.training
    model.eval()
    device = prompt_ids.device
    eos = torch.tensor([] if eos_token_id is None else
                       ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
                       dtype=torch.long, device=device)
    B = prompt_ids.shape[0]
    attn = prompt_mask.long()
    pos = position_ids_from_mask(attn)
    cache_name = cache_argument(model)
    logits, past = _forward(model, prompt_ids, attn, pos, cache_name)
    use_cache = past is not None
    seq = prompt_ids
    next_pos = pos[:, -1:] + 1
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, masks = [], []
    try:
        for _ in range(max_new_tokens):
            step_logits = logits[:, -1, :].float()
            if temperature and temperature > 0:
                step_logits = filter_logits(step_logits / temperature, top_k, top_p)
                nxt = sample_categorical(step_logits.softmax(-1), generator)
            else:
                nxt = step_logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            tokens.append(nxt)
            masks.append(~done)
            done = done | torch.isin(nxt, eos)
            if bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=device)], dim=1)
            if use_cache:
                logits, past = _forward(model, nxt[:, None], attn, next_pos, cache_name, past)
            else:  # a model without a KV cache: recompute the whole sequence
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                logits, _ = _forward(model, seq, attn, position_ids_from_mask(attn), None)
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    return torch.stack(tokens, 1), torch.stack(masks, 1).long()


def sequence_forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                     temperature: float = 1.0, return_hidden: bool = False):
    """Log-probs of the completion tokens (and optionally the hidden states feeding them).

    Args:
        prompt_ids, prompt_mask: ``[B, P]`` left-padded; completion_ids, completion_mask: ``[B, C]``.
        temperature: logits are divided by it (the distribution that was sampled from).
        return_hidden: also return the final hidden states ``[B, C, H]`` at the positions that predict
            each completion token (for a value head), captured from the LM head's input.

    Returns:
        ``logps`` ``[B, C]`` float32 (or ``(logps, hidden)``).
    """
    from llmlab.losses import completion_logps

    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1).long()
    P = prompt_ids.shape[1]
    captured = {}
    handle = None
    if return_hidden:
        head = model.get_output_embeddings()
        handle = head.register_forward_hook(lambda mod, inp, out: captured.__setitem__("h", inp[0]))
    try:
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    logits = out.logits if hasattr(out, "logits") else out[0]
    if temperature and temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logps = completion_logps(logits, ids, P)
    if return_hidden:
        return logps, captured["h"][:, P - 1:-1]
    return logps
