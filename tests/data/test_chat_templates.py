"""Chat templates: each named template's SFT mask covers exactly the assistant replies and their
end-of-turn tokens; ``chat_template: auto`` keeps a pretrained tokenizer's own template (adding
generation markers for known families, else stopping with the choices); both marker forms count."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from llmlab.chat_templates import (CHOICES, TEMPLATE_TOKENS, TEMPLATES, add_generation_markers,
                                        has_generation_markers, resolve_chat_template)
from llmlab.data.tokenizer import CHATML_TEMPLATE, EOS_TOKEN, save_tokenizer, train_tokenizer

TEXTS = ["Hello there, how are you today?", "Hi! How can I help you?", "Name a colour, please.",
         "Blue. Red. Green.", "Be brief and kind."] * 20

#: what each named template renders right after a reply (the end-of-turn token, which is trained)
END_OF_TURN = {"chatml": "<|im_end|>", "qwen2": "<|im_end|>", "llama3": "<|eot_id|>",
               "mistral": EOS_TOKEN, "gemma": "<end_of_turn>", "zephyr": EOS_TOKEN}

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]

#: SmolLM2-Instruct's template as shipped (ChatML, a default system prompt, no generation markers)
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
           "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
           "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
           "{% endif %}")

_TRL = importlib.util.find_spec("trl")
TRL_TEMPLATES = Path(_TRL.origin).parent / "chat_templates" if _TRL and _TRL.origin else Path("/nonexistent")


def _tokenizer(name: str):
    """A small byte-level BPE trained here, with ``name``'s template and its tokens."""
    extra = [t for t in TEMPLATE_TOKENS[name] if t not in ("<|im_start|>", "<|im_end|>")]
    return train_tokenizer(TEXTS, {"vocab_size": 400, "min_frequency": 2}, extra, name)


def _expected_mask(tok, conv: list[dict], eot: str) -> list[int]:
    """1 on the tokens of each reply + ``eot``, placed right after the prompt that precedes it
    (the rendering of the earlier turns with the generation prompt), 0 elsewhere."""
    full = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    mask = [0] * len(full)
    for k, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(conv[:k], tokenize=True, return_dict=True,
                                         add_generation_prompt=True)["input_ids"]
        reply = tok(m["content"] + eot, add_special_tokens=False)["input_ids"]
        assert full[: len(prompt)] == prompt  # the prompt is a prefix of the trained rendering
        assert full[len(prompt): len(prompt) + len(reply)] == reply
        mask[len(prompt): len(prompt) + len(reply)] = [1] * len(reply)
    return mask


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("with_system", [True, False])
def test_named_template_masks_exactly_the_replies_and_their_end_of_turn(name, with_system):
    tok = _tokenizer(name)
    conv = CONV if with_system else CONV[1:]
    enc = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert mask == _expected_mask(tok, conv, END_OF_TURN[name])
    eot = END_OF_TURN[name]
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == f"Hi! How can I help?{eot}Blue.{eot}"
    # nothing of the system and user turns is trained, and they are all in the rendering
    text = tok.decode(ids)
    untrained = tok.decode([t for t, m in zip(ids, mask) if not m])
    for m in conv[:-1]:
        if m["role"] != "assistant":
            assert m["content"] in text and m["content"] in untrained
    for t in TEMPLATE_TOKENS[name]:  # the template's markers are single special tokens
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1


def test_chatml_is_the_template_trained_tokenizers_always_had():
    # byte-identical: the data caches hash the template text
    assert CHATML_TEMPLATE == TEMPLATES["chatml"]
    assert "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}" in CHATML_TEMPLATE


