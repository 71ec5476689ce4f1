"""The run's tokenizer: loaded from a checkpoint/hub id, or trained on the recipe's own text.

A trained tokenizer is a byte-level BPE (the ``tokenizers`` library) with the special tokens

- ``<|endoftext|>``: bos and eos of documents (pretraining joins documents with it),
- ``<|pad|>``: padding,
- ``<|im_start|>`` / ``<|im_end|>``: ChatML turn markers,

plus the recipe's ``tokenizer.special_tokens``. Its chat template is ChatML with the assistant
turns (content + ``<|im_end|>``) wrapped in ``{% generation %}`` markers, so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks exactly the tokens SFT trains
on.

The saved tokenizer is frozen: :func:`tokenizer_hash` is a sha256 over its files, written next to
them as ``tokenizer.sha256`` and checked by every stage. Training twice on the same data gives the
same files and so the same hash.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Iterator

from llmlab.chat_templates import TEMPLATE_TOKENS, TEMPLATES, resolve_chat_template
from llmlab.schemafile import top_level
from llmlab.specs import TokenizerTrainSpec, typed_section

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BASE_SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, IM_START, IM_END]
HASH_FILE = "tokenizer.sha256"

#: ChatML; the assistant content and its closing ``<|im_end|>`` are generation (= trained) tokens.
CHATML_TEMPLATE = TEMPLATES["chatml"]


def build_tokenizer(recipe: dict, out_dir: Path):
    """Build the run's tokenizer from ``recipe["tokenizer"]`` and save it, frozen, to ``out_dir``.

    Either loads ``tokenizer.from_pretrained`` (local path or hub id, with ``revision``) or trains a
    byte-level BPE on the text of the datasets named in ``tokenizer.train.datasets`` (their train
    split; conversations contribute their message contents), with ``vocab_size`` [8192],
    ``min_frequency`` [2] and ``max_documents`` [all]. ``chat_template`` is ``auto`` [default: the
    pretrained tokenizer's own template with generation markers, ``chatml`` for a trained one], a
    named template of :mod:`llmlab.chat_templates`, ``none`` or a Jinja string (see
    :func:`llmlab.chat_templates.resolve_chat_template`). Always builds (deciding whether a
    run's frozen tokenizer can be reused is the runner's job: load it with :func:`load_tokenizer`);
    files already in ``out_dir`` are overwritten.

    Args:
        recipe: the resolved recipe (plain dict).
        out_dir: directory to write the HF tokenizer files and ``tokenizer.sha256`` to.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``eos_token``, ``pad_token`` and a chat template set.

    Raises:
        ValueError: the tokenizer section names neither ``from_pretrained`` nor ``train``, a train
            dataset has no text, or ``chat_template: auto`` finds a pretrained template without
            generation markers of no known family (the message names the choices).
    """
    from llmlab.specs import tokenizer_spec

    out_dir = Path(out_dir)
    spec = tokenizer_spec(top_level(recipe, "tokenizer") or {})  # absent keys: the schema's defaults
    extra = [t for t in spec.special_tokens if t not in BASE_SPECIAL_TOKENS]
    if spec.from_pretrained:
        tok = _load_pretrained(spec, extra, spec.chat_template)
    elif spec.train:
        # a named template's markers are special tokens from the start (ids inside vocab_size)
        extra += [t for t in TEMPLATE_TOKENS.get(spec.chat_template, ()) if t not in BASE_SPECIAL_TOKENS + extra]
        tok = train_tokenizer(_training_texts(recipe, spec.train), spec.train, extra, spec.chat_template)
    else:
        raise ValueError("tokenizer: give exactly one of `from_pretrained` or `train`")
    save_tokenizer(tok, out_dir)
    return tok


def train_tokenizer(texts, train_cfg: TokenizerTrainSpec | dict, extra_special_tokens=(), chat_template="auto"):
    """Train a byte-level BPE tokenizer on ``texts`` (an iterable of str) and wrap it for HF.

    Args:
        texts: the training documents.
        train_cfg: ``tokenizer.train`` (:class:`llmlab.specs.TokenizerTrainSpec`, or a bare section
            whose absent ``vocab_size`` / ``min_frequency`` take the schema's defaults).
        extra_special_tokens: special tokens beyond the four built-in ones.
        chat_template: ``auto`` (= ``chatml``), a named template, ``none`` or a Jinja string.

    Returns:
        A ``PreTrainedTokenizerFast``; ids 0..3 are ``<|endoftext|>``, ``<|pad|>``,
        ``<|im_start|>``, ``<|im_end|>``, then the extra special tokens, then the 256 byte symbols
        and the merges.

    Raises:
        ValueError: ``vocab_size`` is too small to hold the special tokens and the byte alphabet.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(train_cfg, TokenizerTrainSpec):  # a bare section: absent keys take the schema's defaults
        train_cfg = typed_section(TokenizerTrainSpec, train_cfg, datasets=())  # texts are given: no datasets
    vocab_size, min_frequency = int(train_cfg.vocab_size), int(train_cfg.min_frequency)
    special = BASE_SPECIAL_TOKENS + list(extra_special_tokens)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(special) + len(alphabet):
        raise ValueError(f"tokenizer.train.vocab_size: {vocab_size} is smaller than the "
                         f"{len(special)} special tokens + {len(alphabet)} byte symbols")

    t0 = time.perf_counter()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=special, initial_alphabet=alphabet,
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    log.info("tokenizer: trained byte-level BPE (%d tokens) in %.1fs", bpe.get_vocab_size(),
             time.perf_counter() - t0)

    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                  unk_token=None, pad_token=PAD_TOKEN,
                                  additional_special_tokens=[IM_START, IM_END, *extra_special_tokens],
                                  model_max_length=int(1e9), clean_up_tokenization_spaces=False)
    _set_chat_template(tok, resolve_chat_template(tok, chat_template, pretrained=False), chat_template)
    return tok


def save_tokenizer(tok, out_dir: Path) -> str:
    """Save ``tok`` in HF format to ``out_dir``, write ``tokenizer.sha256`` and return the hash."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    digest = tokenizer_hash(out_dir)
    (out_dir / HASH_FILE).write_text(digest + "\n")
    return digest


def load_tokenizer(path: Path | str, check_hash: bool = True):
    """Load a tokenizer saved by :func:`build_tokenizer` (or any HF tokenizer directory).

    Raises:
        ValueError: ``check_hash`` and the directory's ``tokenizer.sha256`` does not match its files
            (the frozen tokenizer was modified).
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if check_hash and (path / HASH_FILE).exists():
        stored = (path / HASH_FILE).read_text().strip()
        actual = tokenizer_hash(path)
        if stored != actual:
            raise ValueError(f"{path}: tokenizer files changed since they were frozen "
                             f"(sha256 {actual[:12]}…, expected {stored[:12]}…)")
    cls = None
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.is_file() and (path / "tokenizer.json").is_file():
        cls = json.loads(cfg_file.read_text()).get("tokenizer_class")
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        # our own tokenizers: skip AutoTokenizer's (slow, ~5 s) first-use class discovery
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def tokenizer_hash(path: Path | str) -> str:
    """sha256 (hex) over the names and bytes of the tokenizer files in ``path``.

    ``tokenizer.sha256`` itself and sub-directories are excluded; the files are taken in name order,
    so the hash is stable across runs and machines.

    Raises:
        FileNotFoundError: ``path`` holds no tokenizer files.
    """
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name != HASH_FILE
                   and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{path}: no tokenizer files")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


# -- helpers -------------------------------------------------------------------------------------

def _set_chat_template(tok, template: str | None, name: str) -> None:
    """Give ``tok`` the chat ``template`` (None: leave it as it is), adding the special tokens of
    the named template ``name`` that it lacks."""
    if template is None:
        return
    missing = [t for t in TEMPLATE_TOKENS.get(name, ())
               if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    tok.chat_template = template


def _load_pretrained(cfg, extra: list[str], template):
    """A pretrained tokenizer from ``cfg`` (a :class:`llmlab.specs.TokenizerSpec`, or a bare
    ``tokenizer:`` section) with ``extra`` special tokens and the chat ``template``."""
    from transformers import AutoTokenizer

    from llmlab.models.gguf import is_gguf, split_gguf
    from llmlab.specs import TokenizerSpec, tokenizer_spec

    if not isinstance(cfg, TokenizerSpec):
        cfg = tokenizer_spec(cfg)
    src, gguf = cfg.from_pretrained, {}
    if is_gguf(src):  # the tokenizer stored in a GGUF file's metadata
        src, gguf["gguf_file"] = split_gguf(src)
    # trust_remote_code=False: a recipe runs no code, and a final/ whose config.json has an auto_map
    # must not stop the run with transformers' interactive "run the custom code? [y/N]"
    tok = AutoTokenizer.from_pretrained(src, revision=cfg.revision, trust_remote_code=False, **gguf)
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": EOS_TOKEN})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    chosen = resolve_chat_template(tok, template, pretrained=True)  # none: the tokenizer's as it is
    _set_chat_template(tok, chosen, template)
    return tok


def _training_texts(recipe: dict, train_cfg) -> Iterator[str]:
    """Documents for tokenizer training (``train_cfg``: a :class:`llmlab.specs.TokenizerTrainSpec`):
    the train split of each named dataset, in order."""
    from llmlab.data.sources import load_named_dataset, recipe_source

    names = list(train_cfg.datasets)
    if not names:
        raise ValueError("tokenizer.train.datasets: name at least one dataset")
    limit = train_cfg.max_documents
    docs: list[str] = []
    for name in names:
        if recipe_source(recipe, name).streaming:  # read the stream up to what is needed
            import itertools

            from llmlab.data.store import stream_texts

            want = None if limit is None else int(limit) - len(docs)
            docs.extend(itertools.islice(stream_texts(recipe, name, {}), want))
            if limit is not None and len(docs) >= int(limit):
                break
            continue
        splits = load_named_dataset(recipe, name)
        table = splits.train.with_format("arrow")[:]
        if splits.kind == "text":
            docs.extend(table.column("text").to_pylist())
        else:
            for row in table.to_pylist():
                parts = [m["content"] for k in ("messages", "prompt", "chosen", "rejected")
                         for m in row.get(k) or []]
                docs.append("\n".join(parts))
        if limit is not None and len(docs) >= int(limit):
            break
    if limit is not None:
        docs = docs[: int(limit)]
    if not docs:
        raise ValueError(f"tokenizer.train.datasets: {names} hold no text")
    return docs


def check_vocab_covers(tokenizer, vocab_size: int, where: str = "model") -> None:
    """Check that a model's embedding table (``vocab_size`` rows) covers every tokenizer id.

    Raises:
        ValueError: ``len(tokenizer)`` exceeds ``vocab_size`` (ids past the table would index out of
            range), naming both sizes.
    """
    n = len(tokenizer)
    if n > int(vocab_size):
        raise ValueError(f"{where}: vocabulary of {vocab_size} rows does not cover the tokenizer's "
                         f"{n} tokens (ids {vocab_size}..{n - 1} have no embedding); rebuild the "
                         f"model for this tokenizer or resize its embeddings")
