"""llmlab deletes or overwrites only what it wrote (issue 24 items 1, 2, 10, 11, 12).

Every folder llmlab creates carries its marker (llmlab.ownership); a user's folder is refused, a
user's file in an llmlab folder survives --force, checkpoint pruning and a rewrite of final/.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch

from llmlab.ownership import MARKER, NotOwnedError, claim_run_dir, make_dir, mark, owns, remove_owned, writing_folder
from llmlab.commands.run import run_command
from llmlab.runner import Runner
from llmlab.train import checkpoint as ck
from tests.tiny import TINY, write_recipe

SHORT = {**TINY, "stages": {"pretrain": {**TINY["stages"]["pretrain"], "max_steps": 4, "save_every": 2,
                                         "eval_every": 2, "log_every": 1, "keep_last": 1}}}
SECRET = "wandb-0123456789abcdef"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(recipe, run directory) of a finished 4-step pretrain; tests copy the directory."""
    d = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(d, SHORT)
    assert run_command(recipe) == 0
    return recipe, d / "run"


def _copy(finished, tmp_path) -> tuple[Path, Path]:
    recipe, run = finished
    shutil.copytree(run, tmp_path / "run")
    return recipe, tmp_path / "run"


# -- item 1: a user's folder ----------------------------------------------------------------------
def test_a_users_folder_is_refused_with_a_list_and_not_one_byte_changes(tmp_path, capsys):
    recipe = write_recipe(tmp_path, SHORT)
    out = tmp_path / "mine"
    for rel, data in (("pretrain/final/my_model.bin", b"weights"), ("pretrain/checkpoints/step-000001/data.bin", b"d"),
                      ("recipe.resolved.yaml", b"my notes"), ("pretrain/metrics.jsonl", b"{}\n")):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    before = _snapshot(out)
    for adopt in (False, True):  # --adopt refuses too: pretrain/ and recipe.resolved.yaml are names llmlab writes
        assert run_command(recipe, output_dir=out, adopt=adopt) == 1
        said = " ".join(capsys.readouterr().out.split())
        assert "pretrain" in said and "recipe.resolved.yaml" in said, said
        assert ("--adopt" in said) if not adopt else ("names llmlab writes" in said)
        assert _snapshot(out) == before
        assert sorted(p.name for p in out.iterdir()) == ["pretrain", "recipe.resolved.yaml"]  # no lock, no marker


def test_a_link_to_a_users_folder_is_refused_too(tmp_path, capsys):
    recipe = write_recipe(tmp_path, SHORT)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    assert run_command(recipe, output_dir=tmp_path / "link") == 1
    assert "notes.txt" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_adopt_runs_beside_the_users_files_and_keeps_them(tmp_path, capsys):
    recipe = write_recipe(tmp_path, SHORT)
    out = tmp_path / "mine"
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "cat.jpg").write_bytes(b"cat")
    (out / "notes.txt").write_text("mine")
    assert run_command(recipe, output_dir=out) == 1
    assert "notes.txt" in capsys.readouterr().out
    assert run_command(recipe, output_dir=out, adopt=True) == 0
    assert owns(out, "run") and owns(out / "pretrain", "stage") and owns(out / "pretrain" / "final", "final")
    assert (out / "notes.txt").read_text() == "mine" and (out / "photos" / "cat.jpg").read_bytes() == b"cat"
    assert run_command(recipe, output_dir=out) == 0  # now llmlab's: no --adopt needed again
    assert "skipped" in capsys.readouterr().out


# -- item 2: a user's file inside llmlab's stage folder ---------------------------------------------
def test_force_and_a_stale_stage_keep_the_users_files(finished, tmp_path, capsys):
    recipe, run = _copy(finished, tmp_path)
    stage = run / "pretrain"
    (stage / "notes.txt").write_text("my notes")
    (stage / "final" / "README.md").write_text("my model card")
    capsys.readouterr()
    # final/README.md is refused before anything is deleted or trained
    assert run_command(recipe, output_dir=run, force=True) == 1
    assert "README.md" in capsys.readouterr().out
    assert (stage / "final" / "config.json").is_file() and (stage / "stage.json").is_file()
    (stage / "final" / "README.md").unlink()
    assert run_command(recipe, output_dir=run, force=True) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "kept" in said and "notes.txt" in said
    assert (stage / "notes.txt").read_text() == "my notes"
    assert json.loads((stage / "stage.json").read_text())["status"] == "done"
    # a recipe edit that makes the stage stale
    assert run_command(recipe, output_dir=run, overrides=["stages.pretrain.optimizer.lr=0.003"]) == 0
    assert (stage / "notes.txt").read_text() == "my notes"