def test_qwen2_adds_its_default_system_turn():
    tok = _tokenizer("qwen2")
    text = tok.apply_chat_template(CONV[1:3], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert "You are a helpful" not in tok.apply_chat_template(CONV[:3], tokenize=False)


def test_auto_gives_a_trained_tokenizer_chatml():
    tok = train_tokenizer(TEXTS, {"vocab_size": 400}, (), "auto")
    assert tok.chat_template == CHATML_TEMPLATE


@pytest.mark.parametrize("form", ["{% generation %}", "{%- generation %}", "{%- generation -%}"])
def test_auto_keeps_a_pretrained_template_with_either_marker_form(form):
    tok = _tokenizer("chatml")
    own = TEMPLATES["chatml"].replace("{% generation %}", form) + "{# own #}"
    tok.chat_template = own
    assert has_generation_markers(own)
    assert resolve_chat_template(tok, "auto", pretrained=True) == own


def test_auto_adds_markers_to_smollm2s_template_and_keeps_its_system_prompt(tmp_path):
    from llmlab.data.tokenizer import _load_pretrained

    tok = _tokenizer("chatml")
    tok.chat_template = SMOLLM2
    save_tokenizer(tok, tmp_path / "smol")
    loaded = _load_pretrained({"from_pretrained": str(tmp_path / "smol")}, [], "auto")
    assert loaded.chat_template != SMOLLM2 and has_generation_markers(loaded.chat_template)
    for conv in (CONV, CONV[1:]):
        for gen in (False, True):  # the same text as the tokenizer's own template
            assert (loaded.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
                    == loaded.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen,
                                                  chat_template=SMOLLM2))
    assert "named SmolLM" in loaded.apply_chat_template(CONV[1:], tokenize=False)
    enc = loaded.apply_chat_template(CONV[1:], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert enc["assistant_masks"] == _expected_mask(loaded, CONV[1:], "<|im_end|>")
    # a named template replaces the tokenizer's own, as asked
    assert _load_pretrained({"from_pretrained": str(tmp_path / "smol")}, [], "chatml").chat_template == CHATML_TEMPLATE


@pytest.mark.parametrize("template", [
    # Gemma-style: role renamed, content trimmed, end-of-turn and newline in one literal
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
    # Zephyr-style: a branch per role, eos_token after each turn, whitespace control
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}{{- '<|user|>\n' + message['content'] + eos_token -}}"
    "{%- elif message['role'] == 'system' -%}{{ '<|system|>\n' + message['content'] + eos_token }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|assistant|>\n' + message.content + eos_token }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}",
])
def test_markers_added_to_known_families_render_the_same_text(template):
    sp = {"bos_token": "<s>", "eos_token": "</s>"}
    marked = add_generation_markers(template, sp)
    assert marked is not None and has_generation_markers(marked)
    from transformers.utils.chat_template_utils import render_jinja_template

    for conv in (CONV[1:], CONV[1:3]):
        want = render_jinja_template([conv], chat_template=template, **sp)[0][0]
        got, spans = render_jinja_template([conv], chat_template=marked, return_assistant_tokens_mask=True, **sp)
        assert got[0] == want
        eot = "<end_of_turn>" if "end_of_turn" in template else "</s>"
        assert [got[0][s:e] for s, e in spans[0]] == [m["content"] + eot for m in conv if m["role"] == "assistant"]


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}",  # no end-of-turn token
    "{% for m in messages %}{{ m['content'] }}{% endfor %}",
])
def test_auto_stops_on_an_unknown_template_without_markers_naming_the_choices(template):
    tok = _tokenizer("chatml")
    tok.chat_template = template
    assert add_generation_markers(template) is None
    with pytest.raises(ValueError, match=r"chatml, qwen2, llama3, mistral, gemma, zephyr.*Jinja"):
        resolve_chat_template(tok, "auto", pretrained=True)


def test_auto_leaves_a_pretrained_tokenizer_without_template_without_one():
    tok = _tokenizer("chatml")
    tok.chat_template = None
    assert resolve_chat_template(tok, "auto", pretrained=True) is None
    assert "none" in CHOICES and "auto" in CHOICES


@pytest.mark.skipif(not (TRL_TEMPLATES / "gemma.jinja").is_file(), reason="TRL's chat templates not installed")
def test_trl_training_templates_count_as_marked_and_agree_with_our_markers():
    """TRL 1.16's training templates (both marker forms) are kept; on the originals TRL ships for
    Gemma and Qwen2.5 our added markers give TRL's training rendering, and TRL's trained spans are
    ours plus surrounding newlines (TRL also trains the newline after the end-of-turn token)."""
    training = sorted(TRL_TEMPLATES.glob("*_training.jinja"))
    assert training and all(has_generation_markers(p.read_text()) for p in training)
    from transformers.utils.chat_template_utils import render_jinja_template

    sp = {"bos_token": "<bos>", "eos_token": "</s>"}
    for fam in ("gemma", "qwen2_5"):
        marked = add_generation_markers((TRL_TEMPLATES / f"{fam}.jinja").read_text(), sp)
        assert marked is not None, fam
        trl = (TRL_TEMPLATES / f"{fam}_training.jinja").read_text()
        r_ours, s_ours = render_jinja_template([CONV[1:]], chat_template=marked, return_assistant_tokens_mask=True, **sp)
        r_trl, s_trl = render_jinja_template([CONV[1:]], chat_template=trl, return_assistant_tokens_mask=True, **sp)
        assert r_ours == r_trl, fam
        assert [r_ours[0][s:e] for s, e in s_ours[0]] == [r_trl[0][s:e].strip("\n") for s, e in s_trl[0]], fam


