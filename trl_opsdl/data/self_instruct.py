"""Documents only: self-instructed (long, short) pairs, the OPSDL paper's data pipeline.

A pile of long documents and no questions: pick key-information spans from each document, let the model itself write
one question per span (Self-Instruct style), keep the questions that the span answers and that the model can't answer
closed-book, and build pairs

- short (teacher) prompt: the span + the question;
- long (student) prompt: the span in place inside its document (and, past the document's ends, other documents'
  text), cut to each target length around it, counted in the tokenizer's tokens of the rendered prompt.

The pipeline is its steps, each a function that fills one [`SelfInstructReport`] (every filter counted; its
`to_dict()` is `<output>.report.json` from the command line): [`draw_document_spans`] → [`write_questions`] →
[`drop_by_text`], [`answer_with_span`] and the model filters (`drop_low_logprob`, `drop_inconsistent`,
`drop_closed_book`) → [`build_pairs`]; [`build_self_instruct`] checks the settings and runs them in turn. The model is
reached through a generator object, so tests (and other back ends) can inject their own: a callable
`prompts -> texts` (greedy), with optional methods `logprob(prompts, completions) -> mean token log-probs` (for
`min_logprob`) and `sample(prompts, k) -> k texts per prompt` (for `k > 1`). [`ModelGenerator`] is the one over a
transformers model.

Longer than ~450 lines because it is one pipeline — documents, spans, question writing, the filters, the report,
pairs — whose steps share the report and the seeded draws.
"""

import difflib
import json
import os
import random
import re
import string
from dataclasses import dataclass, field

from ..tokenization import count_tokens
from .extract import split_chunks
from .squad import SQUAD_TEMPLATE
from .templates import render_prompt


# How the model is asked for a question. `{span}` is replaced by the span.
CHAT_QUESTION_TEMPLATE = (
    "Read the text below and write one question about it. The question must be answerable from this text alone, must "
    "ask about a specific fact in it, and must not copy a sentence of the text. Write only the question, ending with "
    "a question mark.\n\nText:\n{span}"
)
BASE_QUESTION_TEMPLATE = (
    "Below is a passage, followed by one question that the passage answers.\n\nPassage:\n{span}\n\nQuestion:"
)
QUESTION_TEMPLATES = {"chat": CHAT_QUESTION_TEMPLATE, "base": BASE_QUESTION_TEMPLATE}
# The model's answer with the span (the pair's own template, so the answer is what the teacher would say) ...
ANSWER_TEMPLATE = SQUAD_TEMPLATE
# ... and without any context (closed book).
CLOSED_BOOK_TEMPLATE = "Answer the question with a few words.\n\nQuestion: {question}"

FILTERS = (
    "empty",
    "not_a_question",
    "copies_span",
    "not_grounded",
    "duplicate",
    "low_logprob",
    "inconsistent",
    "closed_book",
)
SKIPS = ("heading", "mostly_digits", "few_words", "boilerplate", "too_short")

_STOPWORDS = set(
    "a an the of to in on at for by with from and or but is are was were be been being it its this that these those "
    "he she they them his her their we you i as what which who whom whose when where why how did do does has have had "
    "not no so than then there here into about over under also can could would should will may might".split()
)
_BOILERPLATE = re.compile(
    r"(copyright|all rights reserved|\bhttps?://|www\.|terms of (use|service)|privacy policy|cookie|subscribe|"
    r"click here|table of contents)",
    re.IGNORECASE,
)
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")
_SENTENCE_START = re.compile(r"(?:[!:]|(?<![A-Z][a-z])(?<![A-Z])\.)\s+(?=[A-Z\"“])")


# --- documents -------------------------------------------------------------------------------------------------------


def load_documents(source, text_column: str = "text", id_column: str | None = None) -> list[dict]:
    """
    Documents as `[{"id", "text"}]` from a folder of `.txt` files (one document each, id = file name), a `.jsonl`,
    `.json` or `.parquet` file with a text column (read with `datasets.load_dataset`), or a list of strings or dicts.

    Args:
        source (`str` or `list`):
            The folder or file, or the documents themselves.
        text_column (`str`, *optional*, defaults to `"text"`):
            Column that holds each document's text.
        id_column (`str`, *optional*):
            Column that holds its id (default: `id` where present, else the row number).
    """
    if isinstance(source, list | tuple):
        rows = [{text_column: d} if isinstance(d, str) else dict(d) for d in source]
        return _documents(rows, text_column, id_column, "the documents given")
    path = str(source)
    if os.path.isdir(path):
        from .reader import read_text_folder

        return _documents(read_text_folder(path), "text", "id", path)
    if not os.path.isfile(path):
        raise ValueError(f"--documents {path!r} does not exist; pass a .txt folder or a .jsonl/.json/.parquet file.")
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    kind = kinds.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise ValueError(
            f"--documents {path!r}: expected a .jsonl, .json or .parquet file, or a folder of .txt files."
        )
    from datasets import load_dataset

    try:
        rows = list(load_dataset(kind, data_files=path, split="train"))
    except Exception as error:  # noqa: BLE001 - any parse failure gets the same advice
        raise ValueError(f"--documents {path!r} could not be read as {kind} ({error}).") from error
    return _documents(rows, text_column, id_column, path)


