"""`trl-opsdl demo --compare`: OPSDL's default recipe against TRL's SFT and DPO trainers, each trained from the same demo
model on the same examples and step budget over several seeds, with accuracy curves (sample efficiency).

Plain `trl-opsdl demo` never imports it. `run_compare` takes any methods in the same form (`trainer` plus the
`DemoConfig` fields that differ from the command line's); the OPSDL variants and ablations tried while building the
demo are in the repository's `experiments/toy_variants.py`.
"""

import copy
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ..data.kv import build_kv_retrieval
from .config import DemoConfig
from .model import load_demo_model
from .toy import (
    _format_scores,
    _no_checkpointing,
    _progress_callback,
    _settings,
    check_demo_config,
    cpu_trainer_args,
    eval_sets,
    greedy_answers,
    kv_accuracy,
    lora_config,
    train_opsdl,
)


# A method is `trainer` (opsdl | sft_gold | sft_self | dpo) plus the `DemoConfig` fields that differ from the demo's.
# `sft_self` and `dpo` are label-free like OPSDL: both learn from the model's own answers to the short prompt.
COMPARE_METHODS = {
    "opsdl": {},
    "sft_self": {"trainer": "sft_self"},
    # DPO takes a smaller step than the demo's: at the shared learning rate its answers degenerate (docs/demo.md).
    "dpo_longpo": {"trainer": "dpo", "learning_rate": 1e-4},
}


def _baseline_args(config_class, config: DemoConfig, output_dir, **overrides):
    """TRL's SFT/DPO configs with the demo's step budget, batch, learning rate and schedule."""
    kwargs = cpu_trainer_args(config, output_dir)
    kwargs.update(max_length=None, **_no_checkpointing(config_class))
    kwargs.update(overrides)
    return config_class(**kwargs)


def _strip_no_end(answer: str) -> str:
    return answer.removesuffix(" <no-end>")


def train_baseline(
    kind: str, model, tokenizer, train_dataset, config: DemoConfig, output_dir, callbacks=(), log=print
):
    """Train `model` with TRL's `SFTTrainer` (`sft_gold`, `sft_self`) or `DPOTrainer` (`dpo`) on the same prompts."""
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    callbacks = [_progress_callback(log, config.max_steps, kind), *callbacks]
    peft_config = lora_config(config) if config.lora else None  # the same recipe as OPSDL's
    if kind == "sft_gold":  # the labels: an upper reference, not available to OPSDL
        completions = [" " + answers[0] for answers in train_dataset["answers"]]
    elif kind in ("sft_self", "dpo"):  # label-free: the model's own greedy answers to the short prompt
        completions = [
            " " + _strip_no_end(a) for a in greedy_answers(model, tokenizer, train_dataset["teacher_prompt"])
        ]
    else:
        raise ValueError(f"Unknown baseline {kind!r}; use 'sft_gold', 'sft_self' or 'dpo'.")

    if kind in ("sft_gold", "sft_self"):
        dataset = train_dataset.select_columns(["prompt"]).add_column("completion", completions)
        args = _baseline_args(SFTConfig, config, output_dir, completion_only_loss=True)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
            peft_config=peft_config,
        )
    else:  # LongPO-style: chosen = the answer from the short context, rejected = the answer from the long one
        rejected = [" " + _strip_no_end(a) for a in greedy_answers(model, tokenizer, train_dataset["prompt"])]
        ties = sum(c == r for c, r in zip(completions, rejected))
        log(f"dpo: {ties}/{len(rejected)} pairs have chosen == rejected (no gradient from those)")
        dataset = train_dataset.select_columns(["prompt"]).add_column("chosen", completions)
        dataset = dataset.add_column("rejected", rejected)
        args = _baseline_args(DPOConfig, config, output_dir)
        trainer = DPOTrainer(
            model=model,
            ref_model=None if config.lora else copy.deepcopy(model),  # with LoRA: the adapter-free model
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
            peft_config=peft_config,
        )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    model = trainer.model
    if config.lora:
        model = model.merge_and_unload()
    return model.eval()


