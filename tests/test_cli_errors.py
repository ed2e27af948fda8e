"""The CLI's error contract, every subcommand: a bad input is one line `trl-opsdl <command>: error: ...` naming the
value, exit status 2, before any work (nothing is written); no zero or negative that silently means something else."""

import json
from pathlib import Path

import pytest

from tests.conftest import kv_rows, save_tiny
from trl_opsdl.cli import main


FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model folder and the bad files the cases point at."""
    root = tmp_path_factory.mktemp("cli")
    tiny = save_tiny(root / "tiny")
    rows = kv_rows(4)
    good = root / "good.jsonl"
    good.write_text("".join(json.dumps({**r, "task": "kv", "length": 64, "metric": "contains"}) + "\n" for r in rows))
    bad_line = root / "bad_line.jsonl"
    bad_line.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + '{"prompt": "a",\n')
    (root / "latin1.jsonl").write_bytes(json.dumps(rows[0]).encode() + b'\n{"prompt": "caf\xe9"}\n')
    (root / "empty.jsonl").write_text("\n  \n")
    (root / "rows.txt").write_text(json.dumps(rows[0]))
    (root / "broken.json").write_text(json.dumps([{"context": "a"}, {"context": "b"}], indent=1)[:-4])
    (root / "not_a_model").mkdir()
    corrupt = Path(save_tiny(root / "corrupt"))
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 9 // 10])  # a download or copy cut short
    (root / "used").mkdir()
    (root / "used" / "metrics.json").write_text("{}")
    (root / "exists.jsonl").write_text("old\n")
    return {"root": root, "tiny": tiny, "good": str(good), "bad_line": str(bad_line), "corrupt": str(corrupt)}


def _expand(argv, files):
    return [str(files["root"] / a[1:]) if a.startswith("@") else files.get(a[1:], a) if a[:1] == "$" else a
            for a in argv]  # fmt: skip


RULER = ["build-data", "ruler", "--tokenizer", "$tiny", "--tasks", "niah_single", "--lengths", "128"]
EXTRACT = ["build-data", "extract", "--tokenizer", "$tiny"]
EVAL = ["eval", "--model", "$tiny", "--data", "$good"]
PLAN = ["plan", "--model", str(FIXTURES / "qwen2.5-7b"), "--context-length", "4096"]
TRAIN = ["train", "--bf16", "False", "--report_to", "none", "--per_device_train_batch_size", "2"]

# (id, argv — `@name` is a path under the fixture folder, `$key` a fixture file —, what the one line must say)
CASES = [
    ("ruler num-samples 0", RULER + ["--num-samples", "0", "--output", "@o.jsonl"], "--num-samples 0: must be positive"),
    ("ruler num-samples -1", RULER + ["--num-samples", "-1", "--output", "@o.jsonl"], "--num-samples -1: must be"),
    ("ruler length 0", RULER[:-1] + ["0,128", "--output", "@o.jsonl"], "lengths must be positive token counts"),
    ("ruler output exists", RULER + ["--output", "@exists.jsonl"], "exists.jsonl' already exists; pass another"),
    ("ruler output is a folder", RULER + ["--output", "@used"], "used' is a folder; pass a .jsonl file path"),
    ("qa num-samples 0", ["build-data", "qa", "--input", "$good", "--format", "hotpotqa", "--tokenizer", "$tiny",
                          "--num-samples", "0", "--output", "@o.jsonl"], "--num-samples 0: must be positive"),
    ("qa broken json", ["build-data", "qa", "--input", "@broken.json", "--format", "hotpotqa", "--tokenizer", "$tiny",
                        "--output", "@o.jsonl"], "broken.json:7: not valid JSON (Expecting ',' delimiter"),
    ("squad output exists", ["build-data", "squad", "--input", "@broken.json", "--tokenizer", "$tiny",
                             "--output", "@exists.jsonl"], "already exists"),
    ("extract top-k 0", EXTRACT + ["--input", "$good", "--top-k", "0", "--output", "@o.jsonl"], "--top-k 0: must be"),
    ("extract chunk-size -1", EXTRACT + ["--input", "$good", "--chunk-size", "-1", "--output", "@o.jsonl"],
     "--chunk-size -1: must be positive"),
    ("extract bad jsonl line", EXTRACT + ["--input", "$bad_line", "--output", "@o.jsonl"],
     "bad_line.jsonl:4: not valid JSON"),
    ("extract not utf-8", EXTRACT + ["--input", "@latin1.jsonl", "--output", "@o.jsonl"],
     r"latin1.jsonl:2: byte b'\xe9' is not UTF-8"),
    ("extract empty file", EXTRACT + ["--input", "@empty.jsonl", "--output", "@o.jsonl"], "empty.jsonl is empty"),
    ("extract self missing model", ["build-data", "extract", "--input", "$good", "--extractor", "self", "--model",
                                    "@missing", "--output", "@o.jsonl"], "missing' does not exist"),
    ("extract self not a model", ["build-data", "extract", "--input", "$good", "--extractor", "self", "--model",
                                  "@not_a_model", "--output", "@o.jsonl"], "has no config.json"),
    ("eval limit -2", EVAL + ["--limit", "-2", "--output-dir", "@e"], "--limit -2: must be positive"),
    ("eval limit 0", EVAL + ["--limit", "0", "--output-dir", "@e"], "--limit 0: must be positive"),
    ("eval max-new-tokens 0", EVAL + ["--max-new-tokens", "0", "--output-dir", "@e"], "--max-new-tokens 0: must be"),
    ("eval batch-size 0", EVAL + ["--batch-size", "0", "--output-dir", "@e"], "--batch-size 0: must be positive"),
    ("eval output not empty", EVAL + ["--output-dir", "@used"], "used' is not empty; pass another folder, or --overw"),
    ("eval output is a file", EVAL + ["--output-dir", "@exists.jsonl"], "exists.jsonl' is a file; pass a folder"),
    ("eval group-by missing", EVAL + ["--group-by", "task,domain", "--output-dir", "@e"],
     "--group-by 'task,domain': the data has no column ['domain']"),
    ("eval columns missing", EVAL + ["--columns", "prompt,short", "--output-dir", "@e"], "no column ['short']"),
    ("eval bad data line", ["eval", "--model", "$tiny", "--data", "$bad_line", "--output-dir", "@e"],
     "bad_line.jsonl:4: not valid JSON"),
    ("eval missing model", ["eval", "--model", "@missing", "--tokenizer", "$tiny", "--data", "$good",
                            "--output-dir", "@e"], "--model '"),
    ("eval corrupt weights", ["eval", "--model", "$corrupt", "--data", "$good", "--output-dir", "@e"],
     "model.safetensors is not a readable safetensors file"),
    ("plan generation-batch-size -3", PLAN + ["--generation-batch-size", "-3"], "--generation-batch-size -3: must be"),
    ("plan generation-batch-size 0", PLAN + ["--generation-batch-size", "0"], "--generation-batch-size 0: must be"),
    ("plan context-length 0", PLAN[:-1] + ["0"], "--context-length 0: must be positive"),
    ("plan batch-size -1", PLAN + ["--batch-size", "-1"], "--batch-size -1: must be positive"),
    ("plan num-gpus 0", PLAN + ["--num-gpus", "0"], "--num-gpus 0: must be positive"),
    ("plan gpu memory 0", PLAN + ["--gpu-memory-gib", "0"], "--gpu-memory-gib 0.0: must be positive"),
    ("train missing model", TRAIN + ["--model_name_or_path", "@missing", "--dataset_name", "$good", "--output_dir",
                                     "@t"], "--model_name_or_path '"),
    ("train bad data line", TRAIN + ["--model_name_or_path", "$tiny", "--dataset_name", "$bad_line", "--output_dir",
                                     "@t"], "bad_line.jsonl:4: not valid JSON"),
    ("train batch size 0", ["train", "--bf16", "False", "--report_to", "none", "--per_device_train_batch_size", "0",
                            "--model_name_or_path", "$tiny", "--dataset_name", "$good", "--output_dir", "@t"],
     "per_device_train_batch_size=0 must be a positive integer"),
    ("train dataset too small", TRAIN[:-1] + ["8", "--model_name_or_path", "$tiny", "--dataset_name", "$good",
                                              "--output_dir", "@t"], "train_dataset has 4 rows, fewer than one gen"),
    ("train corrupt weights", TRAIN + ["--model_name_or_path", "$corrupt", "--dataset_name", "$good", "--output_dir",
                                       "@t"], "model.safetensors is not a readable safetensors file"),
    ("train empty file", TRAIN + ["--model_name_or_path", "$tiny", "--dataset_name", "@empty.jsonl", "--output_dir",
                                  "@t"], "empty.jsonl is empty: it holds no rows"),
    ("train not utf-8", TRAIN + ["--model_name_or_path", "$tiny", "--dataset_name", "@latin1.jsonl", "--output_dir",
                                 "@t"], "latin1.jsonl:2: byte"),
    ("eval unknown suffix", ["eval", "--model", "$tiny", "--data", "@rows.txt", "--format", "longbench",
                             "--output-dir", "@e"], "rows.txt' is a .txt file; a local dataset must be one of"),
    ("demo output not empty", ["demo", "--output-dir", "@used"], "used' is not empty; pass another folder, or --ov"),
]  # fmt: skip


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("argv,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_before_the_work(files, capsys, argv, message):
    argv = _expand(argv, files)
    before = sorted(p.name for p in files["root"].iterdir())
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert code == 2 and len(errors) == 1, err
    assert errors[0].startswith(f"trl-opsdl {argv[0]}: error: ") and message in errors[0], errors[0]
    assert sorted(p.name for p in files["root"].iterdir()) == before  # nothing was written
    assert (files["root"] / "used" / "metrics.json").read_text() == "{}"  # nor overwritten


def test_overwrite_replaces_an_earlier_output(files, capsys):
    output = files["root"] / "again.jsonl"
    argv = _expand(RULER + ["--num-samples", "1", "--output", str(output)], files)
    assert main(argv) == 0
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


def test_eval_overwrite_removes_the_earlier_runs_files_only(files, capsys, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "accuracy_vs_length_old_column.png").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    argv = _expand(EVAL + ["--max-new-tokens", "2", "--output-dir", str(out)], files)
    assert main(argv) == 2
    assert main(argv + ["--overwrite"]) == 0
    assert not (out / "accuracy_vs_length_old_column.png").exists()  # a plot of a column this run lacks
    assert (out / "notes.txt").read_text() == "mine" and (out / "metrics.json").exists()


def test_demo_overwrite_clears_the_earlier_demos_files_only(tmp_path):
    from trl_opsdl.demo.config import DemoConfig
    from trl_opsdl.demo.toy import prepare_output_dir

    (tmp_path / "model").mkdir()  # from an earlier --save-model run
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        prepare_output_dir(DemoConfig(output_dir=str(tmp_path)))
    prepare_output_dir(DemoConfig(output_dir=str(tmp_path), overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
