"""Checks a JSON Schema cannot express: arithmetic between keys, references between sections,
dataset formats per stage, LoRA presets per architecture.

Every check reads the defaults-filled document and is defensive about types: a value of the wrong
type has already been reported by the schema, so a check that cannot apply is skipped.
"""

from __future__ import annotations

import math

from llmlab.chat_templates import CHOICES as CHAT_TEMPLATE_CHOICES
from llmlab.models import lora_presets
from llmlab.recipe.schema import suggest
from llmlab.stage_specs import (BUILTIN_FORMATS, CONVERSATION_FORMATS, NON_LM_TYPES, NON_TRAINING_TYPES,
                                REFERENCE_FREE_DPO_LOSSES, STAGE_SPECS, UNSMOOTHED_DPO_LOSSES)



#: builtins whose rows are cut from another builtin's dialogues (same prompts): its name
_PROMPTS_FROM = {"chatterbot_pairs": "chatterbot", "chatterbot_prompts": "chatterbot"}

_CONVERSATION = CONVERSATION_FORMATS

#: dataset keys that only mean something for a hub source
HUB_ONLY = ("subset", "revision")

#: optimizers that train under ``distributed.strategy: fsdp``: their update reads each parameter
#: element by element (AdamW, Lion), so a shard updates as the whole matrix would. Validate refuses
#: the others: Muon orthogonalises whole matrices (Newton-Schulz on a shard is another matrix);
#: Sophia differentiates through the backward pass (FSDP2's gradient hooks take no double
#: backward); Adafactor's factored second moment is a reduction over the sharded dim, which
#: torch.optim.Adafactor updates in place and DTensor refuses ("in-place operations that require
#: placement changes are not supported", torch 2.13); adamw_8bit's bitsandbytes kernels take no DTensor.
FSDP_OPTIMIZERS = ("adamw", "lion")

#: names of run-directory entries llmlab writes beside the stage directories
RESERVED_STAGE_NAMES = ("tokenizer", "cache")



def prompt_source(spec: dict) -> tuple | None:
    """What a dataset's prompts are drawn from, when the recipe alone tells: a builtin (pairs and
    prompts cut from chatterbot's dialogues count as chatterbot), a local ``path`` (as resolved), or
    a hub ``(id, subset, split)``. Two datasets with the same source share prompts."""
    if isinstance(spec.get("builtin"), str):
        return ("builtin", _PROMPTS_FROM.get(spec["builtin"], spec["builtin"]))
    if isinstance(spec.get("path"), str):
        return ("path", spec["path"])
    if isinstance(spec.get("hub"), str):
        return ("hub", spec["hub"], spec.get("subset"), spec.get("split"))
    return None


def eval_split_warnings(resolved: dict) -> list[tuple[tuple, str]]:
    """``(key path, message)`` for each group of datasets that share prompts
    (:func:`prompt_source`) but have different ``eval_split`` fractions.

    A prompt is held out in every dataset whose fraction its hash falls under
    (:func:`llmlab.data.sources.held_out`), so the held-out sets are nested: the prompts a dataset
    holds out above the group's lowest fraction are trained on from the datasets at that fraction,
    and its held-out figures are partly measured on seen prompts. The warning sits on the
    ``eval_split`` of the dataset with the highest fraction and names every key of the group.
    """
    groups: dict[tuple, list[tuple[str, float]]] = {}
    for name, spec in _dict(resolved.get("datasets")).items():
        src = prompt_source(_dict(spec))
        frac = _num(_dict(spec).get("eval_split", 0.0))
        if src is not None and frac is not None:
            groups.setdefault(src, []).append((name, float(frac)))
    out = []
    for src, members in groups.items():
        fracs = sorted({f for _, f in members})
        if len(fracs) < 2:
            continue
        top = max(members, key=lambda m: m[1])[0]
        keys = ", ".join(f"datasets.{n}.eval_split={f:g}" for n, f in members)
        low = [n for n, f in members if f == fracs[0]]
        out.append((("datasets", top, "eval_split"),
                    f"{keys} share prompts ({src[0]} {src[1]}) but hold out different fractions: a prompt "
                    f"is held out wherever its hash falls under the fraction, so what the others hold out "
                    f"above {fracs[0]:g} is trained on from {', '.join(low)}; give them one eval_split"))
    return out


