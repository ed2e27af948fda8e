"""RULER in miniature: does OPSDL trained on a mix of RULER families over training essays improve long-context reading
in general — on families it never saw and at lengths beyond training — against the base model and TRL's SFT on the
model's own short-prompt answers, at the same budget (docs/results.md#ruler-in-miniature).

    python experiments/ruler_transfer.py --output-dir runs/ruler --seeds 0          # one seed of each method
    python experiments/ruler_transfer.py --output-dir runs/ruler --seeds 1,2        # the next ones, later
    python experiments/ruler_transfer.py --output-dir runs/ruler --summary-only     # the table from what has run
    python experiments/ruler_transfer.py --quick --output-dir /tmp/rt --seeds 0     # toy sizes, minutes

Every step is a `trl-opsdl` command (logged to `<output-dir>/logs/`) and is skipped when its result exists: the
base model's bench, then per seed and method `demo --real --compare --save-model` (the adapter) and `bench ruler
--adapter` (cells cached, so a stopped bench resumes). One heavy job at a time: on two cores, two at once each take
twice as long. The summary (`transfer.json`, `transfer.md`) is rebuilt from the bench results present.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


# The recipe (docs/real_demo.md#training-on-a-mix-of-tasks): four families trained at 512 and 1,024 tokens (L = 1,024),
# three held out; benched at L, 2L and 4L over the held-out essays.
MIX = ("niah_single", "niah_multikey", "vt", "niah_multiquery")
HELD_OUT = ("niah_multivalue", "cwe", "fwe")
TRAIN_LENGTHS = (512, 1024)
BENCH_LENGTHS = (1024, 2048, 4096)
METHODS = ("opsdl", "sft_self")
RECIPE = ["--mix", ",".join(MIX), "--train-lengths", ",".join(map(str, TRAIN_LENGTHS)), "--max-steps", "50",
          "--batch-size", "4", "--learning-rate", "3e-4", "--max-completion-length", "64",
          # The demo's own before/after check (niah_single at 512/1,024) kept small: the bench is the measurement.
          "--eval-short", "30", "--eval-long", "30", "--no-short-check"]  # fmt: skip
QUICK_RECIPE = ["--quick", "--mix", "niah_single,vt", "--no-short-check"]
# bf16 answers the long cells ~2.4x faster than fp32 on this project's AMX CPUs; every model is benched the same way.
BENCH = ["--num-samples", "30", "--dtype", "bfloat16", "--batch-size", "8"]
QUICK_BENCH = ["--quick"]
LABELS = {"base": "base", "opsdl": "OPSDL (mix)", "sft_self": "TRL SFT-self (mix)"}


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


def bench(out: Path, name: str, quick: bool, adapter: str | None = None) -> None:
    target = out / "bench" / name
    if (target / "ruler_bench.json").exists():
        return
    lengths = [] if quick else ["--lengths", ",".join(map(str, BENCH_LENGTHS))]
    command = ["trl-opsdl", "bench", "ruler", *lengths, *(QUICK_BENCH if quick else BENCH), "--output-dir",
               str(target), "--label", name]  # fmt: skip
    if adapter is not None:
        command += ["--adapter", adapter, "--baseline", str(out / "bench" / "base" / "ruler_bench.json")]
    run_step(command, out / "logs" / f"bench-{name}.log")


def train(out: Path, method: str, seed: int, quick: bool) -> str:
    """The method's adapter for `seed` (trained unless its run file exists); returns the adapter folder."""
    compare = out / "compare"
    run_file = compare / "runs" / f"{method}-seed{seed}.json"
    if not run_file.exists():
        command = ["trl-opsdl", "demo", "--real", "--compare", *(QUICK_RECIPE if quick else RECIPE), "--save-model",
                   "--methods", method, "--seeds", str(seed), "--output-dir", str(compare)]  # fmt: skip
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
        lines.append(f"| {LABELS.get(method, method)} | {row['seeds']} | " + " | ".join(figures) + " |")
    families = list(next(iter(table.values()))["by_task"])
    lines += ["", "Per family (mean over seeds): short prompt, then each length.", "",
              "| method | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]  # fmt: skip
    for method, row in table.items():
        per = [f"{row['short_by_task'][t]:.0f} / " + " / ".join(f"{row['by_task'][t][n]:.0f}" for n in lengths)
               for t in families]  # fmt: skip
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(per) + " |")
    return "\n".join(lines)


def write_summary(out: Path) -> dict | None:
    summaries = {}
    for path in sorted((out / "bench").glob("*/ruler_bench.json")):
        name = path.parent.name
        method = "base" if name == "base" else name.rsplit("-seed", 1)[0]
        summaries.setdefault(method, []).append(model_summary(json.loads(path.read_text())))
    if not summaries:
        return None
    order = ["base", *METHODS]
    summaries = dict(sorted(summaries.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    table = transfer_table(summaries)
    lengths = [n for n in next(iter(summaries.values()))[0] if n.isdigit()]
    (out / "transfer.json").write_text(json.dumps(table, indent=2) + "\n")
    markdown = transfer_markdown(table, lengths)
    (out / "transfer.md").write_text(markdown + "\n")
    print(markdown)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seeds", default="0", help="Comma-separated training seeds, e.g. 0,1,2.")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"Comma-separated, of {', '.join(METHODS)}.")
    parser.add_argument("--quick", action="store_true", help="Toy sizes: checks the pipeline in minutes.")
    parser.add_argument("--summary-only", action="store_true", help="Only rebuild the table from the benches present.")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods {unknown}: not among {list(METHODS)}; pick from those.")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2.")
    out = Path(args.output_dir)
    if not args.summary_only:
        bench(out, "base", args.quick)
        for seed in seeds:
            for method in methods:
                adapter = train(out, method, seed, args.quick)
                bench(out, f"{method}-seed{seed}", args.quick, adapter)
                write_summary(out)  # the table grows as each model's bench ends
    else:
        write_summary(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
