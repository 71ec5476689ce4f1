"""Every path of a run directory, and the stage record (``stage.json``). Pure Python (no torch).

::

    <output_dir>/
      recipe.resolved.yaml
      tokenizer/  tokenizer.fingerprint
      tensorboard/<stage>/
      error.log
      cache/tokens/<key>/  (token stores, unless the recipe's token_store puts them elsewhere)
      <stage>/stage.json  metrics.jsonl  checkpoints/step-NNNNNN/  final/  adapter/
              results.json (evaluate)  value_head.safetensors (ppo)

:class:`RunLayout` and :class:`StageLayout` are the only places these names are spelled;
:func:`write_json_atomic` is the one way a run writes a JSON file it may be killed in the middle of.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINT_PREFIX = "step-"
#: the first line of ``recipe.resolved.yaml`` (package versions follow); only llmlab writes it
RESOLVED_HEADER = "# resolved by llmlab; package versions:"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON to ``path`` so a kill leaves the old file or the new one
    whole: a temporary sibling is written and fsynced, then renamed over ``path`` (values JSON cannot
    hold are written with ``str``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class StageLayout:
    """The paths of one stage's directory ``<output_dir>/<stage>``."""

    dir: Path

    @property
    def record(self) -> Path:
        """``stage.json``: the :class:`StageRecord`."""
        return self.dir / "stage.json"

    @property
    def metrics(self) -> Path:
        """``metrics.jsonl``: one JSON object per logged step or evaluation."""
        return self.dir / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        """``checkpoints/``: ``step-NNNNNN/`` directories (see :mod:`llmlab.train.checkpoint`)."""
        return self.dir / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        """``checkpoints/step-NNNNNN`` (six digits)."""
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step:06d}"

    @property
    def final(self) -> Path:
        """``final/``: the trained model in Hugging Face format."""
        return self.dir / "final"

    @property
    def adapter(self) -> Path:
        """``adapter/``: the PEFT adapter of a LoRA stage that did not merge."""
        return self.dir / "adapter"

    @property
    def results(self) -> Path:
        """``results.json``: an evaluate stage's ``{model: {dataset: metrics}}``."""
        return self.dir / "results.json"

    @property
    def value_head(self) -> Path:
        """``value_head.safetensors``: a PPO stage's value head, kept out of ``final/``."""
        return self.dir / "value_head.safetensors"

    def tmp(self, name: str) -> Path:
        """``.<name>.tmp``: where ``name`` (``final``, ``adapter``) is written before its rename."""
        return self.dir / f".{name}.tmp"

    def latest_checkpoint_step(self) -> int | None:
        """Step of the newest checkpoint directory (not verified; plan's quick look)."""
        root = self.checkpoints
        if not root.is_dir():
            return None
        n = len(CHECKPOINT_PREFIX)
        steps = [int(d.name[n:]) for d in root.iterdir()
                 if d.is_dir() and d.name.startswith(CHECKPOINT_PREFIX) and d.name[n:].isdigit()]
        return max(steps) if steps else None

    def read_record(self) -> dict | None:
        """``stage.json`` as a dict, or None when it is missing or unreadable."""
        try:
            return json.loads(self.record.read_text())
        except (OSError, json.JSONDecodeError):
            return None


@dataclass(frozen=True)
class RunLayout:
    """The paths of a run directory (``output_dir``)."""

    root: Path

    @classmethod
    def of(cls, recipe: dict) -> RunLayout:
        """The layout of a resolved recipe's ``output_dir``."""
        return cls(Path(recipe["output_dir"]))

    def stage(self, name: str) -> StageLayout:
        """The layout of stage ``name``'s directory."""
        return StageLayout(self.root / name)

    def portable(self, path: str | Path | None) -> str | None:
        """``path`` as stage.json records it: relative to the run directory when inside it (so the
        run directory can be moved), else absolute; None stays None."""
        if path is None:
            return None
        path = Path(path)
        try:
            return path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(path)

    def locate(self, recorded: str | None) -> Path | None:
        """The path a stage.json entry names: a relative one is inside this run directory (also
        after the directory moved); an absolute one (outside it, or written by an older llmlab) as
        it is."""
        if recorded is None:
            return None
        p = Path(recorded)
        return p if p.is_absolute() else self.root / p

    @property
    def resolved_recipe(self) -> Path:
        """``recipe.resolved.yaml``: the recipe as run (defaults filled), its ``resolved_with`` the versions that ran it."""
        return self.root / "recipe.resolved.yaml"

    @property
    def tokenizer(self) -> Path:
        """``tokenizer/``: the run's frozen tokenizer."""
        return self.root / "tokenizer"

    @property
    def tokenizer_fingerprint(self) -> Path:
        """``tokenizer.fingerprint``: the tokenizer section's fingerprint (beside the directory,
        whose own files are hashed)."""
        return self.root / "tokenizer.fingerprint"

    @property
    def tokenizer_tmp(self) -> Path:
        """``.tokenizer.tmp``: where the tokenizer is built before its rename."""
        return self.root / ".tokenizer.tmp"

    def tensorboard(self, stage: str) -> Path:
        """``tensorboard/<stage>``: TensorBoard event files (``logging.report_to: [tensorboard]``)."""
        return self.root / "tensorboard" / stage

    @property
    def token_store(self) -> Path:
        """``cache/tokens/``: the default root of the token stores (:mod:`llmlab.data.store`)."""
        return self.root / "cache" / "tokens"

    @property
    def error_log(self) -> Path:
        """``error.log``: the traceback of a failed run."""
        return self.root / "error.log"


