"""Short contexts when no evidence is annotated, and pairs built from user columns.

Three ways to shorten a context for the teacher:
- [`BM25Extractor`]: split the context into chunks, keep the top-k chunks for the question by BM25 (`bm25s`), in their
  original order, within a token budget.
- [`SelfExtractor`]: the model itself quotes the passages that answer the question; only quotes found in the context
  (verbatim, or after a fuzzy match that is counted) are kept, in context order; rows with none fall back to BM25.
- any callable `(context, question) -> short_context`.
[`build_from_columns`] turns rows with `context`, `question` (and `evidence` when annotated) into OPSDL rows, and
[`dataset_report`] says how much shorter the teacher prompts are and, against gold evidence, the extractor's recall.
"""

import difflib
import logging
import re

from .templates import QA_ANSWER_PREFIX, QA_TEMPLATE, count_tokens, render_prompt, replace_context


logger = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def _size_fn(tokenizer):
    if tokenizer is None:
        return lambda texts: [len(t.split()) for t in texts]
    return lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def _boundary_spans(text: str, start: int, end: int, pattern: re.Pattern) -> list[tuple[int, int]]:
    """Split `text[start:end]` after each match of `pattern`; the spans cover the range without gaps."""
    spans, cursor = [], start
    for match in pattern.finditer(text, start, end):
        if match.end() > cursor and match.start() > cursor:
            spans.append((cursor, match.end()))
            cursor = match.end()
    if cursor < end:
        spans.append((cursor, end))
    return spans


