"""A run session: what every stage of one ``llmlab run`` shares, set up once before the first stage
trains (torchtune's recipe pattern: one small ``setup_*`` function per concern).

::

    open_session(plan, console, todo)
        setup_threads       torch.set_num_threads (recipe ``threads``, $LLMLAB_THREADS)
        setup_device        cpu | cuda (recipe ``device``)
        resolve_precision   auto → bf16 | fp32 on this device (recipe ``precision``)
        setup_accelerator   accelerate's Accelerator with that mixed precision
        distributed_info    processes, strategy, backend (stage.json)
        refuse_unfittable   a stage planned to need far more memory than the device has
        setup_tokenizer     the run's tokenizer/, trained or loaded (rank 0 first under torchrun)
        setup_token_stores  the pretraining stages' token stores, filled when missing

Every fact comes from the :class:`llmlab.runplan.RunPlan`; the resolved dict (``plan.recipe``) is
only handed on to the data layer, which still takes it (the tokenizer build, the token stores).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from dataclasses import dataclass

from llmlab.console import process_rank, single_process_launch_warning
from llmlab.ownership import remove_owned
from llmlab.runplan import RunPlan


class RunError(RuntimeError):
    """A run cannot proceed (a missing input stage, a bad selection); the message says why."""


@functools.cache
def package_versions() -> dict[str, str]:
    """Versions of llmlab (the code running: ``llmlab.__version__``) and of the packages that
    determine a run's result, as recorded in recipe.resolved.yaml (``resolved_with``) and each
    stage.json (``versions``). Neither is part of a fingerprint: a new torch does not make a
    finished stage stale."""
    from importlib.metadata import PackageNotFoundError, version

    from llmlab import __version__

    out = {"llmlab": __version__, "python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "datasets", "tokenizers", "peft", "accelerate", "pytorch-optimizer"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX), where bf16
    autocast is several times faster than fp32 (measured in benchmarks/pretrain_throughput.py)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


#: the narrowest model (d_model) for which ``precision: auto`` picks bf16 autocast on a CPU with
#: native bf16. Measured by benchmarks/precision_crossover.py (2-core AMD EPYC with avx512_bf16,
#: one thread, CPU time per train step with fine-tuning's varied batch widths, fp32 / bf16):
#: Llama-style 64: 0.94, 96: 1.03, 128: 1.13, 192: 1.21-1.23, 256: 1.95; Mamba2 96: 1.22, 192: 1.35.
#: Narrower models spend their step in small matmuls and per-op overhead, where the casts bf16
#: autocast adds are not paid back; where the two tie, fp32 wins (its numbers are exact to more bits).
CPU_BF16_MIN_D_MODEL = 128


def resolve_precision(precision: str, device, model=None) -> str:
    """The precision a run trains in: ``precision`` as given, or for ``auto`` bf16 on a GPU that
    supports it, bf16 on a CPU with native bf16 matrix instructions when the model is at least
    :data:`CPU_BF16_MIN_D_MODEL` wide (``model``: the run's ModelSpec; a pretrained checkpoint or
    None counts as wide), else fp32."""
    import torch

    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    width = getattr(model, "d_model", None)
    if width is not None and int(width) < CPU_BF16_MIN_D_MODEL:
        return "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def run_threads(given: int | None, env: dict | None = None) -> int | None:
    """The CPU threads a run asks for: ``given`` (the recipe's ``threads``), else
    ``$LLMLAB_THREADS``, else None (torch's default).

    Raises:
        RunError: ``LLMLAB_THREADS`` is not a whole number >= 1.
    """
    if given is not None:
        return int(given)
    raw = (os.environ if env is None else env).get("LLMLAB_THREADS", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise RunError(f"LLMLAB_THREADS={raw!r}: give a whole number of threads >= 1")
    return int(raw)


def setup_threads(given: int | None) -> int:
    """``torch.set_num_threads`` to :func:`run_threads` when set; returns the threads torch uses."""
    import torch

    n = run_threads(given)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()


def setup_device(want: str):
    """The torch device of ``device: auto | cpu | cuda`` (auto: cuda when available).

    Raises:
        RunError: ``cuda`` asked for and none is available.
    """
    import torch

    if want == "cuda" and not torch.cuda.is_available():
        raise RunError("device: cuda, but no CUDA device is available")
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def setup_accelerator(device, precision: str):
    """accelerate's ``Accelerator`` on ``device`` with ``precision`` (fp32 | bf16 | fp16, resolved)
    as its mixed precision. accelerate keeps one global state per process; a second run in the same
    process (tests, a notebook) with another precision resets it, never under torchrun, where the
    state holds the process group."""
    from accelerate import Accelerator

    mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    try:
        return Accelerator(cpu=device.type == "cpu", mixed_precision=mp)
    except ValueError:
        from accelerate.state import AcceleratorState, PartialState

        if PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(cpu=device.type == "cpu", mixed_precision=mp)


@dataclass(frozen=True)
class DistributedInfo:
    """What ran, for stage.json (``distributed``) and the start line."""

    world_size: int
    """Processes training together."""
    strategy: str
    """``FSDP`` when ``distributed.strategy: fsdp`` shards the model over several processes, ``HSDP``
    with ``distributed.replicate`` > 1, else accelerate's distributed type (NO, MULTI_CPU, MULTI_GPU, ...)."""
    backend: str | None
    """The torch.distributed backend (gloo, nccl; None for one process)."""
    shards: int = dataclasses.field(default=1, compare=False)
    """Over how many processes each parameter is sharded (1 unless FSDP / HSDP:
    :func:`llmlab.train.fsdp.shard_ways`)."""

    def to_json(self) -> dict:
        """``{"world_size", "strategy", "backend"}``."""
        return {"world_size": self.world_size, "strategy": self.strategy, "backend": self.backend}


def distributed_info(accelerator, distributed) -> DistributedInfo:
    """:class:`DistributedInfo` of ``accelerator`` under the recipe's ``distributed`` section
    (a :class:`llmlab.config.DistributedConfig`)."""
    import torch.distributed as dist

    from llmlab.train.fsdp import shard_ways, strategy_name

    world = int(accelerator.num_processes)
    strategy = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    strategy = strategy_name(distributed, world) or strategy
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
    return DistributedInfo(world, str(strategy), backend, shards=shard_ways(distributed, world))


def processes_here(world_size: int) -> int:
    """Processes of the run on this machine (``$LOCAL_WORLD_SIZE``, else all of them)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def refuse_unfittable(plan: RunPlan, todo: list[str], device) -> None:
    """Refuse the run before anything is built, prepared or trained when a stage to run is planned
    to need far more memory than the device has in all (:func:`llmlab.plan.unfittable_message`),
    with the model sharded as ``distributed`` shards it over ``$WORLD_SIZE`` processes (the process
    group does not exist yet).

    Raises:
        RunError: naming the stage and its estimate.
    """
    from llmlab.plan import default_world_size, unfittable_message
    from llmlab.train.fsdp import shard_ways

    world = default_world_size()
    message = unfittable_message(plan, todo, device.type, shards=shard_ways(plan.settings.distributed, world),
                                 processes_here=processes_here(world))
    if message:
        raise RunError(message)


def setup_tokenizer(plan: RunPlan, console):
    """(the run's tokenizer, the sha256 of its files): loaded from ``tokenizer/``, or built first
    when it is absent or its section changed (the fingerprint file beside it differs).

    Raises:
        NotOwnedError: ``tokenizer/`` is a folder llmlab did not write.
    """
    from llmlab.data.tokenizer import build_tokenizer, load_tokenizer, tokenizer_hash
    from llmlab.ownership import check_replaceable, mark_written, replace_owned

    layout = plan.layout
    d, fp = layout.tokenizer, plan.tokenizer_fingerprint
    if tokenizer_current(plan):
        return load_tokenizer(d), tokenizer_hash(d)
    t0 = time.perf_counter()
    tmp = layout.tokenizer_tmp
    check_replaceable(d)  # before the build: refuse a folder of the user's at once
    check_replaceable(tmp)
    remove_owned(tmp)
    build_tokenizer(plan.recipe, tmp)
    mark_written(tmp, "tokenizer")
    replace_owned(tmp, d)
    layout.tokenizer_fingerprint.write_text(fp)  # after the rename: the folder is complete
    tok = load_tokenizer(d)
    console.print(f"tokenizer: {len(tok)} tokens, built in {time.perf_counter() - t0:.1f} s → {d}")
    return tok, tokenizer_hash(d)


def tokenizer_current(plan: RunPlan) -> bool:
    """Whether ``tokenizer/`` holds the tokenizer of the plan's tokenizer section (the fingerprint
    file beside it, written after the folder is renamed into place, matches; the dir's own files are
    hashed)."""
    layout = plan.layout
    marker = layout.tokenizer_fingerprint
    return layout.tokenizer.is_dir() and marker.is_file() and marker.read_text().strip() == plan.tokenizer_fingerprint


def setup_token_stores(plan: RunPlan, tokenizer, todo: list[str], progress: bool) -> None:
    """Fill the missing token stores of the pretraining stages in ``todo`` before any stage trains
    (:func:`llmlab.data.prepare.prepare_stages`)."""
    from llmlab.data.prepare import prepare_stages

    prepare_stages(plan.recipe, tokenizer, todo, pretrain_only=True, progress=progress)


@dataclass
class RunSession:
    """What every stage of one run shares (:func:`open_session`)."""

    device: object
    """The torch device stages train on."""
    accelerator: object
    """accelerate's Accelerator (processes, mixed precision)."""
    precision: str
    """fp32 | bf16 | fp16 (``auto`` resolved on this device; recorded in stage.json)."""
    threads: int
    """CPU threads torch uses."""
    distributed: DistributedInfo
    """Processes, strategy and backend."""
    tokenizer: object
    """The run's frozen tokenizer."""
    tok_sha: str
    """sha256 of the tokenizer's files (stage.json)."""
    reset_optimizer: bool
    """On resume, load the weights only."""

    @property
    def is_main(self) -> bool:
        """This is the process that writes stage.json, final/ and the console."""
        return bool(self.accelerator.is_main_process)


def open_session(plan: RunPlan, console, todo: list[str], reset_optimizer: bool = False) -> RunSession:
    """Set up the run's threads, device, precision, accelerator, tokenizer and token stores, and
    print the start line (threads, processes, device, precision).

    Raises:
        RunError: no CUDA device for ``device: cuda``, a bad ``$LLMLAB_THREADS``, or a stage in
            ``todo`` that cannot fit the device's memory.
    """
    settings = plan.settings
    threads = setup_threads(settings.threads)
    device = setup_device(settings.device)
    precision = resolve_precision(settings.precision, device, plan.model)
    refuse_unfittable(plan, todo, device)  # before anything is built or prepared
    # the tokenizer and token stores before the process group exists: no rank waits in a collective
    from llmlab.train.ranks import prepare_before_process_group

    tokenizer, tok_sha = prepare_before_process_group(
        lambda: setup_tokenizer(plan, console), lambda: tokenizer_current(plan),
        lambda tok: setup_token_stores(plan, tok, todo, progress=process_rank() == 0))
    accelerator = setup_accelerator(device, precision)
    dist_info = distributed_info(accelerator, settings.distributed)
    console.print(f"CPU threads: {threads}; "
                  f"processes: {dist_info.world_size} ({dist_info.strategy}"
                  f"{', ' + dist_info.backend if dist_info.backend else ''}), "
                  f"device {device.type}, precision {precision}")
    launch_warning = single_process_launch_warning()
    if launch_warning and dist_info.world_size == 1:
        console.print(f"warning: {launch_warning}", style="yellow", markup=False, highlight=False)
    return RunSession(device=device, accelerator=accelerator, precision=precision, threads=threads,
                      distributed=dist_info, tokenizer=tokenizer, tok_sha=tok_sha, reset_optimizer=reset_optimizer)