@dataclass
class StageRecord:
    """``stage.json``: what a stage did, written when it starts (``status: running``) and when it ends.

    Fields left None are written as null only when they were set explicitly for this stage type
    (a training stage records ``init_path: null``; an evaluate stage has no ``max_steps`` key):
    :meth:`start` makes present the fields it is given, :meth:`finish` those it sets, and
    :meth:`to_json` drops the rest (named in ``absent``).
    """

    name: str
    type: str
    status: str
    #: the stage's fingerprint (llmlab.fingerprint) and the parts it hashes (to explain a change)
    fingerprint: str
    parts: dict
    #: ISO 8601 UTC times
    started_at: str
    tokenizer_sha256: str | None = None
    #: llmlab's version and the package versions that ran the stage (llmlab.session.package_versions);
    #: a record, never compared: the fingerprint alone decides whether the stage is stale
    versions: dict | None = None
    #: training stages: steps asked for, where weights came from, device, precision
    max_steps: int | None = None
    init_path: str | None = None
    init_adapter: str | None = None
    device: str | None = None
    precision: str | None = None
    #: the CPU threads torch used (the recipe's ``threads``, ``$LLMLAB_THREADS`` or torch's default)
    threads: int | None = None
    #: {"world_size", "strategy", "backend"}: what ran (llmlab.session.DistributedInfo)
    distributed: dict | None = None
    #: the max_steps of each earlier run this stage was extended from (absent for a fresh stage)
    extended_from: list | None = None
    #: evaluate stages: the stages compared
    models: list | None = None
    finished_at: str | None = None
    steps: int | None = None
    #: seconds of training, summed over resumed runs
    wall_time_s: float | None = None
    tokens: int | None = None
    resumed_from: int | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    first_eval: dict | None = None
    last_eval: dict | None = None
    final_metrics: dict | None = None
    #: training stages that early stopping ended: {"stopped_at", "best_step", "best_eval_loss",
    #: "patience", "min_delta"} (absent when the stage ran to max_steps)
    early_stopping: dict | None = None
    #: model FLOPs of the stage's last run: {"flops_per_token", "tflops", "mfu", "peak_tflops"}
    #: (llmlab.train.flops; tokens over that run's wall time)
    flops: dict | None = None
    #: what the stage wrote: {"final": path, "adapter": path, "results": path, ...}
    outputs: dict | None = None
    absent: frozenset = frozenset()

    def to_json(self) -> dict:
        """The JSON object (field order; ``absent`` fields and ``absent`` itself left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "absent" and f.name not in self.absent}

    def write(self, path: Path) -> None:
        """Write atomically (:func:`write_json_atomic`)."""
        write_json_atomic(path, self.to_json())

    @classmethod
    def start(cls, name: str, type: str, fingerprint: str, parts: dict, started_at: str, **fields) -> StageRecord:
        """The record of a stage that starts now (``status: running``): ``fields`` (``max_steps``,
        ``init_path``, ``models``, ...) are present in stage.json, even when None; every other
        optional field stays absent until :meth:`finish` sets it.

        Raises:
            TypeError: a name in ``fields`` is not a field of the record.
        """
        optional = {f.name for f in dataclasses.fields(cls)} - {"name", "type", "status", "fingerprint", "parts",
                                                                 "started_at", "absent"}
        unknown = set(fields) - optional
        if unknown:
            raise TypeError(f"StageRecord has no field(s) {', '.join(sorted(unknown))}")
        return cls(name=name, type=type, status="running", fingerprint=fingerprint, parts=parts,
                   started_at=started_at, absent=frozenset(optional - set(fields)), **fields)

    def finish(self, status: str = "done", **fields) -> None:
        """Set ``fields`` (which become present) and ``status`` (done; ``stopped``: a stage that
        ``max_time`` stopped short of max_steps, read as partial)."""
        for k, v in fields.items():
            setattr(self, k, v)
        self.absent = self.absent - set(fields)
        self.status = status
