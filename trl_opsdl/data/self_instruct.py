"""Documents only: self-instructed (long, short) pairs, the OPSDL paper's data pipeline.

A pile of long documents and no questions: pick key-information spans from each document, let the model itself write
one question per span (Self-Instruct style), keep the questions that the span answers and that the model can't answer
closed-book, and build pairs

- short (teacher) prompt: the span + the question;
- long (student) prompt: the span in place inside its document (and, past the document's ends, other documents'
  text), cut to each target length around it, counted in the tokenizer's tokens of the rendered prompt.

Every filter is counted in a report (`<output>.report.json` from the command line). The model is reached through a
generator object, so tests (and other back ends) can inject their own: a callable `prompts -> texts` (greedy), with
optional methods `logprob(prompts, completions) -> mean token log-probs` (for `min_logprob`) and
`sample(prompts, k) -> k texts per prompt` (for `k > 1`). [`ModelGenerator`] is the one over a transformers model.

Longer than ~450 lines because it is one pipeline — documents, spans, question writing, the four filters and their
report, pairs — whose steps share the report and the seeded draws; each step is a function of its own.
"""

import difflib
import os
import random
import re
import string

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
    Self-instructed (long, short) pairs from documents alone: spans → the model's questions → filters → pairs.

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
        `id`, `task` (`"self_instruct"`); and the report (`dict`): documents, spans (candidates, skipped per reason,
        drawn), questions (generated, dropped per filter with examples, kept), rows.
    """
    from datasets import Dataset

    lengths = [int(n) for n in lengths]
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
    doc_tokens = sum(len(ids) for ids in tokenizer([d["text"] for d in docs], add_special_tokens=False)["input_ids"])
    if max(lengths) > doc_tokens:
        raise ValueError(
            f"The documents hold {doc_tokens} tokens in all, fewer than the length {max(lengths)}; use shorter "
            "lengths or more documents."
        )

    # 1. spans
    per_document, skipped = [], dict.fromkeys(SKIPS, 0)
    for doc in docs:
        spans, skips = candidate_spans(doc["text"], tokenizer, span_tokens)
        per_document.append(spans)
        for reason, n in skips.items():
            skipped[reason] += n
    drawn = draw_spans(per_document, num_samples, seed)
    if not drawn:
        raise ValueError(f"No span with content in the documents (skipped: {skipped}); check the text column.")
    span_texts = [docs[d]["text"][s:e] for d, s, e in drawn]

    # 2. questions, by the model itself
    def ask(span):
        prompt = question_template.replace("{span}", span)
        return [{"role": "user", "content": prompt}] if ask_chat else prompt

    raw = generator([ask(span) for span in span_texts])
    questions = [parse_question(text) for text in raw]

    # 3. filters: the cheap text checks first, then the ones that need the model
    dropped = {name: [] for name in FILTERS}
    alive, seen = [], set()
    for i, (question, span) in enumerate(zip(questions, span_texts)):
        if not question:
            dropped["empty"].append(i)
        elif not question.endswith("?"):
            dropped["not_a_question"].append(i)
        elif copies_span(question, span):
            dropped["copies_span"].append(i)
        elif not grounded(question, span):
            dropped["not_grounded"].append(i)
        elif _norm(question) in seen:
            dropped["duplicate"].append(i)
        else:
            seen.add(_norm(question))
            alive.append(i)

    def pair_prompt(context, question):
        prompt = render_prompt(SQUAD_TEMPLATE, context, question, conversational=conversational)
        if conversational and system_prompt is not None:
            prompt = [{"role": "system", "content": system_prompt}] + prompt
        return prompt

    answers, logprobs = {}, {}
    needs_answers = keep_answers or min_logprob is not None or k > 1 or closed_book
    if alive and needs_answers:
        with_span = [pair_prompt(span_texts[i], questions[i]) for i in alive]
        for i, answer in zip(alive, _call(generator, with_span, max_answer_tokens)):
            answers[i] = answer
    if alive and min_logprob is not None:
        scores = generator.logprob(
            [pair_prompt(span_texts[i], questions[i]) for i in alive], [answers[i] for i in alive]
        )
        logprobs = dict(zip(alive, scores))
        dropped["low_logprob"] = [i for i in alive if logprobs[i] < min_logprob]
        alive = [i for i in alive if logprobs[i] >= min_logprob]
    agreement = {}
    if alive and k > 1:
        prompts = [pair_prompt(span_texts[i], questions[i]) for i in alive]
        if isinstance(generator, ModelGenerator):
            samples = generator.sample(prompts, k, max_new_tokens=max_answer_tokens)
        else:
            samples = generator.sample(prompts, k)
        for i, texts in zip(alive, samples):
            agreement[i] = sum(same_answer(answers[i], t, questions[i]) for t in texts) / k
        dropped["inconsistent"] = [i for i in alive if agreement[i] < min_agreement]
        alive = [i for i in alive if agreement[i] >= min_agreement]
    closed = {}
    if alive and closed_book:
        no_context = [render_prompt(CLOSED_BOOK_TEMPLATE, "", questions[i], conversational=ask_chat) for i in alive]
        closed = dict(zip(alive, _call(generator, no_context, max_answer_tokens)))
        dropped["closed_book"] = [i for i in alive if same_answer(answers[i], closed[i], questions[i])]
        alive = [i for i in alive if not same_answer(answers[i], closed[i], questions[i])]

    # 4. pairs
    rng = random.Random(seed + 1)
    rows = []
    for i in alive:
        d, start, end = drawn[i]
        doc, span, question = docs[d]["text"], span_texts[i], questions[i]
        others = [docs[j]["text"] for j in range(len(docs)) if j != d]
        rng.shuffle(others)
        teacher_prompt = pair_prompt(span, question)
        short_tokens = count_tokens(tokenizer, teacher_prompt)
        depth = rng.random()
        for length in lengths:
            if length <= short_tokens:
                raise ValueError(
                    f"Target length {length} is not longer than the short prompt of span {i} ({short_tokens} "
                    "tokens); use longer lengths or smaller --span-tokens."
                )
            budget = length - short_tokens - 2
            for _ in range(5):  # joining pieces can merge or split a token or two: re-aim on the measured count
                before = round(depth * budget)
                context = _around(tokenizer, doc, start, end, others, before, budget - before)
                prompt = pair_prompt(context, question)
                count = count_tokens(tokenizer, prompt)
                if 0.99 * length <= count <= length:
                    break
                budget += length - count - (1 if count > length else 0)
            rows.append(
                {
                    "prompt": prompt,
                    "teacher_prompt": teacher_prompt,
                    "question": question,
                    "span": span,
                    "document_id": docs[d]["id"],
                    "span_start": start,
                    "answers": [answers[i]] if keep_answers and answers.get(i) else [],
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

    fate = {i: name for name, ids in dropped.items() for i in ids}

    def example(i):
        entry = {"question": questions[i], "document_id": docs[drawn[i][0]]["id"], "span_start": drawn[i][1]}
        for name, values in (("answer", answers), ("logprob", logprobs), ("agreement", agreement),
                             ("closed_book_answer", closed)):  # fmt: skip
            if i in values:
                entry[name] = round(values[i], 3) if isinstance(values[i], float) else values[i]
        return entry

    report = {
        "documents": len(docs),
        "document_tokens": doc_tokens,
        "spans": {
            "candidates": sum(len(s) for s in per_document),
            "skipped_no_content": skipped,
            "drawn": len(drawn),
        },
        "questions": {
            "generated": len(drawn),
            "dropped": {name: len(ids) for name, ids in dropped.items()},
            "kept": len(alive),
        },
        "rows": len(rows),
        "lengths": lengths,
        "answer_logprob": _quantiles(list(logprobs.values())),
        "settings": {
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
        },  # fmt: skip
        "kept_examples": [example(i) for i in alive[:20]],
        # every generated question with what became of it, in the order the spans were drawn
        "outcomes": [
            {"question": questions[i], "raw": raw[i][:200], "outcome": fate.get(i, "kept")} for i in range(len(drawn))
        ],
        "dropped_examples": {name: [example(i) for i in ids[:3]] for name, ids in dropped.items() if ids},
    }
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
