"""Every input a user can get wrong gets an error that names the value and says what to do (or a counted warning)."""

import pytest
import torch
from datasets import Dataset
from trl import DistillationConfig

from tests.conftest import config, generate, kv_rows, tiny_model, tiny_tokenizer, trainer_for
from trl_opsdl import OPSDLConfig, OPSDLTrainer
from trl_opsdl.opsdl_config import default_bf16
from trl_opsdl.opsdl_trainer import row_problem
from trl_opsdl.teacher import frozen_copy


def test_missing_columns(tmp_path):
    rows = [{"prompt": r["prompt"]} for r in kv_rows(4)]
    with pytest.raises(ValueError, match="no 'teacher_prompt' column"):
        trainer_for(tmp_path, rows=rows)
    rows = [{"teacher_prompt": r["teacher_prompt"]} for r in kv_rows(4)]
    with pytest.raises(ValueError, match="no 'prompt' column"):
        trainer_for(tmp_path, rows=rows)
    rows = [{"prompt": r["prompt"], "short": r["teacher_prompt"]} for r in kv_rows(4)]
    trainer_for(tmp_path, rows=rows, teacher_prompt_column="short")  # the column name is configurable


def _set(rows, index, column, value):
    rows[index][column] = value
    return rows


# Each bad row sits deep in the data (row 6 of 8), where only a check of every row finds it before training.
BAD_ROWS = [
    ("teacher None", False, "teacher_prompt", None, "row 6 has a 'teacher_prompt' that is None"),
    ("teacher empty", False, "teacher_prompt", "", "row 6 has an empty or whitespace-only 'teacher_prompt'"),
    ("teacher spaces", False, "teacher_prompt", "  \n ", "row 6 has an empty or whitespace-only 'teacher_prompt'"),
    ("prompt empty", False, "prompt", "", "row 6 has an empty or whitespace-only 'prompt'"),
    ("prompt None", False, "prompt", None, "row 6 has a 'prompt' that is None"),
    # Arrow fills a key missing from one message with None.
    ("no content", True, "prompt", [{"role": "user"}], "row 6 has a 'prompt' whose message 0 has empty content"),
    (
        "no role",
        True,
        "teacher_prompt",
        [{"content": "a"}],
        "row 6 has a 'teacher_prompt' whose message 0 has no role",
    ),
    ("empty content", True, "prompt", [{"role": "user", "content": " "}], "message 0 has empty content"),
    ("no messages", True, "teacher_prompt", [], "row 6 has an empty message list as 'teacher_prompt'"),
]


@pytest.mark.parametrize(
    "conversational,column,value,match", [case[1:] for case in BAD_ROWS], ids=[case[0] for case in BAD_ROWS]
)
def test_bad_rows_are_refused_before_training_naming_the_dataset_row(tmp_path, conversational, column, value, match):
    dataset = Dataset.from_list(_set(kv_rows(8, conversational=conversational), 6, column, value))
    with pytest.raises(ValueError, match=match) as error:
        OPSDLTrainer(model=tiny_model(tiny_tokenizer()), args=config(tmp_path), train_dataset=dataset,
                     processing_class=tiny_tokenizer())  # fmt: skip
    assert str(error.value).startswith("train_dataset row 6 ")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "value,match",
    [
        ("key a \udcff ?", "not valid UTF-8 text (surrogates not allowed at character 6)"),  # Arrow cannot hold it
        ([{"role": "user", "content": "a"}, "b"], "message 1 is not a dict with 'role' and 'content' (it has str)"),
        (
            [{"role": "user", "text": "a"}],
            "message 0 is not a dict with 'role' and 'content' (it has ['role', 'text'])",
        ),
        (3, "a 'prompt' that is 3 (int), not text or a message list"),
    ],
)
def test_row_problems_arrow_cannot_hold(value, match):
    # Rows from a Python list, a torch dataset or an iterable one reach the same check without Arrow's schema.
    assert match in row_problem(value, "'prompt'")


def test_bad_row_in_an_eval_dataset_names_the_split(tmp_path):
    eval_rows = _set(kv_rows(4), 3, "teacher_prompt", " ")
    with pytest.raises(ValueError, match="^eval_dataset row 3 has an empty or whitespace-only 'teacher_prompt'"):
        OPSDLTrainer(model=tiny_model(tiny_tokenizer()), args=config(tmp_path), processing_class=tiny_tokenizer(),
                     train_dataset=Dataset.from_list(kv_rows(8)), eval_dataset=Dataset.from_list(eval_rows))  # fmt: skip


def test_tokenizer_without_eos_token(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = None  # a pad token is still set
    with pytest.raises(ValueError, match=r"no eos token \(eos_token=None; pad_token='<pad>'\)"):
        trainer_for(tmp_path, tokenizer=tokenizer, model=tiny_model(tiny_tokenizer()))


@pytest.mark.parametrize(
    "field", ["max_completion_length", "per_device_train_batch_size", "per_device_eval_batch_size",
              "gradient_accumulation_steps"],
)  # fmt: skip
@pytest.mark.parametrize("value", [0, -2])
def test_counts_must_be_positive_naming_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"^{field}={value} must be a positive integer"):
        config(tmp_path, **{field: value})


