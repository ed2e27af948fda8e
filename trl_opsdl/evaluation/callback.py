"""`OPSDLEvalCallback`: long and short accuracy during training, logged through the trainer's reporters."""

import logging

from transformers import TrainerCallback

from ..generation import greedy_generate
from .evaluate import evaluation_rows, flatten_results, score_completions


logger = logging.getLogger(__name__)


class OPSDLEvalCallback(TrainerCallback):
    """
    Evaluate long (`prompt`) and short (`teacher_prompt`) accuracy every `every_n_steps` optimizer steps and log it.

    The metrics reach the trainer's reporters (`report_to`: W&B, TensorBoard, ...) and `trainer.state.log_history`
    as `eval_long/overall`, `eval_long/length_<L>`, `eval_long/task_<T>`, and the same under `eval_short/`. The
    trainer is given with `trainer=` or [`set_trainer`] (a callback's hooks do not receive it); without it the
    metrics only go to `state.log_history` and a warning says so.

    Under several processes each rank generates on its share of the rows (`rows[rank::world]`, padded to the same
    number so that every rank runs the same `generate` calls, as ZeRO-3's gathered generation needs); the completions
    are gathered, and every rank scores the whole set. Reporters log on the main process.

    Args:
        eval_dataset ([`~datasets.Dataset`]):
            Rows with `prompt`, `teacher_prompt` and `answers` (as built by `trl_opsdl.data`).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The model's tokenizer.
        every_n_steps (`int`, *optional*, defaults to `100`):
            Evaluate when `state.global_step` is a multiple of it.
        eval_on_start (`bool`, *optional*, defaults to `False`):
            Also evaluate before the first step (a baseline at step 0).
        trainer ([`~transformers.Trainer`], *optional*):
            The trainer whose reporters receive the metrics.
        **eval_kwargs:
            Passed to [`evaluate_dataset`] (`prompt_columns`, `metric`, `group_by`, `max_new_tokens`, `batch_size`,
            `limit`).

    Example:
    ```python
    callback = OPSDLEvalCallback(eval_ds, tokenizer, every_n_steps=50, max_new_tokens=32)
    trainer = OPSDLTrainer(model=..., args=..., train_dataset=train_ds, processing_class=tokenizer, callbacks=[callback])
    trainer.train()  # OPSDLTrainer hands itself to the callback; other trainers need `callback.set_trainer(trainer)`
    ```
    """

    def __init__(self, eval_dataset, tokenizer, every_n_steps: int = 100, eval_on_start: bool = False, trainer=None,
                 **eval_kwargs):  # fmt: skip
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}.")
        if tokenizer is None:
            raise ValueError("OPSDLEvalCallback needs the model's tokenizer.")
        self.eval_dataset, self.tokenizer = eval_dataset, tokenizer
        self.every_n_steps, self.eval_on_start = every_n_steps, eval_on_start
        self.eval_kwargs = {"max_new_tokens": 64, **eval_kwargs}
        self.trainer = trainer
        self.history = []  # (step, results)
        self._warned = False

    def set_trainer(self, trainer):
        """Route the metrics through `trainer`'s reporters."""
        self.trainer = trainer
        return self

    def evaluate(self, model) -> dict:
        """Evaluate `model` on the eval set, this rank generating on its shard only; returns the whole set's results."""
        from accelerate import PartialState
        from accelerate.utils import gather_object

        options = dict(self.eval_kwargs)
        columns = options.pop("prompt_columns", ("prompt", "teacher_prompt"))
        answers_column = options.pop("answers_column", "answers")
        rows, present, skipped = evaluation_rows(
            self.eval_dataset, columns, answers_column, options.pop("limit", None)
        )
        state = PartialState()
        mine = shard_indices(len(rows), state.process_index, state.num_processes)
        max_new_tokens = options.pop("max_new_tokens")
        generate = {"batch_size": options.pop("batch_size", 16), "progress": options.pop("progress", False)}
        completions = {}
        for column in present:
            texts = greedy_generate(model, self.tokenizer, [rows[i][column] for i in mine], max_new_tokens, **generate)
            pairs = list(zip(mine, texts))
            if state.num_processes > 1:
                pairs = gather_object(pairs)
            by_index = dict(pairs)  # a padded shard repeats a row: the same greedy completion
            completions[column] = [by_index[i] for i in range(len(rows))]
        return score_completions(rows, completions, answers_column=answers_column, max_new_tokens=max_new_tokens,
                                 skipped_rows=skipped, **options)  # fmt: skip

    def on_train_begin(self, args, state, control, **kwargs):
        if self.eval_on_start:
            self._evaluate(args, state, control, kwargs["model"])

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self._evaluate(args, state, control, kwargs["model"])

    def _evaluate(self, args, state, control, model):
        results = self.evaluate(model)
        self.history.append((state.global_step, results))
        logs = flatten_results(results)
        if self.trainer is None:
            state.log_history.append({**logs, "step": state.global_step})
            if not self._warned:
                logger.warning(
                    "OPSDLEvalCallback has no trainer: metrics go to state.log_history only. Call set_trainer()."
                )
                self._warned = True
            return
        # What `Trainer.log` does, without `DistillationTrainer.log`'s flush of the training metrics it is averaging.
        if state.epoch is not None:
            logs["epoch"] = state.epoch
        state.log_history.append({**logs, "step": state.global_step})
        should_log = control.should_log  # the handler's `on_log` clears it: this step's training log must still come
        self.trainer.callback_handler.on_log(args, state, control, logs)
        control.should_log = should_log


def shard_indices(num_rows: int, rank: int, world: int) -> list[int]:
    """Rank `rank`'s rows, `rank, rank + world, ...`, padded with its last row so every rank has as many."""
    mine = list(range(rank, num_rows, world))
    per_rank = -(-num_rows // world)
    return mine + [mine[-1] if mine else num_rows - 1] * (per_rank - len(mine))
