"""Find and load a trained model for inference.

Accepted paths (``stage`` picks the stage inside a run directory):

- a model directory (``<run>/<stage>/final/`` or any Hugging Face directory with ``config.json``);
- an adapter directory (``<run>/<stage>/adapter/``, with ``adapter_config.json``): the base model is
  ``base_model_name_or_path`` from the adapter config when that is a local model directory, else the
  final/ of the stage this one started from (``from:`` in the run's ``recipe.resolved.yaml``, or an
  ``init_path`` recorded in ``stage.json``). The adapter is merged into the base for inference;
- a stage directory (``<run>/<stage>/``): its final/, else its adapter/;
- a run directory (with ``recipe.resolved.yaml`` or stage subdirectories) plus ``stage``; without a
  stage, the last stage in recipe order that has a final/ or adapter/.

Weights load from safetensors only; ``allow_code`` is needed for ``trust_remote_code``. The hub is
never contacted for a path that is not a local directory.

Chat or plain continuation (``is_chat``): a model is a chat model when its tokenizer has a chat
template that llmlab trains with (ChatML: ``<|im_start|>``/``<|im_end|>`` are template text and
vocabulary tokens; or any template with ``{% generation %}`` markers, e.g. ``llama3``) *and* the model
was fine-tuned, i.e. the stage type known from ``stage.json`` (key ``type``) or
the run's recipe is not ``pretrain`` (every LoRA adapter counts as fine-tuned). For a directory with no
llmlab stage metadata (a foreign checkpoint), any chat template means a chat model, following the
Hugging Face convention that base checkpoints ship without one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHATML_START = "<|im_start|>"
CHATML_END = "<|im_end|>"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ModelLoadError(Exception):
    """A path that does not name a loadable model; the message says what was tried."""


@dataclass
class ModelLocation:
    """Where a model's pieces are, resolved from a user-given path.

    Attributes:
        model_dir: the HF model directory to load weights from (the base, for an adapter).
        adapter_dir: the PEFT adapter directory, or ``None``.
        tokenizer_dir: the directory to load the tokenizer from.
        stage_name: the llmlab stage the model came from, when known.
        stage_type: that stage's type (pretrain, sft, dpo, ...), when known.
        run_dir: the run directory, when the path is inside one.
        notes: human-readable lines on how the path was resolved.
    """

    model_dir: Path
    adapter_dir: Path | None = None
    tokenizer_dir: Path | None = None
    stage_name: str | None = None
    stage_type: str | None = None
    run_dir: Path | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line naming what will be loaded."""
        what = f"adapter {self.adapter_dir} on base {self.model_dir}" if self.adapter_dir else str(self.model_dir)
        if self.stage_name:
            what += f" (stage {self.stage_name}" + (f", type {self.stage_type})" if self.stage_type else ")")
        return what


def _is_model_dir(p: Path) -> bool:
    return (p / "config.json").is_file()


def _is_adapter_dir(p: Path) -> bool:
    return (p / "adapter_config.json").is_file()


def _has_tokenizer(p: Path | None) -> bool:
    return p is not None and any((p / f).is_file() for f in _TOKENIZER_FILES)


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def read_run_recipe(run_dir: Path | None) -> dict:
    """The run's ``recipe.resolved.yaml`` as a dict ({} when absent or unreadable)."""
    if run_dir is None:
        return {}
    f = run_dir / "recipe.resolved.yaml"
    if not f.is_file():
        return {}
    import yaml

    try:
        doc = yaml.safe_load(f.read_text())
    except yaml.YAMLError:
        return {}
    return doc if isinstance(doc, dict) else {}


def recipe_context(run_dir: Path | None, stage_name: str | None) -> int | None:
    """The context a run's model was trained for, from its ``recipe.resolved.yaml``: ``model.max_seq_len``
    (what :func:`llmlab.models.build.mamba2_config` now writes into a Mamba2's config.json), else the
    stage's ``seq_len``; None when neither is there (no run, or a recipe without them)."""
    rec = read_run_recipe(run_dir)
    model, stages = rec.get("model"), rec.get("stages")
    stage = stages.get(stage_name) if isinstance(stages, dict) else None
    for v in (model.get("max_seq_len") if isinstance(model, dict) else None,
              stage.get("seq_len") if isinstance(stage, dict) else None):
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _looks_like_run_dir(p: Path) -> bool:
    if (p / "recipe.resolved.yaml").is_file():
        return True
    return any((c / "final").is_dir() or (c / "adapter").is_dir() for c in p.iterdir() if c.is_dir())


def _stage_order(run_dir: Path) -> list[str]:
    stages = read_run_recipe(run_dir).get("stages")
    if isinstance(stages, dict):
        return list(stages)
    return sorted(c.name for c in run_dir.iterdir() if c.is_dir())


