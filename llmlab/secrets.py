"""Keep secrets out of what llmlab writes and prints.

A recipe may say ``token: ${HF_TOKEN}``; the value is substituted so the run can use it, but
``recipe.resolved.yaml`` (a file meant for sharing), ``plan --resolved``, stage.json and error
messages show ``${HF_TOKEN}`` instead of the value. A variable counts as secret when its name
contains TOKEN, KEY, SECRET, PASSWORD, PASSWD, CREDENTIAL or AUTH (any case), as in the
conventions of Hugging Face (HF_TOKEN), Weights & Biases (WANDB_API_KEY), AWS and OpenAI.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.I)
#: values shorter than this are not masked (``KEY=1`` would otherwise mask every "1")
MIN_SECRET_LEN = 8


def secret_values(env: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """``(value, name)`` of every secret-looking variable in ``env`` (default ``os.environ``),
    longest value first (so a value containing another is masked whole)."""
    env = os.environ if env is None else env
    found = [(v, k) for k, v in env.items() if SECRET_NAME.search(k) and len(v or "") >= MIN_SECRET_LEN]
    return sorted(found, key=lambda vk: (-len(vk[0]), vk[1]))


def mask_secrets(obj: Any, env: Mapping[str, str] | None = None, _values=None) -> Any:
    """A copy of ``obj`` (dicts, lists, strings, scalars) in which every occurrence of a secret
    variable's value inside a string is replaced by ``${NAME}``. Non-string leaves are unchanged."""
    values = secret_values(env) if _values is None else _values
    if not values:
        return obj
    if isinstance(obj, str):
        for value, name in values:
            if value in obj:
                obj = obj.replace(value, "${" + name + "}")
        return obj
    if isinstance(obj, dict):
        return {k: mask_secrets(v, env, values) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(mask_secrets(v, env, values) for v in obj)
    return obj


#: ``key=value`` as ``--set`` takes it (also ``--set=key=value``)
_ASSIGNMENT = re.compile(r"^(--set=)?([\w.\-\[\]]+)=(.*)$", re.S)


def mask_command(argv: list[str], env: Mapping[str, str] | None = None) -> str:
    """The command line ``argv`` as one string, safe to write down (a lock file): every secret
    variable's value masked (:func:`mask_secrets`), and the value of every ``key=value`` whose
    last key part looks secret (``logging.wandb_api_key=...``) replaced by ``***`` unless it is a
    number (``max_tokens=1000`` is kept)."""
    out = []
    for arg in mask_secrets(list(argv), env):
        m = _ASSIGNMENT.match(arg)
        if m and SECRET_NAME.search(m.group(2).split(".")[-1]) and "${" not in m.group(3):
            try:
                float(m.group(3))
            except ValueError:
                arg = f"{m.group(1) or ''}{m.group(2)}=***"
        out.append(arg)
    return " ".join(out)
