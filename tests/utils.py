"""Tiny offline models and tokenizers for tests: nothing is downloaded."""

import string

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = (
    [f"w{i}" for i in range(40)]
    + list(string.ascii_lowercase)
    + [str(i) for i in range(10)]
    + ["Document", "Question", "Answer", "Context", "key", "value", "is", "the", "of", ":", ".", "?", ","]
)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<s> ' + m['role'] + ' : ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s> assistant : ' }}{% endif %}"
)


def tiny_tokenizer(chat_template: bool = True, pad: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (one token per whitespace-separated word), loaded the way the host notes advise."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ["user", "assistant", "system"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if pad else None,
        padding_side="left",
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(tokenizer=None, seed: int = 0, hidden_size: int = 32, num_layers: int = 2, vocab_size=None):
    """A randomly initialised 2-layer Llama whose vocabulary matches `tokenizer`."""
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny(path, seed: int = 0):
    """Write a tiny model and tokenizer to `path`, to exercise the code that loads from a local folder."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def kv_rows(n: int = 8, seed: int = 0, conversational: bool = False):
    """Long/short prompt pairs: a few `key x value y` facts, only one of which the question needs."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        keys = rng.sample(string.ascii_lowercase, 6)
        values = [str(rng.randrange(10)) for _ in keys]
        facts = [f"key {k} value {v} ." for k, v in zip(keys, values)]
        asked = rng.randrange(len(keys))
        question = f"Question : value of {keys[asked]} ?"
        prompt = " ".join(facts) + " " + question
        teacher_prompt = facts[asked] + " " + question
        if conversational:
            prompt = [{"role": "user", "content": prompt}]
            teacher_prompt = [{"role": "user", "content": teacher_prompt}]
        rows.append({"prompt": prompt, "teacher_prompt": teacher_prompt, "answers": [values[asked]]})
    return rows
