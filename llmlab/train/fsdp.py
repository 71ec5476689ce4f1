"""Sharded training (``distributed.strategy: fsdp``) with PyTorch FSDP2 (``fully_shard``).

Under ``torchrun`` / ``accelerate launch`` with more than one process, :func:`shard_model` gives
every transformer block (the model's ``_no_split_modules`` classes, as torchtitan and torchtune
wrap them) and then the root its own FSDP2 parameter group over a 1-D device mesh of all
processes: each parameter, its gradient and its optimizer state are ``DTensor`` shards along dim 0,
and a block's parameters are all-gathered just for its forward and backward; gradients are
reduce-scattered (averaged) at the end of the backward.

The loop reads and writes model and optimizer state through a state IO:

- :data:`~llmlab.train.checkpoint.LOCAL` (one process, DDP): ``state_dict()`` / ``load_state_dict()`` of the whole model;
- :class:`ShardedStateIO` (FSDP): checkpoints are DCP shards every rank writes at once
  (:mod:`llmlab.train.dcp`; no rank holds more than its shard) and any world size reads back.
  Checkpoints of earlier llmlab versions, whose ``model.safetensors`` / ``optimizer.pt`` hold
  the full state (the optimizer keyed by parameter name, ``optimizer_format`` "fqn"), still load:
  every rank slices its shard from the full dict. :func:`gather_full_model` gathers the model
  (never the optimizer) one parameter at a time into a plain copy on rank 0's CPU for ``final/``.

Under ``distributed.replicate: K`` (HSDP) the mesh is 2-D, ``(K, world / K)``: each parameter is
sharded over the second dimension (the processes of one replica group, e.g. one node) and
replicated over the first, so all-gathers stay inside a group and only the gradient all-reduce
crosses groups (FSDP2's ``fully_shard`` with a 2-D mesh).

Reference: Zhao et al. 2023, "PyTorch FSDP"; the FSDP2 API in ``torch.distributed.fsdp``.
"""

from __future__ import annotations

import copy

import torch

from llmlab.config import DistributedConfig
from llmlab.train.checkpoint import LOCAL, LocalStateIO, check_keys, unique_tensors

#: accelerate's mixed-precision name -> the dtype FSDP2 gathers parameters in (gradients are
#: reduced in fp32); fp32 and fp16 (GradScaler) gather the fp32 master weights themselves
PARAM_DTYPES = {"bf16": torch.bfloat16}


def fsdp_enabled(cfg: DistributedConfig, world_size: int) -> bool:
    """Whether the model is sharded: strategy fsdp under more than one process (one process holds
    the whole model whatever the strategy).

    Raises:
        ValueError: ``distributed.replicate`` does not divide ``world_size``
            (:meth:`~llmlab.config.DistributedConfig.mesh_shape`).
    """
    if cfg.strategy != "fsdp" or world_size <= 1:
        return False
    cfg.mesh_shape(world_size)
    return True


def strategy_name(cfg: DistributedConfig, world_size: int) -> str | None:
    """What stage.json and the start line call the sharding: ``FSDP``, ``HSDP`` (``replicate`` >
    1), or None when the model is not sharded (:func:`fsdp_enabled`)."""
    if not fsdp_enabled(cfg, world_size):
        return None
    return "HSDP" if cfg.replicate > 1 else "FSDP"


def shard_ways(cfg: DistributedConfig, world_size: int) -> int:
    """Over how many processes each parameter is sharded: 1 unsharded, the world size under FSDP,
    world size / ``replicate`` under HSDP."""
    return cfg.mesh_shape(world_size)[1] if fsdp_enabled(cfg, world_size) else 1


