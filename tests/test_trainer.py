"""OPSDLTrainer end to end on a tiny model: teacher inputs, accumulation, teacher kinds, checkpoints, model card."""

import copy
import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl.trainer.utils import split_tensor_dict

from tests.conftest import config, generate, kv_rows, save_tiny, tiny_model, tiny_tokenizer, trainer_for
from trl_opsdl import OPSDLTrainer
from trl_opsdl.teacher import EMA_STATE_FILE


def test_teacher_sees_short_prompt_and_the_same_completion(tmp_path):
    trainer = trainer_for(tmp_path)
    batch = generate(trainer)
    tokenizer = trainer.processing_class
    for b in range(4):
        prompt = tokenizer.decode(batch["prompt_ids"][b][batch["prompt_mask"][b].bool()])
        teacher_prompt = tokenizer.decode(batch["teacher_prompt_ids"][b][batch["teacher_prompt_mask"][b].bool()])
        row = trainer.train_dataset[b]
        # The tokenizer trap of the host notes would drop content words and make these identical.
        assert prompt != teacher_prompt
        assert prompt == row["prompt"] and teacher_prompt == row["teacher_prompt"]
    # One completion tensor serves both forwards: the teacher scores exactly the tokens the student sampled.
    assert "teacher_completion_ids" not in batch
    assert batch["teacher_prompt_ids"].size(1) < batch["prompt_ids"].size(1)


def test_kl_is_zero_when_the_teacher_prompt_is_the_prompt(tmp_path):
    rows = [{**row, "teacher_prompt": row["prompt"]} for row in kv_rows(8)]
    trainer = trainer_for(tmp_path, rows=rows, max_steps=1)
    with pytest.warns(UserWarning, match="as long as or longer than the prompt"):
        trainer.train()
    logs = trainer.state.log_history[0]
    assert abs(logs["opsdl/reverse_kl"]) < 1e-6
    assert logs["opsdl/teacher_not_shorter"] == 4


def test_loss_and_gradients_do_not_depend_on_the_accumulation_split(tmp_path):
    trainer = trainer_for(tmp_path)
    batch = generate(trainer, n=8)
    model = trainer.model
    with torch.no_grad():  # move the student away from the teacher so the KL is far from float32 round-off
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)

    def loss_and_grads(chunks):
        model.zero_grad()
        total = 0.0
        for chunk in split_tensor_dict(batch, chunks):
            loss = trainer.compute_loss(model, chunk)
            loss.backward()
            total += loss.item()
        return total, [p.grad.clone() for p in model.parameters()]

    loss_1x8, grads_1x8 = loss_and_grads(1)
    loss_4x2, grads_4x2 = loss_and_grads(4)
    assert loss_1x8 > 0
    assert loss_4x2 == pytest.approx(loss_1x8, rel=1e-5)
    for g1, g4 in zip(grads_1x8, grads_4x2):
        torch.testing.assert_close(g1, g4, rtol=1e-4, atol=1e-7)


