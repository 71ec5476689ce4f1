"""Chat rendering without Jinja per conversation: a verified skeleton per conversation *shape*.

Rendering a conversation with transformers' Jinja environment
(``transformers.utils.chat_template_utils.render_jinja_template``) costs about 0.1 ms; the chat
token store renders every example once, so for a large SFT set this is most of its CPU time. Most
chat templates, though, never *look* at a message's content: they only write it out. For such a
template the rendered text is a fixed sequence of literal pieces with the contents spliced in,
and which pieces, in which order, depends only on the conversation's **shape**: each message's
role and other fields, and whether its content is empty. :class:`SkeletonRenderer` renders each
shape once through Jinja with sentinel contents, keeps the literal pieces, the slots and the
generation spans (``{% generation %}``), and renders every further conversation of that shape by
joining strings.

**When a template qualifies** (:func:`analyse`, on the AST that transformers' own sandboxed
environment parses): a type is inferred for every expression and every assigned variable (flow
insensitive, to a fixpoint) in the lattice *clean* (a function of the shape and the constant
context) < *slot* (a message's content) / *trimmed slot* (``content | trim``, Jinja's trim being
``str.strip()``) / *text* (a concatenation, ``+`` or ``~``, of those and clean values) and the
message kinds *message* / *message list* (``messages``, its items and slices). The template is
accepted only when

- content-derived text reaches the output only through ``{{ }}`` in the template body, ``{% for %}``,
  ``{% if %}``, ``{% generation %}`` or ``{% with %}`` (never inside a macro, a call or filter block,
  or a ``{% set %}`` block, whose output is captured and could be transformed);
- the only operations on it are concatenation, ``trim`` (directly on a content), ``string``,
  type tests (``is string``, ``is defined``, ...) and the truth of an untrimmed content (the
  shape records which contents are empty); any comparison, ``in``, slicing, method, other filter,
  call argument or container use of it refuses the template;
- a message is only indexed by constant keys (``message['role']``, ``message.content``), a
  message list only indexed, sliced, iterated, measured (``length``) or asked ``first``/``last``;
  ``loop.previtem``/``loop.nextitem``, imports, includes, blocks and recursive loops refuse it.

A refused template keeps the Jinja path for every conversation. **Per shape**, the sentinel
rendering is read back: every content occurrence must appear either raw (with its whitespace
padding) or trimmed (without), the literal pieces must hold none of the sentinel characters, and
no generation span may start or end inside a content; otherwise that shape renders through Jinja.
A span boundary in the skeleton moves by the length differences of the contents before it.
**Defence in depth**: each :meth:`SkeletonRenderer.render` call (one shard) also renders the first
conversation of each shape it meets through Jinja and compares text and spans; a mismatch renders
the whole call through Jinja and turns the fast path off for the template in this process (logged).
A worker process of a build takes over the skeletons its parent verified so (they travel with
each shard's pickled ``ChatTemplate``: :func:`shipped_state`), so it renders those shapes without
importing transformers (about 0.7 s of CPU a worker); shapes it builds itself it checks per shard.

Conversations that are not lists of plain ``dict``\\ s with only ``str`` values (tool calls,
multimodal content, ``None`` fields) always go through Jinja, exactly as
``ChatTemplate.render`` always did.
"""

from __future__ import annotations

import logging
import re
from itertools import accumulate
from typing import Any

log = logging.getLogger(__name__)

# -- the static analysis ------------------------------------------------------------------------

CLEAN, SLOT, TSLOT, TEXT, MSG, MLIST, LOOP = "clean", "slot", "trimmed slot", "text", "message", "message list", "loop"
_TEXTUAL = (SLOT, TSLOT, TEXT)
#: unary Jinja tests whose result for a ``str`` (every fast-path content) depends on its type only
_TYPE_TESTS = frozenset({"defined", "undefined", "none", "string", "mapping", "sequence", "iterable",
                         "number", "integer", "float", "boolean", "true", "false", "callable"})
#: keys of a message that reach a dict's methods through Jinja's getattr/getitem fallback
_DICT_ATTRS = frozenset(dir(dict))
#: attributes of ``loop`` that hand out items of the loop's iterable
_LOOP_ITEMS = frozenset({"previtem", "nextitem"})
_GENERATION = "_generation_support"  # transformers' AssistantTracker method behind {% generation %}