def _stage_type(run_dir: Path | None, stage_dir: Path | None, stage_name: str | None) -> str | None:
    if stage_dir is not None:
        t = _read_json(stage_dir / "stage.json").get("type")
        if isinstance(t, str):
            return t
    stages = read_run_recipe(run_dir).get("stages")
    if isinstance(stages, dict) and stage_name in stages and isinstance(stages[stage_name], dict):
        t = stages[stage_name].get("type")
        if isinstance(t, str):
            return t
    return None


def _pick_in_stage_dir(stage_dir: Path) -> Path | None:
    for sub in ("final", "adapter"):
        if _is_model_dir(stage_dir / sub) or _is_adapter_dir(stage_dir / sub):
            return stage_dir / sub
    return None


def _adapter_base(adapter_dir: Path, run_dir: Path | None, stage_name: str | None, tried: list[str]) -> Path:
    cfg = _read_json(adapter_dir / "adapter_config.json")
    base = cfg.get("base_model_name_or_path")
    if isinstance(base, str) and base:
        for cand in (Path(base), adapter_dir / base):
            if _is_model_dir(cand):
                return cand.resolve()
        tried.append(f"adapter_config.json base_model_name_or_path={base!r} (not a local model directory)")
    stage_dir = adapter_dir.parent
    info = _read_json(stage_dir / "stage.json")
    for key in ("init_path", "input", "base_model"):
        val = info.get(key)
        # stage.json records paths inside the run directory relative to it (RunLayout.portable)
        for cand in ((Path(val), stage_dir.parent / val) if isinstance(val, str) else ()):
            if _is_model_dir(cand):
                return cand.resolve()
    stages = read_run_recipe(run_dir).get("stages")
    if run_dir is not None and isinstance(stages, dict) and isinstance(stages.get(stage_name), dict):
        src = stages[stage_name].get("from")
        if isinstance(src, str):
            cand = run_dir / src / "final"
            if _is_model_dir(cand):
                return cand.resolve()
            tried.append(f"final/ of the stage this one starts from ({cand}) does not exist")
        else:
            tried.append(f"stage {stage_name!r} has no 'from:' in recipe.resolved.yaml")
    else:
        tried.append("no run recipe (recipe.resolved.yaml) next to the adapter to find its input stage")
    raise ModelLoadError(f"cannot find the base model of adapter {adapter_dir}: " + "; ".join(tried))


def locate_model(path: str | Path, stage: str | None = None) -> ModelLocation:
    """Resolve a user-given path (and optional stage name) to the directories to load.

    Raises:
        ModelLoadError: when nothing loadable is found; the message names what was looked at.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise ModelLoadError(f"{p}: expected a directory (a stage's final/ or adapter/, or a run directory)")
    p = p.resolve()
    notes: list[str] = []

    if stage is not None:
        stage_dir = p / stage
        if not stage_dir.is_dir():
            known = [s for s in _stage_order(p) if (p / s).is_dir()] if p.is_dir() else []
            raise ModelLoadError(f"{p}: no stage {stage!r} in this run directory"
                                 + (f" (stages: {', '.join(known)})" if known else ""))
        target = _pick_in_stage_dir(stage_dir)
        if target is None:
            raise ModelLoadError(f"{stage_dir}: the stage has no final/ or adapter/ yet (has it finished?)")
    elif _is_model_dir(p) or _is_adapter_dir(p):
        target = p
    elif _pick_in_stage_dir(p) is not None:
        target = _pick_in_stage_dir(p)
    elif _looks_like_run_dir(p):
        target = None
        for name in reversed(_stage_order(p)):
            if (p / name).is_dir() and _pick_in_stage_dir(p / name) is not None:
                target = _pick_in_stage_dir(p / name)
                notes.append(f"no --stage given: using the last finished stage, {name!r}")
                break
        if target is None:
            raise ModelLoadError(f"{p}: no stage of this run has a final/ or adapter/ yet")
    else:
        raise ModelLoadError(f"{p}: not a model directory (no config.json), an adapter directory "
                             "(no adapter_config.json), a stage directory or a run directory")

    # Is target inside a run: <run>/<stage>/{final,adapter}?
    run_dir = stage_name = stage_dir = None
    if target.name in ("final", "adapter"):
        stage_dir = target.parent
        stage_name = stage_dir.name
        maybe_run = stage_dir.parent
        if (maybe_run / "recipe.resolved.yaml").is_file() or (stage_dir / "stage.json").is_file():
            run_dir = maybe_run
    stage_type = _stage_type(run_dir, stage_dir, stage_name)

    if _is_adapter_dir(target) and not _is_model_dir(target):
        tried: list[str] = []
        base = _adapter_base(target, run_dir, stage_name, tried)
        tok_dir = next((d for d in (target, base, run_dir / "tokenizer" if run_dir else None) if _has_tokenizer(d)), base)
        return ModelLocation(model_dir=base, adapter_dir=target, tokenizer_dir=tok_dir, stage_name=stage_name,
                             stage_type=stage_type, run_dir=run_dir, notes=notes)
    tok_dir = next((d for d in (target, run_dir / "tokenizer" if run_dir else None) if _has_tokenizer(d)), target)
    return ModelLocation(model_dir=target, tokenizer_dir=tok_dir, stage_name=stage_name, stage_type=stage_type,
                         run_dir=run_dir, notes=notes)


def has_chatml_template(tokenizer: Any) -> bool:
    """True when the tokenizer's chat template uses the ChatML tokens and both are in its vocabulary."""
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, dict):
        tmpl = tmpl.get("default")
    if not isinstance(tmpl, str) or CHATML_START not in tmpl or CHATML_END not in tmpl:
        return False
    vocab = tokenizer.get_vocab()
    return CHATML_START in vocab and CHATML_END in vocab


