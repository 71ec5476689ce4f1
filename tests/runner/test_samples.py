"""sample_prompts / sample_every: greedy and sampled replies in metrics.jsonl at the sampling steps,
equal to ``llmlab generate`` on the same weights, shown by ``llmlab report``, and without any
effect on the trained weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from llmlab.commands.inference import generate_command
from llmlab.report import report_command
from llmlab.commands.run import run_command
from tests.tiny import TINY, write_recipe

pytestmark = pytest.mark.slow

PROMPTS = ["Hello", "What is your name?"]


def _recipe(d, samples: bool):
    rec = copy.deepcopy(TINY)
    rec["stages"] = {"sft": rec["stages"]["sft"]}
    rec["stages"]["sft"].update(max_steps=10, eval_every=10, save_every=10)
    if samples:
        rec["stages"]["sft"].update(sample_prompts=PROMPTS, sample_every=4)
    return write_recipe(d, rec)


def test_samples_are_logged_match_generate_and_leave_the_weights_alone(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert run_command(_recipe(a, samples=True)) == 0
    assert run_command(_recipe(b, samples=False)) == 0
    stage = a / "run" / "sft"
    records = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    samples = [r for r in records if "samples" in r]
    assert [r["step"] for r in samples] == [0, 4, 8, 10]  # before training, every 4, the last step
    for r in samples:
        assert [s["prompt"] for s in r["samples"]] == PROMPTS
        assert all(isinstance(s["greedy"], str) and isinstance(s["sampled"], str) for s in r["samples"])
        assert [s["seed"] for s in r["samples"]] == [TINY["seed"], TINY["seed"] + 1]

    # sampling draws from a forked RNG and runs in eval mode: the training is bitwise the same
    wa, wb = (load_file(str(d / "run" / "sft" / "final" / "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k

    # the last step's replies are llmlab generate's on final/ (greedy; sampled with seed + index)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in PROMPTS))
    last = {s["prompt"]: s for s in samples[-1]["samples"]}
    for kind, temperature in (("greedy", 0.0), ("sampled", 0.8)):
        out = tmp_path / f"{kind}.jsonl"
        assert generate_command(a / "run", prompts=prompts, output=out, stage="sft", seed=TINY["seed"],
                                temperature=temperature, chat=True, device="cpu") == 0
        for row in map(json.loads, out.read_text().splitlines()):
            assert row["completion"] == last[row["prompt"]][kind], (kind, row)

    capsys.readouterr()
    assert report_command(a / "run", output=tmp_path / "r.png") == 0
    shown = capsys.readouterr().out
    assert "replies to sample_prompts" in shown and "What is your name?" in shown
