"""`context_gradient="full"` against `"none"`: time per OPSDL step and peak activation memory, side by side, on CPU.

SmolLM2-135M's shape (30 layers, hidden 576, 9 query / 3 key-value heads, MLP 1536, vocabulary 49,152; random
weights), LoRA r=16 on every linear layer, the `base` teacher (the adapter off), `topk_logits` — the real demo's
recipe — on one row per step: a long prompt of L tokens, a teacher prompt of L/8 tokens, and a completion of exactly C
generated tokens (end tokens suppressed). Generation is part of every step: with `"none"` its prompt cache is what the
student's completion forward attends to. Variants, each in its own process, interleaved:

  full          the student's forward and backward over the whole prompt + completion (the default).
  none          the prompt's keys/values kept from generation; forward and backward over the completion only.
  none_prefill  (optional) `none` with generation's cache thrown away, so the loss prefills the context without
                gradient (what runs after vLLM generation, which keeps no cache here).

Time: the median wall and CPU time of the measured steps (from the end of one optimizer step to the end of the next:
generation, teacher, student, backward, optimizer), after `--warmup` steps. Memory: the peak resident set during the
measured steps minus the resident set just before them (weights, LoRA and AdamW state are then allocated): what a step
adds on top of the model — activations, generation's cache, the teacher's forward. Each process runs with glibc's
MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go back to the OS. `host_speed` (fp32 matmul GFLOP/s) is printed beside
the figures: compare timings within one run only.

    python benchmarks/context_gradient_cost.py                          # 1K, 4K, 8K (~30 min on 2 cores)
    python benchmarks/context_gradient_cost.py --lengths 1024 --json r.json
    python benchmarks/context_gradient_cost.py --variants full,none,none_prefill --lengths 4096
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_cost import _status_kb, as_text, build_tokenizer, machine, reset_peak_rss  # noqa: E402


VARIANTS = ("full", "none", "none_prefill")
DEFAULT_VARIANTS = ("full", "none")
# SmolLM2-135M(-Instruct)'s config.json
SMOLLM2_135M = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
)  # fmt: skip


def build_model(max_length: int, layers: int | None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = {**SMOLLM2_135M, "num_hidden_layers": layers or SMOLLM2_135M["num_hidden_layers"]}
    config = LlamaConfig(**shape, max_position_embeddings=max_length, attn_implementation="sdpa")
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 2, 3, 0
    return LlamaForCausalLM(config)


def make_rows(length: int, num_rows: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        prompt = [rng.randrange(4, 32_000) for _ in range(length)]
        rows.append({"prompt": as_text(prompt), "teacher_prompt": as_text(prompt[-max(1, length // 8) :])})
    return rows


def host_speed() -> dict:
    """fp32 matmul GFLOP/s of this process, as the experiments' step timer measures it."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    from step_timing import host_speed as measure

    return measure()


def run_worker(variant, length, completion_length, warmup, steps, threads, layers):
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from transformers import TrainerCallback

    from trl_opsdl import OPSDLConfig, OPSDLTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    torch.set_num_threads(threads)
    model = build_model(length + completion_length + 8, layers)
    dataset = datasets.Dataset.from_list(make_rows(length, warmup + steps))
    marks = {}

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.setdefault("ends", []).append((time.perf_counter(), time.process_time()))
            if len(marks["ends"]) == warmup:  # weights, LoRA and optimizer state now allocated
                marks["steady_kb"] = reset_peak_rss()

    args = OPSDLConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1, max_steps=warmup + steps,
        max_completion_length=completion_length, generation_kwargs={"min_new_tokens": completion_length},
        temperature=0.7, learning_rate=3e-4, distillation_mode="topk_logits", context_gradient=variant.split("_")[0],
        logging_steps=1, save_strategy="no", report_to="none", bf16=False, gradient_checkpointing=False,
        use_cpu=True, shuffle_dataset=False, disable_tqdm=True,
    )  # fmt: skip
    trainer = OPSDLTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=build_tokenizer(), callbacks=[StepEnd()],
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )  # fmt: skip
    if variant == "none_prefill":
        trainer._context_kv_from_generation = lambda kept, prompt_width: {}
    trainer.train()
    peak_kb = _status_kb("VmHWM")
    ends = marks["ends"]
    pairs = list(zip(ends[warmup - 1 : -1], ends[warmup:]))
    completion_lengths = [e.get("completions/mean_length") for e in trainer.state.log_history if "loss" in e]
    return {
        "step_times": [b[0] - a[0] for a, b in pairs],
        "cpu_times": [b[1] - a[1] for a, b in pairs],
        "peak_mb": (peak_kb - marks["steady_kb"]) / 1024,
        "completion_lengths": completion_lengths,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
    }


