"""The CPU demo: a tiny model that is good at short contexts and bad at long ones, fixed by OPSDL in minutes.

Three parts, each a plain function over one config:

1. `pretrain_demo_model` — builds a word-level tokenizer and a 3-layer, hidden-128 Llama and trains it from scratch on
   key → value retrieval with 1–8 pairs (loss on answer tokens only). Run once, offline
   (`examples/scripts/pretrain_demo_model.py`); the result ships in `trl_opsdl/assets/demo_model/`.
2. `run_demo` — evaluates that model on short and long contexts, trains it with `OPSDLTrainer` on long prompts
   (teacher = the same model on the single relevant pair), evaluates again, writes `results.json` and a plot.
3. `run_compare` — the same examples and step budget through TRL's `SFTTrainer` and `DPOTrainer` baselines and
   OPSDL's loss modes and teacher kinds, over several seeds.
"""

import copy
import json
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .data.kv import build_kv_retrieval, format_question, kv_symbols, sample_kv_context


DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "demo_model"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
NUM_KEYS, NUM_VALUES, VALUE_LENGTH = 128, 32, 3
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- tokenizer and model ------------------------------------------------------------------------------------------


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the key-value symbols: one token per whitespace-separated word, no BOS added."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + kv_symbols(NUM_KEYS, NUM_VALUES))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
    )


