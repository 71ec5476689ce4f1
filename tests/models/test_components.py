"""The Transformer's component registries (llmlab.models.modeling_llmlab): every value the recipe
schema offers for a component has a registered implementation and a place in the configuration's
name tuple, and nothing is registered that the schema does not offer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmlab.models import configuration_llmlab as conf
from llmlab.models import modeling_llmlab as modeling
from tests.models.conftest import VOCAB, make_model

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "recipe.schema.json").read_text())
TRANSFORMER = SCHEMA["$defs"]["model_transformer"]["properties"]

CASES = {  # recipe key -> (configuration's names, registry or None when the config alone decides)
    "norm_type": (conf.NORM_TYPES, modeling.NORMS),
    "activation": (conf.ACTIVATIONS, modeling.ACTIVATION_FUNCTIONS),
    "positional_encoding": (conf.POSITIONAL_ENCODINGS, modeling.POSITION_ENCODINGS),
    "attention_type": (conf.ATTENTION_TYPES, None),  # mha/mqa/gqa: n_kv_heads of one attention module
}


@pytest.mark.parametrize("key", sorted(CASES))
def test_schema_enum_config_names_and_registry_agree(key):
    enum = set(TRANSFORMER[key]["enum"]) - {None}
    names, registry = CASES[key]
    assert set(names) == enum, f"configuration_llmlab's names for {key} differ from the schema's enum"
    if registry is not None:
        assert set(registry) == enum, f"registered {key} components differ from the schema's enum"


def test_an_unknown_component_is_refused_naming_the_registered_ones():
    with pytest.raises(ValueError, match=r"norm_type must be one of \['layernorm', 'rmsnorm'\]"):
        modeling.component(modeling.NORMS, "norm_type", "scalenorm")


def test_a_registered_norm_is_what_the_model_builds(monkeypatch):
    """A new norm is one registered class (plus its schema enum value and config name)."""

    class ScaleNorm(torch.nn.Module):  # Nguyen & Salazar 2019: g * x / ||x||
        def __init__(self, dim, eps=1e-5):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1) * dim ** 0.5)
            self.eps = eps

        def forward(self, x):
            return self.weight * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)

    monkeypatch.setitem(modeling.NORMS, "scalenorm", ScaleNorm)
    monkeypatch.setattr(conf, "NORM_TYPES", conf.NORM_TYPES + ("scalenorm",))
    model = make_model(norm_type="scalenorm")
    norms = [m for m in model.modules() if isinstance(m, ScaleNorm)]
    assert len(norms) == 2 * model.config.n_layers + 1  # two per block and the final norm
    out = model(torch.randint(0, VOCAB, (2, 8))).logits
    assert out.shape == (2, 8, VOCAB) and torch.isfinite(out).all()