def test_dataset_smaller_than_one_generation_batch(tmp_path):
    # 3 rows, a generation batch of 4 x 2 accumulation steps = 8: the parent would train 0 steps and report success.
    with pytest.raises(ValueError, match=r"train_dataset has 3 rows, fewer than one generation batch of 8"):
        trainer_for(tmp_path, rows=kv_rows(3), gradient_accumulation_steps=2)


def test_rows_beyond_the_last_generation_batch_are_counted(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        trainer_for(tmp_path, rows=kv_rows(10))  # generation batch 4: 2 rows per epoch unused
    assert (
        "2 rows of each epoch" in caplog.text and "10 rows, not a multiple of the generation batch (4)" in caplog.text
    )


def test_prompt_and_teacher_prompt_of_different_formats(tmp_path):
    rows = kv_rows(4)
    conversational = kv_rows(4, conversational=True)
    mixed = [{**r, "teacher_prompt": c["teacher_prompt"]} for r, c in zip(rows, conversational)]
    with pytest.raises(ValueError, match="'prompt' is plain text but 'teacher_prompt' is conversational"):
        trainer_for(tmp_path, rows=mixed)


def test_conversational_prompt_must_end_with_a_user_turn(tmp_path):
    rows = kv_rows(4, conversational=True)
    rows[0]["prompt"] = rows[0]["prompt"] + [{"role": "assistant", "content": "a"}]
    with pytest.raises(ValueError, match="ends with a 'assistant' turn"):
        trainer_for(tmp_path, rows=rows)


def test_teacher_prompt_longer_than_prompt_warns_and_counts(tmp_path):
    rows = [{**r, "teacher_prompt": r["prompt"] + " key a value 1 ."} for r in kv_rows(8)]
    trainer = trainer_for(tmp_path, rows=rows, max_steps=1)
    with pytest.warns(UserWarning, match="4 of 4 rows"):
        trainer.train()
    assert trainer.state.log_history[0]["opsdl/teacher_not_shorter"] == 4


def test_overlong_prompt_under_error_policy(tmp_path):
    trainer = trainer_for(tmp_path, max_prompt_length=10)
    with pytest.raises(ValueError, match=r"prompt has \d+ tokens, more than max_prompt_length=10"):
        generate(trainer)
    trainer = trainer_for(tmp_path, max_teacher_prompt_length=3)
    with pytest.raises(ValueError, match="max_teacher_prompt_length=3"):
        generate(trainer)


def test_tokenizer_without_pad_token_falls_back_to_eos(tmp_path):
    tokenizer = tiny_tokenizer(pad=False)
    trainer = trainer_for(tmp_path, tokenizer=tokenizer, model=tiny_model(tiny_tokenizer()), max_steps=1)
    assert trainer.processing_class.pad_token == trainer.processing_class.eos_token
    trainer.train()


def test_tokenizer_without_pad_or_eos(tmp_path):
    tokenizer = tiny_tokenizer(pad=False)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        trainer_for(tmp_path, tokenizer=tokenizer, model=tiny_model(tiny_tokenizer()))


def test_conversational_data_needs_a_chat_template(tmp_path):
    with pytest.raises(ValueError, match="no chat template"):
        trainer_for(tmp_path, rows=kv_rows(4, conversational=True), tokenizer=tiny_tokenizer(chat_template=False))


def test_sampled_token_and_topk_need_beta_one(tmp_path):
    for mode in ("sampled_token", "topk_logits"):
        with pytest.raises(ValueError, match="beta=0.5"):
            config(tmp_path, distillation_mode=mode, beta=0.5)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("teacher_model_kind", "frozen", "teacher_model_kind='frozen'"),
        ("distillation_mode", "kl", "distillation_mode='kl'"),
        ("truncation_policy", "right", "truncation_policy='right'"),
        ("teacher_update_rate", 1.5, "teacher_update_rate=1.5"),
        ("teacher_update_rate", 0.0, "teacher_update_rate=0.0"),
        ("loss_top_k", 0, "loss_top_k=0"),
        ("max_prompt_length", 0, "max_prompt_length=0"),
        ("short_prompt_ratio", 2.0, "short_prompt_ratio=2.0"),
        ("sampled_token_clip", -1.0, "sampled_token_clip=-1.0"),
        ("sampled_token_baseline", "batch", "sampled_token_baseline='batch'"),
    ],
)
def test_config_rejects_bad_values(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **{field: value})


def test_distillation_config_is_refused_with_the_fix(tmp_path):
    tokenizer = tiny_tokenizer()
    with pytest.raises(TypeError, match="needs an OPSDLConfig"):
        OPSDLTrainer(
            model=tiny_model(tokenizer),
            args=DistillationConfig(output_dir=str(tmp_path), bf16=False, report_to="none"),
            train_dataset=Dataset.from_list(kv_rows(4)),
            processing_class=tokenizer,
        )