def build_demo_model(
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 3,
    num_heads: int = 4,
    tie_word_embeddings: bool = True,
    initializer_range: float = 0.02,
):
    """A randomly initialised Llama (0.8M parameters at the defaults) whose vocabulary is `tokenizer`'s."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def load_demo_model(path: str | Path | None = None):
    """Load a demo model and tokenizer from `path` (default: the pretrained one shipped in the package)."""
    path = Path(path) if path is not None else DEMO_MODEL_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"No demo model at {str(path)!r} (no config.json). Rebuild it with "
            "`python examples/scripts/pretrain_demo_model.py` or `trl-opsdl demo --rebuild-model`, or pass the "
            "folder it was saved to."
        )
    # Never AutoTokenizer: on some model types it rebuilds a BPE tokenizer and drops every word of ours.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path)
    return model, tokenizer


# --- pretraining --------------------------------------------------------------------------------------------------


@dataclass
class PretrainConfig:
    """How the shipped demo model was pretrained (the defaults reproduce it)."""

    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    min_pairs: int = 1
    max_pairs: int = 8
    questions_per_sequence: int = 4
    seed: int = 0
    num_threads: int = 1  # one thread: bitwise the same on any machine, and fastest on a shared one
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    copy_ratio: float = 0.5
    copy_max_length: int = 24


def _pretrain_batch(rng: random.Random, tokenizer, config: PretrainConfig):
    """Right-padded sequences `pairs… (Q K V V V </s>) × questions`, with labels on the answer and end tokens only."""
    vocab = tokenizer.get_vocab()
    eos = tokenizer.eos_token_id
    input_ids, labels = [], []
    symbols = kv_symbols(NUM_KEYS, NUM_VALUES)[1:]
    for _ in range(config.batch_size):
        if config.copy_ratio > 0 and rng.random() < config.copy_ratio:
            # Repeated random tokens, loss on the repeat: teaches the model to look up what followed a token before.
            seq = [vocab[tok] for tok in rng.choices(symbols, k=rng.randint(4, config.copy_max_length))]
            input_ids.append(seq + seq)
            labels.append([-100] * (len(seq) + 1) + seq[1:])
            continue
        pairs = sample_kv_context(rng, rng.randint(config.min_pairs, config.max_pairs), NUM_KEYS, NUM_VALUES)
        ids = [vocab[tok] for key, value in pairs for tok in (key, *value)]
        labs = [-100] * len(ids)
        for _ in range(config.questions_per_sequence):
            key, value = pairs[rng.randrange(len(pairs))]
            question = [vocab[tok] for tok in format_question(key).split()]
            answer = [vocab[tok] for tok in value] + [eos]
            ids += question + answer
            labs += [-100] * len(question) + answer
        input_ids.append(ids)
        labels.append(labs)
    width = max(len(ids) for ids in input_ids)
    # Right padding under a causal mask: no real token attends to a pad, so no attention mask is needed.
    input_ids_BT = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in input_ids])
    labels_BT = torch.tensor([labs + [-100] * (width - len(labs)) for labs in labels])
    return input_ids_BT, labels_BT


def pretrain_demo_model(
    config: PretrainConfig | None = None, output_dir: str | Path | None = None, log: Callable[[str], None] = print
):
    """Train the demo model from scratch on short contexts; save it (fp32 safetensors + tokenizer) to `output_dir`."""
    config = config or PretrainConfig()
    torch.set_num_threads(config.num_threads)
    tokenizer = build_demo_tokenizer()
    model = build_demo_model(
        tokenizer,
        config.seed,
        config.hidden_size,
        config.num_layers,
        config.num_heads,
        config.tie_word_embeddings,
        config.initializer_range,
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    def lr_factor(step):  # linear warmup, then cosine decay to zero
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = random.Random(config.seed)
    start, running = time.time(), None
    for step in range(config.steps):
        input_ids_BT, labels_BT = _pretrain_batch(rng, tokenizer, config)
        loss = model(input_ids=input_ids_BT, labels=labels_BT).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 100 == 0 or step + 1 == config.steps:
            log(f"pretrain step {step + 1}/{config.steps}  loss {running:.4f}  {time.time() - start:.0f}s")
    model.eval()
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        (output_dir / "pretrain_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    return model, tokenizer


# --- evaluation ---------------------------------------------------------------------------------------------------


def eval_sets(short_pairs: int, long_pairs, num_examples: int) -> dict:
    """Fixed evaluation sets (`short`, then `long_<n>` by increasing n); their seeds never meet a training seed."""
    sets = {"short": build_kv_retrieval(num_examples, short_pairs, seed=1_000_000 + short_pairs)}
    for n in sorted(long_pairs):
        sets[f"long_{n}"] = build_kv_retrieval(num_examples, n, seed=1_000_000 + n)
    return sets


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], batch_size: int = 250, max_new_tokens: int = 4) -> list[str]:
    """Greedy completions cut at the first end token; a completion that never ends keeps all its tokens."""
    was_training = model.training
    model.eval()
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
        output_ids = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for ids in output_ids[:, batch["input_ids"].shape[1] :].tolist():
            ended = tokenizer.eos_token_id in ids
            ids = ids[: ids.index(tokenizer.eos_token_id)] if ended else ids
            answers.append(" ".join(tokenizer.convert_ids_to_tokens(ids)) + ("" if ended else " <no-end>"))
    model.train(was_training)
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


@dataclass
class DemoConfig:
    """Everything `trl-opsdl demo` does; the defaults are the documented experiment (docs/demo.md)."""

    output_dir: str = "opsdl-demo"
    model_path: str | None = None  # None: the pretrained model shipped in trl_opsdl/assets/demo_model
    seed: int = 0
    # Training: `max_steps` batches of `batch_size` long prompts, each with `train_pairs` pairs.
    max_steps: int = 150
    batch_size: int = 32
    learning_rate: float = 1e-3
    temperature: float = 1.0
    train_pairs: tuple[int, int] = (16, 32)
    distillation_mode: str = "full_logits"
    teacher_model_kind: str = "base"
    short_prompt_ratio: float = 0.0
    lora: bool = True  # the base teacher is then the adapter-free model; keeps short-context accuracy (docs)
    lora_r: int = 16
    lora_target_modules: tuple[str, ...] = ALL_LINEAR
    # Evaluation: `short` has `short_pairs` pairs, then one setting per entry of `long_pairs`.
    short_pairs: int = 4
    long_pairs: tuple[int, ...] = (16, 24, 32)
    eval_examples: int = 500
    eval_batch_size: int = 250
    save_model: bool = False  # also save the trained model and tokenizer to <output_dir>/model
    num_threads: int = 1  # 2 threads are faster only on an idle machine, and 4x slower on a shared one
    logging_steps: int = 10


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


def opsdl_args(config: DemoConfig, output_dir: str | Path, **overrides):
    """The `OPSDLConfig` the demo trains with: small CPU-friendly settings, no checkpoints, no reporting."""
    from .opsdl_config import OPSDLConfig

    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant",
        temperature=config.temperature,
        max_completion_length=VALUE_LENGTH + 1,  # the value tokens + the end token
        distillation_mode=config.distillation_mode,
        teacher_model_kind=config.teacher_model_kind,
        short_prompt_ratio=config.short_prompt_ratio,
        seed=config.seed,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=config.logging_steps,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(_no_checkpointing(OPSDLConfig))
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

    from .opsdl_trainer import OPSDLTrainer

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
    settings["model_path"] = str(config.model_path or DEMO_MODEL_DIR)
    settings["pairs"] = {"short": config.short_pairs, **{f"long_{n}": n for n in sorted(config.long_pairs)}}
    return json.loads(json.dumps(settings))  # tuples as lists: what results.json holds


def run_demo(config: DemoConfig | None = None, log: Callable[[str], None] = print) -> dict:
    """Evaluate the demo model, train it with OPSDL on long prompts, evaluate again; write results.json and a plot."""
    config = config or DemoConfig()
    start = time.time()
    check_demo_config(config)
    torch.set_num_threads(config.num_threads)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

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
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if config.save_model:
        model.save_pretrained(output_dir / "model")
        tokenizer.save_pretrained(output_dir / "model")
    plot_demo(results, output_dir / "accuracy_vs_context.png")
    log("\n" + demo_table(results))
    log(f"wrote {output_dir / 'results.json'} and {output_dir / 'accuracy_vs_context.png'}")
    return results


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


# --- the comparison: TRL's SFT and DPO baselines, OPSDL's loss modes and teacher kinds, several seeds -------------

# A method is `trainer` (opsdl | sft_gold | sft_self | dpo) plus `DemoConfig` fields that differ from the demo's.
COMPARE_METHODS = {
    "opsdl": {},
    "opsdl_topk_logits": {"distillation_mode": "topk_logits"},
    "opsdl_sampled_token": {"distillation_mode": "sampled_token"},
    "opsdl_teacher_ema": {"teacher_model_kind": "ema"},
    "opsdl_teacher_live": {"teacher_model_kind": "live"},
    "sft_gold": {"trainer": "sft_gold"},
    "sft_self": {"trainer": "sft_self"},
    "dpo_longpo": {"trainer": "dpo"},
    "dpo_longpo_lr=1e-4": {"trainer": "dpo", "learning_rate": 1e-4},  # DPO collapses at the shared lr (docs/demo.md)
}
# What keeps short-context accuracy: full fine-tuning (the prototype's recipe) with short prompts mixed in, other
# learning rates, steps or context lengths, against LoRA. Each spec is complete, so it does not move with the defaults.
_FULL = {"lora": False, "learning_rate": 3e-4}
_LORA = {"lora": True, "learning_rate": 1e-3}
ABLATION_METHODS = {
    "full_lr=3e-4": _FULL,
    "full_lr=1e-4": {**_FULL, "learning_rate": 1e-4},
    "full_lr=1e-3": {**_FULL, "learning_rate": 1e-3},
    "full_lr=3e-4_spr=0.125": {**_FULL, "short_prompt_ratio": 0.125},
    "full_lr=3e-4_spr=0.25": {**_FULL, "short_prompt_ratio": 0.25},
    "full_lr=3e-4_spr=0.5": {**_FULL, "short_prompt_ratio": 0.5},
    "full_lr=3e-4_steps=300": {**_FULL, "max_steps": 300},
    "full_lr=3e-4_train_pairs=4-32": {**_FULL, "train_pairs": (4, 32)},
    "lora_r=16_lr=1e-3 (default)": _LORA,
    "lora_r=16_lr=5e-4": {**_LORA, "learning_rate": 5e-4},
    "lora_r=16_lr=2e-3": {**_LORA, "learning_rate": 2e-3},
    "lora_r=4_lr=1e-3": {**_LORA, "lora_r": 4},
    "lora_attention_r=16_lr=1e-3": {**_LORA, "lora_target_modules": ("q_proj", "k_proj", "v_proj", "o_proj")},
    "lora_r=16_lr=1e-3_spr=0.125": {**_LORA, "short_prompt_ratio": 0.125},
    "lora_r=16_lr=1e-3_steps=75": {**_LORA, "max_steps": 75},
}
METHOD_SETS = {"compare": COMPARE_METHODS, "ablation": ABLATION_METHODS}


def _baseline_args(config_class, config: DemoConfig, output_dir, **overrides):
    """TRL's SFT/DPO configs with the demo's step budget, batch, learning rate and schedule."""
    kwargs = dict(
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
        max_length=None,
        **_no_checkpointing(config_class),
    )
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
        check_demo_config(replace(config, **{k: v for k, v in spec.items() if k != "trainer"}))
    torch.set_num_threads(config.num_threads)
    output_dir = Path(config.output_dir)
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