def _documents(rows: list[dict], text_column: str, id_column: str | None, where: str) -> list[dict]:
    if not rows:
        raise ValueError(f"No documents in {where}.")
    if text_column not in rows[0]:
        raise ValueError(
            f"{where} has no text column {text_column!r} (it has {sorted(rows[0])}); pass --text-column NAME."
        )
    id_column = id_column or ("id" if "id" in rows[0] else None)
    docs = []
    for i, row in enumerate(rows):
        text = row.get(text_column)
        if isinstance(text, str) and text.strip():
            docs.append({"id": str(row[id_column]) if id_column else str(i), "text": text})
    if not docs:
        raise ValueError(f"Every document in {where} has an empty {text_column!r}.")
    return docs


# --- spans -----------------------------------------------------------------------------------------------------------


def _junk(text: str) -> str | None:
    """Why a piece of text holds nothing to ask about (None: it may): a heading, a list of numbers or names, a table,
    boilerplate. Junk is skipped and never merged into a span."""
    words = text.split()
    alphabetic = [w for w in words if sum(c.isalpha() for c in w) >= 2]
    if "\n" not in text.strip() and len(words) < 12 and not re.search(r"[.!?:;\"”)]$", text.strip()):
        return "heading"  # a title, a date line, a caption
    visible = [c for c in text if not c.isspace()]
    if sum(c.isdigit() for c in visible) > 0.3 * len(visible):
        return "mostly_digits"
    if len(alphabetic) < 0.6 * len(words):
        return "few_words"  # tables, lists of numbers or symbols
    if _BOILERPLATE.search(text):
        return "boilerplate"
    return None


def candidate_spans(text: str, tokenizer, span_tokens: int = 128) -> tuple[list[tuple[int, int]], dict]:
    """
    Spans of `text` worth asking about: paragraphs, or windows of consecutive sentences of a long paragraph (see
    [`~trl_opsdl.data.extract.split_chunks`]), with short neighbours merged, each of at most about `span_tokens`
    tokens. Pieces with no content (headings, number lists, boilerplate: [`_junk`]) are skipped, and so are spans
    left with fewer than `span_tokens // 4` tokens or 12 words; each skip is counted by reason.

    Returns:
        `(spans, skipped)`: character spans `(start, end)` in document order, stripped of surrounding whitespace, and
        the count of skipped pieces per reason.
    """
    chunks = []
    for s, e in split_chunks(text, span_tokens, tokenizer):
        piece = text[s:e]
        s, e = s + len(piece) - len(piece.lstrip()), e - (len(piece) - len(piece.rstrip()))
        if e > s:
            chunks.append((s, e))
    sizes = [len(ids) for ids in tokenizer([text[s:e] for s, e in chunks], add_special_tokens=False)["input_ids"]]
    paragraph_ends = [m.start() for m in re.finditer(r"\n\s*\n", text)] + [len(text)]
    skipped = dict.fromkeys(SKIPS, 0)
    merged, previous_junk = [], True  # adjacent pieces packed up to `span_tokens`, never across junk
    for (s, e), n in zip(chunks, sizes):
        # a sentence window of a boilerplate or tabular paragraph is junk too, though it may not look it alone
        # (only for paragraphs of a few chunks: a text without blank lines is one "paragraph")
        end = next(x for x in paragraph_ends if x >= e)
        start = max([x for x in paragraph_ends if x < s], default=0)
        small = sum(start <= cs and ce <= end for cs, ce in chunks) <= 4
        reason = (_junk(text[start:end]) if small else None) or _junk(text[s:e])
        if reason:
            skipped[reason] += 1
            previous_junk = True
            continue
        if not previous_junk and merged[-1][2] + n <= span_tokens:
            merged[-1] = (merged[-1][0], e, merged[-1][2] + n)
        else:
            merged.append((s, e, n))
        previous_junk = False
    spans = []
    for s, e, n in merged:
        words = [w for w in text[s:e].split() if sum(c.isalpha() for c in w) >= 2]
        if n < max(8, span_tokens // 4) or len(words) < 12:
            skipped["too_short"] += 1
        else:
            spans.append((s, e))
    return spans, skipped


def draw_spans(per_document: list[list[tuple[int, int]]], num_samples: int, seed: int) -> list[tuple[int, int, int]]:
    """`num_samples` spans `(document, start, end)`, shared evenly over the documents (in a seeded order) and, within
    a document, spread over it (systematic sampling with a seeded offset)."""
    rng = random.Random(seed)
    order = [d for d in range(len(per_document)) if per_document[d]]
    rng.shuffle(order)
    quota = dict.fromkeys(order, 0)
    total = min(num_samples, sum(len(per_document[d]) for d in order))
    while sum(quota.values()) < total:
        for d in order:
            if quota[d] < len(per_document[d]) and sum(quota.values()) < total:
                quota[d] += 1
    drawn = []
    for d in order:
        spans, j = per_document[d], quota[d]
        if j:
            offset = rng.random()
            picks = sorted({min(len(spans) - 1, int((i + offset) * len(spans) / j)) for i in range(j)})
            drawn += [(d, *spans[i]) for i in picks]
    return drawn


# --- the model: questions, answers, their log-probs ------------------------------------------------------------------


class ModelGenerator:
    """
    Greedy texts, sampled texts and answer log-probs from a transformers causal LM, batched and left-padded as
    [`~trl_opsdl.evaluation.greedy_generate`] does.

    Args:
        model ([`~transformers.PreTrainedModel`]): the model.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): its tokenizer.
        max_new_tokens (`int`, *optional*, defaults to `48`): generation budget.
        batch_size (`int`, *optional*, defaults to `8`): prompts per `generate` call.
        temperature (`float`, *optional*, defaults to `1.0`): for `sample`.
        seed (`int`, *optional*, defaults to `0`): seeds `sample`.
        progress (`bool`, *optional*, defaults to `True`): progress bars.
    """

    def __init__(self, model, tokenizer, max_new_tokens=48, batch_size=8, temperature=1.0, seed=0, progress=True):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size, self.temperature = max_new_tokens, batch_size, temperature
        self.seed, self.progress = seed, progress

    def __call__(self, prompts, max_new_tokens: int | None = None) -> list[str]:
        from ..generation import greedy_generate

        return greedy_generate(
            self.model, self.tokenizer, prompts, max_new_tokens or self.max_new_tokens, self.batch_size, self.progress
        )

    def _batches(self, prompts, extra=None):
        from ..tokenization import prompt_ids

        ids = [prompt_ids(self.tokenizer, p) for p in prompts]
        extra = extra or [[] for _ in ids]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]) - len(extra[i]))
        return ids, extra, [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]

    def sample(self, prompts, k: int, max_new_tokens: int | None = None) -> list[list[str]]:
        """`k` samples at `temperature` per prompt."""
        import torch
        from tqdm.auto import tqdm

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids, _, batches = self._batches(prompts)
        device = next(self.model.parameters()).device
        out = [None] * len(ids)
        torch.manual_seed(self.seed)
        self.model.eval()
        with torch.no_grad():
            for batch in tqdm(batches, desc=f"sampling x{k}", disable=not self.progress):
                width = max(len(ids[i]) for i in batch)
                input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in batch], device=device)
                mask = (torch.arange(width, device=device)[None] >= width - input_ids.new_tensor(
                    [len(ids[i]) for i in batch])[:, None]).long()  # fmt: skip
                generated = self.model.generate(
                    input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens or self.max_new_tokens,
                    do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0, num_return_sequences=k,
                    pad_token_id=pad,
                )  # fmt: skip
                texts = self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
                for b, i in enumerate(batch):
                    out[i] = [t.strip() for t in texts[b * k : (b + 1) * k]]
        return out

    def logprob(self, prompts, completions) -> list[float]:
        """Mean log-probability of each completion's tokens after its prompt (teacher-forced)."""
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        answers = [self.tokenizer(c, add_special_tokens=False)["input_ids"] or [pad] for c in completions]
        ids, answers, batches = self._batches(prompts, answers)
        device = next(self.model.parameters()).device
        out = [None] * len(ids)
        self.model.eval()
        with torch.no_grad():
            for batch in batches:
                seqs = [ids[i] + answers[i] for i in batch]
                width = max(len(s) for s in seqs)
                input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
                mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
                logprobs_BTV = self.model(input_ids=input_ids, attention_mask=mask).logits.float().log_softmax(-1)
                for b, i in enumerate(batch):
                    n = len(answers[i])
                    # the logits at position t predict token t + 1: the answer's tokens are the last n
                    picked_T = logprobs_BTV[b, width - n - 1 : width - 1].gather(-1, input_ids[b, width - n :, None])[
                        :, 0
                    ]
                    out[i] = float(picked_T.mean())
        return out


