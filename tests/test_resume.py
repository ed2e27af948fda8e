"""Resuming equals the uninterrupted run: same losses after the resume point, same final weights (bit for bit).

A matrix sampled over teacher kind (base / LoRA / ema / ema+LoRA / live) x resume point (inside epoch 0 / past it)
x gradient accumulation (1 / 2) x `short_prompt_ratio` (0 / 0.5): each group trains once, saving every step, and is
resumed from two checkpoints. Hazards: TRL's sampler replaying epoch 0's order after a resume past it, and the anchor
rows of `short_prompt_ratio` drawn from a micro-step counter that restarts at 0.
"""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from tests.conftest import kv_rows, tiny_model, tiny_tokenizer, trainer_for


# (teacher kind, LoRA, gradient accumulation steps, short_prompt_ratio). 8 rows at per-device batch 2: an epoch is 4
# optimizer steps at accumulation 1, 2 at accumulation 2. Every group resumes inside epoch 0 and past it.
GROUPS = [
    ("base", False, 1, 0.0),
    ("base", True, 1, 0.0),
    ("base", True, 2, 0.5),
    ("ema", False, 2, 0.0),
    ("ema", True, 1, 0.5),
    ("live", False, 1, 0.5),
    ("live", False, 2, 0.0),
    ("ema", False, 2, 0.5),
]
STEPS = {1: (6, (2, 5)), 2: (4, (1, 3))}  # accumulation -> (total steps, (resume inside epoch 0, past it))


def _trainer(output_dir, kind, lora, accumulation, ratio, save):
    tokenizer = tiny_tokenizer()
    return trainer_for(
        output_dir,
        rows=kv_rows(8),
        model=tiny_model(tokenizer),
        tokenizer=tokenizer,
        teacher_model_kind=kind,
        teacher_update_rate=0.5,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if lora else None,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        short_prompt_ratio=ratio,
        max_steps=STEPS[accumulation][0],
        save_strategy="steps" if save else "no",
        save_steps=1,
    )


def _losses_after(trainer, step):
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e and e["step"] > step]


def _weights(trainer):
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    if trainer.ema_teacher is not None:
        weights += trainer.ema_teacher.state_dict()
    return weights


@pytest.mark.filterwarnings("ignore:teacher_model_kind='live'")
@pytest.mark.parametrize(
    "kind,lora,accumulation,ratio", GROUPS, ids=[f"{k}-lora{int(x)}-ga{g}-r{r}" for k, x, g, r in GROUPS]
)
def test_resume_equals_the_uninterrupted_run(tmp_path, kind, lora, accumulation, ratio):
    full = _trainer(tmp_path, kind, lora, accumulation, ratio, save=True)
    full.train()
    total, resume_points = STEPS[accumulation]
    assert full.state.global_step == total and full.state.epoch > 1  # the run crosses an epoch boundary
    for step in resume_points:
        resumed = _trainer(tmp_path, kind, lora, accumulation, ratio, save=False)
        resumed.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{step}"))
        # Tolerance: none. Same process, same ops in the same order on CPU: the arithmetic is identical.
        assert _losses_after(resumed, step) == _losses_after(full, step), f"losses after resuming at step {step}"
        for a, b in zip(_weights(resumed), _weights(full), strict=True):
            assert torch.equal(a, b), f"weights after resuming at step {step}"


def test_each_epoch_has_its_own_order_and_epoch_0_is_trls(tmp_path):
    from trl.trainer.utils import RepeatSampler

    from trl_opsdl.resume import EpochRepeatSampler

    kwargs = dict(data_source=list(range(12)), mini_repeat_count=1, batch_size=4, repeat_count=2, seed=7)
    trl_order = list(RepeatSampler(**kwargs))
    sampler = EpochRepeatSampler(**kwargs)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] == trl_order and orders[1] != orders[0] and orders[2] not in orders[:2]
    fresh = EpochRepeatSampler(**kwargs)  # a resumed run's new sampler, told the epoch it resumes in
    fresh.set_epoch(2)
    assert list(fresh) == orders[2]
    # The Trainer reaches the sampler through accelerate's loader: each epoch of a run is told its number (without it,
    # every epoch would replay epoch 0's order, and resuming would be exact for the wrong reason).
    seen = []
    original = EpochRepeatSampler.set_epoch
    EpochRepeatSampler.set_epoch = lambda self, epoch: (seen.append(epoch), original(self, epoch))
    try:
        trainer = trainer_for(tmp_path, max_steps=5)  # 8 rows, batch 4: 2 steps an epoch, into epoch 2
        trainer.train()
    finally:
        EpochRepeatSampler.set_epoch = original
    assert isinstance(trainer._get_train_sampler(), EpochRepeatSampler) and sorted(set(seen)) == [0, 1, 2]