def test_remove_owned_deletes_llmlab_files_only(tmp_path):
    stage = make_dir(tmp_path / "run" / "pretrain", "stage")
    for name in ("stage.json", "metrics.jsonl", "notes.txt"):
        (stage / name).write_text("x")
    final = make_dir(stage / "final", "final")
    (final / "model.safetensors").write_text("w")
    mark(final, "final", ["model.safetensors"])
    (final / "mine.bin").write_text("u")
    theirs = stage / "data"
    theirs.mkdir()
    (theirs / "a.csv").write_text("1")
    assert remove_owned(stage) == ["data/", "final/mine.bin", "notes.txt"]
    assert sorted(p.name for p in stage.iterdir()) == [MARKER, "data", "final", "notes.txt"]
    assert sorted(p.name for p in final.iterdir()) == [MARKER, "mine.bin"]
    for p in (stage / "notes.txt", final / "mine.bin", theirs / "a.csv"):
        p.unlink()
    theirs.rmdir()
    assert remove_owned(stage) == [] and not stage.exists()
    user = tmp_path / "user"
    user.mkdir()
    (user / "stage.json").write_text("{}")  # a name llmlab writes does not make a folder llmlab's
    with pytest.raises(NotOwnedError, match="stage.json"):
        remove_owned(user)
    assert (user / "stage.json").is_file()
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(NotOwnedError):
        remove_owned(afile)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert remove_owned(empty) == [] and not empty.exists()


def test_final_is_never_written_over_a_users_folder(tmp_path):
    stage = make_dir(tmp_path / "pretrain", "stage")
    (stage / "final").mkdir()
    (stage / "final" / "my_model.bin").write_bytes(b"weights")
    with pytest.raises(NotOwnedError, match="my_model.bin"):
        with writing_folder(stage / ".final.tmp", stage / "final", "final"):
            raise AssertionError("refused before anything is written")
    assert (stage / "final" / "my_model.bin").read_bytes() == b"weights"
    assert not (stage / ".final.tmp").exists()


# -- migration: a run directory of an llmlab before markers ------------------------------------------
def _strip_markers(run: Path) -> None:
    for m in run.rglob(MARKER):
        m.unlink()


def test_a_run_dir_without_markers_is_recognised_resumed_and_cleaned_only_of_llmlab_files(finished, tmp_path, capsys):
    recipe, run = _copy(finished, tmp_path)
    _strip_markers(run)
    stage = run / "pretrain"
    (stage / "notes.txt").write_text("mine")
    (stage / "checkpoints" / "step-000099").mkdir()  # a user's look-alike: no MANIFEST.json
    (stage / "checkpoints" / "step-000099" / "data.bin").write_bytes(b"d")
    capsys.readouterr()
    assert run_command(recipe, output_dir=run) == 0  # done: skipped, and the folders llmlab wrote are marked
    said = " ".join(capsys.readouterr().out.split())
    assert "skipped" in said and "before ownership markers" in said
    assert owns(run, "run") and owns(stage, "stage") and owns(stage / "final", "final")
    assert owns(run / "tokenizer", "tokenizer")
    assert [p.name for p in ck.list_checkpoints(stage / "checkpoints")] == ["step-000004"]
    assert not owns(stage / "checkpoints" / "step-000099")
    assert run_command(recipe, output_dir=run, force=True) == 0
    assert (stage / "notes.txt").read_text() == "mine"
    assert (stage / "checkpoints" / "step-000099" / "data.bin").read_bytes() == b"d"


def test_a_partial_run_without_markers_resumes(finished, tmp_path, capsys):
    recipe, run = _copy(finished, tmp_path)
    stage = run / "pretrain"
    shutil.rmtree(stage / "final")
    info = json.loads((stage / "stage.json").read_text())
    info.update(status="running", outputs=None)
    (stage / "stage.json").write_text(json.dumps(info))
    _strip_markers(run)
    (stage / "checkpoints" / "step-000004").rename(stage / "checkpoints" / "step-000002")  # killed after step 2
    trainer = stage / "checkpoints" / "step-000002" / "trainer_state.json"
    # keep its manifest true: rewrite the step and the manifest's entry together
    state = json.loads(trainer.read_text())
    state["step"] = 2
    trainer.write_text(json.dumps(state, indent=2))
    manifest = json.loads((trainer.parent / "MANIFEST.json").read_text())
    manifest["trainer_state.json"] = {"sha256": ck.sha256_file(trainer), "size": trainer.stat().st_size}
    (trainer.parent / "MANIFEST.json").write_text(json.dumps(manifest))
    assert run_command(recipe, output_dir=run) == 0
    assert "resumed" in capsys.readouterr().out
    assert json.loads((stage / "stage.json").read_text())["resumed_from"] == 2


