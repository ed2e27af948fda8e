"""What one OPSDL training step costs, against a hand-written floor: time per step and peak memory, on CPU.

A small Llama-shaped model (4 layers, hidden 256, vocabulary 32K, random weights) trains on one row per step: a long
prompt of L tokens, a teacher prompt of L/8 tokens (the last eighth of the long one) and a fixed completion of C
tokens. Completions are fixed token ids, not generated: generation is left out of every figure (in the trainers,
`_generate_single_turn` is replaced by a function returning the fixed ids), so the steps compare the training work
only. Variants, each run in its own process:

  floor             a hand-written PyTorch step: no-grad teacher forward on short prompt + completion, student
                    forward + backward on long prompt + completion, `lm_head` and reverse KL on the C completion
                    positions only, gradient clipping, AdamW step.
  naive             the same step written the obvious way: full-sequence student and teacher logits
                    (`model(ids).logits`, (L+C) x V and (L/8+C) x V), sliced to the completion afterwards.
  trl_distillation  TRL's `DistillationTrainer` (reverse KL, beta=1) with a separate teacher of the same size that
                    reads the long prompt (what one would run today without OPSDL).
  opsdl             `OPSDLTrainer`, `teacher_model_kind="live"`: the floor's teacher (the model's own weights under
                    no-grad on the short prompt): no copy of the weights.
  opsdl_base        (optional) `OPSDLTrainer` with the default `base` teacher without PEFT: a frozen copy of the
                    weights, i.e. the floor plus one model in memory.
  opsdl_gc          (optional) `opsdl` with gradient checkpointing (TRL's default): less memory, more time.
  opsdl_sac         (optional) `opsdl` with `activation_checkpointing_policy="selective"`: the outputs of matmuls
                    and attention are kept, only elementwise ops are recomputed (trl_opsdl.checkpointing).

Time: the median, over the measured steps of every repeat, of the time between the ends of two consecutive optimizer
steps (everything a step does: data, tokenization, forwards, backward, optimizer, logging), after `--warmup`
unmeasured steps; both wall time and the process's CPU time. The PASS/FAIL lines use CPU time: on a machine shared with
other jobs, wall time measures the neighbours too. Memory: the peak resident set size (VmHWM from /proc/self/status,
reset through /proc/self/clear_refs after the imports) minus the resident size right after the imports: weights,
gradients, AdamW state, teacher and activations, without the Python and library baseline. Each process runs with
glibc's MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back to the OS and RSS follows the live tensors. Variants
are interleaved (one process per variant, length and repeat, in rotating order) so that a slow spell of the machine
hits them all. The run prints a hash of the trainer's sources and warns if they changed while it ran.

    python benchmarks/step_cost.py                                  # 1K, 2K, 4K, 8K; 3 repeats (~35 min, 2 cores)
    python benchmarks/step_cost.py --lengths 1024,2048 --repeats 1  # a quick look
    python benchmarks/step_cost.py --variants floor,opsdl,opsdl_base --json results.json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests.tiny_models`, the tests' tiny-model factory


VARIANTS = ("floor", "naive", "trl_distillation", "opsdl", "opsdl_base", "opsdl_gc", "opsdl_sac")
DEFAULT_VARIANTS = ("floor", "naive", "trl_distillation", "opsdl")
VOCAB_SIZE = 32_000
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]


# ---- the model, the tokenizer and the rows (identical in every variant) -----------------------------------------


def build_model(seed: int, max_length: int):
    from tests.tiny_models import tiny_llama  # the tests' tiny-Llama factory

    model_kwargs = dict(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, vocab_size=VOCAB_SIZE)
    return tiny_llama(None, seed, max_position_embeddings=max_length, tie_word_embeddings=False,
                      attn_implementation="sdpa", **model_kwargs)  # fmt: skip


def build_tokenizer():
    """A word-level tokenizer of 32K words `w4`..`w31999`: a prompt of n words is exactly n tokens."""
    from tests.tiny_models import word_level_tokenizer

    return word_level_tokenizer([f"w{i}" for i in range(len(SPECIAL_TOKENS), VOCAB_SIZE)])


def make_rows(length: int, completion_length: int, num_rows: int, seed: int = 0):
    """Rows of token ids: prompt (length), teacher prompt (its last length/8 tokens), completion (no special ids)."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        prompt = [rng.randrange(len(SPECIAL_TOKENS), VOCAB_SIZE) for _ in range(length)]
        completion = [rng.randrange(len(SPECIAL_TOKENS), VOCAB_SIZE) for _ in range(completion_length)]
        rows.append({"prompt": prompt, "teacher_prompt": prompt[-(length // 8) :], "completion": completion})
    return rows


def as_text(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


# ---- memory -----------------------------------------------------------------------------------------------------


TRAINER_SOURCES = ("__init__.py", "opsdl_config.py", "opsdl_trainer.py", "loss_utils.py", "teacher.py")


def source_hash() -> str:
    """A short hash of the `trl_opsdl` modules a training step runs, so a run that straddles an edit shows it."""
    import hashlib

    import trl_opsdl

    digest = hashlib.sha256()
    root = os.path.dirname(trl_opsdl.__file__)
    for name in TRAINER_SOURCES:
        with open(os.path.join(root, name), "rb") as f:
            digest.update(name.encode() + f.read())
    return digest.hexdigest()[:12]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS; returns the current RSS in kB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


# ---- the hand-written steps ---------------------------------------------------------------------------------------


def reverse_kl(student_logits, teacher_logits):
    """Mean over positions of KL(student || teacher), from (..., V) logits."""
    import torch.nn.functional as F

    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.float(), dim=-1)
    return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1).mean()


def hand_written_loop(variant, model, rows, on_step_end) -> list[float]:
    """Train one step per row; returns the losses."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    losses = []
    for row in rows:
        C = len(row["completion"])
        long_ids = torch.tensor([row["prompt"] + row["completion"]])
        short_ids = torch.tensor([row["teacher_prompt"] + row["completion"]])
        if variant == "floor":
            # Hidden states at the C positions that predict the completion, projected to the vocabulary there only.
            with torch.no_grad():
                teacher_hidden = model.model(input_ids=short_ids, use_cache=False).last_hidden_state[:, -C - 1 : -1]
                teacher_logits = model.lm_head(teacher_hidden)
            student_hidden = model.model(input_ids=long_ids, use_cache=False).last_hidden_state[:, -C - 1 : -1]
            student_logits = model.lm_head(student_hidden)
        else:  # naive: the whole sequence goes through lm_head, then the completion is sliced out
            with torch.no_grad():
                teacher_logits = model(input_ids=short_ids, use_cache=False).logits[:, -C - 1 : -1]
            student_logits = model(input_ids=long_ids, use_cache=False).logits[:, -C - 1 : -1]
        loss = reverse_kl(student_logits, teacher_logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the trainers do (max_grad_norm=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        on_step_end()
    return losses


# ---- the trainers --------------------------------------------------------------------------------------------------


def trainer_loop(variant, model, rows, on_step_end, max_length, output_dir) -> list[float]:
    """Train one step per row with the variant's trainer; returns the logged losses."""
    from datasets import Dataset
    from transformers import TrainerCallback

    tokenizer = build_tokenizer()
    completions = {tuple(row["prompt"]): row["completion"] for row in rows}
    dataset = Dataset.from_list(
        [{"prompt": as_text(row["prompt"]), "teacher_prompt": as_text(row["teacher_prompt"])} for row in rows]
    )
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        max_steps=len(rows),
        max_completion_length=len(rows[0]["completion"]),
        learning_rate=1e-5,
        optim="adamw_torch",
        beta=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        disable_dropout=True,
        use_cpu=True,
        shuffle_dataset=False,
        disable_tqdm=True,
    )

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            on_step_end()

    if variant == "trl_distillation":
        from trl import DistillationConfig, DistillationTrainer

        teacher = build_model(seed=1, max_length=max_length)
        trainer = DistillationTrainer(
            model=model, teacher_model=teacher, args=DistillationConfig(**common), train_dataset=dataset,
            processing_class=tokenizer, callbacks=[StepEnd()],
        )  # fmt: skip
    else:
        from trl_opsdl import OPSDLConfig, OPSDLTrainer

        kind = "base" if variant == "opsdl_base" else "live"
        if variant in ("opsdl_gc", "opsdl_sac"):
            common["gradient_checkpointing"] = True
        if variant == "opsdl_sac":
            common["activation_checkpointing_policy"] = "selective"
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the warning about 'live' collapsing: irrelevant to a cost measurement
            args = OPSDLConfig(teacher_model_kind=kind, **common)
        trainer = OPSDLTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[StepEnd()]
        )

    def fixed_completions(prompt_ids, images, multimodal_fields, has_tool_images=False):
        # Generation left out: the completion of each row, looked up by its prompt ids.
        return [list(completions[tuple(ids)]) for ids in prompt_ids]

    trainer._generate_single_turn = fixed_completions
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# ---- one variant in one process -----------------------------------------------------------------------------------


def run_worker(variant, length, completion_length, warmup, steps, threads):
    # Every variant imports the same modules before the memory baseline is taken, so library code is not counted.
    import datasets  # noqa: F401
    import tokenizers  # noqa: F401
    import torch
    import transformers
    from trl import DistillationConfig, DistillationTrainer  # noqa: F401

    from trl_opsdl import OPSDLConfig, OPSDLTrainer  # noqa: F401

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    max_length = length + completion_length
    rows = make_rows(length, completion_length, warmup + steps)
    library = source_hash()
    baseline_kb = reset_peak_rss()

    step_ends = []
    model = build_model(seed=0, max_length=max_length)
    on_step_end = lambda: step_ends.append((time.perf_counter(), time.process_time()))  # noqa: E731
    if variant in ("floor", "naive"):
        losses = hand_written_loop(variant, model, rows, on_step_end)
    else:
        with tempfile.TemporaryDirectory() as output_dir:
            losses = trainer_loop(variant, model, rows, on_step_end, max_length, output_dir)
    peak_kb = _status_kb("VmHWM")
    if len(step_ends) != warmup + steps:
        raise RuntimeError(f"{variant}: {len(step_ends)} steps ran, expected {warmup + steps}")
    pairs = list(zip(step_ends[warmup - 1 : -1], step_ends[warmup:]))
    return {
        "step_times": [b[0] - a[0] for a, b in pairs],
        "cpu_times": [b[1] - a[1] for a, b in pairs],
        "peak_mb": (peak_kb - baseline_kb) / 1024,
        "trl_opsdl_sources": library,
        "losses": losses,
    }


# ---- the driver -----------------------------------------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return f"{model}, {os.cpu_count()} cores, {mem_gb:.0f} GiB, Python {platform.python_version()}, torch {torch.__version__}"


def run_variant(variant, length, args) -> dict:
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", variant, "--lengths", str(length),
        "--completion_length", str(args.completion_length), "--warmup", str(args.warmup), "--steps", str(args.steps),
        "--threads", str(args.threads),
    ]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")]
    )
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"{variant} at {length} tokens failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="Long-prompt lengths in tokens.")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"Comma-separated, from {VARIANTS}.")
    parser.add_argument("--repeats", type=int, default=3, help="Processes per (variant, length), interleaved.")
    parser.add_argument("--completion_length", type=int, default=256, help="Fixed completion tokens per row.")
    parser.add_argument("--warmup", type=int, default=1, help="Unmeasured steps per process (at least 1).")
    parser.add_argument("--steps", type=int, default=2, help="Measured steps per process.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process.")
    parser.add_argument("--json", help="Also write the raw results here.")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.variants = [v for v in args.variants.split(",") if v]
    for variant in args.variants:
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if "floor" not in args.variants:
        parser.error("--variants must include 'floor': every figure is reported as a ratio to it")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: a step is timed from the end of the previous one")
    return args


