"""Optimizers and learning-rate schedules, built from a stage's ``optimizer:`` and ``scheduler:``.

Optimizers come from torch.optim (adamw, adafactor, muon), pytorch-optimizer (lion, sophia) and
bitsandbytes (adamw_8bit, GPU only); schedules from ``transformers.get_scheduler``. Nothing here
implements an update rule itself.

References: AdamW (Loshchilov & Hutter 2019), Adafactor (Shazeer & Stern 2018), Lion (Chen et al.
2023), Sophia (Liu et al. 2023; pytorch-optimizer's SophiaH), Muon (Jordan et al. 2024; torch.optim.Muon).
"""

from __future__ import annotations

import torch

from llmlab.config import OptimizerConfig, SchedulerConfig
from llmlab.recipe.optim_auto import unresolved


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (dim ≥ 2) only; biases, norms and 1-D parameters get none
    (the nanoGPT / LitGPT convention)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on 2-D hidden weight matrices, AdamW (at 0.1× the learning rate) on everything else.

    Muon (Jordan et al. 2024, torch.optim.Muon) orthogonalises the momentum of 2-D weights only;
    embeddings, the LM head, norms and biases are trained with AdamW, as in the reference setup.
    The two inner optimizers share this object's ``param_groups`` so LR schedulers act on both.
    """

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, momentum: float,
                 nesterov: bool, beta1: float, beta2: float, eps: float):
        muon_params, adam_params = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            is_embedding = "embed" in name or "lm_head" in name or "wte" in name or "score" in name
            (muon_params if p.dim() == 2 and not is_embedding else adam_params).append(p)
        self.muon = torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                     nesterov=nesterov) if muon_params else None
        self.adamw = torch.optim.AdamW(adam_params, lr=lr * 0.1, betas=(beta1, beta2), eps=eps,
                                       weight_decay=0.0) if adam_params else None
        for group in (self.muon.param_groups if self.muon else []):
            group["lr_ratio"] = 1.0
        for group in (self.adamw.param_groups if self.adamw else []):
            group["lr_ratio"] = 0.1
        inner = [o for o in (self.muon, self.adamw) if o is not None]
        self._inner = inner
        # Share param_groups (same dict objects) so schedulers that edit group["lr"] reach both.
        super().__init__([{"params": []}], {"lr": lr})
        self.param_groups = [g for o in inner for g in o.param_groups]
        for g in self.param_groups:
            g.setdefault("initial_lr", g["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        for o in self._inner:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self._inner:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"inner": [o.state_dict() for o in self._inner]}

    def load_state_dict(self, state):
        for o, s in zip(self._inner, state["inner"]):
            o.load_state_dict(s)
        self.param_groups = [g for o in self._inner for g in o.param_groups]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig | dict,
                    device: torch.device | None = None, cpu_fused: bool = True) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg.name`` over the model's trainable parameters.

    Args:
        model: the model; only parameters with ``requires_grad`` are optimised.
        cfg: the stage's ``optimizer:`` section, as a view or a dict (absent keys: the schema's defaults).
        device: the training device (fused AdamW is used on CUDA and, for unsharded parameters, on a
            CPU unless ``fused: false``).
        cpu_fused: allow the fused kernel on a CPU when ``fused`` is unset (False under
            ``distributed.strategy: fsdp``: the CPU's sharded parameters cannot take it, and one
            process must give the weights of several).

    Raises:
        ValueError: unknown optimizer name.
        RuntimeError: ``adamw_8bit`` without bitsandbytes and a CUDA device.
    """
    if not isinstance(cfg, OptimizerConfig):
        cfg = OptimizerConfig.from_dict(cfg)
    name, lr, wd = cfg.name, float(unresolved(cfg.lr, "lr")), float(unresolved(cfg.weight_decay, "weight_decay"))
    beta1, beta2, eps = cfg.beta1, cfg.beta2, cfg.eps
    if name == "adamw":
        fused = cfg.fused
        if fused is None:  # CUDA; and a CPU (one kernel per tensor: 3.7 ms instead of 19 ms a step on the
            # 5 M model of benchmarks/vs_litgpt.py), except for sharded (DTensor) parameters
            fused = device is not None and (device.type == "cuda" or (device.type == "cpu" and cpu_fused and not any(
                hasattr(p, "device_mesh") for p in model.parameters())))
        return torch.optim.AdamW(_param_groups(model, wd), lr=lr, betas=(beta1, beta2), eps=eps,
                                 fused=bool(fused) or None)
    if name == "adafactor":
        return torch.optim.Adafactor(_param_groups(model, wd), lr=lr)
    if name == "lion":
        from pytorch_optimizer import Lion

        return Lion(_param_groups(model, wd), lr=lr, betas=(beta1, beta2))
    if name == "sophia":
        from pytorch_optimizer import SophiaH

        return SophiaH(_param_groups(model, wd), lr=lr, betas=(beta1, beta2), p=cfg.rho,
                       update_period=cfg.hessian_update_every)
    if name == "muon":
        return MuonWithAdamW(model, lr=lr, weight_decay=wd, momentum=cfg.momentum, nesterov=bool(cfg.nesterov),
                             beta1=beta1, beta2=beta2, eps=eps)
    if name == "adamw_8bit":
        if device is None or device.type != "cuda":
            raise RuntimeError("optimizer adamw_8bit needs bitsandbytes on a CUDA GPU; use adamw on this machine")
        try:
            import bitsandbytes as bnb
        except ImportError as e:  # pragma: no cover - GPU extra
            raise RuntimeError("optimizer adamw_8bit needs the bitsandbytes package: pip install 'llmlab[gpu]'") from e
        return bnb.optim.AdamW8bit(_param_groups(model, wd), lr=lr, betas=(beta1, beta2), eps=eps)
    raise ValueError(f"unknown optimizer {name!r}")


