"""The ranges of the sampling settings, one copy for the CLI (``chat``, ``generate``, ``serve``'s
defaults) and the HTTP API (:func:`llmlab.inference.server.request_settings`). Imports nothing, so
the CLI checks its arguments before torch loads."""

from __future__ import annotations

#: a temperature below this decodes greedily, as vLLM does: HF divides the logits by the
#: temperature, and 1e-300 overflows them to inf (sampling then fails)
GREEDY_BELOW = 1e-5
#: the closed range a temperature may take (0: greedy)
TEMPERATURE_RANGE = (0.0, 100.0)
#: the closed range of HF's repetition penalty (it divides positive logits by it: 1e-300 gave inf)
REPETITION_PENALTY_RANGE = (0.01, 100.0)
