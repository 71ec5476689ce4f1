"""A hub dataset that cannot be had fails at once, in one line naming the dataset, the hub and
HF_HUB_OFFLINE (issue 24, item 6). No test reaches the network: HF_HUB_OFFLINE=1 (tests/conftest.py)
or a refused connection. Each test failed on the code of 2026-12-06 (a 21-frame ConnectionError
traceback after ~25 s of retries)."""

from __future__ import annotations

import socket

import pytest
from huggingface_hub import constants

from llmlab.data.sources import HubUnreachableError, load_named_dataset
from tests.tiny import write_recipe

HUB_ID = "llmlab-tests/no-such-dataset"
RECIPE = {"name": "offline", "tokenizer": {"train": {"datasets": ["web"], "vocab_size": 256}},
          "model": {"arch": "transformer", "d_model": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 16},
          "datasets": {"web": {"hub": HUB_ID, "format": "text"}},
          "stages": {"pretrain": {"type": "pretrain", "datasets": {"web": 1.0}, "max_steps": 1}}}


def _recipe(tmp_path) -> dict:
    return {**RECIPE, "output_dir": str(tmp_path / "run"), "seed": 0}


def _no_load(*a, **k):  # the hub was judged unreachable: datasets must not retry for ~25 s
    raise AssertionError("datasets.load_dataset was called")


def test_offline_names_dataset_hub_and_variable(tmp_path):
    assert constants.HF_HUB_OFFLINE  # set by tests/conftest.py before huggingface_hub was imported
    with pytest.raises(HubUnreachableError) as exc:
        load_named_dataset(_recipe(tmp_path), "web")
    msg = str(exc.value)
    assert "\n" not in msg
    for part in ("datasets.web", HUB_ID, constants.ENDPOINT, "HF_HUB_OFFLINE"):
        assert part in msg, (part, msg)


def test_unreachable_hub_fails_without_retrying(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    tried = []

    def refuse(address, timeout=None, *a, **k):
        tried.append(address)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(datasets, "load_dataset", _no_load)
    with pytest.raises(HubUnreachableError) as exc:
        load_named_dataset(_recipe(tmp_path), "web")
    msg = str(exc.value)
    assert len(tried) == 1 and "\n" not in msg
    for part in ("datasets.web", HUB_ID, constants.ENDPOINT, "HF_HUB_OFFLINE=1", "Name or service not known"):
        assert part in msg, (part, msg)


def test_connection_error_while_loading_is_one_line(tmp_path, monkeypatch):
    import datasets

    class Conn:
        def close(self):
            pass

    def lost(*a, **k):
        raise ConnectionError(f"Couldn't reach '{HUB_ID}' on the Hub (ConnectTimeout)")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Conn())
    monkeypatch.setattr(datasets, "load_dataset", lost)
    with pytest.raises(HubUnreachableError) as exc:
        load_named_dataset(_recipe(tmp_path), "web")
    assert "datasets.web" in str(exc.value) and "HF_HUB_OFFLINE" in str(exc.value)


def test_streaming_hub_dataset_too(tmp_path):
    from llmlab.data.store import stream_texts

    rec = _recipe(tmp_path)
    rec["datasets"] = {"web": {**RECIPE["datasets"]["web"], "streaming": True, "max_samples": 10}}
    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE"):
        next(stream_texts(rec, "web", {}))


@pytest.mark.parametrize("command", ["prepare", "run"])
def test_commands_print_one_line_and_exit_1(tmp_path, capsys, command):
    from llmlab.commands.data import prepare_command
    from llmlab.commands.run import run_command

    path = write_recipe(tmp_path, RECIPE)
    code = (prepare_command if command == "prepare" else run_command)(path)
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 1
    assert "Traceback" not in text and "ConnectionError" not in text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and HUB_ID in " ".join(text.split()) and "HF_HUB_OFFLINE" in text
