"""`trl-opsdl demo --real --compare`: TRL's SFT and DPO trainers against OPSDL's loss modes and teacher kinds on the real
model, from the same training prompts, step budget, LoRA recipe and evaluation sets (docs/real_demo.md).

Each (method, seed) run is written to `<output_dir>/runs/` as it ends, so several processes can split the grid.
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


# --- the comparison: TRL's SFT and DPO against OPSDL's loss modes and teacher kinds, same prompts and budget --------

# A method is `trainer` (opsdl | sft_gold | sft_self | dpo) plus the `RealDemoConfig` fields it changes in the recipe
# the command line gives (the demo's defaults unless overridden). The rows of docs/real_demo.md measured before the
# 2026-12-05 defaults (topk_logits, lr 3e-4, short_prompt_ratio 0.5) ran on `--distillation-mode full_logits
# --learning-rate 1e-3 --short-prompt-ratio 0` (and `--task squad` for SQuAD): pass those to repeat them.
REAL_COMPARE_METHODS = {
    "opsdl": {},
    "opsdl_sampled_token": {"distillation_mode": "sampled_token"},  # the paper's point-wise estimator
    "opsdl_topk_logits": {"distillation_mode": "topk_logits"},
    "opsdl_teacher_ema": {"teacher_model_kind": "ema"},
    "opsdl_teacher_live": {"teacher_model_kind": "live"},  # the teacher co-evolves with the student
    # Half of each batch's rows sampled from the short prompt too: the frozen teacher then holds the student's
    # short-context behaviour where it was (KL = 0 there at the start), against the drift the default run shows.
    "opsdl_short_anchors": {"short_prompt_ratio": 0.5},
    "opsdl_lr_3e-4": {"learning_rate": 3e-4},  # a third of the first recipe's step, the other guard against drift
    "sft_gold": {"trainer": "sft_gold"},  # labels: a reference OPSDL does not have
    "sft_self": {"trainer": "sft_self"},  # label-free, off-policy: the model's own answer to the short prompt
    # LongPO-style: chosen = short-prompt answer, rejected = long-prompt answer, every pair on the long prompt (a pair's
    # two answers come from the two prompts, so there is no short-prompt row to anchor on: `short_prompt_ratio` 0).
    "dpo_longpo": {"trainer": "dpo", "short_prompt_ratio": 0.0},
    # At lr 1e-3 DPO collapses into degenerate replies (docs/real_demo.md), as on the toy task. At 1e-4 on `--task
    # niah_single` it still fell below the base on every setting (1,024 tokens: 47 -> 11), at ~3x OPSDL's step time.
    "dpo_longpo_lr_1e-4": {"trainer": "dpo", "learning_rate": 1e-4, "short_prompt_ratio": 0.0},
    # Not the shared budget: three times the steps and prompts (480) at a third of the step size, `topk_logits` —
    # whether more on-policy data moves the 1,024-token figure that 40 steps did not (run with --eval-steps for a curve).
    "opsdl_topk_lr_3e-4_steps_120": {"distillation_mode": "topk_logits", "learning_rate": 3e-4, "max_steps": 120},
    # Completions long enough to end: at 24 tokens most sampled replies stop mid-sentence, before or around the
    # answer, so the loss mostly reshapes wording (docs/real_demo.md, "Does OPSDL's signal point at right answers?").
    # Same prompts and steps; each step samples and scores 64 tokens (evaluation still reads 24 greedy tokens).
    "opsdl_topk_completion_64": {"distillation_mode": "topk_logits", "max_completion_length": 64},
    # Every prompt at 1,024 tokens, the length where the target is missed (the shared set alternates 512 and 1,024;
    # the 120-step run moved 512 and not 1,024). Same steps and batch; its own 160 prompts (`train_lengths` differs).
    "opsdl_topk_train_1024": {"distillation_mode": "topk_logits", "train_lengths": (1024,)},
    # The paper's point-wise estimator at the step size that kept `full_logits` nearest the base at 1,024 tokens: at
    # lr 1e-3 its surrogate's variance (one sampled token per position, not the distribution) degraded every setting.
    "opsdl_sampled_token_lr_3e-4": {"distillation_mode": "sampled_token", "learning_rate": 3e-4},
    # The same estimator at the shared recipe with a mean baseline: its advantages average -0.3 to -0.5 nats (the
    # teacher finds the student's samples less likely than it does; real_advantage.py), so uncentred it pushes down most
    # sampled tokens.
    "opsdl_sampled_token_baseline": {
        "distillation_mode": "sampled_token",
        "extra": {"sampled_token_baseline": "mean"},
    },
    # The two guards against drift together (the top-k form kept short prompts best, lr 3e-4 moved 1,024 tokens most),
    # at the shared budget: on `--task niah_single` the default recipe rewrote every reply into one degenerate opening.
    "opsdl_topk_lr_3e-4": {"distillation_mode": "topk_logits", "learning_rate": 3e-4},
    # The other direction of the KL, at the step size of the best 1,024-token row (`opsdl_lr_3e-4`). Forward KL(t || s)
    # = sum_v p_t(v) (log p_t(v) - log p_s(v)) on the student's own samples: its gradient -sum_v p_t(v) grad log p_s(v)
    # raises every token the teacher holds likely (mode-covering), where the reverse KL's weighs each token by the
    # student's own p_s(v) and barely moves one the student finds unlikely (mode-seeking). At a position where the
    # teacher, given the gold paragraph, puts mass on the answer and the long-context student does not, only the
    # forward direction pulls hard towards it. JSD (beta = 0.5, TRL's GKD default) sits between the two.
    "opsdl_forward_kl_lr_3e-4": {"distillation_mode": "full_logits", "learning_rate": 3e-4, "extra": {"beta": 0.0}},
    "opsdl_jsd_lr_3e-4": {"distillation_mode": "full_logits", "learning_rate": 3e-4, "extra": {"beta": 0.5}},
    # The nearest row to the target on `--task niah_single` (`opsdl_topk_lr_3e-4`: 61.0 at 1,024 tokens) lost 61 points
    # on the short prompts the teacher answers. Half of each batch sampled from the short prompt: there the student and
    # the frozen (adapter-free) teacher read the same prompt, so the KL is 0 at the start and its gradient pulls any
    # drift of the LoRA on short prompts back to the base, on the student's own replies to them.
    "opsdl_topk_lr_3e-4_anchors": {
        "distillation_mode": "topk_logits",
        "learning_rate": 3e-4,
        "short_prompt_ratio": 0.5,
    },
    # TRL's SFT on its own short-prompt answers with that recipe's step size and anchors (half the rows on the short
    # prompt): the label-free baseline at OPSDL's settings, where `sft_self` at lr 1e-3 lost 25 points on short prompts.
    # On `--task niah_single` (5 seeds) it is level with OPSDL at long lengths where it works and fell below the base
    # on short prompts on two seeds (one collapse into a refusal template): docs/real_demo.md.
    "sft_self_lr_3e-4_anchors": {"trainer": "sft_self", "learning_rate": 3e-4, "short_prompt_ratio": 0.5},
    # The same anchors with the forward KL, the direction that pulls hardest towards a word the teacher holds likely.
    # On `--task niah_single` (3 seeds) it moved the long settings a little less than the top-k reverse KL (90 / 86 at
    # 512 / 1,024 against 92 / 90 over 5 seeds) and kept short prompts lower (86 against 93): docs/real_demo.md.
    "opsdl_forward_kl_lr_3e-4_anchors": {
        "distillation_mode": "full_logits",
        "learning_rate": 3e-4,
        "short_prompt_ratio": 0.5,
        "extra": {"beta": 0.0},
    },
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
    # A DPO step forwards chosen and rejected, twice OPSDL's sequences with gradient: at 4 prompts of ~1,050 tokens
    # it went past this machine's 24 GB (killed at 24.3 GB). Half the prompts per forward, two forwards per optimizer
    # step (peak 17.3 GiB): the same 4 prompts per step and the same 40 steps, so the budget stays OPSDL's.
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


def run_real_method(name, spec, config: RealDemoConfig, sets, model_path, tokenizer, dataset, log=print) -> dict:
    """Train one method from the prepared model with `config.seed`; measure it on `sets`."""
    from transformers import PrinterCallback

    from ..timing import StepTimer, host_speed

    spec = dict(spec)
    kind = spec.pop("trainer", "opsdl")
    config = replace(config, **spec)
    model = load_model(model_path)
    timer = StepTimer()
    curve = curve_callback(config, sets, tokenizer, log)
    start = time.time()
    with tempfile.TemporaryDirectory() as trainer_dir:
        callbacks = [timer.callback(log, config.max_steps)] + ([curve] if curve else [])
        if kind == "opsdl":
            trainer = opsdl_trainer(model, tokenizer, dataset, config, trainer_dir, callbacks)
            timer.attach(trainer)
        else:
            trainer = _baseline_trainer(kind, model, tokenizer, dataset, config, trainer_dir, callbacks, log)
            if curve:
                curve.set_trainer(trainer)  # OPSDLTrainer does this itself
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    seconds = time.time() - start
    model = trainer.model.merge_and_unload().eval()
    log(f"{name} seed {config.seed} (trained in {seconds:.0f}s):")
    scores = measure(model, tokenizer, sets, config.eval_max_new_tokens, config.eval_batch_size, log)
    return {
        "method": name,
        "seed": config.seed,
        "scores": scores,
        "train_seconds": round(seconds, 1),
        "train_prompts": len(dataset),
        **curve_record(curve),
        "step_time_split": timer.summary() if kind == "opsdl" else {},
        "host": host_speed(),
    }


def run_real_compare(
    config: RealDemoConfig | None = None, methods: dict | None = None, seeds=(0, 1, 2), log=print
) -> dict:
    """
    Every method × seed from the same model, training prompts, step budget and evaluation sets (plus the short check
    from another source). Each run is written to `<output_dir>/runs/<method>-seed<k>.json` as it ends and the table
    (`compare.json`, `compare.md`) is rebuilt from every run file present, so several processes (e.g. one per seed,
    `--seeds 1`) can share one output folder.
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
            run = run_real_method(name, spec, seeded, sets, model_path, tokenizer, datasets[key], log)
            (output_dir / "runs" / f"{name}-seed{seed}.json").write_text(json.dumps(run, indent=2) + "\n")
            results = write_real_compare(output_dir, config)
    results = write_real_compare(output_dir, config)
    log("\n" + (output_dir / "compare.md").read_text())
    return results


def write_real_compare(output_dir, config: RealDemoConfig) -> dict:
    """Aggregate every run file in `<output_dir>/runs/`: per method and setting, mean ± std over seeds."""
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
        + [m for m in REAL_COMPARE_METHODS if m in summary]
        + sorted(m for m in summary if m not in REAL_COMPARE_METHODS and m != "base")
    )
    for method in [m for m in order if m in summary]:
        cells = [
            f"{v['mean']:.1f} ± {v['std']:.1f}" if v["seeds"] > 1 else f"{v['mean']:.1f}"
            for v in summary[method].values()
        ]
        lines.append(f"| {method} | {next(iter(summary[method].values()))['seeds']} | " + " | ".join(cells) + " |")
    Path(output_dir, "compare.md").write_text("\n".join(lines) + "\n")
    return results
