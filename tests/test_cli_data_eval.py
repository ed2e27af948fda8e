"""`trl-opsdl build-data` and `trl-opsdl eval` on tiny local models; what they write loads with `datasets` and trains
with `OPSDLTrainer` unchanged."""

import json
import os
import subprocess
import sys

import pytest
from datasets import load_dataset

from tests.conftest import hotpot_records, save_tiny
from trl_opsdl.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"))


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def report_of(out):
    return json.loads(out[out.index("{") :])


def test_build_data_ruler_writes_jsonl_that_datasets_loads(tiny_dir, tmp_path, capsys):
    output = str(tmp_path / "ruler.jsonl")
    argv = ["build-data", "ruler", "--tokenizer", tiny_dir, "--tasks", "niah_single,vt", "--lengths", "256,512"]
    code, out, _ = run(argv + ["--num-samples", "2", "--seed", "1", "--output", output], capsys)
    assert code == 0
    dataset = load_dataset("json", data_files=output, split="train")
    assert len(dataset) == 8 and {"prompt", "teacher_prompt", "answers", "task", "length"} <= set(dataset.column_names)
    assert sorted(set(zip(dataset["task"], dataset["length"]))) == [
        ("niah_single", 256), ("niah_single", 512), ("vt", 256), ("vt", 512),
    ]  # fmt: skip
    report = report_of(out)
    assert report["rows"] == 8 and 0 < report["token_ratio"] < 1 and report["output"] == output


def test_build_data_qa_and_extract_report_recall(tiny_dir, tmp_path, capsys):
    records = tmp_path / "hotpot.json"
    records.write_text(json.dumps(hotpot_records()))
    pairs = str(tmp_path / "qa.jsonl")
    code, out, _ = run(
        ["build-data", "qa", "--input", str(records), "--format", "hotpotqa", "--tokenizer", tiny_dir,
         "--lengths", "200", "--output", pairs], capsys,
    )  # fmt: skip
    assert code == 0 and report_of(out)["rows"] == 3
    extracted = str(tmp_path / "bm25.jsonl")
    code, out, _ = run(
        ["build-data", "extract", "--input", pairs, "--extractor", "bm25", "--tokenizer", tiny_dir,
         "--chunk-size", "64", "--top-k", "2", "--output", extracted], capsys,
    )  # fmt: skip
    assert code == 0
    # The same fixed value as the library test: (1/2 + 1 + 1/2) / 3.
    assert report_of(out)["evidence_recall"] == pytest.approx(2 / 3)
    assert len(load_dataset("json", data_files=extracted, split="train")) == 3


def test_build_data_extract_self_uses_the_model(tiny_dir, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "\n".join(
            json.dumps({"context": "w1 w2 w3 . w4 w5 w6 .", "question": f"w{i} ?", "answers": ["w5"]})
            for i in range(3)
        )
    )
    output = str(tmp_path / "self.jsonl")
    code, out, _ = run(
        ["build-data", "extract", "--input", str(rows), "--extractor", "self", "--model", tiny_dir,
         "--max-new-tokens", "4", "--output", output], capsys,
    )  # fmt: skip
    assert code == 0 and "self-extraction: {'rows': 3" in out
    for row in load_dataset("json", data_files=output, split="train"):
        assert all(line in row["context"] for line in row["short_context"].split("\n"))


