"""What resuming a stage under another world size does to its data: pure Python (``llmlab plan``
uses it without torch).

Every checkpoint records ``batch`` (``batch_size``, ``gradient_accumulation_steps``,
``world_size``) in its trainer_state.json. ``batch_size`` and ``gradient_accumulation_steps``
are part of the stage's fingerprint and the world size is not (a recipe does not say how many
processes run it), so a resume under another world size keeps them and the global batch changes
by the ratio of the process counts: the training dynamics and the data order change, and plan
and the resume say so. (Keeping the global batch would need a setting that derives the
accumulation from the world size and is hashed in its place; changing which keys are hashed
would change every existing stage's fingerprint.)
"""

from __future__ import annotations

import json
from pathlib import Path

from llmlab.layout import StageLayout


def batch_change(saved: dict | None, now: dict) -> str | None:
    """What resuming a checkpoint written with ``saved`` (its ``batch``: ``batch_size``,
    ``gradient_accumulation_steps``, ``world_size``) under ``now`` does to the data, or None when
    nothing changed (or the checkpoint predates the record).

    Micro-batch ``i`` of step ``s`` on rank ``r`` is stream index ``(s * accumulation + i) * world + r``
    (:class:`llmlab.train.loop.StepRunner`), so a step reads the indices
    ``[s * G, (s + 1) * G)`` with ``G = accumulation * world``: with the same micro-batch size and
    the same ``G`` every later step reads exactly the examples it would have.
    """
    if not saved or saved == now:
        return None

    def global_batch(b):
        return b["batch_size"] * b["gradient_accumulation_steps"] * b["world_size"]

    moved = (f"the checkpoint was written by {saved['world_size']} process(es), this run has {now['world_size']}"
             if saved["world_size"] != now["world_size"] else "the batch settings changed since the checkpoint")
    old, new = global_batch(saved), global_batch(now)
    if saved["batch_size"] == now["batch_size"] and old == new:
        return f"{moved}; the global batch ({new} examples per step) is kept: the data order continues exactly"
    return (f"{moved}; the global batch changes from {old} to {new} examples per step "
            "(batch_size × gradient_accumulation_steps × processes): the training dynamics and the data order "
            "change")


def resume_note(stage_dir: Path, now: dict) -> str | None:
    """:func:`batch_change` between the newest checkpoint of ``stage_dir`` (not verified: plan's
    quick look) and ``now``; None without a checkpoint, a record or a change."""
    layout = StageLayout(Path(stage_dir))
    step = layout.latest_checkpoint_step()
    if step is None:
        return None
    try:
        saved = json.loads((layout.checkpoint(step) / "trainer_state.json").read_text()).get("batch")
    except (OSError, ValueError):
        return None
    return batch_change(saved, now)
