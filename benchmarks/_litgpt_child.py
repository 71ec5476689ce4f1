"""LitGPT's side of benchmarks/vs_litgpt.py: one ``litgpt.pretrain`` run, launched by that script
with the LitGPT venv's Python (it imports only torch, lightning and litgpt, never llmlab).

    /work/litgpt-venv/bin/python benchmarks/_litgpt_child.py SPEC.json

SPEC.json (written by vs_litgpt.py): ``train`` (a ``.pt`` int64 tensor [steps × batch, seq_len] of
llmlab's packed training blocks, in step order), ``windows`` (a JSON list of the held-out scored
windows ``[ids, flags]``: llmlab's eval_loss definition, llmlab.heldout), ``model`` (d_model,
n_layers, n_heads, d_ff, vocab_size, seq_len, rope_theta, norm_eps), ``batch_size``, ``steps``,
``warmup_steps`` (untimed), ``precision`` (a Fabric precision, or null for LitGPT's default),
``optimizer`` (null: LitGPT's defaults; else lr, betas, eps, weight_decay, warmup, min_lr),
``launch_time`` (the parent's ``time.time()`` just before launching this process), ``out_dir``, ``seed``.

LitGPT is driven through ``litgpt.pretrain.setup`` itself (its Fabric loop with ``torch.compile``,
grad clipping, cosine schedule, per-step logging), with a DataModule that hands it the blocks in
order. A block of ``seq_len`` tokens is one row: LitGPT's ``max_seq_length`` is ``seq_len - 1``
(input = row[:-1], targets = row[1:]), so both tools predict exactly the same 255 tokens per row.
Identical optimizer settings need one patch: LitGPT passes ``model.parameters()`` to AdamW (weight
decay on every tensor); ``optimizer`` given, the matrices get the decay and 1-D tensors none, as in
llmlab (and nanoGPT).

Timing: the DataModule's dataset stamps ``time.perf_counter()`` when the loop fetches each batch;
fetch k (k ≥ 1) happens right after step k ends. Prints one line ``RESULT {json}`` with
``startup_s`` (launch → end of step 1), ``tokens_per_s`` (steps warmup+1 .. steps; and
``tokens_per_cpu_s``, per CPU-second of this process: less sensitive to a busy machine), ``heldout_loss``
(nats per scored token over the windows, fp32), ``last_loss`` and ``peak_rss_mb`` (VmHWM).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


BATCHES: list = []  # batch k of the run: rows [k·B, (k+1)·B) of the training blocks
FETCHED: list[float] = []  # perf_counter() at each fetch of a training batch
FETCHED_CPU: list[float] = []  # process_time() (this process's CPU seconds) at the same moments


class Blocks:
    """The run's batches in order, stamped when fetched (a map-style dataset; module level so that
    LitGPT's checkpoint, which pickles the dataloader, can hold it)."""

    def __init__(self, n: int, stamp: bool):
        self.n, self.stamp = n, stamp

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        if self.stamp:
            FETCHED.append(time.perf_counter())
            FETCHED_CPU.append(time.process_time())
        return BATCHES[k % len(BATCHES)]


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch
    import litgpt.pretrain as P
    from litgpt.args import EvalArgs, TrainArgs
    from litgpt.data import DataModule
    from litgpt.model import Config
    from torch.utils.data import DataLoader

    windows = json.loads(Path(spec["windows"]).read_text())
    b, steps, m = spec["batch_size"], spec["steps"], spec["model"]
    rows = torch.load(spec["train"], weights_only=True)
    BATCHES.extend(rows[k * b:(k + 1) * b] for k in range(steps))

    class Data(DataModule):
        def connect(self, tokenizer=None, batch_size=1, max_seq_length=None):
            pass

        def train_dataloader(self):
            return DataLoader(Blocks(steps + 1, True), batch_size=None, shuffle=False)

        def val_dataloader(self):
            return DataLoader(Blocks(2, False), batch_size=None, shuffle=False)

    config = Config(name="vs-llmlab", block_size=m["seq_len"], vocab_size=m["vocab_size"],
                    padded_vocab_size=m["vocab_size"], n_layer=m["n_layers"], n_head=m["n_heads"],
                    n_query_groups=m["n_heads"], n_embd=m["d_model"], head_size=m["d_model"] // m["n_heads"],
                    rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
                    norm_eps=m["norm_eps"], mlp_class_name="LLaMAMLP", intermediate_size=m["d_ff"],
                    rope_base=int(m["rope_theta"]))
    tokens_per_row = m["seq_len"] - 1
    # LitGPT's own defaults (setup()'s TrainArgs) except the batch, the length and the run's size
    targs = dict(save_interval=None, log_interval=1, global_batch_size=b, micro_batch_size=b,
                 max_tokens=steps * b * tokens_per_row, max_norm=1.0, min_lr=4e-5, lr_warmup_steps=2000,
                 tie_embeddings=False, max_seq_length=tokens_per_row)
    opt_arg: str | dict = "AdamW"
    o = spec["optimizer"]
    if o is not None:
        targs.update(min_lr=o["min_lr"], lr_warmup_steps=o["warmup"] or None)
        opt_arg = {"class_path": "torch.optim.AdamW",
                   "init_args": {"lr": o["lr"], "betas": tuple(o["betas"]), "eps": o["eps"],
                                 "weight_decay": o["weight_decay"]}}
        original = P.instantiate_torch_optimizer

        def grouped(optimizer, params, **kw):  # llmlab's grouping: decay on matrices only
            params, wd = list(params), o["weight_decay"]
            groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
                      {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
            return original(optimizer, groups, **kw)

        P.instantiate_torch_optimizer = grouped
    trained = {}
    fit = P.fit

    def keep_model(**kw):
        fit(**kw)
        trained["model"] = kw["state"]["model"]

    P.fit = keep_model
    P.setup(model_name="vs-llmlab", model_config=config, out_dir=Path(spec["out_dir"]),
            precision=spec["precision"], data=Data(), train=TrainArgs(**targs),
            eval=EvalArgs(interval=10**9, max_iters=2, initial_validation=False, final_validation=False),
            logger_name="csv", seed=spec["seed"])
    w = spec["warmup_steps"]
    tokens = (steps - w) * b * m["seq_len"]
    result = {"startup_s": FETCHED[1] - time.perf_counter() + time.time() - spec["launch_time"]
              if len(FETCHED) > 1 else None,
              "tokens_per_s": tokens / (FETCHED[steps] - FETCHED[w]),
              "tokens_per_cpu_s": tokens / (FETCHED_CPU[steps] - FETCHED_CPU[w]),
              "heldout_loss": heldout_loss(trained["model"], windows, m["seq_len"]),
              "precision": spec["precision"] or P.get_default_supported_precision(training=True)}
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def heldout_loss(model, windows: list, seq_len: int) -> float:
    """Mean NLL (nats) of the flagged tokens of each window, each window alone, fp32 logits."""
    import torch

    gpt = getattr(model, "_forward_module", model)
    gpt = getattr(gpt, "_orig_mod", gpt)
    gpt.max_seq_length = seq_len
    gpt.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids, flags in windows:
            x = torch.tensor(ids, dtype=torch.long)[None]
            logp = torch.log_softmax(gpt(x)[0, :-1].float(), dim=-1)
            tok = logp.gather(-1, x[0, 1:, None]).squeeze(-1).double()
            mask = torch.tensor(flags[1:], dtype=torch.bool)
            nll -= float(tok[mask].sum())
            n += int(mask.sum())
    return nll / n


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
