"""``llmlab prepare``: tokenise everything a recipe's stages need ahead of training.

Pretraining stages fill their token stores (:mod:`llmlab.data.store`: one per dataset and split,
shared by every stage, run and recipe naming the same data with the same tokenizer); the other
stage types build their data once, which leaves their tokenisation cached under
``<output_dir>/cache/``. Both are idempotent (a complete store is only opened) and resumable (a
killed prepare continues at the first missing shard), so ``llmlab run`` afterwards starts training
in seconds, and a CPU machine can prepare before a GPU one is rented.
"""

from __future__ import annotations

import time
from pathlib import Path

from llmlab.data.sources import dataset_spec

TRAINING_TYPES = ("pretrain", "sft", "dpo", "orpo", "kto", "reward", "grpo", "ppo")


def pretrain_splits(recipe: dict, stage: str) -> list[tuple[str, str]]:
    """The (dataset, split) stores a pretraining stage reads: ``train`` of each training dataset,
    plus the held-out side of each evaluation dataset (``eval``, or ``train`` for a dataset named
    only in ``eval_datasets`` with no ``eval_split``)."""
    cfg = recipe["stages"][stage]
    names = list(cfg.get("datasets") or {})
    eval_spec = cfg.get("eval_datasets")
    out = [(n, "train") for n in names]
    for n in (list(eval_spec) if eval_spec else names):
        split = "eval" if float(dataset_spec(recipe, n).get("eval_split") or 0) > 0 else \
            ("train" if eval_spec else None)
        if split and (n, split) not in out:
            out.append((n, split))
    return out


def prepare_stages(recipe: dict, tokenizer, stages: list[str] | None = None, *, processes: int | None = None,
                   progress: bool = False, pretrain_only: bool = False, verify: bool = False) -> list[dict]:
    """Prepare the data of ``stages`` (default: every training stage of the recipe).

    Args:
        recipe: the resolved recipe. tokenizer: the run's tokenizer.
        processes: tokenising processes for the stores (default: all cores).
        progress: draw progress bars. pretrain_only: skip the other stage types.
        verify: hash every shard of every store again, whatever its verification record says
            (without it, each shard is checked as its first read by ``llmlab run`` would:
            :meth:`llmlab.data.store.TokenStore.check`, a ``stat`` for a shard checked before).

    Returns:
        one dict per (stage, dataset, split): ``stage``, ``dataset``, ``split``, ``documents``,
        ``tokens`` (None for non-pretrain data), ``store`` (folder or None), ``seconds``.

    Raises:
        KeyError: unknown stage. ValueError: bad data (as :func:`build_stage_data`).
        llmlab.data.store.StoreError: a damaged store (a shard missing, truncated, holding ids
            outside the vocabulary or bytes whose sha256 differs; a folder without a manifest),
            named with the commands that delete and rebuild it.
    """
    from llmlab.data.store import ensure_text_store

    all_stages = recipe.get("stages") or {}
    for s in stages or []:
        if s not in all_stages:
            raise KeyError(f"stages.{s}: no such stage (defined: {', '.join(all_stages)})")
    rows = []
    for stage in stages or list(all_stages):
        typ = all_stages[stage].get("type")
        if typ not in TRAINING_TYPES or (pretrain_only and typ != "pretrain"):
            continue
        if typ == "pretrain":
            for name, split in pretrain_splits(recipe, stage):
                t0 = time.perf_counter()
                st = ensure_text_store(recipe, name, split, tokenizer, processes=processes, progress=progress)
                st.verify() if verify else st.check()  # every shard, as its first read would
                rows.append({"stage": stage, "dataset": name, "split": split, "documents": st.documents,
                             "tokens": st.tokens, "store": str(st.path),
                             "seconds": round(time.perf_counter() - t0, 2)})
        else:
            from llmlab.data.pipeline import build_stage_data

            t0 = time.perf_counter()
            data = build_stage_data(recipe, stage, tokenizer)
            rows.append({"stage": stage, "dataset": ", ".join(all_stages[stage]["datasets"]), "split": "train",
                         "documents": data.num_train_examples, "tokens": None, "store": None,
                         "seconds": round(time.perf_counter() - t0, 2)})
    return rows


CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"


def dataset_plan(recipe: dict, stage_rows: list[dict]) -> list[dict]:
    """``llmlab plan``'s per-dataset block for the pretraining stages, without importing torch.

    For each (pretraining stage, dataset): the documents and tokens of its prepared training store
    (None when not prepared yet: the run's tokenizer or the store is missing) and the epochs the
    stage sees of it, ``stage tokens × the dataset's weight share / dataset tokens``.

    Args:
        stage_rows: :func:`llmlab.plan.plan_rows`' rows (``stage``, ``type``, ``tokens``, ``datasets``
            shares in %).
    """
    from llmlab.data.store import TokenStore, store_path, tokenizer_sha256_of_dir

    tok_sha = tokenizer_sha256_of_dir(Path(recipe["output_dir"]) / "tokenizer")
    out = []
    for r in stage_rows:
        if r["type"] != "pretrain":
            continue
        for name, share in r["datasets"].items():
            docs = tokens = epochs = None
            if tok_sha:
                try:
                    path = store_path(recipe, name, "train", tok_sha)
                except (KeyError, ValueError):
                    path = None
                if path is not None and TokenStore.is_complete(path):
                    st = TokenStore(path)
                    docs, tokens = st.documents, st.tokens
                    epochs = r["tokens"] * share / 100.0 / max(tokens, 1)
            out.append({"stage": r["stage"], "dataset": name, "documents": docs, "tokens": tokens, "epochs": epochs})
    return out
