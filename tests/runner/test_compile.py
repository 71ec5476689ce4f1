"""compile: true runs the loop through torch.compile, trains like eager, and saves plain weights."""

import torch

from llmlab.train.loop import train
from tests.runner.test_loop import ToyStage, _ctx


class NoDropoutToy(ToyStage):
    def build_model(self):
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def test_compile_switch_compiles_and_matches_eager(tmp_path):
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    eager, _ = train(NoDropoutToy(_ctx(tmp_path / "eager", max_steps=6)), fingerprint="f")
    dynamo.reset()
    counters.clear()
    ctx = _ctx(tmp_path / "compiled", max_steps=6)
    ctx.recipe["compile"] = True
    compiled, _ = train(NoDropoutToy(ctx), fingerprint="f")
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really compiled the forward
    assert not any("_orig_mod" in k for k in compiled.state_dict())  # the loop hands back the bare model
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    from safetensors.torch import load_file

    ckpt = sorted((tmp_path / "compiled" / "toy" / "checkpoints").iterdir())[-1]
    saved = load_file(str(ckpt / "model.safetensors"))  # checkpoints hold the bare model's names
    assert set(saved) == set(eager.state_dict())
    dynamo.reset()
