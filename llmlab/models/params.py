"""Parameter counts and a training-memory estimate from the recipe alone.

Pure Python: no torch, no transformers (``llmlab plan`` and the validator import it).

The counts are exact: :func:`param_shapes` lists every weight tensor the model will have, with the
same names and shapes as the instantiated ``LlmlabForCausalLM`` / ``Mamba2ForCausalLM`` (tests
check the sum against ``sum(p.numel() for p in model.parameters())``). For
``from_pretrained`` checkpoints in a local directory the count is read from the safetensors
headers (a JSON table of shapes; no weights are loaded), for a local ``.gguf`` file from its tensor
table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

from llmlab.specs import LoraSpec, Mamba2Spec, ModelSpec, PretrainedSpec, TransformerSpec, model_spec, typed_section



# ---------------------------------------------------------------------------------------------
# resolved architecture numbers
# ---------------------------------------------------------------------------------------------
def default_d_ff(d_model: int, activation: str) -> int:
    """swiglu: 8/3 * d_model rounded up to a multiple of 64; otherwise 4 * d_model (same rule as
    ``LlmlabConfig``)."""
    if activation == "swiglu":
        return int(math.ceil(8 * d_model / 3 / 64) * 64)
    return 4 * d_model


def filled_model(model_cfg: dict) -> dict:
    """A ``model:`` section with the schema's defaults filled in (:func:`llmlab.schemafile.schema_filled`;
    keys given as null take their default too): a resolved section keeps its values, a bare one
    (``{"arch": "transformer", "d_model": 64}``) gets the rest from the schema."""
    from llmlab.schemafile import schema_filled

    return schema_filled("#/properties/model", {k: v for k, v in model_cfg.items() if v is not None})


def as_model_spec(model: dict | ModelSpec) -> ModelSpec:
    """The typed ``model:`` section (:mod:`llmlab.specs`): a spec as it is, a dict (resolved or
    bare) filled from the schema first.

    Raises:
        ValueError: the section has neither ``arch`` (transformer, mamba2) nor ``from_pretrained``.
    """
    if isinstance(model, (TransformerSpec, Mamba2Spec, PretrainedSpec)):
        return model
    if model.get("arch") not in ("transformer", "mamba2") and model.get("from_pretrained") is None:
        raise ValueError(f"model: needs arch transformer or mamba2, or from_pretrained; got {model.get('arch')!r}")
    return model_spec(filled_model(model))


def _pretrained(model: ModelSpec) -> str | None:
    """``from_pretrained`` of a pretrained model's section, None for an ``arch`` model."""
    return model.from_pretrained if isinstance(model, PretrainedSpec) else None


def transformer_dims(model_cfg: dict) -> dict:
    """The resolved numbers of an ``arch: transformer`` section (defaults from the schema; the
    rules resolution applies to n_kv_heads and d_ff when they are absent)."""
    m = as_model_spec(model_cfg)
    d = int(m.d_model)
    h = int(m.n_heads)
    act = m.activation
    att = m.attention_type
    kv = m.n_kv_heads
    if att == "mqa":
        kv = 1
    elif att == "mha" or kv is None:
        kv = h if att != "mqa" else 1
    return {
        "d_model": d,
        "n_layers": int(m.n_layers),
        "n_heads": h,
        "n_kv_heads": int(kv),
        "head_dim": d // h,
        "d_ff": int(m.d_ff) if m.d_ff is not None else default_d_ff(d, act),
        "gated": act == "swiglu",
        "layernorm": m.norm_type == "layernorm",
        "attention_bias": bool(m.attention_bias),
        "mlp_bias": bool(m.mlp_bias),
        "tied": bool(m.tie_embeddings),
        "n_experts": m.n_experts,
        "experts_per_token": int(m.experts_per_token),
    }