# --- parsing and filters ---------------------------------------------------------------------------------------------


def parse_question(text: str) -> str:
    """The question in a generation: the first line holding a "?" (up to it), without labels, numbering or quotes;
    else the first non-empty line (which the "ends as a question" filter then drops)."""
    lines = []
    for line in (text or "").splitlines():
        line = re.sub(r"^\s*(?:[-*•]|\d+[.)]|(?:question|q)\s*\d*\s*[:.)-])\s*", "", line, flags=re.IGNORECASE)
        line = line.strip().strip("\"'“”‘’*").strip()
        if line:
            lines.append(line)
    for line in lines:
        if "?" in line:
            # the sentence that holds the first "?": "What a great question! How ...?" → "How ...?"
            head = line[: line.index("?") + 1]
            starts = [m.end() for m in _SENTENCE_START.finditer(head)]  # not after "Mr." or "U.S."
            return head[starts[-1] if starts else 0 :].strip().strip("\"'“”‘’*").strip()
    return lines[0] if lines else ""


_PUNCTUATION = set(string.punctuation)


def _norm(text: str) -> str:
    # SQuAD's normalization (lower case, no punctuation, single spaces; articles go with the stop words below),
    # written out here: the data builders sit below `trl_opsdl.evaluation` and must not import it.
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(text.split())


def _key_tokens(answer: str, question: str) -> set[str]:
    """What an answer says beyond the question: its normalized words minus the question's words and stop words."""
    asked = set(_norm(question).split())
    return {w for w in _norm(answer).split() if w not in asked and w not in _STOPWORDS}


def same_answer(a: str, b: str, question: str) -> bool:
    """Two answers agree: equal once normalized, or at least half of `a`'s key words (see `_key_tokens`) occur in
    `b`. Replies in sentences ("It was built in 1850.") then agree on their content ("1850"), not their wording."""
    if _norm(a) == _norm(b):
        return True
    key = _key_tokens(a, question)
    if not key:
        return False
    return len(key & set(_norm(b).split())) >= 0.5 * len(key)


