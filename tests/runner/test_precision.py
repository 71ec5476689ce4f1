"""``precision: auto`` picks by the model's width on a CPU (llmlab.session.resolve_precision)."""

from __future__ import annotations

import torch

from llmlab import session
from llmlab.schemafile import schema_filled
from llmlab.specs import model_spec

CPU = torch.device("cpu")


def _spec(d_model: int):
    return model_spec(schema_filled("#/properties/model", {"arch": "transformer", "d_model": d_model, "n_layers": 2,
                                                           "n_heads": 4, "max_seq_len": 64}))


def test_auto_on_a_bf16_cpu_is_fp32_below_the_measured_width(monkeypatch):
    monkeypatch.setattr(session, "cpu_supports_bf16", lambda: True)
    narrow, wide = session.CPU_BF16_MIN_D_MODEL // 2, session.CPU_BF16_MIN_D_MODEL
    assert session.resolve_precision("auto", CPU, _spec(narrow)) == "fp32"
    assert session.resolve_precision("auto", CPU, _spec(wide)) == "bf16"
    assert session.resolve_precision("auto", CPU, None) == "bf16"  # a checkpoint of unknown width


def test_auto_without_native_bf16_and_pinned_values(monkeypatch):
    monkeypatch.setattr(session, "cpu_supports_bf16", lambda: False)
    assert session.resolve_precision("auto", CPU, _spec(512)) == "fp32"
    assert session.resolve_precision("bf16", CPU, _spec(32)) == "bf16"  # a pinned value is kept
    assert session.resolve_precision("fp32", CPU, _spec(4096)) == "fp32"
