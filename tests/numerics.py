"""Which floating-point paths torch takes on this machine, for messages of tests that train.

What a tiny model learns in a given number of steps depends on the CPU's floating-point paths (the
SIMD kernels torch picks, oneDNN on or off, summation order). Tests that need a trained model train it
to a measured margin, or assert a threshold with room measured under several numerics; when such a
test fails, its message says so through :func:`learning_note`. To try other numerics on one machine,
see tests/conftest.py (ATEN_CPU_CAPABILITY, LLMLAB_TEST_MKLDNN).
"""

from __future__ import annotations

import torch

# where the margins and step budgets of the training tests were measured
MEASURED_ON = ("one AMD EPYC Zen 4 under torch's AVX-512 and AVX2 kernels and with oneDNN off "
               "(the inference margins also under no-SIMD kernels)")


def numerics() -> str:
    """e.g. ``'torch CPU capability AVX512, oneDNN on'``."""
    return (f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"oneDNN {'on' if torch.backends.mkldnn.enabled else 'off'}")


def learning_note(what: str) -> str:
    """The message for a failed assertion on what a tiny model learnt: ``what`` plus the CPU dependence."""
    return (f"{what} [{numerics()}]. How far a tiny model gets in a few steps depends on the CPU's "
            f"floating-point paths; the budget and margin were measured on {MEASURED_ON}. If the same "
            "commit passes on another CPU, give the training more steps (or a measured stopping margin) "
            "rather than loosening the assertion.")
