"""`OPSDLTrainer`: TRL's on-policy `DistillationTrainer` with the model as its own teacher on a short prompt.

One class, as TRL writes its trainers: the input checks, the generation override that adds the teacher prompt, the
loss override that runs the teacher on it, and the resume and checkpoint overrides (their helpers: `resume.py`), each
commented with what the parent does.
"""

import contextlib
import copy
import os
import random
import textwrap
import warnings

import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import DistillationTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import pad

from . import context_cache, loss_utils, sequence_parallel
from .opsdl_config import OPSDLConfig
from .resume import EpochRepeatSampler, checkpoint_problem, last_complete_checkpoint, list_checkpoints
from .teacher import EMATeacher, add_ema_adapter, frozen_copy, teacher_context


logger = get_logger(__name__)
# PEFT's `PeftModel.__init__` and TRL's `unwrap_model_for_generation` read transformers' deprecated
# `is_gradient_checkpointing`: a FutureWarning about library internals, on every run, that no user setting changes.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def fit_to_length(ids: list[int], max_length: int | None, policy: str, what: str, text) -> tuple[list[int], bool]:
    """Apply the truncation policy to one tokenized prompt; returns the ids and whether they were cut."""
    if max_length is None or len(ids) <= max_length:
        return ids, False
    if policy == "error":
        preview = str(text)[:80].replace("\n", " ")
        raise ValueError(
            f"A {what} has {len(ids)} tokens, more than max_{what}_length={max_length} ({what} begins {preview!r}). "
            f"Raise max_{what}_length, or set truncation_policy='middle' (keep head and tail) or 'left' (keep the "
            "tail) to cut it."
        )
    if policy == "left":
        return ids[-max_length:], True
    head = max_length // 2
    return ids[:head] + ids[len(ids) - (max_length - head) :], True  # "middle": LongBench keeps both ends


# A streamed (iterable) dataset cannot be checked before training: each row is checked when its generation batch
# arrives. This column, added by `OPSDLTrainer`, carries the row's position in the stream the user gave, so the error
# names the row in the dataset rather than its place in the batch (TRL shuffles and repeats the stream after it).
STREAM_ROW_COLUMN = "_opsdl_stream_row"


def number_stream_rows(dataset):
    """`dataset` with each row's 0-based stream position added as `STREAM_ROW_COLUMN` (iterable datasets only)."""
    from datasets import IterableDataset

    if not isinstance(dataset, IterableDataset):
        return dataset
    return dataset.map(lambda _, index: {STREAM_ROW_COLUMN: index}, with_indices=True)


def row_problem(value, what: str) -> str | None:
    """Why one prompt (plain text or a message list) cannot be trained on, or `None`."""
    if isinstance(value, str):
        if not value.strip():
            return f"an empty or whitespace-only {what} ({value[:20]!r})"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            return f"a {what} that is not valid UTF-8 text ({error.reason} at character {error.start})"
        return None
    if isinstance(value, list | tuple):
        if not value:
            return f"an empty message list as {what}"
        for j, message in enumerate(value):
            if not isinstance(message, dict) or not {"role", "content"} <= set(message):
                shown = sorted(message) if isinstance(message, dict) else type(message).__name__
                return f"a {what} whose message {j} is not a dict with 'role' and 'content' (it has {shown})"
            if not isinstance(message["role"], str) or not message["role"]:
                return f"a {what} whose message {j} has no role ({message['role']!r})"
            content = message["content"]
            if content is None or (isinstance(content, str) and not content.strip()):
                return f"a {what} whose message {j} has empty content ({content!r})"
        return None
    return f"a {what} that is {value!r} ({type(value).__name__}), not text or a message list"


