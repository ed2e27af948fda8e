"""Measure the peak CPU memory of OPSDL training steps and compare it with `trl-opsdl plan`.

    python benchmarks/planner_calibration.py                       # the default shapes, OPSDLTrainer
    python benchmarks/planner_calibration.py --shapes 1024x128 8192x128 --step manual --no-gradient-checkpointing

The model is the cost benchmark's small model (4 layers, hidden 256, 4 heads / 2 key-value heads, intermediate 512,
vocab 32000, random weights, fp32); the teacher prompt is an eighth of the prompt; batch 1; teacher `base` without
PEFT (a frozen copy). Each shape runs in its own process (`--worker`), two training steps, so the second runs with the
optimizer states already allocated (the steady state the planner predicts).

What is measured (`--measure tensors`, the default): the peak of live torch CPU tensor bytes during `trainer.train()`
(generation included), i.e. the bytes live before it (every tensor reachable from the garbage collector, each storage
once) plus the largest running sum of the allocation/free events recorded by `torch.profiler` with
`profile_memory=True`. `--measure rss` instead reports peak RSS minus the RSS after the imports, before the model is
built: it adds what is not a tensor (the trainer's Python objects, the dataset, allocator caches), and glibc keeps freed
blocks unless `MALLOC_MMAP_THRESHOLD_=65536` is set (this script sets it for its workers; without it RSS overstated the
hand-written step's peak by up to 26% here).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests.tiny_models`, the tests' tiny-model factory


SMALL_MODEL = {
    "vocab_size": 32000,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 16384,
    "tie_word_embeddings": False,
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensor_bytes() -> int:
    import gc

    import torch

    storages = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        except Exception:  # noqa: BLE001 - some objects refuse inspection; they hold no tensor storage
            continue
    return sum(storages.values())


def _profiled_peak(fn) -> int:
    """Largest running sum of the tensor allocations and frees `fn` makes (bytes above the level at its start)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def _word_tokenizer(vocab_size: int):
    from tests.tiny_models import SPECIAL_TOKENS, word_level_tokenizer

    return word_level_tokenizer([f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))])


def _small_model():
    """`SMALL_MODEL`, randomly initialised with seed 0, from the tests' tiny-Llama factory."""
    from tests.tiny_models import tiny_llama

    m = SMALL_MODEL
    return tiny_llama(
        None, 0, hidden_size=m["hidden_size"], num_layers=m["num_hidden_layers"], num_heads=m["num_attention_heads"],
        num_kv_heads=m["num_key_value_heads"], intermediate_size=m["intermediate_size"], vocab_size=m["vocab_size"],
        max_position_embeddings=m["max_position_embeddings"], tie_word_embeddings=m["tie_word_embeddings"],
    )  # fmt: skip


