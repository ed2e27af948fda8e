"""Shared test helpers and fixtures: tiny offline models and tokenizers (nothing is downloaded), data rows, and an
`OPSDLTrainer` on them.

The tokenizer and model come from the tests' own factories (`tests.tiny_models`: `word_level_tokenizer` and
`tiny_llama`), which the benchmarks use too. Plain helpers are imported (`from tests.conftest import trainer_for`) by
tests and by the multi-process workers; fixtures wrap the common ones.
"""

import string

import pytest
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.tiny_models import SPECIAL_TOKENS, tiny_llama, word_level_tokenizer
from trl_opsdl import OPSDLConfig, OPSDLTrainer


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


# ---- tiny tokenizer and model --------------------------------------------------------------------------------------


def tiny_tokenizer(chat_template: bool = True, pad: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (one token per whitespace-separated word), loaded the way the host notes advise."""
    return word_level_tokenizer(["user", "assistant", "system"] + WORDS, CHAT_TEMPLATE if chat_template else None, pad)


def tiny_model(tokenizer=None, seed: int = 0, hidden_size: int = 32, num_layers: int = 2, vocab_size=None):
    """A randomly initialised 2-layer Llama whose vocabulary matches `tokenizer`."""
    return tiny_llama(
        tokenizer or tiny_tokenizer(),
        seed,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=2 * hidden_size,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


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


# ---- an OPSDLTrainer on the tiny model -----------------------------------------------------------------------------


def config(tmp_path, **kwargs) -> OPSDLConfig:
    """A CPU-sized `OPSDLConfig`: batch 4, 5 completion tokens, no checkpointing, no reporting."""
    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_completion_length=5,
        report_to="none",
        gradient_checkpointing=False,
        save_strategy="no",
        logging_steps=1,
        learning_rate=1e-3,
    )
    defaults.update(kwargs)
    return OPSDLConfig(**defaults)


def trainer_for(tmp_path, rows=None, model=None, tokenizer=None, **kwargs) -> OPSDLTrainer:
    """An `OPSDLTrainer` on `rows` (default: 8 key-value rows); `peft_config`/`teacher_model` and config fields
    go in `kwargs`."""
    tokenizer = tokenizer or tiny_tokenizer()
    model = model if model is not None else tiny_model(tokenizer)
    peft_config = kwargs.pop("peft_config", None)
    teacher_model = kwargs.pop("teacher_model", None)
    dataset = Dataset.from_list(rows if rows is not None else kv_rows(8))
    return OPSDLTrainer(
        model=model,
        teacher_model=teacher_model,
        args=config(tmp_path, **kwargs),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def generate(trainer, n=4):
    """One generation batch of the first `n` training rows, in training mode (as `_prepare_inputs` builds it)."""
    trainer.model.train()
    return trainer._generate_and_score_completions(list(trainer.train_dataset.select(range(n))))


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture
def trainer(tmp_path):
    return trainer_for(tmp_path)


# ---- other tokenizers and data -------------------------------------------------------------------------------------


def bpe_tokenizer(texts, vocab_size: int = 400, chatml: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` in a blink: stands in for a real model's subword tokenizer.
    `chatml=True`: SmolLM2's conventions instead — ChatML template with a default system prompt, eos = pad =
    `<|im_end|>`, no BOS added (see `tests/real_fixtures.py`)."""
    from tokenizers import decoders, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if chatml else SPECIAL_TOKENS
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer)
    if chatml:
        from tests.real_fixtures import CHATML

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
            unk_token="<|endoftext|>",
        )  # fmt: skip
        tokenizer.chat_template = CHATML
        return tokenizer
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
