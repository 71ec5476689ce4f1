"""FSDP checkpoints as torch.distributed.checkpoint (DCP) shards: every rank writes its own file
inside llmlab's checksummed checkpoint folder, the shards load back resharded (2 ranks -> 1
process), older whole-state FSDP checkpoints still load, and a world-size change on resume says
what it does to the global batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmlab.train.checkpointer import batch_change
from tests.runner.test_distributed import ENV, _free_port, _launch, _recipe
from tests.tiny import TINY, write_recipe

FSDP = {"distributed": {"strategy": "fsdp"}}


def _gloo_world_of_one(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)


def _sharded_model_and_optimizer():
    from llmlab.config import DistributedConfig
    from llmlab.models.build import build_model
    from llmlab.train.fsdp import shard_model

    torch.manual_seed(0)
    model = build_model(TINY["model"], vocab_size=128)
    shard_model(model, DistributedConfig.from_dict({"strategy": "fsdp"}), torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 128, (2, 16))
    model(x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def test_dcp_shards_round_trip_into_a_plain_model_and_optimizer(monkeypatch, tmp_path):
    """Shards written by an FSDP model (gloo world of one) load, outside any process group,
    into a plain model and a plain AdamW bitwise: weights (tied embedding and head still one
    tensor) and every optimizer state tensor."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from llmlab.models.build import build_model
    from llmlab.train import dcp
    from llmlab.train.fsdp import ShardedStateIO

    _gloo_world_of_one(monkeypatch)
    try:
        model, opt = _sharded_model_and_optimizer()
        dcp.save(tmp_path, model, opt)
        io = ShardedStateIO()
        weights = io.model_state(model)
        optim = io.optimizer_state(model, opt)
    finally:
        dist.destroy_process_group()
    assert dcp.is_sharded(tmp_path) and (tmp_path / "__0_0.distcp").is_file()
    plain = build_model(TINY["model"], vocab_size=128)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    dcp.load(tmp_path, plain, plain_opt)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    state = plain.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    back = get_optimizer_state_dict(plain, plain_opt)
    assert back["state"].keys() == optim["state"].keys()
    for name, st in optim["state"].items():
        for k, v in st.items():
            assert torch.equal(back["state"][name][k], v), (name, k)
    # weights only (restoring the best checkpoint): the optimizer is not needed
    fresh = build_model(TINY["model"], vocab_size=128)
    dcp.load(tmp_path, fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in weights.items())
    # a model of another shape is refused, naming the folder
    other = build_model({**TINY["model"], "d_model": 32, "d_ff": 64}, vocab_size=128)
    with pytest.raises(RuntimeError, match=str(tmp_path)):
        dcp.load(tmp_path, other)


def test_sharded_checkpoint_folder_is_atomic_checksummed_and_owned(monkeypatch, tmp_path):
    """The shards go into the temporary folder first and are listed in MANIFEST.json; a flipped
    byte in a shard makes the checkpoint corrupt (the previous one is used); prune removes a
    sharded checkpoint whole (its .metadata and .distcp files are llmlab's)."""
    import torch.distributed as dist

    from llmlab.ownership import foreign_entries
    from llmlab.train import checkpoint as ck
    from llmlab.train import dcp

    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]), lambda s: 1.0)
    _gloo_world_of_one(monkeypatch)
    try:
        model, opt = _sharded_model_and_optimizer()
        for step in (1, 2, 3):
            tmp = ck.begin_checkpoint(tmp_path, step)
            dcp.save(tmp, model, opt)
            ck.save_checkpoint(tmp_path, step, model_state=None, optimizer_state=None, scheduler=sched,
                               stage_state={}, trainer_state={}, keep_last=2, tmp=tmp)
    finally:
        dist.destroy_process_group()
    ckpts = ck.list_checkpoints(tmp_path)
    assert [c.name for c in ckpts] == ["step-000002", "step-000003"]
    assert not (tmp_path / "step-000001").exists() and not list(tmp_path.glob(".tmp-*"))
    newest = ckpts[-1]
    manifest = json.loads((newest / "MANIFEST.json").read_text())
    assert {".metadata", "__0_0.distcp"} <= set(manifest) and "model.safetensors" not in manifest
    assert foreign_entries(newest) == []
    shard = newest / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert "fails its sha256" in ck.verify(newest)
    assert ck.latest_intact(tmp_path) == ckpts[0]


