"""Where a recipe asks to run code: the places ``llmlab run`` refuses without ``--allow-code``.

A shared recipe is untrusted. Two keys make llmlab run code that the recipe names:
``trust_remote_code: true`` (a checkpoint's own modelling code) and a reward source's
``function: module:function``. They are found here, torch-free, so that ``validate`` and ``plan``
can warn about them and ``run`` refuses them before any stage starts (not when the stage that
needs them is reached, after earlier stages trained).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

ALLOW_FLAG = "--allow-code"


def code_uses(resolved: dict) -> list[tuple[tuple, str]]:
    """``(key path, what runs)`` for every place in ``resolved`` that would run code, in file order.

    Example: ``(("stages", "grpo", "reward", "function"), "the Python reward function 'mymod:score'")``.
    """
    return list(_walk(resolved, ()))


def _walk(node: Any, path: tuple) -> Iterator[tuple[tuple, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            sub = path + (key,)
            if key == "trust_remote_code" and value is True:
                yield sub, "trust_remote_code (the checkpoint's own modelling code)"
            elif key == "function" and isinstance(value, str) and path[:1] == ("stages",):
                yield sub, f"the Python reward function {value!r}"
            else:
                yield from _walk(value, sub)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk(item, path + (i,))