class Refused(Exception):
    """The template uses a message's content in a way the skeleton cannot reproduce."""


def _join(a: str, b: str) -> str:
    """The least type holding both (raises :class:`Refused` for text joined with a message kind)."""
    if a == b or b == CLEAN:
        return a
    if a == CLEAN:
        return b
    if a in _TEXTUAL and b in _TEXTUAL:
        return TEXT
    raise Refused(f"a value that is sometimes {a}, sometimes {b}")


class _Analysis:
    """One pass of the type inference over a parsed template (see the module docstring)."""

    def __init__(self, names: dict[str, str]):
        self.names = names            # variable -> type, from the previous pass
        self.assigned: dict[str, str] = {}  # this pass's joins

    def assign(self, name: str, t: str) -> None:
        self.assigned[name] = _join(self.assigned.get(name, CLEAN), t)

    # statements ---------------------------------------------------------------------------------
    def body(self, nodes, capture: bool, generation: bool) -> None:
        for node in nodes:
            self.stmt(node, capture, generation)

    def stmt(self, node, capture: bool, generation: bool) -> None:  # noqa: C901 (one branch per node type)
        from jinja2 import nodes as n

        if isinstance(node, n.Output):
            for e in node.nodes:
                t = self.expr(e)
                if t not in (CLEAN, *_TEXTUAL) or (capture and t != CLEAN):
                    raise Refused(f"line {node.lineno}: a {t} written where the output is captured or not text")
        elif isinstance(node, n.For):
            self.for_(node, capture, generation)
        elif isinstance(node, n.If):
            self.truth(node.test)
            self.body(node.body, capture, generation)
            self.body(node.elif_, capture, generation)
            self.body(node.else_, capture, generation)
        elif isinstance(node, n.Assign):
            self.target(node.target, self.expr(node.node))
        elif isinstance(node, n.With):
            for target, value in zip(node.targets, node.values):
                self.target(target, self.expr(value))
            self.body(node.body, capture, generation)
        elif isinstance(node, n.AssignBlock):
            self.filter_args(node.filter)
            self.body(node.body, True, generation)
            self.target(node.target, CLEAN)
        elif isinstance(node, n.CallBlock):
            self.call_block(node, capture, generation)
        elif isinstance(node, (n.Macro, n.FilterBlock)):
            for e in getattr(node, "defaults", []):
                self.clean(e)
            self.filter_args(getattr(node, "filter", None))
            self.body(node.body, True, generation)
        elif isinstance(node, n.Scope):
            self.body(node.body, capture, generation)
        elif isinstance(node, n.ExprStmt):
            self.expr(node.node)
        elif not isinstance(node, (n.Continue, n.Break)):
            raise Refused(f"line {node.lineno}: {type(node).__name__} is not analysed")

    def for_(self, node, capture: bool, generation: bool) -> None:
        from jinja2 import nodes as n

        if node.recursive:
            raise Refused(f"line {node.lineno}: a recursive loop")
        it = self.expr(node.iter)
        if it == MLIST and isinstance(node.target, n.Name):
            self.assign(node.target.name, MSG)
        elif it == CLEAN:
            self.target(node.target, CLEAN)
        else:
            raise Refused(f"line {node.lineno}: a loop over a {it}")
        if node.test is not None:
            self.truth(node.test)
        self.body(node.body, capture, generation)
        self.body(node.else_, capture, generation)

    def call_block(self, node, capture: bool, generation: bool) -> None:
        from jinja2 import nodes as n

        call = node.call
        if isinstance(call, n.Call) and isinstance(call.node, n.ExtensionAttribute) \
                and call.node.name == _GENERATION and not (call.args or call.kwargs):
            if capture or generation:
                raise Refused(f"line {node.lineno}: a generation block inside a captured block")
            self.body(node.body, capture, True)
            return
        self.clean(call)
        for e in node.defaults:
            self.clean(e)
        self.body(node.body, True, generation)

    def target(self, target, t: str) -> None:
        from jinja2 import nodes as n

        if isinstance(target, n.Name):
            self.assign(target.name, t)
        elif t != CLEAN:
            raise Refused(f"line {target.lineno}: a {t} assigned to {type(target).__name__}")
        elif isinstance(target, n.Tuple):
            for item in target.items:
                self.target(item, CLEAN)

    def filter_args(self, f) -> None:
        if f is not None:
            for e in [*f.args, *f.kwargs, f.dyn_args, f.dyn_kwargs]:
                if e is not None:
                    self.clean(e)

    # expressions --------------------------------------------------------------------------------
    def clean(self, e) -> None:
        t = self.expr(e)
        if t != CLEAN:
            raise Refused(f"line {e.lineno}: a {t} used in {type(e).__name__}")

    def truth(self, e) -> None:
        """``e`` used as a condition: its truth must be a function of the shape."""
        from jinja2 import nodes as n

        if isinstance(e, (n.And, n.Or)):
            self.truth(e.left)
            self.truth(e.right)
        elif isinstance(e, n.Not):
            self.truth(e.node)
        else:
            t = self.expr(e)
            if t not in (CLEAN, SLOT, MSG, MLIST):  # an untrimmed content is true when not empty
                raise Refused(f"line {e.lineno}: the truth of a {t}")

    def expr(self, e) -> str:  # noqa: C901 (one branch per node type)
        from jinja2 import nodes as n

        if isinstance(e, (n.Const, n.TemplateData)):
            return CLEAN
        if isinstance(e, n.Name):
            t = self.names.get(e.name, CLEAN)
            return _join({"messages": MLIST, "loop": LOOP}.get(e.name, CLEAN), t)
        if isinstance(e, n.Getitem):
            return self.item(e, e.node, e.arg)
        if isinstance(e, n.Getattr):
            return self.item(e, e.node, n.Const(e.attr, lineno=e.lineno))
        if isinstance(e, (n.Add, n.Concat)):
            ts = [self.expr(x) for x in ((e.left, e.right) if isinstance(e, n.Add) else e.nodes)]
            if any(t in (MSG, MLIST) for t in ts):
                raise Refused(f"line {e.lineno}: a message concatenated")
            return CLEAN if all(t == CLEAN for t in ts) else TEXT
        if isinstance(e, n.CondExpr):
            self.truth(e.test)
            return _join(self.expr(e.expr1), self.expr(e.expr2) if e.expr2 is not None else CLEAN)
        if isinstance(e, n.Filter):
            return self.filter(e)
        if isinstance(e, n.Test):
            return self.test(e)
        if isinstance(e, n.Compare):
            return self.compare(e)
        if isinstance(e, n.Keyword):
            return self.expr(e.value)
        if isinstance(e, n.Pair):
            return _join(self.expr(e.key), self.expr(e.value))
        if isinstance(e, n.Call):
            for x in [e.node, *e.args, *e.kwargs, e.dyn_args, e.dyn_kwargs]:
                if x is not None:
                    self.clean(x)
            return CLEAN
        if isinstance(e, (n.BinExpr, n.UnaryExpr, n.Tuple, n.List, n.Dict, n.Slice)):
            for x in e.iter_child_nodes():
                self.clean(x)
            return CLEAN
        if isinstance(e, n.ExtensionAttribute) and e.name == _GENERATION:
            return CLEAN
        raise Refused(f"line {e.lineno}: {type(e).__name__} is not analysed")

    def item(self, e, obj, key) -> str:
        """``obj[key]`` / ``obj.key``."""
        from jinja2 import nodes as n

        t = self.expr(obj)
        const = key.value if isinstance(key, n.Const) else None
        if t in (MSG, LOOP):
            if not isinstance(const, str) or const in (_DICT_ATTRS if t == MSG else _LOOP_ITEMS):
                raise Refused(f"line {e.lineno}: a {t} read by the key {const!r}")
            return SLOT if t == MSG and const == "content" else CLEAN
        if isinstance(key, n.Slice):
            for x in key.iter_child_nodes():
                self.clean(x)
            if t in (CLEAN, MLIST):
                return t
        else:
            self.clean(key)
            if t == CLEAN or (t == MLIST and not isinstance(const, str)):
                return MSG if t == MLIST else CLEAN
        raise Refused(f"line {e.lineno}: a {t} indexed")

    def filter(self, e) -> str:
        self.filter_args(e)
        t = self.expr(e.node)
        bare = not (e.args or e.kwargs or e.dyn_args or e.dyn_kwargs)
        if t == CLEAN:
            return CLEAN
        if e.name == "trim" and bare and t in (SLOT, TSLOT):
            return TSLOT
        if e.name == "string" and bare and t in _TEXTUAL:
            return t
        if e.name in ("length", "count") and t in (MSG, MLIST):
            return CLEAN
        if e.name in ("first", "last") and t == MLIST:
            return MSG
        raise Refused(f"line {e.lineno}: a {t} through the filter {e.name!r}")

    def test(self, e) -> str:
        self.filter_args(e)
        t = self.expr(e.node)
        if t != CLEAN and not (e.name in _TYPE_TESTS and not (e.args or e.kwargs or e.dyn_args or e.dyn_kwargs)):
            raise Refused(f"line {e.lineno}: a {t} tested with {e.name!r}")
        return CLEAN

    def compare(self, e) -> str:
        if len(e.ops) == 1 and e.ops[0].op in ("in", "notin") and self.expr(e.ops[0].expr) == MSG:
            self.clean(e.expr)  # a key of a message: the shape has every key
            return CLEAN
        self.clean(e.expr)
        for op in e.ops:
            self.clean(op.expr)
        return CLEAN


