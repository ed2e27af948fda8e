"""`trl-opsdl demo --real --compare`: OPSDL's default recipe against TRL's SFT and DPO trainers on the real model, from
the same training prompts, step budget, LoRA recipe and evaluation sets, plus a short-context check from another
source (docs/real_demo.md).

Each (method, seed) run is written to `<output_dir>/runs/` as it ends, so several processes can split the grid.
`run_real_compare` takes any methods in the same form; the variants tried while building the recipe are in the
repository's `experiments/real_variants.py`.
"""

import json
import math
import random
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from .config import RealDemoConfig
from .real import (
    adapter_checkpoints,
    check_real_config,
    curve_callback,
    curve_record,
    document_source,
    eval_sets,
    load_model,
    lora_config,
    measure,
    opsdl_trainer,
    prepare,
    train_dataset,
)


# A method is `trainer` (opsdl | sft_gold | sft_self | dpo) plus the `RealDemoConfig` fields it changes in the recipe
# the command line gives (the demo's defaults unless overridden). `sft_self` and `dpo` are label-free like OPSDL: both
# learn from the model's own greedy answers to the short prompt.
REAL_COMPARE_METHODS = {
    "opsdl": {},
    # TRL's SFT with OPSDL's step size and anchors: the same share of rows (`short_prompt_ratio`) on the short prompt.
    "sft_self": {"trainer": "sft_self"},
    # LongPO-style: chosen = short-prompt answer, rejected = long-prompt answer, every pair on the long prompt (a pair's
    # two answers come from the two prompts, so there is no short-prompt row to anchor on: `short_prompt_ratio` 0). A
    # smaller step than OPSDL's: at larger ones DPO's replies degenerate (docs/real_demo.md).
    "dpo_longpo": {"trainer": "dpo", "learning_rate": 1e-4, "short_prompt_ratio": 0.0},
}


# The fields `train_dataset` reads: a method that changes one trains on prompts of its own (e.g. more steps, more prompts).
DATA_FIELDS = ("max_steps", "batch_size", "train_lengths")


def check_source(config: RealDemoConfig) -> str:
    """The short check's SQuAD-format file: `config.squad_check`, else SQuAD-shifts' NYT set (fetched once, cached)."""
    from ..downloads import squad_path

    try:
        return config.squad_check or squad_path("nyt")
    except ValueError as error:
        raise ValueError(f"{error} For --compare's short check: --squad-check FILE, or --no-short-check.") from error


def short_check_set(config: RealDemoConfig, tokenizer, num: int = 100) -> list[dict]:
    """Short-context QA from another source (SQuAD-shifts, New York Times articles, unless `config.squad_check`): the
    paragraph + question only, to see whether training on long Wikipedia prompts costs general short-context ability."""
    from ..data.squad import build_squad_pairs, load_squad

    articles = load_squad(check_source(config))
    rows = build_squad_pairs(
        articles, tokenizer, [512], num_samples=num, seed=20_000 + config.seed, system_prompt=config.system_prompt
    ).to_list()
    return [dict(r, prompt=r["teacher_prompt"]) for r in rows]


def _baseline_trainer(kind, model, tokenizer, dataset, config: RealDemoConfig, output_dir, callbacks, log):
    """TRL's `SFTTrainer` (`sft_gold`, `sft_self`) or `DPOTrainer` (`dpo`) with OPSDL's LoRA, steps, batch and lr."""
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from ..evaluation import greedy_generate
    from ..opsdl_config import OPSDLConfig
    from .toy import _no_checkpointing, cpu_trainer_args

    common = dict(cpu_trainer_args(config, output_dir), **_no_checkpointing(OPSDLConfig))
    lora = lora_config(config)

    def replies(column):
        start = time.time()
        out = greedy_generate(model, tokenizer, dataset[column], config.max_completion_length, config.eval_batch_size)
        log(f"  {kind}: {len(out)} greedy answers to `{column}` in {time.time() - start:.0f}s")
        return [[{"role": "assistant", "content": text}] for text in out]

    prompts = dataset["prompt"]
    if kind.startswith("sft") and config.short_prompt_ratio > 0:
        # OPSDL's anchors, for SFT: the same share of rows trains on the short prompt (seeded over the whole set, where
        # OPSDL draws per batch), each with its own completion, so SFT too is held on short contexts.
        rng = random.Random(config.seed)
        short_rows = set(rng.sample(range(len(prompts)), round(config.short_prompt_ratio * len(prompts))))
        teacher_prompts = dataset["teacher_prompt"]  # the column once, not once per row
        prompts = [teacher_prompts[i] if i in short_rows else p for i, p in enumerate(prompts)]
    if kind == "sft_gold":
        completions = [[{"role": "assistant", "content": answers[0]}] for answers in dataset["answers"]]
    elif kind in ("sft_self", "dpo"):
        completions = replies("teacher_prompt")
    else:
        raise ValueError(f"Unknown baseline {kind!r}; use 'sft_gold', 'sft_self' or 'dpo'.")
    from datasets import Dataset

    if kind.startswith("sft"):
        data = Dataset.from_dict({"prompt": prompts, "completion": completions})
        args = SFTConfig(**common, completion_only_loss=True, max_length=None)
        return SFTTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=callbacks,
        )
    rejected = replies("prompt")
    ties = sum(c == r for c, r in zip(completions, rejected))
    log(f"  dpo: {ties}/{len(rejected)} pairs have chosen == rejected (no gradient from those)")
    data = Dataset.from_dict({"prompt": prompts, "chosen": completions, "rejected": rejected})
    # A DPO step forwards chosen and rejected, twice OPSDL's sequences with gradient: it takes half the prompts per
    # forward and two forwards per optimizer step, so its peak memory stays near OPSDL's while the prompts per step and
    # the steps (the budget) stay the same.
    per_forward = config.batch_size // 2 if config.batch_size % 2 == 0 else 1
    common.update(
        per_device_train_batch_size=per_forward, gradient_accumulation_steps=config.batch_size // per_forward
    )
    args = DPOConfig(**common, max_length=None)
    return DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=callbacks,
    )


