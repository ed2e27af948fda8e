"""RULER in miniature: does OPSDL trained on a mix of RULER families over training essays improve long-context reading
in general — on families it never saw and at lengths beyond training — against the base model and TRL's SFT on the
model's own short-prompt answers, at the same budget (docs/results.md#ruler-in-miniature-other-families-longer-contexts).

    python experiments/ruler_transfer.py --output-dir runs/ruler --seeds 0          # one seed of each method
    python experiments/ruler_transfer.py --output-dir runs/ruler --seeds 1,2        # the next ones, later
    python experiments/ruler_transfer.py --output-dir runs/ruler --summary-only     # the table from what has run
    python experiments/ruler_transfer.py --quick --output-dir /tmp/rt --seeds 0     # toy sizes, minutes
    python experiments/ruler_transfer.py --output-dir runs/ruler --seeds 0,1,2 --methods opsdl_anchors_75  # a variant

Every step is a `trl-opsdl` command (logged to `<output-dir>/logs/`) and is skipped when its result exists: the
base model's bench, then per seed and method `demo --real --compare --save-model` (the adapter) and `bench ruler
--adapter` (cells cached, so a stopped bench resumes). One heavy job at a time: on two cores, two at once each take
twice as long. The summary (`transfer.json`, `transfer.md`) is rebuilt from the bench results present: the seed
means with their standard deviations, then each method's change against the base over the same questions (every
model answers the same rows), with a 95% interval that paired questions make far tighter than two cells' intervals.
"""

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple


# The recipe (docs/real_demo.md#training-on-a-mix-of-tasks): four families trained at 512 and 1,024 tokens (L = 1,024),
# three held out; benched at L, 2L and 4L over the held-out essays.
MIX = ("niah_single", "niah_multikey", "vt", "niah_multiquery")
HELD_OUT = ("niah_multivalue", "cwe", "fwe")
TRAIN_LENGTHS = (512, 1024)
BENCH_LENGTHS = (1024, 2048, 4096)
METHODS = ("opsdl", "sft_self")


# The other split measured: the word-count families trained, the needle variants (niah_multikey, niah_multivalue,
# niah_multiquery) held out.
NEEDLES_HELD_OUT_MIX = "niah_single,vt,cwe,fwe"
# The 1,024-only recipe's options on that split (its OPSDL variant and the variants that change it).
NEEDLES_OPTIONS = ["--short-prompt-ratio", "0.75", "--train-lengths", "1024", "--mix", NEEDLES_HELD_OUT_MIX]


class Variant(NamedTuple):
    """A recipe variant: the demo method it trains, the options it adds to RECIPE (the last value of an option wins),
    and the recipe it changes (compared question by question). It trains into its own `compare-<name>/` (the demo names
    its run files by the demo method) and benches as `<name>-seed<k>`; with another `--mix` it has its own trained and
    held-out families (`split`)."""

    method: str
    options: list
    reference: str


