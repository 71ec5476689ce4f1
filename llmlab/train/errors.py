"""The error the training loop raises for problems the user can act on."""


class TrainingError(RuntimeError):
    """A stage failed in a way the user can act on (NaN loss, out of memory, bad input)."""
