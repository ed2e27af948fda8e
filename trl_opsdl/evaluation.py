"""Long vs short evaluation: greedy generation on `prompt` and on `teacher_prompt`, scorers, results and plot, a
training callback, and loaders for LongBench (v1) and LongBench v2 records in local files.

Every scorer returns a percentage in [0, 100] for one prediction against its references (the best reference where
several are acceptable); results tables average them.
"""

import collections
import json
import logging
import os
import re
import string

from transformers import TrainerCallback

from .data.templates import count_tokens, prompt_ids, render_prompt


logger = logging.getLogger(__name__)


# --- scorers (percent) ----------------------------------------------------------------------------------------------


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
    import difflib

    lines = [line for line in pred.lstrip("\n").split("\n") if not line.strip().startswith(("`", "#", "//"))]
    first = lines[0] if lines else ""
    return max(100.0 * difflib.SequenceMatcher(None, first, r).ratio() for r in _as_list(refs))


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


def _row_metric(row: dict, metric: str) -> str:
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


# --- generation ------------------------------------------------------------------------------------------------------


def _unwrap(model):
    # DDP and DeepSpeed engines hide `generate` behind `.module`.
    while type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine", "DataParallel") and hasattr(
        model, "module"
    ):
        model = model.module
    return model


def greedy_generate(model, tokenizer, prompts, max_new_tokens: int, batch_size: int = 16, progress: bool = False):
    """
    Greedy completions of `prompts`.

    Args:
        model ([`~transformers.PreTrainedModel`]):
            A causal LM (a PEFT model or a DDP/DeepSpeed-wrapped one works too). Its train/eval mode is restored.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer; conversational prompts go through its chat template with a generation prompt.
        prompts (`list[str]` or `list[list[dict]]`):
            Plain prompts or message lists, tokenized exactly as the trainer tokenizes them.
        max_new_tokens (`int`):
            Generation budget per prompt.
        batch_size (`int`, *optional*, defaults to `16`):
            Prompts per `generate` call (left-padded; prompts of similar length are batched together).
        progress (`bool`, *optional*, defaults to `False`):
            Show a tqdm progress bar over the batches.

    Returns:
        `list[str]`: the new tokens of each prompt, decoded without special tokens, in the order of `prompts`.
    """
    import torch
    from tqdm.auto import tqdm

    if tokenizer is None:
        raise ValueError("greedy_generate needs the model's tokenizer.")
    if batch_size <= 0 or max_new_tokens <= 0:
        raise ValueError(f"batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be positive.")
    model = _unwrap(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad token nor an EOS token to pad batches with; set one.")
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths together: less padding
    device = next(model.parameters()).device
    outputs = [None] * len(ids)
    was_training = model.training
    model.eval()
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="generating", disable=not progress):
                width = max(len(ids[i]) for i in batch)
                input_ids = torch.tensor([[pad_id] * (width - len(ids[i])) + ids[i] for i in batch], device=device)
                attention_mask = torch.tensor(
                    [[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in batch], device=device
                )
                generated = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad_id,
                )
                texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
                for i, text in zip(batch, texts):
                    outputs[i] = text.strip()
    finally:
        model.train(was_training)
    return outputs


# --- evaluation ------------------------------------------------------------------------------------------------------


