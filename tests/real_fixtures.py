"""A tiny stand-in for the real path: SQuAD-format articles of made-up facts, a byte-level BPE tokenizer with the
ChatML template (SmolLM2's: system prompt by default, `<|im_end|>` as eos and pad), and a tiny Llama for it.

Nothing here comes from SQuAD or any hub; the BPE is trained on the made-up articles in milliseconds.
"""

import json
import random

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TOWNS = ["Avel", "Brisk", "Corma", "Dunhal", "Elsway", "Farrow", "Gilden", "Harth", "Ivel", "Jorn", "Kell", "Lorn"]
_PEOPLE = ["Mara Quill", "Tomas Reed", "Ina Voss", "Paul Oder", "Lena Sarr", "Ugo Lint", "Ada Mole", "Rik Tane"]
_THINGS = ["bridge", "library", "harbour", "mill", "school", "tower", "market", "canal"]


def squad_articles(num_articles: int = 6, paragraphs: int = 8, seed: int = 0) -> dict:
    """SQuAD-format `{"data": [...]}`: each paragraph states three facts, one of which a question asks about."""
    rng = random.Random(seed)
    data = []
    for a in range(num_articles):
        town = f"{_TOWNS[a % len(_TOWNS)]}{'' if a < len(_TOWNS) else a}"
        items = []
        for p in range(paragraphs):
            thing, person, year = rng.choice(_THINGS), rng.choice(_PEOPLE), rng.randint(1500, 1990)
            filler = " ".join(
                rng.choice(["It", "is", "old", "and", "near", "the", "river", "hill", "road"])
                for _ in range(rng.randint(20, 40))
            )
            context = (
                f"The {thing} of {town} number {p} was built in {year} by {person}. {filler}. "
                f"Visitors of {town} often talk about it."
            )
            qas = [
                {
                    "id": f"{a}-{p}-who",
                    "question": f"Who built the {thing} of {town} number {p}?",
                    "answers": [{"text": person, "answer_start": context.index(person)}],
                },
                {
                    "id": f"{a}-{p}-when",
                    "question": f"When was the {thing} of {town} number {p} built?",
                    "answers": [{"text": str(year), "answer_start": context.index(str(year))}],
                },
            ]
            items.append({"context": context, "qas": qas})
        data.append({"title": f"{town}_history", "paragraphs": items})
    return {"version": "test", "data": data}


def write_squad(path, **kwargs) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(squad_articles(**kwargs), f)
    return str(path)


def bpe_chat_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the made-up articles, ChatML template, eos = pad = `<|im_end|>`, no BOS added."""
    from tests.conftest import bpe_tokenizer

    texts = [p["context"] + " " + q["question"] for a in squad_articles()["data"] for p in a["paragraphs"]
             for q in p["qas"]]  # fmt: skip
    return bpe_tokenizer(texts + [CHATML, "Answer the question using the text below."], vocab_size, chatml=True)


def save_bpe_chat_model(path, seed: int = 0, tokenizer=None) -> str:
    """A tiny Llama with the BPE chat tokenizer (or `tokenizer`), saved as a model folder (as a converted GGUF would
    be)."""
    import torch

    tokenizer = tokenizer or bpe_chat_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_essays(folder, num_essays: int = 14, sentences: int = 60) -> str:
    """A folder of `.txt` essays of short plain sentences; essay `i` alone uses the marker word `essaymark<i>`."""
    import os

    os.makedirs(folder, exist_ok=True)
    rng = random.Random(1)
    for i in range(num_essays):
        words = ["the", "river", "old", "road", "near", "town", "is", "and", f"essaymark{i}"]
        text = " ".join(" ".join(rng.choice(words) for _ in range(6)).capitalize() + "." for _ in range(sentences))
        with open(os.path.join(folder, f"essay{i:02d}.txt"), "w") as f:
            f.write(text)
    return str(folder)
