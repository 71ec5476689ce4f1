"""Micro-benchmarks behind the proposed llmlab code changes (docs/performance.md, "Proposals"):
each pair computes the same thing two ways, forward + backward, side by side (interleaved), and
checks that the results agree.

    python benchmarks/micro_ops.py [--batch 8] [--seq 128] [--vocab 4096] [--d 256] [--reps 30]

loss_shift      llmlab.models.modeling_llmlab.causal_lm_loss (shifts the *logits*:
                ``logits[:, :-1].reshape(-1, V)`` copies B·T·V floats) against shifting the
                *labels* (pad with -100, view the logits as they are: no copy)
token_logps     llmlab.losses.token_logps (a full ``log_softmax`` [B, T, V] then gather) against
                ``gather(logits) - logsumexp(logits)`` (no [B, T, V] log-prob tensor)
gqa_sdpa        repeat_kv (materialised K/V copies) + SDPA against SDPA(enable_gqa=True), with the
                per-document boolean mask packing uses
rmsnorm         llmlab's RMSNorm (fp32 upcast, pow/mean/rsqrt/mul) against ``F.rms_norm``

Peak extra memory of the loss variants is reported from the sizes of the tensors they allocate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def loss_current(logits, labels):
    from llmlab.models.modeling_llmlab import causal_lm_loss

    return causal_lm_loss(logits, labels)


def loss_label_shift(logits, labels):
    shift = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shift.reshape(-1), ignore_index=-100)


def logps_current(logits, labels):
    from llmlab.losses import token_logps

    return token_logps(logits, labels)[0].sum(-1)


def logps_lse(logits, labels):
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != -100
    safe = labels.masked_fill(~mask, 0)
    picked = torch.gather(logits, 2, safe.unsqueeze(-1)).squeeze(-1)
    return ((picked - torch.logsumexp(logits, -1)) * mask).sum(-1)


def bench(fns: dict, make, reps: int):
    """Interleaved fwd+bwd timings of each fn on the same inputs; (times, results agree)."""
    times = {k: [] for k in fns}
    outs = {}
    for r in range(reps + 2):
        base = make()
        for k, fn in fns.items():
            args = [a.detach().clone().requires_grad_(a.requires_grad) if a.is_floating_point() else a for a in base]
            t0 = time.perf_counter()
            out = fn(*args)
            out.float().sum().backward()
            dt = time.perf_counter() - t0
            if r >= 2:
                times[k].append(dt)
            outs[k] = (out.detach(), args[0].grad)
    ks = list(fns)
    a, b = outs[ks[0]], outs[ks[1]]
    same = torch.allclose(a[0], b[0], atol=1e-4, rtol=1e-4) and torch.allclose(a[1], b[1], atol=1e-5, rtol=1e-3)
    return times, same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--reps", type=int, default=30)
    C.add_threads_arg(ap)
    args = ap.parse_args()
    C.apply_threads(args.threads)
    C.quiet()
    from llmlab.models.modeling_llmlab import AttentionMaskSpec, LlmlabRMSNorm, repeat_kv

    torch.manual_seed(0)
    B, T, V, D, H, Hkv = args.batch, args.seq, args.vocab, args.d, args.heads, args.kv_heads
    Dh = D // H
    labels = torch.randint(0, V, (B, T))
    labels[:, :5] = -100
    print(C.machine_note())
    print(f"B={B} T={T} V={V} d={D} heads={H}/{Hkv}")
    rows = []

    def logits_leaf():
        return (torch.randn(B, T, V, requires_grad=True), labels)

    for name, fns, extra_mb in (
        ("loss_shift", {"current": loss_current, "proposed": loss_label_shift}, B * (T - 1) * V * 4 / 2**20),
        ("token_logps", {"current": logps_current, "proposed": logps_lse}, B * (T - 1) * V * 4 / 2**20),
    ):
        times, same = bench(fns, logits_leaf, args.reps)
        a, b = min(times["current"]), min(times["proposed"])
        rows.append([name, f"{1e3 * a:.2f}", f"{1e3 * b:.2f}", f"{a / b:.2f}x",
                     f"{C.median(times['current']) / C.median(times['proposed']):.2f}x", "yes" if same else "NO",
                     f"-{extra_mb:.0f} MB"])

    # attention with the packing mask
    pos = torch.cat([torch.arange(T // 2), torch.arange(T - T // 2)]).expand(B, T)
    step = torch.diff(pos, dim=-1) != 1
    doc = F.pad(step.long().cumsum(-1), (1, 0))
    spec = AttentionMaskSpec(None, 0, T, doc, None, None, torch.device("cpu"))
    mask = spec.sdpa_mask(T, torch.float32)
    n_rep = H // Hkv

    def qkv():
        q = torch.randn(B, H, T, Dh, requires_grad=True)
        k = torch.randn(B, Hkv, T, Dh, requires_grad=True)
        v = torch.randn(B, Hkv, T, Dh, requires_grad=True)
        return q, k, v

    def attn_current(q, k, v):
        return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)

    def attn_gqa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    times, same = bench({"current": attn_current, "proposed": attn_gqa}, qkv, args.reps)
    a, b = min(times["current"]), min(times["proposed"])
    rows.append(["gqa_sdpa (per layer)", f"{1e3 * a:.2f}", f"{1e3 * b:.2f}", f"{a / b:.2f}x",
                 f"{C.median(times['current']) / C.median(times['proposed']):.2f}x", "yes" if same else "NO",
                 f"-{2 * B * H * T * Dh * 4 / 2**20:.1f} MB"])

    norm = LlmlabRMSNorm(D)

    def x_leaf():
        return (torch.randn(B, T, D, requires_grad=True),)

    def rms_current(x):
        return norm(x)

    def rms_fused(x):
        return F.rms_norm(x, (D,), norm.weight, norm.eps)

    times, same = bench({"current": rms_current, "proposed": rms_fused}, x_leaf, args.reps)
    a, b = min(times["current"]), min(times["proposed"])
    rows.append(["rmsnorm (per call)", f"{1e3 * a:.3f}", f"{1e3 * b:.3f}", f"{a / b:.2f}x",
                 f"{C.median(times['current']) / C.median(times['proposed']):.2f}x", "yes" if same else "NO", "-"])
    print(C.table(rows, ["op (fwd+bwd)", "current ms (best)", "proposed ms (best)", "speed-up (best)",
                         "speed-up (median)", "same result", "memory"]))
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
