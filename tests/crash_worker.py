"""Train an `ema` OPSDL run that SIGKILLs itself at one point of the save of checkpoint-3 (for tests/test_resume.py).

    OMP_NUM_THREADS=1 python -m tests.crash_worker OUT_DIR POINT

POINT is where in the save the process dies (`CRASH_POINTS`). The run keeps one checkpoint (`save_total_limit=1`),
the hardest case: a save that loses the only checkpoint before the new one is complete leaves nothing to resume from.
"""

import os
import signal
import sys


KILL_AT_STEP = 3
MAX_STEPS = 4
CRASH_POINTS = (
    "ema",  # the EMA teacher's state written, nothing else
    "weights",  # + the model weights
    "optimizer",  # + optimizer and scheduler
    "state",  # trainer_state.json half written
    "rotate",  # complete, the older checkpoint not yet deleted
)


def crash_trainer(output_dir: str, save: bool):
    """The run both the worker and the test build: an EMA teacher, a checkpoint every step, one kept."""
    from tests.conftest import kv_rows, trainer_for

    return trainer_for(
        output_dir,
        rows=kv_rows(8),
        teacher_model_kind="ema",
        teacher_update_rate=0.5,
        per_device_train_batch_size=2,
        max_steps=MAX_STEPS,
        save_strategy="steps" if save else "no",
        save_steps=1,
        save_total_limit=1,
    )


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def main(output_dir: str, point: str) -> None:
    import dataclasses
    import json

    import torch
    import transformers.trainer
    from transformers import Trainer, TrainerState

    from trl_opsdl.teacher import EMATeacher

    torch.set_num_threads(1)
    trainer = crash_trainer(output_dir, save=True)

    def at_kill_step():
        return trainer.state.global_step == KILL_AT_STEP

    def after(original):
        def patched(*args, **kwargs):
            result = original(*args, **kwargs)
            if at_kill_step():
                _die()
            return result

        return patched

    def before(original):
        def patched(*args, **kwargs):
            if at_kill_step():
                _die()
            return original(*args, **kwargs)

        return patched

    if point == "ema":
        EMATeacher.save = after(EMATeacher.save)
    elif point == "weights":
        Trainer._save_optimizer_and_scheduler = before(Trainer._save_optimizer_and_scheduler)
    elif point == "optimizer":
        Trainer._save_rng_state = before(Trainer._save_rng_state)
    elif point == "state":
        original = TrainerState.save_to_json

        def half_written(self, json_path):
            if not at_kill_step():
                return original(self, json_path)
            text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)
            with open(json_path, "w", encoding="utf-8") as f:
                f.write(text[: len(text) // 2])
            _die()

        TrainerState.save_to_json = half_written
    elif point == "rotate":
        transformers.trainer.rotate_checkpoints = before(transformers.trainer.rotate_checkpoints)
    else:
        raise SystemExit(f"unknown point {point!r}; one of {CRASH_POINTS}")
    trainer.train()
    raise SystemExit("the run was not killed")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
