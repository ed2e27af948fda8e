"""`trl-opsdl demo`: the tiny key-value model, good at short contexts and bad at long ones, fixed by OPSDL in minutes.

`run_demo` evaluates the shipped model (`trl_opsdl/assets/demo_model`, made by `trl_opsdl.demo.pretrain`) on short
and long contexts, trains it with `OPSDLTrainer` on long prompts (teacher = the same model on the single relevant
pair), evaluates again, and writes `results.json` and a plot. `--compare` (TRL's SFT and DPO at the same budget),
built on the same pieces, is in `trl_opsdl.demo.compare`.
"""

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from ..data.kv import build_kv_retrieval
from ..generation import greedy_generate
from .config import DemoConfig
from .model import DEMO_MODEL_DIR, VALUE_LENGTH, load_demo_model


def eval_sets(short_pairs: int, long_pairs, num_examples: int) -> dict:
    """Fixed evaluation sets (`short`, then `long_<n>` by increasing n); their seeds never meet a training seed."""
    sets = {"short": build_kv_retrieval(num_examples, short_pairs, seed=1_000_000 + short_pairs)}
    for n in sorted(long_pairs):
        sets[f"long_{n}"] = build_kv_retrieval(num_examples, n, seed=1_000_000 + n)
    return sets


def greedy_answers(model, tokenizer, prompts: list[str], batch_size: int = 250,
                   max_new_tokens: int = VALUE_LENGTH + 1) -> list[str]:  # fmt: skip
    """Greedy answers as space-joined tokens, cut at the first end token; one that never ends is marked ` <no-end>`."""
    answers = []
    for ids in greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, return_ids=True):
        ended = bool(ids) and ids[-1] == tokenizer.eos_token_id
        tokens = tokenizer.convert_ids_to_tokens(ids[:-1] if ended else ids)
        answers.append(" ".join(tokens) + ("" if ended else " <no-end>"))
    return answers


def kv_accuracy(model, tokenizer, sets: dict, batch_size: int = 250) -> dict[str, float]:
    """Exact match in percent per setting: the value's tokens, then the end token, and nothing else."""
    scores = {}
    for name, dataset in sets.items():
        predictions = greedy_answers(model, tokenizer, dataset["prompt"], batch_size)
        hits = sum(pred == answers[0] for pred, answers in zip(predictions, dataset["answers"]))
        scores[name] = round(100.0 * hits / len(dataset), 2)
    return scores


# --- the demo: evaluate, train with OPSDLTrainer, evaluate again --------------------------------------------------


def check_demo_config(config: DemoConfig) -> None:
    """Fail on bad settings before minutes of evaluation: the trainer's own checks, then the demo's."""
    with tempfile.TemporaryDirectory() as scratch:
        opsdl_args(config, scratch)  # OPSDLConfig.__post_init__ names the bad value and what to use
    for name in ("max_steps", "batch_size", "eval_examples", "eval_batch_size", "num_threads", "short_pairs"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name}={getattr(config, name)} must be at least 1.")
    if not config.long_pairs:
        raise ValueError("long_pairs is empty: give at least one long setting (a number of pairs), e.g. (16, 24, 32).")
    build_kv_retrieval(1, tuple(config.train_pairs))  # checks the range
    for pairs in (config.short_pairs, *config.long_pairs):
        build_kv_retrieval(1, pairs)


DEMO_OUTPUTS = ("results.json", "accuracy_vs_context.png", "model")