class OPSDLTrainer(DistillationTrainer):
    """
    Trainer for OPSDL — On-Policy Self-Distillation for Long context ([arXiv 2604.17535](https://arxiv.org/abs/2604.17535)).

    The model samples a response to the long `prompt`; the same model, without gradient, scores those response tokens
    given only the short `teacher_prompt` (the relevant evidence + the same question); the loss is the token-level
    reverse KL(student on long || teacher on short) over the response. No labels are needed.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from trl_opsdl import OPSDLConfig, OPSDLTrainer

    >>> dataset = Dataset.from_list(
    ...     [{"prompt": "<long document> Q: who wrote it?", "teacher_prompt": "<the relevant passage> Q: who wrote it?"}]
    ... )
    >>> trainer = OPSDLTrainer(
    ...     model="Qwen/Qwen2.5-7B-Instruct", args=OPSDLConfig(output_dir="opsdl"), train_dataset=dataset
    ... )
    >>> trainer.train()
    ```

    Args are those of [`~trl.DistillationTrainer`]; `teacher_model` is optional. Without it the teacher is the model
    itself (`args.teacher_model_kind`: `base`, `live` or `ema`); with it, that model (same vocabulary) scores the short
    prompt. The datasets need a `prompt` column and a teacher-prompt column (`args.teacher_prompt_column`), both plain
    text or both conversational.
    """

    _tag_names = ["trl", "opsdl", "distillation", "long-context"]
    _name = "OPSDL"
    _paper = {
        "title": "On-Policy Self-Distillation for Long Context",
        "id": "2604.17535",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{opsdl2026,
                title        = {{On-Policy Self-Distillation for Long Context}},
                year         = 2026,
                eprint       = {arXiv:2604.17535},
            }"""),
    }

    def __init__(
        self,
        model,
        teacher_model=None,
        args: OPSDLConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = OPSDLConfig(f"{str(name).split('/')[-1]}-OPSDL")
        if not isinstance(args, OPSDLConfig):
            raise TypeError(
                f"OPSDLTrainer needs an OPSDLConfig, got {type(args).__name__}. Build it with "
                f"OPSDLConfig(**your_config.to_dict()) or replace DistillationConfig by OPSDLConfig in your script."
            )
        if teacher_model is not None and args.teacher_model_kind != "base":
            raise ValueError(
                f"An explicit teacher_model was passed together with teacher_model_kind={args.teacher_model_kind!r}. "
                "The explicit model is used as a frozen teacher; leave teacher_model_kind at 'base', or drop "
                "teacher_model to use the model itself as a live or EMA teacher."
            )
        deepspeed_plugin = getattr(args, "deepspeed_plugin", None)
        if args.activation_checkpointing_policy == "selective" and deepspeed_plugin is not None:
            uses_peft = peft_config is not None or (not isinstance(model, str) and is_peft_model(model))
            if uses_peft and deepspeed_plugin.zero_stage == 3:  # the parent then forces reentrant checkpointing
                raise ValueError(
                    "activation_checkpointing_policy='selective' is not available with PEFT under DeepSpeed ZeRO-3: "
                    "TRL switches checkpointing to use_reentrant=True there, which cannot take a policy. Use "
                    "activation_checkpointing_policy='full', or ZeRO-2."
                )
        self._is_conversational = None
        for split, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            for name, ds in dataset.items() if isinstance(dataset, dict) else [(split, dataset)]:
                self._check_dataset(ds, name, args.teacher_prompt_column)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer is not None:
            if tokenizer.pad_token is None and tokenizer.eos_token is None:
                raise ValueError(
                    "The tokenizer has neither a pad token nor an eos token, so prompts cannot be batched. Set one, "
                    "e.g. `tokenizer.pad_token = tokenizer.eos_token` or `tokenizer.add_special_tokens({'pad_token': "
                    "'<pad>'})` (and resize the embeddings)."
                )
            if tokenizer.eos_token is None:  # generation would stop on nothing and fail in transformers
                raise ValueError(
                    f"The tokenizer has no eos token (eos_token=None; pad_token={tokenizer.pad_token!r}), so a "
                    "completion can never end. Set it, e.g. `tokenizer.eos_token = '</s>'` (the token the model ends "
                    "its answers with), or use the model's own tokenizer."
                )
            if tokenizer.pad_token is None:
                logger.warning("The tokenizer has no pad token: its eos token is used for padding (TRL's convention).")
            if self._is_conversational and getattr(processing_class, "chat_template", None) is None:
                raise ValueError(
                    "The dataset is conversational (prompts are message lists) but the tokenizer has no chat "
                    "template. Set `tokenizer.chat_template`, use an instruct model's tokenizer, or give plain-text "
                    "prompts."
                )

        self._check_dataset_size(train_dataset, args)
        train_dataset = number_stream_rows(train_dataset)
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: number_stream_rows(ds) for name, ds in eval_dataset.items()}
        else:
            eval_dataset = number_stream_rows(eval_dataset)

        super().__init__(
            model=model,
            teacher_model=teacher_model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
        )

        # The teacher: an explicit model was prepared by the parent; otherwise it is the model itself.
        self.teacher_kind = "explicit" if teacher_model is not None else args.teacher_model_kind
        self.ema_teacher = None
        peft = is_peft_model(self.model)
        if self.teacher_kind == "base" and not peft:
            self.teacher_model = frozen_copy(self.model, args, self.accelerator)
        elif self.teacher_kind == "ema":
            if peft:
                add_ema_adapter(self.model)
                self.teacher_model = None
            else:
                self.teacher_model = frozen_copy(self.model, args, self.accelerator)
            self.ema_teacher = EMATeacher(self.model, self.teacher_model, args.teacher_update_rate, self.accelerator)
            self.add_callback(self.ema_teacher)
        elif self.teacher_kind in ("base", "live"):
            self.teacher_model = None  # the student's weights, under `teacher_context`
        self._truncations = {"prompt": 0, "teacher_prompt": 0}
        self._warned_not_shorter = False
        # Sequence parallelism splits the long student forward across `sequence_parallel_size` consecutive ranks
        # after generation, which TRL 1.16 refuses for generating trainers (see trl_opsdl/sequence_parallel.py).
        self._sp_group = None
        if args.sequence_parallel_size > 1:
            student = self.accelerator.unwrap_model(self.model)
            sequence_parallel.check_sequence_parallel(
                student, args.sequence_parallel_size, self.accelerator.num_processes
            )
            sequence_parallel.use_ulysses_attention(student)  # this model only: no process-wide kernel swap
            self._sp_group = sequence_parallel.sequence_parallel_group(args.sequence_parallel_size)
        # Callbacks that evaluate with the trainer's model and log through its reporters (OPSDLEvalCallback) get it
        # here, so a user can't forget to hand it over.
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "set_trainer") and getattr(callback, "trainer", None) is None:
                callback.set_trainer(self)

    # ---- input checks -------------------------------------------------------------------------------------------

    def _check_dataset(self, dataset, name, column):
        """Reject datasets that would train on nothing, or silently on the wrong thing, before any compute."""
        if dataset is None:
            return
        columns = dataset.column_names or []
        for needed in ("prompt", column):
            if columns and needed not in columns:
                raise ValueError(
                    f"{name} has no {needed!r} column (columns: {columns}). OPSDL needs 'prompt' (long context + "
                    f"question) and {column!r} (short context + the same question); set "
                    "OPSDLConfig.teacher_prompt_column if the short prompt lives in another column."
                )
        if not hasattr(dataset, "__getitem__") or not columns:
            return  # iterable datasets are checked batch by batch in `_check_rows`
        # Every row, before any compute: a bad row deep in the data would otherwise crash (or train on nothing) at
        # the step that samples it, hours in, with an error naming its place in the batch.
        offset = 0
        for batch in dataset.select_columns(["prompt", column]).iter(batch_size=1024):
            rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
            self._check_rows(rows, column, name, offset)
            offset += len(rows)

    @staticmethod
    def _check_dataset_size(dataset, args):
        """A train set smaller than one generation batch trains 0 steps; rows beyond the last full one are unused."""
        if dataset is None or not hasattr(dataset, "__len__") or isinstance(dataset, dict):
            return
        # TRL's sampler yields whole generation batches only (per-device batch x processes x accumulation steps) and
        # drops each epoch's incomplete last one.
        generation_batch = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        if len(dataset) < generation_batch:
            raise ValueError(
                f"train_dataset has {len(dataset)} rows, fewer than one generation batch of {generation_batch} "
                f"(per_device_train_batch_size={args.per_device_train_batch_size} x {args.world_size} processes x "
                f"gradient_accumulation_steps={args.gradient_accumulation_steps}): training would run 0 steps. Add "
                "rows, or lower the batch size or the accumulation steps."
            )
        dropped = len(dataset) % generation_batch
        if dropped:
            logger.warning(
                f"train_dataset has {len(dataset)} rows, not a multiple of the generation batch ({generation_batch}): "
                f"{dropped} rows of each epoch (a different {dropped} each epoch when shuffled) are not trained on."
            )

    def _check_rows(self, rows, column, where="batch", offset=0):
        """Reject rows OPSDL cannot train on, naming the row: its index in the dataset (`offset + i` for a map-style
        one; for a streamed one, its position in the stream, carried in `STREAM_ROW_COLUMN`)."""
        for i, row in enumerate(rows, start=offset):
            i = row.get(STREAM_ROW_COLUMN, i)
            prompt, teacher_prompt = row.get("prompt"), row.get(column)
            for key, value in (("prompt", prompt), (column, teacher_prompt)):
                problem = row_problem(value, repr(key))
                if problem:
                    raise ValueError(
                        f"{where} row {i} has {problem}. Every row needs a long prompt and a short prompt for the "
                        "teacher: fill it or drop the row (e.g. with `dataset.filter`) before training."
                    )
            conversational = is_conversational({"prompt": prompt})
            if conversational != is_conversational({"prompt": teacher_prompt}):
                raise ValueError(
                    f"{where} row {i}: 'prompt' is {'conversational' if conversational else 'plain text'} but "
                    f"{column!r} is {'plain text' if conversational else 'conversational'}. Give both as plain text "
                    "or both as message lists, so student and teacher see the same template."
                )
            if conversational:
                for key, messages in (("prompt", prompt), (column, teacher_prompt)):
                    if messages[-1]["role"] != "user":
                        raise ValueError(
                            f"{where} row {i}: the conversational {key!r} ends with a {messages[-1]['role']!r} turn. "
                            "It must end with the user's question, so the model answers it; drop trailing "
                            "assistant turns."
                        )
            if self._is_conversational is None:
                self._is_conversational = conversational
            elif conversational != self._is_conversational:
                raise ValueError(
                    f"{where} row {i} is {'conversational' if conversational else 'plain text'} but earlier rows are "
                    f"{'conversational' if self._is_conversational else 'plain text'}. Use one format for every row."
                )

    # ---- the train sampler: one order per epoch, so a resumed run sees the batches the uninterrupted one does ------

    def _get_train_sampler(self, dataset=None):
        # The parent returns TRL's `RepeatSampler`, seeded once with no `set_epoch`: after a resume past epoch 0 it
        # would replay epoch 0's order. `EpochRepeatSampler` draws epoch e's order from `seed + e` (same arguments).
        sampler = super()._get_train_sampler(dataset)
        return EpochRepeatSampler(
            data_source=sampler.data_source, mini_repeat_count=sampler.mini_repeat_count,
            batch_size=sampler.batch_size, repeat_count=sampler.repeat_count, shuffle=sampler.shuffle,
            seed=sampler.seed,
        )  # fmt: skip

    # ---- generation: the student generates on the long prompt; the short prompt is tokenized beside it ----------

    def _tokenize_prompts(self, prompts: list):
        # The parent tokenizes with no length limit; OPSDL applies `max_prompt_length` and its truncation policy here,
        # before generation, so the student generates from exactly what it is then trained on.
        prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts)
        prompt_ids = self._fit(prompt_ids, prompts, self.args.max_prompt_length, "prompt")
        return prompt_ids, images, multimodal_fields

    def _fit(self, ids_list, texts, max_length, what):
        fitted = []
        for ids, text in zip(ids_list, texts, strict=True):
            ids, cut = fit_to_length(list(ids), max_length, self.args.truncation_policy, what, text)
            self._truncations[what] += cut
            fitted.append(ids)
        return fitted

    def _generate_and_score_completions(self, inputs):
        # The parent generates on `prompt` and builds the student inputs. OPSDL checks the rows, swaps some prompts for
        # their short one (anchors), and adds the teacher's short prompt (tokenized once per generation batch, not per
        # micro-step), a loss mask that can leave end tokens out, the context's keys/values (`context_gradient="none"`)
        # and its logs. Each step is one helper below.
        self._check_generation_batch(inputs)
        teacher_prompts = [row[self.args.teacher_prompt_column] for row in inputs]
        if self.args.short_prompt_ratio > 0 and self.model.training:
            inputs = self._anchor_rows(inputs)
        truncated_before = dict(self._truncations)

        with self._keeping_generation_cache() as kept:
            output = super()._generate_and_score_completions(inputs)
        output.update(self._context_kv_from_generation(kept, output["prompt_ids"].size(1)))
        output.update(self._tokenize_teacher_prompts(teacher_prompts))
        output["loss_mask"] = self._loss_mask(output)
        if self._sp_group is not None:  # the sequence-parallel group trains on its first rank's sequences
            output = sequence_parallel.sp_broadcast_batch(output, self._sp_group, self.accelerator.device)
        # The loss is a sum over tokens divided by the global number of loss tokens (all ranks, all micro-batches of
        # this generation batch), so gradient accumulation 4x1 and 1x4 give the same update.
        output["num_items_in_batch"] = self.accelerator.gather(output["loss_mask"].sum()).sum()
        self._log_prompt_lengths(output, truncated_before)
        return output

    def _check_generation_batch(self, inputs):
        """Map-style datasets were checked row by row at construction; an iterable one is checked here, per batch.
        (Also a map-style set handed to `evaluate()` later, never checked: its rows carry no stream position.)"""
        split = "train_dataset" if self.model.training else "eval_dataset"
        streamed = STREAM_ROW_COLUMN in inputs[0]
        where = f"{split} (streamed; checked" if streamed else f"the generation batch ({split}"
        self._check_rows(inputs, self.args.teacher_prompt_column, f"{where} at global step {self.state.global_step}):")

    def _anchor_rows(self, inputs):
        """Anchor rows: the student generates from the short prompt too, so the frozen teacher keeps it where it was.
        Keyed on checkpointed state (the optimizer step, and the micro-step within it), not on `self._step`, which
        restarts at 0 on resume; in an uninterrupted run the two are equal."""
        column = self.args.teacher_prompt_column
        micro_step = self.state.global_step * self.args.gradient_accumulation_steps
        micro_step += self._step % self.args.gradient_accumulation_steps
        rng = random.Random(self.args.seed * 1_000_003 + micro_step)
        num_short = round(self.args.short_prompt_ratio * len(inputs))
        short_rows = set(rng.sample(range(len(inputs)), num_short))
        return [{**row, "prompt": row[column]} if i in short_rows else row for i, row in enumerate(inputs)]

    @contextlib.contextmanager
    def _keeping_generation_cache(self):
        """With `context_gradient="none"`, keep the keys/values HF generate computes for the prompt: TRL's generation
        returns token ids only, so `generate` is wrapped (on this model instance, for this call) to return its cache
        too. Yields a list that holds the cache after exactly one `generate` call (not with vLLM or tool calls)."""
        kept = []
        model = self.accelerator.unwrap_model(self.model_wrapped)
        if self.args.context_gradient != "none" or self.use_vllm or self.tools or not hasattr(model, "generate"):
            yield kept
            return
        generate = model.generate

        def generate_keeping_cache(*args, **kwargs):
            generation_config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
            generation_config.return_dict_in_generate = True
            out = generate(*args, **{**kwargs, "generation_config": generation_config})
            # transformers 5.25 names the output's cache `cache` (older 5.x: `past_key_values`)
            kept.append(out["cache"] if "cache" in out else out.get("past_key_values"))
            return out.sequences

        model.generate = generate_keeping_cache
        try:
            yield kept
        finally:
            del model.generate  # back to the class's method

    def _context_kv_from_generation(self, kept, prompt_width: int) -> dict:
        """The prompt's keys/values of positions 0 .. P-2 as batch entries, stamped with the optimizer step (the
        weights) they were computed at; `{}` when generation gave none (the loss then prefills)."""
        if len(kept) != 1 or kept[0] is None:
            return {}
        batch = context_cache.cache_to_batch(kept[0], prompt_width - 1)
        if batch:
            batch[context_cache.CONTEXT_KV_STEP] = torch.tensor(self.state.global_step, device=self.accelerator.device)
        return batch

    def _tokenize_teacher_prompts(self, teacher_prompts) -> dict:
        teacher_ids_list, _, _ = super()._tokenize_prompts(teacher_prompts)
        teacher_ids_list = self._fit(
            teacher_ids_list, teacher_prompts, self.args.max_teacher_prompt_length, "teacher_prompt"
        )
        teacher_ids = [torch.tensor(ids) for ids in teacher_ids_list]
        pad_id, device = self._tokenizer.pad_token_id, self.accelerator.device
        masks = [torch.ones_like(t) for t in teacher_ids]
        return {
            "teacher_prompt_ids": pad(teacher_ids, padding_value=pad_id, padding_side="left").to(device),
            "teacher_prompt_mask": pad(masks, padding_value=0, padding_side="left").to(device),
        }

    def _loss_mask(self, output):
        loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
        if self.args.exclude_eos_from_loss:
            eos = torch.tensor(self.eos_token_ids, device=loss_mask.device)
            loss_mask = loss_mask * (~torch.isin(output["completion_ids"], eos)).long()
        return loss_mask

    def _log_prompt_lengths(self, output, truncated_before):
        prompt_lengths = self.accelerator.gather(output["prompt_mask"].sum(1)).float()
        teacher_lengths = self.accelerator.gather(output["teacher_prompt_mask"].sum(1)).float()
        not_shorter = (teacher_lengths >= prompt_lengths).sum().item()
        if not_shorter and not self._warned_not_shorter and self.args.short_prompt_ratio == 0:
            self._warned_not_shorter = True
            warnings.warn(
                f"{int(not_shorter)} of {len(prompt_lengths)} rows in this batch have a teacher prompt as long as or "
                "longer than the prompt: the teacher then has no advantage over the student and OPSDL learns "
                "nothing from them. Check the teacher prompt column (counted in opsdl/teacher_not_shorter).",
                stacklevel=3,
            )
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["opsdl/prompt_length"].append(prompt_lengths.mean().item())
        metrics["opsdl/teacher_prompt_length"].append(teacher_lengths.mean().item())
        metrics["opsdl/teacher_to_prompt_ratio"].append((teacher_lengths / prompt_lengths.clamp(min=1)).mean().item())
        metrics["opsdl/teacher_not_shorter"].append(not_shorter)
        for what in ("prompt", "teacher_prompt"):
            cut = torch.tensor(self._truncations[what] - truncated_before[what], device=self.accelerator.device)
            metrics[f"opsdl/truncated_{what}s"].append(self.accelerator.gather(cut).sum().item())

    # ---- loss: student on long prompt + completion, teacher on short prompt + the same completion --------------

    def _teacher_hidden_states(self, unwrapped_student, inputs, logits_to_keep):
        teacher_input_ids = torch.cat([inputs["teacher_prompt_ids"], inputs["completion_ids"]], dim=1)
        teacher_attention_mask = torch.cat([inputs["teacher_prompt_mask"], inputs["completion_mask"]], dim=1)
        with torch.no_grad():
            if self.teacher_model is None:  # the student's own weights: live, or PEFT base / EMA adapter
                with teacher_context(unwrapped_student, self.teacher_kind):
                    hidden_BKH = self._get_last_hidden_state(
                        unwrapped_student, teacher_input_ids, teacher_attention_mask, logits_to_keep
                    )
                return hidden_BKH, unwrapped_student
            # A separate model: route it through its own wrapper so DeepSpeed/FSDP gather its shards first.
            self.teacher_model.eval()
            unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
            hidden_BKH = self._forward_redirection(
                self.teacher_model,
                unwrapped_teacher,
                self._get_last_hidden_state,
                unwrapped_teacher,
                teacher_input_ids,
                teacher_attention_mask,
                logits_to_keep,
            )
            return hidden_BKH, unwrapped_teacher

    def _completion_hidden_states(self, unwrapped_student, inputs, input_ids, attention_mask):
        """`context_gradient="none"`: the student's hidden states at the completion positions, the context's keys and
        values taken from generation (same weights: same optimizer step) or else prefilled without gradient."""
        logits_to_keep = inputs["completion_ids"].size(1)
        backbone = unwrapped_student
        if is_peft_model(backbone):
            backbone = backbone.base_model.model
        backbone = backbone.base_model  # the decoder stack without `lm_head`, as TRL's `_get_last_hidden_state`
        kv_by_layer, step = context_cache.pop_context_kv(inputs)
        if kv_by_layer is None or step != self.state.global_step:  # none kept, or the optimizer stepped since
            context_len = input_ids.size(1) - logits_to_keep - 1
            kv_by_layer = context_cache.prefill(
                backbone,
                input_ids[:, :context_len],
                attention_mask[:, :context_len],
                self.args.context_prefill_chunk_size,
            )
        return context_cache.completion_hidden_states(backbone, kv_by_layer, input_ids, attention_mask, logits_to_keep)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # The parent runs its teacher on the student's own input ids. Here the teacher sees the short prompt + the same
        # completion tokens; only completion positions are projected to the vocabulary, in chunks.
        completion_ids_BK = inputs["completion_ids"]
        loss_mask_BK = inputs["loss_mask"]
        logits_to_keep = completion_ids_BK.size(1)
        if logits_to_keep == 0:  # nothing was generated: a zero loss, never 0/0
            zero = sum(p.sum() * 0.0 for p in unwrapped_student.parameters() if p.requires_grad)
            return zero, completion_ids_BK.new_zeros((), dtype=torch.float), completion_ids_BK.new_zeros(())

        # Teacher first: its no-grad activations are freed before the student's, which are kept for the backward.
        teacher_hidden_BKH, teacher_module = self._teacher_hidden_states(unwrapped_student, inputs, logits_to_keep)
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids_BK], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        if self._sp_group is not None:  # each rank of the group runs one slice of the long sequence (Ulysses)
            student_hidden_BKH = sequence_parallel.sp_student_hidden_states(
                unwrapped_student, input_ids, attention_mask, logits_to_keep, self._sp_group
            )
        elif self.args.context_gradient == "none":
            # The context's keys/values are constants (see trl_opsdl/context_cache.py): the forward with gradient
            # runs over the completion positions only, attending to them.
            student_hidden_BKH = self._completion_hidden_states(unwrapped_student, inputs, input_ids, attention_mask)
        else:
            student_hidden_BKH = self._get_last_hidden_state(
                unwrapped_student, input_ids, attention_mask, logits_to_keep
            )

        student_head = loss_utils.LMHead.from_model(unwrapped_student)
        teacher_head = loss_utils.LMHead.from_model(teacher_module)
        # Only the loss positions go through the vocabulary projection: padding and excluded tokens never do.
        valid_BK = loss_mask_BK.bool()
        student_hidden_NH = student_hidden_BKH[valid_BK].to(student_head.weight.device)
        teacher_hidden_NH = teacher_hidden_BKH[valid_BK].to(teacher_head.weight.device)
        tokens_N = completion_ids_BK[valid_BK].to(student_head.weight.device)
        temperature = self.temperature
        mode = self.args.distillation_mode

        if mode == "sampled_token":
            student_logp_N, entropy_N = loss_utils.sampled_token_logprobs(
                student_hidden_NH, student_head, tokens_N, temperature
            )
            with torch.no_grad():
                teacher_logp_N, _ = loss_utils.sampled_token_logprobs(
                    teacher_hidden_NH, teacher_head, tokens_N, temperature
                )
            per_token_N = loss_utils.sampled_token_surrogate(
                student_logp_N, teacher_logp_N, self.args.sampled_token_clip, self.args.sampled_token_baseline
            )
            exact_kl_N = None
        else:
            if mode == "full_logits":
                per_token_N, entropy_N, student_logp_N, teacher_logp_N = loss_utils.full_logits_divergence(
                    student_hidden_NH, teacher_hidden_NH, student_head, teacher_head, tokens_N, self.beta,
                    temperature, self.args.loss_chunk_size,
                )  # fmt: skip
            else:
                per_token_N, entropy_N, student_logp_N, teacher_logp_N = loss_utils.chunked_divergence(
                    student_hidden_NH, teacher_hidden_NH, student_head, teacher_head, tokens_N,
                    temperature=temperature, top_k=self.args.loss_top_k, chunk_size=self.args.loss_chunk_size,
                )  # fmt: skip
            exact_kl_N = per_token_N.detach() if (mode == "topk_logits" or self.beta == 1.0) else None
            if student_logp_N is None:  # the fused kernel gives no token log-probs: two no-grad passes, for the logs
                with torch.no_grad():
                    student_logp_N, _ = loss_utils.sampled_token_logprobs(
                        student_hidden_NH.detach(), student_head, tokens_N, temperature
                    )
                    teacher_logp_N, _ = loss_utils.sampled_token_logprobs(
                        teacher_hidden_NH, teacher_head, tokens_N, temperature
                    )

        divisor = num_items_in_batch if num_items_in_batch is not None else valid_BK.sum().clamp(min=1)
        loss = per_token_N.sum() / divisor

        # Raw sums for the logs; `compute_loss` reduces them across ranks outside the wrapped forward.
        n = valid_BK.sum()
        sampled_kl_N = (student_logp_N - teacher_logp_N).detach()
        self._pending_sums = {
            "opsdl/reverse_kl": (exact_kl_N if exact_kl_N is not None else sampled_kl_N).sum(),
            "opsdl/sampled_kl_estimate": sampled_kl_N.sum(),
            "opsdl/student_logprob": student_logp_N.detach().sum(),
            "opsdl/teacher_logprob": teacher_logp_N.detach().sum(),
        }
        return loss, entropy_N.detach().sum(), n

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The parent computes the loss and logs the entropy; OPSDL adds the per-token KL and log-prob logs, and stops
        # on a non-finite loss instead of silently training on it.
        self._pending_sums = {}
        loss = super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        n = self.accelerator.gather_for_metrics(inputs["loss_mask"].sum()).sum().clamp(min=1)
        for key, value in self._pending_sums.items():
            self._metrics[mode][key].append((self.accelerator.gather_for_metrics(value).sum() / n).item())
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"The OPSDL loss is {loss.item()} at global step {self.state.global_step} (micro-step {self._step}). "
                "Lower the learning rate, check the data of this step (an empty teacher prompt?), or use fp32/bf16 "
                "instead of fp16."
            )
        return (loss, None) if return_outputs else loss

    # ---- resuming and checkpoints: the last complete checkpoint, the EMA teacher's state written first ------------

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        # The parent resolves `resume_from_checkpoint=True` to the highest-numbered `checkpoint-*` folder, even one a
        # killed save left half-written, and then crashes in it. OPSDL resolves it to the newest complete checkpoint
        # (warning about the newer, incomplete ones), refuses an incomplete explicit one, and warns when a fresh run
        # writes into a folder holding another run's checkpoints. The EMA teacher's weights are OPSDL's own state: the
        # checkpoint is remembered here and loaded by the EMA callback once training begins.
        needs_ema = self.ema_teacher is not None
        output_dir = self._get_output_dir(trial=trial)
        if resume_from_checkpoint is True:
            resume_from_checkpoint, skipped = last_complete_checkpoint(output_dir, needs_ema)
            for path, problem in skipped:
                logger.warning(f"Not resuming from {path}: {problem}. Trying the checkpoint before it.")
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True but {output_dir!r} holds no complete checkpoint"
                    + (f" ({len(skipped)} incomplete: {[p for p, _ in skipped]})" if skipped else "")
                    + ". Start without resume_from_checkpoint, or pass the path of a complete checkpoint."
                )
            logger.info(f"Resuming from {resume_from_checkpoint}, the last complete checkpoint.")
        elif resume_from_checkpoint:
            resume_from_checkpoint = str(resume_from_checkpoint)
            if not os.path.isdir(resume_from_checkpoint):
                raise FileNotFoundError(
                    f"resume_from_checkpoint={resume_from_checkpoint!r} is not a folder. Pass a checkpoint folder "
                    f"(e.g. {os.path.join(output_dir, PREFIX_CHECKPOINT_DIR + '-500')}) or True for the last one."
                )
            problem = checkpoint_problem(resume_from_checkpoint, needs_ema)
            if problem:
                raise ValueError(
                    f"Cannot resume from {resume_from_checkpoint!r}: {problem}. Pass an earlier checkpoint, or "
                    "resume_from_checkpoint=True for the last complete one."
                )
        else:
            existing = list_checkpoints(output_dir)
            if existing and self.args.should_save:
                logger.warning(
                    f"output_dir {output_dir!r} already holds {len(existing)} checkpoint(s) of another run "
                    f"({os.path.basename(existing[-1])} the newest). This run saves beside them, and a later "
                    "resume_from_checkpoint=True may pick up the old run's. Use a new output_dir, remove them, or "
                    "pass resume_from_checkpoint to continue that run."
                )
        if needs_ema:
            self.ema_teacher.resume_from = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def _save_checkpoint(self, model, trial):
        # The parent writes weights, optimizer, scheduler, RNG state, then `trainer_state.json` (which makes the
        # checkpoint count as complete), then deletes checkpoints beyond `save_total_limit`. The EMA teacher's state is
        # written first, so a save killed at any point leaves either a complete checkpoint or an incomplete one that
        # resuming skips, and the older checkpoints are only deleted once the new one holds everything.
        if self.ema_teacher is not None:
            run_dir = self._get_output_dir(trial=trial)
            checkpoint_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(checkpoint_dir, exist_ok=True)
            self.ema_teacher.save(checkpoint_dir)
        super()._save_checkpoint(model, trial)