#: the largest magnitude an integer key may have: torch and numpy hold step counts, sizes and
#: seeds in int64, so a larger YAML integer would overflow where it is used
INT64_MAX = 2 ** 63 - 1


def bad_numbers(value, path: tuple = ()):
    """``(key path, message, non-finite)`` for every number in a recipe document that no training can use: a
    float that is NaN or infinite (YAML's ``.nan``/``.inf``, or a literal beyond a double such as
    ``1e400``, which YAML reads as inf), and an integer beyond int64. JSON Schema's ``number`` type
    accepts NaN and ±inf, and every range keyword compares False against NaN, so this pass runs on
    the whole document before the schema."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from bad_numbers(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from bad_numbers(v, path + (i,))
    elif isinstance(value, float) and not math.isfinite(value):
        shown = "NaN" if math.isnan(value) else ("+inf" if value > 0 else "-inf")
        yield path, (f"{shown} is not a finite number; every number in a recipe must be finite "
                     "(YAML reads .nan, .inf and literals beyond ±1.8e308 as non-finite floats)"), True
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
        yield path, f"{value} does not fit in a 64-bit integer (at most {INT64_MAX})", False


def warmup_warnings(resolved: dict) -> list[tuple[tuple, str]]:
    """``(key path, message)`` for each training stage whose scheduler warm-up does not end before
    its last step (``warmup_steps >= max_steps``): the learning rate then never reaches its peak
    (``warmup_steps: 1000, max_steps: 4`` trains at 0.4 % of it at most) and never decays. A warning,
    not an error: shortening a recipe with ``--set stages.X.max_steps=3`` for a smoke test is common."""
    out = []
    for name, st in _dict(resolved.get("stages")).items():
        st = _dict(st)
        warm, steps = _int(_dict(st.get("scheduler")).get("warmup_steps")), _int(st.get("max_steps"))
        if warm and steps and warm >= steps:
            peak = steps / warm
            out.append((("stages", name, "scheduler", "warmup_steps"),
                        f"warmup_steps ({warm}) >= max_steps ({steps}): warm-up never ends, so the learning rate "
                        f"reaches at most {peak:.1%} of optimizer.lr (and a decaying schedule never decays); lower warmup_steps "
                        f"(e.g. {max(0, steps // 10)})"))
    return out


def _int(x):
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _num(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _dict(x):
    return x if isinstance(x, dict) else {}


def dataset_format(spec: dict) -> str | None:
    """The format a dataset will have after loading, or None when it is only known at load time
    (``auto`` on a hub or local source)."""
    fmt = spec.get("format", "auto")
    if fmt != "auto":
        return fmt if isinstance(fmt, str) else None
    builtin = spec.get("builtin")
    return BUILTIN_FORMATS.get(builtin) if isinstance(builtin, str) else None


def _check_dpo_loss(st: dict, base: tuple, given, add) -> None:
    """Keys a dpo stage's ``loss_type`` does not use: ``reference_from`` with the reference-free
    simpo / cpo, ``rpo_alpha`` with cpo (whose NLL weight is ``cpo_alpha``), ``label_smoothing`` with ipo and
    the apo losses."""
    loss = st.get("loss_type")
    if loss in REFERENCE_FREE_DPO_LOSSES and st.get("reference_from"):
        add(base + ("reference_from",), f"loss_type {loss} loads no reference model; remove reference_from")
    if loss == "cpo" and given(base + ("rpo_alpha",), non_default=True):
        add(base + ("rpo_alpha",), "loss_type cpo weighs its NLL term with cpo_alpha; remove rpo_alpha")
    if loss in UNSMOOTHED_DPO_LOSSES and given(base + ("label_smoothing",), non_default=True):
        add(base + ("label_smoothing",), f"label_smoothing does not apply to loss_type {loss}")


def _check_one_kind(spec, mix: dict, datasets: dict, ds: str, fmt: str, path: tuple, add) -> None:
    """A stage with ``own_kinds`` (kto) takes rows of one such kind or of its usual kind, not both:
    report dataset ``ds`` (format ``fmt``) when an earlier dataset of ``mix`` is of the other side."""
    own = fmt in spec.own_kinds  # such a kind's format has its name
    for other in list(mix)[:list(mix).index(ds)]:
        other_fmt = dataset_format(_dict(datasets.get(other)))
        if other_fmt and (other_fmt in spec.own_kinds) != own:
            add(path, f"dataset {ds!r} has format {fmt!r} but {other!r} has {other_fmt!r}: a {spec.type} stage "
                      f"takes unpaired_preference rows or preference rows, not both")
            return


def check(doc: dict, given, add) -> None:
    """Run every semantic check on the defaults-filled ``doc``.

    ``given(path)`` tells whether a key path was written by the user (file, base recipe or --set);
    ``given(path, non_default=True)`` also that its value is not the default ("only applies to ..."
    checks use it: a default written out, as in recipe.resolved.yaml, is harmless);
    ``add(path, message)`` records an error at ``path``.
    """
    _check_model(_dict(doc.get("model")), given, add)
    datasets = _dict(doc.get("datasets"))
    _check_datasets(datasets, given, add)
    _check_tokenizer(doc, datasets, add)
    _check_stages(doc, datasets, given, add)
    _check_trackers(_dict(doc.get("logging")), add)
    _check_distributed(doc, add)


def _check_length(st: dict, base: tuple, spec, add) -> None:
    """A training stage gives its length: ``max_steps`` or ``epochs`` (both only where they agree,
    which resolution checks: :mod:`llmlab.recipe.epochs`); ``epochs`` not on pretraining, whose
    examples are token blocks known only once the data is tokenised."""
    if spec is None:  # an unknown type: the schema's one error says so
        return
    if "max_steps" not in st and st.get("epochs") is None:
        add(base, "give the stage's length: max_steps (optimizer steps) or epochs (passes over its training data)")
    if st.get("epochs") is not None and spec.family == "pretrain":
        add(base + ("epochs",), "epochs does not apply to a pretrain stage (its examples are token blocks, counted "
                                "only once the data is tokenised); give max_steps")


def _check_distributed(doc: dict, add) -> None:
    """Under ``distributed.strategy: fsdp`` every training stage can be sharded: it samples nothing
    (a generating stage runs a different number of forwards on each process, and each FSDP forward
    is a collective all-gather), its optimizer is one of :data:`FSDP_OPTIMIZERS` and
    its LoRA base is not quantized (bitsandbytes' 4-bit weights are no DTensor); and the precision
    is not fp16 (the loss scaler's unscale is not wired for sharded gradients). ``replicate`` > 1
    (HSDP) needs strategy fsdp."""
    dist = _dict(doc.get("distributed"))
    if dist.get("strategy") != "fsdp":
        replicate = dist.get("replicate")
        if isinstance(replicate, int) and replicate > 1:
            add(("distributed", "replicate"), "replicate (HSDP: shard within groups, replicate across them) needs "
                                              "distributed.strategy fsdp; under ddp every process holds the whole model")
        return
    if doc.get("precision") == "fp16":
        add(("precision",), "precision fp16 (loss scaling) is not supported with distributed.strategy fsdp; use bf16 "
                            "or fp32")
    for name, st in _dict(doc.get("stages")).items():
        spec = STAGE_SPECS.get(_dict(st).get("type"))
        if spec is None or not spec.trains:
            continue
        base = ("stages", name)
        if spec.generates:
            add(base + ("type",), f"a {spec.type} stage samples completions, which distributed.strategy fsdp cannot "
                                  "shard (each process generates a different number of tokens); use strategy ddp")
        opt = _dict(st.get("optimizer")).get("name")
        if isinstance(opt, str) and opt not in FSDP_OPTIMIZERS:
            add(base + ("optimizer", "name"), f"optimizer {opt} does not train under distributed.strategy fsdp "
                                              f"(see docs/distributed.md); use {', '.join(FSDP_OPTIMIZERS)} or strategy ddp")
        if st.get("sample_prompts") is not None:
            add(base + ("sample_prompts",), "sample_prompts generates on one process, which distributed.strategy fsdp "
                                            "cannot shard (every FSDP forward is a collective); use strategy ddp")
        if _dict(st.get("lora")).get("quantize"):
            add(base + ("lora", "quantize"), "a quantized LoRA base (QLoRA) cannot be sharded by distributed.strategy "
                                             "fsdp; use strategy ddp")


def world_size_errors(doc: dict, world_size: int | None) -> list[tuple[tuple, str]]:
    """``(key path, message)`` when ``distributed.replicate`` (HSDP) does not divide the processes
    the recipe is loaded for (``world_size``; None: ``$WORLD_SIZE``, else 1): under torchrun
    every process refuses the recipe before it trains. One process is never sharded."""
    from llmlab.recipe.epochs import world_size as launched

    dist = _dict(doc.get("distributed"))
    n, replicate = world_size or launched(), dist.get("replicate")
    if dist.get("strategy") != "fsdp" or n <= 1 or not isinstance(replicate, int) or n % replicate == 0:
        return []
    return [(("distributed", "replicate"), f"replicate {replicate} does not divide the {n} processes: HSDP needs "
                                           "processes = replicate × processes per replica group (e.g. replicate = "
                                           "the number of nodes)")]


#: logging.report_to tracker -> the package it needs (installed by the `logging` extra)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _check_trackers(logging_cfg: dict, add) -> None:
    """Each tracker in ``report_to`` has its package installed (looked up, not imported), so a
    run does not fail with ModuleNotFoundError after the data was prepared."""
    import importlib.util

    report_to = logging_cfg.get("report_to")
    for i, tracker in enumerate(report_to if isinstance(report_to, list) else []):
        pkg = TRACKER_PACKAGES.get(tracker)
        if pkg and importlib.util.find_spec(pkg) is None:
            add(("logging", "report_to", i), f"{tracker} is not installed: pip install 'llmlab[logging]' "
                                             f"(or pip install {pkg})")


def _check_model(m: dict, given, add) -> None:
    has_arch, has_pre = "arch" in m, "from_pretrained" in m
    if has_arch and has_pre:
        add(("model", "from_pretrained"), "model takes exactly one of 'arch' (build from scratch) or 'from_pretrained' (an existing checkpoint), got both")
    elif not has_arch and not has_pre:
        add(("model",), "model needs exactly one of 'arch' (transformer or mamba2) or 'from_pretrained' (a checkpoint path or hub id), got neither")
    arch = m.get("arch")
    if arch == "transformer":
        d, h, kv, L = _int(m.get("d_model")), _int(m.get("n_heads")), _int(m.get("n_kv_heads")), _int(m.get("max_seq_len"))
        if d and h and d % h:
            add(("model", "d_model") if given(("model", "d_model")) else ("model", "n_heads"),
                f"d_model ({d}) must be divisible by n_heads ({h}); head size would be {d / h:.2f}")
        if h and kv and h % kv:
            add(("model", "n_kv_heads"), f"n_heads ({h}) must be divisible by n_kv_heads ({kv}); each key/value head serves a whole group of query heads")
        if h and kv and kv > h:
            add(("model", "n_kv_heads"), f"n_kv_heads ({kv}) cannot exceed n_heads ({h})")
        att = m.get("attention_type")
        if given(("model", "attention_type")) and h and kv and isinstance(att, str):
            right = "mha" if kv == h else "mqa" if kv == 1 else "gqa"
            need = {"mha": f"n_kv_heads == n_heads ({h})", "mqa": "n_kv_heads == 1",
                    "gqa": f"1 < n_kv_heads < n_heads ({h})"}.get(att)
            if need and att != right and not (att == "gqa" and h == 1):
                add(("model", "attention_type"), f"attention_type {att!r} needs {need}, got n_kv_heads {kv} (did you mean {right!r}?)")
        sw = _int(m.get("sliding_window"))
        if sw and L and sw >= L:
            add(("model", "sliding_window"), f"sliding_window ({sw}) must be smaller than max_seq_len ({L}); with a window that large, use null (full attention)")
        pe = m.get("positional_encoding")
        rs = m.get("rope_scaling")
        if pe == "yarn":
            if not isinstance(rs, dict):
                add(("model", "positional_encoding"), "positional_encoding 'yarn' needs rope_scaling: {factor: ..., original_max_seq_len: ...}")
            else:
                orig = _int(rs.get("original_max_seq_len"))
                if orig and L and orig >= L:
                    add(("model", "rope_scaling", "original_max_seq_len"),
                        f"original_max_seq_len ({orig}) must be smaller than max_seq_len ({L}); yarn extends the context beyond it")
        elif rs is not None and given(("model", "rope_scaling")):
            add(("model", "rope_scaling"), f"rope_scaling is only used with positional_encoding 'yarn', got {pe!r}")
        ne, ept = _int(m.get("n_experts")), _int(m.get("experts_per_token"))
        if ne and ept and ept > ne:
            add(("model", "experts_per_token"), f"experts_per_token ({ept}) cannot exceed n_experts ({ne})")
        if ne is None and m.get("n_experts") is None:
            for k in ("experts_per_token", "router_aux_loss_coef"):
                if given(("model", k), non_default=True):
                    add(("model", k), f"{k} only applies to a mixture-of-experts model; set n_experts too")
    elif arch == "mamba2":
        d, e, hd, g = _int(m.get("d_model")), _int(m.get("expand")), _int(m.get("head_dim")), _int(m.get("n_groups"))
        if d and e and hd:
            inner = d * e
            if inner % hd:
                add(("model", "head_dim"), f"expand·d_model ({inner}) must be divisible by head_dim ({hd})")
            elif g and (inner // hd) % g:
                add(("model", "n_groups"), f"n_groups ({g}) must divide the number of heads expand·d_model/head_dim ({inner // hd})")


def _check_datasets(datasets: dict, given, add) -> None:
    for name, spec in datasets.items():
        if not isinstance(spec, dict):
            continue
        sources = [k for k in ("builtin", "hub", "path") if k in spec]
        if len(sources) != 1:
            add(("datasets", name) if not sources else ("datasets", name, sources[1]),
                f"dataset {name!r} needs exactly one source: builtin, hub or path; got "
                + (", ".join(sources) if sources else "none"))
        native = BUILTIN_FORMATS.get(spec.get("builtin"))
        fmt = spec.get("format")
        if native and isinstance(fmt, str) and fmt not in ("auto", native):
            add(("datasets", name, "format"), f"builtin {spec['builtin']!r} has format {native!r}, got format {fmt!r}")
        if "hub" not in spec:
            for k in HUB_ONLY:
                if given(("datasets", name, k), non_default=True):
                    add(("datasets", name, k), f"{k!r} only applies to a hub dataset; {name!r} is not from the hub")
        if "builtin" in spec and given(("datasets", name, "streaming"), non_default=True):
            add(("datasets", name, "streaming"), f"'streaming' only applies to a hub dataset or local files; {name!r} is builtin")
        if spec.get("streaming") is True and spec.get("max_samples") is None and spec.get("max_tokens") is None:
            add(("datasets", name, "streaming"), "streaming: true needs max_samples or max_tokens: llmlab reads "
                "the stream up to that bound and keeps what it read (tokenised, on disk) so that every batch is a "
                "pure function of the step; without a bound the whole stream would be read")
        f = _dict(spec.get("filters"))
        lo, hi = _int(f.get("min_length")), _int(f.get("max_length"))
        if lo is not None and hi is not None and lo > hi:
            add(("datasets", name, "filters", "min_length"), f"min_length ({lo}) is larger than max_length ({hi}); every row would be dropped")
        if given(("datasets", name, "filters", "minhash_threshold"), non_default=True) and f.get("dedup") != "minhash":
            add(("datasets", name, "filters", "minhash_threshold"), f"minhash_threshold only applies with dedup 'minhash', got dedup {f.get('dedup')!r}")


def _check_tokenizer(doc: dict, datasets: dict, add) -> None:
    tok = _dict(doc.get("tokenizer"))
    if "tokenizer" not in doc or not isinstance(doc.get("tokenizer"), dict):
        return
    has_pre, has_train = "from_pretrained" in tok, "train" in tok
    if has_pre == has_train:
        add(("tokenizer", "train") if has_train else ("tokenizer",),
            "tokenizer takes exactly one of 'from_pretrained' (an existing tokenizer) or 'train' (train one on the recipe's data), got "
            + ("both" if has_pre else "neither"))
    train = _dict(tok.get("train"))
    names = train.get("datasets")
    if isinstance(names, list):
        for i, ds in enumerate(names):
            if not isinstance(ds, str):
                continue
            if ds not in datasets:
                add(("tokenizer", "train", "datasets", i), f"unknown dataset {ds!r}{suggest(ds, datasets)}; defined datasets: {', '.join(datasets) or 'none'}")
                continue
    ct = tok.get("chat_template")
    if isinstance(ct, str) and ct not in CHAT_TEMPLATE_CHOICES and "{{" not in ct and "{%" not in ct:
        add(("tokenizer", "chat_template"), f"{ct!r} is neither a known template{suggest(ct, list(CHAT_TEMPLATE_CHOICES))} nor a Jinja template; expected {', '.join(CHAT_TEMPLATE_CHOICES)}, or a Jinja string")


def _stage_ref(stages: list, idx: int, value, path, add, what: str, need_type: str | None = None, types=None,
               not_types: tuple = ()) -> None:
    if value is None or not isinstance(value, str):
        return
    if value not in stages:
        add(path, f"{what} {value!r} is not a stage{suggest(value, stages)}; stages: {', '.join(stages)}")
        return
    j = stages.index(value)
    if j >= idx:
        add(path, f"{what} {value!r} must name an earlier stage; {value!r} "
                  + ("is this stage" if j == idx else "runs after this one") + " (stages run in file order)")
        return
    if need_type and types.get(value) != need_type:
        article = "an" if str(types.get(value))[:1] in "aeiou" else "a"
        add(path, f"{what} {value!r} is {article} {types.get(value)} stage; expected a {need_type} stage")
        return
    if types and types.get(value) in not_types:
        if types.get(value) in NON_TRAINING_TYPES:
            add(path, f"{what} {value!r} is an {types.get(value)} stage, which trains nothing and has no weights; "
                      "name a training stage")
        else:
            add(path, f"{what} {value!r} is a {types.get(value)} stage; expected a stage that trains a language model")


#: builtin reward -> the key it needs (None: none)
REWARD_BUILTIN_KEYS = {"token_fraction": "token", "contains": "text", "length": "target", "exact_answer": None}


def _check_reward(r: dict, p: tuple, given, add) -> None:
    srcs = [k for k in ("from", "model", "function", "builtin") if k in r]
    if len(srcs) != 1:
        add(p, "each reward needs exactly one of 'from', 'model', 'function' or 'builtin', got "
            + (", ".join(srcs) if srcs else "none"))
    b = r.get("builtin")
    need = REWARD_BUILTIN_KEYS.get(b) if isinstance(b, str) else None
    if need and need not in r:
        add(p + ("builtin",), f"builtin reward {b!r} needs the key {need!r}")
    for key, owner in ((k, name) for name, k in REWARD_BUILTIN_KEYS.items() if k is not None):
        if key in r and b != owner:
            add(p + (key,), f"{key!r} only applies to builtin reward {owner!r}" + (f", got builtin {b!r}" if b else ""))
    if given(p + ("revision",), non_default=True) and "model" not in r:
        add(p + ("revision",), "'revision' only applies to a reward 'model'")


def _check_stages(doc: dict, datasets: dict, given, add) -> None:
    stages_map = _dict(doc.get("stages"))
    stages = list(stages_map)
    types = {n: _dict(s).get("type") for n, s in stages_map.items()}
    model = _dict(doc.get("model"))
    max_len = _int(model.get("max_seq_len")) if "arch" in model else None
    akey = lora_presets.arch_key(model)
    chat_template = _dict(doc.get("tokenizer")).get("chat_template")
    for idx, (name, st) in enumerate(stages_map.items()):
        if not isinstance(st, dict):
            continue
        base = ("stages", name)
        stype = st.get("type")
        if name in RESERVED_STAGE_NAMES:
            add(base, f"stage name {name!r} is reserved (the run directory has a {name}/ folder); choose another name")
        seq = _int(st.get("seq_len"))
        if seq and max_len and seq > max_len:
            add(base + ("seq_len",), f"seq_len ({seq}) exceeds model.max_seq_len ({max_len})")
        if "from_pretrained" in model and "arch" not in model and "seq_len" not in st and stype not in NON_TRAINING_TYPES:
            add(base, "seq_len is required with model.from_pretrained (the checkpoint's context length is unknown until it loads)")
        if stype in NON_TRAINING_TYPES:
            _check_evaluate(doc, datasets, stages, types, idx, name, st, add)
            continue
        _stage_ref(stages, idx, st.get("from"), base + ("from",), add, "from:", types=types, not_types=NON_TRAINING_TYPES)
        _stage_ref(stages, idx, st.get("reference_from"), base + ("reference_from",), add, "reference_from:",
                   types=types, not_types=NON_TRAINING_TYPES)
        spec = STAGE_SPECS.get(stype)
        accepted = spec.formats if spec else None
        for key in ("datasets", "eval_datasets"):
            mix = st.get(key)
            if not isinstance(mix, dict):
                continue
            for ds, w in mix.items():
                p = base + (key, ds)
                if ds not in datasets:
                    add(p, f"unknown dataset {ds!r}{suggest(ds, datasets)}; defined datasets: {', '.join(datasets) or 'none'}")
                    continue
                if _num(w) is not None and w <= 0:
                    add(p, f"weight {w} must be > 0 (weights are relative sampling rates; remove the dataset instead)")
                fmt = dataset_format(_dict(datasets[ds]))
                if accepted and fmt and fmt not in accepted:
                    src = _dict(datasets[ds]).get("builtin")
                    add(p, f"dataset {ds!r} has format {fmt!r}" + (f" (builtin {src})" if src else "")
                        + f", which a {stype} stage cannot use; expected {' or '.join(accepted)}")
                elif spec and fmt and spec.own_kinds:
                    _check_one_kind(spec, mix, datasets, ds, fmt, p, add)
        if stype == "dpo":
            _check_dpo_loss(st, base, given, add)
        if spec and spec.generates:
            _check_online_rl(stages, types, idx, name, st, given, add)
        if stype and (spec.kind if spec else None) != "text" and chat_template == "none":
            add(base + ("type",), f"a {stype} stage needs a chat template, but tokenizer.chat_template is 'none'")
        if stype == "ppo" and given(base + ("kl_horizon",), non_default=True) and st.get("kl_target") is None:
            add(base + ("kl_horizon",), "kl_horizon only applies to the adaptive KL controller; set kl_target too")
        _check_length(st, base, spec, add)
        _check_stage_keys(st, base, spec, datasets, given, add)
        lora = st.get("lora")
        if isinstance(lora, dict):
            preset = lora.get("preset", "all")
            tm = lora.get("target_modules")
            if tm is not None and preset != "custom":
                add(base + ("lora", "target_modules"), f"target_modules only apply with preset 'custom', got preset {preset!r}")
            elif isinstance(preset, str) and preset in lora_presets.PRESET_NAMES:
                key = akey
                if key is not None or preset == "custom":
                    try:
                        lora_presets.resolve_targets(key or "", preset, tm if isinstance(tm, list) else None)
                    except ValueError as exc:
                        where = base + ("lora", "target_modules") if preset == "custom" and tm else base + ("lora", "preset")
                        add(where, f"{exc}" + (f" (model arch {model.get('arch')!r})" if "arch" in model else ""))
                    else:
                        unknown = lora_presets.unknown_targets(key, tm) if key and "arch" in model and isinstance(tm, list) else []
                        if unknown:
                            known = sorted(lora_presets.KNOWN_TARGETS[key])
                            add(base + ("lora", "target_modules"),
                                f"{unknown} name no module of a {model.get('arch')} model; LoRA can adapt {known}")



def _check_stage_keys(st: dict, base: tuple, spec, datasets: dict, given, add) -> None:
    """Keys of a training stage that need another key or do not apply to its type: sample_every
    without sample_prompts, save_best_only / early_stopping without evaluation data,
    group_by_length on pretrain."""
    has_eval = bool(st.get("eval_datasets")) or any(
        (_num(_dict(datasets.get(ds)).get("eval_split")) or 0) > 0 for ds in _dict(st.get("datasets")))
    if given(base + ("sample_every",), non_default=True) and st.get("sample_prompts") is None:
        add(base + ("sample_every",), "sample_every only applies with sample_prompts; give the prompts too")
    for key in ("save_best_only", "early_stopping"):
        if st.get(key) not in (None, False) and not has_eval:
            add(base + (key,), f"{key} needs evaluation data: give eval_datasets or an eval_split > 0 on a "
                               "training dataset")
    if st.get("group_by_length") and spec and spec.family == "pretrain":
        add(base + ("group_by_length",), "group_by_length does not apply to a pretrain stage (its packed blocks "
                                         "have no padding); remove it")


def _check_online_rl(stages: list, types: dict, idx: int, name: str, st: dict, given, add) -> None:
    """A stage that samples rollouts (grpo, ppo): its mini-batches divide the rollout batch and it
    names its rewards."""
    base = ("stages", name)
    bs, mbs = _int(st.get("batch_size")), _int(st.get("mini_batch_size"))
    if bs and mbs and bs % mbs:
        add(base + ("mini_batch_size",) if given(base + ("mini_batch_size",)) else base + ("batch_size",),
            f"batch_size ({bs}) must be divisible by mini_batch_size ({mbs})")
    rewards = st.get("reward")
    if rewards is None:
        add(base, f"a {st.get('type')} stage needs a 'reward': a list of {{from: REWARD_STAGE}}, {{model: PATH_OR_HUB_ID}} or {{function: 'module:function'}}")
    elif isinstance(rewards, list):
        for i, r in enumerate(rewards):
            if not isinstance(r, dict):
                continue
            _check_reward(r, base + ("reward", i), given, add)
            _stage_ref(stages, idx, r.get("from"), base + ("reward", i, "from"), add, "reward from:", "reward", types)


def _check_evaluate(doc: dict, datasets: dict, stages: list, types: dict, idx: int, name: str, st: dict, add) -> None:
    """An evaluate stage: its models, reference and reward stages are earlier stages with weights (the
    reference a language model, the reward a reward stage); its datasets exist and have held-out rows."""
    base = ("stages", name)
    models = st.get("models")
    if isinstance(models, list):
        if not models:
            add(base, "an evaluate stage needs an earlier stage that trains a language model to evaluate "
                      "(or list stages in 'models')")
        for i, m in enumerate(models):
            _stage_ref(stages, idx, m, base + ("models", i), add, "models:", types=types, not_types=NON_TRAINING_TYPES)
    _stage_ref(stages, idx, st.get("reference_from"), base + ("reference_from",), add, "reference_from:",
               types=types, not_types=NON_TRAINING_TYPES + NON_LM_TYPES)
    _stage_ref(stages, idx, st.get("reward_from"), base + ("reward_from",), add, "reward_from:", "reward", types)
    chat_template = _dict(doc.get("tokenizer")).get("chat_template")
    for ds in _dict(st.get("datasets")):
        p = base + ("datasets", ds)
        if ds not in datasets:
            add(p, f"unknown dataset {ds!r}{suggest(ds, datasets)}; defined datasets: {', '.join(datasets) or 'none'}")
            continue
        spec = _dict(datasets[ds])
        split = _num(spec.get("eval_split"))
        if split is not None and split <= 0:
            add(p, f"dataset {ds!r} has no held-out rows to evaluate on; give it an eval_split > 0 "
                   f"(datasets.{ds}.eval_split)")
        if dataset_format(spec) in _CONVERSATION and chat_template == "none":
            add(p, f"dataset {ds!r} holds conversations, which are scored through the chat template, "
                   "but tokenizer.chat_template is 'none'")
