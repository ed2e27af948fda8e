"""Where a real-model OPSDL step's time goes, and its cost against TRL's SFTTrainer on the same sequences.

    python benchmarks/real_step_split.py                      # SmolLM2-135M-Instruct, the demo --real recipe
    python benchmarks/real_step_split.py --steps 2 --length 256 --batch-size 2   # the smallest setting

Runs `--steps` OPSDLTrainer steps with the `demo --real` recipe (its task, prompts and defaults: LoRA r=16, loss mode,
learning rate, share of short-prompt anchor rows; every long prompt at `--length` tokens) and times each phase with
`StepTimer` (experiments/step_timing.py) (generation / teacher forward / student forward+backward / optimizer); records each
row's prompt as the student read it (long, or short for an anchor row) and its sampled completion; then runs the same
number of `SFTTrainer` steps (same LoRA, batch, learning rate) on exactly those sequences, in the same process.
Prints both and the ratio, and writes a JSON.
"""

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Default: SmolLM2-135M-Instruct from PyPI (converted GGUF).")
    parser.add_argument("--task", default=None, help="As demo --real: niah_single, or squad when --squad is given.")
    parser.add_argument("--squad", default=None, help="SQuAD-format JSON (with --task squad).")
    parser.add_argument("--essays", default=None, help="A folder of .txt essays (RULER tasks; default: from PyPI).")
    parser.add_argument("--steps", type=int, default=4, help="Timed steps per trainer (the first is a warm-up).")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024, help="Long prompt tokens.")
    parser.add_argument("--completion-length", type=int, default=24)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--output", default="real_step_split.json")
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from trl_opsdl import OPSDLConfig, OPSDLTrainer
    from trl_opsdl.demo.config import RealDemoConfig
    from trl_opsdl.demo.real import prepare, train_dataset

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))  # the experiments' step timer
    from step_timing import StepTimer, host_speed

    torch.set_num_threads(args.num_threads)
    config = RealDemoConfig(model=args.model, task=args.task, squad=args.squad, essays=args.essays,
                            train_lengths=(args.length,), max_steps=args.steps, batch_size=args.batch_size,
                            num_eval_articles=1)  # one held out: no evaluation here, the rest gives prompts  # fmt: skip
    model_path, tokenizer, train_documents, _ = prepare(config, log=print)
    rows = train_dataset(config, tokenizer, train_documents)
    common = dict(max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=config.learning_rate,
                  lr_scheduler_type="constant", bf16=False, report_to="none", save_strategy="no", logging_steps=1,
                  disable_tqdm=True, dataloader_pin_memory=False, activation_checkpointing=False, seed=0)  # fmt: skip
    lora = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")

    # OPSDL, phase by phase; keep what it sampled.
    sampled = []
    timer = StepTimer()
    trainer = OPSDLTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_path), processing_class=tokenizer,
        args=OPSDLConfig(output_dir="/tmp/opsdl-split", temperature=config.temperature,
                         max_completion_length=args.completion_length, distillation_mode=config.distillation_mode,
                         short_prompt_ratio=config.short_prompt_ratio, **common),
        train_dataset=rows.select_columns(["prompt", "teacher_prompt"]),
        peft_config=LoraConfig(**lora), callbacks=[timer.callback()],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    generate = trainer._generate_and_score_completions

    def keep(inputs):
        output = generate(inputs)
        # The prompt the student read (an anchor row's is the short one, swapped in inside the trainer), as the text of
        # its chat-templated tokens; the completion as sampled.
        prompts = tokenizer.batch_decode(
            [ids_P[mask_P.bool()] for ids_P, mask_P in zip(output["prompt_ids"], output["prompt_mask"])]
        )
        texts = tokenizer.batch_decode(output["completion_ids"] * output["completion_mask"], skip_special_tokens=True)
        sampled.extend({"prompt": prompt, "completion": text} for prompt, text in zip(prompts, texts))
        return output

    trainer._generate_and_score_completions = keep
    timer.attach(trainer)
    trainer.train()
    opsdl = timer.summary()

    # SFT on the same prompts + completions, same recipe; its steps timed by a callback (forward + backward + optimizer).
    class StepClock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    clock = StepClock()
    sft = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_path), processing_class=tokenizer,
        args=SFTConfig(output_dir="/tmp/sft-split", completion_only_loss=True, max_length=None, shuffle_dataset=False,
                       **common),
        train_dataset=Dataset.from_list(sampled), peft_config=LoraConfig(**lora), callbacks=[clock],
    )  # fmt: skip
    sft.remove_callback(PrinterCallback)
    sft.train()
    sft_times = clock.times[1:] if len(clock.times) > 1 else clock.times
    sft_step = sum(sft_times) / len(sft_times)

    short_prompts = {tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                     for p in rows["teacher_prompt"]}  # fmt: skip
    training = opsdl["student_forward_backward"]["seconds"] + opsdl["optimizer"]["seconds"]
    result = {
        "model": model_path, "task": config.task, "length": args.length, "batch_size": args.batch_size,
        "distillation_mode": config.distillation_mode, "short_prompt_ratio": config.short_prompt_ratio,
        "short_rows": sum(x["prompt"] in short_prompts for x in sampled),  # anchor rows among the SFT sequences
        "completion_length": args.completion_length, "opsdl": opsdl, "sft_seconds_per_step": round(sft_step, 3),
        "ratio_opsdl_step_to_sft_step": round(opsdl["seconds_per_step"] / sft_step, 2),
        "ratio_opsdl_training_part_to_sft_step": round(training / sft_step, 2),
        "ratio_opsdl_without_generation_to_sft_step": round((opsdl["seconds_per_step"] -
                                                             opsdl["generation"]["seconds"]) / sft_step, 2),
        "host": host_speed(),  # the seconds depend on it; the ratios much less
    }  # fmt: skip
    print("| phase | seconds/step | share |\n|---|---|---|")
    for phase in StepTimer.PHASES:
        print(f"| {phase} | {opsdl[phase]['seconds']:.2f} | {100 * opsdl[phase]['share']:.0f}% |")
    print(f"| OPSDL step | {opsdl['seconds_per_step']:.2f} | 100% |")
    print(f"| SFTTrainer step, same sequences | {sft_step:.2f} | |")
    print(
        f"OPSDL / SFT step: {result['ratio_opsdl_step_to_sft_step']}x (without generation "
        f"{result['ratio_opsdl_without_generation_to_sft_step']}x; student fwd+bwd+optimizer alone "
        f"{result['ratio_opsdl_training_part_to_sft_step']}x)"
    )
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
