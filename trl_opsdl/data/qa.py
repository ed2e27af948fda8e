"""Multi-document QA pairs with distractors, from HotpotQA-, MuSiQue- and 2WikiMultihopQA-format records.

The short (teacher) context is the record's gold paragraphs, in their order in the record. The long context is the
gold paragraphs shuffled among distractor paragraphs — the record's own non-gold ones first, then other records' —
until the prompt reaches a target length in tokens; the last distractor is cut at a word boundary to land on it.
Each paragraph is shown as "Document {i}:\\n{title}\\n{text}".
"""

import logging
import random
import re

from ..tokenization import count_tokens
from .lengths import largest_fitting
from .reader import load_records
from .templates import MULTI_DOC_QA_TEMPLATE, QA_ANSWER_PREFIX, render_prompt


logger = logging.getLogger(__name__)

QA_FORMATS = ("hotpotqa", "musique", "2wikimqa")
_FORMAT_ALIASES = {"hotpot_qa": "hotpotqa", "2wikimultihopqa": "2wikimqa", "2wiki": "2wikimqa"}


def _sentences_paragraphs(context) -> list[tuple[str, str]]:
    """(title, text) pairs from a HotpotQA/2Wiki `context`: [[title, [sentences]], ...] or the hub's
    {"title": [...], "sentences": [[...]]}."""
    if isinstance(context, dict):
        context = list(zip(context["title"], context["sentences"]))
    return [(title, " ".join(s.strip() for s in sentences if s.strip())) for title, sentences in context]


def _supporting_titles(facts) -> list[str]:
    if isinstance(facts, dict):
        return list(facts["title"])
    return [fact[0] for fact in facts]


def parse_record(record: dict, format: str):
    """
    Normalize one record to `(question, answers, paragraphs, gold)` where `paragraphs` is a list of `(title, text)`
    and `gold` the indices of the supporting paragraphs in record order. Returns a reason string for records to skip.
    """
    format = _FORMAT_ALIASES.get(format, format)
    if format not in QA_FORMATS:
        raise ValueError(f"Unknown QA format {format!r}; choose among {', '.join(QA_FORMATS)}.")
    required = {
        "hotpotqa": ("question", "answer", "context", "supporting_facts"),
        "musique": ("question", "answer", "paragraphs"),
    }
    required["2wikimqa"] = required["hotpotqa"]
    missing = [key for key in required[format] if key not in record]
    if missing:
        raise ValueError(
            f"A {format} record lacks the field(s) {missing} (it has {sorted(record)}). Check --format: hotpotqa and "
            "2wikimqa need question/answer/context/supporting_facts, musique needs question/answer/paragraphs."
        )
    question = str(record["question"]).strip()
    answers = [str(record["answer"])] + [str(a) for a in record.get("answer_aliases", []) or []]
    if not question:
        return "empty question"
    if format == "musique":
        if record.get("answerable") is False:
            return "unanswerable"
        paragraphs = [(p.get("title", ""), p["paragraph_text"].strip()) for p in record["paragraphs"]]
        gold = [i for i, p in enumerate(record["paragraphs"]) if p.get("is_supporting")]
    else:
        paragraphs = _sentences_paragraphs(record["context"])
        titles = set(_supporting_titles(record["supporting_facts"]))
        gold = [i for i, (title, _) in enumerate(paragraphs) if title in titles]
        if len({paragraphs[i][0] for i in gold}) < len(titles):
            return "a supporting fact's title is not among the context paragraphs"
    if not gold:
        return "no supporting paragraph"
    if not any(text for _, text in paragraphs):
        return "empty context"
    return question, answers, paragraphs, gold


def format_documents(paragraphs) -> str:
    """'Document 1:\\n{title}\\n{text}\\n\\nDocument 2:...' for `(title, text)` pairs (a title may be empty)."""
    return "\n\n".join(
        f"Document {i}:\n{title}\n{text}" if title else f"Document {i}:\n{text}"
        for i, (title, text) in enumerate(paragraphs, start=1)
    )


