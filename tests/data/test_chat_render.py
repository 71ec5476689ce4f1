"""Skeleton chat rendering (llmlab.data.chat_render) against transformers' Jinja rendering, the
oracle: for every accepted template, every conversation's text and generation spans equal
``render_jinja_template``'s exactly; templates that look at a content are refused and still render
as Jinja does; a broken skeleton is caught by the per-call check."""

from __future__ import annotations

import glob
import logging
import os
import random

import pytest

from llmlab.chat_templates import TEMPLATES
from llmlab.data.chat_render import SkeletonRenderer, analyse, shape

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
#: contents that stress the skeleton: whitespace a trim removes, empty, template-like text,
#: special-token text, the sentinel's own characters, unicode
AWKWARD = ["", " ", "\n", "  padded both  ", "\nnewline first", "newline last\n", "\t tabs \t",
           "<|im_start|>user\nfake turn<|im_end|>", "{{ bos_token }} {% if x %}", "</s><s>[INST]",
           "\x1f\x1e\ue0001\ue001\x1e\x1f", "Ça va? 東京 🙂 — ünïcödé", "plain reply.", "x" * 300,
           "\u00a0nbsp\u2028", "a\r\nb"]

#: a ChatML template with a default system turn, as SmolLM2's (written for this test)
SMOL_STYLE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{% if message.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message.content ~ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' ~ message.role ~ '\\n' ~ message.content ~ '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}")
#: accepted constructs the named templates do not use: content truth (the shape knows empty
#: contents), type tests, raw and trimmed occurrences of one content, ``string``, a generation span
#: that is exactly a content (empty when the content is), a content kept in a variable
CONSTRUCTS = (
    "{% set ns = namespace(n=0) %}{% set first = messages[0]['content'] if messages else '' %}"
    "{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{% if m.content %}[{{ m['role'] | upper }}:{{ m.content | string }}|{{ m.content | trim }}]"
    "{% elif m.content is string %}(empty {{ m.role }}){% endif %}"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% endif %}"
    "{% endfor %}{{ ns.n }}:{{ first | trim }}")


def _trl_templates() -> dict[str, str]:
    try:
        import trl
    except ImportError:
        return {}
    folder = os.path.join(os.path.dirname(trl.__file__), "chat_templates")
    return {os.path.basename(p): open(p, encoding="utf-8").read() for p in sorted(glob.glob(folder + "/*.jinja"))}


TRL = _trl_templates()
#: TRL's templates the analysis accepts (the others read a content: split, loops over parts, ...)
TRL_ACCEPTED = ["gemma.jinja", "gemma_training.jinja", "llama3.jinja", "llama3_training.jinja", "phi3.jinja",
                "phi3_training.jinja", "phi3_5.jinja", "phi3_5_training.jinja", "qwen2_5.jinja",
                "qwen2_5_training.jinja", "qwen3_instruct_2507.jinja", "qwen3_instruct_2507_training.jinja"]
ACCEPTED = {**{f"llmlab:{k}": v for k, v in TEMPLATES.items()}, "smol_style": SMOL_STYLE, "constructs": CONSTRUCTS,
            **{f"trl:{k}": TRL[k] for k in TRL_ACCEPTED if k in TRL}}


def conversations(seed: int, n: int = 160) -> list[list[dict]]:
    """``n`` conversations: with and without a system turn, one to four exchanges, some ending on a
    user turn, some starting with the assistant, contents drawn from :data:`AWKWARD`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        roles = ["system"] if rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 4)):
            roles += ["user", "assistant"]
        if rng.random() < 0.2:
            roles.pop()
        if rng.random() < 0.1:
            roles = roles[1:] if roles[0] == "system" else ["assistant", *roles]
        out.append([{"role": r, "content": rng.choice(AWKWARD)} for r in roles])
    return out


def _jinja_each(r: SkeletonRenderer, convs):
    """Jinja's rendering of each conversation it renders without an error."""
    good, want = [], []
    for c in convs:
        try:
            (t,), (s,) = r.jinja([c])
        except Exception:  # noqa: BLE001 (a template that refuses this conversation, e.g. a system turn)
            continue
        good.append(c)
        want.append((t, s))
    return good, want


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_template_renders_as_jinja(name):
    template = ACCEPTED[name]
    assert analyse(template) is None
    r = SkeletonRenderer(template, SPECIAL)
    convs, want = _jinja_each(r, conversations(seed=len(name)))
    assert len(convs) > 40
    for c, w in zip(convs, want):  # every skeleton itself, not only the checked batch
        sk = r.skeleton(shape(c), c)
        assert sk is not None, c
        assert sk.render(c) == w, c
    texts, spans = r.render(convs)
    assert (texts, spans) == ([w[0] for w in want], [w[1] for w in want])
    assert r.refused is None  # the per-call check found nothing: the skeletons made these


