"""Train a tiny model for a few steps and record the losses: the body of the two-process tests.

Launched by `tests/test_multiprocess.py` under `accelerate launch` (two gloo processes on CPU: DDP, ZeRO-2 or
ZeRO-3) and also called in-process with one process for the reference losses. Each run trains every case named on
the command line one after the other in the same processes, so one launch covers all the teacher kinds:

    ACCELERATE_USE_CPU=1 accelerate launch --config_file examples/accelerate_configs/ddp.yaml --num_processes 2 \
        --mixed_precision no tests/dist_worker.py --model_dir /tmp/tiny --out_dir /tmp/out --cases base_peft,base,live

Everything here that exists only to run DeepSpeed on CPU (the gloo process group made before the config, the
`use_configured_state` flag, the ZeRO-3 persistence threshold) stays in this file, not in the library.
"""

import argparse
import json
import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests.utils` and `trl_opsdl` when launched as a file

# Cases: name -> (trainer, teacher, use PEFT). "opsdl" trains OPSDLTrainer with the self-teacher of that kind;
# "distillation" trains TRL's DistillationTrainer against a separate teacher folder (the harness' own check).
CASES = {
    "base_peft": ("opsdl", "base", True),
    "base": ("opsdl", "base", False),
    "live": ("opsdl", "live", False),
    "ema": ("opsdl", "ema", False),
    "ema_peft": ("opsdl", "ema", True),
    "distill": ("distillation", "teacher", False),
    "distill_peft": ("distillation", "teacher", True),
    # The long prompt's keys/values without gradient: generation's cache, kept and split with the batch on each rank
    "base_peft_context_none": ("opsdl", "base", True),
    "ema_context_none": ("opsdl", "ema", False),
}
CONTEXT_NONE_CASES = {"base_peft_context_none", "ema_context_none"}
GLOBAL_BATCH = 4  # rows per optimizer step, whatever the process count
NUM_ROWS = 8
MAX_COMPLETION_LENGTH = 6
LEARNING_RATE = 0.1


def _deepspeed_on_cpu() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _setup_process_group():
    # DeepSpeed under `accelerate launch` on CPU: without a gloo PartialState made before the config, every rank
    # thinks it is alone and DeepSpeed asserts on the batch size (see the host notes, "Several processes on CPU").
    if _deepspeed_on_cpu():
        from accelerate import PartialState

        PartialState(backend="gloo")


def _make_args(
    trainer_kind: str,
    teacher: str,
    output_dir: str,
    num_processes: int,
    steps: int,
    optim: str,
    context_gradient="full",
):
    from accelerate.state import AcceleratorState

    # Each case builds its own Accelerator; keep the process group, drop the previous case's DeepSpeed plugin.
    AcceleratorState._reset_state(reset_partial_state=False)
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=GLOBAL_BATCH // num_processes,
        gradient_accumulation_steps=1,
        max_steps=steps,
        # Plain SGD (the default) without clipping: the update is proportional to the gradient, so a wrong gradient
        # scale (a normalization off by the process count) shows in step 2. Adam and clipping would both hide it.
        optim=optim,
        max_grad_norm=0.0,
        learning_rate=LEARNING_RATE,
        max_completion_length=MAX_COMPLETION_LENGTH,
        generation_kwargs={"do_sample": False},  # greedy: the same completions in every layout
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        seed=0,
        disable_dropout=True,
        beta=1.0,
    )
    if _deepspeed_on_cpu():
        common["accelerator_config"] = {"use_configured_state": True}
    if trainer_kind == "opsdl":
        from trl_opsdl import OPSDLConfig

        args = OPSDLConfig(teacher_model_kind=teacher, context_gradient=context_gradient, **common)
    else:
        from trl import DistillationConfig

        args = DistillationConfig(**common)
    if args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3:
        # Below this many elements ZeRO-3 keeps a parameter whole on every rank: with the default (1e5) a tiny
        # model is never partitioned and the test would not exercise ZeRO-3 at all.
        args.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return args


def run_case(name: str, model_dir: str, out_dir: str, num_processes: int, steps: int = 2, optim: str = "sgd") -> dict:
    """Train case `name` for `steps` steps, save the model, return the logged losses and what the run saw."""
    from datasets import Dataset
    from peft import LoraConfig

    from tests.conftest import kv_rows, tiny_tokenizer

    trainer_kind, teacher, use_peft = CASES[name]
    case_dir = os.path.join(out_dir, name)
    context_gradient = "none" if name in CONTEXT_NONE_CASES else "full"
    args = _make_args(trainer_kind, teacher, case_dir, num_processes, steps, optim, context_gradient)
    dataset = Dataset.from_list(kv_rows(NUM_ROWS, seed=0))
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if use_peft else None
    kwargs = dict(
        model=model_dir, args=args, train_dataset=dataset, processing_class=tiny_tokenizer(), peft_config=peft_config
    )
    if trainer_kind == "opsdl":
        from trl_opsdl import OPSDLTrainer

        trainer = OPSDLTrainer(**kwargs)
    else:
        from trl import DistillationTrainer

        trainer = DistillationTrainer(teacher_model=os.path.join(model_dir, "teacher"), **kwargs)

    trainer.train()
    partitioned = False
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        # A partitioned ZeRO-3 parameter is an empty placeholder outside a gather context (its shard lives in
        # `ds_tensor`); with the persistence threshold at 0 every parameter, LoRA included, must be one.
        partitioned = all(p.numel() == 0 and hasattr(p, "ds_tensor") for p in trainer.model.parameters())
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trainer.save_model(os.path.join(case_dir, "model"))
    result = {
        "losses": losses,
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        "partitioned": partitioned,
    }
    trainer.accelerator.wait_for_everyone()
    del trainer
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="Folder written by `save_models`.")
    parser.add_argument("--out_dir", required=True, help="Where each case saves its model, and results.json.")
    parser.add_argument("--cases", required=True, help=f"Comma-separated, from {list(CASES)}.")
    parser.add_argument("--steps", type=int, default=2)
    # ZeRO with optimizer offload swaps any optimizer for DeepSpeed's CPU Adam (accelerate does), so comparing
    # zero3_offload.yaml against one process needs Adam on both sides: `--optim adamw_torch`.
    parser.add_argument("--optim", default="sgd")
    args = parser.parse_args(argv)

    _setup_process_group()
    import torch

    torch.set_num_threads(1)  # two processes on two shared cores
    from accelerate import PartialState

    results = {}
    for name in args.cases.split(","):
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        results[name] = run_case(name, args.model_dir, args.out_dir, world_size, args.steps, args.optim)
    state = PartialState()
    if state.is_main_process:
        with open(os.path.join(args.out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    state.wait_for_everyone()
    # A clean exit after ZeRO-3 on CPU: destroy the process group ourselves.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def save_models(path) -> str:
    """Write the student (`path`) and a different teacher (`path/teacher`) for the cases above."""
    import torch

    from tests.conftest import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    for seed, folder in ((0, path), (1, os.path.join(path, "teacher"))):
        model = tiny_model(tokenizer, seed=seed)
        with torch.no_grad():  # sharpen the random next-token distributions, so that the KL is far from zero
            model.lm_head.weight.mul_(30.0)
        model.save_pretrained(folder)
    tokenizer.save_pretrained(path)
    return str(path)


if __name__ == "__main__":
    main()
