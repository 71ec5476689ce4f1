"""The model commands: ``chat``, ``generate``, ``eval`` and ``serve``. Each typer command calls a plain
function returning the exit code (``chat_command``, ...), which parses and checks the options, loads
the model and prints; generation, evaluation and serving live in :mod:`llmlab.inference`. Nothing
heavy is imported at import time.

Exit status: 0 success, 1 the model or data could not be loaded / the run failed, 2 bad arguments.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import typer


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def _load(path: Path, stage: str | None, allow_code: bool, device: str | None, chat: bool | None,
          quiet: bool = False):
    """(model, tokenizer, is_chat, location) or None after printing the error."""
    _quiet_transformers()
    from llmlab.inference.loading import ModelLoadError, load_for_inference, locate_model

    try:
        loc = locate_model(path, stage)
        model, tok, is_chat = load_for_inference(loc, allow_code=allow_code, device=device)
    except (ModelLoadError, OSError, ValueError) as e:
        _err(str(e))
        return None
    if chat is not None:
        is_chat = chat
    if not quiet:
        for n in loc.notes:
            _info(n)
        _info(f"Loaded {loc.describe()} — {'chat' if is_chat else 'base (plain continuation)'} model")
    return model, tok, is_chat, loc


def _settings(temperature, top_k, top_p, max_new_tokens, repetition_penalty, seed):
    from llmlab.inference.generation import GenerationSettings

    return GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed)


def _check_sampling(temperature, top_k, top_p, max_new_tokens, repetition_penalty) -> bool:
    """Whether the sampling options are in range (the HTTP API's ranges, :mod:`llmlab.inference.limits`);
    prints each problem."""
    from llmlab.inference.limits import GREEDY_BELOW, REPETITION_PENALTY_RANGE, TEMPERATURE_RANGE

    problems = []
    lo, hi = TEMPERATURE_RANGE
    if not lo <= temperature <= hi:
        problems.append(f"--temperature must be in [{lo:g}, {hi:g}] (below {GREEDY_BELOW:g} = greedy)")
    if top_k < 0:
        problems.append("--top-k must be >= 0 (0 = off)")
    if not 0 < top_p <= 1:
        problems.append("--top-p must be in (0, 1]")
    if max_new_tokens is not None and max_new_tokens < 1:
        problems.append("--max-new-tokens must be >= 1")
    lo, hi = REPETITION_PENALTY_RANGE
    if not lo <= repetition_penalty <= hi:
        problems.append(f"--repetition-penalty must be in [{lo:g}, {hi:g}]")
    for p in problems:
        _err(p)
    return not problems


# -- chat ------------------------------------------------------------------------------------------
def chat_command(path: Path, stage: str | None = None, temperature: float = 0.8, top_k: int = 50,
                 top_p: float = 0.95, max_new_tokens: int | None = None, repetition_penalty: float = 1.0,
                 seed: int | None = None, system: str | None = None, chat: bool | None = None,
                 allow_code: bool = False, device: str | None = None) -> int:
    """Interactive chat in the terminal; returns the exit code."""
    if not _check_sampling(temperature, top_k, top_p, max_new_tokens, repetition_penalty):
        return 2
    loaded = _load(path, stage, allow_code, device, chat)
    if loaded is None:
        return 1
    model, tok, is_chat, _ = loaded
    from llmlab.inference.chat import run_chat

    settings = _settings(temperature, top_k, top_p, max_new_tokens, repetition_penalty, seed)
    return run_chat(model, tok, is_chat, settings, system=system)


# -- generate --------------------------------------------------------------------------------------
def generate_command(path: Path, prompt: str | None = None, prompts: Path | None = None,
                     output: Path | None = None, stage: str | None = None, seed: int = 0,
                     temperature: float = 0.8, top_k: int = 50, top_p: float = 0.95, max_new_tokens: int | None = None,
                     repetition_penalty: float = 1.0, system: str | None = None, chat: bool | None = None,
                     jsonl: bool = False, allow_code: bool = False, device: str | None = None) -> int:
    """Generate completions for one prompt or a file of prompts; returns the exit code.

    Prompt ``i`` is sampled with seed ``seed + i``, so the output depends only on the model, the prompt,
    its position and the settings. Results go to ``output`` as jsonl (one object per prompt), else to
    stdout: the bare completion for a single ``--prompt``, else one block per prompt (or jsonl with
    ``jsonl=True``).
    """
    if (prompt is None) == (prompts is None):
        _err("give exactly one of --prompt TEXT or --prompts FILE")
        return 2
    if not _check_sampling(temperature, top_k, top_p, max_new_tokens, repetition_penalty):
        return 2
    if prompts is not None:
        try:
            from llmlab.inference.prompts import read_prompts

            items = read_prompts(Path(prompts))
        except (OSError, ValueError) as e:
            _err(str(e))
            return 1
        if not items:
            _err(f"{prompts}: no prompts")
            return 1
    else:
        items = [prompt]
    loaded = _load(path, stage, allow_code, device, chat)
    if loaded is None:
        return 1
    model, tok, is_chat, _ = loaded
    from llmlab.inference.generation import PromptTooLongError, generate_text

    settings = _settings(temperature, top_k, top_p, max_new_tokens, repetition_penalty, seed)
    with open(output, "w", encoding="utf-8") if output else contextlib.nullcontext() as fh:
        for i, p in enumerate(items):
            try:
                r = generate_text(model, tok, p, settings.replace(seed=seed + i), is_chat, system=system)
            except PromptTooLongError as e:
                _err(f"prompt {i}: {e}")
                return 1
            if r.note:
                _info(f"prompt {i}: {r.note}")
            row = {"index": i, "prompt": p, "completion": r.text, "finish_reason": r.finish_reason,
                   "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens, "seed": seed + i}
            if fh:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                fh.flush()
            elif jsonl:
                print(json.dumps(row, ensure_ascii=False), flush=True)
            elif prompt is not None:
                print(r.text, flush=True)
            else:
                shown = p if isinstance(p, str) else json.dumps(p, ensure_ascii=False)
                print(f"### [{i}] {shown}\n{r.text}\n", flush=True)
    if output:
        _info(f"Wrote {len(items)} completion(s) to {output}")
    return 0


# -- eval ------------------------------------------------------------------------------------------
def _print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"eval: {report.get('model')} on {report.get('dataset')}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in report.items():
        if k in ("model", "dataset", "samples", "lm_eval"):
            continue
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console = Console()
    console.print(table)
    for s in report.get("samples", [])[:8]:
        last = s["prompt"][-1]["content"] if s["prompt"] else ""
        extra = f"  (reward {s['reward']:.3f})" if "reward" in s else ""
        console.print(f"[bold]> {last}[/bold]\n{s['completion']}{extra}", markup=True, highlight=False)



class _Exit(Exception):
    """An early end of a command with its exit code (the reason was printed)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _eval_rows(path: Path, stage: str | None, dataset: str, limit: int | None, kind: str | None,
               split: str | None) -> tuple[dict, str, list]:
    """(the run's recipe ({} without a run), the rows' kind, the rows) of ``llmlab eval --dataset``:
    a named dataset is capped at 200 evenly spaced rows unless ``limit`` says otherwise.

    Raises:
        _Exit: 1 after printing why the model's run or the data could not be read.
    """
    from llmlab.inference.datasets import DatasetError, load_eval_rows
    from llmlab.inference.loading import ModelLoadError, locate_model, read_run_recipe
    from llmlab.schemafile import top_level

    try:
        recipe = read_run_recipe(locate_model(path, stage).run_dir)
    except ModelLoadError as e:
        _err(str(e))
        raise _Exit(1) from None
    named = not Path(dataset).exists()
    try:
        found_kind, rows = load_eval_rows(dataset, limit=limit if limit is not None else (200 if named else None),
                                          kind=kind, split=split, recipe=recipe,
                                          seed=int(top_level(recipe, "seed") or 0))
    except DatasetError as e:
        _err(str(e))
        raise _Exit(1) from None
    return recipe, found_kind, rows


def _eval_models(report: dict, loc, tok, found_kind: str, recipe: dict, reference: Path | None,
                 reference_stage: str | None, reward_model: Path | None, beta: float | None, allow_code: bool,
                 device: str | None) -> tuple[float, dict, Any, Any]:
    """(beta, the loss keyword arguments, the reference model or None, (reward model, tokenizer,
    is_chat) or None) for evaluating the model of ``loc``: a dpo, orpo or kto stage's model takes its
    stage's settings and reference (:func:`llmlab.inference.stage_eval.stage_loss_settings`) unless
    the options say otherwise. Adds ``reference`` / ``reward_model`` to ``report``.

    Raises:
        _Exit: 2 for --reference on data that is not preferences, 1 when a model cannot be loaded
            or the reference's tokenizer differs.
    """
    from llmlab.inference.stage_eval import DEFAULT_BETA, stage_loss_settings

    ref = rm = None
    dpo = stage_loss_settings(recipe, loc) if found_kind == "preference" else None
    if dpo is not None:
        beta = dpo["beta"] if beta is None else beta
        if reference is None and dpo["reference"] is not None:
            reference, reference_stage = loc.run_dir, dpo["reference"]
            _info(f"reference: stage {reference_stage} (the reference of stage {loc.stage_name}; "
                  "--reference overrides)")
    beta = DEFAULT_BETA if beta is None else beta
    if reference is not None:
        if found_kind != "preference":
            _err("--reference only applies to preference data")
            raise _Exit(2)
        got = _load(reference, reference_stage, allow_code, device, None)
        if got is None:
            raise _Exit(1)
        ref, ref_tok = got[0], got[1]
        if ref_tok.get_vocab() != tok.get_vocab():
            _err("the reference model's tokenizer differs from the policy's; implicit rewards need the same one")
            raise _Exit(1)
        report["reference"] = str(got[3].adapter_dir or got[3].model_dir)
    if reward_model is not None:
        got = _load(reward_model, None, allow_code, device, None)
        if got is None:
            raise _Exit(1)
        rm = (got[0], got[1], got[2])
        report["reward_model"] = str(got[3].model_dir)
    return beta, (dpo["loss"] if dpo else {}), ref, rm


def _check_eval_options(dataset: str | None, kind: str | None, tasks: list[str] | None) -> None:
    """Raises _Exit (2: a bad option; 1: --tasks without lm-eval installed) after printing why."""
    if dataset is None and not tasks:
        _err("give --dataset SPEC (a .jsonl/.txt file or kjv, chatterbot, chatterbot_pairs) and/or --tasks")
        raise _Exit(2)
    if kind is not None and kind not in ("text", "conversation", "preference", "prompt"):
        _err(f"--kind must be text, conversation, preference or prompt, not {kind!r}")
        raise _Exit(2)
    if tasks:
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            _err("--tasks needs lm-evaluation-harness: pip install 'llmlab[eval]' (or lm-eval)")
            raise _Exit(1)


def eval_command(path: Path, dataset: str | None = None, output: Path | None = None,
                 stage: str | None = None, reference: Path | None = None, reference_stage: str | None = None,
                 reward_model: Path | None = None, beta: float | None = None, kind: str | None = None,
                 limit: int | None = None, batch_size: int = 8, max_length: int | None = None,
                 num_samples: int = 8, seed: int = 0, max_new_tokens: int = 64, temperature: float = 0.8,
                 chat: bool | None = None, tasks: list[str] | None = None, split: str | None = None,
                 allow_code: bool = False, device: str | None = None) -> int:
    """Evaluate a model on a dataset (and/or lm-eval tasks); print a table, write JSON to ``output``.

    ``dataset`` is a file, a dataset name of the run's recipe (held-out rows unless ``split`` says
    otherwise) or a builtin (see :mod:`llmlab.inference.datasets`). Named datasets are capped at 200
    evenly spaced rows unless ``limit`` says otherwise. For a dpo, orpo or kto stage's model on preference
    data, ``beta``, the loss settings and (unless ``reference`` is given) the reference model are the
    stage's, so the report's ``loss`` is the stage's held-out ``eval_loss`` (:func:`_eval_models`); a
    reward stage's model reports the reward stage's ``loss`` and ``reward_accuracy`` (its ``eval_accuracy``).
    """
    try:
        _check_eval_options(dataset, kind, tasks)
        recipe, found_kind, rows = _eval_rows(path, stage, dataset, limit, kind, split) if dataset is not None \
            else ({}, None, [])
        loaded = _load(path, stage, allow_code, device, chat)
        if loaded is None:
            return 1
        model, tok, is_chat, loc = loaded
        report: dict[str, Any] = {"model": str(loc.adapter_dir or loc.model_dir), "stage": loc.stage_name,
                                  "dataset": dataset}
        if dataset is not None:
            from llmlab.inference.evaluate import evaluate_model
            from llmlab.inference.generation import GenerationSettings

            beta, loss, ref, rm = _eval_models(report, loc, tok, found_kind, recipe, reference, reference_stage,
                                               reward_model, beta, allow_code, device)
            settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
            try:
                report.update(evaluate_model(model, tok, rows, found_kind, is_chat=is_chat, reference=ref,
                                             reward_model=rm, beta=beta, batch_size=batch_size,
                                             max_length=max_length, settings=settings, num_samples=num_samples,
                                             **loss))
            except ValueError as e:
                _err(str(e))
                return 1
    except _Exit as e:
        return e.code
    if report.get("truncated"):
        _info(f"note: {report['truncated']} row(s) were longer than the length limit (--max-length, default the "
              "model's context) and were cut from the left, scored without their oldest tokens "
              "('truncated' in the report)")
    if tasks:
        from llmlab.inference.stage_eval import run_lm_eval

        report["lm_eval"] = run_lm_eval(model, tok, list(tasks), batch_size=batch_size, limit=limit)
    _print_report(report)
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        _info(f"Wrote {output}")
    return 0


# -- serve -----------------------------------------------------------------------------------------
def serve_command(path: Path, stage: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                  model_id: str | None = None, temperature: float = 0.8, top_k: int = 50, top_p: float = 0.95,
                  max_new_tokens: int | None = None, repetition_penalty: float = 1.0, seed: int | None = None,
                  system: str | None = None, chat: bool | None = None, allow_code: bool = False,
                  device: str | None = None, verbose: bool = False, max_batch: int = 8, timeout: float = 30.0,
                  max_connections: int = 64) -> int:
    """Serve the model over HTTP until Ctrl+C (or SIGTERM); returns the exit code.

    Port 0 picks a free port; the first line on stdout is ``Serving <model> on http://HOST:PORT``.
    ``max_batch``, ``timeout`` and ``max_connections`` are :class:`InferenceServer`'s.
    """
    if max_batch < 1 or timeout <= 0 or max_connections < 1:
        _err("--max-batch and --max-connections must be >= 1, --timeout > 0")
        return 2
    if not _check_sampling(temperature, top_k, top_p, max_new_tokens, repetition_penalty):
        return 2
    loaded = _load(path, stage, allow_code, device, chat)
    if loaded is None:
        return 1
    model, tok, is_chat, loc = loaded
    import signal

    from llmlab.inference.server import InferenceServer, is_loopback

    if not is_loopback(host):
        _info(f"warning: listening on {host}: anyone who can reach this machine can use the model")
    name = model_id or (loc.stage_name or Path(loc.model_dir).name)
    try:
        server = InferenceServer(model, tok, is_chat, host=host, port=port, model_id=name,
                                 defaults=_settings(temperature, top_k, top_p, max_new_tokens, repetition_penalty, seed),
                                 system=system, verbose=verbose, max_batch=max_batch, timeout=timeout,
                                 max_connections=max_connections)
    except OSError as e:
        _err(f"cannot listen on {host}:{port}: {e}")
        return 1

    def _term(signum, frame):  # SIGTERM ends like Ctrl+C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    print(f"Serving {name} on {server.url} (POST /v1/chat/completions, POST /generate, GET /v1/models)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    _info("Stopped.")
    return 0


# -- the typer commands ----------------------------------------------------------------------------
PATH_HELP = "A stage's final/ or adapter/ directory, a stage directory, or a run directory (with --stage)."
STAGE_HELP = "Stage to load when PATH is a run directory (default: the last finished stage)."
CHAT_HELP = "Force chat-template (--chat) or plain-continuation (--plain) mode; default: detected."
DEVICE_HELP = "Device: cpu, cuda, cuda:1 ... (default: cuda when available)."
MAX_NEW_HELP = ("longest reply, in tokens (default: 256, or a quarter of a smaller context); capped, "
                "with a note, to what the context leaves after the prompt.")


def chat(
    path: Path = typer.Argument(..., help=PATH_HELP),
    stage: str | None = typer.Option(None, "--stage", help=STAGE_HELP),
    temperature: float = typer.Option(0.8, "--temperature", help="Sampling temperature; 0 = greedy."),
    top_k: int = typer.Option(50, "--top-k", help="Sample from the k most likely tokens; 0 = off."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling mass; 1 = off."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help=MAX_NEW_HELP),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeats."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for reproducible replies."),
    system: str | None = typer.Option(None, "--system", help="System prompt (chat models)."),
    chat_mode: bool | None = typer.Option(None, "--chat/--plain", help=CHAT_HELP),
    allow_code: bool = typer.Option(False, "--allow-code", help="Allow trust_remote_code checkpoints."),
    device: str | None = typer.Option(None, "--device", help=DEVICE_HELP),
):
    """Talk to a model in the terminal; replies stream as they are generated.

    Chat models (fine-tuned, with a ChatML template) keep the conversation, dropping its oldest whole
    turns when it outgrows the context; base models continue each line as plain text. Type /reset to clear the conversation, /exit or Ctrl+C to quit.
    """
    raise typer.Exit(chat_command(path, stage=stage, temperature=temperature, top_k=top_k, top_p=top_p,
                                  max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                                  seed=seed, system=system, chat=chat_mode, allow_code=allow_code,
                                  device=device))


def generate(
    path: Path = typer.Argument(..., help=PATH_HELP),
    prompt: str | None = typer.Option(None, "--prompt", help="One prompt."),
    prompts: Path | None = typer.Option(None, "--prompts", help="A file of prompts: .jsonl rows with "
                                           "'prompt' (text or messages), or one prompt per line."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write jsonl here instead of stdout."),
    stage: str | None = typer.Option(None, "--stage", help=STAGE_HELP),
    seed: int = typer.Option(0, "--seed", help="Prompt i is sampled with seed + i: same seed, same output."),
    temperature: float = typer.Option(0.8, "--temperature", help="Sampling temperature; 0 = greedy."),
    top_k: int = typer.Option(50, "--top-k", help="Sample from the k most likely tokens; 0 = off."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling mass; 1 = off."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help=MAX_NEW_HELP),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeats."),
    system: str | None = typer.Option(None, "--system", help="System prompt (chat models)."),
    chat_mode: bool | None = typer.Option(None, "--chat/--plain", help=CHAT_HELP),
    jsonl: bool = typer.Option(False, "--jsonl", help="Print jsonl to stdout instead of text."),
    allow_code: bool = typer.Option(False, "--allow-code", help="Allow trust_remote_code checkpoints."),
    device: str | None = typer.Option(None, "--device", help=DEVICE_HELP),
):
    """Generate completions for a prompt or a file of prompts, deterministically for a given seed."""
    raise typer.Exit(generate_command(path, prompt=prompt, prompts=prompts, output=output, stage=stage,
                                      seed=seed, temperature=temperature, top_k=top_k, top_p=top_p,
                                      max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                                      system=system, chat=chat_mode, jsonl=jsonl, allow_code=allow_code,
                                      device=device))


def eval_(
    path: Path = typer.Argument(..., help=PATH_HELP),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="A .jsonl/.json/.txt file, a "
                                          "dataset of the run's recipe (its held-out rows), or a builtin: "
                                          "kjv (text), chatterbot (conversations), chatterbot_pairs "
                                          "(preferences), chatterbot_prompts (prompts)."),
    split: str | None = typer.Option(None, "--split", help="all, train or eval (default: eval for a "
                                        "recipe dataset, all for a builtin)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the JSON report here."),
    stage: str | None = typer.Option(None, "--stage", help=STAGE_HELP),
    reference: Path | None = typer.Option(None, "--reference", help="Reference model for DPO implicit "
                                             "rewards on preference data (default for a dpo stage's model: "
                                             "the stage's reference, its reference_from or from stage)."),
    reference_stage: str | None = typer.Option(None, "--reference-stage", help="Stage of --reference "
                                                  "when it is a run directory."),
    reward_model: Path | None = typer.Option(None, "--reward-model", help="Reward model that scores "
                                                "sampled generations on prompt data."),
    beta: float | None = typer.Option(None, "--beta", help="DPO beta of the implicit reward (default: "
                                         "the dpo stage's beta for a dpo stage's model, else 0.1)."),
    kind: str | None = typer.Option(None, "--kind", help="Evaluate rows as: text, conversation, "
                                       "preference or prompt (default: from the data's format)."),
    limit: int | None = typer.Option(None, "--limit", help="At most this many rows, evenly spaced "
                                        "(builtins default to 200)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
    max_length: int | None = typer.Option(None, "--max-length", help="Longest sequence scored "
                                             "(default: the model's context)."),
    num_samples: int = typer.Option(8, "--num-samples", help="Prompts to sample generations for."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled generations."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Longest sampled generation."),
    temperature: float = typer.Option(0.8, "--temperature", help="Temperature of sampled generations."),
    chat_mode: bool | None = typer.Option(None, "--chat/--plain", help=CHAT_HELP),
    tasks: list[str] = typer.Option([], "--tasks", help="lm-evaluation-harness tasks (needs the "
                                    "optional lm-eval package and the tasks' data)."),
    allow_code: bool = typer.Option(False, "--allow-code", help="Allow trust_remote_code checkpoints."),
    device: str | None = typer.Option(None, "--device", help=DEVICE_HELP),
):
    """Measure a model: perplexity and bits per byte on text, preference accuracy and margin,
    or sampled generations on prompts. Prints a table; --output writes a JSON report."""
    raise typer.Exit(eval_command(path, dataset=dataset, output=output, stage=stage, reference=reference,
                                  reference_stage=reference_stage, reward_model=reward_model, beta=beta,
                                  kind=kind, limit=limit, batch_size=batch_size, max_length=max_length,
                                  num_samples=num_samples, seed=seed, max_new_tokens=max_new_tokens,
                                  temperature=temperature, chat=chat_mode, tasks=tasks or None,
                                  split=split, allow_code=allow_code, device=device))


def serve(
    path: Path = typer.Argument(..., help=PATH_HELP),
    stage: str | None = typer.Option(None, "--stage", help=STAGE_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback unless told "
                             "otherwise)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on; 0 picks a free one."),
    model_id: str | None = typer.Option(None, "--model-id", help="Model name reported by the API "
                                           "(default: the stage name)."),
    temperature: float = typer.Option(0.8, "--temperature", help="Default sampling temperature."),
    top_k: int = typer.Option(50, "--top-k", help="Default top-k; 0 = off."),
    top_p: float = typer.Option(0.95, "--top-p", help="Default nucleus mass; 1 = off."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Default " + MAX_NEW_HELP),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="Default repetition penalty."),
    seed: int | None = typer.Option(None, "--seed", help="Default seed when a request gives none."),
    system: str | None = typer.Option(None, "--system", help="System prompt added to chat requests "
                                         "that have none."),
    chat_mode: bool | None = typer.Option(None, "--chat/--plain", help=CHAT_HELP),
    allow_code: bool = typer.Option(False, "--allow-code", help="Allow trust_remote_code checkpoints."),
    device: str | None = typer.Option(None, "--device", help=DEVICE_HELP),
    verbose: bool = typer.Option(False, "--verbose", help="Log each request."),
    max_batch: int = typer.Option(8, "--max-batch", help="Most requests answered by one batched generate."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds a client has to send a whole request "
                                  "(headers and body)."),
    max_connections: int = typer.Option(64, "--max-connections", help="Connections served at once; "
                                        "more get 503."),
):
    """Serve a model over HTTP: POST /generate, OpenAI-compatible POST /v1/chat/completions
    (streaming too) and GET /v1/models."""
    raise typer.Exit(serve_command(path, stage=stage, host=host, port=port, model_id=model_id,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                                   seed=seed, system=system, chat=chat_mode, allow_code=allow_code,
                                   device=device, verbose=verbose, max_batch=max_batch, timeout=timeout,
                                   max_connections=max_connections))
