"""A stage's ``max_time``: the wall-clock budget of one run of the training loop."""

from __future__ import annotations

import time


class TimeLimit:
    """Whether ``seconds`` have passed since the limit was made (None: never).

    Under several processes every rank must stop at the same step, so the answer is the
    processes' maximum (one small all-reduce per check; none on one process or without a limit).
    """

    def __init__(self, seconds: float | None, accelerator):
        self.seconds, self.accelerator = seconds, accelerator
        self.t0 = time.monotonic()

    def reached(self) -> bool:
        """True once the budget is spent (on any process)."""
        if self.seconds is None:
            return False
        up = time.monotonic() - self.t0 >= self.seconds
        if self.accelerator.num_processes > 1:
            import torch

            flag = torch.tensor(float(up), device=self.accelerator.device)
            up = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        return up