def analyse(template: str) -> str | None:
    """Why ``template`` cannot be rendered from skeletons (see the module docstring), or None when
    it can. The template is parsed by transformers' own environment (its ``{% generation %}``
    extension, ``trim_blocks`` and ``lstrip_blocks``)."""
    import jinja2.filters
    from transformers.utils.chat_template_utils import _compile_jinja_template

    if _SENTINEL_CHARS.search(template):
        return "the template holds a sentinel character"
    env = _compile_jinja_template(template).environment
    if env.filters.get("trim") is not jinja2.filters.do_trim:
        return "the environment's trim filter is not Jinja's"
    tree = env.parse(template)
    names: dict[str, str] = {}
    try:
        for _ in range(32):  # each pass can only raise a variable's type: a short fixpoint
            a = _Analysis(names)
            a.body(tree.body, False, False)
            if a.assigned == names:
                return None
            names = a.assigned
    except Refused as e:
        return str(e)
    return "the variable types did not settle"


# -- skeletons ----------------------------------------------------------------------------------

#: sentinel content ``i``: _PAD_L + "\ue000" + i + "\ue001" + _PAD_R; the pads are whitespace that
#: ``str.strip`` (Jinja's trim) removes, so a trimmed occurrence is told from a raw one
_PAD_L, _PAD_R = "\x1f\x1e", "\x1e\x1f"
_SENTINEL = re.compile("(\x1f\x1e)?\ue000([0-9]+)\ue001(\x1e\x1f)?")
_SENTINEL_CHARS = re.compile("[\x1c-\x1f\ue000\ue001]")


