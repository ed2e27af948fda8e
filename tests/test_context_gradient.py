"""`context_gradient="none"`: the long prompt's keys/values as constants, pinned to a hook-based reference."""

import pytest
import torch
from peft import LoraConfig

from tests.conftest import config, generate, trainer_for
from trl_opsdl.context_cache import CONTEXT_KV_PREFIX, CONTEXT_KV_STEP


def detach_context_kv(model, context_len):
    """The reference: the plain full forward, with the key and value projections of positions 0 .. context_len-1
    detached (so no gradient flows into how the context is encoded)."""

    def hook(module, args, output):
        return torch.cat([output[:, :context_len].detach(), output[:, context_len:]], dim=1)

    return [
        module.register_forward_hook(hook)
        for name, module in model.named_modules()
        if name.endswith(("self_attn.k_proj", "self_attn.v_proj"))
    ]


def loss_and_grads(trainer, batch, context_gradient, reference=False):
    trainer.args.context_gradient = context_gradient
    model = trainer.model
    model.zero_grad()
    handles = []
    if reference:
        context_len = batch["prompt_ids"].size(1) - 1  # the prompt's positions but its last
        handles = detach_context_kv(model, context_len)
    try:
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.item(), grads


def move_student_away(trainer, scale=0.05, seed=0):
    """The student away from its teacher, so the KL and its gradients are far from float32 round-off."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * scale)


def assert_same(result, expected):
    loss, grads = result
    expected_loss, expected_grads = expected
    assert loss == pytest.approx(expected_loss, rel=1e-5, abs=1e-7)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def build(tmp_path, mode="full_logits", peft=False, **kwargs):
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if peft else None
    trainer = trainer_for(tmp_path, distillation_mode=mode, context_gradient="none", peft_config=peft_config, **kwargs)
    move_student_away(trainer)
    return trainer


@pytest.mark.parametrize(
    ("mode", "peft", "kind", "checkpointing"),
    [
        ("full_logits", False, "base", False),
        ("topk_logits", True, "base", True),
        ("sampled_token", True, "ema", False),
        ("full_logits", False, "live", True),
    ],
)
def test_none_equals_the_full_forward_with_the_context_keys_values_detached(tmp_path, mode, peft, kind, checkpointing):
    trainer = build(tmp_path, mode, peft, teacher_model_kind=kind, short_prompt_ratio=0.25)
    if checkpointing:  # as `train()` turns it on; the layers then drop a cache they are not told is read-only
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = generate(trainer)  # generation's cache is kept in the batch
    assert (batch["prompt_mask"] == 0).any(), "the rows should be left-padded"
    assert any(k.startswith(CONTEXT_KV_PREFIX) for k in batch) and CONTEXT_KV_STEP in batch

    reference = loss_and_grads(trainer, batch, "full", reference=True)
    kept = loss_and_grads(trainer, batch, "none")  # from generation's cache
    prefilled = loss_and_grads(
        trainer, {k: v for k, v in batch.items() if not k.startswith(CONTEXT_KV_PREFIX)}, "none"
    )
    assert_same(kept, reference)
    assert_same(prefilled, reference)

    # The option changes the gradient, not the loss: the plain full forward has the same loss, other gradients.
    full_loss, full_grads = loss_and_grads(trainer, batch, "full")
    assert full_loss == pytest.approx(reference[0], rel=1e-5)
    assert any(not torch.allclose(full_grads[n], reference[1][n], rtol=1e-3, atol=1e-6) for n in full_grads)


def test_the_prefill_is_the_same_in_chunks(tmp_path):
    trainer = build(tmp_path, context_prefill_chunk_size=3)
    batch = {k: v for k, v in generate(trainer).items() if not k.startswith(CONTEXT_KV_PREFIX)}
    assert batch["prompt_ids"].size(1) > 6  # several chunks
    reference = loss_and_grads(trainer, batch, "full", reference=True)
    assert_same(loss_and_grads(trainer, batch, "none"), reference)


def test_a_stale_cache_is_not_used(tmp_path):
    # Generation's keys/values are the student's only while the weights are those it generated with. After an
    # optimizer step (global_step moves on) the loss must prefill with the new weights.
    trainer = build(tmp_path)
    batch = generate(trainer)
    move_student_away(trainer, seed=1)  # the weights change after generation ...
    trainer.state.global_step += 1  # ... as an optimizer step changes them
    reference = loss_and_grads(trainer, batch, "full", reference=True)
    assert_same(loss_and_grads(trainer, batch, "none"), reference)
    # The kept (stale) keys/values would give another result: the check above can tell them apart.
    trainer.state.global_step -= 1
    stale_loss, _ = loss_and_grads(trainer, batch, "none")
    assert stale_loss != pytest.approx(reference[0], rel=1e-4)


def test_the_cache_is_used_once_and_freed(tmp_path):
    trainer = build(tmp_path)
    batch = generate(trainer)
    micro = dict(batch)
    trainer.compute_loss(trainer.model, micro)
    assert not any(k.startswith(CONTEXT_KV_PREFIX) for k in micro) and CONTEXT_KV_STEP not in micro


def test_full_keeps_no_cache(tmp_path):
    trainer = trainer_for(tmp_path)
    batch = generate(trainer)
    assert not any(k.startswith(CONTEXT_KV_PREFIX) for k in batch) and CONTEXT_KV_STEP not in batch


def test_training_with_none_learns(tmp_path):
    trainer = trainer_for(
        tmp_path,
        context_gradient="none",
        teacher_model_kind="ema",
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        short_prompt_ratio=0.5,
        max_steps=2,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(log["loss"])) for log in logs)
    moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"context_gradient": "partial"}, "context_gradient='partial' is not one of"),
        ({"context_prefill_chunk_size": 0}, "context_prefill_chunk_size=0 must be a positive"),
        ({"context_gradient": "none", "sequence_parallel_size": 2}, "sequence_parallel_size=2 has nothing to split"),
    ],
)
def test_bad_context_gradient_settings_are_refused(tmp_path, fields, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **fields)