def mamba2_dims(model_cfg: dict) -> dict:
    """The resolved numbers of an ``arch: mamba2`` section (defaults filled; transformers'
    Mamba2Mixer layout: intermediate I = expand * d_model, conv_dim = I + 2 * n_groups * state_size,
    in_proj width = I + conv_dim + num_heads)."""
    m = as_model_spec(model_cfg)
    d = int(m.d_model)
    expand = int(m.expand)
    head_dim = int(m.head_dim)
    n = int(m.state_size)
    g = int(m.n_groups)
    inner = expand * d
    heads = inner // head_dim
    conv_dim = inner + 2 * g * n
    return {
        "d_model": d,
        "n_layers": int(m.n_layers),
        "intermediate": inner,
        "num_heads": heads,
        "head_dim": head_dim,
        "state_size": n,
        "n_groups": g,
        "conv_dim": conv_dim,
        "conv_kernel": int(m.conv_kernel),
        "chunk_size": int(m.chunk_size),
        "in_proj": inner + conv_dim + heads,
        "tied": bool(m.tie_embeddings),
    }


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------
def _linear(name: str, d_in: int, d_out: int, bias: bool) -> list[tuple[str, tuple[int, ...]]]:
    out = [(f"{name}.weight", (d_out, d_in))]
    if bias:
        out.append((f"{name}.bias", (d_out,)))
    return out


def _norm(name: str, d: int, layernorm: bool) -> list[tuple[str, tuple[int, ...]]]:
    out = [(f"{name}.weight", (d,))]
    if layernorm:
        out.append((f"{name}.bias", (d,)))
    return out


def _mlp(prefix: str, k: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, f, b = k["d_model"], k["d_ff"], k["mlp_bias"]
    out = []
    if k["gated"]:
        out += _linear(f"{prefix}.gate_proj", d, f, b)
    out += _linear(f"{prefix}.up_proj", d, f, b)
    out += _linear(f"{prefix}.down_proj", f, d, b)
    return out


def param_shapes(model_cfg: dict, vocab_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter tensor (state-dict name, shape) of the model a ``model:`` section builds;
    a tied ``lm_head`` is listed once (as ``model.embed_tokens.weight`` /
    ``backbone.embeddings.weight``), like ``model.parameters()``."""
    arch = getattr(as_model_spec(model_cfg), "arch", None)
    v = int(vocab_size)
    shapes: list[tuple[str, tuple[int, ...]]] = []
    if arch == "transformer":
        k = transformer_dims(model_cfg)
        d, hd, ab, ln = k["d_model"], k["head_dim"], k["attention_bias"], k["layernorm"]
        shapes.append(("model.embed_tokens.weight", (v, d)))
        for i in range(k["n_layers"]):
            p = f"model.layers.{i}"
            shapes += _linear(f"{p}.self_attn.q_proj", d, k["n_heads"] * hd, ab)
            shapes += _linear(f"{p}.self_attn.k_proj", d, k["n_kv_heads"] * hd, ab)
            shapes += _linear(f"{p}.self_attn.v_proj", d, k["n_kv_heads"] * hd, ab)
            shapes += _linear(f"{p}.self_attn.o_proj", k["n_heads"] * hd, d, ab)
            if k["n_experts"]:
                shapes += _linear(f"{p}.mlp.router", d, int(k["n_experts"]), False)
                for e in range(int(k["n_experts"])):
                    shapes += _mlp(f"{p}.mlp.experts.{e}", k)
            else:
                shapes += _mlp(f"{p}.mlp", k)
            shapes += _norm(f"{p}.input_layernorm", d, ln)
            shapes += _norm(f"{p}.post_attention_layernorm", d, ln)
        shapes += _norm("model.norm", d, ln)
        if not k["tied"]:
            shapes.append(("lm_head.weight", (v, d)))
        return shapes
    if arch == "mamba2":
        k = mamba2_dims(model_cfg)
        d, inner, h, cd = k["d_model"], k["intermediate"], k["num_heads"], k["conv_dim"]
        shapes.append(("backbone.embeddings.weight", (v, d)))
        for i in range(k["n_layers"]):
            p = f"backbone.layers.{i}"
            shapes.append((f"{p}.norm.weight", (d,)))
            m = f"{p}.mixer"
            shapes += [
                (f"{m}.dt_bias", (h,)),
                (f"{m}.A_log", (h,)),
                (f"{m}.D", (h,)),
                (f"{m}.conv1d.weight", (cd, 1, k["conv_kernel"])),
                (f"{m}.conv1d.bias", (cd,)),
                (f"{m}.in_proj.weight", (k["in_proj"], d)),
                (f"{m}.norm.weight", (inner,)),
                (f"{m}.out_proj.weight", (d, inner)),
            ]
        shapes.append(("backbone.norm_f.weight", (d,)))
        if not k["tied"]:
            shapes.append(("lm_head.weight", (v, d)))
        return shapes
    raise ValueError(f"param_shapes needs arch transformer or mamba2, got {arch!r}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------------------------------------
# counts
# ---------------------------------------------------------------------------------------------
def safetensors_parameter_count(path: str | Path) -> int:
    """Number of weights stored in a directory's (or a file's) ``*.safetensors``, read from the
    headers only (8-byte little-endian header length, then a JSON table of dtypes and shapes)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files to count parameters from")
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(_numel(meta["shape"]) for key, meta in header.items() if key != "__metadata__")
    return total


def gguf_parameter_count(path: str | Path) -> int:
    """Number of weights in a GGUF file (from its tensor table; needs the ``gguf`` package, which
    does not import torch)."""
    try:
        from gguf import GGUFReader
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ValueError(f"{path}: counting a GGUF file's parameters needs the 'gguf' package") from err
    return sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)


