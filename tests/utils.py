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


def bpe_tokenizer(texts, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` in a blink: stands in for a real model's subword tokenizer."""
    from tokenizers import decoders, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def hotpot_records():
    """Three HotpotQA-format records (two gold paragraphs each). Only the first-hop paragraph shares words with its
    question, except in the second record where both do; no other paragraph shares a question word."""
    return [
        {
            "_id": "r0",
            "question": "Which river flows through the capital of Zorbia?",
            "answer": "Ansu",
            "supporting_facts": [["Zorbia", 1], ["Kelmar", 1]],
            "context": [
                ["Plimb", ["Plimb is a mountain.", " It is covered in snow."]],
                ["Zorbia", ["Zorbia is a country in the north.", " The capital of Zorbia is Kelmar."]],
                ["Orvo", ["Orvo is a lake.", " Fish live in it."]],
                ["Kelmar", ["Kelmar is an old town.", " The Ansu runs past its walls."]],
            ],
        },
        {
            "_id": "r1",
            "question": "Who founded the company that makes the Tarvel phone?",
            "answer": "Mira Sol",
            "supporting_facts": [["Tarvel", 0], ["Quenco", 0]],
            "context": [
                ["Tarvel", ["The Tarvel phone is made by Quenco."]],
                ["Gossa", ["Gossa is a green bird.", " It sings at dawn."]],
                ["Quenco", ["Quenco was founded by Mira Sol in 1990.", " The company is based in Druna."]],
                ["Hemmet", ["Hemmet is a card game.", " Four people play it."]],
            ],
        },
        {
            "_id": "r2",
            "question": "What language is spoken in the birthplace of Dovan Ilk?",
            "answer": "Brekish",
            "supporting_facts": [["Dovan Ilk", 0], ["Sarnau", 0]],
            "context": [
                ["Velk", ["Velk is a small fish.", " It is silver."]],
                ["Dovan Ilk", ["Dovan Ilk was born in Sarnau."]],
                ["Sarnau", ["People in Sarnau speak Brekish."]],
                ["Tamsin", ["Tamsin is a red flower.", " It opens in spring."]],
            ],
        },
    ]
