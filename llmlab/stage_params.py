"""Each stage type's own keys as a frozen dataclass: the ``params`` of its
:class:`llmlab.runplan.StagePlan` (pure Python, no torch).

A class here holds the keys of ``$defs/stage_<type>`` that are not in ``$defs/stage_common`` (the
shared training keys are :class:`llmlab.config.TrainingConfig`); an evaluate stage, which trains
nothing and shares no key with ``stage_common``, holds all of its keys. Every field has the schema's
name (``from`` → ``from_stage``, the one rename), and no field carries a default of its own: values
come from the resolved recipe, which :func:`llmlab.recipe.schema.fill_defaults` filled from the
schema; a field is None only where the schema's default is null (tests/test_runplan.py checks both
against the schema). A stage type whose schema section adds no key (pretrain, reward) has none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from llmlab.specs import typed_section


@dataclass(frozen=True)
class RewardSpec:
    """One entry of a grpo / ppo stage's ``reward:`` list (``$defs/reward_source``): exactly one of
    ``from_stage``, ``model``, ``function``, ``builtin`` is set."""

    SCHEMA: ClassVar[str] = "#/$defs/reward_source"

    weight: float
    """Weight of this source in the summed reward."""
    from_stage: str | None = field(default=None, metadata={"key": "from"})
    """A reward stage of this recipe whose model scores the completions."""
    model: str | None = None
    """A reward model (local directory or hub id)."""
    revision: str | None = None
    """Hub revision of ``model``."""
    function: str | None = None
    """``module:function`` computing rewards (runs code: needs ``--allow-code``)."""
    builtin: str | None = None
    """A built-in rule (e.g. ``exact_answer``)."""
    token: str | None = None
    """Builtin rule argument: the token to count or look for."""
    text: str | None = None
    """Builtin rule argument: the text to look for."""
    target: int | float | None = None
    """Builtin rule argument: the target length or value."""


@dataclass(frozen=True)
class SFTParams:
    """``$defs/stage_sft``'s own keys."""

    SCHEMA: ClassVar[str] = "#/$defs/stage_sft"

    truncation: str
    """What happens to a conversation longer than seq_len: drop | truncate."""
    neftune_alpha: float | None = None
    """NEFTune (Jain et al. 2023): uniform noise of scale alpha/sqrt(L*d) on the input embeddings
    in training; None: off."""


@dataclass(frozen=True)
class DPOParams:
    """``$defs/stage_dpo``'s own keys (Rafailov et al. 2023, with IPO / RPO variants)."""

    SCHEMA: ClassVar[str] = "#/$defs/stage_dpo"

    beta: float
    """Temperature β of the implicit reward β·(log π − log π_ref)."""
    loss_type: str
    """sigmoid (DPO) | ipo | hinge ... (the schema's enum)."""
    label_smoothing: float
    """Conservative DPO: assumed probability that a pair's labels are flipped."""
    rpo_alpha: float
    """Weight of the NLL of the chosen reply added to the loss (RPO); 0: plain DPO."""
    simpo_gamma: float
    """SimPO (Meng et al. 2024) target reward margin γ (loss_type simpo)."""
    cpo_alpha: float
    """CPO (Xu et al. 2024) weight of the chosen reply's NLL (loss_type cpo and simpo)."""
    reference_from: str | None = None
    """Stage whose model is the frozen reference (None: the stage's starting weights)."""


@dataclass(frozen=True)
class ORPOParams:
    """``$defs/stage_orpo``'s own keys (Hong et al. 2024; no reference model)."""

    SCHEMA: ClassVar[str] = "#/$defs/stage_orpo"

    beta: float
    """Weight λ of the odds-ratio term (TRL's ``ORPOConfig.beta``)."""


@dataclass(frozen=True)
class KTOParams:
    """``$defs/stage_kto``'s own keys (Ethayarajh et al. 2024)."""

    SCHEMA: ClassVar[str] = "#/$defs/stage_kto"

    beta: float
    """Temperature β of the KTO value function."""
    desirable_weight: float
    """λ_D: weight of the desirable examples' losses."""
    undesirable_weight: float
    """λ_U: weight of the undesirable examples' losses."""
    reference_from: str | None = None
    """Stage whose model is the frozen reference (None: the stage's starting weights)."""