VARIANTS = {
    # Three of each batch's four rows on the short prompt (RECIPE: two): the anchors hold the short-prompt replies
    # the default lowers on the multi-answer families (vt -24, multivalue -9 on three seeds).
    "opsdl_anchors_75": Variant("opsdl", ["--short-prompt-ratio", "0.75"], "opsdl"),
    # The same for 100 steps (the last --max-steps given wins): ~50 minutes here, inside the 60-minute budget; does
    # twice the training move the families the 50-step runs never moved (cwe, fwe)?
    "opsdl_anchors_75_steps_100": Variant("opsdl", ["--short-prompt-ratio", "0.75", "--max-steps", "100"], "opsdl"),
    # The anchored recipe with common-word extraction trained in place of niah_multiquery (the last --mix given
    # wins): the mix above holds no aggregation family, and cwe/fwe never moved. Does training one word-count family
    # carry to the other (fwe, held out with niah_multivalue and niah_multiquery)?
    "opsdl_anchors_75_cwe": Variant(
        "opsdl",
        ["--short-prompt-ratio", "0.75", "--mix", "niah_single,niah_multikey,vt,cwe"],
        "opsdl_anchors_75",
    ),
    # The same with frequent-word extraction trained instead: on fwe the short-prompt teacher is strong (87 against
    # ~27 on long contexts), on cwe it is not (35: the 135M model repeats one word). Does a word-count family move
    # when trained with a teacher that can answer it?
    "opsdl_anchors_75_fwe": Variant(
        "opsdl",
        ["--short-prompt-ratio", "0.75", "--mix", "niah_single,niah_multikey,vt,fwe"],
        "opsdl_anchors_75",
    ),
    # The anchored recipe with every training prompt at L = 1,024 tokens instead of half at 512: the gains beyond
    # training are the needle families' at 2L and 4L, learned from the long rows (one in four), of which half were
    # 512 tokens. Does the longest length alone carry further? (L, and so "beyond training", is unchanged.)
    "opsdl_anchors_75_train_1024": Variant(
        "opsdl", ["--short-prompt-ratio", "0.75", "--train-lengths", "1024"], "opsdl_anchors_75"
    ),
    # The 1,024-only recipe with the other split: the word-count families trained (with niah_single and vt), the three
    # needle variants held out (niah_multikey, niah_multivalue, niah_multiquery). cwe and fwe moved under no recipe,
    # trained or not, so with them held out the held-out column measures little but them; here it measures whether
    # the reading learned on one needle family carries to the needle families it never saw.
    "opsdl_anchors_75_train_1024_needles": Variant("opsdl", NEEDLES_OPTIONS, "opsdl_anchors_75_train_1024"),
    # The same at half the learning rate (RECIPE: 3e-4): no recipe above kept every family's short prompts within 2
    # points of the base (cwe -6, fwe -8, niah_multivalue -13 on this split). Is the short-prompt loss the step size
    # (a smaller drift from the adapter-free model), and what does a smaller step cost the held-out families?
    "opsdl_anchors_75_train_1024_needles_lr_1.5e-4": Variant(
        "opsdl", [*NEEDLES_OPTIONS, "--learning-rate", "1.5e-4"], "opsdl_anchors_75_train_1024_needles"
    ),
    # The same split with half of each batch's rows on the short prompt (the demo's default) where the variants above
    # anchor three of four: its SFT-self baseline below trains at that same share, so here both methods read
    # the long prompt on as many rows. Do twice the long rows move the held-out needle variants past SFT-self's, and
    # what do they cost the short prompts?
    "opsdl_train_1024_needles": Variant(
        "opsdl", [*NEEDLES_OPTIONS, "--short-prompt-ratio", "0.5"], "opsdl_anchors_75_train_1024_needles"
    ),
    # Seven of each batch's eight rows anchored (batch 8, ratio 0.875): as many long rows per step as three of four at
    # batch 4 (one), twice the short-prompt anchors. Neither half the step size nor fewer anchors kept every family's
    # short prompts within 2 points (niah_multivalue -9.0, cwe -7.9 at n = 100 with three of four); do more anchors,
    # at the same long-row budget, hold them, and what do they cost the held-out needle variants?
    "opsdl_anchors_875_batch_8_needles": Variant(
        "opsdl",
        [*NEEDLES_OPTIONS, "--batch-size", "8", "--short-prompt-ratio", "0.875"],
        "opsdl_anchors_75_train_1024_needles",
    ),
    # LoRA on the attention projections only (q, k, v, o; the recipe: every linear layer). What a long context needs
    # is where to read; the reply's shape, which the short prompts lose on families no anchor shows, is at least
    # partly the MLPs'. With the MLPs left as they were, do the short prompts stay, and at what cost to the long ones?
    "opsdl_anchors_75_train_1024_needles_attn": Variant(
        "opsdl",
        [*NEEDLES_OPTIONS, "--lora-target-modules", "q_proj,k_proj,v_proj,o_proj"],
        "opsdl_anchors_75_train_1024_needles",
    ),
    # The needle split's recipe for half its steps (25): is the short-prompt loss the length of training, so that an
    # earlier stop keeps short prompts? (Run on another CPU kind than the rest, short prompts and 1,024 tokens only:
    # docs/results.md "Half the steps".)
    "opsdl_anchors_75_train_1024_needles_steps_25": Variant(
        "opsdl", [*NEEDLES_OPTIONS, "--max-steps", "25"], "opsdl_anchors_75_train_1024_needles"
    ),
    # TRL SFT-self with every training prompt at 1,024 tokens on the recipe's split: the like-for-like baseline of the
    # 1,024-only OPSDL recipe there (the split's SFT-self runs trained at 512 and 1,024, as its first OPSDL runs).
    "sft_self_train_1024": Variant("sft_self", ["--train-lengths", "1024"], "sft_self"),
    # TRL's SFT on the model's own short-prompt answers over the same prompts (the same split, all at 1,024 tokens):
    # the label-free baseline of the comparison, read with the same held-out families.
    "sft_self_train_1024_needles": Variant(
        "sft_self", ["--train-lengths", "1024", "--mix", NEEDLES_HELD_OUT_MIX], "sft_self"
    ),
}
RECIPE = ["--mix", ",".join(MIX), "--train-lengths", ",".join(map(str, TRAIN_LENGTHS)), "--max-steps", "50",
          "--batch-size", "4", "--learning-rate", "3e-4", "--max-completion-length", "64",
          # The demo's own before/after check (niah_single at 512/1,024) kept small: the bench is the measurement.
          "--eval-short", "30", "--eval-long", "30", "--no-short-check"]  # fmt: skip