def test_a_whole_state_fsdp_checkpoint_of_the_previous_version_still_loads(monkeypatch, tmp_path):
    """A checkpoint as llmlab wrote it before DCP (the full state gathered on rank 0:
    model.safetensors and a name-keyed optimizer.pt) loads into a sharded model and optimizer
    through load_checkpoint; resume accepts its optimizer_format "fqn"."""
    import torch.distributed as dist

    from llmlab.train import checkpoint as ck
    from llmlab.train.fsdp import ShardedStateIO

    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]), lambda s: 1.0)
    io = ShardedStateIO()
    _gloo_world_of_one(monkeypatch)
    try:
        model, opt = _sharded_model_and_optimizer()
        weights, optim = io.model_state(model), io.optimizer_state(model, opt)
        weights = {k: v.clone() for k, v in weights.items()}  # in a world of one they may alias the live state
        optim = {"state": {n: {k: v.clone() for k, v in st.items()} for n, st in optim["state"].items()},
                 "param_groups": optim["param_groups"]}
        old = ck.save_checkpoint(tmp_path, 1, model_state=weights, optimizer_state=optim, scheduler=sched,
                                 stage_state={}, trainer_state={"optimizer_format": "fqn"})
        assert {"model.safetensors", "optimizer.pt"} <= {p.name for p in old.iterdir()}
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        for st in opt.state.values():
            for v in st.values():
                v.zero_()
        ck.load_checkpoint(old, model=model, optimizer=opt, state_io=io)
        back, back_optim = io.model_state(model), io.optimizer_state(model, opt)
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(back[k], v) for k, v in weights.items())
    for name, st in optim["state"].items():
        assert all(torch.equal(back_optim["state"][name][k], v) for k, v in st.items()), name


def test_batch_change_says_whether_the_data_order_continues():
    old = {"batch_size": 4, "gradient_accumulation_steps": 1, "world_size": 2}
    assert batch_change(None, old) is None and batch_change(old, dict(old)) is None
    kept = batch_change(old, {"batch_size": 4, "gradient_accumulation_steps": 2, "world_size": 1})
    assert "2 process(es), this run has 1" in kept and "continues exactly" in kept
    changed = batch_change(old, {"batch_size": 4, "gradient_accumulation_steps": 1, "world_size": 1})
    assert "from 8 to 4 examples" in changed and "dynamics" in changed
    # same global batch from a larger micro-batch: other examples per stream index
    assert "dynamics" in batch_change(old, {"batch_size": 8, "gradient_accumulation_steps": 1, "world_size": 1})