def count_parameters(model_cfg: dict, vocab_size: int | None) -> int:
    """Exact number of parameters (a tied output projection counted once).

    Transformer: V*D embedding; per layer q (D*H*Dh), k and v (D*H_kv*Dh each), o (H*Dh*D) plus
    biases with attention_bias; feed-forward 3*D*F (swiglu) or 2*D*F (+ biases with mlp_bias), or
    for MoE a D*E router and E such feed-forwards; two norms (D each, 2D for layernorm); a final
    norm; V*D lm_head when untied. Mamba2: see :func:`mamba2_dims`.
    ``from_pretrained``: counted from the local directory's safetensors headers (or a local
    ``.gguf`` file's tensor table).
    """
    model_cfg = as_model_spec(model_cfg)
    if _pretrained(model_cfg) is not None:
        source = Path(str(model_cfg.from_pretrained))
        if source.is_file() and source.suffix == ".gguf":
            return gguf_parameter_count(source)
        if source.exists():
            return safetensors_parameter_count(source)
        raise ValueError(
            f"model.from_pretrained {model_cfg.from_pretrained!r} is not a local path; its size is known only "
            "after download"
        )
    if vocab_size is None:
        raise ValueError("count_parameters needs the vocabulary size")
    return sum(_numel(s) for _, s in param_shapes(model_cfg, vocab_size))


def _lora_targets(model_cfg: dict, lora_cfg: dict) -> list[str]:
    from llmlab.models.lora_presets import arch_key, resolve_targets

    key = arch_key(model_cfg)
    if key is None:
        raise ValueError("LoRA parameter count needs arch transformer or mamba2")
    lora = lora_spec(lora_cfg)
    return resolve_targets(key, lora.preset, list(lora.target_modules) if lora.target_modules else None)


def lora_spec(lora_cfg: dict | LoraSpec) -> LoraSpec:
    """The typed ``lora:`` section (a spec as it is; a dict, resolved or bare, filled from the schema)."""
    return lora_cfg if isinstance(lora_cfg, LoraSpec) else typed_section(LoraSpec, lora_cfg)


def count_lora_parameters(model_cfg: dict, vocab_size: int, lora_cfg: dict) -> int:
    """Trainable LoRA parameters (Hu et al. 2021) of a model built from ``model_cfg``
    (see :func:`lora_parameters`)."""
    targets = _lora_targets(model_cfg, lora_cfg)
    spec = lora_spec(lora_cfg)
    return lora_parameters(param_shapes(model_cfg, vocab_size), targets, int(spec.r), spec.use_dora)


def lora_parameters(shapes, targets, r: int, dora: bool = False) -> int:
    """Trainable LoRA parameters (Hu et al. 2021): r * (d_in + d_out) for every 2-D ``*.weight`` in
    ``shapes`` (``(name, shape)`` pairs, shape ``[d_out, d_in]``) whose module name is one of
    ``targets`` (as peft matches them; MoE experts' projections included; embeddings and the LM head
    never); with ``dora`` (Liu et al. 2024) plus a magnitude vector of d_out per adapted weight."""
    targets = set(targets)
    total = 0
    for name, shape in shapes:
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[: -len(".weight")].rsplit(".", 1)[-1]
        if module in targets and not name.startswith(("model.embed_tokens", "backbone.embeddings", "lm_head")):
            d_out, d_in = shape
            total += r * (d_in + d_out) + (d_out if dora else 0)
    return total


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
#: optimizer state bytes per trainable parameter (fp32 states)
_OPT_STATE_BYTES = {
    "adamw": 8,  # exp_avg + exp_avg_sq
    "adamw_8bit": 2,  # two 8-bit states (bitsandbytes), block scales ignored
    "lion": 4,  # momentum
    "sophia": 8,  # momentum + hessian estimate
    "muon": 4,  # momentum (2-D weights; other tensors fall back to AdamW, see below)
}


