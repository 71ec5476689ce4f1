"""``llmlab push``: the folder it uploads (checked through --dry-run), the hub calls it makes (a
stubbed HfApi: no test reaches the hub) and its one-line errors."""

import json
import sys

import pytest
import yaml
from typer.testing import CliRunner

from llmlab.cli import app
from llmlab.layout import RESOLVED_HEADER
from llmlab.ownership import MARKER, NotOwnedError, mark
from llmlab.push import PushError, push, resolve_final
from tests.models.conftest import make_model

# huggingface_hub's HTTP client (httpx, or the fork it moved to): its errors and responses
from huggingface_hub.errors import HfHubHTTPError  # noqa: E402

http = sys.modules[next(b for b in HfHubHTTPError.__bases__ if b is not OSError).__module__.split(".")[0]]

SECRET = "hf_secretvalue_abcdef123"


def _stage(run, name, typ, steps, eval_loss, init=None, final=False):
    d = run / name
    d.mkdir(parents=True)
    (d / "stage.json").write_text(json.dumps({
        "name": name, "type": typ, "status": "done", "steps": steps, "tokens": steps * 512,
        "init_path": init and f"{init}/final", "last_loss": 2.5, "versions": {"llmlab": "0.0.7"},
        "first_eval": {"step": 0, "eval_loss": 9.0, "eval_nll_loss": 3.0},
        "last_eval": {"step": steps, "eval_loss": eval_loss, "eval_nll_loss": 2.5}}))
    if final:
        model = make_model(seed=3)
        model.save_pretrained(d / "final")
        (d / "final" / "tokenizer_config.json").write_text("{}")
        mark(d / "final", "final", [p.name for p in (d / "final").iterdir()])
        return model


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A hand-made run directory: pretrain (no final/), sft from it (final/ with a tiny model) and a
    reward stage also from pretrain (not in sft's lineage); the
    resolved recipe holds the value of $HF_TOKEN unmasked (as one written before it was set)."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    run = tmp_path / "run"
    run.mkdir()
    recipe = {"name": "tinypush", "output_dir": str(run), "datasets": {"d": {"hub": "x/y", "token": SECRET}},
              "stages": {"pretrain": {"type": "pretrain"}, "sft": {"type": "sft"}, "rm": {"type": "reward"}}}
    (run / "recipe.resolved.yaml").write_text(RESOLVED_HEADER + "\n" + yaml.safe_dump(recipe, sort_keys=False))
    _stage(run, "pretrain", "pretrain", 60, 3.125)
    model = _stage(run, "sft", "sft", 20, 2.0625, init="pretrain", final=True)
    _stage(run, "rm", "reward", 30, 0.5, init="pretrain")
    return run, model


def _snapshot(root):
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_dry_run_writes_final_card_and_masked_recipe(run, tmp_path):
    run_dir, model = run
    before = _snapshot(run_dir)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["push", str(run_dir), "--repo", "me/tiny", "--dry-run", str(out),
                                      "--license", "apache-2.0"])
    assert result.exit_code == 0, result.output
    assert _snapshot(run_dir) == before  # the run directory is never modified
    final = run_dir / "sft" / "final"
    shipped = {p.name for p in out.iterdir()} - {MARKER}
    expected = {p.name for p in final.iterdir()} - {MARKER}
    assert shipped == expected | {"README.md", "recipe.resolved.yaml"}
    assert "model.safetensors" in shipped and "config.json" in shipped
    for name in expected:
        assert (out / name).read_bytes() == (final / name).read_bytes(), name
    recipe = (out / "recipe.resolved.yaml").read_text()
    card = (out / "README.md").read_text()
    for text in (recipe, card):
        assert SECRET not in text and "${HF_TOKEN}" in text
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert {"llmlab", "pretrain", "sft"} <= set(meta["tags"]) and "reward" not in meta["tags"]
    assert "recipe `tinypush`, stage `sft`" in card and "LlmlabForCausalLM" in card
    assert "Trained with llmlab 0.0.7 " in card  # the version in sft's stage.json, not this one
    assert f"{model.num_parameters():,}" in card
    rows = [line for line in card.splitlines() if line.startswith("| ") and "| done |" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| pretrain", "| sft"]  # sft's lineage, not the reward stage
    assert "| 3.125 |" in rows[0] and "| 2.062 |" in rows[1] and "| 20 | 10240 |" in rows[1]
    assert "nll 3.000 → 2.500" in rows[1]
    assert yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])["name"] == "tinypush"


