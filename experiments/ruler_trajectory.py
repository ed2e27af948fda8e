"""One training run, step by step: each saved adapter (`demo --real --compare --save-model --save-steps N` keeps
`checkpoint-<step>` folders) benched like the base model, and each step's change against the base over the same
questions — short prompts per family, the long cells per family — with a 95% interval over questions
(docs/results.md "Short prompts along one run").

    python experiments/ruler_trajectory.py --adapter-dir compare/models/opsdl-seed0 \
        --baseline bench/base --output-dir trajectory                    # benches each checkpoint, then the table
    python experiments/ruler_trajectory.py ... --steps 50,20,10          # these checkpoints first (the rest later)
    python experiments/ruler_trajectory.py ... --summary-only            # the table from the benches present

Each checkpoint's bench (`<output-dir>/step-<N>/`) is a `trl-opsdl bench ruler --adapter` run with the baseline's
own lengths, row counts, precision and batch size (so every question pairs), skipped when its result exists; its
cells are cached, so a stopped bench resumes. `trajectory.json` / `trajectory.md` / `trajectory.png` are rebuilt from the benches
present. One heavy job at a time.
"""

import argparse
import json
import sys
from pathlib import Path

from ruler_transfer import NEEDLES_HELD_OUT_MIX, cell_scores, paired_change, paired_changes, run_step


def checkpoints(adapter_dir: Path) -> dict[int, Path]:
    """`{step: folder}` of the `checkpoint-<step>` folders a `--save-steps` run left, in step order."""
    found = {int(p.name.split("-", 1)[1]): p for p in adapter_dir.glob("checkpoint-*") if p.name[11:].isdigit()}
    return dict(sorted(found.items()))


def bench_command(baseline: Path, adapter: Path, output: Path, batch_size: int = 8) -> list[str]:
    """`bench ruler` for one checkpoint with the settings the baseline's bench recorded (same rows, the families'
    default answer budgets, the same precision and batch size: another batch size alone changed 17% of the base
    model's short replies); `batch_size` where the baseline's bench predates recording it."""
    base = json.loads((baseline / "ruler_bench.json").read_text())
    batch_size = base.get("batch_size", batch_size)
    lengths = sorted({int(c["length"]) for c in base["cells"] if c["length"] != "short"})
    tasks = sorted({c["task"] for c in base["cells"]})
    command = ["trl-opsdl", "bench", "ruler", "--lengths", ",".join(map(str, lengths)), "--tasks", ",".join(tasks),
               "--num-samples", str(base["num_samples"]), "--dtype", base["dtype"], "--seed", str(base["seed"]),
               "--batch-size", str(batch_size),
               "--adapter", str(adapter), "--label", f"step {adapter.name.split('-', 1)[1]}",
               "--baseline", str(baseline / "ruler_bench.json"), "--output-dir", str(output)]  # fmt: skip
    if base.get("short_samples"):
        command += ["--short-samples", str(base["short_samples"])]
    return command


def replies_changed(baseline: Path, bench: Path) -> dict:
    """Short-prompt and long cells: the share of replies (same questions) that differ from the baseline's, percent."""
    from trl_opsdl.evaluation.ruler_bench import cell_path, read_cell

    def replies(folder):
        results = json.loads((folder / "ruler_bench.json").read_text())
        out = {}
        for entry in results["cells"]:
            cell = read_cell(cell_path(str(folder), entry["key"]))
            kind = "short" if entry["length"] == "short" else "long"
            out.update({(kind, entry["task"], p["id"]): p.get("reply") for p in cell["predictions"]})
        return out

    base, step = replies(baseline), replies(bench)
    shares = {}
    for kind in ("short", "long"):
        keys = [k for k in base if k[0] == kind and k in step]
        if keys:
            shares[kind] = round(100 * sum(base[k] != step[k] for k in keys) / len(keys), 1)
    return shares


def trajectory(baseline: Path, benches: dict[int, Path], trained) -> dict:
    """Per step: the paired changes against the baseline (`ruler_transfer.paired_changes`: short prompts and the long
    cells, trained and held-out families), each family's short-prompt change, the share of replies changed."""

    def long_cells(scores, family):  # one family's questions at every benched length, keyed apart per length
        return {
            f"{n}:{i}": s for (t, n), cell in scores.items() if t == family and n != "short" for i, s in cell.items()
        }

    steps, base_scores = {}, cell_scores(baseline)
    families = sorted({t for t, _ in base_scores})
    held_out = [t for t in families if t not in trained]
    for step, bench in benches.items():
        changes = paired_changes([baseline], [bench], trained=trained, held_out=held_out, longest_trained=0)
        if changes is None:
            raise ValueError(
                f"{bench}: its cells do not pair with the baseline's questions; bench it like the baseline."
            )
        step_scores = cell_scores(bench)
        long_by_family = {t: paired_change(long_cells(base_scores, t), long_cells(step_scores, t)) for t in families}
        steps[str(step)] = {
            "short": changes["short"],
            "long": changes["beyond"],  # every family at every benched length (all beyond "0")
            "trained": changes["trained"],
            "held_out": changes["held_out"],
            "short_by_family": {t: changes["by_cell"][f"{t}@short"] for t in families},
            "long_by_family": long_by_family,
            "replies_changed": replies_changed(baseline, bench),
            **({"other_numerics": changes["other_numerics"]} if "other_numerics" in changes else {}),
        }
    return {"baseline": str(baseline), "trained": list(trained), "held_out": held_out, "steps": steps}


