"""OPSDL rows from user columns (`context`, `question`, `evidence`), and a report on how short the teacher prompts are.

[`build_from_columns`] turns rows with `context`, `question` (and `evidence` when annotated) into OPSDL rows, the short
context coming from the evidence or an extractor (`trl_opsdl.data.extract`); [`dataset_report`] says how much shorter
the teacher prompts are and, against gold evidence, the extractor's recall; [`write_jsonl`] writes pairs with it.
"""

import logging
import os

from ..tokenization import count_tokens
from .extract import BM25Extractor
from .templates import QA_ANSWER_PREFIX, QA_TEMPLATE, render_prompt, replace_context


logger = logging.getLogger(__name__)


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


def write_jsonl(dataset, path: str, tokenizer=None) -> dict:
    """
    Write `dataset` as JSON lines to `path` (folders made as needed) and return its [`dataset_report`] (empty where
    there is neither a tokenizer nor token-count columns to count with) with the `output` path.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    dataset.to_json(path, lines=True, force_ascii=False)
    has_counts = "num_tokens" in dataset.column_names
    report = dataset_report(dataset, tokenizer) if tokenizer is not None or has_counts else {}
    report["output"] = path
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
