"""Scorers: each returns a percentage in [0, 100] for one prediction against its references (the best reference where
several are acceptable). `METRICS` names them; `TASK_METRICS` says which one `metric="auto"` uses for a task.

A new scorer is a function `(pred, refs) -> float` added to `METRICS` (and, for a task, to `TASK_METRICS`).
"""

import collections
import difflib
import math
import re
import string


def _as_list(refs) -> list[str]:
    if isinstance(refs, str):
        refs = [refs]
    refs = [str(r) for r in (refs or [])]
    if not refs:
        raise ValueError("No reference answer to score against: `answers` is empty.")
    return refs


def string_match_all(pred: str, refs) -> float:
    """RULER: percent of the references that occur in the prediction (case-insensitive)."""
    refs = _as_list(refs)
    return 100.0 * sum(r.lower() in pred.lower() for r in refs) / len(refs)


def string_match_part(pred: str, refs) -> float:
    """RULER: 100 if any reference occurs in the prediction (case-insensitive), else 0."""
    return 100.0 * any(r.lower() in pred.lower() for r in _as_list(refs))


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(pred: str, refs) -> float:
    """SQuAD exact match (after [`normalize_answer`]), best over references: 100 or 0."""
    return 100.0 * max(normalize_answer(pred) == normalize_answer(r) for r in _as_list(refs))


def contains_answer(pred: str, refs) -> float:
    """100 if a reference, SQuAD-normalized, occurs as whole words in the normalized prediction (RULER's
    `string_match_part` on normalized text: for readers that answer in sentences), else 0."""
    padded = f" {normalize_answer(pred)} "
    return 100.0 * any(f" {normalize_answer(r)} " in padded for r in _as_list(refs) if normalize_answer(r))


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, refs) -> float:
    """SQuAD token F1 (bag of normalized words), best over references, in percent."""
    return 100.0 * max(_f1(normalize_answer(pred).split(), normalize_answer(r).split()) for r in _as_list(refs))


def parse_choice(pred: str) -> str | None:
    """The letter of "The correct answer is (X)" (LongBench v2), or a prediction that starts with a lone A-D."""
    text = pred.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", text) or re.search(
        r"The correct answer is ([A-D])\b", text
    )
    if match is None:
        match = re.match(r"\s*\(?([A-D])\)?(?:$|[\s.,:;)])", text)
    return match.group(1) if match else None


def choice_accuracy(pred: str, answer_letter) -> float:
    """Four-choice accuracy: 100 if the parsed letter (see [`parse_choice`]) equals `answer_letter`, else 0."""
    if not isinstance(answer_letter, str):
        answer_letter = _as_list(answer_letter)[0]
    letter = answer_letter.strip().strip("()").upper()
    if letter not in ("A", "B", "C", "D"):
        raise ValueError(f"The answer of a four-choice question must be A, B, C or D, got {answer_letter!r}.")
    return 100.0 * (parse_choice(pred) == letter)


def rouge_l(pred: str, refs) -> float:
    """ROUGE-L F1 over lower-cased words (LongBench's summaries), best over references, in percent."""

    def lcs(a, b):
        previous = [0] * (len(b) + 1)
        for x in a:
            current = [0]
            for j, y in enumerate(b):
                current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
            previous = current
        return previous[-1]

    best = 0.0
    pred_words = re.findall(r"\w+", pred.lower())
    for ref in _as_list(refs):
        ref_words = re.findall(r"\w+", ref.lower())
        common = lcs(pred_words, ref_words) if pred_words and ref_words else 0
        if common:
            precision, recall = common / len(pred_words), common / len(ref_words)
            best = max(best, 2 * precision * recall / (precision + recall))
    return 100.0 * best


def classification_score(pred: str, refs, all_classes) -> float:
    """LongBench (trec, lsht): 100 / (number of class names found) if the right one is among them."""
    best = 0.0
    for ref in _as_list(refs):
        found = [c for c in all_classes or [] if c in pred]
        # A class name inside the right one (e.g. "city" in "city name") is not a competing guess.
        found = [c for c in found if not (c in ref and c != ref)]
        if ref in found:
            best = max(best, 1.0 / len(found))
    return 100.0 * best


