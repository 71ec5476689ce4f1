"""Values of secret-looking environment variables are never written or printed (issue 16 item 5)."""

from __future__ import annotations

from pathlib import Path

from llmlab.fingerprint import stage_fingerprints
from llmlab.recipe import dump_resolved, load_recipe, stage_order
from llmlab.recipe.errors import RecipeError
from llmlab.secrets import mask_secrets

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
TOKEN = "hf_S3cr3tV4lu3xyz"


def _recipe(tmp_path: Path) -> Path:
    child = tmp_path / "secret.yaml"
    child.write_text(f"extends: {QUICKSTART}\noutput_dir: runs/${{HF_TOKEN}}\n")
    return child


def test_resolved_recipe_shows_the_name_not_the_value(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    resolved, errors = load_recipe(_recipe(tmp_path))
    assert errors == []
    assert resolved["output_dir"].endswith(f"runs/{TOKEN}")  # the run itself gets the value
    text = dump_resolved(resolved)  # recipe.resolved.yaml and plan --resolved
    assert TOKEN not in text and "runs/${HF_TOKEN}" in text


def test_stage_json_parts_mask_secrets_and_a_rotated_token_is_no_change(tmp_path, monkeypatch):
    resolved, errors = load_recipe(QUICKSTART, env={})
    assert errors == []
    order = stage_order(resolved)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    resolved["model"]["revision_note"] = f"pulled with {TOKEN}"  # a secret inside a hashed part
    fps = stage_fingerprints(resolved, order)
    assert TOKEN not in repr(fps) and "${HF_TOKEN}" in repr(fps["pretrain"]["parts"])
    monkeypatch.setenv("HF_TOKEN", TOKEN + "ROTATED")
    resolved["model"]["revision_note"] = f"pulled with {TOKEN}ROTATED"
    assert stage_fingerprints(resolved, order)["pretrain"]["fingerprint"] == fps["pretrain"]["fingerprint"]


def test_errors_mask_secret_values(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    err = RecipeError("r.yaml", 3, 5, "logging.key", "got '0123456789abcdef', expected a number")
    assert "0123456789abcdef" not in str(err) and "${WANDB_API_KEY}" in str(err)
    assert "0123456789abcdef" not in repr(err.to_dict())


def test_only_secret_looking_names_of_useful_length_are_masked():
    env = {"HF_TOKEN": "abc", "DATA_DIR": "/data/corpus-2026", "MY_PASSWORD": "correct-horse"}
    doc = {"a": "/data/corpus-2026/x", "b": "abc", "c": ["correct-horse!"], "d": 3}
    assert mask_secrets(doc, env) == {"a": "/data/corpus-2026/x", "b": "abc", "c": ["${MY_PASSWORD}!"], "d": 3}