def _worker(prompt_length, completion_length, gradient_checkpointing, step, measure, output_dir):
    """One measurement, in this process: prints a JSON line."""
    import torch

    torch.set_num_threads(1)
    import copy
    import random

    from datasets import Dataset
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    import tests.tiny_models  # noqa: F401 - the factories' imports come before the memory baseline too
    from trl_opsdl import OPSDLConfig, OPSDLTrainer

    rss_before = _rss_bytes()  # after the imports: their code and data are no part of a training step

    teacher_length = prompt_length // 8
    model = _small_model()
    config = model.config
    if step == "trainer":
        tokenizer = _word_tokenizer(config.vocab_size)  # its special ids are the model's (`tiny_llama`)
        rng = random.Random(0)
        words = [f"w{i}" for i in range(config.vocab_size - 4)]
        rows = []
        for _ in range(2):
            prompt = rng.choices(words, k=prompt_length)
            rows.append({"prompt": " ".join(prompt), "teacher_prompt": " ".join(prompt[-teacher_length:])})
        args = OPSDLConfig(
            output_dir=output_dir,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=1,
            max_steps=2,
            max_completion_length=completion_length,
            # every completion is exactly `completion_length` tokens long, as the planner assumes
            generation_kwargs={"min_new_tokens": completion_length},
            gradient_checkpointing=gradient_checkpointing,
            bf16=False,
            report_to="none",
            logging_steps=1,
            save_strategy="no",
            use_cpu=True,
        )
        trainer = OPSDLTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
        )
        run = trainer.train
    else:
        # The same work by hand: teacher no-grad forward on the short prompt + completion, student forward on the long
        # one, TRL's chunked reverse KL over the completion positions, backward, fused AdamW.
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        ids = torch.randint(4, config.vocab_size, (1, prompt_length + completion_length))
        teacher_ids = torch.cat([ids[:, :teacher_length], ids[:, -completion_length:]], dim=1)

        def hidden(m, x):
            out = m.model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).last_hidden_state
            return out[:, :-1][:, -completion_length:]

        def run():
            for _ in range(2):
                with torch.no_grad():
                    teacher_hidden = hidden(teacher, teacher_ids)
                student_hidden = hidden(model, ids)
                h_s, h_t = student_hidden.reshape(-1, 256), teacher_hidden.reshape(-1, 256)
                weights = (model.lm_head.weight, None, teacher.lm_head.weight, None)
                divergence, _ = ChunkedDivergenceFunction.apply(h_s, weights[0], None, h_t, weights[2], None, 1.0)
                (divergence.sum() / completion_length).backward()
                del teacher_hidden, student_hidden, h_s, h_t, divergence
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    if measure == "tensors":
        import gc

        gc.collect()
        before = _live_tensor_bytes()
        peak = before + _profiled_peak(run)
    else:
        import resource

        run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    result = {
        "prompt_length": prompt_length,
        "completion_length": completion_length,
        "teacher_prompt_length": teacher_length,
        "gradient_checkpointing": gradient_checkpointing,
        "step": step,
        "measure": measure,
        "peak_bytes": peak,
    }
    print("RESULT " + json.dumps(result), flush=True)


def measure_peak(prompt_length, completion_length, gradient_checkpointing=False, step="trainer", measure="tensors"):
    """Run one measurement in a fresh process and return its peak bytes."""
    import tempfile

    with tempfile.TemporaryDirectory() as output_dir:
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            f"{prompt_length}x{completion_length}",
            "--step",
            step,
            "--measure",
            measure,
            "--output-dir",
            output_dir,
            "--gradient-checkpointing" if gradient_checkpointing else "--no-gradient-checkpointing",
        ]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"measurement failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])["peak_bytes"]


def planned_peak(prompt_length, completion_length, gradient_checkpointing=False) -> int:
    """What the planner predicts for the same run (CPU, fp32, one process, no DeepSpeed, frozen-copy teacher)."""
    from transformers import LlamaConfig

    from trl_opsdl.planner import RunShape, estimate, model_shape_from_config

    model = model_shape_from_config(LlamaConfig(**SMALL_MODEL), name="cost-benchmark small model")
    run = RunShape(
        context_length=prompt_length,
        completion_length=completion_length,
        teacher_context_length=prompt_length // 8,
        num_gpus=1,
        zero_stage=0,
        gradient_checkpointing=gradient_checkpointing,
        dtype="fp32",
        device="cpu",
        gpu_memory_gib=24,
    )
    return estimate(model, run).peak


def _shape(text):
    prompt, completion = text.lower().split("x")
    return int(prompt), int(completion)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=_shape,
        default=[(1024, 128), (2048, 128), (4096, 128), (8192, 128)],
        help="PROMPTxCOMPLETION token lengths",
    )
    parser.add_argument("--step", choices=("trainer", "manual"), default="trainer")
    parser.add_argument("--measure", choices=("tensors", "rss"), default="tensors")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--worker", type=_shape, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(*args.worker, args.gradient_checkpointing, args.step, args.measure, args.output_dir)
        return
    print(f"step={args.step} measure={args.measure} gradient_checkpointing={args.gradient_checkpointing}")
    print(f"{'prompt':>7} {'completion':>10} {'measured MiB':>13} {'planned MiB':>12} {'error':>7}")
    for prompt_length, completion_length in args.shapes:
        measured = measure_peak(prompt_length, completion_length, args.gradient_checkpointing, args.step, args.measure)
        planned = planned_peak(prompt_length, completion_length, args.gradient_checkpointing)
        error = (planned - measured) / measured
        print(
            f"{prompt_length:7d} {completion_length:10d} {measured / 2**20:13.1f} {planned / 2**20:12.1f} {error:+7.1%}"
        )


if __name__ == "__main__":
    main()