def run_variant(variant, length, args) -> dict:
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", variant, "--lengths", str(length),
        "--completion_length", str(args.completion_length), "--warmup", str(args.warmup), "--steps", str(args.steps),
        "--threads", str(args.threads), "--layers", str(args.layers or 0),
    ]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")]
    )
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"{variant} at {length} tokens failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def summarize(results, variants, lengths) -> dict:
    """Median step time (wall, CPU) and peak memory per (variant, length), and their ratios full / variant."""
    summary = {}
    for length in lengths:
        rows = {}
        for variant in variants:
            runs = [r for r in results if r["variant"] == variant and r["length"] == length]
            rows[variant] = {
                "step_s": statistics.median(t for r in runs for t in r["step_times"]),
                "cpu_s": statistics.median(t for r in runs for t in r["cpu_times"]),
                "peak_mb": statistics.median(r["peak_mb"] for r in runs),
            }
        for variant in variants:
            if variant != "full" and "full" in rows:
                rows[variant]["speedup"] = rows["full"]["step_s"] / rows[variant]["step_s"]
                rows[variant]["cpu_speedup"] = rows["full"]["cpu_s"] / rows[variant]["cpu_s"]
                rows[variant]["memory_ratio"] = rows["full"]["peak_mb"] / max(rows[variant]["peak_mb"], 1e-9)
        summary[length] = rows
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,8192", help="Long-prompt lengths in tokens.")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"Comma-separated, from {VARIANTS}.")
    parser.add_argument("--repeats", type=int, default=1, help="Processes per (variant, length), interleaved.")
    parser.add_argument("--completion_length", type=int, default=64, help="Generated tokens per row.")
    parser.add_argument("--warmup", type=int, default=1, help="Unmeasured steps per process (at least 1).")
    parser.add_argument("--steps", type=int, default=1, help="Measured steps per process.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process.")
    parser.add_argument("--layers", type=int, default=None, help="Fewer layers than SmolLM2's 30 (tests only).")
    parser.add_argument("--json", help="Also write the raw results and the summary here.")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.variants = [v for v in args.variants.split(",") if v]
    for variant in args.variants:
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if "full" not in args.variants:
        parser.error("--variants must include 'full': every figure is reported as a ratio to it")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1: a step is timed from the end of the previous one")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        result = run_worker(
            args.worker, args.lengths[0], args.completion_length, args.warmup, args.steps, args.threads, args.layers
        )
        print(json.dumps(result))
        return 0
    speed = host_speed()
    print(f"machine: {machine()}; host_speed {speed}", flush=True)
    results = []
    for repeat in range(args.repeats):
        for length in args.lengths:
            order = args.variants[repeat % len(args.variants) :] + args.variants[: repeat % len(args.variants)]
            for variant in order:
                result = {"variant": variant, "length": length, **run_variant(variant, length, args)}
                results.append(result)
                print(
                    f"  {variant:>12} L={length:>5}: step {statistics.median(result['step_times']):7.1f} s, "
                    f"peak +{result['peak_mb']:7.0f} MB, completions {result['completion_lengths']}",
                    flush=True,
                )
    summary = summarize(results, args.variants, args.lengths)
    print(
        "\n| L | variant | step (s) | CPU (s) | peak (MB) | full / variant: time | memory |\n|---|---|---|---|---|---|---|"
    )
    for length, rows in summary.items():
        for variant, row in rows.items():
            ratios = f"{row['speedup']:.2f}x | {row['memory_ratio']:.2f}x" if "speedup" in row else "1 | 1"
            print(
                f"| {length} | {variant} | {row['step_s']:.1f} | {row['cpu_s']:.1f} | {row['peak_mb']:.0f} | {ratios} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "host_speed": speed, "args": vars(args), "summary": summary,
                       "results": results}, f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