QUICK_RECIPE = ["--quick", "--mix", "niah_single,vt", "--no-short-check"]
# bf16 answers the long cells ~2.4x faster than fp32 on this project's AMX CPUs; every model is benched the same way.
BENCH = ["--num-samples", "30", "--dtype", "bfloat16", "--batch-size", "8"]
QUICK_BENCH = ["--quick"]
LABELS = {
    "base": "base",
    "opsdl": "OPSDL (mix)",
    "sft_self": "TRL SFT-self (mix)",
    "opsdl_anchors_75": "OPSDL, 3 of 4 rows anchored (mix)",
    "opsdl_anchors_75_steps_100": "OPSDL, 3 of 4 rows anchored, 100 steps (mix)",
    "opsdl_anchors_75_cwe": "OPSDL, 3 of 4 rows anchored, cwe trained for niah_multiquery (mix)",
    "opsdl_anchors_75_fwe": "OPSDL, 3 of 4 rows anchored, fwe trained for niah_multiquery (mix)",
    "opsdl_anchors_75_train_1024": "OPSDL, 3 of 4 rows anchored, trained at 1,024 tokens only (mix)",
    "opsdl_anchors_75_train_1024_needles": "OPSDL, 1,024 only, needle variants held out (mix)",
    "opsdl_anchors_75_train_1024_needles_lr_1.5e-4": "OPSDL, 1,024 only, needle variants held out, lr 1.5e-4 (mix)",
    "opsdl_train_1024_needles": "OPSDL, 1,024 only, needle variants held out, 2 of 4 rows anchored (mix)",
    "opsdl_anchors_875_batch_8_needles": "OPSDL, 1,024 only, needle variants held out, 7 of 8 rows anchored (mix)",
    "opsdl_anchors_75_train_1024_needles_attn": "OPSDL, 1,024 only, needle variants held out, LoRA on attention (mix)",
    "opsdl_anchors_75_train_1024_needles_steps_25": "OPSDL, 1,024 only, needle variants held out, 25 steps (mix)",
    "sft_self_train_1024": "TRL SFT-self, trained at 1,024 tokens only (mix)",
    "sft_self_train_1024_needles": "TRL SFT-self, 1,024 only, needle variants held out (mix)",
}


def split(method: str) -> tuple[tuple, tuple]:
    """A method's trained families (the last `--mix` its training command gives) and held-out families (the rest of
    the seven, in MIX + HELD_OUT's order). The base model is read with the recipe's split."""
    options = RECIPE + (VARIANTS[method].options if method in VARIANTS else [])
    trained = tuple([options[i + 1] for i, o in enumerate(options) if o == "--mix"][-1].split(","))
    return trained, tuple(t for t in MIX + HELD_OUT if t not in trained)


def run_step(command: list[str], log_file: Path) -> None:
    """One `trl-opsdl` command, its output appended to `log_file`; a failure stops the script with its log's path."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    print(f"$ {' '.join(command)}   (log: {log_file})", flush=True)
    with open(log_file, "a", encoding="utf-8") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"step failed (exit {code}); see {log_file}")
    print(f"  done in {time.time() - start:.0f}s", flush=True)


def bench(out: Path, name: str, quick: bool, adapter: str | None = None, short_samples: int | None = None) -> None:
    """A model's table into `bench/<name>/`; with `short_samples`, the same table with that many rows in each
    short-prompt cell into `bench_short<N>/<name>/`, whose cells start as a copy of `bench/<name>/cells/` (the long
    cells are not recomputed: only the short ones are new)."""
    folder = "bench" if short_samples is None else f"bench_short{short_samples}"
    target = out / folder / name
    if (target / "ruler_bench.json").exists():
        return
    if short_samples is not None and not (target / "cells").exists():
        shutil.copytree(out / "bench" / name / "cells", target / "cells")
    lengths = [] if quick else ["--lengths", ",".join(map(str, BENCH_LENGTHS))]
    command = ["trl-opsdl", "bench", "ruler", *lengths, *(QUICK_BENCH if quick else BENCH), "--output-dir",
               str(target), "--label", name]  # fmt: skip
    if short_samples is not None:
        command += ["--short-samples", str(short_samples)]
    if adapter is not None:
        command += ["--adapter", adapter, "--baseline", str(out / folder / "base" / "ruler_bench.json")]
    run_step(command, out / "logs" / f"{folder}-{name}.log")


def train(out: Path, method: str, seed: int, quick: bool) -> str:
    """The method's adapter for `seed` (trained unless its run file exists); returns the adapter folder."""
    demo_method, extra, _ = VARIANTS.get(method, Variant(method, [], method))
    compare = out / ("compare" if method in METHODS else f"compare-{method}")
    run_file = compare / "runs" / f"{demo_method}-seed{seed}.json"
    if not run_file.exists():
        command = ["trl-opsdl", "demo", "--real", "--compare", *(QUICK_RECIPE if quick else RECIPE), *extra,
                   "--save-model", "--methods", demo_method, "--seeds", str(seed), "--output-dir", str(compare)]  # fmt: skip
        run_step(command, out / "logs" / f"train-{method}-seed{seed}.log")
    return json.loads(run_file.read_text())["adapter"]


# --- the summary ---------------------------------------------------------------------------------------------------


def model_summary(results: dict, trained=MIX, held_out=HELD_OUT, longest_trained: int = max(TRAIN_LENGTHS)) -> dict:
    """One model's figures for the transfer table, from its `ruler_bench.json`: per length the mean over all families
    (RULER's convention); over lengths, the mean of the trained and of the held-out families; beyond training (every
    family at the lengths > `longest_trained`); the short prompt's mean; and each family's short-prompt score."""
    table = results["table"]
    lengths = [str(n) for n in table["lengths"]]
    by_task = table["by_task"]

    def families_mean(families, at):  # a family missing from the bench is a KeyError, not a mean over fewer
        return statistics.fmean(by_task[t]["lengths"][n]["score"] for t in families for n in at)

    beyond = [n for n in lengths if int(n) > longest_trained]
    return {
        **{n: table["by_length"][n]["score"] for n in lengths},
        "trained": families_mean(trained, lengths),
        "held_out": families_mean(held_out, lengths),
        "beyond": families_mean(list(by_task), beyond) if beyond else None,
        "short": table["short"]["score"],
        "overall": table["overall"]["score"],
        "short_by_task": {t: by_task[t]["short"]["score"] for t in by_task},
        "by_task": {t: {n: by_task[t]["lengths"][n]["score"] for n in lengths} for t in by_task},
    }