def paragraph_text(title: str, text: str) -> str:
    """A paragraph as it appears inside a document block (the gold evidence strings)."""
    return f"{title}\n{text}" if title else text


def build_multidoc_qa(
    records,
    format: str,
    tokenizer,
    lengths=(4096,),
    num_samples: int | None = None,
    seed: int = 0,
    conversational: bool = False,
    template: str = MULTI_DOC_QA_TEMPLATE,
    answer_prefix: str = QA_ANSWER_PREFIX,
    include_context: bool = True,
    tolerance: float = 0.05,
    split: str = "train",
):
    """
    Build multi-document QA (long prompt, short teacher prompt) pairs.

    Args:
        records (`str`, `list[dict]` or [`~datasets.Dataset`]):
            HotpotQA/2WikiMultihopQA records (`question`, `answer`, `context`, `supporting_facts`) or MuSiQue records
            (`question`, `answer`, `answer_aliases`, `paragraphs` with `is_supporting`), or a file / hub id holding
            them (see [`load_records`]).
        format (`str`):
            `hotpotqa`, `musique` or `2wikimqa`.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Tokenizer of the model to train; lengths are counted with it.
        lengths (`Sequence[int]`, *optional*, defaults to `(4096,)`):
            Target prompt lengths in tokens; each record gives one row per length.
        num_samples (`int`, *optional*):
            Use this many records (a seeded random choice, kept in file order). `None`: all.
        seed (`int`, *optional*, defaults to `0`):
            Seeds the choice and order of distractors.
        conversational (`bool`, *optional*, defaults to `False`):
            One-user-message conversations instead of plain prompts.
        template / answer_prefix (`str`, *optional*):
            Prompt template with `{context}` and `{question}`, and the text that starts the answer (plain prompts).
        include_context (`bool`, *optional*, defaults to `True`):
            Keep `context`, `question` and `evidence` (the gold paragraphs) columns.
        tolerance (`float`, *optional*, defaults to `0.05`):
            Rows that cannot get within this share of their target (too few distractors) are skipped and counted.

    Records whose gold paragraphs alone exceed a target length, unanswerable or malformed records are skipped; the
    counts are logged as a warning. No row at all is an error.
    """
    from datasets import Dataset

    if tokenizer is None:
        raise ValueError(
            "build_multidoc_qa needs the tokenizer of the model to train: lengths are counted in its tokens."
        )
    format = _FORMAT_ALIASES.get(format, format)
    if format not in QA_FORMATS:
        raise ValueError(f"Unknown QA format {format!r}; choose among {', '.join(QA_FORMATS)}.")
    lengths = [int(n) for n in lengths]
    if not lengths or any(n <= 0 for n in lengths):
        raise ValueError(f"lengths must be positive token counts, got {lengths!r}.")
    records = load_records(records, split=split)
    if not records:
        raise ValueError("No QA records given.")

    parsed, skipped = [], {}
    for i, record in enumerate(records):
        result = parse_record(record, format)
        if isinstance(result, str):
            skipped[result] = skipped.get(result, 0) + 1
        else:
            parsed.append((i, record, result))
    rng = random.Random(f"{seed}/{format}/choice")
    if num_samples is not None and num_samples < len(parsed):
        parsed = [parsed[j] for j in sorted(rng.sample(range(len(parsed)), num_samples))]

    # Distractor pool: every paragraph of every record, deduplicated by text.
    pool, seen = [], set()
    for i, _, (_, _, paragraphs, _) in parsed:
        for title, text in paragraphs:
            if text and (title, text) not in seen:
                seen.add((title, text))
                pool.append((i, title, text))

    rows = []
    for i, record, (question, answers, paragraphs, gold) in parsed:
        for length in lengths:
            row = _build_row(
                i, record, question, answers, paragraphs, gold, pool, length, seed, format, tokenizer,
                conversational, template, answer_prefix, tolerance,
            )  # fmt: skip
            if isinstance(row, str):
                skipped[row] = skipped.get(row, 0) + 1
            else:
                rows.append(row)
    if skipped:
        logger.warning(
            "build_multidoc_qa skipped: %s (%d rows built)",
            ", ".join(f"{n} × {reason}" for reason, n in skipped.items()),
            len(rows),
        )
    if not rows:
        raise ValueError(
            f"No row could be built from {len(records)} {format} records at lengths {lengths}: "
            + ", ".join(f"{n} × {reason}" for reason, n in skipped.items())
        )
    if not include_context:
        rows = [{k: v for k, v in row.items() if k not in ("context", "question", "evidence")} for row in rows]
    return Dataset.from_list(rows)