def test_target_forms_and_stage_choice(run, tmp_path):
    run_dir, _ = run
    final = run_dir / "sft" / "final"
    assert resolve_final(run_dir) == (final, run_dir, "sft")
    assert resolve_final(run_dir, "sft") == (final, run_dir, "sft")
    with pytest.raises(FileNotFoundError, match="'pretrain' has no finished final/"):
        resolve_final(run_dir, "pretrain")
    # a final/ folder directly: its run is found two levels up, so the card is the same
    a, b = tmp_path / "a", tmp_path / "b"
    push(run_dir, "me/tiny", dry_run=a)
    push(final, "me/tiny", dry_run=b)
    assert (a / "README.md").read_text() == (b / "README.md").read_text()
    # a loose model folder (no run): weights and a card without stages
    loose = tmp_path / "loose"
    make_model().save_pretrained(loose)
    push(loose, "me/loose", dry_run=tmp_path / "c")
    card = (tmp_path / "c" / "README.md").read_text()
    assert "## Stages" not in card and not (tmp_path / "c" / "recipe.resolved.yaml").exists()
    result = CliRunner().invoke(app, ["push", str(tmp_path / "nothing"), "--repo", "me/x", "--dry-run",
                                      str(tmp_path / "d")])
    assert result.exit_code == 1 and "neither a model folder" in result.output


def test_dry_run_out_ownership(run, tmp_path):
    run_dir, _ = run
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user's")
    with pytest.raises(NotOwnedError):
        push(run_dir, "me/tiny", dry_run=out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    again = tmp_path / "again"
    push(run_dir, "me/tiny", dry_run=again)
    push(run_dir, "me/other", dry_run=again)  # llmlab's own earlier dry run is replaced
    assert "# other" in (again / "README.md").read_text()


class StubApi:
    """Records HfApi calls; ``fail`` is raised by create_repo."""

    calls: list = []
    fail: BaseException | None = None

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        if self.fail is not None:
            raise self.fail

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch, exist_ok))

    def create_commit(self, repo_id, operations, commit_message, revision=None):
        self.calls.append(("create_commit", repo_id, list(operations), commit_message, revision))
        return type("CommitInfo", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()


@pytest.fixture
def stub_hub(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    StubApi.calls, StubApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", StubApi)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("llmlab.data.sources.hub_unreachable", lambda endpoint: "stubbed: no route")
    return StubApi


def test_upload_is_one_commit_of_the_dry_run_folder(run, tmp_path, stub_hub):
    run_dir, _ = run
    before = _snapshot(run_dir)
    url = push(run_dir, "me/tiny", private=True, revision="v1", token="tok")
    assert url == "https://hub.example/me/tiny/commit/1"
    assert _snapshot(run_dir) == before
    names = [c[0] for c in stub_hub.calls]
    assert names == ["init", "create_repo", "create_branch", "create_commit"]
    assert stub_hub.calls[0] == ("init", "tok") and stub_hub.calls[1] == ("create_repo", "me/tiny", True, True)
    _, repo, ops, message, revision = stub_hub.calls[3]
    assert repo == "me/tiny" and revision == "v1" and "sft" in message
    push(run_dir, "me/tiny", dry_run=tmp_path / "dry")
    dry = {p.name: p.read_bytes() for p in (tmp_path / "dry").iterdir() if p.name != MARKER}
    uploaded = {}
    for op in ops:
        src = op.path_or_fileobj
        uploaded[op.path_in_repo] = src if isinstance(src, bytes) else open(src, "rb").read()
    assert uploaded == dry  # the upload is exactly what --dry-run shows


def test_offline_refuses_in_one_line(run, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = CliRunner().invoke(app, ["push", str(run[0]), "--repo", "me/tiny"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "me/tiny" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


@pytest.mark.parametrize("fail,says", [
    (http.ConnectError("[Errno -3] Temporary failure in name resolution"), "cannot reach the hub"),
    ("401", "refused the token (HTTP 401)"),
    ("no token", "no hub token"),
])
def test_hub_failures_are_one_line(run, stub_hub, fail, says):
    if fail == "401":
        response = http.Response(401, request=http.Request("POST", "https://hub.example/api/repos/create"))
        fail = HfHubHTTPError("401 Client Error: Unauthorized\nmore detail", response=response)
    if fail == "no token":
        from huggingface_hub.errors import LocalTokenNotFoundError

        fail = LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")
    stub_hub.fail = fail
    with pytest.raises(PushError, match="push to me/tiny: .*" + says.replace("(", r"\(").replace(")", r"\)")):
        push(run[0], "me/tiny")
    result = CliRunner().invoke(app, ["push", str(run[0]), "--repo", "me/tiny"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert not any(c[0] == "create_commit" for c in stub_hub.calls)


def test_bad_repo_id_is_refused(run, tmp_path):
    result = CliRunner().invoke(app, ["push", str(run[0]), "--repo", "not a/valid//id", "--dry-run",
                                      str(tmp_path / "o")])
    assert result.exit_code == 1 and not (tmp_path / "o").exists()