def retrieval_score(pred: str, refs) -> float:
    """LongBench (passage_retrieval): share of the numbers in the prediction that are the right paragraph number."""
    best = 0.0
    for ref in _as_list(refs):
        wanted = re.findall(r"Paragraph (\d+)", ref)
        numbers = re.findall(r"\d+", pred)
        if wanted and numbers:
            best = max(best, sum(n == wanted[0] for n in numbers) / len(numbers))
    return 100.0 * best


def count_score(pred: str, refs) -> float:
    """LongBench (passage_count): share of the numbers in the prediction equal to the right count."""
    best = 0.0
    for ref in _as_list(refs):
        numbers = re.findall(r"\d+", pred)
        if numbers:
            best = max(best, sum(n == str(ref).strip() for n in numbers) / len(numbers))
    return 100.0 * best


def code_similarity(pred: str, refs) -> float:
    """LongBench (lcc, repobench-p): character similarity (difflib ratio) of the first code line of the prediction."""
    lines = [line for line in pred.lstrip("\n").split("\n") if not line.strip().startswith(("`", "#", "//"))]
    first = lines[0] if lines else ""
    return max(100.0 * difflib.SequenceMatcher(None, first, r).ratio() for r in _as_list(refs))


def interval95(scores: list[float]) -> tuple[float, float]:
    """95% interval of a mean of per-question scores in [0, 100]: Wilson's for 0/100 scores, else normal."""
    n = len(scores)
    mean = sum(scores) / n
    if all(s in (0.0, 100.0) for s in scores):
        p, z = mean / 100, 1.96
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        # at p = 0 the lower bound is 0 up to rounding (-1e-17 would print as "-0"): clamp to [0, 100]
        return round(max(0.0, 100 * (centre - half)), 1), round(min(100.0, 100 * (centre + half)), 1)
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(1, n - 1))
    return round(max(0.0, mean - 1.96 * sd / math.sqrt(n)), 1), round(min(100.0, mean + 1.96 * sd / math.sqrt(n)), 1)


METRICS = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "exact_match": exact_match,
    "contains": contains_answer,
    "token_f1": token_f1,
    "choice_accuracy": choice_accuracy,
    "rouge_l": rouge_l,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "count": count_score,
    "code_similarity": code_similarity,
}

# The metric `metric="auto"` uses for a task when the row has no `metric` column.
TASK_METRICS = {
    **dict.fromkeys(
        ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "kv_retrieval"],
        "string_match_all",
    ),
    **dict.fromkeys(
        ["hotpotqa", "musique", "2wikimqa", "narrativeqa", "qasper", "multifieldqa_en", "triviaqa", "custom"],
        "token_f1",
    ),
    **dict.fromkeys(["gov_report", "qmsum", "multi_news", "samsum"], "rouge_l"),
    **dict.fromkeys(["trec", "lsht"], "classification"),
    **dict.fromkeys(["lcc", "repobench-p"], "code_similarity"),
    "passage_retrieval_en": "retrieval",
    "passage_count": "count",
    "longbench_v2": "choice_accuracy",
    "squad": "contains",  # generative readers answer in sentences: is the gold answer in the reply
}


def score(metric: str, pred: str, refs, row: dict | None = None) -> float:
    """Score `pred` with the scorer named `metric` (a key of `METRICS`), in percent."""
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; choose among {', '.join(METRICS)}.")
    if metric == "classification":
        return classification_score(pred, refs, (row or {}).get("all_classes"))
    return METRICS[metric](pred, refs)


def row_metric(row: dict, metric: str) -> str:
    """The scorer name for `row`: `metric`, or with `\"auto\"` the row's `metric` column, else its task's."""
    if metric != "auto":
        return metric
    if row.get("metric"):
        return row["metric"]
    task = row.get("task")
    if task in TASK_METRICS:
        return TASK_METRICS[task]
    raise ValueError(
        f"metric='auto' cannot choose a scorer for task {task!r} (no `metric` column). Pass metric=one of "
        f"{', '.join(METRICS)}, or add a `metric` column."
    )
