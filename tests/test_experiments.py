"""experiments/: the variants and ablations tried while building the demos still parse, name valid settings and run,
and their run files carry the step time split the package no longer records."""

import dataclasses
import json
import statistics
import sys
from pathlib import Path

import pytest

from tests.real_fixtures import save_bpe_chat_model, write_squad


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import real_variants  # noqa: E402
import toy_variants  # noqa: E402


def test_real_variants_keep_the_recipes_of_the_research_log():
    variants = real_variants.REAL_VARIANTS
    assert {"opsdl_sampled_token_lr_3e-4", "opsdl_sampled_token_baseline", "sft_self_lr_3e-4_anchors"} <= set(variants)
    # the default recipe without a gradient through the context (an OPSDLConfig field of its own)
    assert variants["opsdl_topk_lr_3e-4_anchors_context_none"] == {
        **variants["opsdl_topk_lr_3e-4_anchors"],
        "extra": {"context_gradient": "none"},
    }


@pytest.mark.parametrize("set_name", ["compare", "ablation"])
def test_every_toy_variant_is_a_valid_demo_setting(set_name):
    """Each method names a known trainer and only `DemoConfig` fields the demo's checks accept."""
    from trl_opsdl.demo.config import DemoConfig
    from trl_opsdl.demo.toy import check_demo_config

    for name, spec in toy_variants.METHOD_SETS[set_name].items():
        spec = dict(spec)
        assert spec.pop("trainer", "opsdl") in ("opsdl", "sft_gold", "sft_self", "dpo"), name
        check_demo_config(dataclasses.replace(DemoConfig(), **spec))


