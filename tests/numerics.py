"""Tests that train: fitting to a measured margin, and which floating-point paths torch takes here.

What a tiny model learns in a given number of steps depends on the CPU's floating-point paths (the
SIMD kernels torch picks, oneDNN on or off, summation order). Tests that need a trained model train it
to a measured margin, or assert a threshold with room measured under several numerics; when such a
test fails, its message says so through :func:`learning_note`. To try other numerics on one machine,
see tests/conftest.py (ATEN_CPU_CAPABILITY, LLMLAB_TEST_MKLDNN).
"""

from __future__ import annotations

import torch

# where the margins and step budgets of the training tests were measured
MEASURED_ON = ("one AMD EPYC Zen 4 under torch's AVX-512 and AVX2 kernels and with oneDNN off "
               "(the inference margins also under no-SIMD kernels)")


def numerics() -> str:
    """e.g. ``'torch CPU capability AVX512, oneDNN on'``."""
    return (f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"oneDNN {'on' if torch.backends.mkldnn.enabled else 'off'}")


def learning_note(what: str) -> str:
    """The message for a failed assertion on what a tiny model learnt: ``what`` plus the CPU dependence."""
    return (f"{what} [{numerics()}]. How far a tiny model gets in a few steps depends on the CPU's "
            f"floating-point paths; the budget and margin were measured on {MEASURED_ON}. If the same "
            "commit passes on another CPU, give the training more steps (or a measured stopping margin) "
            "rather than loosening the assertion.")


def min_target_prob(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> float:
    """The smallest teacher-forced probability ``model`` gives a labelled token.

    ids, mask, labels: ``[B, T]`` (labels -100 where unscored; label t is predicted at position t-1).
    Every labelled token at probability >= p leads every other token by >= log(p / (1 - p)) logits, so
    greedy decoding reproduces the labels whatever ~1e-5 a CPU's floating-point paths move a logit.
    """
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    target = labels[:, 1:]
    probs = logits.softmax(-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return float(probs[target != -100].min())


def fit_to_margin(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, *, min_prob: float,
                  max_steps: int, lr: float, weight_decay: float = 0.01, check_every: int = 25) -> tuple[int, float]:
    """Full-batch AdamW on (ids, mask, labels) until :func:`min_target_prob` >= ``min_prob``.

    Checks every ``check_every`` steps and stops at ``max_steps`` either way; leaves the model in eval
    mode. Returns (steps taken, smallest probability): the caller asserts, with :func:`learning_note`.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    step, worst = 0, 0.0
    while step < max_steps:
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
        step += 1
        if step % check_every == 0:
            model.eval()
            worst = min_target_prob(model, ids, mask, labels)
            if worst >= min_prob:
                break
    model.eval()
    return step, worst