def transfer_table(summaries: dict) -> dict:
    """`summaries[method]` = the model summaries of its seeds; per method and column the mean over seeds and (with
    two or more seeds) the sample standard deviation."""
    table = {}
    for method, runs in summaries.items():
        columns = {}
        for key in runs[0]:
            if isinstance(runs[0][key], dict) or runs[0][key] is None:
                continue
            values = [r[key] for r in runs]
            columns[key] = {"mean": round(statistics.fmean(values), 2),
                            "std": round(statistics.stdev(values), 2) if len(values) > 1 else None}  # fmt: skip
        columns["short_by_task"] = {t: round(statistics.fmean(r["short_by_task"][t] for r in runs), 2)
                                    for t in runs[0]["short_by_task"]}  # fmt: skip
        columns["by_task"] = {t: {n: round(statistics.fmean(r["by_task"][t][n] for r in runs), 2) for n in lengths}
                              for t, lengths in runs[0]["by_task"].items()}  # fmt: skip
        table[method] = {"seeds": len(runs), **columns}
    return table


def transfer_markdown(table: dict, lengths) -> str:
    def cell(entry):
        return f"{entry['mean']:.1f}" + (f" ± {entry['std']:.1f}" if entry.get("std") is not None else "")

    lengths = [str(n) for n in lengths]
    head = ["method", "seeds", *[f"{n}" for n in lengths], "trained families", "held-out families",
            "beyond training (all families)", "short prompt", "overall"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in table.items():
        figures = [cell(row[k]) if row.get(k) else "—" for k in [*lengths, "trained", "held_out", "beyond", "short",
                                                                   "overall"]]  # fmt: skip
        lines.append(f"| {label(method)} | {row['seeds']} | " + " | ".join(figures) + " |")
    families = list(next(iter(table.values()))["by_task"])
    lines += ["", "Per family (mean over seeds): short prompt, then each length.", "",
              "| method | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]  # fmt: skip
    for method, row in table.items():
        per = [f"{row['short_by_task'][t]:.0f} / " + " / ".join(f"{row['by_task'][t][n]:.0f}" for n in lengths)
               for t in families]  # fmt: skip
        lines.append(f"| {label(method)} | " + " | ".join(per) + " |")
    return "\n".join(lines)


def label(method: str) -> str:
    """A table row's name; `base:<variant>` is the base model read with that variant's trained/held-out split."""
    if method.startswith("base:"):
        trained, held_out = split(method[len("base:") :])
        return f"base (trained: {', '.join(trained)}; held out: {', '.join(held_out)})"
    return LABELS.get(method, method)


# --- changes against the base, paired over the same questions ------------------------------------------------------


def cell_scores(bench_dir: Path) -> dict:
    """`{(family, length): {question id: score}}` for the cells a bench's `ruler_bench.json` was built from (its folder
    may cache others, e.g. short prompts built from another shortest length), found by their keys as the bench does."""
    from trl_opsdl.evaluation.ruler_bench import cell_path, read_cell

    results = json.loads((bench_dir / "ruler_bench.json").read_text())
    found = {}
    for entry in results["cells"]:
        cell = read_cell(cell_path(str(bench_dir), entry["key"]))
        found[(entry["task"], str(entry["length"]))] = {p["id"]: p["score"] for p in cell["predictions"]}
    return found


def paired_change(reference: dict, method: dict) -> dict:
    """One cell's change over the same questions, `{question id: score}` each (a method's scores are its seeds' mean
    per question): D_i = method_i - reference_i; the change is mean(D_i), its 95% interval 1.96 · sd(D_i) / sqrt(n)
    (questions are the sample; the seeds are fixed). Far tighter than two independent cells' intervals: most questions
    keep their answer."""
    d = [method[i] - r for i, r in reference.items()]
    mean, se = statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))
    return {"delta": round(mean, 2), "ci95": [round(mean - 1.96 * se, 1), round(mean + 1.96 * se, 1)],
            "se": round(se, 4), "n": len(d)}  # fmt: skip


