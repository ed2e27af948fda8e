"""`trl-opsdl bench ruler`: the table's arithmetic against hand-computed values, finished cells never recomputed (a
stopped run resumes), the `--quick` command end to end on a tiny BPE model, and bad input refused before any work."""

import json
import os

import pytest

from tests.real_fixtures import CHATML, save_bpe_chat_model, write_essays
from trl_opsdl.cli import main
from trl_opsdl.evaluation import ruler_bench
from trl_opsdl.evaluation.ruler_bench import aggregate, bench_table, cell_summary, run_ruler_bench


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama whose BPE knows the essays, the made-up words and the templates (a 400-token BPE of other text
    cuts made-up words into letters: the families' evidence alone would then outgrow 1,000 tokens), and essays."""
    from tests.conftest import bpe_tokenizer
    from trl_opsdl.data.reader import read_text_folder
    from trl_opsdl.data.ruler import _ALL_TEMPLATE_TEXT, pseudo_words

    folder = tmp_path_factory.mktemp("bench")
    essays = write_essays(folder / "essays")
    texts = [row["text"] for row in read_text_folder(essays)]
    tokenizer = bpe_tokenizer(texts + [" ".join(pseudo_words(3000)), _ALL_TEMPLATE_TEXT, CHATML, "0123456789"],
                              1000, chatml=True)  # fmt: skip
    return save_bpe_chat_model(folder / "model", tokenizer=tokenizer), essays


# --- the table's arithmetic --------------------------------------------------------------------------------------------


def _cell(task, length, scores):
    return {"task": task, "length": length, "metric": "string_match_all", **cell_summary(scores)}


FIXED_CELLS = [
    _cell("niah_single", "short", [100, 100, 0, 100]),
    _cell("niah_single", 1024, [100, 0, 0, 0]),
    _cell("niah_single", 2048, [0, 0, 0, 0]),
    _cell("vt", "short", [100, 100, 100, 100]),
    _cell("vt", 1024, [50, 50, 100, 0]),
    _cell("vt", 2048, [25, 75, 25, 75]),
]


def test_cell_scores_and_intervals_hand_computed():
    """Cells of 0/100 scores: Wilson's interval, e.g. 3 of 4: centre (0.75 + 1.96²/8) / (1 + 1.96²/4) = 0.6275, half
    1.96·sqrt(0.75·0.25/4 + 1.96²/64) / (1 + 1.96²/4) = 0.3269 → [30.1, 95.4]. Partial scores (multi-answer): normal,
    50 ± 1.96·sd/√n with sd of [50, 50, 100, 0] = 40.82 → [10.0, 90.0]. A cell's se is its interval's width / 3.92."""
    by = {(c["task"], c["length"]): c for c in FIXED_CELLS}
    assert by[("niah_single", "short")]["ci95"] == [30.1, 95.4] and by[("niah_single", "short")]["score"] == 75
    assert by[("niah_single", 1024)]["ci95"] == [4.6, 69.9]
    assert by[("niah_single", 2048)]["ci95"] == [0.0, 49.0] and by[("niah_single", 2048)]["se"] == 12.5
    assert by[("vt", "short")]["ci95"] == [51.0, 100.0] and by[("vt", "short")]["se"] == 12.5  # not 0: Wilson's
    assert by[("vt", 1024)]["ci95"] == [10.0, 90.0] and by[("vt", 1024)]["se"] == pytest.approx(20.4082, abs=1e-4)
    assert by[("vt", 2048)]["ci95"] == [21.7, 78.3]


def test_table_means_over_families_per_length_and_overall_hand_computed():
    """RULER: a length's score is the mean over families, overall the mean over all (family, length) cells; each
    mean's 95% half-width is sqrt(Σ h²)/k over its k cells' half-widths h (niah_single 32.65, 24.5 at 1024/2048 and
    32.65 short; vt 40.0, 28.3, and 24.5 short)."""
    table = aggregate(FIXED_CELLS, ["niah_single", "vt"], [1024, 2048])
    assert table["by_length"]["1024"] == {"score": 37.5, "ci95": [11.7, 63.3]}  # (25 + 50)/2 ± √(32.65² + 40²)/2
    assert table["by_length"]["2048"] == {"score": 25.0, "ci95": [6.3, 43.7]}  # (0 + 50)/2 ± √(24.5² + 28.3²)/2
    assert table["overall"] == {"score": 31.25, "ci95": [15.3, 47.2]}  # (25 + 0 + 50 + 50)/4 ± √(Σ of the 4)/4
    assert table["short"] == {"score": 87.5, "ci95": [67.1, 100.0]}  # (75 + 100)/2 ± 20.4, clipped at 100
    assert table["by_task"]["niah_single"]["mean"] == {"score": 12.5, "ci95": [0.0, 32.9]}
    assert table["by_task"]["vt"]["mean"] == {"score": 50.0, "ci95": [25.5, 74.5]}
    assert table["by_task"]["vt"]["lengths"]["2048"]["score"] == 50.0
    markdown = bench_table({"table": table})
    assert "| **average over families** | 87.5 [67, 100] | 37.5 [12, 63] | 25.0 [6, 44] | 31.2 [15, 47] |" in markdown
    assert "| 0.0 [0, 49] |" in markdown and "[-0," not in markdown  # Wilson at p = 0: a lower bound of +0
    # a cell cached before interval95 clamped holds -0.0 from rounding; the table still prints 0
    assert ruler_bench._fmt({"score": 0.0, "ci95": [-0.0, 11.4]}) == "0.0 [0, 11]"
    with pytest.raises(ValueError, match="missing"):
        aggregate(FIXED_CELLS[:-1], ["niah_single", "vt"], [1024, 2048])


def test_numerics_differences_name_each_field_that_differs_and_skip_what_a_bench_did_not_record():
    ours = ruler_bench.numerics({"dtype": "bfloat16", "host": {"cpu": "AMD EPYC", "cpu_capability": "AVX512",
                                                               "torch": "2.14.1", "transformers": "5.25.0"}})  # fmt: skip
    same = dict(ours)
    assert ruler_bench.numerics_differences(ours, same) == []
    other = {**ours, "cpu": "Intel Xeon", "torch": "2.13.0"}
    assert ruler_bench.numerics_differences(ours, other) == [
        "cpu 'AMD EPYC' (baseline: 'Intel Xeon')", "torch '2.14.1' (baseline: '2.13.0')"]  # fmt: skip
    old_bench = ruler_bench.numerics({"dtype": "float32"})  # an early bench without a host record
    assert ruler_bench.numerics_differences(ours, old_bench) == ["dtype 'bfloat16' (baseline: 'float32')"]
    # On a GPU the GPU computes: another host CPU beside the same GPU model is not other numerics; another GPU is.
    h100 = {"dtype": "bfloat16", "host": {"cpu": "AMD EPYC", "gpu": "NVIDIA H100", "torch": "2.14.1"}}
    other_cpu = {"dtype": "bfloat16", "host": {"cpu": "Intel Xeon", "gpu": "NVIDIA H100", "torch": "2.14.1"}}
    h200 = {"dtype": "bfloat16", "host": {"cpu": "Intel Xeon", "gpu": "NVIDIA H200", "torch": "2.14.1"}}
    assert ruler_bench.numerics_differences(ruler_bench.numerics(h100), ruler_bench.numerics(other_cpu)) == []
    assert ruler_bench.numerics_differences(ruler_bench.numerics(h100), ruler_bench.numerics(h200)) == [
        "gpu 'NVIDIA H100' (baseline: 'NVIDIA H200')"]  # fmt: skip


# --- the cache ---------------------------------------------------------------------------------------------------------


def test_a_finished_cell_is_never_recomputed_and_a_stopped_run_resumes(tiny, tmp_path, monkeypatch):
    model, essays = tiny
    calls = []
    real_score_cell = ruler_bench.score_cell

    def counting(*args, **kwargs):
        calls.append(1)
        return real_score_cell(*args, **kwargs)

    options = dict(model=model, documents=essays, lengths=[512], tasks="niah_single,fwe", num_samples=2,
                   max_new_tokens=4, progress=False, log=lambda *_: None)  # fmt: skip
    out = str(tmp_path / "out")

    # A run stopped after its first cell (the second raises) leaves that cell behind, whole.
    def stops_on_second(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        return counting(*args, **kwargs)

    monkeypatch.setattr(ruler_bench, "score_cell", stops_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_ruler_bench(out, **options)
    assert [n.endswith(".json") for n in os.listdir(os.path.join(out, "cells"))] == [True]  # no .tmp left

    monkeypatch.setattr(ruler_bench, "score_cell", counting)
    first = run_ruler_bench(out, **options)
    assert len(calls) == 4  # 1 before the stop + the 3 others of 2 families x (short + 512)

    def refuses(*args, **kwargs):
        raise AssertionError("a cached cell was recomputed")

    monkeypatch.setattr(ruler_bench, "score_cell", refuses)
    again = run_ruler_bench(out, **options)  # another process, the same cells: nothing to compute
    assert again["table"] == first["table"]

    # Another answer budget is another cell: computed, the cached ones untouched.
    monkeypatch.setattr(ruler_bench, "score_cell", counting)
    run_ruler_bench(out, **{**options, "max_new_tokens": 5, "tasks": "fwe"})
    assert len(calls) == 6


def test_a_cell_claimed_by_a_live_process_is_left_to_it_and_a_dead_ones_claim_is_taken_over(tiny, tmp_path,
                                                                                               monkeypatch):  # fmt: skip
    """Processes side by side: a cell another live process has claimed is not computed here — this run waits until
    that process writes it; a claim left by a process that died is taken over and the cell computed."""
    import socket
    import subprocess
    import sys

    model, essays = tiny
    options = dict(model=model, documents=essays, lengths=[512], tasks="niah_single", num_samples=1,
                   max_new_tokens=2, progress=False, log=lambda *_: None)  # fmt: skip
    out = tmp_path / "out"
    first = run_ruler_bench(str(out), **options)
    (path,) = [p for p in (out / "cells").iterdir() if p.name.startswith("niah_single-512-")]
    finished = path.read_text()

    def claim(pid):
        path.unlink()
        (out / "cells" / (path.name + ".claim")).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))

    calls = []
    stub = {**cell_summary([100.0]), "metric": "string_match_all", "prompt_tokens": 1.0, "predictions": []}
    monkeypatch.setattr(ruler_bench, "score_cell", lambda *a, **k: calls.append(1) or dict(stub))

    def other_process_finishes(seconds):  # what this run sees while it waits: the holder writes the cell
        path.write_text(finished)
        (out / "cells" / (path.name + ".claim")).unlink()

    claim(os.getppid())  # a live process
    monkeypatch.setattr(ruler_bench.time, "sleep", other_process_finishes)
    assert run_ruler_bench(str(out), **options)["table"] == first["table"] and calls == []

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim(int(dead.stdout))
    monkeypatch.setattr(ruler_bench.time, "sleep", lambda s: pytest.fail("waited on a dead process's claim"))
    taken_over = run_ruler_bench(str(out), **options)
    assert calls == [1] and taken_over["table"]["by_task"]["niah_single"]["lengths"]["512"]["score"] == 100.0
    assert not list((out / "cells").glob("*.claim"))


def test_an_adapter_is_merged_and_gets_cells_of_its_own(tiny, tmp_path, monkeypatch):
    """The cache key holds the adapter: the same model with an adapter is another model (its cells are computed, not
    read from the bare model's), and the adapter's weights are in the model that answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model, essays = tiny
    adapter = str(tmp_path / "adapter")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                                LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))  # fmt: skip
    peft_model.save_pretrained(adapter)
    seen = []
    real_score_cell = ruler_bench.score_cell

    def recording(model_, *args, **kwargs):
        seen.append(model_.model.layers[0].self_attn.q_proj.weight.detach().clone())
        return real_score_cell(model_, *args, **kwargs)

    monkeypatch.setattr(ruler_bench, "score_cell", recording)
    options = dict(model=model, documents=essays, lengths=[512], tasks="niah_single", num_samples=1,
                   max_new_tokens=2, progress=False, log=lambda *_: None)  # fmt: skip
    out = str(tmp_path / "out")
    run_ruler_bench(out, **options)
    results = run_ruler_bench(out, adapter=adapter, **options)
    assert len(seen) == 4 and results["label"] == "adapter"
    assert not torch.equal(seen[0], seen[2])  # merged LoRA: other q_proj weights


def test_short_samples_gives_the_short_cells_their_own_rows_and_keeps_the_long_cells(tiny, tmp_path, monkeypatch):
    """`short_samples`: each family's short cell has that many rows, the long cells keep `num_samples` and stay cached
    (their keys do not change); equal to `num_samples`, the short cells are the cached ones of a run without it."""
    model, essays = tiny
    calls = []
    real_score_cell = ruler_bench.score_cell

    def counting(model_, tokenizer, rows, column, *args, **kwargs):
        calls.append((column, len(rows)))
        return real_score_cell(model_, tokenizer, rows, column, *args, **kwargs)

    monkeypatch.setattr(ruler_bench, "score_cell", counting)
    options = dict(model=model, documents=essays, lengths=[512], tasks="niah_single,fwe", num_samples=2,
                   max_new_tokens=2, progress=False, log=lambda *_: None)  # fmt: skip
    out = str(tmp_path / "out")
    run_ruler_bench(out, **options)
    assert sorted(calls) == [("prompt", 2)] * 2 + [("teacher_prompt", 2)] * 2
    calls.clear()
    run_ruler_bench(out, short_samples=2, **options)  # = num_samples: the same keys, nothing computed
    assert calls == []
    results = run_ruler_bench(out, short_samples=5, **options)
    assert calls == [("teacher_prompt", 5)] * 2  # only the short cells, with their own rows; the long cells cached
    by_length = {(c["task"], c["length"]): c["n"] for c in results["cells"]}
    assert by_length == {("niah_single", "short"): 5, ("fwe", "short"): 5, ("niah_single", 512): 2, ("fwe", 512): 2}
    assert results["short_samples"] == 5 and results["table"]["by_task"]["fwe"]["short"]["n"] == 5
    assert results["batch_size"] == 4  # recorded: greedy answers can change with it


def test_dtype_loads_the_model_in_that_precision_and_keys_its_own_cells(tiny, tmp_path, monkeypatch):
    """`--dtype bfloat16` answers with a bf16 model, and its cells are not the fp32 run's (greedy answers differ
    a little between precisions); the precision is written beside the table."""
    import torch

    model, essays = tiny
    seen = []
    real_score_cell = ruler_bench.score_cell

    def recording(model_, *args, **kwargs):
        seen.append(model_.dtype)
        return real_score_cell(model_, *args, **kwargs)

    monkeypatch.setattr(ruler_bench, "score_cell", recording)
    options = dict(model=model, documents=essays, lengths=[512], tasks="niah_single", num_samples=1,
                   max_new_tokens=2, progress=False, log=lambda *_: None)  # fmt: skip
    out = str(tmp_path / "out")
    assert run_ruler_bench(out, **options)["dtype"] == "float32"  # "auto" on a CPU
    results = run_ruler_bench(out, dtype="bfloat16", **options)
    assert seen == [torch.float32] * 2 + [torch.bfloat16] * 2 and results["dtype"] == "bfloat16"
    run_ruler_bench(out, dtype="float32", **options)  # = the "auto" run's cells: nothing computed
    assert len(seen) == 4


# --- the command -------------------------------------------------------------------------------------------------------


def test_peak_memory_is_the_peak_since_the_last_reset():
    """A cell's peak memory is its own: after a 256 MiB tensor is freed, a reset starts a window without it (Linux's
    peak resident set, VmHWM, reset through /proc/self/clear_refs). In a fresh process, where freeing the tensor hands
    its pages back (a long-lived one may keep them in its heap, and then they count, as they are resident)."""
    import os
    import subprocess
    import sys

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no resettable peak resident set on this OS")
    script = (
        "import torch; from trl_opsdl import host; cpu = torch.device('cpu'); host.reset_peak_memory(cpu); "
        "big = torch.ones(64 * 2**20); del big; with_tensor = host.peak_memory_gib(cpu); "
        "host.reset_peak_memory(cpu); print(with_tensor, host.peak_memory_gib(cpu))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    with_tensor, after_reset = map(float, out.split())
    assert with_tensor - after_reset > 0.2


def test_quick_bench_end_to_end_writes_json_markdown_plot(tiny, tmp_path, capsys):
    model, essays = tiny
    out = tmp_path / "out"
    argv = ["bench", "ruler", "--quick", "--model", model, "--documents", essays, "--output-dir", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "ruler_bench.json").read_text())
    assert results["host"]["matmul_gflops_fp32"] > 0  # the cells' seconds are read against the host's speed
    table = results["table"]
    assert table["tasks"] == list(ruler_bench.RULER_TASKS) and table["lengths"] == [512, 1024]
    assert len(results["cells"]) == 7 * 3 and {c["n"] for c in results["cells"]} == {2}
    # The table is the means of the cells it was given.
    long_cells = [c for c in results["cells"] if c["length"] != "short"]
    assert table["overall"]["score"] == pytest.approx(sum(c["score"] for c in long_cells) / 14, abs=0.01)
    at_512 = [c["score"] for c in long_cells if c["length"] == 512]
    assert table["by_length"]["512"]["score"] == pytest.approx(sum(at_512) / 7, abs=0.01)
    assert "| fwe |" in (out / "ruler_bench.md").read_text()
    # What the cells cost (reported, not asserted against a target): seconds and peak memory, per length.
    assert all(c["peak_memory_gib"] > 0 and c["seconds"] >= 0 for c in results["cells"])
    cost = results["cost"]
    assert list(cost) == ["short", "512", "1024"] and {c["cells"] for c in cost.values()} == {7}
    for length, c in cost.items():
        own = [cell for cell in results["cells"] if str(cell["length"]) == length]
        assert c["peak_memory_gib"] == max(cell["peak_memory_gib"] for cell in own)
        assert c["seconds_total"] == pytest.approx(sum(cell["seconds"] for cell in own), abs=0.2)
    assert "| 1024 (7) |" in (out / "ruler_bench.md").read_text()
    assert (out / "ruler_bench.png").stat().st_size > 10_000

    # The same model against itself as the baseline: every cell cached, dashed lines and a table of zero changes.
    baseline = tmp_path / "base.json"
    baseline.write_text((out / "ruler_bench.json").read_text())
    assert main(argv + ["--baseline", str(baseline)]) == 0
    markdown = (out / "ruler_bench.md").read_text()
    assert "Change against the baseline" in markdown and "| fwe | +0.0 | +0.0 | +0.0 | +0.0 |" in markdown
    assert "other numerics" not in markdown and "other numerics" not in capsys.readouterr().out

    # A baseline benched on another CPU in another precision: said before any cell, and above the change table.
    other = json.loads(baseline.read_text())
    other["dtype"], other["host"]["cpu"] = "bfloat16", "Another CPU"
    baseline.write_text(json.dumps(other))
    assert main(argv + ["--baseline", str(baseline)]) == 0
    out_text = capsys.readouterr().out
    warning = next(line for line in out_text.splitlines() if "other numerics" in line)
    assert out_text.index(warning) < out_text.index("RULER bench:")  # before any work
    assert "dtype 'float32' (baseline: 'bfloat16')" in warning and "(baseline: 'Another CPU')" in warning
    markdown = (out / "ruler_bench.md").read_text()
    assert "The baseline was benched under other numerics (dtype 'float32' (baseline: 'bfloat16'); cpu " in markdown


def test_a_table_whose_cells_came_from_two_machine_kinds_says_so(tiny, tmp_path, capsys):
    """Each new cell records the machine it was computed on; a table resumed (or shared) across machine kinds, whose
    greedy answers differ, is named as such in the log, the JSON and the markdown. One machine: no note."""
    from trl_opsdl.host import machine

    model, essays = tiny
    out = tmp_path / "out"
    argv = ["bench", "ruler", "--quick", "--tasks", "niah_single", "--model", model, "--documents", essays,
            "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "ruler_bench.json").read_text())
    assert len(results["cell_machines"]) == 1 and "machine kinds" not in (out / "ruler_bench.md").read_text()
    cells = sorted((out / "cells").glob("*.json"))
    assert all(json.loads(c.read_text())["machine"] == machine() for c in cells)
    capsys.readouterr()

    other = json.loads(cells[0].read_text())
    other["machine"]["cpu"] = "Another CPU"
    cells[0].write_text(json.dumps(other))
    assert main(argv) == 0  # every cell cached
    assert "warning: this table's cells were computed on 2 machine kinds" in capsys.readouterr().out
    assert len(json.loads((out / "ruler_bench.json").read_text())["cell_machines"]) == 2
    markdown = (out / "ruler_bench.md").read_text()
    assert "Its cells were computed on 2 machine kinds (" in markdown and "cpu Another CPU" in markdown


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "niah_single,needle"], "--tasks ['needle']: unknown RULER family"),
        (["--lengths", "0"], "--lengths [0]: lengths must be positive"),
        (["--lengths", "50"], "--lengths 50 leaves no room for a prompt"),
        (["--lengths", "512,4096"], "--lengths 4096 is beyond the model's window (max_position_embeddings 2048)"),
        (["--num-samples", "0"], "--num-samples 0: must be positive"),
        (["--short-samples", "0"], "--short-samples 0: must be positive"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0: must be positive"),
        (["--batch-size", "0"], "--batch-size 0: must be positive"),
        (["--num-eval-documents", "0"], "--num-eval-documents 0: must be positive"),
        (["--adapter", "nowhere/"], "--adapter 'nowhere/' holds no adapter_config.json"),
        (["--documents", "nowhere/"], "--documents 'nowhere/' is not a folder"),
        (["--baseline", "nowhere.json"], "--baseline 'nowhere.json' is not a file"),
        (["--dtype", "float16"], "--dtype 'float16' is not one of auto, bfloat16, float32"),
    ],
)
def test_bad_bench_input_is_one_line_before_any_work(tiny, tmp_path, capsys, extra, message):
    model, essays = tiny
    out = tmp_path / "out"
    argv = ["bench", "ruler", "--quick", "--model", model, "--documents", essays, "--output-dir", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()  # nothing was computed or written


@pytest.mark.parametrize("model", ["./missing-model", "missing.gguf"])
def test_a_missing_model_path_is_one_line_before_any_work(tiny, tmp_path, capsys, model):
    out = tmp_path / "out"
    assert main(["bench", "ruler", "--quick", "--model", model, "--output-dir", str(out)]) == 2
    assert f"--model {model!r} does not exist" in capsys.readouterr().err and not out.exists()


# --- the documents: the bench's held-out essays, the recipe's training essays ----------------------------------------


def test_bench_essays_are_the_ones_demo_real_holds_out_and_build_data_trains_on_the_others(tiny, tmp_path,
                                                                                         monkeypatch, capsys):  # fmt: skip
    """Without --documents the bench reads the essays `demo --real --seed s` holds out; `build-data ruler --filler
    essays --split train` writes a mixture of families x lengths over the other essays only."""
    import re
    from dataclasses import replace

    import trl_opsdl.downloads as sources
    from trl_opsdl.demo.config import RealDemoConfig
    from trl_opsdl.demo.real import prepare

    model, essays = tiny
    monkeypatch.setattr(sources, "essays_path", lambda cache_dir=None: essays)
    config = replace(RealDemoConfig(model=model, task="niah_single"), num_eval_articles=4, seed=3)
    _, _, train, held_out = prepare(config, log=lambda *_: None)
    assert ruler_bench.held_out_documents(None, num_eval_documents=4, split_seed=3) == held_out

    out = tmp_path / "mix.jsonl"
    argv = ["build-data", "ruler", "--tokenizer", model, "--filler", "essays", "--split", "train", "--seed", "3",
            "--num-eval-documents", "4", "--tasks", "niah_single,niah_multikey", "--lengths", "512,1024",
            "--num-samples", "2", "--value-type", "words", "--conversational", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["task"], r["length"]) for r in rows) == sorted(
        [(t, n) for t in ("niah_single", "niah_multikey") for n in (512, 1024)] * 2
    )
    held_marks = {m for e in held_out for m in re.findall(r"essaymark\d+", e)}
    marks = {m for r in rows for m in re.findall(r"essaymark\d+", r["prompt"][-1]["content"])}
    assert marks and not marks & held_marks

    capsys.readouterr()
    assert main(argv[:4] + ["--split", "train"] + argv[8:-1] + [str(tmp_path / "x.jsonl")]) == 2
    assert "--split train splits the essays; pass --filler essays" in capsys.readouterr().err
    assert main(argv[:-1] + [str(tmp_path / "y.jsonl"), "--num-eval-documents", "0"]) == 2
    assert "--num-eval-documents 0: must be positive" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "y.jsonl").exists()