def _act_bytes(precision: str) -> int:
    return 2 if precision in ("bf16", "fp16") else 4


def _weight_bytes(model_cfg: dict) -> int:
    dtype = getattr(model_cfg, "dtype", None)  # from_pretrained only
    return 2 if dtype in ("bfloat16", "float16") else 4


def _optimizer_bytes(model_cfg: dict, vocab_size: int, trainable: int, total: int, optimizer_name: str) -> int:
    name = optimizer_name or "adamw"
    if name == "adafactor":
        # factored second moment: rows + cols per matrix, full for vectors; no first moment
        if _pretrained(model_cfg) is not None:
            return 4 * int(2 * math.sqrt(max(trainable, 1)))  # rough: shapes unknown without loading
        elems = 0
        for _, s in param_shapes(model_cfg, vocab_size):
            elems += (s[0] + _numel(s[1:])) if len(s) >= 2 else _numel(s)
        return 4 * int(elems * trainable / max(total, 1))
    if name == "muon" and _pretrained(model_cfg) is None:
        shapes = param_shapes(model_cfg, vocab_size)
        matrices = sum(_numel(s) for n, s in shapes if len(s) == 2 and "embed" not in n and "lm_head" not in n)
        other = total - matrices
        return int((4 * matrices + 8 * other) * trainable / max(total, 1))
    if name not in _OPT_STATE_BYTES:
        raise ValueError(f"unknown optimizer {name!r}")
    return _OPT_STATE_BYTES[name] * trainable


def activation_elements_per_token(model_cfg: dict, seq_len: int) -> int:
    """Activation elements kept for the backward pass, per token, summed over layers.

    Transformer layer: norm in/out (2D), q, k, v (D + 2*H_kv*Dh), attention output and o_proj input
    (2D), post-attention norm in/out (2D), FFN hidden (4F gated: gate, up, act, product; 2F plain),
    dropout masks ignored; MoE multiplies the FFN part by k and adds the router's E. SDPA's fused
    kernels keep no T x T score matrix (flash / memory-efficient attention), so none is counted.
    Mamba2 layer: norm in/out (2D), in_proj output, conv output, scan output, gated norm and
    out_proj input, plus one (num_heads x head_dim x state_size) state per chunk.
    """
    if isinstance(model_cfg, dict) and "kv_dim" in model_cfg:  # a pretrained decoder's dims (:func:`pretrained_dims`)
        dims = model_cfg  # not a recipe section: the numbers read from the checkpoint's shapes
        d = dims["d_model"]
        ffn = (4 if dims["gated"] else 2) * dims["d_ff"]
        return dims["n_layers"] * (6 * d + 2 * dims["kv_dim"] + 2 * d + ffn)
    arch = getattr(as_model_spec(model_cfg), "arch", None)
    if arch == "transformer":
        k = transformer_dims(model_cfg)
        d = k["d_model"]
        attn = 6 * d + 2 * k["n_kv_heads"] * k["head_dim"]
        ffn = (4 if k["gated"] else 2) * k["d_ff"]
        if k["n_experts"]:
            ffn = ffn * k["experts_per_token"] + int(k["n_experts"])
        return k["n_layers"] * (attn + 2 * d + ffn)
    if arch == "mamba2":
        k = mamba2_dims(model_cfg)
        states = k["num_heads"] * k["head_dim"] * k["state_size"] / max(k["chunk_size"], 1)
        per = 2 * k["d_model"] + k["in_proj"] + k["conv_dim"] + 3 * k["intermediate"] + states
        return int(k["n_layers"] * per)
    return 0