def copies_span(question: str, span: str, min_words: int = 5, similarity: float = 0.8) -> bool:
    """The question is a span sentence (or a long run of the span) with a question mark: it contains a whole span
    sentence, repeats at least `min_words` words of the span verbatim as almost all of itself, or is at least
    `similarity` alike (difflib) to a span sentence."""
    q = _norm(question)
    if not q:
        return False
    if len(q.split()) >= min_words and q in _norm(span):
        return True
    for sentence in _SENTENCE.findall(span):
        s = _norm(sentence)
        if len(s.split()) < 4:
            continue
        if s in q or difflib.SequenceMatcher(None, q, s, autojunk=False).ratio() >= similarity:
            return True
    return False


def grounded(question: str, span: str) -> bool:
    """The question names something in the span: at least one of its normalized words that is not a stop word occurs
    in the span. A question answerable from the span alone must point into it; echoes of the instruction ("What is
    the question?", "What is the answer to this question?": 11 of SmolLM2's 48 on the essays) name nothing there."""
    in_span = set(_norm(span).split())
    return any(w in in_span for w in _norm(question).split() if w not in _STOPWORDS)


# --- long prompts ------------------------------------------------------------------------------------------------------


def _cut(tokenizer, text: str, budget: int, from_end: bool) -> tuple[str, int]:
    """The longest head (or tail) of `text` with at most `budget` tokens, cut at whitespace, verbatim; and its token
    count. Only a window of the text around the cut is tokenized."""
    if budget <= 0 or not text:
        return "", 0
    width = 8 * budget + 64
    while True:
        window = text[-width:] if from_end else text[:width]
        encoded = tokenizer(window, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        whole = len(window) == len(text)
        if len(offsets) <= budget and whole:
            return text, len(offsets)
        if len(offsets) > budget:
            break
        width *= 2
    if from_end:
        start = offsets[len(offsets) - budget][0]  # the window's last `budget` tokens start here
        match = re.search(r"\s", window[start:])  # at a word boundary: drop the partial first word
        piece = window[start + match.end() :] if match and start > 0 else window[start:]
        piece = piece.lstrip()
    else:
        end = offsets[budget][0]  # the first `budget` tokens end before the next token
        cut = max(window.rfind(" ", 0, end + 1), window.rfind("\n", 0, end + 1))
        piece = window[: cut if cut > 0 else end].rstrip()
    return piece, len(tokenizer(piece, add_special_tokens=False)["input_ids"])


def _around(tokenizer, doc: str, start: int, end: int, others: list[str], before: int, after: int) -> str:
    """`doc[start:end]` in place with up to `before` tokens of text before it and `after` after it: its document's own
    text first, then other documents (each a block separated by a blank line)."""
    left, budget = [], before
    doc_left, used = _cut(tokenizer, doc[:start], budget, from_end=True)
    budget -= used
    for other in others[::-1]:
        if budget <= 2:
            break
        piece, used = _cut(tokenizer, other, budget - 2, from_end=True)  # 2: the blank line
        if piece:
            left.append(piece)
        budget -= used + 2
    right, budget = [], after
    doc_right, used = _cut(tokenizer, doc[end:], budget, from_end=False)
    budget -= used
    for other in others:
        if budget <= 2:
            break
        piece, used = _cut(tokenizer, other, budget - 2, from_end=False)
        if piece:
            right.append(piece)
        budget -= used + 2
    # `doc_left` is a suffix of `doc[:start]` and `doc_right` a prefix of `doc[end:]`: the slice is verbatim
    middle = doc[start - len(doc_left) : end + len(doc_right)]
    return "\n\n".join(left[::-1] + [middle] + right)


# --- the report --------------------------------------------------------------------------------------------------------


@dataclass
class SelfInstructReport:
    """
    What the pipeline did, filled by its steps in turn; [`to_dict`] is `<output>.report.json`.

    Questions are indexed by `i`, the position of their span in `drawn` (the order the spans were drawn). The steps
    record `raw_questions[i]` (the model's text) and `questions[i]` (the question parsed from it); each filter records
    in `dropped[filter]` the questions it dropped, and what it learnt about the others (`answers`, `logprobs`,
    `agreement`, `closed_book_answers`, keyed by `i`); `kept` lists the questions that passed every filter.
    """

    settings: dict
    lengths: list[int]
    document_ids: list[str] = field(default_factory=list)
    document_tokens: int = 0
    span_candidates: int = 0
    skipped_no_content: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIPS, 0))
    drawn: list[tuple[int, int, int]] = field(default_factory=list)  # (document, start, end) per question
    raw_questions: list[str] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    dropped: dict[str, list[int]] = field(default_factory=lambda: {name: [] for name in FILTERS})
    kept: list[int] = field(default_factory=list)
    answers: dict[int, str] = field(default_factory=dict)
    logprobs: dict[int, float] = field(default_factory=dict)
    agreement: dict[int, float] = field(default_factory=dict)
    closed_book_answers: dict[int, str] = field(default_factory=dict)
    rows: int = 0

    def example(self, i: int) -> dict:
        """Question `i` with its document, span and what the filters learnt about it (as far as they got)."""
        entry = {"question": self.questions[i], "document_id": self.document_ids[self.drawn[i][0]],
                 "span_start": self.drawn[i][1]}  # fmt: skip
        for name, values in (("answer", self.answers), ("logprob", self.logprobs), ("agreement", self.agreement),
                             ("closed_book_answer", self.closed_book_answers)):  # fmt: skip
            if i in values:
                entry[name] = round(values[i], 3) if isinstance(values[i], float) else values[i]
        return entry

    def to_dict(self) -> dict:
        """The JSON report: documents, spans (candidates, skipped per reason, drawn), questions (generated, dropped per
        filter, kept), rows, the answers' log-prob quantiles, the settings, examples, and every question's outcome."""
        fate = {i: name for name, ids in self.dropped.items() for i in ids}
        return {
            "documents": len(self.document_ids),
            "document_tokens": self.document_tokens,
            "spans": {
                "candidates": self.span_candidates,
                "skipped_no_content": dict(self.skipped_no_content),
                "drawn": len(self.drawn),
            },
            "questions": {
                "generated": len(self.drawn),
                "dropped": {name: len(ids) for name, ids in self.dropped.items()},
                "kept": len(self.kept),
            },
            "rows": self.rows,
            "lengths": list(self.lengths),
            "answer_logprob": _quantiles(list(self.logprobs.values())),
            "settings": dict(self.settings),
            "kept_examples": [self.example(i) for i in self.kept[:20]],
            # every generated question with what became of it, in the order the spans were drawn
            "outcomes": [
                {"question": self.questions[i], "raw": self.raw_questions[i][:200], "outcome": fate.get(i, "kept")}
                for i in range(len(self.drawn))
            ],
            "dropped_examples": {
                name: [self.example(i) for i in ids[:3]] for name, ids in self.dropped.items() if ids
            },
        }

    def write(self, path: str) -> str:
        """The report as JSON at `path` (folders made as needed); returns `path`."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)
        return path


# --- the steps ---------------------------------------------------------------------------------------------------------


def load_question_template(template: str) -> str:
    """The question prompt named by `template`: `"chat"` or `"base"` (see `QUESTION_TEMPLATES`), else the path of a
    file holding a format string with `{span}` (`--template FILE`)."""
    if template in QUESTION_TEMPLATES:
        return QUESTION_TEMPLATES[template]
    if not os.path.isfile(template):
        raise ValueError(f"--template {template!r} is neither chat, base nor a file; pass one of those.")
    with open(template, encoding="utf-8") as f:
        text = f.read()
    if "{span}" not in text:
        raise ValueError(f"--template file {template!r} has no {{span}} field; add it where the span goes.")
    return text


def check_settings(lengths, num_samples: int, span_tokens: int, k: int = 1, min_agreement: float = 0.5) -> None:
    """The settings that need no model, documents or tokenizer, checked before any of them is loaded: the command
    line calls this before preparing the model, `build_self_instruct` again."""
    lengths = list(lengths)
    if not lengths or min(lengths) <= 0:
        raise ValueError(f"lengths must be positive token counts, got {lengths}.")
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}.")
    if span_tokens < 16:
        raise ValueError(f"span_tokens={span_tokens} is too small to hold a fact; use at least 16 (e.g. 128).")
    if 2 * span_tokens > min(lengths):
        raise ValueError(
            f"span_tokens={span_tokens} is more than half the shortest length {min(lengths)}: the long prompt would "
            "barely exceed the short one; use longer lengths or smaller spans."
        )
    if k < 1:
        raise ValueError(f"k={k} must be at least 1 (1: no consistency check).")
    if not 0 < min_agreement <= 1:
        raise ValueError(f"min_agreement={min_agreement} must be in (0, 1].")


def pair_prompt(context: str, question: str, conversational: bool = True, system_prompt: str | None = None):
    """A pair's prompt in SQuAD's template: the short (teacher) one with the span as `context`, the long one with the
    span in place in its long context; both differ in the context only."""
    prompt = render_prompt(SQUAD_TEMPLATE, context, question, conversational=conversational)
    if conversational and system_prompt is not None:
        prompt = [{"role": "system", "content": system_prompt}] + prompt
    return prompt


def draw_document_spans(docs: list[dict], tokenizer, span_tokens: int, num_samples: int, seed: int,
                        report: SelfInstructReport) -> list[str]:  # fmt: skip
    """
    Step 1, spans: each document's candidate spans ([`candidate_spans`]), and `num_samples` of them drawn over the
    documents ([`draw_spans`]). Fills the report's span counts and `drawn`; returns the drawn spans' texts.
    """
    per_document = []
    for doc in docs:
        spans, skipped = candidate_spans(doc["text"], tokenizer, span_tokens)
        per_document.append(spans)
        for reason, n in skipped.items():
            report.skipped_no_content[reason] += n
    report.span_candidates = sum(len(spans) for spans in per_document)
    report.drawn = draw_spans(per_document, num_samples, seed)
    if not report.drawn:
        raise ValueError(
            f"No span with content in the documents (skipped: {report.skipped_no_content}); check the text column."
        )
    return [docs[d]["text"][s:e] for d, s, e in report.drawn]


def write_questions(generator, span_texts: list[str], question_template: str, ask_chat: bool,
                    report: SelfInstructReport) -> list[str]:  # fmt: skip
    """
    Step 2, questions: the model writes one question per span, greedy, from `question_template` with the span in
    place of `{span}` (as a user turn where `ask_chat`, else as plain text); the question is parsed out of each reply
    ([`parse_question`]). Fills the report's `raw_questions` and `questions`; returns the questions.
    """
    prompts = [question_template.replace("{span}", span) for span in span_texts]
    report.raw_questions = generator([[{"role": "user", "content": p}] if ask_chat else p for p in prompts])
    report.questions = [parse_question(text) for text in report.raw_questions]
    return report.questions


def drop_by_text(span_texts: list[str], report: SelfInstructReport) -> list[int]:
    """
    Step 3a, the text filters (no model needed, run first): a question is dropped by the first of `empty`,
    `not_a_question`, `copies_span` ([`copies_span`]), `not_grounded` ([`grounded`]) and `duplicate` (asked before,
    after normalization) it meets. Returns the questions left, in drawn order.
    """
    alive, seen = [], set()
    for i, (question, span) in enumerate(zip(report.questions, span_texts)):
        if not question:
            report.dropped["empty"].append(i)
        elif not question.endswith("?"):
            report.dropped["not_a_question"].append(i)
        elif copies_span(question, span):
            report.dropped["copies_span"].append(i)
        elif not grounded(question, span):
            report.dropped["not_grounded"].append(i)
        elif _norm(question) in seen:
            report.dropped["duplicate"].append(i)
        else:
            seen.add(_norm(question))
            alive.append(i)
    return alive


def answer_with_span(generator, teacher_prompts: dict, alive: list[int], max_new_tokens: int,
                     report: SelfInstructReport) -> None:  # fmt: skip
    """
    Step 3b: the model's greedy answer to each question given its span alone, in the pair's own prompt
    (`teacher_prompts[i]`: what the teacher will see). The model filters compare against it and the rows keep it in
    `answers`. Fills the report's `answers`.
    """
    for i, answer in zip(alive, _call(generator, [teacher_prompts[i] for i in alive], max_new_tokens)):
        report.answers[i] = answer


def drop_low_logprob(generator, teacher_prompts: dict, alive: list[int], min_logprob: float,
                     report: SelfInstructReport) -> list[int]:  # fmt: skip
    """Step 3c, `low_logprob`: drop a question whose answer given the span has a mean token log-prob under
    `min_logprob` (the model is unsure of it). Fills the report's `logprobs`; returns the questions left."""
    scores = generator.logprob([teacher_prompts[i] for i in alive], [report.answers[i] for i in alive])
    report.logprobs = dict(zip(alive, scores))
    report.dropped["low_logprob"] = [i for i in alive if report.logprobs[i] < min_logprob]
    return [i for i in alive if report.logprobs[i] >= min_logprob]


