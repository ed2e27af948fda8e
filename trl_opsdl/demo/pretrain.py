"""How the shipped demo model was made: pretraining the tiny Llama from scratch on short key-value contexts.

Run once, offline (`examples/scripts/pretrain_demo_model.py`, or `trl-opsdl demo --rebuild-model`); the result ships in
`trl_opsdl/assets/demo_model/`. Not imported by `trl-opsdl demo` itself.
"""

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data.kv import format_question, kv_symbols, sample_kv_context
from .model import NUM_KEYS, NUM_VALUES, build_demo_model, build_demo_tokenizer


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
    input_ids_BL = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in input_ids])
    labels_BL = torch.tensor([labs + [-100] * (width - len(labs)) for labs in labels])
    return input_ids_BL, labels_BL


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
        input_ids_BL, labels_BL = _pretrain_batch(rng, tokenizer, config)
        loss = model(input_ids=input_ids_BL, labels=labels_BL).loss
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
