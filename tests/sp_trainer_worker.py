"""OPSDLTrainer with sequence parallelism, one process or two under `accelerate launch` (DDP on CPU, gloo).

    ACCELERATE_USE_CPU=1 accelerate launch --config_file examples/accelerate_configs/ddp.yaml --num_processes 2 \
        tests/sp_trainer_worker.py OUT_DIR MODEL_DIR 2

With `sequence_parallel_size=2` the sequence-parallel group trains on its first rank's generation batch, the student
forward split across the group. Every row of the dataset is the same, so one process (no sequence parallelism) trains
on the same sequences as the group: greedy generation, plain SGD without clipping, and the logged losses and saved
weights must agree.
"""

import json
import os
import sys


SP_SIZE = 2
ROWS = 8


def run(out_dir: str, model_dir: str, num_processes: int) -> None:
    from datasets import Dataset

    from tests.conftest import kv_rows, tiny_tokenizer
    from trl_opsdl import OPSDLConfig, OPSDLTrainer

    row = kv_rows(1, seed=3)[0]
    args = OPSDLConfig(
        output_dir=out_dir,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=2,
        optim="sgd",
        max_grad_norm=0.0,
        learning_rate=0.1,
        max_completion_length=8,
        generation_kwargs={"do_sample": False},
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        seed=0,
        sequence_parallel_size=SP_SIZE if num_processes > 1 else 1,
    )
    trainer = OPSDLTrainer(
        model=model_dir,
        args=args,
        train_dataset=Dataset.from_list([row] * ROWS),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    weights = {k: v.tolist() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
    rank = trainer.accelerator.process_index
    with open(os.path.join(out_dir, f"result_{num_processes}_{rank}.json"), "w") as f:
        json.dump({"losses": losses, "weights": weights}, f)
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]))
