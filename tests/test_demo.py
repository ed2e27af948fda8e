"""The demo: the key-value builder, the demo model and its pretraining, scoring, and the demo / compare pipelines.

Accuracy thresholds are checked by running the demo (docs/demo.md), never here: these tests use tiny settings.
"""

import json
import re

import pytest
import torch

from trl_opsdl.data import build_kv_retrieval
from trl_opsdl.data.kv import kv_symbols


def _pairs(prompt: str) -> list[tuple[str, list[str]]]:
    """Parse `K.. V.. V.. V.. ... Q K..` back into (key, value tokens) pairs (the naive reference)."""
    words = prompt.split()
    assert words[-2] == "Q"
    body = words[:-2]
    return [(body[i], body[i + 1 : i + 4]) for i in range(0, len(body), 4)]


# --- the key-value builder ----------------------------------------------------------------------------------------


def test_kv_rows_answer_the_asked_key_from_the_long_context():
    ds = build_kv_retrieval(50, num_pairs=(2, 12), seed=3)
    assert ds.column_names == ["prompt", "teacher_prompt", "answers", "task", "length"]
    for row in ds:
        pairs = _pairs(row["prompt"])
        asked = row["prompt"].split()[-1]
        keys = [k for k, _ in pairs]
        assert len(set(keys)) == len(keys), "keys in one context must be distinct, else the answer is ambiguous"
        value = dict(pairs)[asked]
        assert row["answers"] == [" ".join(value)]
        assert row["teacher_prompt"] == f"{asked} {' '.join(value)} Q {asked}"
        assert row["length"] == len(pairs) and 2 <= len(pairs) <= 12
        assert row["task"] == "kv_retrieval"
        assert all(re.fullmatch(r"K\d+", k) and int(k[1:]) < 128 for k in keys)
        assert all(re.fullmatch(r"V\d+", v) and int(v[1:]) < 32 for _, vs in pairs for v in vs)


def test_kv_builder_is_deterministic_for_a_seed():
    assert build_kv_retrieval(20, 8, seed=1).to_list() == build_kv_retrieval(20, 8, seed=1).to_list()
    assert build_kv_retrieval(20, 8, seed=1)["prompt"] != build_kv_retrieval(20, 8, seed=2)["prompt"]