def split_chunks(context: str, chunk_size: int = 128, tokenizer=None) -> list[tuple[int, int]]:
    """
    Split `context` into chunks of at most about `chunk_size` tokens (whitespace words without a tokenizer).

    Paragraphs (separated by blank lines) are chunks of their own; a longer paragraph is packed sentence by sentence
    (a sentence ends at `.`, `!`, `?` or a line break), and a sentence longer than a chunk is cut into word windows.

    Returns:
        `list[tuple[int, int]]`: character spans, in order, that cover the whole context without gaps.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}.")
    size = _size_fn(tokenizer)
    paragraphs = _boundary_spans(context, 0, len(context), re.compile(r"\n\s*\n"))
    paragraph_sizes = size([context[s:e] for s, e in paragraphs])
    chunks = []
    for (p_start, p_end), p_size in zip(paragraphs, paragraph_sizes):
        if p_size <= chunk_size:
            chunks.append((p_start, p_end))
            continue
        sentences = _boundary_spans(context, p_start, p_end, _SENTENCE_END)
        sentence_sizes = size([context[s:e] for s, e in sentences])
        current, current_size = None, 0
        for (s, e), n in zip(sentences, sentence_sizes):
            if n > chunk_size:  # a run-on sentence: word windows of about `chunk_size` tokens
                if current:
                    chunks.append(current)
                    current, current_size = None, 0
                words = [m.end() for m in re.finditer(r"\S+", context[s:e])]
                per_window = max(1, len(words) * chunk_size // n)
                cursor = s
                for k in range(per_window, len(words), per_window):
                    chunks.append((cursor, s + words[k - 1]))
                    cursor = s + words[k - 1]
                chunks.append((cursor, e))
            elif current is not None and current_size + n <= chunk_size:
                current, current_size = (current[0], e), current_size + n
            else:
                if current:
                    chunks.append(current)
                current, current_size = (s, e), n
        if current:
            chunks.append(current)
    return chunks


def join_spans(context: str, spans, separator: str = "\n") -> str:
    """The text of `spans` in context order; adjacent spans are merged, so text that crossed a chunk boundary stays
    verbatim."""
    merged = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return separator.join(context[s:e].strip() for s, e in merged if context[s:e].strip())


class BM25Extractor:
    """
    Keep the chunks of the context that BM25 ranks highest for the question, in their original order.

    Args:
        top_k (`int`, *optional*, defaults to `4`):
            At most this many chunks.
        chunk_size (`int`, *optional*, defaults to `128`):
            Chunk size in tokens (whitespace words without a tokenizer); see [`split_chunks`].
        budget (`int`, *optional*):
            At most this many tokens of chunks in total (a chunk that would overflow is passed over for the next).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Measures chunks and budget in the model's tokens.
        separator (`str`, *optional*, defaults to `"\\n"`):
            Placed between kept chunks that are not adjacent in the context.

    Only chunks sharing a term with the question (after lower-casing and English stop-word removal) are kept; when
    none does, the first chunk is kept so that the short context is never empty.
    """

    def __init__(
        self, top_k: int = 4, chunk_size: int = 128, budget: int | None = None, tokenizer=None, separator="\n"
    ):
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}.")
        if budget is not None and budget < chunk_size:
            raise ValueError(f"budget ({budget}) must be at least chunk_size ({chunk_size}): no chunk could fit.")
        self.top_k, self.chunk_size, self.budget = top_k, chunk_size, budget
        self.tokenizer, self.separator = tokenizer, separator

    def select(self, context: str, question: str) -> list[tuple[int, int]]:
        """Character spans of the kept chunks, in context order."""
        import bm25s

        spans = split_chunks(context, self.chunk_size, self.tokenizer)
        texts = [context[s:e] for s, e in spans]
        corpus_tokens = bm25s.tokenize(texts, stopwords="en", show_progress=False, return_ids=False)
        query = bm25s.tokenize([question], stopwords="en", show_progress=False, return_ids=False)[0]
        if query and any(corpus_tokens):
            retriever = bm25s.BM25()
            retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
            scores = [float(x) for x in retriever.get_scores(query)]
        else:
            scores = [0.0] * len(spans)
        ranked = sorted((i for i in range(len(spans)) if scores[i] > 0), key=lambda i: (-scores[i], i))
        if not ranked:
            ranked = [0]
        sizes = _size_fn(self.tokenizer)([texts[i] for i in ranked])
        kept, used = [], 0
        for i, n in zip(ranked, sizes):
            if len(kept) == self.top_k:
                break
            if self.budget is not None and used + n > self.budget:
                continue
            kept.append(spans[i])
            used += n
        return sorted(kept)

    def __call__(self, context: str, question: str) -> str:
        return join_spans(context, self.select(context, question), self.separator)


SELF_EXTRACT_TEMPLATE = (
    "Copy, word for word, the sentences of the text below that are needed to answer the question. "
    "Write each copied sentence on its own line and write nothing else.\n\nText:\n{context}\n\nQuestion: {question}"
)
SELF_EXTRACT_ANSWER_PREFIX = "\nCopied sentences:\n"


class SelfExtractor:
    """
    Ask the model to quote the passages of the context that answer the question; keep only what the context contains.

    Each generated line is a quote. A quote found verbatim in the context is kept as is; otherwise it is matched
    case- and whitespace-insensitively, then sentence by sentence to the most similar context sentence (difflib
    ratio at least `min_similarity`); such matches are counted as fuzzy. The rest is rejected. A row with no kept
    quote falls back to `fallback` (BM25 by default). Kept passages are the context's own text, in context order.
    Counts are in `self.stats`: `quotes`, `exact`, `fuzzy`, `rejected`, `fallback_rows`, `rows`.

    Args:
        model ([`~transformers.PreTrainedModel`]):
            The model that will be trained (or any causal LM).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer.
        max_new_tokens (`int`, *optional*, defaults to `256`):
            Generation budget for the quotes.
        batch_size (`int`, *optional*, defaults to `8`):
            Prompts generated together.
        min_similarity (`float`, *optional*, defaults to `0.8`):
            Lowest difflib ratio for a fuzzy match.
        fallback (`callable`, *optional*):
            Used for rows without a kept quote. Defaults to `BM25Extractor(tokenizer=tokenizer)`.
        conversational (`bool`, *optional*):
            Ask through the chat template. Defaults to whether the tokenizer has one.
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over the batches.
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_new_tokens: int = 256,
        batch_size: int = 8,
        min_similarity: float = 0.8,
        fallback=None,
        conversational: bool | None = None,
        progress: bool = True,
    ):
        if tokenizer is None:
            raise ValueError("SelfExtractor needs the model's tokenizer.")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size, self.min_similarity = max_new_tokens, batch_size, min_similarity
        self.fallback = fallback if fallback is not None else BM25Extractor(tokenizer=tokenizer)
        if conversational is None:
            conversational = getattr(tokenizer, "chat_template", None) is not None
        self.conversational, self.progress = conversational, progress
        self.stats = {"rows": 0, "quotes": 0, "exact": 0, "fuzzy": 0, "rejected": 0, "fallback_rows": 0}

    def __call__(self, context: str, question: str) -> str:
        return self.extract_many([context], [question])[0]

    def extract_many(self, contexts: list[str], questions: list[str]) -> list[str]:
        from ..evaluation import greedy_generate

        prompts = [
            render_prompt(SELF_EXTRACT_TEMPLATE, c, q, SELF_EXTRACT_ANSWER_PREFIX, self.conversational)
            for c, q in zip(contexts, questions)
        ]
        outputs = greedy_generate(
            self.model, self.tokenizer, prompts, self.max_new_tokens, self.batch_size, progress=self.progress
        )
        return [self.match_quotes(c, q, out) for c, q, out in zip(contexts, questions, outputs)]

    def match_quotes(self, context: str, question: str, generation: str) -> str:
        """Keep the quotes of `generation` that the context contains; fall back when none is."""
        self.stats["rows"] += 1
        spans = []
        sentences = None
        for line in generation.splitlines():
            quote = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s+", "", line).strip().strip("\"'“”‘’").strip()
            if len(quote.split()) < 2:
                continue  # blank lines, bullets, lone words: not a quote
            self.stats["quotes"] += 1
            start = context.find(quote)
            if start >= 0:
                spans.append((start, start + len(quote)))
                self.stats["exact"] += 1
                continue
            loose = re.search(r"\s+".join(re.escape(w) for w in quote.split()), context, flags=re.IGNORECASE)
            if loose:
                spans.append(loose.span())
                self.stats["fuzzy"] += 1
                continue
            if sentences is None:
                sentences = [(s, e) for s, e in _boundary_spans(context, 0, len(context), _SENTENCE_END)]
            matched = self._fuzzy(context, quote, sentences)
            if matched:
                spans.extend(matched)
                self.stats["fuzzy"] += 1
            else:
                self.stats["rejected"] += 1
        if not spans:
            self.stats["fallback_rows"] += 1
            return self.fallback(context, question)
        return join_spans(context, spans)

    def _fuzzy(self, context, quote, sentences):
        matched = []
        for part in [p for p in _SENTENCE_END.split(quote) if p.strip()]:
            best, best_ratio = None, self.min_similarity
            for s, e in sentences:
                matcher = difflib.SequenceMatcher(None, part.lower(), context[s:e].strip().lower(), autojunk=False)
                if matcher.real_quick_ratio() >= best_ratio and matcher.quick_ratio() >= best_ratio:
                    ratio = matcher.ratio()
                    if ratio >= best_ratio:
                        best, best_ratio = (s, e), ratio
            if best is None:
                return []  # one unmatched sentence rejects the whole quote
            matched.append(best)
        return matched