def evaluate_dataset(
    model,
    tokenizer,
    dataset,
    prompt_columns=("prompt", "teacher_prompt"),
    metric: str = "auto",
    group_by=("task", "length"),
    max_new_tokens: int = 64,
    batch_size: int = 16,
    answers_column: str = "answers",
    limit: int | None = None,
    progress: bool = False,
    return_predictions: bool = False,
) -> dict:
    """
    Greedy-generate on each prompt column of `dataset` and score the completions against `answers`.

    Args:
        model, tokenizer:
            The model to evaluate and its tokenizer.
        dataset ([`~datasets.Dataset`] or `list[dict]`):
            Rows with the prompt columns and `answers` (a list of acceptable strings), plus the `group_by` columns.
        prompt_columns (`Sequence[str]`, *optional*, defaults to `("prompt", "teacher_prompt")`):
            Columns to generate on (the long and the short prompt). A column the data lacks is left out (warning).
        metric (`str`, *optional*, defaults to `"auto"`):
            A scorer name of `METRICS` for every row, or `"auto"`: each row's `metric` column, else the scorer of its
            `task` in `TASK_METRICS`.
        group_by (`Sequence[str]`, *optional*, defaults to `("task", "length")`):
            Columns whose values define the groups; columns the data lacks are dropped.
        max_new_tokens / batch_size (`int`):
            Generation settings (greedy).
        limit (`int`, *optional*):
            Only the first `limit` rows.
        return_predictions (`bool`, *optional*, defaults to `False`):
            Add a `predictions` list (one dict per row) to the results.

    Returns:
        `dict`: `columns` maps each prompt column to `{"overall", "groups", "by_<key>"...}`: `groups` lists one entry
        per group (its `group_by` values, `metric`, `score`, `count`); a group's score is the mean over its rows;
        `by_<key>` (e.g. `by_length`) averages the groups sharing a value (RULER: the score at a length is the mean
        over tasks); `overall` averages all groups. Also `num_rows`, `skipped_rows` (rows without answers),
        `group_by`, `metric`, `max_new_tokens`, and `gap` (`overall` of the first column minus the second's).
    """
    rows = dataset.to_list() if hasattr(dataset, "to_list") else [dict(r) for r in dataset]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ValueError("The evaluation dataset is empty.")
    columns = set(rows[0])
    if answers_column not in columns:
        raise ValueError(f"The evaluation data has no {answers_column!r} column (it has {sorted(columns)}).")
    present = [c for c in prompt_columns if c in columns]
    if len(present) < len(prompt_columns):
        logger.warning(
            "Evaluation: column(s) %s missing, evaluating %s only.", set(prompt_columns) - set(present), present
        )
    if not present:
        raise ValueError(
            f"None of the prompt columns {list(prompt_columns)} is in the data (it has {sorted(columns)})."
        )
    keys = [k for k in group_by if k in columns]
    scored = [r for r in rows if r.get(answers_column)]
    skipped = len(rows) - len(scored)
    if not scored:
        raise ValueError(f"No row has reference answers in {answers_column!r}: nothing to score.")
    metrics = [_row_metric(r, metric) for r in scored]

    results = {
        "num_rows": len(scored),
        "skipped_rows": skipped,
        "group_by": keys,
        "metric": metric,
        "max_new_tokens": max_new_tokens,
        "columns": {},
    }
    predictions = [
        {"id": r.get("id"), **{k: r.get(k) for k in keys}, answers_column: r[answers_column]} for r in scored
    ]
    for column in present:
        completions = greedy_generate(
            model, tokenizer, [r[column] for r in scored], max_new_tokens, batch_size, progress
        )
        scores = [score(m, c, r[answers_column], r) for m, c, r in zip(metrics, completions, scored)]
        for p, c, s in zip(predictions, completions, scores):
            p[column] = c
            p[f"{column}_score"] = s
        results["columns"][column] = summarize(scored, scores, metrics, keys)
    if len(present) >= 2:
        results["gap"] = results["columns"][present[0]]["overall"] - results["columns"][present[1]]["overall"]
    if return_predictions:
        results["predictions"] = predictions
    return results


def summarize(rows, scores, metrics, keys) -> dict:
    """Group per-row scores by the `keys` columns: group means, their means per key value, and overall."""
    groups = {}
    for row, s, m in zip(rows, scores, metrics):
        group = groups.setdefault(tuple(row.get(k) for k in keys), {"scores": [], "metrics": set()})
        group["scores"].append(s)
        group["metrics"].add(m)
    entries = []
    for values, group in groups.items():
        entry = dict(zip(keys, values))
        entry.update(
            metric="+".join(sorted(group["metrics"])),
            score=sum(group["scores"]) / len(group["scores"]),
            count=len(group["scores"]),
        )
        entries.append(entry)
    summary = {"overall": sum(e["score"] for e in entries) / len(entries), "groups": entries}
    for key in keys:
        by = {}
        for entry in entries:
            by.setdefault(str(entry[key]), []).append(entry["score"])
        summary[f"by_{key}"] = {value: sum(v) / len(v) for value, v in by.items()}
    return summary