def test_kv_builder_fixed_length_and_conversational():
    ds = build_kv_retrieval(5, 7, seed=0, conversational=True, num_keys=10, num_values=4, value_length=2)
    assert ds["length"] == [7] * 5
    row = ds[0]
    assert row["prompt"][0]["role"] == "user" and row["teacher_prompt"][0]["role"] == "user"
    assert len(row["prompt"][0]["content"].split()) == 7 * 3 + 2
    assert len(row["answers"][0].split()) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_examples": 0}, "num_examples=0"),
        ({"num_pairs": 0}, "num_pairs=0"),
        ({"num_pairs": (5, 3)}, "low <= high"),
        ({"num_pairs": 200}, "num_keys=128"),
        ({"value_length": 0}, "value_length=0"),
        ({"num_values": 0}, "num_values=0"),
    ],
)
def test_kv_builder_rejects_bad_arguments(kwargs, message):
    kwargs = {"num_examples": 3, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        build_kv_retrieval(**kwargs)


# --- tokenizer, model, pretraining --------------------------------------------------------------------------------


def test_demo_tokenizer_one_token_per_symbol_and_reloads(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from trl_opsdl.demo import build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    row = build_kv_retrieval(1, 5, seed=0)[0]
    ids = tokenizer(row["prompt"])["input_ids"]
    assert len(ids) == 5 * 4 + 2 and tokenizer.unk_token_id not in ids  # no BOS, nothing unknown
    assert tokenizer.convert_ids_to_tokens(ids) == row["prompt"].split()
    assert len(tokenizer) == 4 + len(kv_symbols())
    tokenizer.save_pretrained(tmp_path)
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert reloaded(row["teacher_prompt"])["input_ids"] == tokenizer(row["teacher_prompt"])["input_ids"]
    assert reloaded(row["prompt"])["input_ids"] != reloaded(row["teacher_prompt"])["input_ids"]
    assert reloaded.tokenize("V1 V2 V3</s>") == ["V1", "V2", "V3", "</s>"]  # TRL appends the EOS as text


def test_demo_model_size():
    from trl_opsdl.demo import build_demo_model, build_demo_tokenizer

    vocab, hidden, inter = 165, 128, 512
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden  # attention, MLP, two RMSNorms
    model = build_demo_model(build_demo_tokenizer())  # embeddings tied to the output layer
    assert sum(p.numel() for p in model.parameters()) == vocab * hidden + 3 * per_layer + hidden  # 0.81M
    untied = build_demo_model(build_demo_tokenizer(), tie_word_embeddings=False)
    assert sum(p.numel() for p in untied.parameters()) == 2 * vocab * hidden + 3 * per_layer + hidden


def test_pretrain_batch_labels_only_answers():
    import random

    from trl_opsdl.demo.pretrain import PretrainConfig, _pretrain_batch, build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    config = PretrainConfig(batch_size=3, min_pairs=2, max_pairs=4, questions_per_sequence=2, copy_ratio=0.0)
    input_ids_BT, labels_BT = _pretrain_batch(random.Random(0), tokenizer, config)
    for ids, labels in zip(input_ids_BT.tolist(), labels_BT.tolist()):
        words = tokenizer.convert_ids_to_tokens(ids)
        labelled = [w for w, lab in zip(words, labels) if lab != -100]
        assert labels == [i if lab != -100 else -100 for i, lab in zip(ids, labels)]  # labels are the inputs
        assert len(labelled) == 2 * 4 and labelled[3] == labelled[7] == "</s>"
        q = [i for i, w in enumerate(words) if w == "Q"]
        pairs = dict(_pairs(" ".join(words[: q[0]]) + " Q x"))
        for start in q:  # each answer is the value of the key asked just before it
            assert words[start + 2 : start + 5] == pairs[words[start + 1]]


def test_pretrain_copy_rows_label_the_repeat():
    import random

    from trl_opsdl.demo.pretrain import PretrainConfig, _pretrain_batch, build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    config = PretrainConfig(batch_size=8, copy_ratio=1.0, copy_max_length=6)
    input_ids_BT, labels_BT = _pretrain_batch(random.Random(0), tokenizer, config)
    for ids, labels in zip(input_ids_BT.tolist(), labels_BT.tolist()):
        n = sum(i != tokenizer.pad_token_id for i in ids) // 2
        assert 4 <= n <= 6 and ids[:n] == ids[n : 2 * n]
        # the first token of the repeat cannot be known; every later one is the token that followed it before
        assert labels[: 2 * n] == [-100] * (n + 1) + ids[1:n]
        assert all(label == -100 for label in labels[2 * n :])


def test_pretraining_is_reproducible_and_saves_a_loadable_model(tmp_path):
    from trl_opsdl.demo import PretrainConfig, load_demo_model, pretrain_demo_model

    config = PretrainConfig(steps=3, batch_size=4, warmup_steps=1, hidden_size=16, num_layers=1)
    first, _ = pretrain_demo_model(config, tmp_path / "a", log=lambda _: None)
    second, _ = pretrain_demo_model(config, tmp_path / "b", log=lambda _: None)
    for (name, p), q in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(p, q), name
    model, tokenizer = load_demo_model(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "pretrain_config.json").read_text())["steps"] == 3
    assert torch.equal(model.lm_head.weight, first.lm_head.weight)
    assert tokenizer.eos_token == "</s>" and tokenizer.padding_side == "left"


def test_load_demo_model_missing_folder_says_how_to_rebuild(tmp_path):
    from trl_opsdl.demo import load_demo_model

    with pytest.raises(FileNotFoundError, match="pretrain_demo_model.py"):
        load_demo_model(tmp_path)


def test_shipped_demo_model_is_small_and_matches_the_recipe():
    from dataclasses import asdict

    from trl_opsdl.demo import DEMO_MODEL_DIR, PretrainConfig, load_demo_model

    size = sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir())
    assert size < 6_000_000, f"the shipped demo model is {size} bytes; keep it a few MB"
    assert json.loads((DEMO_MODEL_DIR / "pretrain_config.json").read_text()) == asdict(PretrainConfig())
    model, tokenizer = load_demo_model()
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 128
    assert len(tokenizer) == model.config.vocab_size


# --- scoring ------------------------------------------------------------------------------------------------------


class _ScriptedModel(torch.nn.Module):
    """Stands in for a model: `generate` appends scripted completions (token ids) to the left-padded prompts."""

    def __init__(self, completions):
        super().__init__()
        self.completions = completions
        self.weight = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return torch.device("cpu")

    def generate(self, input_ids, attention_mask=None, **kwargs):
        batch = [self.completions.pop(0) for _ in range(input_ids.shape[0])]
        width = max(len(c) for c in batch)
        padded = [c + [0] * (width - len(c)) for c in batch]
        return torch.cat([input_ids, torch.tensor(padded)], dim=1)


def test_kv_accuracy_needs_the_value_then_the_end_token():
    from trl_opsdl.demo import build_demo_tokenizer, kv_accuracy

    tokenizer = build_demo_tokenizer()
    ds = build_kv_retrieval(4, 3, seed=0)
    ids = [tokenizer(a[0])["input_ids"] for a in ds["answers"]]
    eos, pad, v0 = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("V0")
    completions = [
        ids[0] + [eos],  # right
        ids[1] + [pad],  # right value, but never ends (a pad is not the end token)
        ids[2][:2] + [eos, pad],  # too short
        [v0 if i != v0 else v0 + 1 for i in ids[3]] + [eos],  # wrong value
    ]
    model = _ScriptedModel(completions)
    assert kv_accuracy(model, tokenizer, {"short": ds}, batch_size=3) == {"short": 25.0}
    assert model.training  # the train/eval mode is restored


