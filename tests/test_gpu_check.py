"""`benchmarks/gpu_check.py` cannot rot between GPU runs: its `--tiny --device cpu` run goes through every check's
code, records one entry per check with a status and figures, and reports a wrong or NaN loss as a failure."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import gpu_check  # noqa: E402


# Two parity cases made wrong on purpose: a NaN in the kernel path's input, and a reference off by 5%.
INJECTED = {
    "parity/full_logits/trl_kernel/fp32": "nan",
    "parity/sampled_token/trl_kernel/bf16": "wrong_reference",
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    inject = ",".join(f"{case}={kind}" for case, kind in INJECTED.items())
    command = [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--tiny", "--device", "cpu", "--out", str(out),
               "--budget-s", "900", "--inject", inject]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert (out / "gpu_check.json").exists(), run.stdout[-3000:] + run.stderr[-3000:]
    return run, json.loads((out / "gpu_check.json").read_text()), out


@pytest.mark.slow
def test_tiny_run_has_one_entry_per_check_with_status_and_figures(tiny_run):
    run, record, out = tiny_run
    checks = {entry["id"]: entry for entry in record["checks"]}
    assert len(checks) == len(record["checks"]), "duplicate check ids"
    assert record["finished"] is not None and record["tiny"] and record["device"] == "cpu"
    # every check of the issue: (a) parity per mode and dtype, (c) loss memory, (d) generation, (b) trainer steps
    parity = {f"parity/{mode}/{dtype}" for mode in gpu_check.LOSS_MODES for dtype in ("fp32", "bf16")}
    assert parity <= set(checks)
    assert {"loss_memory/48x320", "loss_memory/96x320", "setup/model", "generation/256"} <= set(checks)
    assert checks["generation/256/merged_lora"]["figures"]["new_tokens"] == 8  # LoRA merged, then unmerged
    steps = {f"opsdl_step/{n}/{policy}/sdpa" for n in (64, 256) for policy in ("none", "full", "selective")}
    steps.add("opsdl_step/256/full/sdpa/context_none")  # the prompt's keys/values without gradient
    assert steps <= set(checks)
    for entry in checks.values():
        assert entry["status"] in gpu_check.STATUSES, entry
        assert entry["group"] in gpu_check.GROUPS, entry
        if entry["status"] != "skipped":
            assert entry["figures"], entry["id"]
    # nothing broke, nothing was skipped for time; only flash attention (not installed here) is skipped
    assert [e["id"] for e in checks.values() if e["status"] == "error"] == []
    assert [e["id"] for e in checks.values() if e["status"] == "skipped"] == ["opsdl_step/256/full/flash_attention_2"]
    # the trainer steps measured both trainers and compared them on the same sequences
    for check_id in steps:
        figures = checks[check_id]["figures"]
        assert figures["opsdl_tokens_per_s"] > 0 and figures["sft_tokens_per_s"] > 0, check_id
        assert figures["prompt_tokens"] == int(check_id.split("/")[1]) and figures["completion_tokens"] == 8
        assert figures["training_planned_gib"] > 0 and math.isfinite(figures["loss_first_step"])
    assert checks["generation/256"]["figures"]["new_tokens"] == 8
    assert "| check | status |" in (out / "gpu_check.md").read_text()
    assert "| check | status |" in run.stdout  # the table comes last


@pytest.mark.slow
def test_tiny_run_reports_nan_and_wrong_reference_as_failures(tiny_run):
    run, record, _ = tiny_run
    checks = {entry["id"]: entry for entry in record["checks"]}
    for case in INJECTED:
        assert checks[case]["status"] == "fail", checks[case]
        assert any(ok is False for ok in checks[case]["criteria"].values())
    # a NaN must fail every comparison, never slip through `not (err > tol)`
    nan_case = checks["parity/full_logits/trl_kernel/fp32"]
    assert nan_case["figures"]["grad_hidden_rel_err"] == "nan" and not nan_case["criteria"]["outputs finite"]
    for case, entry in checks.items():
        if entry["group"] == "parity" and case not in INJECTED:
            assert entry["status"] == "pass", entry
    assert run.returncode == 1  # a failure anywhere makes the exit status non-zero
    assert record["summary"]["parity"] == {"pass": 7, "fail": 2, "error": 0, "skipped": 0}  # 6 cases + chunking speed


def test_nan_never_passes_a_tolerance():
    torch = pytest.importorskip("torch")
    ref = torch.ones(4)
    assert gpu_check.rel_err(ref.clone(), ref) == 0.0
    assert math.isnan(gpu_check.rel_err(torch.tensor([1.0, float("nan"), 1.0, 1.0]), ref))
    assert math.isnan(gpu_check.rel_err(torch.ones(3), ref))  # a shape mismatch is no match
    assert not gpu_check.at_most(float("nan"), 1.0) and not gpu_check.at_most(float("inf"), 1.0)
    assert gpu_check.memory_verdict(1.10, 1.0) == (1.10, True)
    assert gpu_check.memory_verdict(1.2, 1.0)[1] is False and gpu_check.memory_verdict(None, 1.0) == (None, None)
    assert gpu_check.memory_verdict(1.0, 1.0, judge=False) == (1.0, None)


def test_a_check_that_raises_or_would_overrun_is_recorded_and_the_next_still_runs(tmp_path):
    results = gpu_check.Results(tmp_path, budget_s=100, meta={})

    def broken():
        raise RuntimeError("CUDA out of memory (pretend)")

    results.run("x/broken", "parity", 1, broken)
    results.run("x/too_long", "parity", 1000, broken)
    results.run("x/fine", "parity", 1, lambda: {"figures": {"a": 1.0}, "criteria": {"ok": True, "n/a": None}})
    results.finish()
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {entry["id"]: entry["status"] for entry in record["checks"]}
    assert statuses == {"x/broken": "error", "x/too_long": "skipped", "x/fine": "pass"}
    assert "out of memory" in record["checks"][0]["note"] and "time guard" in record["checks"][1]["note"]
    cut_off = {**record, "finished": None}
    assert "NOT FINISHED" in gpu_check.format_table(cut_off)


def test_wheel_tags_and_the_carried_folder(tmp_path):
    fits = gpu_check.wheel_fits
    assert fits("trl-1.16.0-py3-none-any.whl", "3.12.3")
    assert fits("multiprocess-0.70.19-py312-none-any.whl", "3.12") and not fits(
        "multiprocess-0.70.19-py311-none-any.whl", "3.12"
    )
    regex = "regex-2026.11.19-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl"
    assert fits(regex, "3.12") and not fits(regex, "3.11")
    assert not fits("regex-2026.11.19-cp312-cp312-macosx_11_0_arm64.whl", "3.12")
    assert not fits("regex-2026.11.19-cp312-cp312-manylinux_2_17_aarch64.whl", "3.12")
    for name in ("trl-1.16.0-py3-none-any.whl", "dill-0.4.1-py3-none-any.whl", "dill-0.4.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    problems = gpu_check.check_wheels(tmp_path, ["trl==1.16.0", "dill==0.4.1", "datasets==5.2.0"], "3.12", 60)
    assert any("datasets==5.2.0" in p for p in problems)  # missing
    assert any("dill" in p and "several versions" in p for p in problems)  # two versions stop the install
    assert not any(p.startswith("trl") for p in problems)
    pins = gpu_check.read_requirements(BENCHMARKS / "gpu_check_wheels.txt")
    assert "trl==1.16.0" in pins and all("==" in pin for pin in pins)


H100_RUN = (
    Path(__file__).resolve().parents[1] / "docs" / "results" / "gpu_check" / "h100-2026-12-06" / "gpu_check.json"
)


def test_the_planner_predicts_the_h100_run_within_15_percent():
    # The first GPU run (one H100, 7B-shaped model, LoRA r=16 on every projection, bf16, PEFT's fp32 adapters) found
    # the planner 16-19% low on generation and training at 32K, 37% high with the context detached, and 18% low on the
    # multi-tile loss; each gap had a cause in the code (docs/results.md#on-a-gpu). Against that run's figures the
    # planner must now be within 15% everywhere it measured, and must say that what ran out of memory cannot fit.
    from trl_opsdl.planner.memory import GIB

    record = json.loads(H100_RUN.read_text())
    checks = {entry["id"]: entry for entry in record["checks"]}
    shapes = gpu_check.GPU_SHAPES
    config = gpu_check.model_config(shapes, max(shapes.lengths) + shapes.completion_length + 16)
    setup = gpu_check.ModelSetup(config, None, None, "bf16", 79.18)
    compared = []
    for length in shapes.lengths:
        for check_id, context in ((f"opsdl_step/{length}/full/sdpa", "full"),
                                  (f"opsdl_step/{length}/full/sdpa/context_none", "none")):  # fmt: skip
            if check_id not in checks:
                continue
            figures = checks[check_id]["figures"]
            plan = gpu_check.plan_step(setup, length, shapes.completion_length, "full", "cuda", context)
            phases = plan["phases"]
            planned = {
                "training": max(phases[k] for k in ("loss", "backward", "optimizer step")),
                "teacher_forward": phases["teacher forward"],
                "generation": gpu_check.planned_first_generation(plan),
            }
            for phase, value in planned.items():
                measured = figures.get(f"{phase}_peak_gib")
                if measured is not None:
                    compared.append((f"{check_id} {phase}", measured, value / GIB))
    generation = checks["generation/32768"]["figures"]
    plan = gpu_check.planner_estimate(config, 32768, shapes.generation_new_tokens, True, "bf16", "cuda", 79.18)
    compared.append(("generation/32768", generation["peak_gib"], gpu_check.planned_first_generation(plan) / GIB))
    for positions, vocab in shapes.loss_memory_cases:
        figures = checks[f"loss_memory/{positions}x{vocab}"]["figures"]
        planned = gpu_check.loss_memory_planned(positions, vocab, shapes, "cuda")
        compared.append((f"loss_memory/{positions}x{vocab}", figures["fused_gib"], planned / GIB))
    assert len(compared) == 12  # 8K and 32K: 3 phases each; 32K detached: 2; generation; 3 loss shapes
    off = [(name, measured, round(planned, 2)) for name, measured, planned in compared
           if abs(planned / measured - 1) > gpu_check.MEMORY_TOLERANCE]  # fmt: skip
    assert off == []
    # 8K without checkpointing ran out of memory on the 79 GiB card: the planner must not have it fit
    plan = gpu_check.plan_step(setup, 8192, shapes.completion_length, "none", "cuda")
    assert checks["opsdl_step/8192/none/sdpa"]["status"] == "error"
    assert plan["peak"] + plan["reserve"] > 79.18 * GIB