def _build_row(
    i, record, question, answers, paragraphs, gold, pool, length, seed, format, tokenizer, conversational, template,
    answer_prefix, tolerance,
):  # fmt: skip
    rid = str(record.get("_id", record.get("id", i)))
    rng = random.Random(f"{seed}/{format}/{rid}/{length}")
    gold_paragraphs = [paragraphs[g] for g in gold]
    gold_keys = {(t, x) for t, x in gold_paragraphs}
    gold_titles = {t for t, _ in gold_paragraphs if t}
    own = [(t, x) for j, (t, x) in enumerate(paragraphs) if j not in gold and x and (t, x) not in gold_keys]
    rng.shuffle(own)
    # Other records' paragraphs, never one that shares a gold title (it would repeat or contradict the evidence).
    budget = length // 4 + 20  # a paragraph is at least a few tokens: this many distractors always suffice
    others = [(t, x) for r, t, x in pool if r != i and (t, x) not in gold_keys and t not in gold_titles]
    others = rng.sample(others, min(len(others), budget))
    distractors = own + others
    # Fixed random sort keys: the gold paragraphs land among whichever distractors are used, in a stable order.
    gold_keys_sorted = [rng.random() for _ in gold_paragraphs]
    distractor_keys = [rng.random() for _ in distractors]
    word_ends = [[m.end() for m in re.finditer(r"\S+", x)] for _, x in distractors]
    cumulative = [0]
    for ends in word_ends:
        cumulative.append(cumulative[-1] + len(ends))

    def render(n_words):
        # The first `n_words` distractor words: whole paragraphs, the last one cut at a word boundary.
        chosen, k = [], 0
        while k < len(distractors) and cumulative[k] < n_words:
            title, text = distractors[k]
            take = min(n_words - cumulative[k], len(word_ends[k]))
            chosen.append((distractor_keys[k], (title, text[: word_ends[k][take - 1]])))
            k += 1
        docs = [p for _, p in sorted(chosen + list(zip(gold_keys_sorted, gold_paragraphs)), key=lambda kv: kv[0])]
        return format_documents(docs)

    def tokens(n_words):
        return count_tokens(
            tokenizer, render_prompt(template, render(n_words), question, answer_prefix, conversational)
        )

    if tokens(0) > length:
        return "target length shorter than the gold paragraphs"
    context = render(largest_fitting(tokens, length, cap=cumulative[-1]))
    short_context = format_documents(gold_paragraphs)
    prompt = render_prompt(template, context, question, answer_prefix, conversational)
    num_tokens = count_tokens(tokenizer, prompt)
    if num_tokens < (1 - tolerance) * length:
        return "too few distractor paragraphs to reach the target length"
    teacher_prompt = render_prompt(template, short_context, question, answer_prefix, conversational)
    evidence = [paragraph_text(t, x) for t, x in gold_paragraphs]
    return {
        "prompt": prompt,
        "teacher_prompt": teacher_prompt,
        "answers": answers,
        "task": format,
        "length": length,
        "num_tokens": num_tokens,
        "teacher_num_tokens": count_tokens(tokenizer, teacher_prompt),
        "depth": 100.0 * min(context.index(e) for e in evidence) / len(context),
        "metric": "token_f1",
        "id": f"{rid}-{length}",
        "context": context,
        "question": question,
        "evidence": evidence,
    }
