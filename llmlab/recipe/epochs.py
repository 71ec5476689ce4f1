"""``epochs:`` resolved into ``max_steps`` (a stage trains by steps; epochs are a way to name them).

An epoch is the stage's training examples counted once: the sum of its training datasets' training
rows (after ``eval_split``, filters and ``max_samples``; before tokenisation drops over-long ones).
The global batch is ``batch_size × gradient_accumulation_steps × processes`` (processes:
``$WORLD_SIZE``, as torchrun and accelerate launch set it; 1 when unset), so

    max_steps = ceil(epochs × examples / global batch)

Resolution writes the result into the stage's ``max_steps`` (recipe.resolved.yaml records both), so
fingerprints, plan, status, the data layer and the loop read one number: ``epochs`` itself is not
hashed, and raising it on a finished stage extends the stage as raising ``max_steps`` does.
"""

from __future__ import annotations

import math
import os


def steps_for_epochs(epochs: float, examples: int, batch_size: int, gradient_accumulation_steps: int,
                     world_size: int) -> int:
    """Optimizer steps that cover ``epochs`` passes over ``examples`` examples (at least 1).

    Raises:
        ValueError: ``examples`` is 0 (there is nothing to take a pass over).
    """
    if examples <= 0:
        raise ValueError("the training datasets have no rows")
    return max(1, math.ceil(epochs * examples / (batch_size * gradient_accumulation_steps * world_size)))


def world_size() -> int:
    """The processes a run starts with: ``$WORLD_SIZE``, else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def epoch_examples(resolved: dict, stage: dict) -> int:
    """The training rows of ``stage``'s datasets (loads each dataset: local files are read, into
    datasets' default cache; nothing is written to the run directory).

    Raises:
        ValueError: a dataset cannot be loaded, or is streamed (its size is unknown).
    """
    import datasets

    from llmlab.data.sources import load_named_dataset

    # no output_dir: datasets' own cache, not the run directory (which may not exist yet, and which
    # `llmlab run` refuses when something other than llmlab made it)
    probe = {**resolved, "output_dir": None}
    total = 0
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # resolution prints nothing of its own
    try:
        for name in stage["datasets"]:
            train = load_named_dataset(probe, name).train
            try:
                total += len(train)
            except TypeError:
                raise ValueError(f"dataset {name!r} is streamed: its size is unknown; give max_steps") from None
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
    return total


def resolve_epochs(resolved: dict, processes: int | None = None) -> list[tuple[tuple, str]]:
    """Set ``max_steps`` of every stage of ``resolved`` that gives ``epochs`` (in place), for
    ``processes`` processes (None: :func:`world_size`).

    A stage that gives both keeps them only when they agree (as recipe.resolved.yaml writes them).

    Returns:
        ``(key path, message)`` for each stage whose steps cannot be computed or disagree.
    """
    problems = []
    for name, st in (resolved.get("stages") or {}).items():
        if not isinstance(st, dict) or st.get("epochs") is None:
            continue
        path = ("stages", name, "epochs")
        try:
            n = epoch_examples(resolved, st)
            steps = steps_for_epochs(float(st["epochs"]), n, int(st["batch_size"]),
                                     int(st["gradient_accumulation_steps"]), processes or world_size())
        except ValueError as e:
            problems.append((path, f"cannot size {st['epochs']} epoch(s): {e}"))
            continue
        if "max_steps" in st and int(st["max_steps"]) != steps:
            problems.append((("stages", name, "max_steps"),
                             f"max_steps {st['max_steps']} disagrees with epochs {st['epochs']} ({steps} steps over "
                             f"{n} examples); give one of them"))
            continue
        st["max_steps"] = steps
    return problems