def _length_order(values):
    named = {"short": 0, "medium": 1, "long": 2, "0-4k": 0, "4-8k": 1, "8k+": 2}
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values, key=lambda v: (named.get(v, 99), v))


def plot_accuracy_vs_length(results: dict, path: str, columns=None) -> str:
    """Plot score vs context length: one thick line per prompt column (mean over tasks), one thin line per task.
    `columns` restricts the plot to some prompt columns (default: all, long solid and short dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "length" not in results["group_by"]:
        raise ValueError("The results are not grouped by `length`; nothing to plot against context length.")
    names = {"prompt": "long prompt", "teacher_prompt": "short (teacher) prompt"}
    styles = ["-", "--", ":", "-."]
    lengths = _length_order({str(e["length"]) for c in results["columns"].values() for e in c["groups"]})
    x = {length: i for i, length in enumerate(lengths)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tasks = sorted({str(e.get("task")) for c in results["columns"].values() for e in c["groups"]})
    colors = {task: plt.cm.tab10(i % 10) for i, task in enumerate(tasks)}
    for k, (column, summary) in enumerate(results["columns"].items()):
        if columns is not None and column not in columns:
            continue
        style = styles[k % len(styles)]
        points = sorted((x[v], s) for v, s in summary["by_length"].items())
        ax.plot([p for p, _ in points], [s for _, s in points], style, color="black", linewidth=2.5, marker="o",
                label=f"{names.get(column, column)}: mean")  # fmt: skip
        if len(tasks) > 1 and "task" in results["group_by"]:
            for task in tasks:
                pts = sorted(
                    (x[str(e["length"])], e["score"]) for e in summary["groups"] if str(e.get("task")) == task
                )
                ax.plot([p for p, _ in pts], [s for _, s in pts], style, color=colors[task], linewidth=1, alpha=0.8,
                        label=f"{names.get(column, column)}: {task}")  # fmt: skip
    ax.set_xticks(range(len(lengths)), lengths)
    ax.set_xlabel("context length of the long prompt (tokens)")
    ax.set_ylabel("score (%)")
    ax.set_ylim(-2, 102)
    shown = [c for c in results["columns"] if columns is None or c in columns]
    ax.set_title("Accuracy vs context length: " + " vs ".join(names.get(c, c) for c in shown))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_results(results: dict, output_dir: str) -> dict:
    """
    Write `metrics.json` (everything but the predictions), `predictions.jsonl` (when present) and, when grouped by
    length, `accuracy_vs_length.png` (all prompt columns on one plot) and `accuracy_vs_length_<column>.png` (one per
    prompt column) to `output_dir`. Returns the written paths.
    """
    os.makedirs(output_dir, exist_ok=True)
    paths = {"metrics": os.path.join(output_dir, "metrics.json")}
    with open(paths["metrics"], "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in results.items() if k != "predictions"}, f, indent=2, default=str)
    if results.get("predictions"):
        paths["predictions"] = os.path.join(output_dir, "predictions.jsonl")
        with open(paths["predictions"], "w", encoding="utf-8") as f:
            for p in results["predictions"]:
                f.write(json.dumps(p, default=str) + "\n")
    if "length" in results.get("group_by", []):
        paths["plot"] = plot_accuracy_vs_length(results, os.path.join(output_dir, "accuracy_vs_length.png"))
        for column in results["columns"]:  # and one plot per prompt column
            path = os.path.join(output_dir, f"accuracy_vs_length_{column}.png")
            paths[f"plot_{column}"] = plot_accuracy_vs_length(results, path, columns=[column])
    return paths


def flatten_results(results: dict, prefixes=None) -> dict[str, float]:
    """`{"eval_long/overall": ..., "eval_long/length_4096": ..., "eval_short/task_vt": ...}` for a logger."""
    prefixes = {"prompt": "eval_long", "teacher_prompt": "eval_short", **(prefixes or {})}
    logs = {}
    for column, summary in results["columns"].items():
        prefix = prefixes.get(column, f"eval_{column}")
        logs[f"{prefix}/overall"] = summary["overall"]
        for key in results["group_by"]:
            for value, s in summary[f"by_{key}"].items():
                logs[f"{prefix}/{key}_{value}"] = s
    return logs


class OPSDLEvalCallback(TrainerCallback):
    """
    Evaluate long (`prompt`) and short (`teacher_prompt`) accuracy every `every_n_steps` optimizer steps and log it.

    The metrics reach the trainer's reporters (`report_to`: W&B, TensorBoard, ...) and `trainer.state.log_history`
    as `eval_long/overall`, `eval_long/length_<L>`, `eval_long/task_<T>`, and the same under `eval_short/`. The
    trainer is given with `trainer=` or [`set_trainer`] (a callback's hooks do not receive it); without it the
    metrics only go to `state.log_history` and a warning says so.

    Every process evaluates the whole set (generation under ZeRO-3 needs all ranks); reporters log on the main one.

    Args:
        eval_dataset ([`~datasets.Dataset`]):
            Rows with `prompt`, `teacher_prompt` and `answers` (as built by `trl_opsdl.data`).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The model's tokenizer.
        every_n_steps (`int`, *optional*, defaults to `100`):
            Evaluate when `state.global_step` is a multiple of it.
        eval_on_start (`bool`, *optional*, defaults to `False`):
            Also evaluate before the first step (a baseline at step 0).
        trainer ([`~transformers.Trainer`], *optional*):
            The trainer whose reporters receive the metrics.
        **eval_kwargs:
            Passed to [`evaluate_dataset`] (`prompt_columns`, `metric`, `group_by`, `max_new_tokens`, `batch_size`,
            `limit`).

    Example:
    ```python
    callback = OPSDLEvalCallback(eval_ds, tokenizer, every_n_steps=50, max_new_tokens=32)
    trainer = OPSDLTrainer(model=..., args=..., train_dataset=train_ds, processing_class=tokenizer, callbacks=[callback])
    trainer.train()  # OPSDLTrainer hands itself to the callback; other trainers need `callback.set_trainer(trainer)`
    ```
    """

    def __init__(self, eval_dataset, tokenizer, every_n_steps: int = 100, eval_on_start: bool = False, trainer=None,
                 **eval_kwargs):  # fmt: skip
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}.")
        if tokenizer is None:
            raise ValueError("OPSDLEvalCallback needs the model's tokenizer.")
        self.eval_dataset, self.tokenizer = eval_dataset, tokenizer
        self.every_n_steps, self.eval_on_start = every_n_steps, eval_on_start
        self.eval_kwargs = {"max_new_tokens": 64, **eval_kwargs}
        self.trainer = trainer
        self.history = []  # (step, results)
        self._warned = False

    def set_trainer(self, trainer):
        """Route the metrics through `trainer`'s reporters."""
        self.trainer = trainer
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        if self.eval_on_start:
            self._evaluate(args, state, control, kwargs["model"])

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self._evaluate(args, state, control, kwargs["model"])

    def _evaluate(self, args, state, control, model):
        results = evaluate_dataset(model, self.tokenizer, self.eval_dataset, **self.eval_kwargs)
        self.history.append((state.global_step, results))
        logs = flatten_results(results)
        if self.trainer is None:
            state.log_history.append({**logs, "step": state.global_step})
            if not self._warned:
                logger.warning(
                    "OPSDLEvalCallback has no trainer: metrics go to state.log_history only. Call set_trainer()."
                )
                self._warned = True
            return
        # What `Trainer.log` does, without `DistillationTrainer.log`'s flush of the training metrics it is averaging.
        if state.epoch is not None:
            logs["epoch"] = state.epoch
        state.log_history.append({**logs, "step": state.global_step})
        self.trainer.callback_handler.on_log(args, state, control, logs)


# --- LongBench loaders ------------------------------------------------------------------------------------------------

_MULTI_DOC = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
    "The following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me "
    "the answer and do not output any other words.\n\nQuestion: {question}\nAnswer:"
)
# LongBench's prompts for its English tasks (adapted from its `dataset2prompt`; `{input}` is `{question}` here).
LONGBENCH_PROMPTS = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {question}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        'article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". '
        "Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as "
        "concisely as you can, using a single phrase or sentence if possible. Do not provide any explanation.\n\n"
        "Question: {question}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
        "above text, only give me the answer and do not output any other words.\n\nQuestion: {question}\nAnswer:"
    ),
    "hotpotqa": _MULTI_DOC,
    "2wikimqa": _MULTI_DOC,
    "musique": _MULTI_DOC,
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}"
        "\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one "
        "or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript "
        "in one or more sentences.\n\nQuery: {question}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write "
        "a one-page summary of all the news.\n\nSummary:"
    ),
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{question}",
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{question}"
    ),
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{question}",
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read "
        "these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other "
        "words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of "
        "unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, "
        "3, and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract "
        "is from.\n\n{context}\n\nThe following is an abstract.\n\n{question}\n\nPlease enter the number of the "
        'paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\n'
        "The answer is: "
    ),
    "lcc": "Please complete the code given below. \n{context}Now, the next line of code is:\n",
    "repobench-p": "Please complete the code given below. \n{context}{question}Next line of code:\n",
}
LONGBENCH_DEFAULT_PROMPT = (
    "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
    "above text, only give me the answer and do not output any other words.\n\nQuestion: {question}\nAnswer:"
)
LONGBENCH_V2_PROMPT = (
    "Please read the following text and answer the question below.\n\n<text>\n{context}\n</text>\n\n"
    "What is the correct answer to this question: {question}\n\n"
    'Format your response as follows: "The correct answer is (insert answer here)".'
)


