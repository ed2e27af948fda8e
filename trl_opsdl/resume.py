"""What exact, crash-safe resuming needs beyond the Trainer's own: a train sampler with one order per epoch, and
which checkpoint folders a killed save left incomplete.

`OPSDLTrainer` uses both (`_get_train_sampler`, `train`, `_save_checkpoint`); docs/trainer.md, "Resuming and crashes".
"""

import json
import os
import re

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.trainer.utils import RepeatSampler

from .teacher import EMA_STATE_FILE


class EpochRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler` with one permutation per epoch, seeded by `seed + epoch`.

    TRL's sampler seeds its generator once and draws each epoch's order from where the previous epoch left it, and it
    has no `set_epoch`: a run resumed after epoch 0 builds a new sampler and replays epoch 0's order. Here the order is
    a function of (seed, epoch) alone; the Trainer calls `set_epoch` before every epoch (through accelerate's loader),
    resumed or not. Epoch 0's order is the parent's.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            self.generator.manual_seed((self.seed or 0) + self.epoch)
        return super().__iter__()


_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
    "adapter_model.safetensors", "adapter_model.bin",
)  # fmt: skip


def checkpoint_problem(path: str, needs_ema: bool) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed from (a save that was killed half-way), or `None`.

    The Trainer writes `trainer_state.json` last (after the weights, optimizer, scheduler and RNG state; OPSDL writes the
    EMA teacher before all of them), so a checkpoint is complete when that file parses and the weights are there.
    """
    state = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state):
        return "no trainer_state.json (the save did not finish)"
    try:
        with open(state, encoding="utf-8") as f:
            json.load(f)
    except (ValueError, UnicodeDecodeError):
        return "trainer_state.json is cut short (the save did not finish)"
    has_weights = any(os.path.exists(os.path.join(path, name)) for name in _WEIGHT_FILES)
    has_weights = has_weights or any(n.startswith("global_step") for n in os.listdir(path))  # a DeepSpeed save
    if not has_weights:
        return "no model weights"
    if needs_ema and not os.path.isfile(os.path.join(path, EMA_STATE_FILE)):
        return f"no {EMA_STATE_FILE} (the 'ema' teacher's state)"
    return None


def list_checkpoints(folder: str) -> list[str]:
    """The `checkpoint-<step>` folders in `folder`, oldest step first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(folder) if (m := _CHECKPOINT_RE.match(n))]
    return [os.path.join(folder, n) for _, n in sorted(found) if os.path.isdir(os.path.join(folder, n))]


def last_complete_checkpoint(folder: str, needs_ema: bool) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete checkpoint in `folder`, and the newer ones skipped as incomplete, each with the reason."""
    skipped = []
    for path in reversed(list_checkpoints(folder)):
        problem = checkpoint_problem(path, needs_ema)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped
