"""Short contexts when no evidence is annotated: the extractors that pick the teacher's passages.

Three ways to shorten a context for the teacher:
- [`BM25Extractor`]: split the context into chunks, keep the top-k chunks for the question by BM25 (`bm25s`), in their
  original order, within a token budget.
- [`SelfExtractor`]: the model itself quotes the passages that answer the question; only quotes found in the context
  (verbatim, or after a fuzzy match that is counted) are kept, in context order; rows with none fall back to BM25.
- any callable `(context, question) -> short_context`.
`trl_opsdl.data.columns` turns rows with `context`, `question` (and `evidence`) into OPSDL rows with one of them.
"""

import difflib
import re

from ..generation import greedy_generate
from .templates import render_prompt


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