def distributed_hutchinson(optimizer) -> list[torch.Tensor]:
    """Sophia's Hessian step under DDP: estimate, then average gradients and estimates over the
    processes, so that every replica takes the same step.

    DDP's gradient hooks write into the gradients in place, which fails for the graph-carrying
    gradients of ``backward(create_graph=True)`` ("a leaf Variable that requires grad is being
    used in an in-place operation"); the caller therefore runs that backward under ``no_sync``.
    Here each process estimates the Hessian diagonal from its own graph (Hutchinson: z ⊙ Hz with
    z ~ N(0, I), pytorch-optimizer's SophiaH; Liu et al. 2023, "Sophia: A Scalable Stochastic
    Second-order Optimizer"), then its gradients (detached) and estimates are all-reduced to the
    mean. A parameter keeps ``grad = None`` only when it has no gradient on every process.

    Args:
        optimizer: the (unwrapped) ``pytorch_optimizer.SophiaH``.

    Returns:
        the averaged estimates, one per parameter in parameter-group order, for
        ``optimizer.step(hessian=...)``.
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    for group in optimizer.param_groups:
        optimizer.init_group(group)
    optimizer.zero_hessian(optimizer.param_groups, optimizer.state)
    optimizer.compute_hutchinson_hessian(param_groups=optimizer.param_groups, state=optimizer.state,
                                         num_samples=optimizer.num_samples, distribution=optimizer.distribution)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=params[0].device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    hessians = []
    with torch.no_grad():
        for p, anywhere in zip(params, has_grad.tolist()):
            state = optimizer.state[p]
            hessian = state.get("hessian")
            if hessian is None:
                hessian = state["hessian"] = torch.zeros_like(p)
            if anywhere:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad.detach()
                dist.all_reduce(p.grad)
                p.grad.div_(world)
                dist.all_reduce(hessian)
                hessian.div_(world)
            hessians.append(hessian)
    return hessians


def needs_hessian(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers whose step needs ``backward(create_graph=True)`` (Sophia's Hutchinson
    Hessian estimate)."""
    return type(optimizer).__name__ == "SophiaH"


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig | dict, max_steps: int):
    """A ``LambdaLR`` from ``transformers.get_scheduler``.

    ``cfg``: the stage's ``scheduler:`` section, as a view or a dict (absent keys: the schema's
    defaults): name none|constant|cosine|linear|polynomial, warmup_steps, min_lr_ratio (cosine: the
    floor as a fraction of the peak lr), power (polynomial).
    """
    from transformers import get_scheduler

    if not isinstance(cfg, SchedulerConfig):
        cfg = SchedulerConfig.from_dict(cfg)
    name, warmup = cfg.name, int(unresolved(cfg.warmup_steps, "warmup_steps") or 0)
    kwargs = None
    if name in ("none", "constant"):
        name = "constant_with_warmup"
    elif name == "cosine":
        name, kwargs = "cosine_with_min_lr", {"min_lr_rate": float(cfg.min_lr_ratio)}
    elif name == "polynomial":
        kwargs = {"power": float(cfg.power)}
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps,
                         scheduler_specific_kwargs=kwargs)