REFUSED = {
    "comparison": "{% for m in messages %}{% if m.content == 'hi' %}HI{% endif %}{{ m.content }}{% endfor %}",
    "in": "{% for m in messages %}{% if 'x' in m['content'] %}X{% endif %}{{ m.content }}{% endfor %}",
    "filter": "{% for m in messages %}{{ m.content | upper }}{% endfor %}",
    "trim_concat": "{% for m in messages %}{{ (m.content + ' ') | trim }}{% endfor %}",
    "trimmed_truth": "{% for m in messages %}{% if m.content | trim %}[{{ m.content }}]{% endif %}{% endfor %}",
    "slice": "{% for m in messages %}{{ m.content[:3] }}{% endfor %}",
    "method": "{% for m in messages %}{{ m.content.split('a')[0] }}{% endfor %}",
    "get": "{% for m in messages %}{{ m.get('content') }}{% endfor %}",
    "computed_key": "{% set k = 'content' %}{% for m in messages %}{{ m[k] }}{% endfor %}",
    "via_variable": "{% for m in messages %}{% set c = m.content %}{% if c == '' %}E{% endif %}{{ c }}{% endfor %}",
    "length": "{% for m in messages %}{{ m.content | length }}{{ m.content }}{% endfor %}",
    "namespace": "{% set ns = namespace(s='') %}{% for m in messages %}{% set ns.s = m.content %}{% endfor %}{{ ns.s }}",
    "macro": "{% macro w(t) %}<{{ t }}>{% endmacro %}{% for m in messages %}{{ w(m.content) }}{% endfor %}",
    "filter_block": "{% filter upper %}{% for m in messages %}{{ m.content }}{% endfor %}{% endfilter %}",
    "set_block": "{% set out %}{% for m in messages %}{{ m.content }}{% endfor %}{% endset %}{{ out | trim }}",
    "previtem": "{% for m in messages %}{% if loop.previtem %}{{ loop.previtem.content }}{% endif %}{% endfor %}",
    "whole_message": "{% for m in messages %}{{ m | tojson }}{% endfor %}",
    "messages_list": "{{ messages }}",
    "loop_over_content": "{% for m in messages %}{% for ch in m.content %}{{ ch }}{% endfor %}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_template_reading_content_is_refused_and_still_renders(name):
    template = REFUSED[name]
    assert analyse(template) is not None
    r = SkeletonRenderer(template, SPECIAL)
    convs, want = _jinja_each(r, conversations(seed=7, n=40))
    assert r.render(convs) == ([w[0] for w in want], [w[1] for w in want])
    assert r.skeletons == {}  # never rendered from a skeleton


def test_named_templates_are_accepted():
    """The point of the module: llmlab's own templates all render from skeletons."""
    assert {k: analyse(v) for k, v in TEMPLATES.items()} == {k: None for k in TEMPLATES}


def test_broken_skeleton_is_caught(caplog):
    """Moving one span boundary of a cached skeleton makes its rendering differ from Jinja's (the
    equality the tests above assert can fail); :meth:`render` notices on the first conversation
    of that shape, renders the call by Jinja, logs it and keeps to Jinja afterwards."""
    r = SkeletonRenderer(TEMPLATES["chatml"], SPECIAL)
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}] for i in range(5)]
    want = r.jinja(convs)
    assert r.render(convs) == want
    sk = r.skeletons[shape(convs[0])]
    fs, ns, fe, ne = sk.bounds[0]
    sk.bounds[0] = (fs + 1, ns, fe, ne)
    assert sk.render(convs[0]) != (want[0][0], want[1][0])
    with caplog.at_level(logging.WARNING, logger="llmlab.data.chat_render"):
        assert r.render(convs) == want
    assert r.refused and "differed" in caplog.text
    assert r.render(convs) == want


def test_conversations_that_are_not_plain_strings_go_through_jinja():
    """None fields (dropped by transformers' normalisation), non-str contents and non-dict
    messages render exactly as Jinja renders them, in the order given."""
    r = SkeletonRenderer("{% for m in messages %}<{{ m.role }}>{% generation %}{{ m.content }}{% endgeneration %}"
                         "{% endfor %}", SPECIAL)
    convs = [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "name": None}],
             [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
             [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}],
             [{"role": "user\ue000", "content": "a"}, {"role": "assistant", "content": "b"}]]
    assert shape(convs[0]) is None and shape(convs[2]) is None
    assert r.render(convs) == r.jinja(convs)
    assert r.skeletons[shape(convs[3])] is None  # a field holding a sentinel character: Jinja


def test_template_errors_are_jinja_errors():
    """A shape the template refuses (Gemma's training template raises on a system turn) raises
    Jinja's error, as rendering by Jinja does."""
    import jinja2

    template = TRL.get("gemma_training.jinja") or TEMPLATES["gemma"].replace(
        "{{ bos_token }}", "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}")
    r = SkeletonRenderer(template, SPECIAL)
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    with pytest.raises(jinja2.exceptions.TemplateError):
        r.jinja([conv])
    with pytest.raises(jinja2.exceptions.TemplateError):
        r.render([conv])


def test_pickled_template_ships_verified_skeletons(monkeypatch):
    """A ChatTemplate pickled for a worker carries the skeletons this process verified: the worker's
    renderer takes them over without analysing the template (no transformers import), renders as
    Jinja does, and still builds and checks skeletons of shapes it has not been sent."""
    import pickle

    from llmlab.data import chat_render
    from llmlab.data.chat_store import ChatTemplate

    monkeypatch.setattr(chat_render, "_RENDERERS", {})
    ct = ChatTemplate(TEMPLATES["chatml"], tuple(sorted(SPECIAL.items())))
    two = [[{"role": "user", "content": f"q{i} "}, {"role": "assistant", "content": f" a{i}"}] for i in range(4)]
    three = [[{"role": "system", "content": "s"}, *c] for c in two]
    assert chat_render.shipped_state(ct.template, ct.special) is None  # nothing rendered here yet
    ct.render(two)
    blob = pickle.dumps(ct)
    monkeypatch.setattr(chat_render, "_RENDERERS", {})  # a fresh process
    monkeypatch.setattr(chat_render, "analyse", lambda t: pytest.fail("analysed again"))
    worker_ct = pickle.loads(blob)
    assert worker_ct == ct
    r = chat_render.renderer(ct.template, ct.special)
    assert r.trusted == {shape(two[0])}
    jinja = chat_render.SkeletonRenderer.jinja
    assert worker_ct.render(two) == jinja(r, two)
    assert worker_ct.render(three) == jinja(r, three)
    assert shape(three[0]) in r.verified - r.trusted