def _pooled(changes: list[dict]) -> dict:
    """Mean of cells' changes; cells hold different questions (independent): se = sqrt(sum se_i^2) / k."""
    mean = statistics.fmean(c["delta"] for c in changes)
    se = math.sqrt(sum(c["se"] ** 2 for c in changes)) / len(changes)
    return {"delta": round(mean, 2), "ci95": [round(mean - 1.96 * se, 1), round(mean + 1.96 * se, 1)]}


def seed_mean_scores(bench_dirs: list[Path]) -> dict | None:
    """`{(family, length): {question id: score}}` averaged over several benches of one method (its seeds); None when
    they did not answer the same questions."""
    runs = [cell_scores(d) for d in bench_dirs]
    if any(run.keys() != runs[0].keys() or any(run[k].keys() != runs[0][k].keys() for k in run) for run in runs):
        return None
    return {key: {i: statistics.fmean(run[key][i] for run in runs) for i in cell} for key, cell in runs[0].items()}


def paired_changes(reference_dirs: list[Path], seed_dirs: list[Path], trained=MIX, held_out=HELD_OUT,
                   longest_trained: int = max(TRAIN_LENGTHS)) -> dict | None:  # fmt: skip
    """A method's changes against a reference (the base model; or another method, per question the mean over its
    seeds), cell by cell over the same questions (`paired_change`), and for the transfer table's columns (trained and
    held-out families over the lengths, all families beyond training, short prompts). None without reference cells,
    or when a seed has no cell on the reference's questions (other lengths or counts)."""
    reference, method = seed_mean_scores(reference_dirs), seed_mean_scores(seed_dirs)
    if not reference or method is None or any(method.get(k, {}).keys() != c.keys() for k, c in reference.items()):
        return None
    by_cell = {key: paired_change(cell, method[key]) for key, cell in reference.items()}
    numerics = other_numerics(reference_dirs, seed_dirs)
    lengths = sorted({int(n) for _, n in by_cell if n != "short"})
    families = sorted({t for t, _ in by_cell})
    columns = {
        "trained": [(t, str(n)) for t in trained for n in lengths],
        "held_out": [(t, str(n)) for t in held_out for n in lengths],
        "beyond": [(t, str(n)) for t in families for n in lengths if n > longest_trained],
        "short": [(t, "short") for t in families],
    }
    return {
        **{name: _pooled([by_cell[k] for k in keys]) for name, keys in columns.items() if keys},
        "by_cell": {f"{t}@{n}": c for (t, n), c in sorted(by_cell.items())},
        **({"other_numerics": numerics} if numerics else {}),
    }


def other_numerics(reference_dirs: list[Path], seed_dirs: list[Path]) -> list[str]:
    """How the benches' numerics (precision, CPU, kernels, versions) differ from the reference's first: greedy answers
    differ under those alone (an Intel and an AMD host gave the same model's short prompts up to 7 points apart on a
    family), so a paired change across them is not all the method's. [] when all were benched alike."""
    from trl_opsdl.evaluation.ruler_bench import numerics, numerics_differences

    def read(folder):
        return numerics(json.loads((folder / "ruler_bench.json").read_text()))

    first = read(reference_dirs[0])
    return sorted(
        {d for folder in [*reference_dirs[1:], *seed_dirs] for d in numerics_differences(read(folder), first)}
    )


def numerics_note(changes: dict, labels: dict = LABELS) -> list[str]:
    """A line under a table of paired changes for each method benched under other numerics than its reference."""
    return [f"{labels.get(m, m)}: benched under other numerics than its reference ({'; '.join(c['other_numerics'])}):"
            " greedy answers differ under those alone, so this change is not all the method's."
            for m, c in changes.items() if c.get("other_numerics")]  # fmt: skip


