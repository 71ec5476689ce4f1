"""What each stage type is, in one table (pure Python: no torch, nothing from llmlab imported).

Every per-stage-type fact the rest of llmlab needs is a field of :class:`StageSpec`: the data family
and row kind it consumes (:mod:`llmlab.data.pipeline`), the dataset formats it accepts
(:mod:`llmlab.recipe.semantic`), how many sequences one example becomes (``llmlab plan``), which
stages it reads (:mod:`llmlab.fingerprint`), how its status is decided, and the class implementing
it (:func:`llmlab.stages.stage_class`). A stage type's keys and their defaults live in the recipe
schema (``$defs/stage_<type>``), nowhere else.

Adding a stage type: a ``stage_<type>`` section in schemas/recipe.schema.json, one entry in
:data:`STAGE_SPECS`, one module under llmlab/stages/ with the :class:`~llmlab.stages.base.Stage`
subclass, and its tests (docs/architecture.md walks through an example).
"""

from __future__ import annotations

from dataclasses import dataclass

#: each builtin source (llmlab.data.sources) and the format its rows have: written once, here, where
#: the recipe checker and the data layer both read it (a leaf module: no package cycle)
BUILTIN_FORMATS = {"kjv": "text", "chatterbot": "messages", "chatterbot_pairs": "preference",
                   "chatterbot_prompts": "prompt", "arithmetic": "messages"}

#: conversation-shaped formats (llmlab.data converts each into messages)
CONVERSATION_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")


@dataclass(frozen=True)
class StageSpec:
    """One stage type.

    Attributes:
        type: the ``type:`` value in a recipe.
        implementation: ``"module:Class"`` of the :class:`~llmlab.stages.base.Stage` subclass.
        formats: dataset ``format`` values its datasets may have (a preference row trains SFT on
            prompt + chosen; any conversation or preference row gives grpo/ppo its prompt).
        family: the :mod:`llmlab.data.pipeline` family that turns its rows into batches
            (``pretrain``, ``sft``, ``pair``, ``prompt``), or None for a stage that trains nothing.
        kind: the canonical row kind that family consumes (``text``, ``conversation``,
            ``preference``, ``prompt``), or None.
        sequences_per_example: sequences one example puts through the model with gradients (2 for a
            chosen / rejected pair), for ``llmlab plan``'s token and memory estimates.
        extra_sequences_per_example: sequences it also puts through without gradients (KTO's two
            mismatched pairs): counted in ``llmlab plan``'s tokens, not in its activation memory.
        own_kinds: row kinds it also takes as they are, through the :mod:`llmlab.data.pipeline`
            family of the same name, when all its datasets have that kind (kto:
            ``unpaired_preference``, whose format has the same name).
        samples_key: the stage key giving completions sampled per prompt (GRPO's ``group_size``),
            or None for one.
        generates: the stage samples completions of ``max_new_tokens`` (sequence length for plan
            when ``seq_len`` is unset).
        inputs: which stages it reads: ``"chain"`` (``from`` — the previous stage by default —,
            ``reference_from``, ``reward[i].from``) or ``"models"`` (``models[i]``,
            ``reference_from``, ``reward_from``; no weights to start from).
        trains: it trains weights (steps, checkpoints, ``final/``); False for ``evaluate``, which is
            done once ``results_file`` is written under its fingerprint.
        language_model: its ``final/`` is a causal language model (what ``reference_from`` and an
            evaluate stage's default ``models`` may name); False for a reward model.
        results_file: the file a non-training stage writes into its directory.
    """

    type: str
    implementation: str
    formats: tuple[str, ...]
    family: str | None = None
    kind: str | None = None
    sequences_per_example: int = 1
    extra_sequences_per_example: int = 0
    own_kinds: tuple[str, ...] = ()
    samples_key: str | None = None
    generates: bool = False
    inputs: str = "chain"
    trains: bool = True
    results_file: str | None = None
    language_model: bool = True


_PROMPT_FORMATS = ("prompt",) + CONVERSATION_FORMATS + ("preference",)

#: stage type -> its spec, in the order the schema lists the types
STAGE_SPECS: dict[str, StageSpec] = {s.type: s for s in (
    StageSpec("pretrain", "llmlab.stages.lm:PretrainStage", ("text",), "pretrain", "text"),
    StageSpec("sft", "llmlab.stages.lm:SFTStage", CONVERSATION_FORMATS + ("preference",), "sft", "conversation"),
    StageSpec("reward", "llmlab.stages.reward:RewardStage", ("preference",), "pair", "preference",
              sequences_per_example=2, language_model=False),
    StageSpec("dpo", "llmlab.stages.dpo:DPOStage", ("preference",), "pair", "preference", sequences_per_example=2),
    StageSpec("orpo", "llmlab.stages.orpo:ORPOStage", ("preference",), "pair", "preference", sequences_per_example=2),
    StageSpec("kto", "llmlab.stages.kto:KTOStage", ("preference", "unpaired_preference"), "pair", "preference",
              sequences_per_example=2, extra_sequences_per_example=2, own_kinds=("unpaired_preference",)),
    StageSpec("grpo", "llmlab.stages.grpo:GRPOStage", _PROMPT_FORMATS, "prompt", "prompt", samples_key="group_size",
              generates=True),
    StageSpec("ppo", "llmlab.stages.ppo:PPOStage", _PROMPT_FORMATS, "prompt", "prompt", generates=True),
    StageSpec("evaluate", "llmlab.stages.evaluate:EvaluateStage", ("text",) + _PROMPT_FORMATS, inputs="models",
              trains=False, results_file="results.json", language_model=False),
)}

#: ``loss_type`` values of a dpo stage that load no reference model (SimPO, CPO)
REFERENCE_FREE_DPO_LOSSES = ("simpo", "cpo")
#: ``loss_type`` values of a dpo stage that compare with a reference model (``llmlab.losses.dpo_loss``)
REFERENCE_DPO_LOSSES = ("sigmoid", "ipo", "apo_zero", "apo_down")
#: ``loss_type`` values that take no ``label_smoothing`` (IPO's squared loss, APO's anchored terms)
UNSMOOTHED_DPO_LOSSES = ("ipo", "apo_zero", "apo_down")


def uses_reference(stage_type: str, params=None) -> bool | None:
    """Whether a preference stage of ``stage_type`` keeps a frozen reference model: dpo (not its
    reference-free ``loss_type`` simpo / cpo, read from ``params``, the stage's
    :class:`llmlab.stage_params.DPOParams`) and kto do, orpo and the other types that train on pairs
    (reward) do not. None for grpo and ppo, which decide from their own keys (their stages'
    ``needs_reference``), and for types that train nothing."""
    if stage_type == "dpo":
        return params.loss_type not in REFERENCE_FREE_DPO_LOSSES
    if stage_type in ("kto", "orpo", "reward", "pretrain", "sft"):
        return stage_type == "kto"
    return None


#: the types that train nothing (no weights for ``from:`` / ``reference_from:`` / ``models:`` to name)
NON_TRAINING_TYPES = tuple(t for t, s in STAGE_SPECS.items() if not s.trains)
#: the types whose output is not a causal language model
NON_LM_TYPES = tuple(t for t, s in STAGE_SPECS.items() if not s.language_model)


def stage_spec(stage_type: str) -> StageSpec:
    """The spec of ``stage_type``.

    Raises:
        KeyError: an unknown type (the message lists the known ones).
    """
    try:
        return STAGE_SPECS[stage_type]
    except KeyError:
        raise KeyError(f"unknown stage type {stage_type!r}; known: {', '.join(STAGE_SPECS)}") from None