# -- checkpoints -----------------------------------------------------------------------------------
def _objs():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _save(root, step, keep_last=1):
    model, opt, sched = _objs()
    return ck.save_checkpoint(root, step, model_state=ck.model_state(model), optimizer_state=opt.state_dict(),
                              scheduler=sched, stage_state={}, trainer_state={}, keep_last=keep_last)


def test_pruning_and_a_resave_never_touch_a_users_step_folder(tmp_path):
    root = make_dir(tmp_path / "checkpoints", "checkpoints")
    theirs = root / "step-000001"
    theirs.mkdir()
    (theirs / "data.bin").write_bytes(b"user")
    with pytest.raises(NotOwnedError, match="data.bin"):
        _save(root, 1)
    _save(root, 2)
    (root / "step-000002" / "plot.png").write_bytes(b"png")  # a user's file put into a checkpoint
    for step in (3, 4):
        _save(root, step)
    assert (theirs / "data.bin").read_bytes() == b"user"
    assert [p.name for p in ck.list_checkpoints(root)] == ["step-000004"]
    assert sorted(p.name for p in root.iterdir() if p.name != MARKER) == ["step-000001", "step-000002", "step-000004"]
    assert sorted(p.name for p in (root / "step-000002").iterdir()) == [MARKER, "plot.png"]
    user_root = tmp_path / "user_checkpoints"  # a folder of the user's as the checkpoint root
    user_root.mkdir()
    (user_root / "x.txt").write_text("x")
    with pytest.raises(NotOwnedError):
        _save(user_root, 1)
    assert sorted(p.name for p in user_root.iterdir()) == ["x.txt"]


# -- item 12: file modes ---------------------------------------------------------------------------
def test_checkpoint_and_final_files_get_the_umask_mode_not_0600(tmp_path):
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        ckpt = _save(make_dir(tmp_path / "checkpoints", "checkpoints"), 1)
        with writing_folder(tmp_path / ".final.tmp", tmp_path / "final", "final") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
    finally:
        os.umask(old)
    for f in [*ckpt.iterdir(), *(tmp_path / "final").iterdir()]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# -- item 10: disk full ----------------------------------------------------------------------------
def _fill_disk(monkeypatch, free: int):
    import safetensors.torch

    def half_written(state, path, *a, **k):
        Path(path).write_bytes(b"\0" * 587712)
        raise RuntimeError("661067 requested and 587712 written")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100 << 20, 100 << 20, free))


def test_a_full_disk_says_so_and_where_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    root = make_dir(tmp_path / "checkpoints", "checkpoints")
    _fill_disk(monkeypatch, free=4096)
    with pytest.raises(OSError) as info:
        _save(root, 1)
    assert info.value.errno == errno.ENOSPC and "the disk is full" in str(info.value)
    assert ".tmp-step-000001" in info.value.filename
    assert [p.name for p in root.iterdir()] == [MARKER]  # the partial .tmp-step-* is gone at once
    _fill_disk(monkeypatch, free=50 << 30)  # another write error with room to spare: reported as it is
    with pytest.raises(RuntimeError, match="requested and"):
        _save(root, 1)
    assert [p.name for p in root.iterdir()] == [MARKER]


def test_run_reports_a_full_disk_in_plain_words(tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path, SHORT)
    _fill_disk(monkeypatch, free=0)
    assert run_command(recipe) == 1
    said = " ".join(capsys.readouterr().out.split())
    assert "the disk is full" in said and str(tmp_path / "run" / "pretrain" / "checkpoints") in said, said
    assert "enforce fail" not in said and "Traceback" not in said
    assert not list((tmp_path / "run" / "pretrain" / "checkpoints").glob(".tmp-*"))


# -- item 11: secrets ------------------------------------------------------------------------------
def test_secrets_stay_out_of_errors_error_log_and_the_lock(tmp_path, monkeypatch, capsys):
    from llmlab.runguard import LOCK_NAME, run_lock

    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    recipe = write_recipe(tmp_path, SHORT)

    def leak(self, **kw):
        lock = (self.out / LOCK_NAME).read_text()
        assert SECRET not in lock and "--set" in lock, lock
        raise RuntimeError(f"wandb rejected the key {SECRET}")

    monkeypatch.setattr(Runner, "run", leak)
    monkeypatch.setattr(sys, "argv", ["llmlab", "run", str(recipe), "--set", f"logging.wandb_api_key={SECRET}",
                                      "--set", "logging.hub_token=literal-secret-value"])
    assert run_command(recipe) == 1
    said = capsys.readouterr().out
    assert "wandb rejected the key" in said and SECRET not in said
    log = (tmp_path / "run" / "error.log").read_text()
    assert "wandb rejected the key ${WANDB_API_KEY}" in log and SECRET not in log
    # a lock left by an older llmlab holds the command as typed; taking it over does not print it
    (tmp_path / "run" / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "h", "started_at": "t",
                                                          "command": f"llmlab run r.yaml --set k={SECRET}"}))
    said = []
    with run_lock(tmp_path / "run", announce=said.append):
        text = (tmp_path / "run" / LOCK_NAME).read_text()
        assert SECRET not in text and "literal-secret-value" not in text
    assert said and SECRET not in said[0] and "${WANDB_API_KEY}" in said[0]