def pretrained_dims(shapes: list[tuple[str, list[int]]]) -> dict | None:
    """The numbers a Llama-like pretrained decoder's activation count needs, from its tensor shapes
    (transformers' names, which :func:`llmlab.models.gguf.gguf_shapes` also gives):
    ``{"d_model", "n_layers", "kv_dim", "d_ff", "gated", "vocab"}`` from ``embed_tokens``
    (V x D), ``layers.N.self_attn.k_proj`` (K x D) and ``layers.N.mlp.up_proj`` (F x D,
    ``gate_proj`` present: gated); None when the names are not those."""
    import re

    by_suffix: dict[str, list[int]] = {}
    layers = set()
    for name, shape in shapes:
        m = re.search(r"layers\.(\d+)\.(.+)$", name)
        if m:
            layers.add(int(m.group(1)))
            by_suffix.setdefault(m.group(2), list(shape))
        elif name.endswith("embed_tokens.weight"):
            by_suffix["embed"] = list(shape)
    need = ("embed", "self_attn.k_proj.weight", "mlp.up_proj.weight")
    if not layers or any(k not in by_suffix or len(by_suffix[k]) != 2 for k in need):
        return None
    vocab, d = by_suffix["embed"]
    return {"d_model": d, "n_layers": len(layers), "kv_dim": by_suffix["self_attn.k_proj.weight"][0],
            "d_ff": by_suffix["mlp.up_proj.weight"][0], "gated": "mlp.gate_proj.weight" in by_suffix, "vocab": vocab}