def drop_inconsistent(generator, teacher_prompts: dict, alive: list[int], k: int, min_agreement: float,
                      max_new_tokens: int, report: SelfInstructReport) -> list[int]:  # fmt: skip
    """Step 3d, `inconsistent`: sample `k` answers given the span; drop a question where fewer than `min_agreement`
    of them agree with the greedy answer ([`same_answer`]). Fills the report's `agreement`; returns those left."""
    prompts = [teacher_prompts[i] for i in alive]
    if isinstance(generator, ModelGenerator):
        samples = generator.sample(prompts, k, max_new_tokens=max_new_tokens)
    else:
        samples = generator.sample(prompts, k)
    for i, texts in zip(alive, samples):
        report.agreement[i] = sum(same_answer(report.answers[i], t, report.questions[i]) for t in texts) / k
    report.dropped["inconsistent"] = [i for i in alive if report.agreement[i] < min_agreement]
    return [i for i in alive if report.agreement[i] >= min_agreement]


def drop_closed_book(generator, alive: list[int], ask_chat: bool, max_new_tokens: int,
                     report: SelfInstructReport) -> list[int]:  # fmt: skip
    """Step 3e, `closed_book`: ask each question with no context at all ([`CLOSED_BOOK_TEMPLATE`]); drop it where
    the answer agrees with the one given the span (the span was not needed). Fills the report's
    `closed_book_answers`; returns the questions left."""
    questions = report.questions
    no_context = [render_prompt(CLOSED_BOOK_TEMPLATE, "", questions[i], conversational=ask_chat) for i in alive]
    closed = dict(zip(alive, _call(generator, no_context, max_new_tokens)))
    report.closed_book_answers = closed
    report.dropped["closed_book"] = [i for i in alive if same_answer(report.answers[i], closed[i], questions[i])]
    return [i for i in alive if not same_answer(report.answers[i], closed[i], questions[i])]


