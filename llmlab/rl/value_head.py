"""The value head PPO puts on the policy (Ziegler et al. 2019; Ouyang et al. 2022).

A single ``Linear(hidden_size, 1)`` reading the final hidden state (the LM head's input) at every
position. It is attached as a submodule named ``v_head`` of the causal LM *before* LoRA is applied,
which makes it part of the model everywhere the loop looks:

- the optimizer sees it (``setup`` re-enables its gradients after PEFT froze the non-adapter weights);
- checkpoints hold it: ``model.safetensors`` of ``checkpoints/step-N/`` has ``...v_head.weight`` and
  ``...v_head.bias`` next to the other weights, and ``load_checkpoint`` restores them;
- ``final/`` written by ``save_pretrained`` also carries ``v_head.weight`` / ``v_head.bias``;
  ``AutoModelForCausalLM.from_pretrained`` ignores them (reported as unused weights), and
  :func:`load_value_head` reads them back. :meth:`llmlab.stages.ppo.PPOStage.finalize` instead moves
  them to ``<stage>/value_head.safetensors`` and detaches the head, for a clean ``final/``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

V_HEAD = "v_head"


class ValueHead(nn.Module):
    """``[B, T, H] -> [B, T]`` scalar values. Zero-initialised: the first values are 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1).float()


def base_model(model: nn.Module) -> nn.Module:
    """The causal LM under DDP / compile / PEFT wrappers."""
    from llmlab.models.wrappers import unwrap

    model = unwrap(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def hidden_size(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    if head is not None and hasattr(head, "in_features"):
        return int(head.in_features)
    return int(model.config.hidden_size)


def attach_value_head(model: nn.Module) -> ValueHead:
    """Add (or return the existing) ``v_head`` submodule of the causal LM ``model``."""
    base = base_model(model)
    if not hasattr(base, V_HEAD):
        p = next(base.parameters())
        base.add_module(V_HEAD, ValueHead(hidden_size(base)).to(device=p.device))
    return getattr(base, V_HEAD)


def get_value_head(model: nn.Module) -> ValueHead:
    return getattr(base_model(model), V_HEAD)


def value_head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in get_value_head(model).state_dict().items()}


def save_value_head(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(value_head_state(model), str(path))


def load_value_head(model: nn.Module, path: Path) -> ValueHead:
    """Attach a value head to ``model`` and load it from ``value_head.safetensors`` or from a
    ``final/`` directory whose ``model.safetensors`` carries ``v_head.*`` tensors."""
    from safetensors.torch import load_file

    path = Path(path)
    head = attach_value_head(model)
    if path.is_dir():
        state = load_file(str(path / "model.safetensors"))
        state = {k.split(f"{V_HEAD}.", 1)[1]: v for k, v in state.items() if f"{V_HEAD}." in k}
    else:
        state = load_file(str(path))
    head.load_state_dict(state)
    return head
