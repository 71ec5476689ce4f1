"""``llmlab push RUN_OR_FINAL --repo ID``: upload a stage's ``final/`` to the Hugging Face hub with a
model card written from the run.

What is uploaded (:func:`upload_files`, the one list both the upload and ``--dry-run OUT`` use):
every file of ``final/`` (config, safetensors, tokenizer, generation config, the modeling code;
never llmlab's marker), the run's ``recipe.resolved.yaml`` (secrets masked when it was written,
masked again here with today's environment, :func:`llmlab.secrets.mask_secrets`) and a generated
``README.md`` (:func:`model_card`). The run directory is never modified: the card is handed to the
hub as bytes in the same commit (``HfApi.create_commit``), not written next to the weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llmlab.layout import RunLayout, StageLayout
from llmlab.ownership import MARKER, writing_folder

#: the card's ``tags`` besides the stage types of the run
TAGS = ["llmlab", "text-generation"]


class PushError(RuntimeError):
    """The upload failed: the hub cannot be reached, ``HF_HUB_OFFLINE`` forbids it, or the hub
    refused (authentication, permissions). The message is one line naming the repo and the cause."""


def resolve_final(target: Path, stage: str | None = None) -> tuple[Path, Path | None, str | None]:
    """``(final_dir, run_dir, stage_name)`` for ``target``: a ``<run>/<stage>/final`` folder (its
    run found two levels up when that holds ``recipe.resolved.yaml``), or a run directory, where
    ``stage`` (default: the last stage in recipe order with a finished ``final/``) is picked.

    Raises:
        FileNotFoundError: ``target`` is neither (the message says what is missing).
    """
    target = Path(target)
    if (target / "config.json").is_file():
        if stage is not None:
            raise FileNotFoundError(f"{target}: --stage is for a run directory; this is a model folder")
        run = target.resolve().parent.parent
        has_run = RunLayout(run).resolved_recipe.is_file() and StageLayout(target.resolve().parent).record.is_file()
        return target, (run if has_run else None), (target.resolve().parent.name if has_run else None)
    layout = RunLayout(target)
    if not layout.resolved_recipe.is_file():
        raise FileNotFoundError(f"{target}: neither a model folder (no config.json) nor a llmlab run directory "
                                "(no recipe.resolved.yaml)")
    finished = [n for n in _stage_order(target) if (layout.stage(n).final / "config.json").is_file()]
    if stage is None:
        if not finished:
            raise FileNotFoundError(f"{target}: no stage has a finished final/ to push")
        stage = finished[-1]
    elif stage not in finished:
        raise FileNotFoundError(f"{target}: stage {stage!r} has no finished final/ (stages with one: "
                                f"{', '.join(finished) or 'none'})")
    return layout.stage(stage).final, target, stage


def _stage_order(run: Path) -> list[str]:
    from llmlab.report import stage_dirs

    return [d.name for d in stage_dirs(run)]


def _masked_recipe(run: Path) -> str:
    from llmlab.secrets import mask_secrets

    return mask_secrets(RunLayout(run).resolved_recipe.read_text(encoding="utf-8"))


def _param_count(final: Path) -> int | None:
    """Parameters stored in ``final/``'s safetensors files (headers only; None without any)."""
    from safetensors import safe_open

    files = sorted(final.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _lineage(run: Path, stage: str) -> list[str]:
    """The stages whose weights led to ``stage``, first to last: each stage.json's ``init_path``
    (``<stage>/final`` of this run) names the one before; a pretrained or scratch start ends it."""
    names, root = [stage], run.resolve()
    rec = RunLayout(run).stage(stage).read_record()
    while rec is not None and rec.get("init_path"):
        src = RunLayout(run).locate(rec["init_path"]).resolve()
        if src.parent.parent != root or src.parent.name in names:
            break
        names.insert(0, src.parent.name)
        rec = RunLayout(run).stage(src.parent.name).read_record()
    return names


def _chain_rows(run: Path, stage: str) -> list[str]:
    """Markdown table rows of the stages that led to ``stage`` (:func:`_lineage`): type, status,
    steps, tokens, last train loss, last eval loss and the stage type's key eval metrics."""
    from llmlab.run_summary import key_metrics

    rows = []
    for name in _lineage(run, stage):
        record = RunLayout(run).stage(name).read_record() or {}
        ev = record.get("last_eval") or {}

        def num(v):
            return "-" if v is None else f"{v:.4g}"
        rows.append(f"| {name} | {record.get('type') or '?'} | {record.get('status') or '?'} | "
                    f"{record.get('steps', '-')} | {record.get('tokens', '-')} | {num(record.get('last_loss'))} | {num(ev.get('eval_loss'))} | "
                    f"{key_metrics(ev, record.get('first_eval')) if ev else '-'} |")
    return rows


def model_card(final: Path, run: Path | None, stage: str | None, repo_id: str, license: str | None = None) -> str:
    """The ``README.md`` text: YAML front matter (``library_name: transformers``, ``tags``,
    ``license`` when given) and a body naming the recipe, the architecture and size (from
    ``config.json`` and the safetensors headers), the stages that led to it (:func:`_chain_rows`),
    the resolved recipe (masked) and the llmlab version."""
    from huggingface_hub import ModelCard, ModelCardData

    from llmlab import __version__

    cfg = json.loads((final / "config.json").read_text())
    types, intro = [], f"Pushed with llmlab {__version__}."
    if run is not None:
        import yaml

        recipe_text = _masked_recipe(run)
        resolved = yaml.safe_load(recipe_text) or {}
        types = [(RunLayout(run).stage(n).read_record() or {}).get("type") for n in _lineage(run, stage)]
        # the version that trained the stage (stage.json, else the run's resolved_with), not this one
        trained = (((RunLayout(run).stage(stage).read_record() or {}).get("versions") or {}).get("llmlab")
                   or (resolved.get("resolved_with") or {}).get("llmlab") or "(version not recorded)")
        intro = (f"Trained with llmlab {trained} from the recipe `{resolved.get('name')}`, stage `{stage}`; "
                 f"pushed with llmlab {__version__}.")
    tags = TAGS + sorted({t for t in types if t})
    data = ModelCardData(library_name="transformers", tags=tags, license=license, pipeline_tag="text-generation")
    n = _param_count(final)
    arch = ", ".join(cfg.get("architectures") or [cfg.get("model_type", "?")])
    shape = ", ".join(f"{k} {cfg[k]}" for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                                                 "vocab_size", "max_seq_len", "positional_encoding",
                                                 "norm_type", "activation") if k in cfg)
    body = [f"# {repo_id.split('/')[-1]}", "",
            intro, "", "## Model", "",
            f"- architecture: {arch} (`model_type: {cfg.get('model_type', '?')}`)",
            f"- parameters: {_human(n)} ({n:,})" if n is not None else "- parameters: unknown (no safetensors)",
            f"- shape: {shape}" if shape else "", ""]
    if cfg.get("auto_map"):
        body += ["The modeling code travels with the weights: load with "
                 f"`AutoModelForCausalLM.from_pretrained(\"{repo_id}\", trust_remote_code=True)`.", ""]
    if run is not None:
        body += ["## Stages", "", "| stage | type | status | steps | tokens | last train loss | eval loss | eval metrics |",
                 "|---|---|---|---|---|---|---|---|", *_chain_rows(run, stage), "",
                 "## Resolved recipe", "", "```yaml", recipe_text.rstrip("\n"), "```", ""]
    text = "---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body)
    return str(ModelCard(text))


