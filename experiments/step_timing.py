"""Where an OPSDL step's time goes: generation, teacher forward, student forward + backward, optimizer.

[`StepTimer`] wraps two of the trainer's own methods on one trainer instance (nothing global is patched) and uses
the optimizer hooks every `TrainerCallback` gets:

- generation: `_generate_and_score_completions` (tokenizing both prompts and sampling on the long one);
- teacher forward: `_teacher_hidden_states` (the no-grad pass on the short prompt + the sampled tokens);
- optimizer: from `on_pre_optimizer_step` to `on_optimizer_step`;
- student forward + backward: the rest of `training_step` (student pass, loss, backward).
"""

import time

from trl_opsdl.host import host_speed  # noqa: F401 - re-exported: the experiments' scripts read it here


class StepTimer:
    """Accumulates seconds per phase of each optimizer step of one trainer; [`summary`] gives means and shares."""

    PHASES = ("generation", "teacher_forward", "student_forward_backward", "optimizer")

    def __init__(self):
        self.steps = []  # one dict of phase -> seconds per optimizer step
        self._current = dict.fromkeys(self.PHASES, 0.0)

    def _timed(self, phase, method):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._current[phase] += time.perf_counter() - start

        return wrapper

    def attach(self, trainer):
        """Time `trainer`'s phases from now on (wraps its bound methods; the class is untouched)."""
        trainer._generate_and_score_completions = self._timed("generation", trainer._generate_and_score_completions)
        trainer._teacher_hidden_states = self._timed("teacher_forward", trainer._teacher_hidden_states)
        training_step = trainer.training_step

        def timed_training_step(*args, **kwargs):
            inner = self._current["generation"] + self._current["teacher_forward"]
            start = time.perf_counter()
            try:
                return training_step(*args, **kwargs)
            finally:
                inner = self._current["generation"] + self._current["teacher_forward"] - inner
                self._current["student_forward_backward"] += time.perf_counter() - start - inner

        trainer.training_step = timed_training_step
        return trainer

    def callback(self, log=None, total_steps=None):
        """A `TrainerCallback` that times the optimizer and closes each step (optionally printing a progress line)."""
        from transformers import TrainerCallback

        timer = self

        class _StepTimes(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                self.start = time.time()

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                self.optimizer_start = time.perf_counter()

            def on_optimizer_step(self, args, state, control, **kwargs):
                timer._current["optimizer"] += time.perf_counter() - self.optimizer_start

            def on_step_end(self, args, state, control, **kwargs):
                timer.steps.append(timer._current)
                timer._current = dict.fromkeys(timer.PHASES, 0.0)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if log is None or not logs or "loss" not in logs:
                    return
                shown = {k: logs[k] for k in ("loss", "opsdl/reverse_kl", "entropy") if k in logs}
                metrics = "  ".join(f"{k} {v:.4f}" for k, v in shown.items())
                log(
                    f"  step {state.global_step}/{total_steps or state.max_steps}  {metrics}  "
                    f"{time.time() - self.start:.0f}s"
                )

        return _StepTimes()

    def summary(self, skip_first: bool = True) -> dict:
        """Mean seconds per step of each phase and its share of the step (the first step, which warms up, left out
        when there are others)."""
        steps = self.steps[1:] if skip_first and len(self.steps) > 1 else self.steps
        if not steps:
            return {}
        means = {phase: sum(s[phase] for s in steps) / len(steps) for phase in self.PHASES}
        total = sum(means.values())
        return {
            "steps": len(steps),
            "seconds_per_step": round(total, 3),
            **{
                phase: {"seconds": round(v, 3), "share": round(v / total, 3) if total else 0.0}
                for phase, v in means.items()
            },
        }
