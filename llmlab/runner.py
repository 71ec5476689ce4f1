"""Execute a recipe's stage graph: skip finished stages, resume a partial one, start the rest.

Each stage leaves ``<output_dir>/<stage>/`` with ``final/`` (HF format), ``metrics.jsonl``,
``stage.json`` and ``checkpoints/`` (see docs/architecture.md). Outputs are written to a temporary
directory and renamed, so a kill never leaves a half-written ``final/`` that looks finished.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmlab.console import make_console, process_rank, single_process_launch_warning
from llmlab.fingerprint import tokenizer_fingerprint
from llmlab.layout import RunLayout, StageLayout, StageRecord
from llmlab.metricsfile import read_records
from llmlab.ownership import NotOwnedError, check_run_dir, claim_run_dir, make_dir, remove_owned, writing_folder
from llmlab.secrets import mask_secrets
from llmlab.runguard import RunLockedError, memory_shortfall, run_lock
from llmlab.runplan import build_run_plan
from llmlab.stage_specs import stage_spec

log = logging.getLogger("llmlab")


class RunError(RuntimeError):
    """A run cannot proceed (a missing input stage, a bad selection); the message says why."""


@dataclass
class StageOutcome:
    name: str
    type: str
    action: str  # ran | resumed | extended | skipped
    info: dict


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class _StageEnv:
    """What every stage of one ``Runner.run`` shares."""

    device: object
    accelerator: object
    tokenizer: object
    tok_sha: str
    reset_optimizer: bool


#: StageRecord fields set when a stage finishes / only training stages have
_FINISH_FIELDS = frozenset({"finished_at", "steps", "wall_time_s", "tokens", "resumed_from", "first_loss", "last_loss",
                            "first_eval", "last_eval", "final_metrics", "outputs", "early_stopping", "flops"})
_TRAINING_FIELDS = frozenset({"max_steps", "init_path", "init_adapter", "device", "precision", "threads", "distributed",
                              "extended_from"})


@functools.cache
def package_versions() -> dict[str, str]:
    """Versions of llmlab (the code running: ``llmlab.__version__``) and of the packages that
    determine a run's result, as recorded in recipe.resolved.yaml (``resolved_with``) and each
    stage.json (``versions``). Neither is part of a fingerprint: a new torch does not make a
    finished stage stale."""
    from importlib.metadata import PackageNotFoundError, version

    from llmlab import __version__

    out = {"llmlab": __version__, "python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "datasets", "tokenizers", "peft", "accelerate", "pytorch-optimizer"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def select_stages(order: list[str], only: str | None, from_stage: str | None, until: str | None) -> tuple[list[str], set[str]]:
    """(stages to consider in order, stages to rerun regardless of status).

    Raises:
        RunError: a named stage does not exist.
    """
    for opt, name in (("--only", only), ("--from", from_stage), ("--until", until)):
        if name is not None and name not in order:
            raise RunError(f"{opt} {name}: no such stage (stages: {', '.join(order)})")
    selected = list(order)
    forced: set[str] = set()
    if from_stage:
        selected = order[order.index(from_stage):]
        forced = set(selected)
    if until:
        selected = [s for s in selected if order.index(s) <= order.index(until)]
    if only:
        selected = [only]
    return selected, forced


def load_stage_output(stage_dir: Path) -> Path:
    """The HF-format directory a downstream stage starts from.

    Raises:
        RunError: the stage has no finished output.
    """
    final = StageLayout(stage_dir).final
    if (final / "config.json").is_file():
        return final
    raise RunError(f"stage {stage_dir.name} has no finished output at {final}; run it first")


def save_final(model, tokenizer, stage_dir: Path, cfg: dict, keep_adapter: bool = False) -> dict:
    """Write ``final/`` (a full HF model + tokenizer) and, for an unmerged LoRA stage (``lora.merge:
    false``, or ``keep_adapter`` when the stage continued an unmerged adapter), ``adapter/``.

    Returns:
        paths written, for stage.json.
    """
    written = {}
    layout = StageLayout(stage_dir)
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()
    lora = cfg.get("lora") or {}
    if isinstance(model, PeftModel):
        if (lora and not lora["merge"]) or (keep_adapter and not lora):
            with writing_folder(layout.tmp("adapter"), layout.adapter, "adapter") as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            written["adapter"] = str(layout.adapter)
        model = model.merge_and_unload()
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        eos = [tokenizer.eos_token_id]
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
        if im_end is not None and stage_spec(cfg["type"]).kind != "text":  # a chat model also stops at <|im_end|>
            eos.append(im_end)
        if stage_spec(cfg["type"]).kind != "text":  # ... and at its template's end-of-turn token
            from llmlab.chat_templates import end_of_turn_ids

            eos += [i for i in end_of_turn_ids(tokenizer) if i not in eos]
        gc.eos_token_id = eos if len(eos) > 1 else eos[0]
        gc.pad_token_id = tokenizer.pad_token_id
        gc.bos_token_id = tokenizer.bos_token_id
    with writing_folder(layout.tmp("final"), layout.final, "final") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    written["final"] = str(layout.final)
    return written


def _metrics_summary(path: Path) -> dict:
    """First and last train loss and eval metrics from metrics.jsonl (robust to resumes)."""
    out: dict = {}
    for rec in read_records(path):
        if "loss" in rec:
            out.setdefault("first_loss", rec["loss"])
            out["last_loss"] = rec["loss"]
        if "eval_loss" in rec:
            out.setdefault("first_eval", {k: v for k, v in rec.items()})
            out["last_eval"] = {k: v for k, v in rec.items()}
    return out


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX), where bf16
    autocast is several times faster than fp32 (measured in benchmarks/pretrain_throughput.py)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def resolve_precision(precision: str, device) -> str:
    """``auto`` → bf16 on a GPU that supports it or a CPU with native bf16, else fp32."""
    import torch

    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def run_threads(recipe: dict, env: dict | None = None) -> int | None:
    """The CPU threads a run asks for: the recipe's ``threads``, else ``$LLMLAB_THREADS``, else None
    (torch's default).

    Raises:
        RunError: ``LLMLAB_THREADS`` is not a whole number >= 1.
    """
    from llmlab.schemafile import top_level

    given = top_level(recipe, "threads")
    if given is not None:
        return int(given)
    raw = (os.environ if env is None else env).get("LLMLAB_THREADS", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise RunError(f"LLMLAB_THREADS={raw!r}: give a whole number of threads >= 1")
    return int(raw)


def apply_threads(recipe: dict) -> int:
    """``torch.set_num_threads`` to :func:`run_threads` when set; returns the threads torch uses."""
    import torch

    n = run_threads(recipe)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()


def distributed_info(accelerator, recipe: dict | None = None) -> dict:
    """What ran, for stage.json and the start line: ``world_size`` (processes), ``strategy``
    (``FSDP`` when the recipe's ``distributed.strategy: fsdp`` shards the model over several
    processes, ``HSDP`` with ``distributed.replicate`` > 1, else accelerate's distributed type:
    NO, MULTI_CPU, MULTI_GPU, ...) and the torch.distributed ``backend`` (gloo, nccl; None for
    one process)."""
    import torch.distributed as dist

    from llmlab.config import DistributedConfig
    from llmlab.train.fsdp import strategy_name

    strategy = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    strategy = strategy_name(DistributedConfig.from_dict((recipe or {}).get("distributed")),
                             int(accelerator.num_processes)) or strategy
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
    return {"world_size": int(accelerator.num_processes), "strategy": str(strategy), "backend": backend}


class Runner:
    """Runs one resolved recipe in its output directory."""

    def __init__(self, recipe: dict, console: Console | None = None, allow_code: bool = False):
        self.recipe = recipe
        self.out = Path(recipe["output_dir"])
        self.layout = RunLayout(self.out)
        self.console = console or make_console()
        self.allow_code = allow_code
        self.order = list(recipe["stages"])
        self.plan = build_run_plan(recipe)  # the stage graph: inputs, fingerprints, status, once
        self.fps = self.plan.fingerprints()

    # -- tokenizer ---------------------------------------------------------------------------
    def ensure_tokenizer(self):
        """Load the run's tokenizer, training it first when absent or when its section changed."""
        from llmlab.data.tokenizer import (
            build_tokenizer,
            load_tokenizer,
            tokenizer_hash,
        )

        d = self.layout.tokenizer
        fp = tokenizer_fingerprint(self.recipe)
        marker = self.layout.tokenizer_fingerprint  # beside the dir: the dir's own files are hashed
        if self.tokenizer_current():
            tok = load_tokenizer(d)
        else:
            t0 = time.perf_counter()
            tmp = self.layout.tokenizer_tmp
            from llmlab.ownership import check_replaceable, mark_written, replace_owned

            check_replaceable(d)  # before the build: refuse a folder of the user's at once
            check_replaceable(tmp)
            remove_owned(tmp)
            build_tokenizer(self.recipe, tmp)
            mark_written(tmp, "tokenizer")
            replace_owned(tmp, d)
            marker.write_text(fp)
            tok = load_tokenizer(d)
            self.console.print(f"tokenizer: {len(tok)} tokens, built in {time.perf_counter() - t0:.1f} s → {d}")
        return tok, tokenizer_hash(d)

    def tokenizer_current(self) -> bool:
        """Whether ``tokenizer/`` holds the tokenizer of this recipe's tokenizer section (its
        fingerprint file, written after the folder, matches)."""
        marker = self.layout.tokenizer_fingerprint
        return (self.layout.tokenizer.is_dir() and marker.is_file()
                and marker.read_text().strip() == tokenizer_fingerprint(self.recipe))

    def claim_output_dir(self, adopt: bool = False) -> None:
        """Create or take the run directory for llmlab (:func:`llmlab.ownership.check_run_dir`,
        then :func:`~llmlab.ownership.claim_run_dir` on one process).

        Raises:
            NotOwnedError: it holds files llmlab did not write and ``adopt`` is not set (or they
                have names llmlab writes); nothing was written.
        """
        check_run_dir(self.out, self.order, adopt)
        if process_rank() != 0:  # one process marks; the others share its folder
            self.out.mkdir(parents=True, exist_ok=True)
        elif claim_run_dir(self.out):
            self.console.print(f"{self.out}: written by an llmlab before ownership markers; marked the folders it "
                               "wrote as llmlab's (other files in it are never deleted)", markup=False, highlight=False)

    # -- stages ------------------------------------------------------------------------------
    def run(self, only=None, from_stage=None, until=None, force=False, reset_optimizer=False,
            adopt=False) -> list[StageOutcome]:
        """Execute the selected stages in order.

        Args:
            adopt: run in a non-empty folder llmlab did not write (:func:`llmlab.ownership.check_run_dir`).

        Raises:
            RunError, llmlab.train.loop.TrainingError, NotOwnedError.
        """
        selected, forced = select_stages(self.order, only, from_stage, until)
        if force:
            forced |= set(selected)
        self.claim_output_dir(adopt)
        if process_rank() == 0:
            from llmlab.recipe import dump_resolved

            resolved_file = self.layout.resolved_recipe
            text = dump_resolved({**self.recipe, "resolved_with": dict(package_versions())})
            if not resolved_file.is_file() or resolved_file.read_text() != text:  # a done run re-checks read-only
                resolved_file.write_text(text)

        statuses = self.plan.statuses()
        todo = [n for n in selected if n in forced or statuses[n][0] != "done"]
        self._check_inputs(todo, statuses)  # before anything is deleted or trained
        if not todo:
            return [self._skip(n, statuses[n][1]) for n in selected]

        self.threads = apply_threads(self.recipe)
        device = self._device()
        self._refuse_unfittable(todo, device)  # before anything is built
        from llmlab.data.prepare import prepare_stages  # fill missing token stores before any stage
        from llmlab.train.ranks import prepare_before_process_group

        tokenizer, tok_sha = prepare_before_process_group(
            self.ensure_tokenizer, self.tokenizer_current,
            lambda tok: prepare_stages(self.recipe, tok, todo, pretrain_only=True, progress=process_rank() == 0))
        accelerator = self._accelerator(device)
        self.distributed = distributed_info(accelerator, self.recipe)
        self.console.print(f"CPU threads: {self.threads}; "
                           f"processes: {self.distributed['world_size']} ({self.distributed['strategy']}"
                           f"{', ' + self.distributed['backend'] if self.distributed['backend'] else ''}), "
                           f"device {device.type}, precision {self.precision}")
        launch_warning = single_process_launch_warning()
        if launch_warning and self.distributed["world_size"] == 1:
            self.console.print(f"warning: {launch_warning}", style="yellow", markup=False, highlight=False)
        env = _StageEnv(device, accelerator, tokenizer, tok_sha, reset_optimizer)
        outcomes = []
        for name in selected:
            outcomes.append(self._run_stage(name, name in forced, env))
            if outcomes[-1].action == "stopped":  # max_time: the stages after it wait for the next run
                break
        return outcomes

    def _check_inputs(self, todo: list[str], statuses: dict[str, tuple[str, str]]) -> None:
        """Refuse the run when a stage to run reads a stage that is neither done nor run earlier by
        this command (``--only dpo`` with a stale ``sft``).

        Raises:
            RunError: naming the stage, its input, the input's status and the command to fix it.
        """
        will_run: set[str] = set()
        for name in todo:
            for role, dep in self.plan.stage(name).inputs.items():
                if dep is not None and dep not in will_run and statuses[dep][0] != "done":
                    status, detail = statuses[dep]
                    raise RunError(f"stage {name} reads stage {dep} ({role}), which is {status}"
                                   f"{f' ({detail})' if detail else ''}; run it first (--from {dep}); "
                                   "nothing was changed")
            will_run.add(name)

    def _skip(self, name: str, detail: str) -> StageOutcome:
        self.console.print(f"[green]✓[/] stage {name}: done ({detail}), skipped")
        self._print_evaluation(name)
        info = self.layout.stage(name).read_record() or {}
        return StageOutcome(name, self.recipe["stages"][name]["type"], "skipped", info)

    def _run_stage(self, name: str, forced: bool, env: _StageEnv) -> StageOutcome:
        """Skip, start over, resume or start stage ``name`` (its inputs must be done)."""
        from llmlab.stages import stage_class
        from llmlab.stages.base import StageContext

        cfg = self.recipe["stages"][name]
        stage_dir = self.layout.stage(name).dir
        status, detail = self.plan.status(name)
        if status == "done" and not forced:
            return self._skip(name, detail)
        if env.accelerator.is_main_process:  # before anything is deleted or trained
            from llmlab.ownership import check_replaceable

            lay = self.layout.stage(name)
            for out in (lay.final, lay.adapter, lay.tmp("final"), lay.tmp("adapter")):
                check_replaceable(out)
        if status == "stale" or forced:
            why = "forced" if forced and status != "stale" else f"stale: {detail}"
            self.console.print(f"[yellow]↻[/] stage {name}: {why}; starting over")
            if env.accelerator.is_main_process:
                kept = remove_owned(stage_dir)
                if kept:
                    self.console.print(f"  kept {len(kept)} file(s) in {stage_dir} that llmlab did not write: "
                                       f"{', '.join(kept[:8])}", markup=False, highlight=False)
            env.accelerator.wait_for_everyone()
            status = "pending"
        inputs = self.plan.stage(name).inputs
        for role, dep in inputs.items():
            dep_status = self.plan.status(dep)[0] if dep is not None else "done"
            if dep_status != "done":
                raise RunError(f"stage {name} reads stage {dep} ({role}), which is {dep_status}; run it first")
        init_path, init_adapter = self._init_weights(cfg, inputs["from"])
        ctx = StageContext(recipe=self.recipe, name=name, config=cfg, stage_dir=stage_dir, tokenizer=env.tokenizer,
                           init_path=init_path, stage_paths={n: self.layout.stage(n).dir for n in self.order},
                           device=env.device, allow_code=self.allow_code, init_adapter=init_adapter)
        stage = stage_class(cfg["type"])(ctx)
        if not stage_spec(cfg["type"]).trains:
            return self._run_results_stage(stage, env)
        return self._run_training_stage(stage, status, detail, env)

    def _init_weights(self, cfg: dict, frm: str | None) -> tuple[Path | None, Path | None]:
        """(init_path, init_adapter) of a stage reading ``frm``: its final/, or — when ``frm`` kept
        its LoRA adapter unmerged and this stage has no ``lora`` — that adapter and its base."""
        if not frm or not stage_spec(cfg["type"]).trains:
            return None, None
        init_path = load_stage_output(self.layout.stage(frm).dir)
        if not cfg.get("lora"):
            dep_info = self.layout.stage(frm).read_record() or {}
            if (dep_info.get("outputs") or {}).get("adapter") and dep_info.get("init_path"):
                return self.layout.locate(dep_info["init_path"]), self.layout.locate(dep_info["outputs"]["adapter"])
        return init_path, None

    def _run_training_stage(self, stage, status: str, detail: str, env: _StageEnv) -> StageOutcome:
        """Train ``stage`` (resuming or extending it), then write final/ and stage.json (main process)."""
        import torch

        from llmlab.train.loop import train

        ctx, cfg, name = stage.ctx, stage.config, stage.ctx.name
        layout = self.layout.stage(name)
        action = {"partial": "resumed", "extend": "extended"}.get(status, "ran")
        if action != "ran":
            self.console.print(f"[cyan]→[/] stage {name}: {status} ({detail}); continuing")
        else:
            self.console.print(f"[bold]▶[/] stage {name} ({cfg['type']})")
        main = env.accelerator.is_main_process
        if main:
            make_dir(layout.dir, "stage")
        previous = layout.read_record() or {}
        record = StageRecord(
            name=name, type=cfg["type"], status="running", fingerprint=self.fps[name]["fingerprint"],
            parts=self.fps[name]["parts"], max_steps=int(cfg["max_steps"]),
            started_at=previous.get("started_at") or _now(), tokenizer_sha256=env.tok_sha,
            init_path=self.layout.portable(ctx.init_path), init_adapter=self.layout.portable(ctx.init_adapter),
            device=env.device.type, precision=self.precision, threads=self.threads, distributed=self.distributed,
            versions=dict(package_versions()),
            absent=_FINISH_FIELDS | {"models"})
        extended_from = list(previous.get("extended_from") or [])
        if status == "extend":  # record it: an extended stage differs from a fresh run of its length
            extended_from.append(int(previous["max_steps"]))
        record.extended_from = extended_from or None
        record.absent = record.absent | (set() if extended_from else {"extended_from"})
        if main:
            record.write(layout.record)
            self._warn_memory(name, env)
        env.accelerator.wait_for_everyone()
        with self._progress() as progress:
            model, result = train(stage, fingerprint=self.fps[name]["fingerprint"], accelerator=env.accelerator,
                                  reset_optimizer=env.reset_optimizer, progress=progress if main else None)
        if main and result.stopped:  # max_time: partial, resumable; no final/
            self._record_stopped(record, result, previous, layout)
            action = "stopped"
        elif main:
            model = stage.finalize(model)  # e.g. PPO detaches and saves its value head
            written = save_final(model, env.tokenizer, layout.dir, cfg, keep_adapter=ctx.init_adapter is not None)
            summary = _metrics_summary(layout.metrics)
            record.finish(finished_at=_now(), steps=result.steps, flops=result.flops or None,
                          wall_time_s=round(result.wall_time_s, 2) + float(previous.get("wall_time_s") or 0.0),
                          tokens=result.tokens, resumed_from=result.resumed_from,
                          first_loss=summary.get("first_loss"), last_loss=summary.get("last_loss"),
                          first_eval=summary.get("first_eval"), last_eval=summary.get("last_eval"),
                          final_metrics=result.final_metrics,
                          outputs={k: self.layout.portable(v) for k, v in written.items()},
                          **({"early_stopping": result.early_stopping} if result.early_stopping else {}))
            record.write(layout.record)
            if result.early_stopping:
                es = result.early_stopping
                best = ("no finite eval_loss: final/ holds the last step" if es["best_step"] is None else
                        f"final/ holds step {es['best_step']} (eval_loss {es['best_eval_loss']:.4f})")
                self.console.print(f"[cyan]■[/] stage {name}: early stopping at step {es['stopped_at']} of "
                                   f"{cfg['max_steps']} (eval_loss did not improve by more than {es['min_delta']:g} "
                                   f"in {es['patience']} evaluations); {best}", highlight=False)
        env.accelerator.wait_for_everyone()
        del model
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
        return StageOutcome(name, cfg["type"], "stopped" if result.stopped else action, record.to_json())

    def _record_stopped(self, record: StageRecord, result, previous: dict, layout) -> None:
        """stage.json of a stage that ``max_time`` stopped: status ``stopped`` (plan and run read it
        as partial), the steps done and the time and FLOPs so far; say how to continue."""
        summary = _metrics_summary(layout.metrics)
        record.finish(status="stopped", steps=result.steps, tokens=result.tokens, resumed_from=result.resumed_from,
                      wall_time_s=round(result.wall_time_s, 2) + float(previous.get("wall_time_s") or 0.0),
                      first_loss=summary.get("first_loss"), last_loss=summary.get("last_loss"),
                      first_eval=summary.get("first_eval"), last_eval=summary.get("last_eval"),
                      flops=result.flops or None)
        record.write(layout.record)
        self.console.print(f"[yellow]■[/] stage {record.name}: max_time reached after step {result.steps} of "
                           f"{record.max_steps}; checkpoint saved. Run the same command to continue it "
                           "(later stages wait for it).")

    def _refuse_unfittable(self, todo: list[str], device) -> None:
        """Refuse the run before anything is built or trained when a stage to run is planned to need
        far more memory than the device has in all (:func:`llmlab.plan.unfittable_message`).

        Raises:
            RunError: naming the stage and its estimate.
        """
        from llmlab.config import DistributedConfig
        from llmlab.plan import default_world_size, unfittable_message
        from llmlab.train.fsdp import shard_ways

        world = default_world_size()  # $WORLD_SIZE: the process group does not exist yet
        message = unfittable_message(self.recipe, todo, device.type,
                                     shards=shard_ways(DistributedConfig.from_dict(self.recipe.get("distributed")),
                                                       world),
                                     processes_here=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        if message:
            raise RunError(message)

    def _warn_memory(self, name: str, env: _StageEnv) -> None:
        """Warn when the stage's planned peak memory is more than the device has free
        (:func:`llmlab.runguard.memory_shortfall`); a warning, not an error: it is an estimate."""
        from llmlab.plan import model_params, stage_memory, vocab_size_for

        if not self.recipe["model"].get("arch"):  # from_pretrained: plan has no estimate for it
            return
        world = int(self.distributed["world_size"])
        vocab = vocab_size_for(self.recipe)
        _, parts = stage_memory(self.recipe, name, model_params(self.recipe, vocab), vocab,
                                shards=world if self.distributed["strategy"] == "FSDP" else 1, device=env.device.type)
        here = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        message = memory_shortfall(name, parts, env.device, processes_here=here)
        if message:
            self.console.print(f"warning: {message}", style="yellow", markup=False, highlight=False)

    def _run_results_stage(self, stage, env: _StageEnv) -> StageOutcome:
        """Run a stage that trains nothing (evaluate; main process only): its results, stage.json, the
        comparison table."""
        from llmlab.stages.evaluate import comparison_table

        cfg, name = stage.config, stage.ctx.name
        layout = self.layout.stage(name)
        self.console.print(f"[bold]▶[/] stage {name} ({cfg['type']}: {', '.join(cfg['models'])})")
        record = StageRecord(name=name, type=cfg["type"], status="running", fingerprint=self.fps[name]["fingerprint"],
                             parts=self.fps[name]["parts"], started_at=_now(), tokenizer_sha256=env.tok_sha,
                             models=list(cfg["models"]), versions=dict(package_versions()),
                             absent=_TRAINING_FIELDS | _FINISH_FIELDS)
        if env.accelerator.is_main_process:
            make_dir(layout.dir, "stage")
            record.write(layout.record)
            t0 = time.perf_counter()
            results = stage.run()
            self.console.print(comparison_table(results, title=f"{name}: evaluation"))
            record.finish(finished_at=_now(), wall_time_s=round(time.perf_counter() - t0, 2),
                          outputs={"results": self.layout.portable(layout.results)})
            record.write(layout.record)
        env.accelerator.wait_for_everyone()
        return StageOutcome(name, cfg["type"], "ran", record.to_json())

    def _print_evaluation(self, name: str) -> None:
        """A skipped evaluate stage still shows its comparison table (from results.json)."""
        if stage_spec(self.recipe["stages"][name]["type"]).trains:
            return
        from llmlab.stages.evaluate import comparison_table

        try:
            results = json.loads(self.layout.stage(name).results.read_text())
        except (OSError, ValueError):
            return
        self.console.print(comparison_table(results, title=f"{name}: evaluation"))

    def _device(self):
        import torch

        want = self.recipe.get("device", "auto")
        if want == "cuda" and not torch.cuda.is_available():
            raise RunError("device: cuda, but no CUDA device is available")
        if want == "cpu" or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda")

    def _accelerator(self, device):
        import torch
        from accelerate import Accelerator

        precision = resolve_precision(self.recipe.get("precision", "auto"), device)
        self.precision = precision  # recorded in each stage.json: auto differs between machines
        mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
        try:
            return Accelerator(cpu=device.type == "cpu", mixed_precision=mp)
        except ValueError:
            # accelerate keeps one global state per process; a second run in the same process (tests, a
            # notebook) with another precision must reset it. Never under torchrun, where the state
            # holds the process group.
            from accelerate.state import AcceleratorState, PartialState

            if PartialState().num_processes > 1:
                raise
            AcceleratorState._reset_state(reset_partial_state=True)
            return Accelerator(cpu=device.type == "cpu", mixed_precision=mp)

    def _progress(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:>8,.0f} tok/s"),
                        TextColumn("{task.fields[mfu]}"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        console=self.console, transient=False)


#: eval metrics worth a glance in the summary table, per stage type (the first found are shown)
KEY_METRICS = (("eval_rewards/accuracies", "acc"), ("eval_rewards/margins", "margin"),
               ("eval_preference_loss", "pref loss"), ("eval_nll_loss", "nll"), ("eval_accuracy", "acc"),
               ("eval_margin", "margin"), ("eval_exact_answer", "exact"), ("eval_reward", "reward"))


def key_metrics(last_eval: dict, first_eval: dict | None = None) -> str:
    """e.g. ``acc 0.62, margin 0.48`` from a stage's last eval record, or ``acc 0.50 → 0.62, …``
    with the stage's first eval record (step 0: the model the stage started from)."""
    first = first_eval or {}

    def one(k: str, label: str) -> str:
        was = f"{first[k]:.3f} → " if k in first and first is not last_eval else ""
        return f"{label} {was}{last_eval[k]:.3f}"
    return ", ".join(one(k, label) for k, label in KEY_METRICS if k in last_eval) or "-"


def coverage_note(last_eval: dict) -> str:
    """`` (80/123 ex.)`` when a stage's eval_loss covers only part of its held-out set (eval_steps ×
    batch_size examples, evenly spaced; docs/evaluation.md), else empty."""
    n, total = last_eval.get("eval_examples"), last_eval.get("eval_heldout_examples")
    return f" ({n}/{total} ex.)" if n is not None and total is not None and n < total else ""


def mfu_cell(flops: dict | None) -> str:
    """The summary's MFU cell from stage.json's ``flops``: ``"12.3 % (0.45 TFLOP/s)"``, or ``-``."""
    if not flops or flops.get("mfu") is None:
        return "-"
    return f"{flops['mfu']:.1%} ({flops['tflops']:.3g} TFLOP/s)"


def summary_table(outcomes: list[StageOutcome], out_dir: Path) -> Table:
    """The final table: stage, action, steps, first and last loss, eval loss (the held-out loss of
    docs/evaluation.md; with the share of the held-out set it covers when not all), wall time, MFU
    (over this run of the stage, evaluations and checkpoints included), output."""
    t = Table(title=f"llmlab run → {out_dir}")
    for col in ("stage", "type", "action", "steps", "loss first → last", "eval loss first → last", "eval metrics",
                "wall time", "MFU", "output"):
        t.add_column(col)

    def f(x):
        return "-" if x is None else f"{x:.4f}"

    for o in outcomes:
        i = o.info
        fe, le = (i.get("first_eval") or {}).get("eval_loss"), (i.get("last_eval") or {}).get("eval_loss")
        t.add_row(o.name, o.type, o.action, str(i.get("steps", "-")), f"{f(i.get('first_loss'))} → {f(i.get('last_loss'))}",
                  f"{f(fe)} → {f(le)}{coverage_note(i.get('last_eval') or {})}", key_metrics(i.get("last_eval") or {}, i.get("first_eval")), f"{i.get('wall_time_s', 0):.1f} s",
                  mfu_cell(i.get("flops")),
                  str((i.get("outputs") or {}).get("final") or (i.get("outputs") or {}).get("results") or "-"))
    return t


def quiet_libraries() -> None:
    """Silence the libraries' own progress bars; llmlab draws one bar per stage."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _write_error_log(out: Path) -> Path:
    """Write the current exception's traceback to ``out/error.log``, or to a temporary file when
    ``out`` cannot be written (the failure may be that very directory); returns where it went."""
    import tempfile
    import traceback

    text = mask_secrets(traceback.format_exc())
    try:
        out.mkdir(parents=True, exist_ok=True)
        RunLayout(out).error_log.write_text(text)
        return RunLayout(out).error_log
    except OSError:
        fd, name = tempfile.mkstemp(prefix="llmlab-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return Path(name)


def run_command(recipe_path: Path, output_dir: Path | None = None, overrides=(), only=None, from_stage=None,
                until=None, force=False, reset_optimizer=False, allow_code=False, adopt=False) -> int:
    """``llmlab run``: returns the exit status (0 ok, 1 invalid recipe, failed stage or an
    ``output_dir`` that holds files llmlab did not write and ``adopt`` is not set; 130 interrupted).
    Error messages and ``error.log`` have secrets masked (:mod:`llmlab.secrets`)."""
    from llmlab.recipe import load_recipe

    rank = process_rank()
    # under torchrun / accelerate launch only rank 0 reports; every rank reports its own failure
    console = make_console(quiet=rank != 0)
    alarm = make_console() if rank != 0 else console
    prefix = f"[rank {rank}] " if rank != 0 else ""
    t0 = time.perf_counter()
    warnings: list = []
    resolved, errors = load_recipe(recipe_path, list(overrides), allow_code=bool(allow_code), warnings=warnings)
    for w in warnings:  # e.g. a warm-up that outlasts max_steps
        console.print(str(w), style="yellow", markup=False, highlight=False)
    if errors:
        for e in errors:
            console.print(str(e), markup=False, highlight=False)
        console.print(f"{len(errors)} error(s); nothing was run", style="red")
        return 1
    if output_dir is not None:
        resolved["output_dir"] = str(Path(output_dir).resolve())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    runner = Runner(resolved, console, allow_code=allow_code)
    from llmlab.train.loop import TrainingError

    try:
        check_run_dir(runner.out, runner.order, adopt)  # before the lock file: refuse a user's folder untouched
        with run_lock(runner.out, announce=lambda msg: console.print(msg, style="yellow")):
            outcomes = runner.run(only=only, from_stage=from_stage, until=until, force=force,
                                  reset_optimizer=reset_optimizer, adopt=adopt)
    except RunLockedError as e:  # before the generic handler: never write error.log into another run's dir
        alarm.print(mask_secrets(f"{prefix}error: {e}"), style="red", markup=False, highlight=False)
        return 1
    except (RunError, TrainingError, NotOwnedError, ValueError) as e:
        alarm.print(mask_secrets(f"{prefix}error: {e}"), style="red", markup=False, highlight=False)
        return 1
    except OSError as e:  # read-only mount, full disk, output_dir that is a file, missing file ...
        what = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
        alarm.print(mask_secrets(f"{prefix}error: {what}; finished stages and checkpoints are kept"), style="red",
                    markup=False, highlight=False)
        return 1
    except Exception as e:  # anything else: say what and where, keep the traceback for a bug report
        log_path = _write_error_log(runner.out)
        alarm.print(mask_secrets(f"{prefix}error: {type(e).__name__}: {e}\n(traceback in {log_path}; finished "
                                 "stages and checkpoints are kept)"), style="red", markup=False, highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print("interrupted; finished stages and checkpoints are kept. Run the same command to resume.",
                      style="yellow")
        return 130
    console.print(summary_table(outcomes, runner.out))
    console.print(f"total {time.perf_counter() - t0:.1f} s")
    return 0
