"""Long vs short evaluation: greedy completions on `prompt` and on `teacher_prompt`, scored and averaged per task and
context length; the results written as JSON with a plot (into a folder checked, and cleared of an earlier run's
results, first), or flattened for a logger.
"""

import json
import logging
import os

from ..generation import greedy_generate
from .metrics import row_metric, score


logger = logging.getLogger(__name__)


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
    rows, present, skipped = evaluation_rows(dataset, prompt_columns, answers_column, limit)
    completions = {
        column: greedy_generate(model, tokenizer, [r[column] for r in rows], max_new_tokens, batch_size, progress)
        for column in present
    }
    return score_completions(
        rows, completions, metric, group_by, answers_column, max_new_tokens, skipped, return_predictions
    )


def evaluation_rows(dataset, prompt_columns=("prompt", "teacher_prompt"), answers_column: str = "answers",
                    limit: int | None = None) -> tuple[list[dict], list[str], int]:  # fmt: skip
    """The rows to evaluate (those with answers, the first `limit`), the prompt columns present, and how many rows
    were skipped for having no answers. Raises on data that cannot be evaluated, saying why."""
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
    scored = [r for r in rows if r.get(answers_column)]
    if not scored:
        raise ValueError(f"No row has reference answers in {answers_column!r}: nothing to score.")
    return scored, present, len(rows) - len(scored)


def score_completions(rows, completions: dict, metric: str = "auto", group_by=("task", "length"),
                      answers_column: str = "answers", max_new_tokens: int | None = None, skipped_rows: int = 0,
                      return_predictions: bool = False) -> dict:  # fmt: skip
    """Score `completions` (prompt column -> one completion per row of `rows`) and aggregate them as
    [`evaluate_dataset`] returns them."""
    keys = [k for k in group_by if k in rows[0]]
    metrics = [row_metric(r, metric) for r in rows]
    results = {
        "num_rows": len(rows),
        "skipped_rows": skipped_rows,
        "group_by": keys,
        "metric": metric,
        "max_new_tokens": max_new_tokens,
        "columns": {},
    }
    predictions = [{"id": r.get("id"), **{k: r.get(k) for k in keys}, answers_column: r[answers_column]} for r in rows]
    for column, texts in completions.items():
        scores = [score(m, c, r[answers_column], r) for m, c, r in zip(metrics, texts, rows, strict=True)]
        for p, c, s in zip(predictions, texts, scores):
            p[column] = c
            p[f"{column}_score"] = s
        results["columns"][column] = summarize(rows, scores, metrics, keys)
    present = list(completions)
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


RESULT_FILES = ("metrics.json", "predictions.jsonl", "accuracy_vs_length.png")  # + accuracy_vs_length_<column>.png


def check_results_dir(output_dir: str, overwrite: bool = False, flag: str = "--output-dir") -> None:
    """Refuse, before any work, a results folder that is a file or holds anything, unless `overwrite`."""
    if os.path.isfile(output_dir):
        raise ValueError(f"{flag} {output_dir!r} is a file; pass a folder.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(
            f"{flag} {output_dir!r} is not empty; pass another folder, or --overwrite to replace an earlier "
            "eval's results there."
        )


def clear_results(output_dir: str) -> None:
    """Remove what an earlier [`save_results`] wrote to `output_dir` (so that no plot of a prompt column this run
    lacks is left behind); nothing else."""
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        if name in RESULT_FILES or (name.startswith("accuracy_vs_length_") and name.endswith(".png")):
            os.remove(os.path.join(output_dir, name))


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