def evidence_recall(short_context: str, evidence) -> float | None:
    """Share (0 to 1) of the gold evidence pieces that occur in `short_context` (whitespace-insensitive).
    `None` without evidence."""
    pieces = [evidence] if isinstance(evidence, str) else [e for e in (evidence or []) if e and e.strip()]
    if not pieces:
        return None
    haystack = " ".join(short_context.split())
    return sum(" ".join(p.split()) in haystack for p in pieces) / len(pieces)


def dataset_report(dataset, tokenizer=None) -> dict:
    """
    How much shorter the teacher prompts are, and (where a row has both gold `evidence` and an extracted
    `short_context`) the extractor's evidence recall.

    Returns:
        `dict` with `rows`, `mean_prompt_tokens`, `mean_teacher_prompt_tokens`, `token_ratio` (mean over rows of
        teacher tokens / prompt tokens), `compression` (total prompt tokens / total teacher tokens), and
        `evidence_recall` (0 to 1, mean over rows with gold evidence; `None` when there is none to compare).
    """
    columns = dataset.column_names
    if "num_tokens" in columns and "teacher_num_tokens" in columns:
        long_n, short_n = list(dataset["num_tokens"]), list(dataset["teacher_num_tokens"])
    else:
        if tokenizer is None:
            raise ValueError("dataset_report needs a tokenizer when the dataset has no num_tokens/teacher_num_tokens.")
        long_n = [count_tokens(tokenizer, p) for p in dataset["prompt"]]
        short_n = [count_tokens(tokenizer, p) for p in dataset["teacher_prompt"]]
    report = {
        "rows": len(long_n),
        "mean_prompt_tokens": sum(long_n) / max(1, len(long_n)),
        "mean_teacher_prompt_tokens": sum(short_n) / max(1, len(short_n)),
        "token_ratio": sum(s / max(1, n) for s, n in zip(short_n, long_n)) / max(1, len(long_n)),
        "compression": sum(long_n) / max(1, sum(short_n)),
        "evidence_recall": None,
    }
    if "evidence" in columns and "short_context" in columns:
        recalls = [evidence_recall(s, e) for s, e in zip(dataset["short_context"], dataset["evidence"])]
        recalls = [r for r in recalls if r is not None]
        report["evidence_recall"] = sum(recalls) / len(recalls) if recalls else None
        report["evidence_rows"] = len(recalls)
    return report


