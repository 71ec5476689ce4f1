"""Preparing a run's tokenizer and token stores under several processes without any of them
waiting inside a collective.

A collective (a barrier, ``main_process_first``) times out after the process group's timeout
(30 min for gloo and 10 min for NCCL by default, often less on clusters), and tokenising a large
corpus takes longer. So the tokenizer and the pretraining token stores are prepared *before* the
process group exists (before accelerate's ``Accelerator`` initialises it), and the ranks wait on
files instead:

- rank 0 trains the tokenizer when it is absent or stale; the other ranks poll until
  ``tokenizer.fingerprint`` matches the recipe (written after the tokenizer folder is renamed into
  place), then load it;
- every rank then asks for every token store it needs: each store is built under its own
  ``flock`` (:func:`llmlab.data.store.build_store`), so the first rank to reach it writes it and
  the others wait on the lock — no timeout — and then open the complete store.

If rank 0 dies meanwhile, the launcher (torchrun's agent, on every node through its
rendezvous) stops the other ranks.
"""

from __future__ import annotations

import time
from typing import Callable

from llmlab.console import process_rank

#: seconds between two looks at the tokenizer's fingerprint file by a rank waiting for rank 0
POLL_S = 0.5


def prepare_before_process_group(ensure_tokenizer: Callable[[], tuple], tokenizer_current: Callable[[], bool],
                                 prepare_stores: Callable[[object], None]) -> tuple:
    """Prepare the tokenizer and token stores on this rank before torch.distributed starts.

    Args:
        ensure_tokenizer: loads the run's tokenizer, training it first when absent or stale;
            returns ``(tokenizer, its sha)`` (:func:`llmlab.session.setup_tokenizer`).
        tokenizer_current: whether the tokenizer on disk is this recipe's (:func:`llmlab.session.tokenizer_current`).
        prepare_stores: fills the missing token stores with the tokenizer (each under its lock).

    Returns:
        ``ensure_tokenizer()``'s result.
    """
    if process_rank() != 0:  # rank 0 trains it: wait for its fingerprint file, not in a collective
        while not tokenizer_current():
            time.sleep(POLL_S)
    tokenizer, sha = ensure_tokenizer()
    prepare_stores(tokenizer)
    return tokenizer, sha