def run_real_method(
    name, spec, config: RealDemoConfig, sets, model_path, tokenizer, dataset, log=print, instrument=None
) -> dict:
    """Train one method from the prepared model with `config.seed`; measure it on `sets`.

    `instrument(trainer, kind)`, when given, is called on the built trainer before it trains and returns a function
    whose dict, called after training, is added to the run record (the repository's experiments time steps with it).
    """
    from transformers import PrinterCallback

    from .toy import _progress_callback

    spec = dict(spec)
    kind = spec.pop("trainer", "opsdl")
    config = replace(config, **spec)
    model = load_model(model_path)
    curve = curve_callback(config, sets, tokenizer, log)
    adapter_dir = Path(config.output_dir) / "models" / f"{name}-seed{config.seed}"
    checkpoints = adapter_checkpoints(config, adapter_dir)
    start = time.time()
    with tempfile.TemporaryDirectory() as trainer_dir:
        callbacks = [_progress_callback(log, config.max_steps, f"  {name}")]
        callbacks += [c for c in (curve, checkpoints) if c is not None]
        if kind == "opsdl":
            trainer = opsdl_trainer(model, tokenizer, dataset, config, trainer_dir, callbacks)
        else:
            trainer = _baseline_trainer(kind, model, tokenizer, dataset, config, trainer_dir, callbacks, log)
            if curve:
                curve.set_trainer(trainer)  # OPSDLTrainer does this itself
        trainer.remove_callback(PrinterCallback)
        record_extra = instrument(trainer, kind) if instrument else dict
        trainer.train()
    seconds = time.time() - start
    saved = {}
    if config.save_model:  # the adapter (MBs, not the model): `trl-opsdl bench ruler --adapter` benches it
        trainer.model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        saved = {"adapter": str(adapter_dir)}
        if checkpoints is not None:  # in step order: checkpoint-10 before checkpoint-100
            steps = sorted(int(p.name.split("-")[1]) for p in adapter_dir.glob("checkpoint-*"))
            saved["checkpoints"] = [str(adapter_dir / f"checkpoint-{step}") for step in steps]
    model = trainer.model.merge_and_unload().eval()
    log(f"{name} seed {config.seed} (trained in {seconds:.0f}s):")
    scores = measure(model, tokenizer, sets, config.eval_max_new_tokens, config.eval_batch_size, log)
    return {
        "method": name,
        "seed": config.seed,
        "scores": scores,
        "train_seconds": round(seconds, 1),
        "train_prompts": len(dataset),
        **saved,
        **curve_record(curve),
        **record_extra(),
    }


