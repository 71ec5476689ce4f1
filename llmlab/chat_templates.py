"""Chat templates with training markers, and how a recipe's ``tokenizer.chat_template`` is chosen.

SFT trains on the tokens a template renders inside ``{% generation %}`` … ``{% endgeneration %}``
(``apply_chat_template(..., return_assistant_tokens_mask=True)``; TRL's ``assistant_only_loss``).
Every named template here marks, for each assistant turn, exactly the reply's content followed by
the end-of-turn token the template closes the reply with; the turn header (e.g.
``<|im_start|>assistant\\n``) and what follows the end-of-turn token (a newline) are not trained:

- ``chatml``: ``<|im_start|>assistant\\n`` [reply ``<|im_end|>``] ``\\n``;
- ``qwen2``: as chatml, with a default system turn ("You are a helpful assistant.") when none is
  given;
- ``llama3``: ``<|start_header_id|>assistant<|end_header_id|>\\n\\n`` [reply ``<|eot_id|>``] (the
  conversation starts with ``bos_token``, contents are trimmed);
- ``mistral``: ``[INST] user [/INST]`` [reply ``eos_token``];
- ``gemma``: ``<start_of_turn>model\\n`` [reply ``<end_of_turn>``] ``\\n`` (role ``model``, contents
  trimmed);
- ``zephyr``: ``<|assistant|>\\n`` [reply ``eos_token``].

The trained part is in brackets. TRL's training templates also train the newline after the
end-of-turn token (Gemma, Phi-3) or around the reply (Qwen2.5); here the end-of-turn token is the last
trained token, as in llmlab's ChatML from the start.

(Formats after the models' published templates: ChatML/Qwen2, Meta Llama 3, Mistral-7B-Instruct,
Gemma, Zephyr-7B-β; mistral and gemma put a system message in front of the first user turn, and
zephyr's generation prompt ends with the newline its rendered assistant turns start with, so a
prompt is always a prefix of the trained rendering.)

``chat_template: auto`` (the default) keeps a pretrained tokenizer's own template: as it is when it
already has generation markers (``{% generation %}`` or the whitespace-trim ``{%- generation %}``),
else with markers added by :func:`add_generation_markers` when the template is of a known family
(its replies end with one of :data:`KNOWN_END_OF_TURN`), verified by rendering, or replaced by the
named template that renders exactly the same text (:func:`equivalent_named_template`: Meta's Llama 3
template); otherwise the run stops with a message naming the choices. A tokenizer trained by the recipe gets ``chatml``.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

_GEN_OPEN = "{% generation %}"
_GEN_CLOSE = "{% endgeneration %}"

#: ``{% generation %}`` in any whitespace-control form (``{%- generation %}``, ``{% generation -%}``)
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _ml(user_turn: str) -> str:
    """A ChatML-style template body (shared by chatml and qwen2)."""
    return (
        "{% for message in messages %}"
        + user_turn
        + "{% if message['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{{ '\\n' }}"
        "{% else %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


#: system text put in front of the first user turn (templates without a system role)
_SYSTEM_INTO_FIRST_USER = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
)

#: the named templates, each with generation markers (see the module docstring)
TEMPLATES: dict[str, str] = {
    "chatml": _ml(""),
    "qwen2": _ml("{% if loop.first and message['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        _SYSTEM_INTO_FIRST_USER
        + "{{ bos_token }}"
        "{% for message in loop_messages %}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
        "{% else %}{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    "gemma": (
        _SYSTEM_INTO_FIRST_USER
        + "{{ bos_token }}"
        "{% for message in loop_messages %}"
        "{% if message['role'] == 'assistant' %}"
        "{{ '<start_of_turn>model\\n' }}"
        "{% generation %}{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}"
        "{{ '\\n' }}"
        "{% else %}"
        "{{ '<start_of_turn>' + message['role'] + '\\n' + (system if loop.first else '')"
        " + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
}

#: the special tokens each named template writes (added to a tokenizer that lacks them)
TEMPLATE_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen2": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": ("[INST]", "[/INST]"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "zephyr": ("<|system|>", "<|user|>", "<|assistant|>"),
}

#: the end-of-turn tokens of the known families (ChatML/Qwen/SmolLM, Llama 3, Gemma, Phi-3, and
#: ``eos_token`` for Mistral/Zephyr/Llama 2), which :func:`add_generation_markers` trains on
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")

#: the values ``tokenizer.chat_template`` takes besides a Jinja string
CHOICES = ("auto", *TEMPLATES, "none")


def has_generation_markers(template) -> bool:
    """Whether a chat template (str, or a dict of named variants: its ``default``) has
    ``{% generation %}`` markers in any whitespace-control form."""
    if isinstance(template, dict):
        template = template.get("default")
    return bool(template) and GENERATION_MARKER.search(str(template)) is not None


def choices_message() -> str:
    """The text naming what ``tokenizer.chat_template`` may be, for error messages."""
    return (f"set tokenizer.chat_template to one of {', '.join(c for c in CHOICES if c != 'auto')} "
            f"(that template replaces the tokenizer's own) or to a Jinja template with "
            f"{_GEN_OPEN} … {_GEN_CLOSE} around the assistant replies")


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids of the end-of-turn tokens (:data:`KNOWN_END_OF_TURN`) that the tokenizer's chat template
    writes and its vocabulary holds as one token, e.g. ``<|eot_id|>`` for ``llama3``: generation
    of a chat reply stops at them (besides ``eos_token``)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str):
        return []
    vocab = tokenizer.get_vocab()
    return [int(vocab[t]) for t in KNOWN_END_OF_TURN if t in template and t in vocab]


# -- adding markers to a known family's template -------------------------------------------------

_EXPR = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.S)
_CONTENT = re.compile(r"\b([A-Za-z_]\w*)(?:\[\s*['\"]content['\"]\s*\]|\.content\b)")


def _split_plus(expr: str) -> list[str] | None:
    """``expr`` split at its top-level ``+`` (outside strings and brackets); None when unbalanced."""
    terms, depth, quote, start, i = [], 0, None, 0, 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "+" and depth == 0:
            terms.append(expr[start:i])
            start = i + 1
        i += 1
    if quote or depth:
        return None
    terms.append(expr[start:])
    return [t.strip() for t in terms]


def _literal(term: str) -> str | None:
    """The value of a plain string literal term (``'<|im_end|>\\n'``), else None."""
    m = re.fullmatch(r"(['\"])((?:\\.|(?!\1).)*)\1", term, re.S)
    if not m:
        return None
    return m.group(2).encode("latin-1", "backslashreplace").decode("unicode_escape")


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _marked_expression(var: str, expr: str, lstrip: str, rstrip: str) -> str | None:
    """``{{ expr }}`` rewritten so that, for an assistant message, the content term and the
    end-of-turn term after it are inside generation markers; None when ``expr`` is not
    ``… + <content> + <end-of-turn> …`` with a known end-of-turn."""
    terms = _split_plus(expr)
    if terms is None:
        return None
    idx = [i for i, t in enumerate(terms) if _CONTENT.search(t)]
    if len(idx) != 1 or idx[0] + 1 >= len(terms):
        return None
    i = idx[0]
    nxt, lit = terms[i + 1], _literal(terms[i + 1])
    if nxt == "eos_token":
        eot, rest = nxt, terms[i + 2:]
    elif lit is not None and lit.startswith(KNOWN_END_OF_TURN):
        tok = next(t for t in KNOWN_END_OF_TURN if lit.startswith(t))
        tail = [_quote(lit[len(tok):])] if lit[len(tok):] else []
        eot, rest = _quote(tok), tail + terms[i + 2:]
    else:
        return None
    parts = []
    if terms[:i]:
        parts.append("{{ " + " + ".join(terms[:i]) + " }}")
    parts.append(_GEN_OPEN + "{{ " + terms[i] + " + " + eot + " }}" + _GEN_CLOSE)
    if rest:
        parts.append("{{ " + " + ".join(rest) + " }}")
    return ("{%" + lstrip + f" if {var}['role'] == 'assistant' %}}" + "".join(parts)
            + "{% else %}{{ " + expr.strip() + " }}{% endif " + rstrip + "%}")


def add_generation_markers(template: str, special_tokens: dict | None = None) -> str | None:
    """Add generation markers to a chat template of a known family that has none.

    Each ``{{ … }}`` expression that renders a message's content followed by a known end-of-turn
    token (:data:`KNOWN_END_OF_TURN` or ``eos_token``), e.g. SmolLM2's
    ``{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}``,
    becomes a branch that, for an assistant message, renders the same text with the content and the
    end-of-turn token inside ``{% generation %}`` … ``{% endgeneration %}`` (as TRL's training
    templates mark them). The result is accepted only if :func:`verify_markers` holds on probe
    conversations: identical text to the original, and the marked spans are exactly each reply plus
    its end-of-turn token.

    Args:
        template: the original Jinja chat template (without markers).
        special_tokens: ``bos_token``/``eos_token`` values the template may use (the tokenizer's).

    Returns:
        The marked template, or None when the template is of no known family (or verification
        fails).
    """
    changed = False

    def repl(m):
        nonlocal changed
        var = _CONTENT.search(m.group(2))
        new = _marked_expression(var.group(1), m.group(2), m.group(1), m.group(3)) if var else None
        changed |= new is not None
        return new or m.group(0)

    marked = _EXPR.sub(repl, template)
    if not changed or not verify_markers(template, marked, special_tokens or {}):
        return None
    return marked


def _probes() -> list[list[dict]]:
    sys_ = {"role": "system", "content": "Be brief."}
    u1, a1 = {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"}
    u2, a2 = {"role": "user", "content": "Name a colour. "}, {"role": "assistant", "content": "Blue."}
    return [[u1, a1], [u1, a1, u2, a2], [sys_, u1, a1, u2, a2], [u1], [sys_, u1]]


def _render(template: str, conv: list[dict], special_tokens: dict, **kw):
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, indices = render_jinja_template([conv], chat_template=template, **special_tokens, **kw)
    return rendered[0], (indices[0] if indices else [])


def verify_markers(original: str, marked: str, special_tokens: dict) -> bool:
    """Whether ``marked`` renders exactly the text of ``original`` on probe conversations (with and
    without a system turn and the generation prompt; probes the original rejects are skipped) and
    marks, in each, one span per assistant reply equal to its content (as rendered) followed by an
    end-of-turn token (:data:`KNOWN_END_OF_TURN` or ``eos_token``) and nothing else."""
    eots = [*KNOWN_END_OF_TURN, special_tokens.get("eos_token") or "</s>"]
    checked = 0
    for conv in _probes():
        for gen in (False, True):
            try:
                want, _ = _render(original, conv, special_tokens, add_generation_prompt=gen)
            except Exception:  # the original rejects this probe (e.g. "System role not supported")
                continue
            try:
                got, spans = _render(marked, conv, special_tokens, add_generation_prompt=gen,
                                     return_assistant_tokens_mask=True)
            except Exception:
                return False
            replies = [m["content"] for m in conv if m["role"] == "assistant"]
            if got != want or len(spans) != len(replies):
                return False
            for (s, e), reply in zip(spans, replies):
                text = got[s:e]
                if not (text.startswith(reply.strip()) and text[len(reply.strip()):] in eots
                        or text.startswith(reply) and text[len(reply):] in eots):
                    return False
            checked += 1
    return checked > 0


def equivalent_named_template(template: str, special_tokens: dict) -> str | None:
    """The name of the template of :data:`TEMPLATES` that renders exactly the text ``template``
    renders on every probe conversation ``template`` accepts (with and without the generation
    prompt; at least one with assistant turns), e.g. ``llama3`` for Meta's Llama 3 template, which
    builds each turn with ``{% set %}`` where :func:`add_generation_markers` cannot mark it; else
    None."""
    for name, ours in TEMPLATES.items():
        checked = 0
        for conv in _probes():
            for gen in (False, True):
                try:
                    want, _ = _render(template, conv, special_tokens, add_generation_prompt=gen)
                except Exception:
                    continue
                try:
                    got, _ = _render(ours, conv, special_tokens, add_generation_prompt=gen)
                except Exception:
                    checked = -1
                    break
                if got != want:
                    checked = -1
                    break
                checked += any(m["role"] == "assistant" for m in conv)
            if checked < 0:
                break
        if checked > 0:
            return name
    return None


# -- choosing the run's template -------------------------------------------------------------------

#: what ``chat_template: auto`` gives a tokenizer the recipe trains (it has no template of its own)
TRAINED_TOKENIZER_TEMPLATE = "chatml"


def template_identity(name: str | None, pretrained: bool) -> str | None:
    """The ``chat_template`` value that says which template a tokenizer gets, for fingerprints:
    ``auto`` on a trained tokenizer is :data:`TRAINED_TOKENIZER_TEMPLATE` (so a run made when
    ``chatml`` was the default stays fresh); every other value is itself (``auto`` on a pretrained
    tokenizer depends on its files, which its fingerprint hashes)."""
    return TRAINED_TOKENIZER_TEMPLATE if name == "auto" and not pretrained else name


def resolve_chat_template(tok, name: str, pretrained: bool) -> str | None:
    """The chat template the run's tokenizer gets for ``tokenizer.chat_template: name``.

    ``none`` (or None): no template is set (a pretrained tokenizer keeps its own as it is). A named
    template (:data:`TEMPLATES`): that template (the caller adds its :data:`TEMPLATE_TOKENS`).
    ``auto``: ``chatml`` for a trained tokenizer; for a pretrained one its own template, kept when
    it has generation markers, else marked by :func:`add_generation_markers`, else (the same text,
    marked) the named template it renders identically to (:func:`equivalent_named_template`); a
    pretrained
    tokenizer without any template keeps none (chat stages then stop with
    :func:`choices_message`). Anything else is a Jinja template, used as is.

    Raises:
        ValueError: ``auto`` and the pretrained tokenizer's own template has no generation markers
            and is of no known family; the message names the choices.
    """
    if name in (None, "none"):
        return None
    if name in TEMPLATES:
        return TEMPLATES[name]
    if name != "auto":
        return name
    if not pretrained:
        return TEMPLATES[TRAINED_TOKENIZER_TEMPLATE]
    own = tok.chat_template
    if isinstance(own, dict):
        own = own.get("default")
    if not own:
        log.warning("tokenizer: the pretrained tokenizer has no chat template; chat stages need "
                    "one: %s", choices_message())
        return None
    if has_generation_markers(own):
        log.info("tokenizer: keeping the pretrained tokenizer's own chat template (it marks the "
                 "assistant turns)")
        return own
    specials = {k: getattr(tok, k) for k in ("bos_token", "eos_token") if getattr(tok, k, None)}
    marked = add_generation_markers(own, specials)
    same = None if marked is not None else equivalent_named_template(own, specials)
    if same is not None:
        log.info("tokenizer: the pretrained tokenizer's own chat template renders exactly as the "
                 "%s template; using that one, which marks the assistant turns", same)
        return TEMPLATES[same]
    if marked is None:
        raise ValueError("tokenizer.chat_template: auto keeps the pretrained tokenizer's own chat "
                         "template, but it has no {% generation %} markers and is of no known "
                         "family to add them to (its replies do not end with one of "
                         f"{', '.join(KNOWN_END_OF_TURN)} or eos_token); {choices_message()}")
    log.info("tokenizer: keeping the pretrained tokenizer's own chat template, with generation "
             "markers added around each assistant reply and its end-of-turn token")
    return marked