def _read_records(path: str) -> list[dict]:
    from .data.qa import load_records

    if not os.path.isfile(str(path)):
        raise ValueError(f"LongBench file {path!r} does not exist; pass a local .json or .jsonl file.")
    return load_records(str(path))


def _fit_context(tokenizer, template, context, question, conversational, max_length):
    """Cut the context in its middle (LongBench's convention) until the prompt has at most `max_length` tokens."""
    prompt = render_prompt(template, context, question, "", conversational)
    excess = count_tokens(tokenizer, prompt) - max_length
    while excess > 0:
        ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        keep = max(0, len(ids) - excess - 2)
        if keep == 0:
            raise ValueError(f"max_length={max_length} leaves no room for the context of a LongBench row.")
        head = tokenizer.decode(ids[: keep // 2], skip_special_tokens=True)
        tail = tokenizer.decode(ids[len(ids) - (keep - keep // 2) :], skip_special_tokens=True)
        context = head + "\n...\n" + tail
        prompt = render_prompt(template, context, question, "", conversational)
        excess = count_tokens(tokenizer, prompt) - max_length
    return context, prompt


def _finish(rows, extractor, tokenizer):
    from datasets import Dataset

    from .data.extract import build_from_columns

    if not rows:
        raise ValueError("No LongBench records to load.")
    dataset = Dataset.from_list(rows)
    if extractor is not None:
        dataset = build_from_columns(dataset, extractor=extractor, tokenizer=tokenizer)
    return dataset


def load_longbench(path, task: str | None = None, tokenizer=None, max_length: int | None = None,
                   conversational: bool = False, extractor=None):  # fmt: skip
    """
    Load LongBench (v1) records (`context`, `input`, `answers`, `length`, `all_classes`, `dataset`) from a local file.

    Args:
        path (`str`):
            A `.jsonl` (LongBench's own files) or `.json` file.
        task (`str`, *optional*):
            The LongBench dataset name (e.g. `hotpotqa`), which picks the prompt and the metric. Defaults to each
            record's `dataset` field, else the file name.
        tokenizer / max_length (*optional*):
            With both, contexts are cut in the middle so that each prompt fits `max_length` tokens.
        conversational (`bool`, *optional*, defaults to `False`):
            One-user-message prompts.
        extractor (*optional*):
            Also build `teacher_prompt` with this extractor (see `trl_opsdl.data.build_from_columns`).

    Returns:
        [`~datasets.Dataset`] with `prompt` (and `teacher_prompt` with an extractor), `answers`, `task`, `metric`,
        `length` (LongBench-E's buckets of the record's word count: `0-4k`, `4-8k`, `8k+`), `num_words`,
        `all_classes`, `context`, `question`, `id`.
    """
    if max_length is not None and tokenizer is None:
        raise ValueError("max_length needs the tokenizer that counts it.")
    rows = []
    default_task = task or os.path.splitext(os.path.basename(str(path)))[0]
    for i, record in enumerate(_read_records(path)):
        missing = [k for k in ("context", "input", "answers") if k not in record]
        if missing:
            raise ValueError(f"LongBench record {i} of {path} lacks {missing}; is this LongBench v1 data?")
        name = task or record.get("dataset") or default_task
        template = LONGBENCH_PROMPTS.get(name, LONGBENCH_DEFAULT_PROMPT)
        context, question = record["context"], record["input"]
        if max_length is not None:
            context, prompt = _fit_context(tokenizer, template, context, question, conversational, max_length)
        else:
            prompt = render_prompt(template, context, question, "", conversational)
        words = int(record.get("length") or len(record["context"].split()))
        rows.append({
            "prompt": prompt,
            "answers": [str(a) for a in record["answers"]],
            "task": name,
            "metric": TASK_METRICS.get(name, "token_f1"),
            "length": "0-4k" if words < 4000 else "4-8k" if words < 8000 else "8k+",
            "num_words": words,
            "all_classes": record.get("all_classes"),
            "context": context,
            "question": question,
            "id": str(record.get("_id", i)),
        })  # fmt: skip
    return _finish(rows, extractor, tokenizer)


def load_longbench_v2(path, tokenizer=None, max_length: int | None = None, conversational: bool = False,
                      extractor=None):  # fmt: skip
    """
    Load LongBench v2 four-choice records (`context`, `question`, `choice_A`..`choice_D`, `answer`, `difficulty`,
    `length`, `domain`) from a local `.json` or `.jsonl` file. Scored with `choice_accuracy` (random is 25%).

    Returns:
        [`~datasets.Dataset`] with `prompt` (and `teacher_prompt` with an extractor), `answers` (`[letter]`), `task`
        (`longbench_v2`), `metric`, `length` (`short`/`medium`/`long`), `difficulty`, `domain`, `context`,
        `question` (with the choices), `id`.
    """
    if max_length is not None and tokenizer is None:
        raise ValueError("max_length needs the tokenizer that counts it.")
    rows = []
    for i, record in enumerate(_read_records(path)):
        missing = [
            k
            for k in ("context", "question", "choice_A", "choice_B", "choice_C", "choice_D", "answer")
            if k not in record
        ]
        if missing:
            raise ValueError(f"LongBench v2 record {i} of {path} lacks {missing}.")
        if str(record["answer"]).strip() not in ("A", "B", "C", "D"):
            raise ValueError(f"LongBench v2 record {i}: answer must be A, B, C or D, got {record['answer']!r}.")
        question = (
            record["question"].strip() + "\nChoices:\n" + "\n".join(f"({c}) {record[f'choice_{c}']}" for c in "ABCD")
        )
        context = record["context"]
        if max_length is not None:
            context, prompt = _fit_context(
                tokenizer, LONGBENCH_V2_PROMPT, context, question, conversational, max_length
            )
        else:
            prompt = render_prompt(LONGBENCH_V2_PROMPT, context, question, "", conversational)
        rows.append({
            "prompt": prompt,
            "answers": [str(record["answer"]).strip()],
            "task": "longbench_v2",
            "metric": "choice_accuracy",
            "length": record.get("length", "unknown"),
            "difficulty": record.get("difficulty"),
            "domain": record.get("domain"),
            "context": context,
            "question": question,
            "id": str(record.get("_id", i)),
        })  # fmt: skip
    return _finish(rows, extractor, tokenizer)