def paired_markdown(changes: dict, against: str = "the base", labels: dict = LABELS) -> str:
    def fmt(c):
        return f"{c['delta']:+.1f} [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]"

    lines = [f"Change against {against} on the same questions (points; mean over seeds, 95% interval over questions):",
             "", "| method | trained families | held-out families | beyond training | short prompt |",
             "|---|---|---|---|---|"]  # fmt: skip
    for method, c in changes.items():
        lines.append(f"| {labels.get(method, method)} | " + " | ".join(
            fmt(c[k]) for k in ("trained", "held_out", "beyond", "short")) + " |")  # fmt: skip
    families = sorted({key.split("@")[0] for c in changes.values() for key in c["by_cell"]})
    lines += ["", "Short prompts by family, the same way:", "", "| method | " + " | ".join(families) + " |",
              "|---|" + "---|" * len(families)]  # fmt: skip
    for method, c in changes.items():
        lines.append(f"| {labels.get(method, method)} | "
                     + " | ".join(fmt(c["by_cell"][f"{t}@short"]) for t in families) + " |")  # fmt: skip
    notes = numerics_note(changes, labels)
    return "\n".join(lines + (["", *notes] if notes else []))


def read_benches(folder: Path) -> tuple[dict, dict, list]:
    """The benches under `folder` (`<method>-seed<k>/ruler_bench.json`, and `base/`): per method its results and its
    folders (one per seed), and the methods in the table's order."""
    results, seed_dirs = {}, {}
    for path in sorted(folder.glob("*/ruler_bench.json")):
        name = path.parent.name
        method = "base" if name == "base" else name.rsplit("-seed", 1)[0]
        results.setdefault(method, []).append(json.loads(path.read_text()))
        seed_dirs.setdefault(method, []).append(path.parent)
    order = ["base", *METHODS, *VARIANTS]
    return results, seed_dirs, sorted(results, key=lambda m: order.index(m) if m in order else len(order))


def short_check(folder: Path) -> dict | None:
    """The benches of `bench_short<N>/` (N rows in each short-prompt cell): per method each family's short-prompt
    score (mean over seeds) and its change against the base over the same N questions, with the pooled change over
    families. None without the base there."""
    results, seed_dirs, methods = read_benches(folder)
    if "base" not in results:
        return None
    check = {}
    for method in methods:
        scores = [{t: row["short"]["score"] for t, row in r["table"]["by_task"].items()} for r in results[method]]
        row = {"seeds": len(scores), "n": results[method][0]["short_samples"],
               "score": {t: round(statistics.fmean(s[t] for s in scores), 2) for t in scores[0]}}  # fmt: skip
        change = None if method == "base" else paired_changes(seed_dirs["base"], seed_dirs[method], *split(method))
        if change is not None:
            row["change"] = {t: change["by_cell"][f"{t}@short"] for t in row["score"]}
            row["change"]["all families"] = change["short"]
            if change.get("other_numerics"):
                row["other_numerics"] = change["other_numerics"]
        check[method] = row
    return check


def short_check_markdown(check: dict) -> str:
    families = list(check["base"]["score"])
    n = check["base"]["n"]
    lines = [f"Short prompts with {n} questions per family: the score (mean over seeds), then its change against the "
             "base on the same questions (95% interval over questions):", "",
             "| method | seeds | " + " | ".join(families) + " | all families |", "|---|---|" + "---|" * (len(families) + 1)]  # fmt: skip
    for method, row in check.items():
        mean = statistics.fmean(row["score"].values())
        lines.append(f"| {label(method)} | {row['seeds']} | " + " | ".join(f"{row['score'][t]:.1f}" for t in families)
                     + f" | {mean:.1f} |")  # fmt: skip
    for method, row in check.items():
        if "change" in row:
            c = row["change"]
            lines.append(f"| {label(method)} − base | {row['seeds']} | " + " | ".join(
                f"{c[t]['delta']:+.1f} [{c[t]['ci95'][0]:+.1f}, {c[t]['ci95'][1]:+.1f}]" for t in [*families, "all families"]) + " |")  # fmt: skip
    notes = numerics_note({label(m): row for m, row in check.items()}, {})
    return "\n".join(lines + (["", *notes] if notes else []))