def trajectory_markdown(table: dict) -> str:
    def fmt(c):
        return f"{c['delta']:+.1f} [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]"

    families = sorted(next(iter(table["steps"].values()))["short_by_family"]) if table["steps"] else []
    names = [f"{t} (held out)" if t in table["held_out"] else t for t in families]
    lines = ["Change against the base on the same questions, step by step (points; 95% interval over questions):", "",
             "| step | short prompts | long cells | long, trained families | long, held-out families "
             "| short replies changed |", "|---|---|---|---|---|---|"]  # fmt: skip
    for step, s in table["steps"].items():
        lines.append(f"| {step} | {fmt(s['short'])} | {fmt(s['long'])} | {fmt(s['trained'])} | {fmt(s['held_out'])} "
                     f"| {s['replies_changed'].get('short', 0):.0f}% |")  # fmt: skip
    for kind, title in (("short_by_family", "Short prompts"), ("long_by_family", "Long cells")):
        lines += ["", f"{title} by family:", "", "| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for step, s in table["steps"].items():
            lines.append(f"| {step} | " + " | ".join(fmt(s[kind][t]) for t in families) + " |")
    notes = sorted({d for s in table["steps"].values() for d in s.get("other_numerics", [])})
    if notes:
        lines += ["", f"Benched under other numerics than the base ({'; '.join(notes)}): part of each change is not "
                  "the training's."]  # fmt: skip
    return "\n".join(lines)


def plot_trajectory(table: dict, path: Path) -> Path:
    """Change against the base vs training step: each family's short prompts (solid; held-out families marked x) and
    the long cells' mean over families (thick black), each point with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(s) for s in table["steps"]]
    entries = list(table["steps"].values())
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.axhline(0, color="grey", linewidth=0.8)
    for i, task in enumerate(sorted(entries[0]["short_by_family"]) if entries else []):
        changes = [e["short_by_family"][task]["delta"] for e in entries]
        held_out = task in table["held_out"]
        ax.plot(steps, changes, "-", marker="x" if held_out else "o", color=plt.cm.tab10(i % 10), linewidth=1,
                markersize=4, label=f"{task} short{' (held out)' if held_out else ''}")  # fmt: skip
    for key, style, label in (("short", "--", "short prompts, mean"), ("long", "-", "long cells, mean")):
        changes = [e[key]["delta"] for e in entries]
        low, high = [e[key]["ci95"][0] for e in entries], [e[key]["ci95"][1] for e in entries]
        ax.plot(steps, changes, style, color="black", linewidth=2.5, marker="o", label=label)
        ax.fill_between(steps, low, high, color="black", alpha=0.08)
    ax.set_xlabel("training step")
    ax.set_ylabel("change against the base (points, same questions)")
    ax.set_title("One run, step by step: short prompts per family and the long cells")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter-dir", required=True, type=Path, help="The saved adapter's folder, with checkpoint-*.")
    p.add_argument("--baseline", required=True, type=Path, help="The base model's bench folder (ruler_bench.json).")
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--mix", default=NEEDLES_HELD_OUT_MIX, help="The trained families (the others are held out).")
    p.add_argument("--batch-size", type=int, default=8, help="The baseline's bench batch size (the tables': 8).")
    p.add_argument("--steps", default=None, help="Checkpoints to bench, in this order (default: all, in step order).")
    p.add_argument("--summary-only", action="store_true", help="Only rebuild the table from the benches present.")
    args = p.parse_args(argv)
    if not (args.baseline / "ruler_bench.json").is_file():
        p.error(f"--baseline {args.baseline}: no ruler_bench.json there; pass the base model's bench folder.")
    families = {c["task"] for c in json.loads((args.baseline / "ruler_bench.json").read_text())["cells"]}
    unknown = [t for t in args.mix.split(",") if t not in families]
    if unknown:
        p.error(f"--mix {args.mix}: {unknown[0]!r} is not a family of the baseline's bench; name the trained ones.")
    found = checkpoints(args.adapter_dir)
    if not found and not args.summary_only:
        p.error(f"--adapter-dir {args.adapter_dir}: no checkpoint-<step> folders; train with --save-steps N.")
    order = [int(s) for s in args.steps.split(",")] if args.steps else list(found)
    missing = [s for s in order if s not in found]
    if missing and not args.summary_only:
        p.error(f"--steps {args.steps}: no checkpoint-{missing[0]} in {args.adapter_dir}; choose among {list(found)}.")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        for step in order:
            out = args.output_dir / f"step-{step}"
            if not (out / "ruler_bench.json").exists():
                run_step(
                    bench_command(args.baseline, found[step], out, args.batch_size),
                    args.output_dir / "logs" / f"step-{step}.log",
                )
    benches = {int(d.name[5:]): d for d in args.output_dir.glob("step-*") if (d / "ruler_bench.json").exists()}
    table = trajectory(args.baseline, dict(sorted(benches.items())), args.mix.split(","))
    (args.output_dir / "trajectory.json").write_text(json.dumps(table, indent=1) + "\n")
    (args.output_dir / "trajectory.md").write_text(trajectory_markdown(table) + "\n")
    plot_trajectory(table, args.output_dir / "trajectory.png")
    print(trajectory_markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