def _curve_callback(sets: dict, every: int, batch_size: int, points: list, examples_per_step: int):
    """Evaluate every `every` optimizer steps (sample efficiency): appends (training examples, scores) to `points`."""
    from transformers import TrainerCallback

    class Curve(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 and state.global_step < state.max_steps:
                tokenizer = kwargs["processing_class"]
                points.append((state.global_step * examples_per_step, kv_accuracy(model, tokenizer, sets, batch_size)))

    return Curve()


def run_method(name: str, spec: dict, config: DemoConfig, sets: dict, curve_sets: dict, eval_every: int, log=print):
    """Train one method from the demo model with `config.seed`; returns final scores and the accuracy curve."""
    spec = dict(spec)
    kind = spec.pop("trainer", "opsdl")
    config = replace(config, **spec)
    model, tokenizer = load_demo_model(config.model_path)
    train_dataset = build_kv_retrieval(
        config.max_steps * config.batch_size, tuple(config.train_pairs), seed=config.seed
    )
    points = [(0, kv_accuracy(model, tokenizer, curve_sets, config.eval_batch_size))]
    callbacks = [_curve_callback(curve_sets, eval_every, config.eval_batch_size, points, config.batch_size)]
    start = time.time()
    with tempfile.TemporaryDirectory() as trainer_dir:
        if kind == "opsdl":
            model = train_opsdl(model, tokenizer, train_dataset, config, trainer_dir, callbacks, log=log)
        else:
            model = train_baseline(kind, model, tokenizer, train_dataset, config, trainer_dir, callbacks, log=log)
    train_seconds = time.time() - start
    final = kv_accuracy(model, tokenizer, sets, config.eval_batch_size)
    points.append((config.max_steps * config.batch_size, {k: final[k] for k in curve_sets}))
    log(f"{name} seed {config.seed}: {_format_scores(final)}  (trained in {train_seconds:.0f}s)")
    return {"final": final, "curve": points, "train_seconds": round(train_seconds, 1)}


def _aggregate(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": round(mean, 2), "std": round(std, 2), "min": min(values), "max": max(values), "n": len(values)}


def run_compare(
    config: DemoConfig | None = None,
    methods: dict | None = None,
    seeds: tuple[int, ...] = (0, 1, 2),
    eval_every: int = 25,
    curve_examples: int = 200,
    log: Callable[[str], None] = print,
    name: str = "compare",
) -> dict:
    """Every method × seed from the same demo model, examples and step budget; writes `<name>.json/.md/.png`."""
    config = config or DemoConfig()
    methods = COMPARE_METHODS if methods is None else methods
    start = time.time()
    for spec in methods.values():
        check_demo_config(replace(config, overwrite=True, **{k: v for k, v in spec.items() if k != "trainer"}))
    output_dir = Path(config.output_dir)
    # `<name>.json/.md/.png` are this comparison's outputs: an earlier one's are replaced only when asked.
    earlier = [p.name for p in (output_dir / f"{name}{ext}" for ext in (".json", ".md", ".png")) if p.exists()]
    if earlier and not config.overwrite:
        raise ValueError(
            f"--output-dir {config.output_dir!r} already holds {', '.join(earlier)} of an earlier --{name}; pass "
            "another folder, or --overwrite to replace them."
        )
    torch.set_num_threads(config.num_threads)
    output_dir.mkdir(parents=True, exist_ok=True)
    sets = eval_sets(config.short_pairs, config.long_pairs, config.eval_examples)
    longest = f"long_{max(config.long_pairs)}"
    curve_sets = {k: sets[k].select(range(min(curve_examples, len(sets[k])))) for k in ("short", longest)}

    model, tokenizer = load_demo_model(config.model_path)
    base = kv_accuracy(model, tokenizer, sets, config.eval_batch_size)
    log(f"base: {_format_scores(base)}")
    runs = {}
    for method, spec in methods.items():
        for seed in seeds:
            log(f"--- {method}, seed {seed} ({time.time() - start:.0f}s elapsed)")
            seeded = replace(config, seed=seed)
            runs.setdefault(method, {})[str(seed)] = run_method(
                method, spec, seeded, sets, curve_sets, eval_every, log=log
            )
            _write_compare(output_dir, name, config, methods, seeds, base, runs, time.time() - start)
    results = _write_compare(output_dir, name, config, methods, seeds, base, runs, time.time() - start)
    log("\n" + compare_table(results))
    log(f"wrote {output_dir / (name + '.json')}, .md and .png  ({time.time() - start:.0f}s)")
    return results


def _write_compare(output_dir, name, config, methods, seeds, base, runs, seconds) -> dict:
    """Aggregate what has run so far and write it (a long comparison leaves usable results if interrupted)."""
    summary = {
        method: {setting: _aggregate([run["final"][setting] for run in by_seed.values()]) for setting in base}
        for method, by_seed in runs.items()
    }
    results = {
        "base": base,
        "summary": summary,
        "runs": runs,
        "methods": methods,
        "seeds": list(seeds),
        "settings": _settings(config),
        "runtime_seconds": round(seconds, 1),
    }
    results = json.loads(json.dumps(results))  # tuples as lists: what the file holds
    (output_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (output_dir / f"{name}.md").write_text(compare_table(results) + "\n")
    plot_compare(results, output_dir / f"{name}.png")
    return results


def compare_table(results: dict) -> str:
    """Markdown: exact match mean ± std over seeds (min–max below it), one row per method, base first."""
    settings = list(results["base"])
    pairs = results["settings"]["pairs"]
    header = " | ".join(f"{s} ({pairs[s]} pairs)" for s in settings)
    lines = [f"| method | seeds | {header} | train s/run |", "|---|---|" + "---|" * (len(settings) + 1)]
    lines.append("| base (no training) | – | " + " | ".join(f"{results['base'][s]:.1f}" for s in settings) + " | – |")
    for method, by_setting in results["summary"].items():
        cells = [
            f"{a['mean']:.1f} ± {a['std']:.1f} ({a['min']:.1f}–{a['max']:.1f})"
            for a in (by_setting[s] for s in settings)
        ]
        seeds = ",".join(results["runs"][method])
        seconds = [run["train_seconds"] for run in results["runs"][method].values()]
        lines.append(f"| {method} | {seeds} | " + " | ".join(cells) + f" | {sum(seconds) / len(seconds):.0f} |")
    lines.append("\nExact match (%), mean ± sample std (min–max) over the seeds; base is one deterministic model.")
    return "\n".join(lines)


def plot_compare(results: dict, path: str | Path) -> None:
    """Sample efficiency: accuracy at the longest setting and on short contexts against training examples seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(next(iter(next(iter(results["runs"].values())).values()))["curve"][0][1])
    panels = sorted(panels, key=lambda s: -results["settings"]["pairs"][s])  # longest first, then short
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], panels):
        for method, by_seed in results["runs"].items():
            curves = [run["curve"] for run in by_seed.values()]
            xs = [x for x, _ in curves[0]]
            ys = [[curve[i][1][setting] for curve in curves] for i in range(len(xs))]
            mean = [sum(y) / len(y) for y in ys]
            (line,) = ax.plot(xs, mean, "o-", ms=3, label=method)
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.15)
        ax.set_title(f"{setting} ({results['settings']['pairs'][setting]} pairs)")
        ax.set_xlabel("training examples")
        ax.set_ylabel("exact match (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