def test_eval_writes_metrics_per_column_task_length_and_the_plot(tiny_dir, tmp_path, capsys):
    data = str(tmp_path / "ruler.jsonl")
    assert main(["build-data", "ruler", "--tokenizer", tiny_dir, "--tasks", "niah_single,niah_multikey",
                 "--lengths", "128,256",
                 "--num-samples", "2", "--output", data]) == 0  # fmt: skip
    capsys.readouterr()
    out_dir = tmp_path / "eval"
    code, out, _ = run(
        ["eval", "--model", tiny_dir, "--data", data, "--output-dir", str(out_dir), "--max-new-tokens", "3"], capsys
    )
    assert code == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for column in ("prompt", "teacher_prompt"):
        groups = {(g["task"], g["length"]) for g in metrics["columns"][column]["groups"]}
        assert groups == {(t, n) for t in ("niah_single", "niah_multikey") for n in (128, 256)}
        assert set(metrics["columns"][column]["by_length"]) == {"128", "256"}
    assert (out_dir / "accuracy_vs_length.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out_dir / "predictions.jsonl").read_text().splitlines()) == 8
    assert "overall" in report_of(out)


def test_eval_longbench_format(tiny_dir, tmp_path, capsys):
    path = tmp_path / "hotpotqa.jsonl"
    context = " ".join(f"w{i % 40}" for i in range(200))
    path.write_text(json.dumps({"input": "w1 ?", "context": context, "answers": ["w2"], "length": 200}))
    code, _, _ = run(
        ["eval", "--model", tiny_dir, "--data", str(path), "--format", "longbench", "--max-length", "100",
         "--extractor", "bm25", "--output-dir", str(tmp_path / "lb"), "--max-new-tokens", "2"], capsys,
    )  # fmt: skip
    metrics = json.loads((tmp_path / "lb" / "metrics.json").read_text())
    assert code == 0 and metrics["columns"]["prompt"]["groups"][0]["metric"] == "token_f1"
    assert set(metrics["columns"]) == {"prompt", "teacher_prompt"}


def test_cli_bad_inputs_exit_2_with_the_reason(tiny_dir, tmp_path, capsys):
    out = str(tmp_path / "x.jsonl")
    code, _, err = run(["build-data", "ruler", "--tokenizer", tiny_dir, "--tasks", "niah_x", "--output", out], capsys)
    assert code == 2 and "Unknown RULER task(s) ['niah_x']" in err
    code, _, err = run(["build-data", "ruler", "--tokenizer", str(tmp_path / "none"), "--output", out], capsys)
    assert code == 2 and "No tokenizer found at" in err
    code, _, err = run(["build-data", "extract", "--input", str(tmp_path / "missing.jsonl"), "--output", out], capsys)
    assert code == 2 and "does not exist" in err
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "w1", "question": "w2"}))
    code, _, err = run(["build-data", "extract", "--input", str(rows), "--extractor", "self", "--output", out], capsys)
    assert code == 2 and "--extractor self needs --model" in err
    code, _, err = run(["build-data", "extract", "--input", str(rows), "--output", out], capsys)
    assert code == 2 and "Column 'context' is missing" in err
    with pytest.raises(SystemExit):
        main(["build-data", "ruler", "--tokenizer", tiny_dir, "--lengths", "4k", "--output", out])
    assert "expected comma-separated integers, got '4k'" in capsys.readouterr().err
    assert not os.path.exists(out)


@pytest.mark.slow
def test_console_help_lists_the_subcommands():
    result = subprocess.run(
        [sys.executable, "-m", "trl_opsdl.cli", "build-data", "--help"], capture_output=True, text=True, check=True
    )
    assert "ruler" in result.stdout and "qa" in result.stdout and "extract" in result.stdout


@pytest.mark.slow
def test_built_dataset_trains_with_opsdl_trainer_unchanged(tiny_dir, tmp_path):
    from trl_opsdl import OPSDLConfig, OPSDLTrainer
    from trl_opsdl.data import load_tokenizer
    from trl_opsdl.evaluation import OPSDLEvalCallback

    data = str(tmp_path / "train.jsonl")
    assert main(["build-data", "ruler", "--tokenizer", tiny_dir, "--tasks", "niah_single,cwe", "--lengths", "128",
                 "--num-samples", "2", "--output", data]) == 0  # fmt: skip
    dataset = load_dataset("json", data_files=data, split="train")
    tokenizer = load_tokenizer(tiny_dir)
    callback = OPSDLEvalCallback(dataset, tokenizer, every_n_steps=2, max_new_tokens=2)
    args = OPSDLConfig(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, max_completion_length=4,
        report_to="none", gradient_checkpointing=False, save_strategy="no", logging_steps=1, bf16=False,
    )  # fmt: skip
    trainer = OPSDLTrainer(
        model=tiny_dir, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback]
    )
    assert callback.trainer is trainer  # handed over by OPSDLTrainer itself
    trainer.train()
    history = trainer.state.log_history
    assert any("opsdl/reverse_kl" in h for h in history)
    assert any("eval_long/overall" in h and "eval_short/overall" in h for h in history)