def test_training_with_accumulation_4x1_equals_1x4(tmp_path):
    results = []
    for batch_size, accumulation in ((4, 1), (1, 4)):
        tokenizer = tiny_tokenizer()
        trainer = trainer_for(
            tmp_path / f"{batch_size}x{accumulation}",
            tokenizer=tokenizer,
            teacher_model=tiny_model(tokenizer, seed=1),  # a KL far from float32 round-off
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            shuffle_dataset=False,
        )
        trainer.train()
        results.append(
            (trainer.state.log_history[0]["loss"], [p.detach().clone() for p in trainer.model.parameters()])
        )
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a > 0.005
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["full_logits", "sampled_token", "topk_logits"])
def test_each_mode_trains_and_logs(tmp_path, mode):
    trainer = trainer_for(tmp_path, distillation_mode=mode, max_steps=2)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = trainer.state.log_history[0]
    for key in (
        "opsdl/reverse_kl",
        "opsdl/student_logprob",
        "opsdl/teacher_logprob",
        "entropy",
        "completions/mean_length",
        "completions/clipped_ratio",
        "opsdl/prompt_length",
        "opsdl/teacher_prompt_length",
        "opsdl/teacher_to_prompt_ratio",
        "opsdl/truncated_prompts",
    ):
        assert key in logs, key
    assert logs["opsdl/teacher_to_prompt_ratio"] < 0.5
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_peft_base_teacher_is_the_adapter_free_model(tmp_path):
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = trainer_for(tmp_path, peft_config=lora)
    assert trainer.teacher_model is None  # no copy: the same weights with adapters disabled
    batch = generate(trainer)
    model = trainer.model
    k = batch["completion_ids"].size(1)
    teacher_hidden, _ = trainer._teacher_hidden_states(model, batch, k)
    ids = torch.cat([batch["teacher_prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["teacher_prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        with model.disable_adapter():
            expected = model.base_model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        with_adapter = model.base_model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(teacher_hidden, expected[:, :-1][:, -k:])
    assert not torch.allclose(teacher_hidden, with_adapter[:, :-1][:, -k:])


def test_live_teacher_warns_and_uses_current_weights(tmp_path):
    with pytest.warns(UserWarning, match="collapse"):
        trainer = trainer_for(tmp_path, teacher_model_kind="live")
    assert trainer.teacher_model is None and trainer.teacher_kind == "live"
    batch = generate(trainer)
    _, module = trainer._teacher_hidden_states(trainer.model, batch, batch["completion_ids"].size(1))
    assert module is trainer.model


def test_base_teacher_without_peft_is_a_frozen_copy_that_does_not_alias_the_student(tmp_path):
    model = tiny_model(tiny_tokenizer())
    initial = copy.deepcopy(model)
    trainer = trainer_for(tmp_path, model=model, max_steps=2)
    trainer.train()
    assert all(not p.requires_grad for p in trainer.teacher_model.parameters())
    # Training moves the student only: the teacher still holds the initial weights.
    for before, after in zip(initial.parameters(), trainer.teacher_model.parameters(), strict=True):
        assert torch.equal(before, after)
    assert any(not torch.equal(a, b) for a, b in zip(initial.parameters(), trainer.model.parameters()))


@pytest.mark.parametrize("use_peft", [False, True])
def test_ema_teacher_update_and_checkpoint_round_trip(tmp_path, use_peft):
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if use_peft else None
    trainer = trainer_for(
        tmp_path,
        teacher_model_kind="ema",
        teacher_update_rate=0.5,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        peft_config=lora,
    )
    start = [t.clone() for t in trainer.ema_teacher.state_dict()]
    trainer.train()
    saved = torch.load(os.path.join(tmp_path, "checkpoint-2", EMA_STATE_FILE))
    current = trainer.ema_teacher.state_dict()
    assert len(saved) == len(current) == len(start) > 0
    for s, c in zip(saved, current):
        torch.testing.assert_close(s, c)
    assert any(not torch.equal(a, b) for a, b in zip(start, current))  # the EMA moved with the student

    # Resume: a fresh trainer restores the EMA teacher from the checkpoint, not from its own initial weights.
    at_step_1 = torch.load(os.path.join(tmp_path, "checkpoint-1", EMA_STATE_FILE))
    resumed = trainer_for(
        tmp_path, teacher_model_kind="ema", teacher_update_rate=0.5, max_steps=2, save_strategy="no", peft_config=lora
    )
    loaded = {}
    original = resumed.ema_teacher.load_state_dict
    resumed.ema_teacher.load_state_dict = lambda tensors: (loaded.setdefault("t", tensors), original(tensors))
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-1"))
    for a, b in zip(loaded["t"], at_step_1):
        torch.testing.assert_close(a, b)


def test_ema_update_rule(tmp_path):
    trainer = trainer_for(tmp_path, teacher_model_kind="ema", teacher_update_rate=0.1)
    teacher0 = [t.clone() for t in trainer.ema_teacher.state_dict()]
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    trainer.ema_teacher.on_step_end(trainer.args, trainer.state, trainer.control)
    for before, after, student in zip(teacher0, trainer.ema_teacher.state_dict(), trainer.model.parameters()):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * student.detach())


def test_model_card_cites_opsdl(tmp_path):
    trainer = trainer_for(tmp_path)
    trainer.create_model_card(model_name="tiny-opsdl")
    card = open(os.path.join(tmp_path, "README.md")).read()
    assert "OPSDL" in card and "2604.17535" in card
    assert "opsdl" in trainer.model.model_tags


def test_model_loads_from_a_local_path(tmp_path):
    path = save_tiny(tmp_path / "model")
    trainer = trainer_for(tmp_path / "out", model=path, max_steps=1)
    trainer.train()
    assert trainer.teacher_model is not None
    trainer.save_model(str(tmp_path / "saved"))
    assert os.path.isfile(tmp_path / "saved" / "model.safetensors")


def test_conversational_prompts(tmp_path):
    trainer = trainer_for(tmp_path, rows=kv_rows(8, conversational=True), max_steps=1)
    trainer.train()
    batch = generate(trainer)
    teacher_text = trainer.processing_class.decode(batch["teacher_prompt_ids"][0], skip_special_tokens=False)
    assert "assistant :" in teacher_text  # the chat template with its generation prompt was applied


def test_truncation_policies_cut_and_count(tmp_path):
    for policy in ("middle", "left"):
        trainer = trainer_for(tmp_path, max_prompt_length=20, truncation_policy=policy, max_steps=1)
        batch = generate(trainer)
        assert batch["prompt_mask"].sum(1).max() == 20
        trainer.train()
        assert trainer.state.log_history[0]["opsdl/truncated_prompts"] == 4
    trainer = trainer_for(tmp_path, max_prompt_length=20, truncation_policy="left")
    batch = generate(trainer, n=1)
    ids = batch["prompt_ids"][0][batch["prompt_mask"][0].bool()]
    full = trainer.processing_class(trainer.train_dataset[0]["prompt"])["input_ids"]
    assert ids.tolist() == full[-20:]


def test_short_prompt_ratio_replaces_student_prompts(tmp_path):
    trainer = trainer_for(tmp_path, short_prompt_ratio=1.0)
    batch = generate(trainer)
    torch.testing.assert_close(batch["prompt_ids"], batch["teacher_prompt_ids"])


def fixed_completions(trainer, completion):
    """Replace the parent's generation by `completion` (token ids) for every prompt."""
    trainer._generate_single_turn = lambda prompt_ids, *args, **kwargs: [list(completion) for _ in prompt_ids]


@pytest.mark.parametrize("exclude", [True, False])
def test_exclude_eos_from_loss_masks_end_tokens(tmp_path, exclude):
    trainer = trainer_for(tmp_path, exclude_eos_from_loss=exclude)
    tokenizer = trainer.processing_class
    words = tokenizer.convert_tokens_to_ids(["w1", "w2"])
    fixed_completions(trainer, [*words, tokenizer.eos_token_id])  # two words, then the end token
    batch = generate(trainer)
    assert batch["completion_mask"].sum().item() == 4 * 3  # the end token is a completion token ...
    is_eos = batch["completion_ids"] == tokenizer.eos_token_id
    assert is_eos.sum().item() == 4
    # ... which the trainer leaves out of the loss, and out of the count that normalizes it, when asked to.
    assert (batch["loss_mask"][is_eos] == (0 if exclude else 1)).all()
    assert batch["num_items_in_batch"].item() == 4 * (2 if exclude else 3)
    assert torch.isfinite(trainer.compute_loss(trainer.model, batch))


def test_all_completions_empty_give_zero_loss_not_nan(tmp_path):
    trainer = trainer_for(tmp_path, exclude_eos_from_loss=True)
    batch = generate(trainer)
    eos = trainer.processing_class.eos_token_id
    # Every completion is a lone end token, which is excluded: no loss token anywhere.
    batch["completion_ids"] = torch.full_like(batch["completion_ids"][:, :1], eos)
    batch["completion_mask"] = torch.ones_like(batch["completion_ids"])
    batch["loss_mask"] = torch.zeros_like(batch["completion_ids"])
    batch["num_items_in_batch"] = torch.tensor(0)
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == 0.0
    loss.backward()
    # No completion column at all (a backend that returned nothing).
    for key in ("completion_ids", "completion_mask", "loss_mask"):
        batch[key] = batch[key][:, :0]
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == 0.0 and not torch.isnan(loss)


def test_explicit_teacher_model(tmp_path):
    tokenizer = tiny_tokenizer()
    teacher = tiny_model(tokenizer, seed=1, hidden_size=64)  # wider is fine: only the vocabulary must match
    trainer = trainer_for(tmp_path, tokenizer=tokenizer, teacher_model=teacher, max_steps=1)
    assert trainer.teacher_kind == "explicit"
    trainer.train()
    assert trainer.state.log_history[0]["opsdl/reverse_kl"] > 0


def test_evaluate_reports_the_kl_on_an_eval_set(tmp_path):
    tokenizer = tiny_tokenizer()
    trainer = OPSDLTrainer(
        model=tiny_model(tokenizer),
        args=config(tmp_path, per_device_eval_batch_size=4),
        train_dataset=Dataset.from_list(kv_rows(8)),
        eval_dataset=Dataset.from_list(kv_rows(4, seed=1)),
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0
    assert metrics["eval_opsdl/reverse_kl"] == pytest.approx(metrics["eval_loss"], rel=1e-4)
