"""The training loop on a toy stage: NaN handling, exact resume, extension, optimizer reset."""

import json
import math

import pytest
import torch

from llmlab.stages.base import Stage, StageContext
from llmlab.train.loop import TrainingError, train


class ToyStage(Stage):
    """Linear regression whose batches are a pure function of the index."""

    type = "toy"
    data = None  # batches come from get_batch below, not from llmlab.data
    nan_at: int | None = None  # training micro-batch whose loss becomes NaN
    crash_at: int | None = None  # micro-batch index at which the process "dies"

    def build_model(self):
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))

    def get_batch(self, index, model):
        if index == self.crash_at:
            raise KeyboardInterrupt("simulated kill")
        g = torch.Generator().manual_seed(1000 + index)
        x = torch.randn(4, 8, generator=g)
        return {"x": x, "y": x.sum(dim=1, keepdim=True)}

    def eval_batches(self):
        return [self.get_batch(-1 - i, None) for i in range(2)]

    def compute_loss(self, model, batch):
        loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
        if model.training:
            if self._calls == self.nan_at:
                loss = loss * float("nan")
            self._calls += 1
        return loss, {"mse": loss.detach()}

    _calls = 0


def _ctx(tmp_path, compile: bool = False, **cfg):
    config = {"type": "pretrain", "max_steps": 12, "batch_size": 4, "save_every": 4, "eval_every": 4, "log_every": 1,
              "keep_last": 5, "optimizer": {"name": "adamw", "lr": 1e-2}, "scheduler": {"name": "cosine", "warmup_steps": 2}}
    config.update(cfg)
    recipe = {"seed": 3, "output_dir": str(tmp_path), "model": {}, "stages": {"toy": config}, "compile": compile}
    return StageContext.bare(recipe, "toy")


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_nan_loss_stops_with_the_step_and_keeps_last_checkpoint(tmp_path):
    stage = ToyStage(_ctx(tmp_path))
    stage.nan_at = 6  # the 7th micro-batch: step 7
    with pytest.raises(TrainingError, match=r"at step 7.*step-000004"):
        train(stage, fingerprint="f")
    ckpts = sorted(p.name for p in (tmp_path / "toy" / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step-000004"]


def test_resume_midway_is_bitwise_identical(tmp_path):
    full, _ = train(ToyStage(_ctx(tmp_path / "a")), fingerprint="f")
    crashing = ToyStage(_ctx(tmp_path / "b"))
    crashing.crash_at = 10  # dies during step 11, after the checkpoint at step 8
    with pytest.raises(KeyboardInterrupt):
        train(crashing, fingerprint="f")
    resumed_stage = ToyStage(_ctx(tmp_path / "b"))
    resumed, result = train(resumed_stage, fingerprint="f")
    assert result.resumed_from == 8
    for a, b in zip(_params(full), _params(resumed)):
        assert torch.equal(a, b)
    # metrics.jsonl after a resume holds each step once
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "toy" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == sorted(set(steps)) and steps[-1] == 12


def test_schedule_recomputed_when_max_steps_is_raised(tmp_path):
    ctx = _ctx(tmp_path, max_steps=8)
    train(ToyStage(ctx), fingerprint="f")
    _, result = train(ToyStage(_ctx(tmp_path, max_steps=16)), fingerprint="f")
    assert result.resumed_from == 8 and result.steps == 16
    lrs = {json.loads(x)["step"]: json.loads(x)["lr"] for x in (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()
           if "lr" in json.loads(x)}
    # cosine over 16 steps (2 warmup) with a 0.1 floor, evaluated after step 9's update
    progress = (9 - 2) / (16 - 2)
    expected = 1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert lrs[9] == pytest.approx(expected, rel=1e-6)


def test_changed_optimizer_loads_weights_only(tmp_path):
    train(ToyStage(_ctx(tmp_path, max_steps=4)), fingerprint="f")
    with pytest.warns(UserWarning, match="loading the weights only"):
        _, result = train(ToyStage(_ctx(tmp_path, max_steps=8, optimizer={"name": "lion", "lr": 1e-3})), fingerprint="f")
    assert result.resumed_from == 4 and result.steps == 8