def has_chat_template(tokenizer: Any) -> bool:
    """True when the tokenizer's chat template is one llmlab trains with: ChatML with both its
    tokens in the vocabulary, or any template with generation markers (a named template of
    :mod:`llmlab.chat_templates`, or a pretrained tokenizer's own, marked)."""
    from llmlab.chat_templates import has_generation_markers

    return has_chatml_template(tokenizer) or has_generation_markers(getattr(tokenizer, "chat_template", None))


def decide_is_chat(tokenizer: Any, location: ModelLocation) -> bool:
    """The chat-or-continuation rule documented in this module's docstring."""
    if location.adapter_dir is not None or location.stage_type is not None:
        fine_tuned = location.adapter_dir is not None or location.stage_type != "pretrain"
        return fine_tuned and has_chat_template(tokenizer)
    return bool(getattr(tokenizer, "chat_template", None))


def is_reward_model(model: Any) -> bool:
    """True for a sequence-classification (reward) model rather than a causal LM."""
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    return type(model).__name__.endswith("ForSequenceClassification") or (
        not hasattr(model, "generate") and any(a.endswith("ForSequenceClassification") for a in archs))


def _import_llmlab_models() -> None:
    """Register our model types with the Auto classes (the package may not exist yet)."""
    try:
        from llmlab import models
    except ImportError:
        return
    register = getattr(models, "register", None)
    if register is not None:
        try:
            register()
        except ImportError:
            pass


def pick_device(device: str | None = None):
    """``device`` as a torch.device; ``None``/``"auto"`` picks CUDA when available, else CPU."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _declare_recipe_context(model: Any, loc: ModelLocation) -> None:
    """Give a model whose config declares no context (a Mamba2 trained before config.json carried
    ``max_seq_len``) the one of its run's recipe (:func:`recipe_context`), which chat, generate, eval
    and serve then cap prompt plus reply to."""
    from llmlab.context import context_limit

    if context_limit(model) is not None:
        return
    ctx = recipe_context(loc.run_dir, loc.stage_name)
    if ctx is not None:
        model.config.max_seq_len = ctx
        loc.notes.append(f"{loc.model_dir}/config.json declares no context: using {ctx} tokens from "
                         f"{loc.run_dir}/recipe.resolved.yaml")


def load_for_inference(path: str | Path | ModelLocation, stage: str | None = None, allow_code: bool = False,
                       device: str | None = None, dtype: str | None = None):
    """Load a model and its tokenizer, ready for generation or evaluation.

    Args:
        path: a final/ or adapter/ directory, a stage or run directory, or a :class:`ModelLocation`.
        stage: the stage to load when ``path`` is a run directory.
        allow_code: permit ``trust_remote_code`` (code shipped with the checkpoint runs).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default: CUDA when available.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; default float32 on CPU, bfloat16 on CUDA.

    Returns:
        ``(model, tokenizer, is_chat)``: the model in eval mode on ``device`` (LoRA adapters merged),
        its tokenizer (a pad token is set when missing), and whether to use the chat template (the
        rule is in this module's docstring). A reward model (``*ForSequenceClassification``) loads
        as such; its ``is_chat`` says whether to render conversations with the chat template. A
        model whose config declares no context gets its run recipe's (:func:`recipe_context`) as
        ``config.max_seq_len``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    _import_llmlab_models()
    loc = path if isinstance(path, ModelLocation) else locate_model(path, stage)
    dev = pick_device(device)
    if dtype is None:
        torch_dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)

    tokenizer = AutoTokenizer.from_pretrained(str(loc.tokenizer_dir), trust_remote_code=allow_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    config = AutoConfig.from_pretrained(str(loc.model_dir), trust_remote_code=allow_code)
    archs = getattr(config, "architectures", None) or []
    auto = AutoModelForSequenceClassification if any(a.endswith("ForSequenceClassification") for a in archs) \
        else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(str(loc.model_dir), trust_remote_code=allow_code, use_safetensors=True,
                                     dtype=torch_dtype)
    except ValueError as e:
        if "trust_remote_code" in str(e) and not allow_code:
            raise ModelLoadError(f"{loc.model_dir}: this checkpoint needs its own code; pass --allow-code "
                                 "if you trust it") from e
        raise
    if loc.adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(loc.adapter_dir)).merge_and_unload()
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    _declare_recipe_context(model, loc)
    model.to(dev).eval()
    return model, tokenizer, decide_is_chat(tokenizer, loc)
