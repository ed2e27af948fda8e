"""`examples/scripts/opsdl.py` and `trl-opsdl train`: arguments, datasets, tokenizer, accelerate configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from tests.conftest import kv_rows, tiny_model, tiny_tokenizer
from trl_opsdl import OPSDLConfig, cli
from trl_opsdl.data import load_data
from trl_opsdl.train import main, make_parser


REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "accelerate_configs"
SCRIPT = REPO / "examples" / "scripts" / "opsdl.py"


def write_rows(path, rows):
    path = Path(path)
    if path.suffix in (".json", ".jsonl"):
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    elif path.suffix == ".parquet":
        Dataset.from_list(rows).to_parquet(str(path))
    elif path.suffix == ".csv":
        Dataset.from_list(rows).to_csv(str(path), index=False)
    return str(path)


# ---- datasets -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", ".csv"])
def test_load_data_reads_local_files(tmp_path, suffix):
    rows = [{"prompt": r["prompt"], "teacher_prompt": r["teacher_prompt"]} for r in kv_rows(3)]
    dataset = load_data(write_rows(tmp_path / f"pairs{suffix}", rows), split=None)
    assert list(dataset) == ["train"]
    assert dataset["train"].to_list() == rows


def test_load_data_reads_folders(tmp_path):
    rows = [{"prompt": r["prompt"], "teacher_prompt": r["teacher_prompt"]} for r in kv_rows(3)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))  # a single split, from save_to_disk
    assert load_data(str(tmp_path / "saved"), split=None)["train"].to_list() == rows
    (tmp_path / "files").mkdir()  # a folder of data files, split by file name
    write_rows(tmp_path / "files" / "train.jsonl", rows)
    write_rows(tmp_path / "files" / "test.jsonl", rows[:1])
    dataset = load_data(str(tmp_path / "files"), split=None)
    assert sorted(dataset) == ["test", "train"] and dataset["test"].to_list() == rows[:1]


def test_load_data_names_a_missing_or_unsupported_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="'missing.jsonl' looks like a local path but does not exist"):
        load_data("missing.jsonl")
    (tmp_path / "pairs.txt").write_text("prompt")
    with pytest.raises(ValueError, match=r"pairs.txt' is a \.txt file; a local dataset must be one of"):
        load_data(str(tmp_path / "pairs.txt"))


def parse(*argv):
    return make_parser().parse_args_and_config(list(argv))


def test_main_names_a_missing_split_and_a_missing_dataset(tmp_path):
    data = write_rows(tmp_path / "pairs.jsonl", kv_rows(2))
    args = parse("--model_name_or_path", "unused", "--dataset_name", data, "--output_dir", str(tmp_path),
                 "--dataset_train_split", "validation", "--report_to", "none")  # fmt: skip
    with pytest.raises(ValueError, match=r"has splits \['train'\], not 'validation'"):
        main(*args)
    args = parse("--model_name_or_path", "unused", "--output_dir", str(tmp_path), "--report_to", "none")
    with pytest.raises(ValueError, match="No dataset: pass --dataset_name"):
        main(*args)


# ---- the command line -------------------------------------------------------------------------------------------------


def test_trl_opsdl_train_passes_every_argument_to_the_script(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("trl_opsdl.train.main", lambda *args: seen.setdefault("args", args))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"learning_rate": 3e-5, "teacher_model_kind": "ema"}))
    code = cli.main(["train", "--config", str(config), "--model_name_or_path", "m", "--dataset_name", "d.jsonl",
                     "--output_dir", str(tmp_path), "--use_peft", "--lora_r", "8", "--max_completion_length", "64",
                     "--report_to", "none"])  # fmt: skip
    assert code == 0
    script_args, training_args, model_args = seen["args"]
    assert script_args.dataset_name == "d.jsonl"
    assert isinstance(training_args, OPSDLConfig)
    assert training_args.teacher_model_kind == "ema" and training_args.learning_rate == 3e-5  # from the YAML
    assert training_args.max_completion_length == 64
    assert model_args.model_name_or_path == "m" and model_args.use_peft and model_args.lora_r == 8


def test_trl_opsdl_train_help_lists_the_script_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--dataset_name", "--teacher_prompt_column", "--teacher_model_kind", "--use_peft", "--use_vllm"):
        assert flag in out


def test_trl_opsdl_train_rejects_an_unknown_argument(capsys):
    # docs/cli.md: a bad input is one line on stderr and exit status 2, as for every subcommand.
    assert cli.main(["train", "--no_such_flag", "1", "--output_dir", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("trl-opsdl train: error:") and "--no_such_flag" in err and "\n" not in err


# ---- the accelerate configs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, distributed_type, zero_stage, offload",
    [("ddp", "MULTI_GPU", None, None), ("zero2", "DEEPSPEED", 2, "none"), ("zero3", "DEEPSPEED", 3, "none"),
     ("zero3_offload", "DEEPSPEED", 3, "cpu")],
)  # fmt: skip
def test_accelerate_config_opens_with_its_command(name, distributed_type, zero_stage, offload):
    path = CONFIGS / f"{name}.yaml"
    text = path.read_text()
    comment = [line for line in text.splitlines() if line.startswith("#")]
    assert text.startswith("#") and any(
        f"accelerate launch --config_file examples/accelerate_configs/{name}.yaml examples/scripts/opsdl.py" in line
        for line in comment
    ), f"{path} must open with the command that uses it"
    config = yaml.safe_load(text)
    assert config["distributed_type"] == distributed_type
    if zero_stage is not None:
        ds = config["deepspeed_config"]
        assert ds["zero_stage"] == zero_stage and ds["offload_param_device"] == offload
        if zero_stage == 3:
            assert ds["zero3_save_16bit_model"] is True  # otherwise save_model writes no weights under ZeRO-3


def test_example_script_docstring_points_to_existing_configs():
    text = SCRIPT.read_text()
    for name in ("ddp", "zero2", "zero3", "zero3_offload"):
        assert f"{name}.yaml" in text and (CONFIGS / f"{name}.yaml").exists()


# ---- end to end ---------------------------------------------------------------------------------------------------------


def save_tiny_qwen2(path):
    """A qwen2-typed folder with a word-level tokenizer: the host notes' tokenizer trap."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer()
    llama = tiny_model(tokenizer)
    config = Qwen2Config(**{k: getattr(llama.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "pad_token_id", "bos_token_id", "eos_token_id")}, tie_word_embeddings=False)  # fmt: skip
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_example_script_trains_lora_on_a_qwen2_folder_and_saves(tmp_path):
    model_dir = save_tiny_qwen2(tmp_path / "model")
    data = write_rows(tmp_path / "pairs.jsonl", kv_rows(4))
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--model_name_or_path", model_dir, "--dataset_name", data,
               "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
               "--max_completion_length", "4", "--gradient_checkpointing", "false", "--report_to", "none",
               "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2", "--use_peft", "--lora_r", "4",
               "--lora_target_modules", "q_proj", "v_proj"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    logs = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    first = logs[0]
    # kv_rows: 6 facts of 5 words + a 6-word question; the teacher keeps one fact. A Qwen2Tokenizer rebuilt from
    # the model type would split these words into byte-level pieces and drop the content words.
    assert first["opsdl/prompt_length"] == 36 and first["opsdl/teacher_prompt_length"] == 11
    assert first["opsdl/reverse_kl"] > 0


def test_the_script_takes_context_gradient(tmp_path):
    _, config, _ = parse("--dataset_name", "x.jsonl", "--output_dir", str(tmp_path), "--context_gradient", "none")
    assert config.context_gradient == "none" and config.context_prefill_chunk_size == 4096
