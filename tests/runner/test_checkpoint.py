"""Atomic, checksummed checkpoints: what a kill or a corrupt file leaves behind still resumes."""

import json

import torch

from llmlab.train import checkpoint as ck


def _objs(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def _save(root, step, model, opt, sched, keep_last=5):
    return ck.save_checkpoint(root, step, model_state=ck.model_state(model), optimizer_state=opt.state_dict(),
                              scheduler=sched, stage_state={"buf": torch.arange(3)},
                              trainer_state={"fingerprint": "x"}, keep_last=keep_last)


def test_roundtrip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = _objs()
    torch.manual_seed(123)
    path = _save(tmp_path, 3, model, opt, sched)
    expected_next = torch.rand(4)
    m2, o2, s2 = _objs(seed=99)
    state = ck.load_checkpoint(path, model=m2, optimizer=o2, scheduler=s2)
    assert torch.equal(torch.rand(4), expected_next)  # RNG restored to the moment of the save
    for a, b in zip(model.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert s2.last_epoch == sched.last_epoch == 3
    assert torch.equal(o2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert state["trainer_state"]["step"] == 3 and torch.equal(state["stage_state"]["buf"], torch.arange(3))


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    model, opt, sched = _objs()
    _save(tmp_path, 10, model, opt, sched)
    newest = _save(tmp_path, 20, model, opt, sched)
    with open(newest / "model.safetensors", "r+b") as f:  # flip bytes in the middle of the weights
        f.seek(200)
        f.write(b"\x00\xff\x00\xff")
    assert "sha256" in ck.verify(newest)
    assert ck.latest_intact(tmp_path).name == "step-000010"
    assert "corrupt" in caplog.text


def test_truncated_file_and_unfinished_write_are_detected(tmp_path):
    model, opt, sched = _objs()
    good = _save(tmp_path, 1, model, opt, sched)
    bad = _save(tmp_path, 2, model, opt, sched)
    (bad / "optimizer.pt").write_bytes((bad / "optimizer.pt").read_bytes()[:10])
    assert "bytes" in ck.verify(bad)
    # a write killed before its manifest: a temp dir, never listed as a checkpoint
    tmp = tmp_path / ".tmp-step-000003-999"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]
    assert ck.latest_intact(tmp_path) == good
    no_manifest = tmp_path / "step-000004"
    no_manifest.mkdir()
    assert "MANIFEST" in ck.verify(no_manifest)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]


def test_keep_last_prunes_old_checkpoints_and_leftovers(tmp_path):
    from llmlab.ownership import make_dir

    model, opt, sched = _objs()
    root = tmp_path / "checkpoints"
    left = make_dir(make_dir(root, "checkpoints") / ".tmp-step-000009-1", "checkpoint")  # a killed write
    (left / "model.safetensors").write_bytes(b"half")
    for step in (1, 2, 3, 4):
        _save(root, step, model, opt, sched, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(root)] == ["step-000003", "step-000004"]
    assert not left.exists()
    manifest = json.loads((root / "step-000004" / "MANIFEST.json").read_text())
    assert set(manifest) == {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "rng.json",
                             "stage_state.pt", "trainer_state.json"}


def test_tied_weights_saved_once_and_reloaded(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.lm_head = torch.nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.embed.weight

    m = Tied()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    p = _save(tmp_path, 1, m, opt, sched)
    m2 = Tied()
    ck.load_checkpoint(p, model=m2)
    assert torch.equal(m2.lm_head.weight, m.embed.weight) and m2.lm_head.weight is m2.embed.weight