@dataclass(frozen=True)
class _Sampling:
    """Keys shared by the online stages that sample completions (grpo, ppo)."""

    temperature: float
    """Sampling temperature of the rollouts."""
    top_k: int
    """Top-k sampling (0: off)."""
    top_p: float
    """Nucleus sampling mass (1: off)."""
    max_new_tokens: int
    """Tokens generated per completion at most."""
    clip_range: float
    """ε of the clipped policy ratio."""
    ppo_epochs: int
    """Optimisation passes over each batch of rollouts."""
    mini_batch_size: int | None = field(default=None, kw_only=True)
    """Rollouts per optimisation mini-batch (resolution fills the stage's batch_size; None only in
    a bare section)."""
    reward: tuple[RewardSpec, ...] | None = field(default=None, kw_only=True)
    """The reward sources, summed with their weights (required by validation)."""


@dataclass(frozen=True)
class GRPOParams(_Sampling):
    """``$defs/stage_grpo``'s own keys (Shao et al. 2024, DeepSeekMath)."""

    SCHEMA: ClassVar[str] = "#/$defs/stage_grpo"

    group_size: int = field(kw_only=True)
    """Completions sampled per prompt (the group whose rewards are normalised)."""
    kl_beta: float = field(kw_only=True)
    """Weight of the k3 KL estimate against the reference."""
    reference_from: str | None = field(default=None, kw_only=True)
    """Stage whose model is the KL reference (None: the stage's starting weights)."""


@dataclass(frozen=True)
class PPOParams(_Sampling):
    """``$defs/stage_ppo``'s own keys (Schulman et al. 2017; Ouyang et al. 2022's RLHF recipe)."""

    SCHEMA: ClassVar[str] = "#/$defs/stage_ppo"

    kl_coef: float = field(kw_only=True)
    """Initial coefficient of the per-token KL penalty against the reference."""
    kl_horizon: int = field(kw_only=True)
    """Horizon of the adaptive KL controller (steps)."""
    gamma: float = field(kw_only=True)
    """Discount factor of GAE."""
    gae_lambda: float = field(kw_only=True)
    """λ of generalised advantage estimation."""
    vf_coef: float = field(kw_only=True)
    """Weight of the value loss."""
    cliprange_value: float = field(kw_only=True)
    """Clip range of the value-function update."""
    whiten_advantages: bool = field(kw_only=True)
    """Normalise advantages over the batch."""
    kl_target: float | None = field(default=None, kw_only=True)
    """Target KL of the adaptive controller (None: a fixed kl_coef)."""
    reference_from: str | None = field(default=None, kw_only=True)
    """Stage whose model is the KL reference (None: the stage's starting weights)."""


@dataclass(frozen=True)
class EvaluateParams:
    """Every key of ``$defs/stage_evaluate`` except ``type`` and ``datasets`` (on the StagePlan)."""

    SCHEMA: ClassVar[str] = "#/$defs/stage_evaluate"
    ELSEWHERE: ClassVar[tuple[str, ...]] = ("type", "datasets")  # on the StagePlan

    models: tuple[str, ...]
    """Earlier stages whose final weights are evaluated, in table order."""
    beta: float
    """β of the DPO implicit reward accuracy (with reference_from)."""
    max_samples: int
    """Held-out rows per dataset at most."""
    num_samples: int
    """Completions sampled per prompt (prompt datasets)."""
    max_new_tokens: int
    """Tokens generated per completion at most."""
    temperature: float
    """Sampling temperature of the generations."""
    batch_size: int
    """Sequences per forward pass."""
    reference_from: str | None = None
    """Reference model of the DPO implicit reward."""
    reward_from: str | None = None
    """Reward stage scoring the sampled generations."""


#: stage type -> its params class (a type absent here adds no key to ``stage_common``)
STAGE_PARAMS: dict[str, type] = {"sft": SFTParams, "dpo": DPOParams, "orpo": ORPOParams, "kto": KTOParams,
                                 "grpo": GRPOParams, "ppo": PPOParams, "evaluate": EvaluateParams}

def params_of(stage_type: str, config: dict) -> Any:
    """The params of a stage of ``stage_type`` from its config (resolved or bare: absent keys take
    the schema's defaults); None for a type whose schema section adds no key."""
    cls = STAGE_PARAMS.get(stage_type)
    if cls is None:
        return None
    given = {}
    if "reward" in {f.name for f in dataclasses.fields(cls)}:
        given["reward"] = tuple(typed_section(RewardSpec, r) for r in config["reward"]) \
            if config.get("reward") else None
    return typed_section(cls, config, **given)


__all__ = ["params_of", "DPOParams", "EvaluateParams", "GRPOParams", "KTOParams", "ORPOParams", "PPOParams", "RewardSpec",
           "SFTParams", "STAGE_PARAMS"]