def long_prompt(tokenizer, doc: str, start: int, end: int, others: list[str], question: str, length: int,
                short_tokens: int, depth: float, conversational: bool = True, system_prompt: str | None = None):  # fmt: skip
    """
    The long prompt of the span `doc[start:end]` at `length` tokens: the span at `depth` (0: at the start, 1: at the
    end) of a context cut around it from its document and then `others` ([`_around`]), in the pair's prompt.
    Returns `(prompt, context, tokens)`; `tokens` is within 1% below `length` where the re-aiming converges.
    """
    budget = length - short_tokens - 2
    for _ in range(5):  # joining pieces can merge or split a token or two: re-aim on the measured count
        before = round(depth * budget)
        context = _around(tokenizer, doc, start, end, others, before, budget - before)
        prompt = pair_prompt(context, question, conversational, system_prompt)
        count = count_tokens(tokenizer, prompt)
        if 0.99 * length <= count <= length:
            break
        budget += length - count - (1 if count > length else 0)
    return prompt, context, count


def build_pairs(docs: list[dict], span_texts: list[str], teacher_prompts: dict, report: SelfInstructReport, tokenizer,
                lengths, seed: int, conversational: bool = True, system_prompt: str | None = None,
                keep_answers: bool = True) -> list[dict]:  # fmt: skip
    """
    Step 4, pairs: for each kept question, one row per target length: the short prompt (span + question) and the
    long prompt ([`long_prompt`]), the span at a seeded depth, other documents in a seeded order. Sets the report's
    `rows`; returns the rows.
    """
    rng = random.Random(seed + 1)
    rows = []
    for i in report.kept:
        d, start, end = report.drawn[i]
        doc, span, question = docs[d]["text"], span_texts[i], report.questions[i]
        others = [docs[j]["text"] for j in range(len(docs)) if j != d]
        rng.shuffle(others)
        teacher_prompt = teacher_prompts[i]
        short_tokens = count_tokens(tokenizer, teacher_prompt)
        depth = rng.random()
        for length in lengths:
            if length <= short_tokens:
                raise ValueError(
                    f"Target length {length} is not longer than the short prompt of span {i} ({short_tokens} "
                    "tokens); use longer lengths or smaller --span-tokens."
                )
            prompt, context, count = long_prompt(tokenizer, doc, start, end, others, question, length, short_tokens,
                                                 depth, conversational, system_prompt)  # fmt: skip
            rows.append(
                {
                    "prompt": prompt,
                    "teacher_prompt": teacher_prompt,
                    "question": question,
                    "span": span,
                    "document_id": docs[d]["id"],
                    "span_start": start,
                    "answers": [report.answers[i]] if keep_answers and report.answers.get(i) else [],
                    "length": length,
                    "prompt_tokens": count,
                    "teacher_prompt_tokens": short_tokens,
                    "context": context,
                    "evidence": [span],
                    "depth": round(context.index(span) / max(1, len(context) - len(span)), 3),
                    "id": f"{docs[d]['id']}@{start}-{length}",
                    "task": "self_instruct",
                }
            )
    report.rows = len(rows)
    return rows