def run_real_compare(
    config: RealDemoConfig | None = None, methods: dict | None = None, seeds=(0, 1, 2), log=print, instrument=None
) -> dict:
    """
    Every method × seed from the same model, training prompts, step budget and evaluation sets (plus the short check
    from another source). Each run is written to `<output_dir>/runs/<method>-seed<k>.json` as it ends and the table
    (`compare.json`, `compare.md`) is rebuilt from every run file present, so several processes (e.g. one per seed,
    `--seeds 1`) can share one output folder. `instrument`: see `run_real_method`.
    """
    config = config or RealDemoConfig()
    methods = REAL_COMPARE_METHODS if methods is None else methods
    for name, spec in methods.items():
        own = replace(config, overwrite=True, **{k: v for k, v in spec.items() if k != "trainer"})
        check_real_config(own)
        if spec.get("trainer") == "dpo" and own.short_prompt_ratio > 0:
            raise ValueError(
                f"method {name!r}: short_prompt_ratio={own.short_prompt_ratio} with DPO, whose pairs have no short-prompt "
                "row; set it to 0 in the method."
            )
    # Run files are shared by processes that split the grid (each writes its own method-seed files): a file this call
    # would write again is refused unless --overwrite, so a second launch of the same cells loses nothing.
    taken = [
        f"{m}-seed{k}.json"
        for m in methods
        for k in seeds
        if (Path(config.output_dir) / "runs" / f"{m}-seed{k}.json").exists()
    ]
    if taken and not config.overwrite:
        raise ValueError(
            f"--output-dir {config.output_dir!r} already holds runs/{taken[0]} (and {len(taken) - 1} more of these "
            "method-seed runs); pass other --methods/--seeds, another folder, or --overwrite to redo them."
        )
    import torch

    torch.set_num_threads(config.num_threads)
    document_source(config)  # a source that can't be had fails here, before anything is written
    if config.short_check:
        check_source(config)
    output_dir = Path(config.output_dir)
    (output_dir / "runs").mkdir(parents=True, exist_ok=True)
    model_path, tokenizer, train_articles, held_out = prepare(config, log)
    sets = eval_sets(config, tokenizer, held_out)
    if config.short_check:
        sets["short_nyt"] = short_check_set(config, tokenizer, config.eval_long)
    base_file = output_dir / "runs" / "base.json"
    if not base_file.exists():
        log("base model:")
        model = load_model(model_path)
        base = {
            "method": "base",
            "seed": None,
            "scores": measure(model, tokenizer, sets, config.eval_max_new_tokens, config.eval_batch_size, log),
        }
        base_file.write_text(json.dumps(base, indent=2) + "\n")
    for seed in seeds:
        seeded = replace(config, seed=seed)
        datasets = {}  # one set of training prompts per (steps, batch, lengths): shared by the methods that agree
        for name, spec in methods.items():
            log(f"--- {name}, seed {seed}")
            own = replace(seeded, **{k: v for k, v in spec.items() if k in DATA_FIELDS})
            key = tuple(getattr(own, k) for k in DATA_FIELDS)
            if key not in datasets:
                datasets[key] = train_dataset(own, tokenizer, train_articles)
            run = run_real_method(name, spec, seeded, sets, model_path, tokenizer, datasets[key], log, instrument)
            (output_dir / "runs" / f"{name}-seed{seed}.json").write_text(json.dumps(run, indent=2) + "\n")
            results = write_real_compare(output_dir, config, methods)
    results = write_real_compare(output_dir, config, methods)
    log("\n" + (output_dir / "compare.md").read_text())
    return results


def write_real_compare(output_dir, config: RealDemoConfig, methods=REAL_COMPARE_METHODS) -> dict:
    """Aggregate every run file in `<output_dir>/runs/`: per method and setting, mean ± std over seeds; the table's
    rows are the base, then `methods` in order, then any other method with run files there."""
    runs = [json.loads(p.read_text()) for p in sorted(Path(output_dir, "runs").glob("*.json"))]
    by_method = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    summary = {}
    for method, items in by_method.items():
        summary[method] = {}
        for setting in items[0]["scores"]:
            values = [r["scores"][setting]["contains"] for r in items]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            summary[method][setting] = {"mean": round(mean, 2), "std": round(std, 2), "seeds": len(values)}
    results = {"summary": summary, "settings": json.loads(json.dumps(asdict(config)))}
    Path(output_dir, "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    settings = list(next(iter(summary.values())))
    lines = ["| method | seeds | " + " | ".join(settings) + " |", "|---|---|" + "---|" * len(settings)]
    order = (
        ["base"]
        + [m for m in methods if m in summary]
        + sorted(m for m in summary if m not in methods and m != "base")
    )
    for method in [m for m in order if m in summary]:
        cells = [
            f"{v['mean']:.1f} ± {v['std']:.1f}" if v["seeds"] > 1 else f"{v['mean']:.1f}"
            for v in summary[method].values()
        ]
        lines.append(f"| {method} | {next(iter(summary[method].values()))['seeds']} | " + " | ".join(cells) + " |")
    Path(output_dir, "compare.md").write_text("\n".join(lines) + "\n")
    return results