def test_explicit_teacher_with_live_kind(tmp_path):
    tokenizer = tiny_tokenizer()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="explicit teacher_model"):
        trainer_for(tmp_path, tokenizer=tokenizer, teacher_model=tiny_model(tokenizer), teacher_model_kind="live")


def test_explicit_teacher_with_another_vocabulary(tmp_path):
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="vocab_size"):
        trainer_for(tmp_path, tokenizer=tokenizer, teacher_model=tiny_model(tokenizer, vocab_size=len(tokenizer) + 7))


def test_base_teacher_under_zero3_without_a_path(tmp_path):
    trainer = trainer_for(tmp_path)
    model = tiny_model(tiny_tokenizer())
    model.config._name_or_path = ""
    for p in model.parameters():
        p.ds_id = 0  # what ZeRO-3 leaves on a sharded parameter: a deepcopy would copy empty shards
    with pytest.raises(ValueError, match="no path to reload it from"):
        frozen_copy(model, trainer.args, trainer.accelerator)


def test_non_finite_loss(tmp_path):
    trainer = trainer_for(tmp_path)
    batch = generate(trainer)
    with torch.no_grad():
        trainer.model.model.embed_tokens.weight.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="at global step 0"):
        trainer.compute_loss(trainer.model, batch)


@pytest.mark.parametrize("cuda, bf16_capable", [(False, False), (True, False), (True, True)])
def test_bf16_default_follows_the_hardware(monkeypatch, cuda, bf16_capable):
    # bf16 only where a CUDA device supports it: an older GPU without bf16 must not get the parent's `True`.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_capable)
    assert default_bf16(fp16=False) is (cuda and bf16_capable)
    assert default_bf16(fp16=True) is False


def test_bf16_default_on_this_machine():
    assert OPSDLConfig(output_dir="x", report_to="none").bf16 is default_bf16(fp16=False)


def test_selective_checkpointing_needs_non_reentrant_checkpointing(tmp_path):
    with pytest.raises(ValueError, match="activation_checkpointing_policy='partial'"):
        config(tmp_path, activation_checkpointing_policy="partial")
    with pytest.raises(ValueError, match="needs gradient_checkpointing=True"):
        config(tmp_path, activation_checkpointing_policy="selective", gradient_checkpointing=False)
    with pytest.raises(ValueError, match="use_reentrant=True"):
        config(
            tmp_path,
            activation_checkpointing_policy="selective",
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": True},
        )


def test_selective_checkpointing_with_peft_under_zero3(tmp_path):
    from types import SimpleNamespace

    from peft import LoraConfig

    tokenizer = tiny_tokenizer()
    args = config(tmp_path, activation_checkpointing_policy="selective", gradient_checkpointing=True)
    args.deepspeed_plugin = SimpleNamespace(zero_stage=3)  # what `deepspeed=<ZeRO-3 config>` leaves on the args
    with pytest.raises(ValueError, match="not available with PEFT under DeepSpeed ZeRO-3"):
        OPSDLTrainer(
            model=tiny_model(tokenizer),
            args=args,
            train_dataset=Dataset.from_list(kv_rows(4)),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        )


def test_bad_row_in_an_iterable_dataset_is_named_by_its_place_in_the_stream(tmp_path):
    from datasets import IterableDataset

    rows = _set(kv_rows(8), 6, "teacher_prompt", " ")
    dataset = IterableDataset.from_generator(lambda: iter(rows))
    tokenizer = tiny_tokenizer()
    args = config(tmp_path, max_steps=4)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps < 7  # row 6 is never batch row 6
    trainer = OPSDLTrainer(model=tiny_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
    # TRL shuffles the stream (buffered) and repeats it per accumulation window; the error still names row 6 of the
    # stream as given, not its place in the generation batch that holds it.
    with pytest.raises(
        ValueError,
        match=r"train_dataset \(streamed; checked at global step \d\): row 6 has an empty or whitespace-only",
    ):
        trainer.train()


def test_a_streamed_dataset_trains_and_a_bad_streamed_eval_row_is_named(tmp_path):
    from datasets import IterableDataset

    tokenizer = tiny_tokenizer()
    train = IterableDataset.from_generator(lambda: iter(kv_rows(8)))
    bad_eval = _set(kv_rows(4), 3, "prompt", "")
    args = config(tmp_path, max_steps=2, eval_strategy="no")
    trainer = OPSDLTrainer(
        model=tiny_model(tokenizer),
        args=args,
        train_dataset=train,
        eval_dataset=IterableDataset.from_generator(lambda: iter(bad_eval)),
        processing_class=tokenizer,
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))  # the row-number column is harmless
    with pytest.raises(ValueError, match=r"eval_dataset \(streamed; checked at global step 2\): row 3 has an empty"):
        trainer.evaluate()