def _length_bucket(n: int) -> int:
    """The smallest power of two (at least 256) that holds `n` tokens: a `length` to group results by."""
    bucket = 256
    while bucket < n:
        bucket *= 2
    return bucket


def build_from_columns(
    data,
    extractor="evidence",
    tokenizer=None,
    template: str = QA_TEMPLATE,
    answer_prefix: str = QA_ANSWER_PREFIX,
    conversational: bool = False,
    context_column: str = "context",
    question_column: str = "question",
    evidence_column: str = "evidence",
    answers_column: str = "answers",
    task: str = "custom",
    metric: str = "token_f1",
    separator: str = "\n",
):
    """
    Build OPSDL rows from user columns.

    Args:
        data ([`~datasets.Dataset`] or `list[dict]`):
            Rows with a context and a question column, optionally gold evidence (a string or a list of strings, each
            occurring verbatim in the context) and answers (a string or a list). A row that already has a `prompt`
            (e.g. a RULER dataset) keeps it, and its teacher prompt is the prompt with the context swapped for the
            short one; otherwise both prompts are rendered from `template`.
        extractor (`str` or `callable`, *optional*, defaults to `"evidence"`):
            `"evidence"`: the short context is the row's evidence pieces, in context order. `"bm25"`: a default
            [`BM25Extractor`]. Or any callable `(context, question) -> short_context`; one with an `extract_many`
            method (like [`SelfExtractor`]) is called once on all rows.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Counts tokens (`num_tokens`, `teacher_num_tokens`, and `length` when the data has none: the smallest
            power of two ≥ 256 holding the prompt). Needed for conversational prompts' counts.
        template / answer_prefix / conversational:
            How prompts are rendered (see [`render_prompt`]).
        context_column, question_column, evidence_column, answers_column (`str`):
            Column names.
        task / metric (`str`):
            Values of the `task` and `metric` columns for rows that have none.
        separator (`str`, *optional*, defaults to `"\\n"`):
            Between evidence pieces.

    Rows with an empty context or question are skipped and counted (logged warning). Evidence that does not occur in
    its context is an error naming the row.

    Returns:
        [`~datasets.Dataset`] with `prompt`, `teacher_prompt`, `answers`, `short_context`, the metadata columns
        (`task`, `length`, `metric`, and token counts with a tokenizer) and every input column.
    """
    from datasets import Dataset

    rows = data.to_list() if hasattr(data, "to_list") else [dict(r) for r in data]
    if not rows:
        raise ValueError("No rows given.")
    columns = set(rows[0])
    for column in (context_column, question_column):
        if column not in columns:
            raise ValueError(
                f"Column {column!r} is missing; the data has {sorted(columns)}. Rename it or pass {column}_column=..."
            )
    if extractor == "evidence" and evidence_column not in columns:
        raise ValueError(
            f"extractor='evidence' needs an evidence column {evidence_column!r}, which the data lacks (it has "
            f"{sorted(columns)}). Pass extractor='bm25', a SelfExtractor, or your own (context, question) -> str."
        )
    if isinstance(extractor, str) and extractor not in ("evidence", "bm25"):
        raise ValueError(f"Unknown extractor {extractor!r}: use 'evidence', 'bm25', or a callable.")
    if extractor == "bm25":
        extractor = BM25Extractor(tokenizer=tokenizer)

    kept, skipped = [], {}
    for i, row in enumerate(rows):
        context, question = row.get(context_column), row.get(question_column)
        reason = None
        if not isinstance(context, str) or not context.strip():
            reason = "empty context"
        elif not isinstance(question, str) or not question.strip():
            reason = "empty question"
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        kept.append((i, row))
    if skipped:
        logger.warning("build_from_columns skipped %s", ", ".join(f"{n} rows with an {r}" for r, n in skipped.items()))
    if not kept:
        raise ValueError(f"Every row was skipped: {skipped}.")

    contexts = [row[context_column] for _, row in kept]
    questions = [row[question_column] for _, row in kept]
    if extractor == "evidence":
        shorts = [_evidence_context(i, row[context_column], row.get(evidence_column), separator) for i, row in kept]
    elif hasattr(extractor, "extract_many"):
        shorts = extractor.extract_many(contexts, questions)
    elif callable(extractor):
        shorts = [extractor(c, q) for c, q in zip(contexts, questions)]
    else:
        raise ValueError(f"extractor must be 'evidence', 'bm25' or a callable, got {type(extractor).__name__}.")

    out = []
    for (i, row), context, question, short in zip(kept, contexts, questions, shorts):
        if not isinstance(short, str):
            raise ValueError(f"Row {i}: the extractor returned {type(short).__name__}, expected a string.")
        new = dict(row)
        if row.get("prompt") is not None:
            try:
                new["teacher_prompt"] = replace_context(row["prompt"], context, short)
            except ValueError as error:
                raise ValueError(f"Row {i}: {error}") from error
        else:
            new["prompt"] = render_prompt(template, context, question, answer_prefix, conversational)
            new["teacher_prompt"] = render_prompt(template, short, question, answer_prefix, conversational)
        answers = row.get(answers_column, row.get("answer"))
        new["answers"] = (
            [] if answers is None else [answers] if isinstance(answers, str) else [str(a) for a in answers]
        )
        new["short_context"] = short
        if evidence_column in row:  # one type per column: a string or a list of strings becomes a list
            evidence = row[evidence_column]
            new[evidence_column] = (
                [] if evidence is None else [evidence] if isinstance(evidence, str) else list(evidence)
            )
        new.setdefault("task", task)
        new.setdefault("metric", metric)
        if tokenizer is not None:
            new["num_tokens"] = count_tokens(tokenizer, new["prompt"])
            new["teacher_num_tokens"] = count_tokens(tokenizer, new["teacher_prompt"])
            if new.get("length") is None:
                new["length"] = _length_bucket(new["num_tokens"])
        out.append(new)
    return Dataset.from_list(out)


def _evidence_context(row_index, context, evidence, separator):
    pieces = [evidence] if isinstance(evidence, str) else list(evidence or [])
    pieces = [p for p in pieces if p and p.strip()]
    if not pieces:
        raise ValueError(
            f"Row {row_index}: its evidence is empty. Annotate it, or use extractor='bm25' (or another extractor) "
            "for rows without evidence."
        )
    located = []
    for piece in pieces:
        start = context.find(piece)
        if start < 0:
            shown = piece if len(piece) <= 80 else piece[:77] + "..."
            raise ValueError(
                f"Row {row_index}: evidence {shown!r} does not occur verbatim in its context. Evidence must be copied "
                "from the context (same spacing and case)."
            )
        located.append((start, start + len(piece)))
    return separator.join(context[s:e] for s, e in sorted(set(located)))