def summarize(results, variants, lengths) -> dict:
    """Median wall time, CPU time and peak memory per (variant, length), with their ratios to the floor."""
    summary = {}
    for length in lengths:
        floor = results[("floor", length)]
        floor_wall, floor_cpu = statistics.median(floor["step_times"]), statistics.median(floor["cpu_times"])
        floor_mem = statistics.median(floor["peak_mb"])
        for variant in variants:
            r = results[(variant, length)]
            wall, cpu, mem = (statistics.median(r[k]) for k in ("step_times", "cpu_times", "peak_mb"))
            summary[f"{variant}@{length}"] = {
                "wall_s": wall, "cpu_s": cpu, "peak_mb": mem,
                "wall_x_floor": wall / floor_wall, "cpu_x_floor": cpu / floor_cpu, "mem_x_floor": mem / floor_mem,
            }  # fmt: skip
    return summary


def checks(summary, variants, lengths) -> list[tuple[str, bool, str]]:
    """The targets of the issue, on CPU time (see the module docstring) and peak memory, for each OPSDL variant run;
    then, per length, the OPSDL configurations that meet every target there (a user picks one per length: no
    checkpointing when the activations fit, selective checkpointing when memory is what matters)."""
    out = []
    longest = max(lengths)
    met = {length: [] for length in lengths}
    for variant in (v for v in variants if v.startswith("opsdl")):
        for length in lengths:
            s = summary[f"{variant}@{length}"]
            verdicts = [
                (f"{variant} <= 1.10x floor in time at {length}", s["cpu_x_floor"] <= 1.10, f"{s['cpu_x_floor']:.2f}x"),
                (f"{variant} <= 1.10x floor in memory at {length}", s["mem_x_floor"] <= 1.10, f"{s['mem_x_floor']:.2f}x"),
            ]  # fmt: skip
            if "trl_distillation" in variants:
                ratio = summary[f"trl_distillation@{length}"]["cpu_s"] / s["cpu_s"]
                verdicts.append((f"{variant} faster than TRL distillation at {length}", ratio > 1.0, f"{ratio:.2f}x"))
            if "naive" in variants and length == longest:
                ratio = summary[f"naive@{length}"]["peak_mb"] / s["peak_mb"]
                verdicts.append(
                    (f"{variant} >= 3x less peak memory than naive at {length}", ratio >= 3.0, f"{ratio:.2f}x")
                )
            out += verdicts
            if all(ok for _, ok, _ in verdicts):
                met[length].append(variant)
    for length in lengths:
        out.append(
            (
                f"an OPSDL configuration meets every target at {length}",
                bool(met[length]),
                ", ".join(met[length]) or "none",
            )
        )
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        out = run_worker(args.worker, args.lengths[0], args.completion_length, args.warmup, args.steps, args.threads)
        print(json.dumps(out))
        return 0

    print(f"machine: {machine()}")
    print(
        f"model: 4 layers, hidden 256, vocab {VOCAB_SIZE}, fp32; batch 1; completion {args.completion_length} tokens; "
        f"teacher prompt = prompt/8; {args.threads} thread(s)/process; {args.repeats} repeat(s) x {args.steps} steps "
        f"after {args.warmup} warmup"
    )
    keys = ("step_times", "cpu_times", "peak_mb")
    results = {(v, n): {k: [] for k in keys} for v in args.variants for n in args.lengths}
    sources = set()
    start = time.time()
    for repeat in range(args.repeats):
        for i, length in enumerate(args.lengths):
            shift = (repeat + i) % len(args.variants)  # rotate the order so no variant always runs first
            for variant in args.variants[shift:] + args.variants[:shift]:
                out = run_variant(variant, length, args)
                r = results[(variant, length)]
                r["step_times"] += out["step_times"]
                r["cpu_times"] += out["cpu_times"]
                r["peak_mb"].append(out["peak_mb"])
                sources.add(out["trl_opsdl_sources"])
                print(
                    f"  [{time.time() - start:6.0f}s] repeat {repeat + 1} {length:>5} {variant:<17} "
                    f"wall {statistics.median(out['step_times']):7.3f} s  cpu {statistics.median(out['cpu_times']):7.3f} s"
                    f"  {out['peak_mb']:8.1f} MB",
                    flush=True,
                )

    summary = summarize(results, args.variants, args.lengths)
    print()
    if len(sources) > 1:
        print(f"WARNING: the trainer's sources changed during the run ({len(sources)} versions): rerun to compare.")
    print(f"trl_opsdl trainer sources ({', '.join(TRAINER_SOURCES)}): {', '.join(sorted(sources))}")
    print("Per step (median); memory: peak RSS above the post-import baseline. Ratios: to the floor at that length.")
    print("| length | variant | wall s | x floor | CPU s | x floor | peak MB | x floor |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        for variant in args.variants:
            s = summary[f"{variant}@{length}"]
            print(
                f"| {length} | {variant} | {s['wall_s']:.3f} | {s['wall_x_floor']:.2f} | {s['cpu_s']:.3f} | "
                f"{s['cpu_x_floor']:.2f} | {s['peak_mb']:.0f} | {s['mem_x_floor']:.2f} |"
            )
    verdicts = checks(summary, args.variants, args.lengths)
    if verdicts:
        print()
        for name, ok, value in verdicts:
            print(f"{'PASS' if ok else 'FAIL'}  {name}: {value}")
    if args.json:
        raw = {f"{v}@{n}": r for (v, n), r in results.items()}
        with open(args.json, "w") as f:
            record = {"machine": machine(), "args": vars(args), "trl_opsdl_sources": sorted(sources)}
            json.dump({**record, "summary": summary, "raw": raw}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