def mamba2_scan_elements_per_token(model_cfg: dict) -> int:
    """float32 elements per token, summed over layers, that the pure-PyTorch chunked scan of
    transformers' Mamba2Mixer (``torch_forward``: the SSD algorithm of Dao & Gu 2024, used when the
    mamba_ssm / causal_conv1d kernels are absent, as on a CPU) allocates in one layer's forward and
    autograd keeps for the backward. It computes in float32 whatever the autocast dtype. With
    H heads of size P, state size N and chunk length Q, per token:

    * 8 H*P: x in float32, x * dt, the D residual, the diagonal-block output, C times the states,
      the off-diagonal output, their sum and the residual-added output;
    * 3 H*N: B and C repeated from the groups to the heads, B times the decay;
    * 6 H*Q: the intra-chunk decay matrix L (segment sum: masked copy, cumulative sum, masked copy,
      exp) and the chunk-local scores G and M = G * L (each a Q x Q matrix per chunk and head);
    * 3 H*P*N/Q: the chunk states, with the initial state prepended, and the propagated states.
    """
    k = mamba2_dims(model_cfg)
    h, p, n, q = k["num_heads"], k["head_dim"], k["state_size"], max(k["chunk_size"], 1)
    return k["n_layers"] * (8 * h * p + 3 * h * n + 6 * h * q + 3 * h * p * n // q)


#: resident memory of an llmlab training process before its model and data: Python with torch,
#: transformers, datasets and accelerate imported, the tokenizer and the data pipeline's buffers.
#: Measured 2026-12-06 (torch 2.x CPU wheel, x86-64 Linux): 460 MiB after the imports alone, peak
#: RSS minus the tensor estimate 480-540 MiB over the quick-start stages. Counted on a CPU device
#: only (a GPU's free memory is read after the CUDA context exists).
CPU_RUNTIME_BYTES = 512 << 20


def training_memory(
    model_cfg: dict,
    vocab_size: int,
    batch_size: int,
    seq_len: int,
    trainable_params: int,
    optimizer_name: str = "adamw",
    precision: str = "fp32",
    shards: int = 1,
    frozen_copies: int = 0,
    runtime_bytes: int = 0,
    dims: dict | None = None,
) -> dict[str, int]:
    """Peak training memory of one device in bytes, by part (a planning estimate, not a measurement).

    * weights = P * w, w = 4 bytes (fp32 master weights; mixed precision autocasts on the fly),
      2 for a ``from_pretrained`` model loaded in bfloat16/float16;
    * grads = trainable * w;
    * optimizer = bytes per trainable parameter: adamw 8, adamw_8bit 2, lion 4, sophia 8,
      muon 4 for 2-D hidden weights and 8 (AdamW) for the rest, adafactor 4 * (rows + cols)
      per matrix (factored second moment, Shazeer & Stern 2018);
    * activations = B * T * a * (elements per token, :func:`activation_elements_per_token`, or
      2 * D per layer plus one layer's worth with ``gradient_checkpointing``) + the logits:
      3 * B * T * V * 4 bytes (the logits, their fp32 copy in the loss, and the gradient),
      a = 2 bytes in bf16/fp16, 4 in fp32/auto (auto is planned as fp32, the worst case); a Mamba2
      model adds B * T * 4 bytes * :func:`mamba2_scan_elements_per_token` (its scan is float32);
    * frozen = ``frozen_copies`` * P * w: whole frozen models held beside the trained one (a
      DPO / GRPO / PPO reference copy of the policy, a PPO reward model of the same size);
    * runtime = ``runtime_bytes``: the process's fixed cost (:data:`CPU_RUNTIME_BYTES` on a CPU);
    * gathered (FSDP, ``shards`` > 1): weights, grads and optimizer state are divided by
      ``shards`` (ZeRO-3), and the parameters gathered whole at a time are added: the root's
      (embeddings, final norm, LM head: FSDP2 keeps the root gathered through the step) and two
      transformer blocks (the one computing and the one prefetched), in the gather dtype (a).

    ``batch_size`` is per device. For a ``from_pretrained`` model (P from the local checkpoint's
    headers) the activations are counted from ``dims`` (:func:`pretrained_dims`, a Llama-like
    decoder's shapes) and are 0 without them; its gathered blocks are not counted.

    Returns:
        ``{"weights", "grads", "optimizer", "activations", "frozen", "gathered", "runtime"}`` in bytes.
    """
    model_cfg = as_model_spec(model_cfg)  # typed once: the helpers below take it as it is
    total = count_parameters(model_cfg, vocab_size)
    trainable = int(trainable_params)
    w = _weight_bytes(model_cfg)
    shards = max(1, int(shards))
    optimizer = _optimizer_bytes(model_cfg, vocab_size, trainable, total, optimizer_name)
    a = _act_bytes(precision)
    tokens = int(batch_size) * int(seq_len)
    acts = gathered = 0
    pretrained = _pretrained(model_cfg) is not None
    if not pretrained or dims:  # a pretrained model's activations from its checkpoint's shapes
        per_token = activation_elements_per_token(dims if pretrained else model_cfg, seq_len)
        n_layers = int(dims["n_layers"] if pretrained else model_cfg.n_layers)
        if model_cfg.gradient_checkpointing:
            d = int(dims["d_model"] if pretrained else model_cfg.d_model)
            per_token = n_layers * d + per_token // max(n_layers, 1)
        acts = tokens * per_token * a + 3 * tokens * int(vocab_size) * 4
        if getattr(model_cfg, "arch", None) == "mamba2":
            scan = mamba2_scan_elements_per_token(model_cfg)
            acts += tokens * 4 * (scan // max(n_layers, 1) if model_cfg.gradient_checkpointing else scan)
        if shards > 1 and not pretrained:
            fewer = dataclasses.replace(model_cfg, n_layers=n_layers - 1)
            block = (total - count_parameters(fewer, vocab_size)) if n_layers else 0
            root = total - n_layers * block
            gathered = (root + 2 * block) * a
    return {"weights": -(-total * w // shards), "grads": -(-trainable * w // shards),
            "optimizer": -(-optimizer // shards), "activations": int(acts),
            "frozen": int(frozen_copies) * -(-total * w // shards), "gathered": int(gathered),
            "runtime": int(runtime_bytes)}


def estimate_training_memory(*args, **kwargs) -> int:
    """Peak training memory of one device in bytes: the sum of :func:`training_memory`'s parts
    (``weights + grads + optimizer states + activations``, sharded over ``shards`` FSDP processes);
    same arguments."""
    return sum(training_memory(*args, **kwargs).values())


__all__ = [
    "CPU_RUNTIME_BYTES",
    "activation_elements_per_token",
    "count_lora_parameters",
    "count_parameters",
    "default_d_ff",
    "estimate_training_memory",
    "lora_spec",
    "as_model_spec",
    "filled_model",
    "gguf_parameter_count",
    "mamba2_dims",
    "mamba2_scan_elements_per_token",
    "pretrained_dims",
    "param_shapes",
    "safetensors_parameter_count",
    "training_memory",
    "transformer_dims",
]