def write_summary(out: Path) -> dict | None:
    results, seed_dirs, methods = read_benches(out / "bench")
    if not results:
        return None
    summaries = {}
    for method in methods:
        # A method that trains other families is read with its own split; beside it the base model with the same
        # split, so that its trained and held-out columns have a row to compare with.
        if method != "base" and split(method) != split("base") and "base" in results:
            summaries[f"base:{method}"] = [model_summary(r, *split(method)) for r in results["base"]]
        summaries[method] = [model_summary(r, *split(method)) for r in results[method]]
    table = transfer_table(summaries)
    lengths = [n for n in next(iter(summaries.values()))[0] if n.isdigit()]
    changes, versus = {}, {}
    for method in [m for m in methods if m != "base" and "base" in seed_dirs]:
        change = paired_changes(seed_dirs["base"], seed_dirs[method], *split(method))
        if change is not None:
            changes[method] = table[method]["paired"] = change
    # A variant against the recipe it changes (that recipe's seeds), with the variant's split: what the change itself
    # buys, question by question, rather than two changes against the base side by side.
    for variant in [v for v in VARIANTS if v in table and VARIANTS[v].reference in seed_dirs]:
        reference = VARIANTS[variant].reference
        change = paired_changes(seed_dirs[reference], seed_dirs[variant], *split(variant))
        if change is not None:
            versus[variant] = table[variant]["paired_vs_" + reference] = change
    markdown = transfer_markdown(table, lengths) + ("\n\n" + paired_markdown(changes) if changes else "")
    if versus:
        labels = {v: f"{LABELS.get(v, v)} − {LABELS.get(VARIANTS[v].reference)}" for v in versus}
        markdown += "\n\n" + paired_markdown(versus, "the recipe each variant changes", labels)
    # The short-prompt cells again with more questions (`--short-samples N`): n = 30 cannot tell a 2-point change.
    for folder in sorted(out.glob("bench_short*")):
        check = short_check(folder)
        if check is not None:
            table.setdefault("short_check", {})[folder.name] = check
            markdown += "\n\n" + short_check_markdown(check)
    (out / "transfer.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "transfer.md").write_text(markdown + "\n")
    print(markdown)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seeds", default="0", help="Comma-separated training seeds, e.g. 0,1,2.")
    known = [*METHODS, *VARIANTS]
    parser.add_argument("--methods", default=",".join(METHODS), help=f"Comma-separated, of {', '.join(known)}.")
    parser.add_argument("--quick", action="store_true", help="Toy sizes: checks the pipeline in minutes.")
    parser.add_argument("--summary-only", action="store_true", help="Only rebuild the table from the benches present.")
    parser.add_argument("--short-samples", type=int, default=None,
                        help="Also bench each model's short prompts with this many questions per family "
                        "(bench_short<N>/; the long cells are reused).")  # fmt: skip
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in known]
    if unknown:
        parser.error(f"--methods {unknown}: not among {known}; pick from those.")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2.")
    if args.short_samples is not None and args.short_samples < 1:
        parser.error(f"--short-samples {args.short_samples}: must be positive.")
    out = Path(args.output_dir)
    if not args.summary_only:
        bench(out, "base", args.quick)
        if args.short_samples is not None:
            bench(out, "base", args.quick, short_samples=args.short_samples)
        for seed in seeds:
            for method in methods:
                adapter = train(out, method, seed, args.quick)
                bench(out, f"{method}-seed{seed}", args.quick, adapter)
                if args.short_samples is not None:
                    bench(out, f"{method}-seed{seed}", args.quick, adapter, args.short_samples)
                write_summary(out)  # the table grows as each model's bench ends
    else:
        write_summary(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
