"""A training run's output folder: what is in it, and whether a run may start there.

Kept apart from ``rsafe.training.grpo`` (which imports TRL, transformers and PEFT: ~12 s on 2 cores)
so that ``rsafe train grpo`` refuses a wrong ``--output`` before paying for those imports.
"""

from __future__ import annotations

import re
from pathlib import Path

SUMMARY = "training_summary.json"
"""Written last by a finished run."""

_CHECKPOINT = re.compile(r"^checkpoint-\d+$")


class TrainingError(RuntimeError):
    """The run cannot start or finish; the message says what to change."""


def has_checkpoint(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds a ``checkpoint-N`` folder (what ``Trainer`` resumes from)."""
    return output_dir.is_dir() and any(p.is_dir() and _CHECKPOINT.match(p.name) for p in output_dir.iterdir())


def check_output(output_dir: Path, resume: bool) -> None:
    """Refuse to overwrite a finished run, to resume without a checkpoint, or to start afresh over
    an unfinished one."""
    if (output_dir / SUMMARY).exists() and not resume:
        raise TrainingError(f"{output_dir} already holds a trained model ({SUMMARY}); choose a new --output, "
                            "or --resume to train on from its last checkpoint")
    found = has_checkpoint(output_dir)
    if resume and not found:
        raise TrainingError(f"--resume: {output_dir} has no checkpoint-* directory to resume from")
    if found and not resume:
        raise TrainingError(f"{output_dir} holds checkpoints of an unfinished run; pass --resume to continue it "
                            "or choose a new --output")
