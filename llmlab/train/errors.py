"""The error the training loop raises for problems the user can act on."""


class TrainingError(RuntimeError):
    """A stage failed in a way the user can act on (NaN loss, out of memory, bad input)."""


def out_of_memory(stage: str, step: int) -> TrainingError:
    """The error for running out of memory at ``step`` (1-based), naming the knobs to turn."""
    return TrainingError(
        f"stage {stage}: out of memory at step {step}. Lower batch_size (raise gradient_accumulation_steps "
        f"to keep the global batch), lower seq_len, or set model.gradient_checkpointing: true")


def is_cpu_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the CPU allocator running out of memory (torch raises a plain
    RuntimeError there, "DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes")."""
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)
