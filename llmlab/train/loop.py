"""The one training loop every stage type runs in.

The loop owns device placement and mixed precision (accelerate), gradient accumulation and
clipping, optimizer and schedule, evaluation, logging (metrics.jsonl, progress bar, report_to
trackers), checkpoints and exact resume. A :class:`~llmlab.stages.base.Stage` supplies the model,
the batches and the loss.

Resume is exact because (1) a micro-batch is a pure function of its global index, (2) checkpoints
hold weights, optimizer, scheduler, every RNG state and the stage's own state, and (3) the step
count is part of the checkpoint. On CPU a resumed run reaches bitwise the same weights as one that
never stopped (tested in tests/test_resume.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmlab.metricsfile import read_records
from llmlab.stages.base import Stage
from llmlab.train import checkpoint as ckpt_lib
from llmlab.train.optim import build_optimizer, build_scheduler, needs_hessian

log = logging.getLogger("llmlab")


class TrainingError(RuntimeError):
    """A stage failed in a way the user can act on (NaN loss, out of memory, bad input)."""


@dataclass
class StageResult:
    """What a finished stage reports: for the summary table and stage.json."""

    steps: int
    first_loss: float | None
    last_loss: float | None
    eval_loss: float | None
    first_eval_loss: float | None
    wall_time_s: float
    tokens: int
    resumed_from: int | None = None
    final_metrics: dict = field(default_factory=dict)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _scalar(v) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP/FSDP/compile wrapper."""
    while hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl``; on resume drops lines past the step."""

    def __init__(self, path: Path, resume_step: int, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        if resume_step > 0 and path.exists():
            keep = [rec for rec in read_records(path) if rec.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(rec) + "\n" for rec in keep))
        elif path.exists():
            path.unlink()
        self._f = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        if self.enabled:
            self._f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.enabled:
            self._f.close()


class Trackers:
    """TensorBoard / Weights & Biases through ``logging.report_to`` (optional packages)."""

    def __init__(self, report_to: list[str], run_dir: Path, stage_name: str, config: dict, project: str | None):
        self.tb = None
        self.wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard" / stage_name))
        if "wandb" in report_to:
            import wandb

            self.wandb = wandb.init(project=project or "llmlab", name=stage_name, config=config, reinit=True)

    def log(self, record: dict, step: int) -> None:
        for k, v in record.items():
            if k == "step" or not isinstance(v, (int, float)):
                continue
            if self.tb is not None:
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def train(stage: Stage, *, fingerprint: str, accelerator=None, reset_optimizer: bool = False,
          progress=None) -> tuple[torch.nn.Module, StageResult]:
    """Train ``stage`` to its ``max_steps``, resuming from its newest intact checkpoint.

    Args:
        stage: the stage to train (its ``ctx.stage_dir`` is the stage's run directory).
        fingerprint: the stage's fingerprint, stored in each checkpoint.
        accelerator: an ``accelerate.Accelerator`` (one is made when None).
        reset_optimizer: on resume, load only the weights (fresh optimizer, schedule fast-forwarded).
        progress: an optional ``rich.progress.Progress`` to draw a bar in.

    Returns:
        (the trained, unwrapped model — still PEFT-wrapped when the stage uses LoRA, the result).

    Raises:
        TrainingError: a non-finite loss (naming the step; the last good checkpoint is kept) or
            running out of memory (naming the knobs to turn).
    """
    from accelerate import Accelerator

    ctx, cfg = stage.ctx, stage.config
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    if accelerator is None:
        accelerator = Accelerator(cpu=ctx.device.type == "cpu")
    device = accelerator.device
    from accelerate.utils import set_seed

    set_seed(ctx.seed)

    model = stage.build_model()
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and ctx.tokenizer is not None and emb.num_embeddings < len(ctx.tokenizer):
        raise TrainingError(f"stage {ctx.name}: the model's vocabulary ({emb.num_embeddings}) does not cover the "
                            f"tokenizer's {len(ctx.tokenizer)} tokens; use the tokenizer the model was trained with")
    if cfg.get("lora"):
        from llmlab.models.build import apply_lora

        model = apply_lora(model, cfg["lora"], stage_model_arch(model))
    if ctx.recipe.get("model", {}).get("gradient_checkpointing") and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    model.to(device)
    with accelerator.main_process_first():  # rank 0 tokenizes and caches the data, the others reuse it
        stage.setup(model)
        _ = stage.data

    max_steps = int(cfg["max_steps"])
    gas = int(cfg.get("gradient_accumulation_steps", 1))
    optimizer = build_optimizer(model, cfg.get("optimizer", {}), device)
    scheduler = build_scheduler(optimizer, cfg.get("scheduler", {}), max_steps)
    if needs_hessian(optimizer):
        # Sophia's Hessian estimate differentiates through the backward pass; fused SDPA kernels have
        # no double backward, so attention runs in plain PyTorch ops for this stage.
        if hasattr(getattr(model, "config", None), "attn_backend"):
            model.config.attn_backend = "eager"
        elif hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")

    ckpt_root = ctx.stage_dir / "checkpoints"
    start_step, best_eval, best_step, resumed_from = 0, math.inf, None, None
    ckpt = ckpt_lib.latest_intact(ckpt_root)
    if ckpt is not None:
        info = json.loads((ckpt / "trainer_state.json").read_text())
        opt_name = cfg.get("optimizer", {}).get("name", "adamw")
        weights_only = reset_optimizer or cfg.get("reset_optimizer", False)
        if info.get("optimizer") != opt_name and not weights_only:
            warnings.warn(f"stage {ctx.name}: the checkpoint was trained with optimizer {info.get('optimizer')!r}, "
                          f"the recipe now says {opt_name!r}: loading the weights only")
            weights_only = True
        same_schedule = info.get("max_steps") == max_steps and info.get("scheduler") == cfg.get("scheduler")
        state = ckpt_lib.load_checkpoint(ckpt, model=model, optimizer=None if weights_only else optimizer,
                                         scheduler=scheduler if (same_schedule and not weights_only) else None)
        start_step = int(state["trainer_state"]["step"])
        if not same_schedule or weights_only:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(start_step):
                    scheduler.step()
        best_eval = state["trainer_state"].get("best_eval", math.inf) or math.inf
        best_step = state["trainer_state"].get("best_step")
        stage.load_state_dict(state["stage_state"])
        resumed_from = start_step
        log.info("stage %s: resuming from %s (step %d)", ctx.name, ckpt, start_step)

    prepared_model, optimizer = accelerator.prepare(model, optimizer)
    if ctx.recipe.get("compile"):
        import torch._dynamo as dynamo

        dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly
        prepared_model = torch.compile(prepared_model)
    world, rank = accelerator.num_processes, accelerator.process_index
    is_main = accelerator.is_main_process
    metrics = MetricsWriter(ctx.stage_dir / "metrics.jsonl", start_step, enabled=is_main)
    log_cfg = ctx.recipe.get("logging", {}) or {}
    trackers = Trackers(log_cfg.get("report_to") or [], Path(ctx.recipe["output_dir"]), ctx.name, cfg,
                        log_cfg.get("wandb_project")) if is_main else None
    log_every = int(cfg.get("log_every", log_cfg.get("log_every", 10)))
    eval_every = int(cfg.get("eval_every", 100))
    save_every = int(cfg.get("save_every", 100))
    keep_last = int(cfg.get("keep_last", 2))
    save_best_only = bool(cfg.get("save_best_only", False))
    grad_clip = cfg.get("grad_clip", 1.0)
    hessian = needs_hessian(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer)
    hessian_every = int(cfg.get("optimizer", {}).get("hessian_update_every", 10))
    eval_batches = [b for b in stage.eval_batches()]
    check_every_step = device.type == "cpu"

    task = None
    if progress is not None and is_main:
        task = progress.add_task(ctx.name, total=max_steps, completed=start_step, loss=float("nan"), tps=0.0)

    first_loss = last_loss = eval_loss = first_eval_loss = None
    tokens_total, t0 = 0, time.perf_counter()
    window_tokens, window_t = 0, time.perf_counter()
    good_ckpt = str(ckpt) if ckpt is not None else None
    step = start_step

    def trainer_state(extra=None) -> dict:
        return {"fingerprint": fingerprint, "max_steps": max_steps, "optimizer": cfg.get("optimizer", {}).get("name", "adamw"),
                "scheduler": cfg.get("scheduler"), "best_eval": None if math.isinf(best_eval) else best_eval,
                "best_step": best_step, **(extra or {})}

    def run_eval() -> dict:
        # the bare module: no DDP collectives, so the main process can evaluate alone
        bare = unwrap(prepared_model)
        bare.eval()
        with accelerator.autocast():
            out = stage.evaluate(bare, [_to_device(b, device) for b in eval_batches])
        bare.train()
        return out

    if start_step == 0 and eval_batches and is_main:
        ev = run_eval()
        first_eval_loss = ev.get("eval_loss")
        metrics.write({"step": 0, **ev})

    prepared_model.train()
    try:
        while step < max_steps:
            loss_sum = torch.zeros((), device=device)
            metric_sums: dict[str, torch.Tensor | float] = {}
            step_tokens = 0
            create_graph = hessian and step % hessian_every == 0
            for micro in range(gas):
                index = (step * gas + micro) * world + rank
                batch = _to_device(stage.get_batch(index, unwrap(prepared_model)), device)
                step_tokens += stage.tokens_in_batch(batch)
                sync_ctx = accelerator.no_sync(prepared_model) if micro < gas - 1 else contextlib.nullcontext()
                with sync_ctx, accelerator.autocast():
                    loss, m = stage.compute_loss(prepared_model, batch)
                    if create_graph:
                        (loss / gas).backward(create_graph=True)
                    else:
                        accelerator.backward(loss / gas)
                loss_sum += loss.detach() / gas
                for k, v in m.items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + (v.detach() if isinstance(v, torch.Tensor) else v) / gas
            if check_every_step and not torch.isfinite(loss_sum):
                raise TrainingError(f"stage {ctx.name}: loss is {loss_sum.item()} at step {step + 1}; "
                                    f"the last good checkpoint is {good_ckpt or 'none'} (lower the lr or set grad_clip)")
            grad_norm = None
            if grad_clip:
                grad_norm = accelerator.clip_grad_norm_(prepared_model.parameters(), float(grad_clip))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_total += step_tokens * world
            window_tokens += step_tokens * world

            if step % log_every == 0 or step == max_steps or step == start_step + 1:
                now = time.perf_counter()
                if world > 1:  # log the global mean, as a single process with the same global batch would
                    loss_sum = accelerator.reduce(loss_sum, reduction="mean")
                    metric_sums = {k: accelerator.reduce(v if isinstance(v, torch.Tensor) else torch.tensor(v, device=device),
                                                         reduction="mean") for k, v in metric_sums.items()}
                loss_val = _scalar(loss_sum)
                if not math.isfinite(loss_val):
                    raise TrainingError(f"stage {ctx.name}: loss is {loss_val} at step {step}; "
                                        f"the last good checkpoint is {good_ckpt or 'none'}")
                tps = window_tokens / max(now - window_t, 1e-9)
                window_tokens, window_t = 0, now
                first_loss = loss_val if first_loss is None else first_loss
                last_loss = loss_val
                rec = {"step": step, "loss": loss_val, "lr": scheduler.get_last_lr()[0],
                       "grad_norm": None if grad_norm is None else _scalar(grad_norm),
                       "tokens": tokens_total, "tokens_per_s": tps, "elapsed_s": now - t0,
                       **{k: _scalar(v) for k, v in metric_sums.items()}}
                metrics.write(rec)
                if trackers:
                    trackers.log(rec, step)
                if task is not None:
                    progress.update(task, completed=step, loss=loss_val, tps=tps)
            elif task is not None:
                progress.update(task, completed=step)

            if eval_batches and (step % eval_every == 0 or step == max_steps) and is_main:
                ev = run_eval()
                eval_loss = ev.get("eval_loss")
                metrics.write({"step": step, **ev})
                if trackers:
                    trackers.log(ev, step)
            improved = False
            if eval_batches and (step % eval_every == 0 or step == max_steps):
                if is_main and eval_loss is not None and eval_loss < best_eval:
                    best_eval, best_step, improved = eval_loss, step, True
                if world > 1:  # every rank must take the same save decision
                    from accelerate.utils import broadcast_object_list

                    improved = broadcast_object_list([improved], from_process=0)[0]

            if step % save_every == 0 or step == max_steps or (save_best_only and improved):
                if not check_every_step and not torch.isfinite(loss_sum):
                    raise TrainingError(f"stage {ctx.name}: loss is not finite at step {step}; "
                                        f"the last good checkpoint is {good_ckpt or 'none'}")
                accelerator.wait_for_everyone()
                if is_main:
                    protect = {best_step} if save_best_only and best_step else set()
                    good_ckpt = str(ckpt_lib.save_checkpoint(
                        ckpt_root, step, model=unwrap(prepared_model), optimizer=optimizer, scheduler=scheduler,
                        stage_state=stage.state_dict(), trainer_state=trainer_state(), keep_last=keep_last,
                        protect=protect))
                accelerator.wait_for_everyone()
    except torch.OutOfMemoryError as e:
        raise TrainingError(
            f"stage {ctx.name}: out of memory at step {step + 1}. Lower batch_size (raise "
            f"gradient_accumulation_steps to keep the global batch), lower seq_len, or set "
            f"model.gradient_checkpointing: true") from e
    finally:
        metrics.close()
        if trackers:
            trackers.close()

    model = unwrap(prepared_model)
    if save_best_only and best_step is not None and best_step != max_steps:
        best = ckpt_root / f"{ckpt_lib.PREFIX}{best_step:06d}"
        if best.is_dir() and ckpt_lib.verify(best) is None:
            ckpt_lib.load_checkpoint(best, model=model)
    result = StageResult(
        steps=step, first_loss=first_loss, last_loss=last_loss, eval_loss=eval_loss,
        first_eval_loss=first_eval_loss, wall_time_s=time.perf_counter() - t0, tokens=tokens_total,
        resumed_from=resumed_from, final_metrics=stage.summary_metrics())
    return model, result


def stage_model_arch(model: torch.nn.Module) -> str | None:
    """The LoRA preset key (see llmlab.models.lora_presets) of an instantiated model."""
    from llmlab.models.lora_presets import arch_key_for_model_type

    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt == "llmlab":
        return "transformer_gated" if model.config.activation == "swiglu" else "transformer_plain"
    return arch_key_for_model_type(mt) if mt else None