@pytest.mark.slow
def test_two_rank_dcp_checkpoint_resumes_resharded_on_one_process(tmp_path):
    """2 FSDP ranks (torchrun, gloo) write step 2 as DCP shards (one file per rank, no full
    state); those shards load into one plain process bitwise equal to the gathered final/ of the
    same step; and ``llmlab run`` continues the stage on one process from that checkpoint, saying
    that the global batch halves."""
    from llmlab.models.modeling_llmlab import LlmlabForCausalLM
    from llmlab.train import checkpoint as ck

    rec = _recipe(("pretrain",), FSDP, max_steps=2, save_every=2, keep_last=5)
    path = write_recipe(tmp_path, rec)
    r2 = subprocess.run([sys.executable, *_launch("torchrun"), "-m", "llmlab.cli", "run", str(path)],
                        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    stage = tmp_path / "run" / "pretrain"
    step2 = stage / "checkpoints" / "step-000002"
    names = {p.name for p in step2.iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= names
    assert not names & {"model.safetensors", "optimizer.pt"}
    assert ck.verify(step2) is None
    assert json.loads((step2 / "trainer_state.json").read_text())["batch"] == \
        {"batch_size": 4, "gradient_accumulation_steps": 1, "world_size": 2}
    final = load_file(stage / "final" / "model.safetensors")
    plain = LlmlabForCausalLM.from_pretrained(stage / "final")
    with torch.no_grad():
        for p in plain.parameters():
            p.zero_()
    ck.load_checkpoint(step2, model=plain)  # no process group: whole tensors from both ranks' shards
    state = plain.state_dict()
    assert all(torch.equal(state[k], v) for k, v in final.items())

    rec["stages"]["pretrain"]["max_steps"] = 3  # extend: resumes from step 2, now in one process
    r1 = subprocess.run([sys.executable, "-m", "llmlab.cli", "run", str(write_recipe(tmp_path, rec))],
                        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    out = r1.stdout + r1.stderr
    assert r1.returncode == 0, out[-3000:]
    info = json.loads((stage / "stage.json").read_text())
    assert info["resumed_from"] == 2 and info["distributed"]["world_size"] == 1, out[-3000:]
    assert "written by 2 process(es), this run has 1" in out and "from 8 to 4 examples" in out, out[-3000:]
    assert "weights only" not in out, out[-3000:]  # the optimizer state was resharded too
    step3 = json.loads((stage / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert step3["optimizer_format"] == "param_index"  # one process writes the whole state again


@pytest.mark.slow
def test_fsdp_save_best_only_resumes_and_ends_with_the_best_checkpoints_weights(tmp_path):
    """2 FSDP ranks with ``save_best_only`` and an evaluation every step: a run extended from its
    step-2 checkpoint (every rank must know the best step: restoring it is a collective) ends
    with final/ equal to the weights of the best checkpoint it names, which pruning kept."""
    from llmlab.models.modeling_llmlab import LlmlabForCausalLM
    from llmlab.train import checkpoint as ck

    rec = _recipe(("pretrain",), FSDP, max_steps=2, save_every=100, keep_last=1, eval_every=1, save_best_only=True)

    def run():
        done = subprocess.run([sys.executable, *_launch("torchrun"), "-m", "llmlab.cli", "run",
                               str(write_recipe(tmp_path, rec))], cwd=tmp_path, env=ENV, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run()
    rec["stages"]["pretrain"]["max_steps"] = 4
    run()
    stage = tmp_path / "run" / "pretrain"
    assert json.loads((stage / "stage.json").read_text())["resumed_from"] == 2
    last = json.loads((stage / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    best = stage / "checkpoints" / f"step-{last['best_step']:06d}"
    assert ck.verify(best) is None
    plain = LlmlabForCausalLM.from_pretrained(stage / "final")
    final = {k: v.clone() for k, v in plain.state_dict().items()}
    ck.load_checkpoint(best, model=plain)
    assert all(torch.equal(v, final[k]) for k, v in plain.state_dict().items())


@pytest.mark.slow
def test_fsdp_with_compile_trains_and_checkpoints_the_uncompiled_names(tmp_path):
    """``compile: true`` under 2 FSDP ranks (torch.compile wraps the sharded model): the stage
    trains, and its DCP checkpoint is keyed by the model's own parameter names (no
    ``_orig_mod.`` prefix), so it loads into a plain model equal to final/."""
    from llmlab.models.modeling_llmlab import LlmlabForCausalLM
    from llmlab.train import checkpoint as ck

    rec = _recipe(("pretrain",), {**FSDP, "compile": True}, max_steps=2, save_every=2)
    done = subprocess.run([sys.executable, *_launch("torchrun"), "-m", "llmlab.cli", "run",
                           str(write_recipe(tmp_path, rec))], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stage = tmp_path / "run" / "pretrain"
    assert json.loads((stage / "stage.json").read_text())["distributed"]["strategy"] == "FSDP"
    plain = LlmlabForCausalLM.from_pretrained(stage / "final")
    final = {k: v.clone() for k, v in plain.state_dict().items()}
    with torch.no_grad():
        for p in plain.parameters():
            p.zero_()
    ck.load_checkpoint(stage / "checkpoints" / "step-000002", model=plain)
    assert all(torch.equal(v, final[k]) for k, v in plain.state_dict().items())


def test_plan_says_when_a_resume_under_another_world_size_changes_the_global_batch(tmp_path):
    """A stage with a checkpoint written by 2 processes: planned for 1 process, its status says
    the global batch halves; for 2 it says nothing more."""
    from llmlab.plan import plan_rows
    from llmlab.recipe import load_recipe

    rec = _recipe(("pretrain",), FSDP, max_steps=8, gradient_accumulation_steps=1)
    resolved, errors = load_recipe(write_recipe(tmp_path, rec), [])
    assert not errors
    ckpt = Path(resolved["output_dir"]) / "pretrain" / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    batch = {"batch_size": 4, "gradient_accumulation_steps": 1, "world_size": 2}
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "batch": batch}))
    one = plan_rows(resolved, world_size=1)[0][0]
    assert one["status"] == "partial" and "global batch changes from 8 to 4" in one["status_detail"], one
    two = plan_rows(resolved, world_size=2)[0][0]
    assert two["status_detail"] == "at step 2"


def test_pending_async_save_finalises_only_after_the_upload_and_reports_failures():
    """The folder is finalised only once the shards' upload completed; a failed upload is never
    finalised, and an upload or finalisation error comes back from wait() as text, not raised
    in the writer thread."""
    from concurrent.futures import Future

    from llmlab.train.checkpointer import PendingSave

    calls = []
    upload = Future()
    pending = PendingSave(4, upload, lambda: calls.append("finalised") or "/ckpt/step-000004")
    assert calls == []  # the shards are still being written
    upload.set_result(None)
    assert pending.wait() == ("/ckpt/step-000004", None) and calls == ["finalised"]
    failed = Future()
    pending = PendingSave(6, failed, lambda: calls.append("wrongly finalised"))
    failed.set_exception(OSError(28, "No space left on device"))
    path, error = pending.wait()
    assert path is None and "No space left" in error and calls == ["finalised"]
    done = Future()
    done.set_result(None)

    def boom():
        raise RuntimeError("manifest")

    assert PendingSave(8, done, boom).wait() == (None, "RuntimeError: manifest")
    assert PendingSave(8, done, None).wait() == (None, None)  # ranks other than 0 finalise nothing