def test_auto_for_a_trained_tokenizer_hashes_as_the_old_default_chatml():
    """Finished runs stay fresh: the default changed from chatml to auto, which for a trained
    tokenizer is chatml; for a pretrained one auto keeps its own template, another tokenizer."""
    from llmlab.fingerprint import tokenizer_fingerprint
    from tests.data.conftest import BASE_RECIPE

    def fp(**tok):
        return tokenizer_fingerprint({**BASE_RECIPE, "tokenizer": tok})

    train = BASE_RECIPE["tokenizer"]["train"]
    assert fp(train=train, chat_template="auto") == fp(train=train, chat_template="chatml")
    assert fp(train=train, chat_template="llama3") != fp(train=train, chat_template="chatml")
    hub = {"from_pretrained": "org/model", "revision": "main"}
    assert fp(**hub, chat_template="auto") != fp(**hub, chat_template="chatml")


@pytest.mark.parametrize("name", CHOICES)
def test_every_template_name_validates(tmp_path, name):
    from llmlab.recipe import load_recipe

    text = (Path(__file__).resolve().parents[1] / "recipes" / "bad" / "chat_template_typo.yaml").read_text()
    path = tmp_path / "r.yaml"
    path.write_text(text.split("\n", 1)[1].replace("chat_template: chatmll", f"chat_template: {name}")
                    .replace("type: sft", "type: pretrain" if name == "none" else "type: sft")
                    .replace("datasets: {chat: 1.0}", "datasets: {bible: 1.0}" if name == "none" else "datasets: {chat: 1.0}"))
    resolved, errors = load_recipe(path, env={})
    assert not errors, [str(e) for e in errors]
    assert resolved["tokenizer"]["chat_template"] == name


def test_a_chat_stage_without_a_template_names_the_choices():
    from llmlab.data.pipeline import _chat

    tok = _tokenizer("chatml")
    tok.chat_template = None
    with pytest.raises(ValueError, match=r"sft, dpo.*chatml, qwen2, llama3, mistral, gemma, zephyr"):
        _chat(tok, [CONV])


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_models_stop_at_their_templates_end_of_turn_and_count_as_chat(name):
    from llmlab.chat_templates import end_of_turn_ids
    from llmlab.inference.generation import stop_token_ids
    from llmlab.inference.loading import has_chat_template

    tok = _tokenizer(name)
    eot = tok.convert_tokens_to_ids(END_OF_TURN[name])
    assert eot in stop_token_ids(tok, is_chat=True) and tok.eos_token_id in stop_token_ids(tok, is_chat=True)
    assert end_of_turn_ids(tok) == ([] if END_OF_TURN[name] == EOS_TOKEN else [eot])
    assert has_chat_template(tok)
    tok.chat_template = SMOLLM2.replace("<|im_start|>", "<s>").replace("<|im_end|>", "</s>")
    assert not has_chat_template(tok)  # neither ChatML nor marked


#: Meta's Llama 3 template: each turn built with {% set %}, bos in front of the first
LLAMA3_META = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def test_auto_gives_a_template_that_renders_like_a_named_one_that_one():
    """Meta's Llama 3 template cannot be marked in place; it renders exactly as ``llama3``, which
    is then used (the same text, marked). A template differing in one character is not."""
    tok = _tokenizer("llama3")
    tok.chat_template = LLAMA3_META
    assert add_generation_markers(LLAMA3_META, {"bos_token": tok.bos_token}) is None
    assert resolve_chat_template(tok, "auto", pretrained=True) == TEMPLATES["llama3"]
    for conv in (CONV, CONV[1:]):
        assert (tok.apply_chat_template(conv, tokenize=False, chat_template=TEMPLATES["llama3"])
                == tok.apply_chat_template(conv, tokenize=False))
    tok.chat_template = LLAMA3_META.replace("| trim ", "")  # no longer trims: not llama3
    with pytest.raises(ValueError, match="no known family"):
        resolve_chat_template(tok, "auto", pretrained=True)
    if (TRL_TEMPLATES / "llama3.jinja").is_file():  # TRL 1.16's copy of the original
        tok.chat_template = (TRL_TEMPLATES / "llama3.jinja").read_text()
        assert resolve_chat_template(tok, "auto", pretrained=True) == TEMPLATES["llama3"]