# ---- crash safety: a real training process killed at each point of a save --------------------------------------------


@pytest.fixture
def one_thread():
    # The killed run is a separate process with one thread; the reference runs here must do the same arithmetic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from tests.crash_worker import crash_trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trainer = crash_trainer(str(tmp_path_factory.mktemp("uninterrupted")), save=False)
    trainer.train()
    torch.set_num_threads(threads)
    return _weights(trainer)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["ema", "weights", "optimizer", "state", "rotate"])
def test_sigkill_during_a_save_resumes_to_the_uninterrupted_weights(
    tmp_path, point, uninterrupted, one_thread, caplog
):

    from tests.crash_worker import KILL_AT_STEP, crash_trainer

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(
        [sys.executable, "-m", "tests.crash_worker", str(tmp_path), point],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    checkpoints = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    # save_total_limit=1: the previous checkpoint is deleted only once the new one is complete.
    assert checkpoints == [f"checkpoint-{KILL_AT_STEP - 1}", f"checkpoint-{KILL_AT_STEP}"]

    resumed = crash_trainer(str(tmp_path), save=False)
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=True)
    if point == "rotate":  # the new checkpoint was complete
        assert "Not resuming from" not in caplog.text
    else:
        assert f"Not resuming from {tmp_path / f'checkpoint-{KILL_AT_STEP}'}" in caplog.text
    for a, b in zip(_weights(resumed), uninterrupted, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda d: None, "holds no complete checkpoint"),
        (lambda d: (d / "checkpoint-5").mkdir(), r"holds no complete checkpoint \(1 incomplete"),
    ],
    ids=["no checkpoint", "only an empty one"],
)
def test_resume_true_without_a_complete_checkpoint(tmp_path, make, match):
    make(tmp_path)
    with pytest.raises(ValueError, match=match):
        trainer_for(tmp_path).train(resume_from_checkpoint=True)


def test_resume_from_an_incomplete_or_missing_path_names_it(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(ValueError, match="checkpoint-2': no trainer_state.json"):
        trainer_for(tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    with pytest.raises(FileNotFoundError, match="checkpoint-9' is not a folder"):
        trainer_for(tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-9"))


def test_a_fresh_run_into_a_folder_with_checkpoints_warns(tmp_path, caplog):

    (tmp_path / "checkpoint-40").mkdir()
    with caplog.at_level(logging.WARNING):
        trainer_for(tmp_path, max_steps=1).train()
    assert "already holds 1 checkpoint(s) of another run (checkpoint-40 the newest)" in caplog.text


def test_ema_state_is_written_before_the_checkpoint_is_complete(tmp_path):
    from transformers import TrainerState

    from trl_opsdl.teacher import EMA_STATE_FILE

    trainer = trainer_for(tmp_path, teacher_model_kind="ema", max_steps=1, save_strategy="steps", save_steps=1)
    seen = {}
    original = TrainerState.save_to_json

    def spy(self, json_path):
        seen["ema_first"] = os.path.isfile(os.path.join(os.path.dirname(json_path), EMA_STATE_FILE))
        return original(self, json_path)

    TrainerState.save_to_json = spy
    try:
        trainer.train()
    finally:
        TrainerState.save_to_json = original
    assert seen == {"ema_first": True}


@pytest.mark.slow
def test_cli_train_resume_true_skips_a_half_written_checkpoint(tmp_path, caplog):
    import json

    from tests.conftest import save_tiny
    from trl_opsdl.cli import main

    model = save_tiny(tmp_path / "tiny")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in kv_rows(8)))
    out = tmp_path / "run"
    argv = ["train", "--model_name_or_path", model, "--dataset_name", str(data), "--output_dir", str(out),
            "--bf16", "False", "--report_to", "none", "--per_device_train_batch_size", "4", "--max_completion_length",
            "4", "--save_steps", "1", "--gradient_checkpointing", "False"]  # fmt: skip
    assert main(argv + ["--max_steps", "2"]) == 0
    (out / "checkpoint-2" / "trainer_state.json").unlink()  # as a save killed before its end leaves it
    with caplog.at_level(logging.WARNING):
        assert main(argv + ["--max_steps", "3", "--resume_from_checkpoint", "True"]) == 0
    assert f"Not resuming from {out / 'checkpoint-2'}: no trainer_state.json" in caplog.text
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