def test_claim_marks_only_what_an_old_llmlab_wrote(tmp_path):
    run = tmp_path / "run"
    stage = run / "pretrain"
    (stage / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "recipe.resolved.yaml").write_text("# resolved by llmlab; package versions:\n#   python: 3\n")
    (stage / "stage.json").write_text(json.dumps({"name": "pretrain", "fingerprint": "f", "status": "running",
                                                  "type": "pretrain"}))
    (stage / "checkpoints" / "step-000001" / "weights.bin").write_bytes(b"w")  # not named by a MANIFEST.json
    (run / "other").mkdir()
    (run / "other" / "stage.json").write_text("{}")  # not a stage record naming its folder
    assert claim_run_dir(run) is True
    assert owns(run, "run") and owns(stage, "stage") and owns(stage / "checkpoints", "checkpoints")
    assert not owns(stage / "checkpoints" / "step-000001") and not owns(run / "other")


def test_what_a_library_wrote_into_a_fresh_folder_is_llmlabs_subfolders_too(tmp_path):
    from llmlab.ownership import mark_written

    d = make_dir(tmp_path / ".final.tmp", "final")
    (d / "config.json").write_text("{}")
    (d / "extra").mkdir()
    (d / "extra" / "a.bin").write_bytes(b"x")
    mark_written(d, "final")
    (d / "notes.txt").write_text("mine")  # put there afterwards
    assert remove_owned(d) == ["notes.txt"]
    assert sorted(p.name for p in d.iterdir()) == [MARKER, "notes.txt"]


def test_a_folder_an_older_llmlab_prepare_wrote_is_recognised(finished, tmp_path):
    recipe, run = _copy(finished, tmp_path)
    shutil.rmtree(run / "pretrain")
    (run / "recipe.resolved.yaml").unlink()  # prepare writes the tokenizer and the stores, no recipe
    _strip_markers(run)
    assert run_command(recipe, output_dir=run) == 0
    assert owns(run, "run") and owns(run / "tokenizer", "tokenizer")


def _adapter(tmp_path) -> tuple[Path, Path]:
    """(base final/, LoRA adapter with a tokenizer) of a tiny model."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from llmlab.models.build import apply_lora, build_model

    torch.manual_seed(0)
    base = build_model(TINY["model"], vocab_size=300)
    base.save_pretrained(tmp_path / "base")
    apply_lora(base, {"preset": "all", "r": 4, "alpha": 8, "dropout": 0.0}, "transformer_gated").save_pretrained(
        tmp_path / "adapter")
    tok = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def test_merge_force_overwrites_only_an_earlier_merge(tmp_path):
    """``llmlab merge --force`` wrote over any OUT_DIR: a user's folder is now refused with a list of
    what is in it (not one byte changes); an earlier merge is replaced, but not a user's file in it,
    and a folder llmlab made for something else (a stage's final/) is not an earlier merge."""
    from typer.testing import CliRunner

    from llmlab.cli import app
    from llmlab.merge import merge_adapter

    base, adapter = _adapter(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.safetensors").write_bytes(b"my weights")
    (mine / "notes.txt").write_text("mine")
    before = _snapshot(mine)
    with pytest.raises(NotOwnedError, match="model.safetensors, notes.txt"):
        merge_adapter(adapter, mine, base=str(base), force=True)
    out = CliRunner().invoke(app, ["merge", str(adapter), str(mine), "--base", str(base), "--force"])
    assert out.exit_code == 1 and "notes.txt" in out.output, out.output
    assert _snapshot(mine) == before and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "mine"]

    merged = merge_adapter(adapter, tmp_path / "merged", base=str(base))
    assert owns(merged, "merged") and (merged / "model.safetensors").is_file()
    with pytest.raises(FileExistsError, match="--force"):
        merge_adapter(adapter, merged, base=str(base))
    merge_adapter(adapter, merged, base=str(base), force=True)
    (merged / "notes.txt").write_text("mine")
    with pytest.raises(NotOwnedError, match="notes.txt"):
        merge_adapter(adapter, merged, base=str(base), force=True)
    assert (merged / "notes.txt").read_text() == "mine" and (merged / "model.safetensors").is_file()
    mark(base, "final", [p.name for p in base.iterdir()])
    with pytest.raises(NotOwnedError, match="final folder"):
        merge_adapter(adapter, base, base=str(base), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "merged", "mine"]  # no .merged.tmp