def test_toy_variants_command_line(capsys):
    args, config, methods = toy_variants.parse_args(
        ["--set", "ablation", "--methods", "full_lr=1e-4", "--seeds", "1,2", "--max-steps", "7", "--no-lora"]
    )
    assert methods == {"full_lr=1e-4": toy_variants.ABLATION_METHODS["full_lr=1e-4"]} and args.seeds == [1, 2]
    assert (config.max_steps, config.lora, config.batch_size) == (7, False, 32)  # the rest: the demo's defaults
    for argv, message in (
        (["--methods", "opsdl,nope"], "--methods ['nope'] not in the set"),
        (["--eval-every", "0"], "--eval-every 0 must be at least 1"),
        (["--seeds", "a"], "'a' is not a comma-separated list of integers"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            toy_variants.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_toy_variants_bad_setting_is_one_line_before_any_work(tmp_path, capsys):
    assert toy_variants.main(["--methods", "opsdl", "--output-dir", str(tmp_path / "out"), "--max-steps", "0"]) == 2
    assert "max_steps=0 must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_real_variants_command_line(capsys):
    _, config, methods = real_variants.parse_args(["--quick", "--methods", "opsdl_lr_3e-4", "--train-lengths", "320"])
    assert list(methods) == ["opsdl_lr_3e-4"]
    assert (config.max_steps, config.train_lengths, config.task) == (2, (320,), "niah_single")  # --quick's steps
    assert real_variants.parse_args(["--squad", "x.json"])[1].task == "squad"  # as `trl-opsdl demo --real`
    with pytest.raises(SystemExit) as exit_info:
        real_variants.parse_args(["--methods", "nope"])
    assert exit_info.value.code == 2 and "--methods ['nope'] not in the set" in capsys.readouterr().err


@pytest.mark.slow
def test_real_variants_run_files_hold_the_step_time_split_of_opsdl_runs(tmp_path):
    model = save_bpe_chat_model(tmp_path / "tiny")
    squad = write_squad(tmp_path / "squad.json", num_articles=4, paragraphs=6)
    out = tmp_path / "cmp"
    argv = ["--quick", "--methods", "opsdl,sft_self", "--seeds", "0", "--model", model, "--task", "squad",
            "--squad", squad, "--squad-check", squad, "--output-dir", str(out)]  # fmt: skip
    assert real_variants.main(argv) == 0
    opsdl = json.loads((out / "runs" / "opsdl-seed0.json").read_text())
    split = opsdl["step_time_split"]
    assert split["steps"] == 1  # 2 steps, the first (warm-up) left out
    phases = ("generation", "teacher_forward", "student_forward_backward", "optimizer")
    assert all(split[p]["seconds"] > 0 for p in phases)
    assert sum(split[p]["share"] for p in phases) == pytest.approx(1.0, abs=0.01)
    assert opsdl["host"]["matmul_gflops_fp32"] > 0 and opsdl["host"]["torch_threads"] >= 1
    sft = json.loads((out / "runs" / "sft_self-seed0.json").read_text())
    assert sft["step_time_split"] == {} and sft["host"]["matmul_gflops_fp32"] > 0  # no OPSDL phases to time
    assert "| opsdl | 1 |" in (out / "compare.md").read_text()


# --- ruler_transfer.py: the RULER-in-miniature comparison -------------------------------------------------------------


def _bench_results(scores: dict, short: dict, lengths=(1024, 2048)) -> dict:
    """A `ruler_bench.json` as `bench ruler` writes it, from per-family scores (n = 2 rows of 0/100 per cell)."""
    from trl_opsdl.evaluation.ruler_bench import aggregate, cell_summary

    def rows(score):  # two rows whose mean is `score`
        return [score, score]

    cells = [{"task": t, "length": "short", **cell_summary(rows(short[t]))} for t in scores]
    cells += [
        {"task": t, "length": n, **cell_summary(rows(s))} for t, per in scores.items() for n, s in zip(lengths, per)
    ]
    return {"table": aggregate(cells, list(scores), list(lengths)), "cells": []}


def test_ruler_transfer_summary_hand_computed():
    import ruler_transfer

    results = _bench_results({"a": [80, 60], "b": [40, 20], "c": [30, 10]}, {"a": 90, "b": 50, "c": 70})
    row = ruler_transfer.model_summary(results, trained=["a"], held_out=["b", "c"], longest_trained=1024)
    assert (row["1024"], row["2048"]) == (pytest.approx(50), pytest.approx(30))  # (80+40+30)/3, (60+20+10)/3
    assert row["trained"] == 70 and row["held_out"] == 25  # (80+60)/2; (40+20+30+10)/4
    assert row["beyond"] == pytest.approx(30)  # every family at 2,048 only
    assert row["short"] == pytest.approx(70) and row["short_by_task"] == {"a": 90, "b": 50, "c": 70}

    other = ruler_transfer.model_summary(_bench_results({"a": [80, 60], "b": [60, 30], "c": [40, 10]},
                                                        {"a": 90, "b": 50, "c": 70}),
                                         trained=["a"], held_out=["b", "c"], longest_trained=1024)  # fmt: skip
    table = ruler_transfer.transfer_table({"base": [row], "opsdl": [row, other]})
    assert table["opsdl"]["held_out"] == {"mean": 30.0, "std": pytest.approx(7.07, abs=0.01)}  # 25 and 35
    assert table["base"]["held_out"] == {"mean": 25.0, "std": None} and table["opsdl"]["seeds"] == 2
    markdown = ruler_transfer.transfer_markdown(table, [1024, 2048])
    # 1,024: 50 and (80+60+40)/3 = 60; 2,048: 30 and (60+30+10)/3 = 33.3; trained 70 twice; held out 25 and 35
    assert "| OPSDL (mix) | 2 | 55.0 ± 7.1 | 31.7 ± 2.4 | 70.0 ± 0.0 | 30.0 ± 7.1 |" in markdown


def test_ruler_transfer_recipe_holds_families_out_and_benches_beyond_training():
    import ruler_transfer

    assert len(ruler_transfer.HELD_OUT) >= 3 and not set(ruler_transfer.MIX) & set(ruler_transfer.HELD_OUT)
    assert max(ruler_transfer.BENCH_LENGTHS) >= 4 * max(ruler_transfer.TRAIN_LENGTHS)


def test_ruler_transfer_runs_each_step_once_with_commands_that_parse(tmp_path, monkeypatch):
    """The steps in order (base bench, then per seed and method: train, bench with the adapter against the base), each
    a command `trl-opsdl` parses; a step whose result exists is skipped, so a stopped run resumes."""
    import ruler_transfer

    from tests.test_docs import cli_parser

    commands, parsed = [], []

    def fake_step(command, log_file):
        commands.append(command)
        args = cli_parser().parse_args(command[1:])
        parsed.append(args)
        out = Path(args.output_dir)
        if args.command == "bench":
            out.mkdir(parents=True, exist_ok=True)  # a bench_short<N>/ folder exists: its cells were copied
            if out.parent.name == "bench":  # a cell only the first bench computes; bench_short<N>/ must copy it
                (out / "cells").mkdir()
                (out / "cells" / "cell.json").write_text("{}")
            results = _bench_results(
                {t: [50, 40, 30] for t in ruler_transfer.MIX + ruler_transfer.HELD_OUT},
                {t: 60 for t in ruler_transfer.MIX + ruler_transfer.HELD_OUT},
                ruler_transfer.BENCH_LENGTHS,
            )
            (out / "ruler_bench.json").write_text(json.dumps({**results, "short_samples": args.short_samples or 30}))
        else:
            assert args.save_model and args.compare and tuple(args.mix) == ruler_transfer.MIX
            run = out / "runs" / f"{args.methods}-seed{args.seeds[0]}.json"
            run.parent.mkdir(parents=True, exist_ok=True)
            run.write_text(json.dumps({"adapter": str(out / "models" / run.stem)}))

    monkeypatch.setattr(ruler_transfer, "run_step", fake_step)
    out = tmp_path / "rt"
    assert ruler_transfer.main(["--output-dir", str(out), "--seeds", "0"]) == 0
    kinds = [(c[1], c[c.index("--output-dir") + 1].split("/")[-1]) for c in commands]
    assert kinds == [("bench", "base"), ("demo", "compare"), ("bench", "opsdl-seed0"), ("demo", "compare"),
                     ("bench", "sft_self-seed0")]  # fmt: skip
    assert commands[2][commands[2].index("--adapter") + 1] == str(out / "compare" / "models" / "opsdl-seed0")
    assert set(json.loads((out / "transfer.json").read_text())) == {"base", "opsdl", "sft_self"}

    commands.clear()
    assert ruler_transfer.main(["--output-dir", str(out), "--seeds", "0,1", "--methods", "opsdl"]) == 0
    assert [c[1] for c in commands] == ["demo", "bench"]  # only seed 1 is new

    # A variant: the demo's method with its own options, in its own folder, benched under the variant's name.
    commands.clear()
    assert ruler_transfer.main(["--output-dir", str(out), "--seeds", "0", "--methods", "opsdl_anchors_75"]) == 0
    train, bench = commands
    assert train[train.index("--short-prompt-ratio") + 1] == "0.75" and train[train.index("--methods") + 1] == "opsdl"
    assert train[train.index("--output-dir") + 1] == str(out / "compare-opsdl_anchors_75")
    assert bench[bench.index("--output-dir") + 1] == str(out / "bench" / "opsdl_anchors_75-seed0")
    assert "opsdl_anchors_75" in json.loads((out / "transfer.json").read_text())

    # --short-samples: each model of the run benched again into bench_short<N>/, its long cells copied, not recomputed.
    commands.clear()
    argv = ["--output-dir", str(out), "--seeds", "0", "--methods", "opsdl", "--short-samples", "100"]
    assert ruler_transfer.main(argv) == 0
    assert [c[c.index("--output-dir") + 1] for c in commands] == [
        str(out / "bench_short100" / "base"), str(out / "bench_short100" / "opsdl-seed0")]  # fmt: skip
    assert all(c[c.index("--short-samples") + 1] == "100" for c in commands)
    assert commands[1][commands[1].index("--baseline") + 1] == str(
        out / "bench_short100" / "base" / "ruler_bench.json"
    )
    assert (out / "bench_short100" / "opsdl-seed0" / "cells" / "cell.json").exists()  # copied from bench/opsdl-seed0
    with pytest.raises(SystemExit):
        ruler_transfer.main(["--output-dir", str(out), "--short-samples", "0"])

    # A variant that overrides one of the recipe's options: the demo sees the variant's value.
    parsed.clear()
    variant = "opsdl_anchors_75_steps_100"
    assert ruler_transfer.main(["--output-dir", str(out), "--seeds", "0", "--methods", variant]) == 0
    assert parsed[0].max_steps == 100 and parsed[0].short_prompt_ratio == 0.75
    parsed.clear()
    variant = "opsdl_anchors_75_train_1024"
    assert ruler_transfer.main(["--output-dir", str(out), "--seeds", "0", "--methods", variant]) == 0
    assert list(parsed[0].train_lengths) == [1024]  # the variant's value, not the recipe's 512,1024
    parsed.clear()  # its SFT-self baseline: TRL's SFT on the same prompts, the recipe's split
    assert ruler_transfer.main(["--output-dir", str(out), "--seeds", "0", "--methods", "sft_self_train_1024"]) == 0
    assert parsed[0].methods == "sft_self" and list(parsed[0].train_lengths) == [1024]
    assert ruler_transfer.split("sft_self_train_1024") == (ruler_transfer.MIX, ruler_transfer.HELD_OUT)


def _write_cell(bench_dir: Path, task: str, length, scores: dict, listed: bool = True) -> None:
    """A cached cell as `bench ruler` writes it; `listed`: named in the folder's `ruler_bench.json` (else only cached)."""
    from trl_opsdl.evaluation.ruler_bench import cell_path, write_cell

    key = {"task": task, "length": length, "listed": listed}
    write_cell(cell_path(str(bench_dir), key), {"predictions": [{"id": i, "score": s} for i, s in scores.items()]})
    results_file = bench_dir / "ruler_bench.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"cells": []}
    if listed:
        results["cells"].append({"task": task, "length": length, "key": key})
    results_file.write_text(json.dumps(results))


def test_ruler_transfer_paired_changes_hand_computed(tmp_path):
    """Changes against the base over the same questions: per question the seeds' mean minus the base, then the mean
    and a 1.96 · sd / sqrt(n) interval; only the cells the bench's results were built from are read (a cell merely
    cached in the folder, e.g. short prompts from another length, is not)."""
    import ruler_transfer

    base, s0, s1 = tmp_path / "base", tmp_path / "s0", tmp_path / "s1"
    _write_cell(base, "a", "short", {"q0": 100, "q1": 0, "q2": 0, "q3": 100})
    _write_cell(s0, "a", "short", {"q0": 100, "q1": 100, "q2": 100, "q3": 100}, listed=False)  # cached, not used
    _write_cell(s0, "a", "short", {"q0": 100, "q1": 100, "q2": 0, "q3": 0})
    _write_cell(s1, "a", "short", {"q0": 100, "q1": 100, "q2": 100, "q3": 100})
    for d, scores in [(base, [0, 0, 0, 0]), (s0, [100, 0, 0, 0]), (s1, [100, 100, 0, 0])]:
        _write_cell(d, "a", 2048, {f"q{i}": s for i, s in enumerate(scores)})
    changes = ruler_transfer.paired_changes([base], [s0, s1], trained=["a"], held_out=[], longest_trained=1024)
    # short: D = (0, +100, +50, -50): mean 25, sd sqrt((25^2 + 75^2 + 25^2 + 75^2) / 3) = 64.55, se 32.27
    short = changes["by_cell"]["a@short"]
    assert short["delta"] == 25 and short["n"] == 4 and short["se"] == pytest.approx(32.27, abs=0.01)
    assert short["ci95"] == [pytest.approx(25 - 63.25, abs=0.1), pytest.approx(25 + 63.25, abs=0.1)]
    # 2,048: D = (+100, +50, 0, 0): mean 37.5; beyond training = that one cell
    assert changes["by_cell"]["a@2048"]["delta"] == 37.5 and changes["beyond"]["delta"] == 37.5
    assert changes["trained"]["delta"] == 37.5 and "held_out" not in changes
    # a seed benched on other questions (here: another sample count at 2,048) is not paired
    _write_cell(s1, "a", 2048, {"q0": 100, "q1": 100})
    s1_results = json.loads((s1 / "ruler_bench.json").read_text())
    s1_results["cells"] = [c for c in s1_results["cells"] if c["length"] != 2048 or c is s1_results["cells"][-1]]
    (s1 / "ruler_bench.json").write_text(json.dumps(s1_results))
    assert ruler_transfer.paired_changes([base], [s0, s1], trained=["a"], held_out=[]) is None


def test_ruler_transfer_marks_a_change_whose_benches_ran_under_other_numerics(tmp_path):
    """Greedy answers depend on the CPU's kernels and the precision: a seed benched on another CPU than its reference
    is named under the paired table (and in the JSON); benches alike get no note."""
    import ruler_transfer

    base, s0, s1 = tmp_path / "base", tmp_path / "s0", tmp_path / "s1"
    for d in (base, s0, s1):
        _write_cell(d, "a", "short", {"q0": 100, "q1": 0})
        _write_cell(d, "a", 2048, {"q0": 0, "q1": 100})
        results = json.loads((d / "ruler_bench.json").read_text())
        results.update(dtype="bfloat16", host={"cpu": "Intel Xeon", "cpu_capability": "AVX512", "torch": "2.14.1"})
        (d / "ruler_bench.json").write_text(json.dumps(results))
    alike = ruler_transfer.paired_changes([base], [s0, s1], trained=["a"], held_out=["a"])
    assert "other_numerics" not in alike and "other numerics" not in ruler_transfer.paired_markdown({"opsdl": alike})
    results = json.loads((s1 / "ruler_bench.json").read_text())
    results["host"]["cpu"] = "AMD EPYC"
    (s1 / "ruler_bench.json").write_text(json.dumps(results))
    change = ruler_transfer.paired_changes([base], [s0, s1], trained=["a"], held_out=["a"])
    assert change["other_numerics"] == ["cpu 'AMD EPYC' (baseline: 'Intel Xeon')"]
    assert ("OPSDL (mix): benched under other numerics than its reference (cpu 'AMD EPYC' (baseline: 'Intel Xeon'))"
            in ruler_transfer.paired_markdown({"opsdl": change}))  # fmt: skip
    # the short-prompt check's table (`bench_short<N>/`) says it too
    (tmp_path / "short" / "base").mkdir(parents=True)
    (tmp_path / "short" / "opsdl-seed0").mkdir()
    for d, src in ((tmp_path / "short" / "base", base), (tmp_path / "short" / "opsdl-seed0", s1)):
        for f in src.rglob("*"):
            if f.is_file():
                (d / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                (d / f.relative_to(src)).write_bytes(f.read_bytes())
        results = json.loads((d / "ruler_bench.json").read_text())
        results.update(short_samples=2, table={"by_task": {"a": {"short": {"score": 50.0}}}},
                       cells=[c for c in results["cells"] if c["length"] == "short"])  # fmt: skip
        (d / "ruler_bench.json").write_text(json.dumps(results))
    check = ruler_transfer.short_check(tmp_path / "short")
    assert check["opsdl"]["other_numerics"] == ["cpu 'AMD EPYC' (baseline: 'Intel Xeon')"]
    assert "OPSDL (mix): benched under other numerics" in ruler_transfer.short_check_markdown(check)


def test_ruler_transfer_summary_writes_variant_against_its_recipe(tmp_path):
    """The summary pairs every method with the base and each variant with its demo method's seeds, on the cells the
    benches list: every family's short prompt and 2,048 cell, base (0, 0), OPSDL (100, 0), the variant (100, 100)."""
    import ruler_transfer

    families = ruler_transfer.MIX + ruler_transfer.HELD_OUT
    results = _bench_results({t: [50, 40, 30] for t in families}, {t: 60 for t in families}, (1024, 2048, 4096))
    for name, scores in [("base", [0, 0]), ("opsdl-seed0", [100, 0]), ("opsdl_anchors_75-seed0", [100, 100])]:
        bench_dir = tmp_path / "bench" / name
        bench_dir.mkdir(parents=True)
        (bench_dir / "ruler_bench.json").write_text(json.dumps(results))
        for family in families:
            for length in ("short", 2048):
                _write_cell(bench_dir, family, length, {f"q{i}": s for i, s in enumerate(scores)})
    table = ruler_transfer.write_summary(tmp_path)
    for column in ("trained", "held_out", "beyond", "short"):
        assert table["opsdl"]["paired"][column]["delta"] == 50
        assert table["opsdl_anchors_75"]["paired"][column]["delta"] == 100
        assert table["opsdl_anchors_75"]["paired_vs_opsdl"][column]["delta"] == 50
    assert "| OPSDL, 3 of 4 rows anchored (mix) − OPSDL (mix) | " in (tmp_path / "transfer.md").read_text()


def test_ruler_transfer_short_check_hand_computed(tmp_path):
    """`bench_short<N>/`: each family's short-prompt score (seed mean) and its change against the base over the same
    questions, pooled over families. Base: every family (100, 0, 0, 0); the method's two seeds answer q1 too on
    `cwe` only, seed 0 also q2: cwe D = (0, +100, +50, 0)."""
    import ruler_transfer

    families = ruler_transfer.MIX + ruler_transfer.HELD_OUT
    folder = tmp_path / "bench_short4"
    for name, cwe in [
        ("base", [100, 0, 0, 0]),
        ("opsdl-seed0", [100, 100, 100, 0]),
        ("opsdl-seed1", [100, 100, 0, 0]),
    ]:
        bench_dir = folder / name
        bench_dir.mkdir(parents=True)
        short = {t: (statistics.fmean(cwe) if t == "cwe" else 25) for t in families}
        results = {**_bench_results({t: [0, 0] for t in families}, short), "short_samples": 4}
        (bench_dir / "ruler_bench.json").write_text(json.dumps(results))
        for family in families:
            scores = cwe if family == "cwe" else [100, 0, 0, 0]
            _write_cell(bench_dir, family, "short", {f"q{i}": s for i, s in enumerate(scores)})
    check = ruler_transfer.short_check(folder)
    assert check["base"]["score"]["cwe"] == 25 and check["opsdl"]["score"]["cwe"] == 62.5  # (75 + 50) / 2
    assert check["opsdl"]["seeds"] == 2 and check["opsdl"]["n"] == 4 and "change" not in check["base"]
    cwe = check["opsdl"]["change"]["cwe"]
    # D = (0, 100, 50, 0): mean 37.5, sd sqrt((37.5^2 + 62.5^2 + 12.5^2 + 37.5^2) / 3) = 47.87, se 23.94
    assert cwe["delta"] == 37.5 and cwe["se"] == pytest.approx(23.94, abs=0.01)
    assert check["opsdl"]["change"]["fwe"]["delta"] == 0
    # pooled over the 7 families: mean 37.5 / 7, se = 23.94 / 7 (the others' D are all 0)
    pooled = check["opsdl"]["change"]["all families"]
    assert pooled["delta"] == pytest.approx(37.5 / 7, abs=0.01)
    assert pooled["ci95"][1] - pooled["delta"] == pytest.approx(1.96 * 23.94 / 7, abs=0.05)
    markdown = ruler_transfer.short_check_markdown(check)
    assert "Short prompts with 4 questions per family" in markdown and "| OPSDL (mix) − base | 2 |" in markdown
    assert ruler_transfer.short_check(tmp_path / "nothing") is None


def test_ruler_transfer_variant_with_its_own_mix_is_read_with_its_split(tmp_path):
    """A variant that trains other families (cwe for niah_multiquery) is summed up with its own trained and held-out
    families, beside a base row read the same way, and paired with the recipe it changes; the other methods keep the
    recipe's split. Cells: cwe 100 on both questions for the variant, 0 everywhere else and for every other model."""
    import ruler_transfer

    variant = "opsdl_anchors_75_cwe"
    trained, held_out = ruler_transfer.split(variant)
    assert trained == ("niah_single", "niah_multikey", "vt", "cwe")
    assert held_out == ("niah_multiquery", "niah_multivalue", "fwe")
    assert (
        ruler_transfer.split("opsdl") == ruler_transfer.split("base") == (ruler_transfer.MIX, ruler_transfer.HELD_OUT)
    )

    families = ruler_transfer.MIX + ruler_transfer.HELD_OUT
    per_family = {t: [50, 50, 50] for t in families} | {"cwe": [90, 90, 90], "niah_multiquery": [10, 10, 10]}
    results = _bench_results(per_family, {t: 60 for t in families}, (1024, 2048, 4096))
    for name in ("base", "opsdl_anchors_75-seed0", f"{variant}-seed0"):
        bench_dir = tmp_path / "bench" / name
        bench_dir.mkdir(parents=True)
        (bench_dir / "ruler_bench.json").write_text(json.dumps(results))
        for family in families:
            for length in ("short", 1024, 2048, 4096):
                scores = [100, 100] if name.startswith(variant) and family == "cwe" and length != "short" else [0, 0]
                _write_cell(bench_dir, family, length, {f"q{i}": s for i, s in enumerate(scores)})
    table = ruler_transfer.write_summary(tmp_path)
    # means: the recipe's split, trained (50·3 + 10)/4 = 40, held out (50·2 + 90)/3; the variant's (50·3 + 90)/4 = 60,
    # held out (10 + 50·2)/3
    assert table["base"]["trained"]["mean"] == 40 and table["base"]["held_out"]["mean"] == pytest.approx(63.33)
    assert table[f"base:{variant}"]["trained"]["mean"] == 60
    assert table[f"base:{variant}"]["held_out"]["mean"] == pytest.approx(36.67)
    assert table[variant]["trained"]["mean"] == 60 and table["opsdl_anchors_75"]["trained"]["mean"] == 40
    # paired: cwe's +100 is a trained family's for the variant (one of four: +25), held-out families unchanged
    for paired in (table[variant]["paired"], table[variant]["paired_vs_opsdl_anchors_75"]):
        assert paired["trained"]["delta"] == 25 and paired["held_out"]["delta"] == 0
    markdown = (tmp_path / "transfer.md").read_text()
    base_row = (
        "| base (trained: niah_single, niah_multikey, vt, cwe; held out: niah_multiquery, niah_multivalue, fwe) |"
    )
    assert base_row in markdown
    assert "cwe trained for niah_multiquery (mix) − OPSDL, 3 of 4 rows anchored (mix) |" in markdown


def test_ruler_transfer_needles_variant_trains_the_word_counts_and_holds_out_the_needle_variants():
    """The 1,024-only recipe with the other split: the demo receives the variant's mix and lengths (the last value of
    an option wins), and the summary reads the three needle variants as held out."""
    import ruler_transfer

    from tests.test_docs import cli_parser

    variant = "opsdl_anchors_75_train_1024_needles"
    options = ruler_transfer.RECIPE + ruler_transfer.VARIANTS[variant].options
    args = cli_parser().parse_args(["demo", "--real", *options])
    assert list(args.mix) == ["niah_single", "vt", "cwe", "fwe"] and list(args.train_lengths) == [1024]
    assert args.short_prompt_ratio == 0.75
    needles_split = (("niah_single", "vt", "cwe", "fwe"), ("niah_multikey", "niah_multiquery", "niah_multivalue"))
    assert ruler_transfer.split(variant) == needles_split
    # its SFT-self baseline: the same prompts, the same split
    sft = ruler_transfer.VARIANTS["sft_self_train_1024_needles"]
    args = cli_parser().parse_args(["demo", "--real", *ruler_transfer.RECIPE, *sft.options, "--methods", sft.method])
    assert list(args.mix) == ["niah_single", "vt", "cwe", "fwe"] and list(args.train_lengths) == [1024]
    assert ruler_transfer.split("sft_self_train_1024_needles") == needles_split
    # half the learning rate, the same split
    half_lr = "opsdl_anchors_75_train_1024_needles_lr_1.5e-4"
    args = cli_parser().parse_args(
        ["demo", "--real", *ruler_transfer.RECIPE, *ruler_transfer.VARIANTS[half_lr].options]
    )
    assert args.learning_rate == 1.5e-4 and args.short_prompt_ratio == 0.75 and list(args.train_lengths) == [1024]
    assert ruler_transfer.split(half_lr) == needles_split
    # two of four rows anchored, as the SFT-self baseline trains (its demo default), the same split
    half_anchored = "opsdl_train_1024_needles"
    args = cli_parser().parse_args(
        ["demo", "--real", *ruler_transfer.RECIPE, *ruler_transfer.VARIANTS[half_anchored].options]
    )
    assert args.short_prompt_ratio == 0.5 and list(args.train_lengths) == [1024] and args.learning_rate == 3e-4
    assert ruler_transfer.split(half_anchored) == needles_split
    # seven of eight rows anchored: batch 8, one long row per step as with three of four at batch 4
    more_anchored = "opsdl_anchors_875_batch_8_needles"
    args = cli_parser().parse_args(
        ["demo", "--real", *ruler_transfer.RECIPE, *ruler_transfer.VARIANTS[more_anchored].options]
    )
    assert args.batch_size == 8 and args.short_prompt_ratio == 0.875 and list(args.train_lengths) == [1024]
    assert args.batch_size - round(args.short_prompt_ratio * args.batch_size) == 1  # one long row per step
    assert ruler_transfer.split(more_anchored) == needles_split
    # LoRA on the attention projections only, the recipe otherwise
    attention = "opsdl_anchors_75_train_1024_needles_attn"
    args = cli_parser().parse_args(
        ["demo", "--real", *ruler_transfer.RECIPE, *ruler_transfer.VARIANTS[attention].options]
    )
    assert list(args.lora_target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert args.short_prompt_ratio == 0.75 and list(args.train_lengths) == [1024] and args.learning_rate == 3e-4
    assert ruler_transfer.split(attention) == needles_split
    args = cli_parser().parse_args(["demo", "--real", *ruler_transfer.RECIPE, *sft.options, "--methods", sft.method])
    from trl_opsdl.demo.config import RealDemoConfig

    assert args.short_prompt_ratio is None and RealDemoConfig().short_prompt_ratio == 0.5  # SFT-self: the default


def test_ruler_transfer_variant_against_its_recipe_hand_computed(tmp_path):
    """A variant against the method it changes: the reference per question is the mean over that method's seeds."""
    import ruler_transfer

    r0, r1, v0 = tmp_path / "r0", tmp_path / "r1", tmp_path / "v0"
    for d, scores in [(r0, [100, 0, 0]), (r1, [0, 0, 100]), (v0, [100, 100, 100])]:
        _write_cell(d, "a", "short", {f"q{i}": s for i, s in enumerate(scores)})
    # reference (50, 0, 50); D = (+50, +100, +50): mean 66.67, sd 28.87, se 16.67
    change = ruler_transfer.paired_changes([r0, r1], [v0], trained=[], held_out=[])["by_cell"]["a@short"]
    assert change["delta"] == pytest.approx(66.67, abs=0.01) and change["se"] == pytest.approx(16.67, abs=0.01)
    # the reference's seeds on other questions: no reference
    _write_cell(r1, "a", "short", {"q0": 0, "q1": 0})
    results = json.loads((r1 / "ruler_bench.json").read_text())
    results["cells"] = results["cells"][-1:]
    (r1 / "ruler_bench.json").write_text(json.dumps(results))
    assert ruler_transfer.paired_changes([r0, r1], [v0], trained=[], held_out=[]) is None


def _write_replies(bench_dir: Path, task: str, length, answers: dict) -> None:
    """A cached cell with replies, `answers`: `{question id: (score, reply)}`; listed in the folder's results."""
    from trl_opsdl.evaluation.ruler_bench import cell_path, write_cell

    key = {"task": task, "length": length}
    predictions = [{"id": i, "score": s, "reply": r} for i, (s, r) in answers.items()]
    write_cell(cell_path(str(bench_dir), key), {"predictions": predictions})
    results_file = bench_dir / "ruler_bench.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"cells": []}
    results["cells"].append({"task": task, "length": length, "key": key})
    results.update(num_samples=4, short_samples=4, dtype="bfloat16", seed=0, batch_size=8)
    results_file.write_text(json.dumps(results))


def _trajectory_benches(tmp_path: Path) -> dict:
    """The base and two steps over families `a` (trained) and `b` (held out), 4 questions per cell."""
    same = {f"q{i}": (0, "x") for i in range(4)}
    cells = {
        "base": {("a", "short"): same, ("b", "short"): same, ("a", 1024): same, ("b", 1024): same},
        # step 2: a's short +50 (two replies changed), b's 1,024 -25 (one question was 100 at the base)
        "step-2": {("a", "short"): {**same, "q0": (100, "y"), "q1": (100, "y")}, ("b", "short"): same,
                   ("a", 1024): same, ("b", 1024): same},
        "step-10": {("a", "short"): same, ("b", "short"): {**same, "q3": (100, "z")}, ("a", 1024): same,
                    ("b", 1024): {**same, "q2": (100, "w")}},
    }  # fmt: skip
    for name, by_cell in cells.items():
        for (task, length), answers in by_cell.items():
            _write_replies(tmp_path / name, task, length, answers)
    return {name: tmp_path / name for name in cells}


def test_ruler_trajectory_hand_computed(tmp_path):
    """Each step's change against the base over the same questions: short prompts (mean over families), the long cells
    (trained / held-out families), each family's, and the share of short replies changed."""
    import ruler_trajectory

    d = _trajectory_benches(tmp_path)
    table = ruler_trajectory.trajectory(d["base"], {2: d["step-2"], 10: d["step-10"]}, trained=["a"])
    assert table["held_out"] == ["b"] and list(table["steps"]) == ["2", "10"]
    step_2, step_10 = table["steps"]["2"], table["steps"]["10"]
    # step 2, a short: D = (100, 100, 0, 0): mean 50, sd 57.74, se 28.87 -> 50 +- 56.6; b short: 0; mean over families 25
    assert step_2["short_by_family"]["a"]["delta"] == 50 and step_2["short_by_family"]["a"]["ci95"] == [-6.6, 106.6]
    assert step_2["short"]["delta"] == 25 and step_2["replies_changed"] == {"short": 25.0, "long": 0.0}
    # step 10, b at 1,024: D = (0, 0, 100, 0): +25; the trained family's long cells did not move
    assert step_10["long_by_family"]["b"]["delta"] == 25 and step_10["held_out"]["delta"] == 25
    assert step_10["trained"]["delta"] == 0 and step_10["long"]["delta"] == 12.5
    assert step_10["short_by_family"]["b"]["delta"] == 25 and step_10["replies_changed"]["short"] == 12.5
    md = ruler_trajectory.trajectory_markdown(table)
    assert "| 2 | +25.0 [" in md and "| b (held out) |" in md and md.index("| 2 |") < md.index("| 10 |")


def test_ruler_trajectory_benches_the_checkpoints_once_in_the_order_given(tmp_path, monkeypatch, capsys):
    """`--steps 10,2`: each checkpoint benched like the baseline (its row counts, precision, batch size), in that
    order; a bench whose result exists is not run again; a step with no checkpoint is refused before any work."""
    import shutil

    import ruler_trajectory

    d = _trajectory_benches(tmp_path / "made")
    adapters = tmp_path / "models" / "opsdl-seed0"
    for step in (2, 10):
        (adapters / f"checkpoint-{step}").mkdir(parents=True)
    assert list(ruler_trajectory.checkpoints(adapters)) == [2, 10]  # by step, not by name
    commands = []

    def fake_step(command, log_file):
        commands.append(command)
        out = Path(command[command.index("--output-dir") + 1])
        shutil.copytree(d[out.name], out)

    monkeypatch.setattr(ruler_trajectory, "run_step", fake_step)
    out = tmp_path / "traj"
    argv = ["--adapter-dir", str(adapters), "--baseline", str(d["base"]), "--output-dir", str(out), "--mix", "a"]
    assert ruler_trajectory.main([*argv, "--steps", "10,2"]) == 0
    assert [c[c.index("--adapter") + 1] for c in commands] == [str(adapters / "checkpoint-10"),
                                                                str(adapters / "checkpoint-2")]  # fmt: skip
    command = " ".join(commands[0])
    assert "--lengths 1024 --tasks a,b --num-samples 4 --dtype bfloat16 --seed 0 --batch-size 8" in command
    assert "--short-samples 4" in command and f"--baseline {d['base'] / 'ruler_bench.json'}" in command
    table = json.loads((out / "trajectory.json").read_text())
    assert list(table["steps"]) == ["2", "10"] and table["steps"]["10"]["held_out"]["delta"] == 25
    assert (out / "trajectory.png").stat().st_size > 1000
    commands.clear()
    assert ruler_trajectory.main(argv) == 0 and commands == []  # both benches exist
    with pytest.raises(SystemExit):
        ruler_trajectory.main([*argv, "--steps", "3"])
    assert "--steps 3: no checkpoint-3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ruler_trajectory.main([*argv, "--mix", "vt"])
    assert "--mix vt: 'vt' is not a family of the baseline's bench" in capsys.readouterr().err
