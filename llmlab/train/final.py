"""A finished stage's outputs: ``final/`` (a whole Hugging Face model and its tokenizer) and, for a
LoRA adapter kept unmerged, ``adapter/`` (PEFT format), with the generation config a chat model
needs to stop at the end of its turn.

Both are written into a temporary sibling and renamed (:func:`llmlab.ownership.writing_folder`),
so a kill never leaves a half-written ``final/`` that looks finished.
"""

from __future__ import annotations

from llmlab.layout import StageLayout
from llmlab.ownership import writing_folder


def stop_token_ids(tokenizer, chat: bool) -> list[int]:
    """The token ids generation stops at: the tokenizer's eos, and for a chat model (``chat``: a
    stage whose data are conversations, preferences or prompts) also ``<|im_end|>`` when the
    vocabulary has it and the end-of-turn tokens of its chat template
    (:func:`llmlab.chat_templates.end_of_turn_ids`), each once."""
    eos = [tokenizer.eos_token_id]
    if not chat:
        return eos
    if "<|im_end|>" in tokenizer.get_vocab():
        eos.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    from llmlab.chat_templates import end_of_turn_ids

    return eos + [i for i in end_of_turn_ids(tokenizer) if i not in eos]


def set_generation_config(model, tokenizer, chat: bool) -> None:
    """Write the stop, pad and bos ids into ``model.generation_config`` (when it has one), so
    ``generate`` and ``llmlab chat`` stop where the stage's data end a turn (:func:`stop_token_ids`;
    one id is written as an int, several as a list, as transformers does)."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return
    eos = stop_token_ids(tokenizer, chat)
    gc.eos_token_id = eos if len(eos) > 1 else eos[0]
    gc.pad_token_id = tokenizer.pad_token_id
    gc.bos_token_id = tokenizer.bos_token_id


def save_final(model, tokenizer, layout: StageLayout, chat: bool, lora=None) -> dict:
    """Write ``final/`` (the whole model, merged when it is a PEFT model, in safetensors, plus the
    tokenizer) and, when ``model`` is a PEFT model whose LoRA is kept unmerged (``lora.merge`` false:
    the stage's own LoRA or the adapter it continued, :attr:`llmlab.runplan.StagePlan.lora`),
    ``adapter/`` first.

    Args:
        layout: the stage's directory.
        chat: the stage trained a chat model (:func:`set_generation_config`).
        lora: the :class:`llmlab.specs.LoraSpec` the stage trained, or None.

    Returns:
        ``{"final": path, "adapter": path}`` of what was written (for stage.json).

    Raises:
        OSError: a full disk (named) or an unwritable folder; the temporary folder is removed.
    """
    written = {}
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()
    if isinstance(model, PeftModel):
        if lora is not None and not lora.merge:
            with writing_folder(layout.tmp("adapter"), layout.adapter, "adapter") as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            written["adapter"] = str(layout.adapter)
        model = model.merge_and_unload()
    set_generation_config(model, tokenizer, chat)
    with writing_folder(layout.tmp("final"), layout.final, "final") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    written["final"] = str(layout.final)
    return written