def device_mesh(cfg: DistributedConfig, device_type: str):
    """The device mesh FSDP2 shards over: 1-D over every process, or under ``replicate: K`` (HSDP)
    2-D, ``(K, world / K)`` with dimensions named ``replicate`` and ``shard`` (consecutive ranks,
    e.g. one node's GPUs under torchrun, form one shard group)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    groups, per_group = cfg.mesh_shape(dist.get_world_size())
    if groups == 1:
        return init_device_mesh(device_type, (per_group,))
    return init_device_mesh(device_type, (groups, per_group), mesh_dim_names=("replicate", "shard"))


def block_classes(model: torch.nn.Module) -> set[str]:
    """Class names of the model's transformer blocks: the ``_no_split_modules`` of the first
    Hugging Face ``PreTrainedModel`` inside ``model`` (a PEFT model's base included)."""
    for m in model.modules():
        names = getattr(m, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def shard_model(model: torch.nn.Module, cfg: DistributedConfig, device: torch.device,
                mixed_precision: str = "no") -> torch.nn.Module:
    """Apply ``fully_shard`` to every transformer block of ``model`` and then to ``model`` itself,
    in place (``model`` becomes an ``FSDPModule``; its parameters become DTensor shards), over
    :func:`device_mesh` (HSDP when ``cfg.replicate`` > 1).

    Args:
        model: the stage's model on ``device`` (LoRA already applied; frozen parameters are
            sharded like trainable ones).
        cfg: the recipe's ``distributed:`` section (``reshard_after_forward``, ``cpu_offload``,
            ``replicate``).
        device: the process's device (``cpu`` with gloo, ``cuda`` with nccl).
        mixed_precision: accelerate's name (``no``, ``bf16``, ``fp16``); under ``bf16``
            parameters are gathered in bf16 and gradients reduced in fp32.

    Returns:
        ``model``.

    Raises:
        RuntimeError: torch.distributed is not initialised.
        ValueError: ``cfg.replicate`` does not divide the world size.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("distributed.strategy fsdp needs torch.distributed (run under torchrun or accelerate launch)")
    mesh = device_mesh(cfg, device.type)
    kwargs = {"mesh": mesh, "reshard_after_forward": cfg.reshard_after_forward}
    if mixed_precision in PARAM_DTYPES:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[mixed_precision], reduce_dtype=torch.float32)
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    names = block_classes(model)
    for module in list(model.modules()):
        if type(module).__name__ in names:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (no memory; buffers, small and
    partly not in the state dict, e.g. rotary frequencies, are copied): the structure
    :func:`gather_full_model` fills with the trained weights. Made before sharding."""
    memo: dict = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def _materialize(skeleton: torch.nn.Module) -> None:
    """Give every meta parameter of ``skeleton`` CPU storage (uninitialised), keeping tied
    parameters tied."""
    new: dict[int, torch.nn.Parameter] = {}
    for module in skeleton.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in new:
                    new[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
                module._parameters[name] = new[id(p)]


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of DTensor (sharded) gradients to ``max_norm``; returns the
    norm before clipping as a plain tensor (torchtitan's ``clip_grad_norm_``: the norm of each
    shard is all-reduced into the whole model's)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total)
    return total


class ShardedStateIO(LocalStateIO):
    """State of an FSDP2 model: saved as DCP shards by every rank (``writes_shards``); full
    (unsharded) state dicts gathered to rank 0's CPU by :meth:`model_state` (``final/``), and
    loaded by every rank from the full dict of an older whole-state checkpoint.

    ``collective`` is True: every rank calls :meth:`model_state` and :meth:`optimizer_state`
    (ranks other than 0 get empty dicts).
    """

    optimizer_format = "fqn"  # torch.distributed.checkpoint: states keyed by parameter name
    collective = True
    writes_shards = True

    def __init__(self, async_save: bool = False):
        self.async_save = async_save

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kw)

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return unique_tensors(get_model_state_dict(model, options=self._options(cpu_offload=True)))

    def optimizer_state(self, model: torch.nn.Module, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, _inner(optimizer), options=self._options(cpu_offload=True))

    def load_model(self, model: torch.nn.Module, state: dict, where) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        missing, unexpected = set_model_state_dict(model, state, options=self._options(strict=False))
        check_keys(missing, unexpected, where)

    def load_optimizer(self, model: torch.nn.Module, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, _inner(optimizer), state, options=self._options())


def state_io(sharded: bool, cfg: DistributedConfig | None = None) -> LocalStateIO:
    """:class:`ShardedStateIO` for an FSDP-sharded model (its shards written in the background
    under ``cfg.async_checkpoint``), else :data:`LOCAL`."""
    return ShardedStateIO(async_save=bool(cfg and cfg.async_checkpoint)) if sharded else LOCAL


def _inner(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer``."""
    return getattr(optimizer, "optimizer", optimizer)


def gather_full_model(model: torch.nn.Module, skeleton: torch.nn.Module | None, is_main: bool) -> torch.nn.Module:
    """The trained weights of FSDP ``model`` in a plain (unsharded) copy on rank 0's CPU, gathered
    one parameter at a time: rank 0 holds the whole model once (``skeleton``) plus one gathered
    parameter, the other ranks one gathered parameter; the optimizer state is never gathered.

    Every rank must call it (each parameter's ``full_tensor()`` is an all-gather over the shard
    group; under HSDP the replicas hold it already). ``skeleton`` is rank 0's
    :func:`meta_skeleton`, filled here; other ranks get ``model`` back unchanged.

    Raises:
        RuntimeError: the skeleton's parameter names differ from the sharded model's.
    """
    fill = is_main and skeleton is not None
    targets: dict[str, torch.nn.Parameter] = {}
    if fill:
        _materialize(skeleton)
        targets = dict(skeleton.named_parameters())
        names = [n for n, _ in model.named_parameters()]
        if sorted(names) != sorted(targets):
            raise RuntimeError(f"the unsharded copy does not fit the FSDP model: missing "
                               f"{sorted(set(names) - set(targets))[:5]}, unexpected {sorted(set(targets) - set(names))[:5]}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p  # a collective: every rank, same order
            if fill:
                targets[name].copy_(full)
            del full
        if fill:  # buffers are whole on every rank (rotary tables): the trained model's, as they are
            own = dict(model.named_buffers())
            for name, b in skeleton.named_buffers():
                if name in own:
                    b.copy_(own[name])
    return skeleton if fill else model