# --- the pipelines, end to end (tiny) -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_demo_model(tmp_path_factory):
    from trl_opsdl.demo import PretrainConfig, pretrain_demo_model

    path = tmp_path_factory.mktemp("demo_model")
    config = PretrainConfig(steps=2, batch_size=4, warmup_steps=1, hidden_size=16, num_layers=1)
    pretrain_demo_model(config, path, log=lambda _: None)
    return str(path)


def _tiny_config(tmp_path, model_path, **kwargs):
    from trl_opsdl.demo import DemoConfig

    settings = dict(
        output_dir=str(tmp_path / "out"), model_path=model_path, max_steps=2, batch_size=4, train_pairs=(4, 6),
        long_pairs=(8, 6), eval_examples=6, eval_batch_size=4, num_threads=1, logging_steps=1,
    )  # fmt: skip
    settings.update(kwargs)
    return DemoConfig(**settings)


@pytest.mark.slow
def test_demo_end_to_end_writes_results_and_plot(tmp_path, tiny_demo_model):
    from trl_opsdl.demo import demo_table, run_demo

    lines = []
    results = run_demo(_tiny_config(tmp_path, tiny_demo_model, short_prompt_ratio=0.5), log=lines.append)
    out = tmp_path / "out"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == results
    for key in ("before", "after"):
        assert list(on_disk[key]) == ["short", "long_6", "long_8"]  # short first, then by increasing length
        assert all(0.0 <= v <= 100.0 for v in on_disk[key].values())
    assert on_disk["settings"]["pairs"] == {"short": 4, "long_6": 6, "long_8": 8}
    assert on_disk["settings"]["short_prompt_ratio"] == 0.5 and on_disk["settings"]["max_steps"] == 2
    assert (out / "accuracy_vs_context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith("opsdl step 2/2") for line in lines), "progress must be visible"
    assert demo_table(results) in "\n".join(lines)


@pytest.mark.slow
def test_compare_end_to_end_aggregates_seeds(tmp_path, tiny_demo_model):
    from trl_opsdl.demo import COMPARE_METHODS, run_compare

    # `--compare`'s methods, plus TRL's SFT on the labels: every trainer a method can name
    methods = {**COMPARE_METHODS, "sft_gold": {"trainer": "sft_gold"}}
    assert {spec.get("trainer", "opsdl") for spec in COMPARE_METHODS.values()} == {"opsdl", "sft_self", "dpo"}
    config = _tiny_config(tmp_path, tiny_demo_model)
    results = run_compare(config, methods, seeds=(0, 1), eval_every=1, curve_examples=3, log=lambda _: None)
    out = tmp_path / "out"
    assert json.loads((out / "compare.json").read_text()) == results
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "| sft_gold |" in (out / "compare.md").read_text()
    for method in methods:
        runs = results["runs"][method]
        assert list(runs) == ["0", "1"]
        for run in runs.values():
            assert [x for x, _ in run["curve"]] == [0, 4, 8]  # training examples seen at each curve point
            assert list(run["curve"][0][1]) == ["short", "long_8"]
        values = [run["final"]["long_8"] for run in runs.values()]
        summary = results["summary"][method]["long_8"]
        assert summary["mean"] == pytest.approx(sum(values) / 2, abs=0.01)
        assert summary["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5, abs=0.01)  # sample std, n=2
    # A second comparison into the same folder would replace these files: refused before any work, nothing lost.
    before = (out / "compare.json").read_text()
    with pytest.raises(
        ValueError, match="already holds compare.json, compare.md, compare.png of an earlier --compare"
    ):
        run_compare(config, methods, seeds=(0,), log=lambda _: None)
    assert (out / "compare.json").read_text() == before


def test_cli_demo_rejects_bad_input(tmp_path, capsys):
    from trl_opsdl.cli import main

    assert main(["demo", "--model-path", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path)]) == 2
    assert "pretrain_demo_model.py" in capsys.readouterr().err
    assert main(["demo", "--compare", "--methods", "opsdl,nope", "--model-path", str(tmp_path)]) == 2
    assert "'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_demo_runs(tmp_path, tiny_demo_model):
    from trl_opsdl.cli import main

    out = tmp_path / "cli"
    argv = ["demo", "--output-dir", str(out), "--model-path", tiny_demo_model, "--max-steps", "1"]
    argv += ["--batch-size", "2", "--eval-examples", "2", "--long-pairs", "6", "--num-threads", "1", "--no-lora"]
    assert main(argv + ["--save-model"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["after"]) == ["short", "long_6"] and results["settings"]["max_steps"] == 1
    assert results["settings"]["lora"] is False  # full fine-tuning: the saved model has no adapter
    assert (out / "model" / "model.safetensors").is_file() and not (out / "model" / "adapter_config.json").exists()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--short-prompt-ratio", "2", "short_prompt_ratio=2.0"),
        ("--distillation-mode", "exact", "distillation_mode='exact'"),
        ("--max-steps", "0", "max_steps=0"),
        ("--long-pairs", "200", "num_keys=128"),
    ],
)
def test_cli_demo_bad_settings_fail_before_any_work(tmp_path, capsys, flag, value, message):
    from trl_opsdl.cli import main

    assert main(["demo", "--output-dir", str(tmp_path / "out"), flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