def prepare_output_dir(config: DemoConfig) -> Path:
    """The output folder, refused when it holds anything unless `overwrite` (then an earlier demo's files go)."""
    output_dir = Path(config.output_dir)
    if output_dir.is_file():
        raise ValueError(f"--output-dir {config.output_dir!r} is a file; pass a folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not config.overwrite:
            raise ValueError(
                f"--output-dir {config.output_dir!r} is not empty; pass another folder, or --overwrite to replace "
                "an earlier demo's results there."
            )
        for name in DEMO_OUTPUTS:  # a stale model/ of a --save-model run must not sit beside new results
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def cpu_trainer_args(config: DemoConfig, output_dir) -> dict:
    """What every trainer of the demo shares: its step budget, batch, learning rate and seed; constant schedule,
    fp32, no checkpoints, no reporting, no activation checkpointing (a 0.8M model has no memory to save)."""
    return dict(
        output_dir=str(output_dir),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant",
        seed=config.seed,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=config.logging_steps,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,  # a CPU run: pinning would only warn (OPSDLConfig does this by itself)
    )


def opsdl_args(config: DemoConfig, output_dir: str | Path, **overrides):
    """The `OPSDLConfig` the demo trains with: small CPU-friendly settings, no checkpoints, no reporting."""
    from ..opsdl_config import OPSDLConfig

    kwargs = cpu_trainer_args(config, output_dir)
    kwargs.update(
        temperature=config.temperature,
        max_completion_length=VALUE_LENGTH + 1,  # the value tokens + the end token
        distillation_mode=config.distillation_mode,
        teacher_model_kind=config.teacher_model_kind,
        short_prompt_ratio=config.short_prompt_ratio,
        **_no_checkpointing(OPSDLConfig),
    )
    kwargs.update(overrides)
    return OPSDLConfig(**kwargs)


def _no_checkpointing(config_class) -> dict:
    """Activation checkpointing off (TRL's generating trainers turn it on): a 0.8M model has no memory to save."""
    # transformers 5.x renamed `gradient_checkpointing` to `activation_checkpointing` and warns on the old name.
    if "activation_checkpointing" in config_class.__dataclass_fields__:
        return {"activation_checkpointing": False}
    return {"gradient_checkpointing": False}


def lora_config(config: DemoConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=2 * config.lora_r,
        lora_dropout=0.0,
        target_modules=list(config.lora_target_modules),
        task_type="CAUSAL_LM",
    )


def _progress_callback(log: Callable[[str], None], total_steps: int, prefix: str = "train"):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """One line per logging step: step, seconds, and the logged losses."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            shown = {k: v for k, v in logs.items() if k in ("loss", "opsdl/reverse_kl", "rewards/accuracies")}
            metrics = "  ".join(f"{k} {v:.4f}" for k, v in shown.items())
            log(f"{prefix} step {state.global_step}/{total_steps}  {metrics}  {time.time() - self.start:.0f}s")

    return Progress()


def train_opsdl(model, tokenizer, train_dataset, config: DemoConfig, output_dir, callbacks=(), log=print):
    """Train `model` with `OPSDLTrainer` on `train_dataset`; returns the trained model (adapters merged with LoRA)."""
    from transformers import PrinterCallback

    from ..opsdl_trainer import OPSDLTrainer

    trainer = OPSDLTrainer(
        model=model,
        args=opsdl_args(config, output_dir),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(config) if config.lora else None,
        callbacks=[_progress_callback(log, config.max_steps, "opsdl"), *callbacks],
    )
    trainer.remove_callback(PrinterCallback)  # our progress line replaces its dict dumps
    trainer.train()
    model = trainer.model
    if config.lora:
        model = model.merge_and_unload()
    return model.eval()


def _settings(config: DemoConfig) -> dict:
    settings = asdict(config)
    settings.pop("overwrite")  # how the folder was handled, not a setting of the experiment
    settings["model_path"] = str(config.model_path or DEMO_MODEL_DIR)
    settings["pairs"] = {"short": config.short_pairs, **{f"long_{n}": n for n in sorted(config.long_pairs)}}
    return json.loads(json.dumps(settings))  # tuples as lists: what results.json holds


def quiet_cpu_notices() -> None:
    """Drop DeepSpeed's "Setting accelerator to CPU" log line: the demo runs on a CPU by design, and the line (DeepSpeed
    is imported by accelerate's model checks whenever it is installed) would sit between the demo's own lines."""
    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())


def run_demo(config: DemoConfig | None = None, log: Callable[[str], None] = print) -> dict:
    """Evaluate the demo model, train it with OPSDL on long prompts, evaluate again; write results.json and a plot."""
    config = config or DemoConfig()
    quiet_cpu_notices()
    start = time.time()
    check_demo_config(config)
    torch.set_num_threads(config.num_threads)
    output_dir = prepare_output_dir(config)

    model, tokenizer = load_demo_model(config.model_path)
    sets = eval_sets(config.short_pairs, config.long_pairs, config.eval_examples)
    train_dataset = build_kv_retrieval(
        config.max_steps * config.batch_size, tuple(config.train_pairs), seed=config.seed
    )
    log(
        f"OPSDL demo: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter model, "
        f"{len(train_dataset)} training prompts of {config.train_pairs[0]}-{config.train_pairs[1]} pairs, "
        f"eval on {', '.join(f'{k} ({v} pairs)' for k, v in _settings(config)['pairs'].items())}, "
        f"{config.eval_examples} questions each"
    )
    before = kv_accuracy(model, tokenizer, sets, config.eval_batch_size)
    log(f"before  {_format_scores(before)}  ({time.time() - start:.0f}s)")
    with tempfile.TemporaryDirectory() as trainer_dir:  # nothing is checkpointed; the trainer still wants a folder
        model = train_opsdl(model, tokenizer, train_dataset, config, trainer_dir, log=log)
    after = kv_accuracy(model, tokenizer, sets, config.eval_batch_size)
    log(f"after   {_format_scores(after)}  ({time.time() - start:.0f}s)")

    results = {
        "before": before,
        "after": after,
        "settings": _settings(config),
        "runtime_seconds": round(time.time() - start, 1),
    }
    write_outputs(output_dir, results, model if config.save_model else None, tokenizer, plot_demo, demo_table, log)
    return results


def write_outputs(output_dir: Path, results: dict, model, tokenizer, plot, table, log) -> None:
    """`results.json`, the plot, the trained model (when `model` is given) and the table: what a demo run leaves."""
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if model is not None:
        model.save_pretrained(output_dir / "model")
        tokenizer.save_pretrained(output_dir / "model")
    plot(results, output_dir / "accuracy_vs_context.png")
    log("\n" + table(results))
    log(f"wrote {output_dir / 'results.json'} and {output_dir / 'accuracy_vs_context.png'}")


def _format_scores(scores: dict) -> str:
    return "  ".join(f"{name} {value:.1f}" for name, value in scores.items())


def demo_table(results: dict) -> str:
    """A markdown table: one row per setting, before / after / change."""
    pairs = results["settings"]["pairs"]
    lines = ["| setting | pairs | before | after | change |", "|---|---|---|---|---|"]
    for name, before in results["before"].items():
        after = results["after"][name]
        lines.append(f"| {name} | {pairs[name]} | {before:.1f} | {after:.1f} | {after - before:+.1f} |")
    return "\n".join(lines)


def plot_demo(results: dict, path: str | Path) -> None:
    """Exact match against the number of pairs in the context, before and after OPSDL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = results["settings"]["pairs"]
    names = sorted(results["before"], key=lambda name: pairs[name])
    x = [pairs[name] for name in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("before", "o--"), ("after", "o-")):
        ax.plot(x, [results[key][name] for name in names], style, label=f"{key} OPSDL")
    ax.axvspan(results["settings"]["train_pairs"][0], results["settings"]["train_pairs"][1], color="0.9", zorder=0)
    ax.set_xlabel("key-value pairs in the context (shaded: OPSDL training range)")
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("Key-value retrieval, 0.8M-parameter Llama")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