def upload_files(final: Path, run: Path | None, stage: str | None, repo_id: str,
                 license: str | None = None) -> dict[str, Path | bytes]:
    """``{path in repo: source file or bytes}``: what :func:`push` uploads (and ``dry_run`` writes)."""
    files: dict[str, Path | bytes] = {}
    for p in sorted(final.rglob("*")):
        rel = p.relative_to(final)
        if p.is_file() and not p.is_symlink() and not any(part.startswith(".") for part in rel.parts):
            files[rel.as_posix()] = p
    files.pop(MARKER, None)
    if run is not None:
        files["recipe.resolved.yaml"] = _masked_recipe(run).encode("utf-8")
    files["README.md"] = model_card(final, run, stage, repo_id, license).encode("utf-8")
    return files


def _hub_error(repo_id: str, exc: BaseException) -> PushError:
    """One line naming ``repo_id`` and why the hub call failed."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    status = getattr(getattr(exc, "response", None), "status_code", None)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, LocalTokenNotFoundError):
        why = "no hub token: log in with `hf auth login` or set HF_TOKEN to a token with write access"
    elif isinstance(exc, HfHubHTTPError) and status in (401, 403):
        why = (f"the hub refused the token (HTTP {status}): log in with `hf auth login` or set HF_TOKEN to a "
               "token with write access")
    elif isinstance(exc, HfHubHTTPError):
        why = f"the hub answered HTTP {status}: {first}"
    else:
        from llmlab.data.sources import hub_unreachable

        probe = hub_unreachable(constants.ENDPOINT)
        why = f"cannot reach the hub {constants.ENDPOINT} ({probe or first}); check the network"
    return PushError(f"push to {repo_id}: {why}")


def push(target: Path, repo_id: str, *, stage: str | None = None, private: bool = False, revision: str | None = None,
         token: str | None = None, license: str | None = None, dry_run: Path | None = None) -> str:
    """Upload a stage's ``final/`` with its model card and resolved recipe to the hub repo
    ``repo_id`` (created when missing, ``private`` then), in one commit on ``revision``.

    Args:
        target: a run directory (``stage`` picks the stage) or a ``final/`` folder.
        token: a hub token (default: huggingface_hub's, ``HF_TOKEN`` or ``hf auth login``).
        dry_run: write the exact folder that would be uploaded there instead (a folder llmlab
            owns: refused when it holds files llmlab did not write) and upload nothing.

    Returns:
        the commit URL, or the ``dry_run`` folder's path.

    Raises:
        FileNotFoundError: no ``final/`` to push (:func:`resolve_final`).
        ValueError: ``repo_id`` is not a valid hub id (``owner/name``).
        NotOwnedError: ``dry_run`` holds files llmlab did not write.
        PushError: ``HF_HUB_OFFLINE`` is set, the hub is unreachable or refused (one line).
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    final, run, stage = resolve_final(target, stage)
    files = upload_files(final, run, stage, repo_id, license)
    if dry_run is not None:
        out = Path(dry_run).resolve()
        with writing_folder(out.with_name(f".{out.name}.tmp"), out, "push") as tmp:
            for rel, src in files.items():
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(src) if isinstance(src, bytes) else shutil.copyfile(src, dst)
        return str(out)
    if constants.HF_HUB_OFFLINE:
        raise PushError(f"push to {repo_id}: HF_HUB_OFFLINE is set, which forbids uploading to {constants.ENDPOINT}; "
                        "unset it where the network is reachable (or use --dry-run OUT)")
    return _upload(files, repo_id, private=private, revision=revision, token=token,
                   message=f"llmlab push {stage or final.name}")


def _upload(files: dict[str, Path | bytes], repo_id: str, *, private: bool, revision: str | None,
            token: str | None, message: str) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    # the HTTP client's base error (httpx's or its fork's HTTPError: refused connections, timeouts)
    http_errors = tuple(b for b in HfHubHTTPError.__bases__ if b is not OSError)
    api = HfApi(token=token)
    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=src if isinstance(src, bytes) else str(src))
           for rel, src in files.items()]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, ops, commit_message=message, revision=revision)
    except (HfHubHTTPError, OSError, *http_errors) as e:
        raise _hub_error(repo_id, e) from None
    return str(getattr(info, "commit_url", info))


__all__ = ["PushError", "model_card", "push", "resolve_final", "upload_files"]
