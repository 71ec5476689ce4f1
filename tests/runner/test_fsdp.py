"""``distributed.strategy: fsdp`` on CPU (gloo, 2 processes): the same training as one process
with the same global batch, exact resume after a kill, a plain Hugging Face final/, and the
recipe checks that refuse what FSDP cannot shard."""

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from llmlab.recipe import load_recipe
from tests.runner.test_distributed import ENV, _launch, _one_and_two, _recipe
from tests.tiny import write_recipe

FSDP = {"distributed": {"strategy": "fsdp"}}


def _final(d: Path, stage: str) -> dict:
    return load_file(d / "run" / stage / "final" / "model.safetensors")


def _steps_logged(d: Path, stage: str) -> list[int]:
    lines = [json.loads(x) for x in (d / "run" / stage / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in lines if "loss" in r]


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_for_pretrain_lora_sft_and_dpo(tmp_path):
    """Byte-equal weights without gradient clipping (with it, the global norm summed from shards
    differs from the whole model's in the last bits; docs/distributed.md gives the size)."""
    from llmlab.models.modeling_llmlab import LlmlabForCausalLM

    single, multi, r2 = _one_and_two(tmp_path, "torchrun", stages=("pretrain", "sft", "dpo"), top=FSDP, max_steps=3,
                                     grad_clip=None, per_stage={"sft": {"lora": {"r": 4, "alpha": 8}}})
    assert "processes: 2 (FSDP, gloo)" in r2.stdout
    assert r2.stdout.count("▶ stage sft") == 1, r2.stdout[-3000:]
    for stage in ("pretrain", "sft", "dpo"):
        info = json.loads((multi / "run" / stage / "stage.json").read_text())
        assert info["distributed"] == {"world_size": 2, "strategy": "FSDP", "backend": "gloo"}
        assert _steps_logged(multi, stage) == [1, 2, 3]
        a, b = _final(single, stage), _final(multi, stage)
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst == 0.0, (stage, worst)
    # the LoRA sft stage was merged into a plain model; final/ is a Hugging Face checkpoint
    assert not (multi / "run" / "sft" / "adapter").exists()
    assert not any("lora" in k for k in _final(multi, "sft"))
    model = LlmlabForCausalLM.from_pretrained(multi / "run" / "dpo" / "final")  # transformers' loader
    loaded = model.state_dict()
    assert all(float((loaded[k] - v).abs().max()) == 0.0 for k, v in _final(multi, "dpo").items())


@pytest.mark.slow
def test_fsdp_resume_after_kill_equals_uninterrupted_run(tmp_path):
    """Under accelerate launch: SIGKILL a 2-process FSDP run after its step-4 checkpoint, rerun
    it, and reach bitwise the weights of a 2-process FSDP run that never stopped (grad clipping on)."""
    rec = _recipe(("pretrain",), FSDP, max_steps=8, save_every=2, keep_last=5)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()

    def cmd(d: Path) -> list[str]:
        return [sys.executable, *_launch("accelerate"), "-m", "llmlab.cli", "run", str(write_recipe(d, rec))]

    done = subprocess.run(cmd(a), cwd=a, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    p = subprocess.Popen(cmd(b), cwd=b, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = b / "run" / "pretrain" / "checkpoints" / "step-000004" / "MANIFEST.json"
    t0 = time.time()
    while not manifest.exists() and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    # the launcher's workers may sit in sessions of their own: kill the whole process tree
    tree = psutil.Process(p.pid).children(recursive=True)
    for proc in [psutil.Process(p.pid), *tree]:
        proc.kill()
    p.wait()
    psutil.wait_procs(tree, timeout=30)
    assert not (b / "run" / "pretrain" / "final").exists()
    again = subprocess.run(cmd(b), cwd=b, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    info = json.loads((b / "run" / "pretrain" / "stage.json").read_text())
    assert (info["resumed_from"] or 0) >= 4 and info["distributed"]["strategy"] == "FSDP", again.stdout[-3000:]
    x, y = _final(a, "pretrain"), _final(b, "pretrain")
    assert max(float((x[k] - y[k]).abs().max()) for k in x) == 0.0


@pytest.mark.parametrize("path,value,where", [
    ("stages.pretrain.optimizer.name", "muon", "stages.pretrain.optimizer.name: optimizer muon does not train"),
    ("stages.sft.optimizer.name", "sophia", "stages.sft.optimizer.name: optimizer sophia does not train"),
    ("stages.sft.lora", {"r": 4, "quantize": "4bit"}, "stages.sft.lora.quantize: a quantized LoRA base"),
    ("precision", "fp16", "precision: precision fp16 (loss scaling) is not supported"),
])
def test_validate_refuses_what_fsdp_cannot_shard(tmp_path, path, value, where):
    rec = _recipe(("pretrain", "sft"), FSDP)
    node = rec
    *parents, last = path.split(".")
    for k in parents:
        node = node[k]
    node[last] = value
    _, errors = load_recipe(write_recipe(tmp_path, rec), [])
    assert any(where in str(e) for e in errors), [str(e) for e in errors]
    rec["distributed"]["strategy"] = "ddp"
    _, errors = load_recipe(write_recipe(tmp_path, rec), [])
    assert not any("fsdp" in str(e) for e in errors), [str(e) for e in errors]


def test_plan_per_device_memory_and_tokens_per_step_follow_world_size_and_strategy(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from llmlab.cli import app
    from llmlab.plan import plan_rows

    rec = _recipe(("pretrain",), max_steps=10, gradient_accumulation_steps=3)
    rec["stages"]["pretrain"]["batch_size"] = 4
    path = write_recipe(tmp_path, rec)
    ddp, _ = load_recipe(path, [])
    fsdp, _ = load_recipe(path, ["distributed.strategy=fsdp"])

    def row(r, n):
        rows, facts = plan_rows(r, world_size=n)
        return rows[0], facts

    one, facts1 = row(ddp, 1)
    assert one["tokens_per_step"] == 4 * 64 * 3 and facts1["world_size"] == 1
    eight, _ = row(ddp, 8)
    assert eight["tokens_per_step"] == 4 * 64 * 3 * 8 and eight["tokens"] == 8 * one["tokens"]
    assert eight["memory"] == one["memory"]  # ddp: every process holds everything
    sharded, facts = row(fsdp, 8)
    assert facts["sharded"] and sharded["tokens_per_step"] == eight["tokens_per_step"]
    for part in ("weights", "grads", "optimizer"):
        assert sharded["memory"][part] * 8 >= one["memory"][part] > sharded["memory"][part] * 7
    assert sharded["memory"]["activations"] == one["memory"]["activations"]
    assert row(fsdp, 1)[0]["memory"] == one["memory"]  # one process: fsdp is a no-op
    # the CLI flag, and $WORLD_SIZE (set by torchrun) as its default
    out = CliRunner().invoke(app, ["plan", str(path), "--set", "distributed.strategy=fsdp", "--world-size", "4"])
    assert out.exit_code == 0, out.output
    assert "4 processes, fsdp" in out.output and "memory per device" in out.output
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = CliRunner().invoke(app, ["plan", str(path)])
    assert "2 processes, ddp" in out.output, out.output


def test_shard_then_gather_gives_back_the_plain_model_with_tied_weights(monkeypatch):
    """In one process (a gloo world of 1): fully_shard per block + root, one AdamW step, then the
    full state gathered into rank 0's meta skeleton equals the sharded model's weights, the
    skeleton is a plain (un-sharded) model with its embedding and LM head still one tensor, and a
    whole-model checkpoint state loads back into the shards."""
    import torch
    import torch.distributed as dist

    from llmlab.config import DistributedConfig
    from llmlab.models.build import build_model
    from llmlab.train.fsdp import ShardedStateIO, gather_full_model, meta_skeleton, shard_model
    from tests.runner.test_distributed import _free_port
    from tests.tiny import TINY

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build_model(TINY["model"], vocab_size=128)
        skeleton = meta_skeleton(model)
        assert all(p.is_meta for p in skeleton.parameters())
        shard_model(model, DistributedConfig.from_dict({"strategy": "fsdp"}), torch.device("cpu"))
        assert type(model).__name__.startswith("FSDP") and type(model.model.layers[0]).__name__.startswith("FSDP")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x = torch.randint(0, 128, (2, 16))
        model(x, labels=x).loss.backward()
        opt.step()
        io = ShardedStateIO()
        saved = io.model_state(model)
        plain = gather_full_model(model, skeleton, is_main=True)
        assert plain is skeleton and not any(type(m).__name__.startswith("FSDP") for m in plain.modules())
        assert plain.lm_head.weight is plain.model.embed_tokens.weight
        for k, v in plain.state_dict().items():
            assert torch.equal(v, saved.get(k, saved["model.embed_tokens.weight"])), k
        with torch.no_grad():
            assert torch.equal(plain(x).logits, model(x).logits)
        # a checkpoint's whole-model state (tied weight once) loads back into the shards
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        io.load_model(model, {k: v.clone() for k, v in saved.items()}, "test")
        back = io.model_state(model)
        assert back.keys() == saved.keys() and all(torch.equal(back[k], v) for k, v in saved.items())
    finally:
        dist.destroy_process_group()