#: shapes given a skeleton per template and process; conversations of further shapes render by Jinja
MAX_SHAPES = 4096


class Skeleton:
    """One shape's rendering: ``literals[0] + v_0 + literals[1] + ... + v_{k-1} + literals[k]`` where
    ``v_j`` is the content of message ``slots[j][0]`` (``str.strip``-ped when ``slots[j][1]``).
    ``bounds``: per generation span, ``(fixed_start, slots_before_start, fixed_end, slots_before_end)``:
    a boundary's character offset is its ``fixed`` literal characters plus the lengths of the
    first ``slots_before`` slot values."""

    __slots__ = ("literals", "slots", "bounds")

    def __init__(self, literals: list[str], slots: list[tuple[int, bool]], bounds: list[tuple[int, int, int, int]]):
        self.literals, self.slots, self.bounds = literals, slots, bounds

    def render(self, conv: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """``conv``'s text and generation spans (``conv`` has this skeleton's shape)."""
        values = [conv[m]["content"].strip() if trim else conv[m]["content"] for m, trim in self.slots]
        lits = self.literals
        text = lits[0] + "".join([v + lit for v, lit in zip(values, lits[1:])]) if values else lits[0]
        if not self.bounds:
            return text, []
        cum = list(accumulate(map(len, values), initial=0))
        return text, [(fs + cum[ns], fe + cum[ne]) for fs, ns, fe, ne in self.bounds]


def shape(conv) -> tuple | None:
    """The hashable shape of a conversation (everything but its contents, and which contents are
    empty), or None when it is not a list of plain dicts with only ``str`` values."""
    key = []
    for m in conv:
        if type(m) is not dict:
            return None
        if len(m) == 2 and type(m.get("role")) is str and type(m.get("content")) is str:
            key.append((m["role"], not m["content"]))
            continue
        if not all(type(v) is str for v in m.values()):
            return None
        key.append(tuple((k, (not v) if k == "content" else v) for k, v in m.items()))
    return tuple(key)


def _skeleton(text: str, spans: list[tuple[int, int]]) -> Skeleton | str:
    """The skeleton read from a sentinel rendering (its text and generation spans), or why not."""
    literals, slots, occ, pos = [], [], [], 0
    for m in _SENTINEL.finditer(text):
        raw = m.group(1) is not None
        if raw != (m.group(3) is not None):
            return "a content occurrence is neither raw nor trimmed"
        literals.append(text[pos: m.start()])
        slots.append((int(m.group(2)), not raw))
        occ.append((m.start(), m.end()))
        pos = m.end()
    literals.append(text[pos:])
    if any(_SENTINEL_CHARS.search(lit) for lit in literals):
        return "a literal piece holds a sentinel character"

    def bound(p: int) -> tuple[int, int]:
        before = [(s, e) for s, e in occ if e <= p]
        if any(s < p < e for s, e in occ):
            raise ValueError
        return p - sum(e - s for s, e in before), len(before)

    try:
        bounds = [(*bound(s), *bound(e)) for s, e in spans]
    except ValueError:
        return "a generation span starts or ends inside a content"
    return Skeleton(literals, slots, bounds)


def render_by_jinja(template: str, special: dict[str, Any], conversations: list, *, generation_prompt: bool = False
                    ) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Each conversation rendered by transformers' Jinja path, as ``tokenizer.apply_chat_template``
    renders it with the template's extra variables ``special`` (``bos_token``, ...): the texts and,
    without ``generation_prompt``, the [start, end) character spans of the generation blocks
    (``return_assistant_tokens_mask=True``); with it, the opening of the assistant turn appended
    (``add_generation_prompt=True``, a prompt to generate from) and no spans (empty lists)."""
    from transformers.utils.chat_template_utils import _normalize_chat_messages, render_jinja_template

    texts, spans = render_jinja_template(
        conversations=[_normalize_chat_messages(c) for c in conversations], tools=None, documents=None,
        chat_template=template, return_assistant_tokens_mask=not generation_prompt, continue_final_message=False,
        add_generation_prompt=generation_prompt, **special)
    if generation_prompt:
        return list(texts), [[] for _ in texts]
    return texts, [[tuple(s) for s in sp] for sp in spans]


class SkeletonRenderer:
    """Renders conversations as ``render_jinja_template(..., return_assistant_tokens_mask=True)``
    does, from per-shape skeletons where :func:`analyse` accepts the template (module docstring).

    Args:
        template: the Jinja source. special: the template's extra variables (``bos_token``, ...).
        state: :meth:`state` of the renderer of another process (the build's parent): its verdict
            on the template and its verified skeletons are taken over (:meth:`merge`), without
            analysing the template or importing transformers; None: the template is analysed here.
    """

    def __init__(self, template: str, special: dict[str, Any], state: tuple | None = None):
        self.template, self.special = template, special
        self.skeletons: dict[tuple, Skeleton | None] = {}
        self.verified: set[tuple] = set()  # shapes whose skeleton rendered as Jinja did (here or in the parent)
        self.trusted: set[tuple] = set()   # of those, the shapes verified by the parent: not checked again
        if state is None:
            self.refused = analyse(template)
            if self.refused:
                log.info("chat template rendered by Jinja per conversation: %s", self.refused)
        else:
            self.refused = None
            self.merge(state)

    def state(self) -> tuple:
        """What another process's renderer of this template takes over: ``(refused, skeletons)``,
        the verified skeletons only."""
        return self.refused, {k: self.skeletons[k] for k in list(self.verified)}

    def merge(self, state: tuple) -> None:
        """Take over a :meth:`state`: a refusal, and the skeletons of shapes this renderer lacks
        (trusted: the first conversation of their shapes is not rendered by Jinja again here)."""
        refused, skeletons = state
        self.refused = self.refused or refused
        for k, sk in skeletons.items():
            if k not in self.skeletons:
                self.skeletons[k] = sk
                self.verified.add(k)
                self.trusted.add(k)

    def jinja(self, conversations: list) -> tuple[list[str], list[list[tuple[int, int]]]]:
        """Each conversation rendered by transformers' Jinja path (texts, generation spans)."""
        return render_by_jinja(self.template, self.special, conversations)

    def skeleton(self, key: tuple, conv: list[dict]) -> Skeleton | None:
        """The skeleton of ``conv``'s shape ``key`` (made on first use; None: that shape renders by Jinja)."""
        if key in self.skeletons:
            return self.skeletons[key]
        if len(self.skeletons) >= MAX_SHAPES:
            return None
        sentinel = [{k: (f"{_PAD_L}\ue000{i}\ue001{_PAD_R}" if k == "content" and v else v) for k, v in m.items()}
                    for i, m in enumerate(conv)]
        if any(_SENTINEL_CHARS.search(v) for m in conv for k, v in m.items() if k != "content"):
            sk = "a field holds a sentinel character"
        else:
            try:
                (text,), (spans,) = self.jinja([sentinel])
                sk = _skeleton(text, spans)
            except Exception as e:  # noqa: BLE001 (the template raises for this shape: Jinja raises it again per conversation)
                sk = f"{type(e).__name__}: {e}"
        if isinstance(sk, str):
            log.debug("chat template: a conversation shape rendered by Jinja (%s)", sk)
            sk = None
        self.skeletons[key] = sk
        return sk

    def render(self, conversations: list) -> tuple[list[str], list[list[tuple[int, int]]]]:
        """Texts and generation spans ([start, end) characters) of ``conversations``, equal to
        :meth:`jinja`'s. The first conversation of each shape met in this call is also rendered by
        Jinja and compared (but for the shapes the parent process verified: :meth:`merge`); a
        difference renders the whole call by Jinja and turns skeletons off."""
        if self.refused:
            return self.jinja(conversations)
        texts: list[str | None] = [None] * len(conversations)
        spans: list = [None] * len(conversations)
        slow, checked = [], {}
        for i, conv in enumerate(conversations):
            key = shape(conv)
            sk = self.skeleton(key, conv) if key is not None else None
            if sk is None:
                slow.append(i)
                continue
            texts[i], spans[i] = sk.render(conv)
            if key not in self.trusted:
                checked.setdefault(key, i)
        if checked:
            idx = list(checked.values())
            if self.jinja([conversations[i] for i in idx]) != ([texts[i] for i in idx], [spans[i] for i in idx]):
                log.warning("chat template: a skeleton rendering differed from Jinja's; rendering by Jinja")
                self.refused = "a skeleton rendering differed from Jinja's"
                return self.jinja(conversations)
            self.verified.update(checked)
        if slow:
            t, s = self.jinja([conversations[i] for i in slow])
            for i, ti, si in zip(slow, t, s):
                texts[i], spans[i] = ti, si
        return texts, spans


_RENDERERS: dict[tuple, SkeletonRenderer] = {}


def renderer(template: str, special: tuple[tuple[str, Any], ...], state: tuple | None = None) -> SkeletonRenderer:
    """The process's :class:`SkeletonRenderer` of ``template`` with ``special`` variables (its
    skeletons kept across calls), made on first use; ``state`` (:meth:`SkeletonRenderer.state` of
    the parent's) is merged into it."""
    key = (template, repr(special))
    if key not in _RENDERERS:
        _RENDERERS[key] = SkeletonRenderer(template, dict(special), state)
    elif state is not None:
        _RENDERERS[key].merge(state)
    return _RENDERERS[key]


def shipped_state(template: str, special: tuple[tuple[str, Any], ...]) -> tuple | None:
    """The state a worker process's renderer takes over from this process's renderer of
    ``template`` (None when this process has not rendered it): sent with each shard's job, so a
    worker renders the shapes verified here without importing transformers (about 0.7 s of CPU)."""
    r = _RENDERERS.get((template, repr(special)))
    return r.state() if r is not None else None