# --- the builder -------------------------------------------------------------------------------------------------------


def build_self_instruct(
    documents,
    model=None,
    tokenizer=None,
    lengths=(512, 1024),
    num_samples: int = 100,
    seed: int = 0,
    generator=None,
    span_tokens: int = 128,
    template: str = "chat",
    text_column: str = "text",
    conversational: bool = True,
    system_prompt: str | None = None,
    min_logprob: float | None = None,
    k: int = 1,
    min_agreement: float = 0.5,
    closed_book: bool = True,
    keep_answers: bool = True,
    max_question_tokens: int = 48,
    max_answer_tokens: int = 24,
    batch_size: int = 8,
    sample_temperature: float = 0.7,
    progress: bool = True,
):
    """
    Self-instructed (long, short) pairs from documents alone: spans → the model's questions → filters → pairs, each a
    step of its own ([`draw_document_spans`], [`write_questions`], [`drop_by_text`] and the model filters,
    [`build_pairs`]) that fills one [`SelfInstructReport`].

    Args:
        documents (`str` or `list`):
            A folder of `.txt` files, a `.jsonl`/`.json`/`.parquet` file with a `text_column`, or a list of strings or
            dicts (see [`load_documents`]).
        model ([`~transformers.PreTrainedModel`], *optional*):
            The model that writes and answers the questions (the one to be trained). Not needed with `generator`.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer: span sizes and prompt lengths are counted in its tokens.
        lengths (`Sequence[int]`, *optional*, defaults to `(512, 1024)`):
            Target lengths of the long prompt in tokens (chat template included); one row per (question, length).
        num_samples (`int`, *optional*, defaults to `100`):
            Spans drawn, one question asked per span; the filters keep at most this many questions.
        seed (`int`, *optional*, defaults to `0`):
            Seeds the spans drawn, the span's depth in the long prompt, the other documents' order and sampling.
        generator (`callable`, *optional*):
            `prompts -> texts` (greedy), used instead of `model`; `logprob(prompts, completions)` and
            `sample(prompts, k)` methods where `min_logprob` / `k > 1` need them. Default: [`ModelGenerator`].
        span_tokens (`int`, *optional*, defaults to `128`):
            Size of a span in tokens (paragraphs, or windows of sentences; short neighbours merged).
        template (`str`, *optional*, defaults to `"chat"`):
            How the model is asked for a question: `"chat"` (an instruction, through the chat template), `"base"` (a
            completion prompt for base models, plain text), or a format string with `{span}`.
        conversational (`bool`, *optional*, defaults to `True`):
            The pairs' prompts as chat messages (rendered with the tokenizer's chat template) or plain text.
        system_prompt (`str`, *optional*):
            A system message before the user turn of conversational pair prompts (default: the template's own).
        min_logprob (`float`, *optional*):
            Keep a question only if the mean token log-prob of the model's answer given the span is at least this.
        k (`int`, *optional*, defaults to `1`):
            With `k > 1`, sample `k` answers given the span; keep the question only if at least `min_agreement` of
            them agree with the greedy answer ([`same_answer`]).
        closed_book (`bool`, *optional*, defaults to `True`):
            Drop questions whose closed-book answer (no context) agrees with the answer given the span.
        keep_answers (`bool`, *optional*, defaults to `True`):
            Store the model's answer given the span in `answers` (else `[]`).
        max_question_tokens / max_answer_tokens (`int`):
            Generation budgets.
        batch_size (`int`, *optional*, defaults to `8`):
            Prompts per `generate` call of the default generator.
        sample_temperature (`float`, *optional*, defaults to `0.7`):
            Temperature of the `k` sampled answers (the default generator's).

    Returns:
        `(dataset, report)`: a [`~datasets.Dataset`] with `prompt`, `teacher_prompt`, `question`, `span`,
        `document_id`, `span_start` (character offset of the span in its document), `answers`, `length`,
        `prompt_tokens`, `teacher_prompt_tokens`, `context` (the long context alone), `evidence` (`[span]`), `depth`,
        `id`, `task` (`"self_instruct"`); and the [`SelfInstructReport`] (`report.to_dict()`: documents, spans
        (candidates, skipped per reason, drawn), questions (generated, dropped per filter with examples, kept), rows).
    """
    from datasets import Dataset

    lengths = [int(n) for n in lengths]
    check_settings(lengths, num_samples, span_tokens, k, min_agreement)
    if tokenizer is None:
        raise ValueError("build_self_instruct needs the model's tokenizer (spans and lengths are in its tokens).")
    if conversational and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("conversational=True needs a tokenizer with a chat template; pass conversational=False.")
    question_template = QUESTION_TEMPLATES.get(template, template)
    if "{span}" not in question_template:
        raise ValueError(f"template {template[:60]!r} must be 'chat', 'base' or a format string with {{span}}.")
    ask_chat = template != "base" and getattr(tokenizer, "chat_template", None) is not None
    if generator is None:
        if model is None:
            raise ValueError("build_self_instruct needs a model (or a generator callable) to write the questions.")
        generator = ModelGenerator(
            model, tokenizer, max_question_tokens, batch_size, sample_temperature, seed=seed, progress=progress
        )
    if min_logprob is not None and not hasattr(generator, "logprob"):
        raise ValueError("min_logprob needs a generator with a logprob(prompts, completions) method.")
    if k > 1 and not hasattr(generator, "sample"):
        raise ValueError("k > 1 needs a generator with a sample(prompts, k) method.")
    docs = load_documents(documents, text_column)
    report = SelfInstructReport(
        settings={
            "num_samples": num_samples,
            "seed": seed,
            "span_tokens": span_tokens,
            "template": template if template in QUESTION_TEMPLATES else "custom",
            "min_logprob": min_logprob,
            "k": k,
            "min_agreement": min_agreement,
            "sample_temperature": sample_temperature,
            "closed_book": closed_book,
            "max_question_tokens": max_question_tokens,
            "max_answer_tokens": max_answer_tokens,
        },
        lengths=lengths,
        document_ids=[doc["id"] for doc in docs],
    )
    texts = [doc["text"] for doc in docs]
    report.document_tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    if max(lengths) > report.document_tokens:
        raise ValueError(
            f"The documents hold {report.document_tokens} tokens in all, fewer than the length {max(lengths)}; use "
            "shorter lengths or more documents."
        )

    span_texts = draw_document_spans(docs, tokenizer, span_tokens, num_samples, seed, report)
    questions = write_questions(generator, span_texts, question_template, ask_chat, report)
    alive = drop_by_text(span_texts, report)
    teacher_prompts = {i: pair_prompt(span_texts[i], questions[i], conversational, system_prompt) for i in alive}
    if alive and (keep_answers or min_logprob is not None or k > 1 or closed_book):
        answer_with_span(generator, teacher_prompts, alive, max_answer_tokens, report)
    if alive and min_logprob is not None:
        alive = drop_low_logprob(generator, teacher_prompts, alive, min_logprob, report)
    if alive and k > 1:
        alive = drop_inconsistent(generator, teacher_prompts, alive, k, min_agreement, max_answer_tokens, report)
    if alive and closed_book:
        alive = drop_closed_book(generator, alive, ask_chat, max_answer_tokens, report)
    report.kept = alive
    rows = build_pairs(docs, span_texts, teacher_prompts, report, tokenizer, lengths, seed, conversational,
                       system_prompt, keep_answers)  # fmt: skip
    return Dataset.from_list(rows), report


def _call(generator, prompts, max_new_tokens):
    """Greedy texts from `generator`, with its own budget where it takes one."""
    if isinstance(generator, ModelGenerator):
        return generator(prompts, max_new_tokens=max_new_tokens)
    return generator(prompts)


def _quantiles(values: list[float]) -> dict | None:
    if not values:
        return None
    ordered = sorted(values)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)  # noqa: E731
    return {"n": len(values), "min": pick(0), "p25": pick(0.25), "median": pick(0.5), "p75": pick(0.75),
            "max": round(ordered[-1], 3)}  # fmt: skip
