"""Evaluation: scorers against hand-computed values, greedy generation, grouping, results files, the training
callback, and the LongBench loaders."""

import json
import logging

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import trl_opsdl.evaluation.evaluate as evaluation
from tests.conftest import kv_rows, tiny_model, tiny_tokenizer
from trl_opsdl.data import BM25Extractor
from trl_opsdl.evaluation import (
    OPSDLEvalCallback,
    choice_accuracy,
    classification_score,
    code_similarity,
    count_score,
    evaluate_dataset,
    exact_match,
    greedy_generate,
    load_longbench,
    load_longbench_v2,
    normalize_answer,
    parse_choice,
    retrieval_score,
    rouge_l,
    save_results,
    score,
    shard_indices,
    string_match_all,
    string_match_part,
    token_f1,
)


# --- scorers -----------------------------------------------------------------------------------------------------


def test_ruler_string_match_scores():
    pred = "The values are 123 and 456."
    assert string_match_all(pred, ["123", "456", "789"]) == pytest.approx(200 / 3)
    assert string_match_part(pred, ["123", "456", "789"]) == 100.0
    assert string_match_part(pred, ["789"]) == 0.0
    assert string_match_all("KELMAR is it", ["kelmar"]) == 100.0  # case-insensitive
    assert string_match_all(pred, "456") == 100.0  # a lone string is one reference


def test_squad_exact_match_and_token_f1():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("The Eiffel Tower!", ["eiffel tower"]) == 100.0
    assert exact_match("Eiffel", ["eiffel tower", "tower"]) == 0.0
    # pred -> [cat, sat, on, mat]; ref -> [cat, on, mat]: 3 shared, P = 3/4, R = 1, F1 = 6/7.
    assert token_f1("the cat sat on the mat", ["a cat on a mat"]) == pytest.approx(600 / 7)
    # The best reference counts: "paris" gives P = 1/2, R = 1 -> 2/3.
    assert token_f1("in Paris", ["London", "Paris"]) == pytest.approx(200 / 3)
    assert token_f1("", ["x"]) == 0.0
    with pytest.raises(ValueError, match="No reference answer"):
        token_f1("x", [])


def test_four_choice_accuracy():
    assert parse_choice("The correct answer is (B)") == "B"
    assert parse_choice("**The correct answer is C**") == "C"
    assert parse_choice("D) because it is") == "D"
    assert parse_choice("I think it is A or B") is None
    assert choice_accuracy("The correct answer is (B).", "B") == 100.0
    assert choice_accuracy("The correct answer is (B).", ["(C)"]) == 0.0
    with pytest.raises(ValueError, match="must be A, B, C or D, got 'E'"):
        choice_accuracy("A", "E")


def test_longbench_scorers():
    # LCS(a b c d, a c d e) = 3: P = R = 3/4.
    assert rouge_l("a b c d", ["a c d e"]) == pytest.approx(75.0)
    # Two class names appear, one is right: 1/2.
    assert classification_score("Location or Person", ["Location"], ["Location", "Person", "Number"]) == 50.0
    assert score("classification", "Number", ["Location"], {"all_classes": ["Location", "Number"]}) == 0.0
    assert retrieval_score("Paragraph 3, or maybe 5", ["Paragraph 3"]) == 50.0
    assert count_score("4 unique, I said 4", ["4"]) == 100.0 and count_score("3 or 4", ["4"]) == 50.0
    assert code_similarity("# a comment\nx = 1", ["x = 1"]) == 100.0
    with pytest.raises(ValueError, match="Unknown metric 'bleu'"):
        score("bleu", "a", ["a"])


# --- generation ----------------------------------------------------------------------------------------------------


def test_greedy_generate_batches_with_left_padding_like_one_by_one():
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    model.train()
    prompts = [row["prompt"] for row in kv_rows(3)] + ["w1 w2"]
    one_by_one = [greedy_generate(model, tokenizer, [p], 4)[0] for p in prompts]
    batched = greedy_generate(model, tokenizer, prompts, 4, batch_size=3)
    assert batched == one_by_one
    assert model.training  # the caller's mode is restored
    # Only the new tokens are decoded: the same as generate() on one prompt, sliced by hand.
    ids = tokenizer(prompts[0], return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert one_by_one[0] == tokenizer.decode(out[0, ids.size(1) :], skip_special_tokens=True).strip()
    # Conversational prompts go through the chat template with a generation prompt.
    messages = [{"role": "user", "content": "w1 w2"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert greedy_generate(model, tokenizer, [messages], 4) == greedy_generate(model, tokenizer, [rendered], 4)
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        no_pad = tiny_tokenizer(pad=False)
        no_pad.eos_token = None
        greedy_generate(model, no_pad, prompts, 4)


# --- evaluate_dataset ---------------------------------------------------------------------------------------------


ROWS = [
    {"prompt": "p0", "teacher_prompt": "t0", "answers": ["42"], "task": "niah_single", "length": 1024},
    {"prompt": "p1", "teacher_prompt": "t1", "answers": ["7", "8"], "task": "niah_single", "length": 1024},
    {"prompt": "p2", "teacher_prompt": "t2", "answers": ["x"], "task": "vt", "length": 1024},
    {"prompt": "p3", "teacher_prompt": "t3", "answers": ["the cat"], "task": "hotpotqa", "length": 4096},
    {"prompt": "p4", "teacher_prompt": "t4", "answers": [], "task": "hotpotqa", "length": 4096},
]
ANSWERS = {
    "p0": "42",  # 100
    "p1": "7 only",  # 50 (one of two)
    "p2": "y",  # 0
    "p3": "a cat",  # token F1: [cat] vs [cat] = 100
    "t0": "42",
    "t1": "7 and 8",
    "t2": "x",
    "t3": "dog",  # 0
}


@pytest.fixture
def canned(monkeypatch):
    """Generation replaced by fixed answers, to pin the grouping arithmetic."""

    def fake(model, tokenizer, prompts, max_new_tokens, batch_size=16, progress=False):
        return [ANSWERS[p] for p in prompts]

    monkeypatch.setattr(evaluation, "greedy_generate", fake)


def test_evaluate_groups_by_task_and_length(canned):
    results = evaluate_dataset(None, None, Dataset.from_list(ROWS), return_predictions=True)
    long, short = results["columns"]["prompt"], results["columns"]["teacher_prompt"]
    assert results["skipped_rows"] == 1 and results["num_rows"] == 4
    assert {(g["task"], g["length"]): g["score"] for g in long["groups"]} == {
        ("niah_single", 1024): 75.0,
        ("vt", 1024): 0.0,
        ("hotpotqa", 4096): 100.0,
    }
    assert [g["metric"] for g in long["groups"]] == ["string_match_all", "string_match_all", "token_f1"]
    # By length: the mean over tasks (RULER); overall: the mean over groups.
    assert long["by_length"] == {"1024": 37.5, "4096": 100.0}
    assert long["by_task"] == {"niah_single": 75.0, "vt": 0.0, "hotpotqa": 100.0}
    assert long["overall"] == pytest.approx(175 / 3)
    assert short["by_length"] == {"1024": 100.0, "4096": 0.0}
    assert results["gap"] == pytest.approx(175 / 3 - 200 / 3)
    assert results["predictions"][1]["prompt"] == "7 only" and results["predictions"][1]["prompt_score"] == 50.0
    # A metric for every row overrides the per-task choice.
    forced = evaluate_dataset(None, None, ROWS, metric="exact_match", group_by=("task",))
    # "42" == "42"; "7 only" is neither "7" nor "8"; "a cat" and "the cat" both normalize to "cat".
    assert forced["columns"]["prompt"]["by_task"] == {"niah_single": 50.0, "vt": 0.0, "hotpotqa": 100.0}


def test_evaluate_bad_inputs(canned, caplog):
    with pytest.raises(ValueError, match="no 'answers' column"):
        evaluate_dataset(None, None, [{"prompt": "p0"}])
    with pytest.raises(ValueError, match="cannot choose a scorer for task 'poetry'"):
        evaluate_dataset(None, None, [{"prompt": "p0", "answers": ["a"], "task": "poetry"}])
    with pytest.raises(ValueError, match="None of the prompt columns"):
        evaluate_dataset(None, None, [{"text": "p0", "answers": ["a"]}])
    with pytest.raises(ValueError, match="No row has reference answers"):
        evaluate_dataset(None, None, [{"prompt": "p0", "answers": []}])
    with caplog.at_level(logging.WARNING):
        results = evaluate_dataset(None, None, [{"prompt": "p0", "answers": ["42"], "metric": "exact_match"}])
    assert list(results["columns"]) == ["prompt"] and "teacher_prompt" in caplog.text
    assert results["group_by"] == [] and results["columns"]["prompt"]["overall"] == 100.0


def test_evaluate_a_tiny_model_and_save_metrics_and_plot(tmp_path):
    tokenizer = tiny_tokenizer()
    rows = [{**row, "task": "kv_retrieval", "length": 64 if i < 2 else 128} for i, row in enumerate(kv_rows(4))]
    results = evaluate_dataset(
        tiny_model(tokenizer), tokenizer, rows, max_new_tokens=3, batch_size=2, return_predictions=True
    )
    paths = save_results(results, str(tmp_path / "out"))
    metrics = json.loads(open(paths["metrics"]).read())
    assert set(metrics["columns"]) == {"prompt", "teacher_prompt"}
    assert {(g["task"], g["length"]) for g in metrics["columns"]["prompt"]["groups"]} == {
        ("kv_retrieval", 64),
        ("kv_retrieval", 128),
    }
    assert "predictions" not in metrics
    for plot in ("plot", "plot_prompt", "plot_teacher_prompt"):
        assert open(paths[plot], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(open(paths["predictions"]).read().splitlines()) == 4


# --- callback -----------------------------------------------------------------------------------------------------


class Reporter(TrainerCallback):
    """What a `report_to` integration sees: every `on_log` call."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def lm_trainer(tmp_path, tokenizer, callbacks, logging_steps=100):
    model = tiny_model(tokenizer)
    ids = tokenizer("w1 w2 w3 w4", return_tensors=None)["input_ids"]
    train = Dataset.from_list([{"input_ids": ids, "labels": ids}] * 4)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to="none", logging_steps=logging_steps,
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=train, callbacks=callbacks)


def test_callback_logs_long_and_short_scores_through_the_reporters(tmp_path):
    tokenizer = tiny_tokenizer()
    reporter = Reporter()
    rows = [{**row, "task": "kv_retrieval", "length": 64} for row in kv_rows(3)]
    callback = OPSDLEvalCallback(rows, tokenizer, every_n_steps=1, eval_on_start=True, max_new_tokens=2)
    trainer = lm_trainer(tmp_path, tokenizer, [reporter, callback])
    callback.set_trainer(trainer)
    trainer.train()
    evals = [log for log in reporter.logs if "eval_long/overall" in log]
    assert len(evals) == 3  # step 0 (on start), 1 and 2
    for log in evals:
        assert {"eval_short/overall", "eval_long/length_64", "eval_short/task_kv_retrieval"} <= set(log)
    assert [step for step, _ in callback.history] == [0, 1, 2]
    history = [h for h in trainer.state.log_history if "eval_long/overall" in h]
    assert [h["step"] for h in history] == [0, 1, 2]
    assert trainer.model.training  # evaluation left the model in training mode


def test_callback_keeps_the_training_log_of_the_steps_it_evaluates(tmp_path):
    """The scores go through the callback handler's `on_log`, which clears `control.should_log`: the step's own
    training log (loss, learning rate) must still be written, every `logging_steps`."""
    tokenizer = tiny_tokenizer()
    rows = [{**row, "task": "kv_retrieval", "length": 64} for row in kv_rows(2)]
    callback = OPSDLEvalCallback(rows, tokenizer, every_n_steps=1, max_new_tokens=2)
    trainer = lm_trainer(tmp_path, tokenizer, [callback], logging_steps=1)
    callback.set_trainer(trainer)
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2]
    assert [h["step"] for h in trainer.state.log_history if "eval_long/overall" in h] == [1, 2]


def test_callback_without_trainer_still_records_history(tmp_path, caplog):
    tokenizer = tiny_tokenizer()
    reporter = Reporter()
    rows = [{**row, "task": "kv_retrieval", "length": 64} for row in kv_rows(2)]
    callback = OPSDLEvalCallback(rows, tokenizer, every_n_steps=2, max_new_tokens=2)
    trainer = lm_trainer(tmp_path, tokenizer, [reporter, callback])
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert not [log for log in reporter.logs if "eval_long/overall" in log]
    assert [h["step"] for h in trainer.state.log_history if "eval_long/overall" in h] == [2]
    assert "no trainer" in caplog.text
    with pytest.raises(ValueError, match="every_n_steps must be positive"):
        OPSDLEvalCallback(rows, tokenizer, every_n_steps=0)


def test_eval_rows_are_sharded_evenly_across_ranks():
    for num_rows, world in ((10, 3), (2, 4), (7, 1)):
        shards = [shard_indices(num_rows, rank, world) for rank in range(world)]
        assert len({len(shard) for shard in shards}) == 1  # the same number of generate calls on every rank
        for rank, shard in enumerate(shards):
            own = list(range(rank, num_rows, world))
            assert shard[: len(own)] == own  # each rank generates its own rows, padding repeats a row
        assert sorted(set().union(*shards)) == list(range(num_rows))


def test_callback_generates_only_its_shard_and_scores_the_gathered_set(monkeypatch):
    import accelerate
    import accelerate.utils

    from trl_opsdl.evaluation import callback as callback_module

    rows = [row for row in ROWS if row["answers"]]  # 4 rows, 2 ranks: this is rank 1
    generated = []

    def fake(model, tokenizer, prompts, max_new_tokens, batch_size=16, progress=False):
        generated.extend(prompts)
        return [ANSWERS[p] for p in prompts]

    class Rank1:
        process_index, num_processes = 1, 2

    def gather_object(pairs):  # rank 0's completions (rows 0 and 2) arrive with ours
        return [(0, ANSWERS["p0"]), (2, ANSWERS["p2"])] + pairs

    monkeypatch.setattr(callback_module, "greedy_generate", fake)
    monkeypatch.setattr(accelerate, "PartialState", Rank1)
    monkeypatch.setattr(accelerate.utils, "gather_object", gather_object)
    callback = OPSDLEvalCallback(rows, tiny_tokenizer(), max_new_tokens=4, prompt_columns=("prompt",))
    results = callback.evaluate(None)
    assert generated == ["p1", "p3"]  # rows 1 and 3 only
    monkeypatch.setattr(evaluation, "greedy_generate", lambda m, t, prompts, *a, **k: [ANSWERS[p] for p in prompts])
    expected = evaluate_dataset(None, None, rows, prompt_columns=("prompt",), max_new_tokens=4)
    assert results["columns"] == expected["columns"] and results["num_rows"] == 4


# --- LongBench loaders ----------------------------------------------------------------------------------------------


def longbench_records():
    context = " ".join(f"w{i % 40}" for i in range(300))
    return [
        {"input": "key of w1 ?", "context": context, "answers": ["w2"], "length": 300, "dataset": "hotpotqa",
         "all_classes": None, "_id": "a"},
        {"input": "key of w3 ?", "context": context, "answers": ["w4"], "length": 5000, "dataset": "hotpotqa",
         "all_classes": None, "_id": "b"},
    ]  # fmt: skip


def test_longbench_v1_loader(tmp_path):
    path = tmp_path / "hotpotqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in longbench_records()))
    dataset = load_longbench(str(path))
    row = dataset[0]
    assert row["prompt"].startswith("Answer the question based on the given passages.")
    assert row["prompt"].endswith("Question: key of w1 ?\nAnswer:")
    assert row["metric"] == "token_f1" and dataset["length"] == ["0-4k", "4-8k"]
    tokenizer = tiny_tokenizer()
    cut = load_longbench(str(path), tokenizer=tokenizer, max_length=120, extractor=BM25Extractor(chunk_size=16))
    for row in cut:
        assert len(tokenizer(row["prompt"])["input_ids"]) <= 120
        # Cut in the middle: the head and the tail of the context survive.
        assert row["context"].startswith("w0 w1 w2") and row["context"].endswith("w17 w18 w19")
        assert row["teacher_prompt"] != row["prompt"] and row["short_context"] in row["teacher_prompt"]
    with pytest.raises(ValueError, match="does not exist"):
        load_longbench(str(tmp_path / "missing.jsonl"))
    path.write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(ValueError, match=r"lacks \['context', 'input', 'answers'\]"):
        load_longbench(str(path))


def test_longbench_v2_loader(tmp_path):
    record = {"_id": "x", "domain": "d", "difficulty": "easy", "length": "short", "question": "Which?",
              "choice_A": "w1", "choice_B": "w2", "choice_C": "w3", "choice_D": "w4", "answer": "C", "context": "ctx"}  # fmt: skip
    path = tmp_path / "v2.json"
    path.write_text(json.dumps([record]))
    row = load_longbench_v2(str(path))[0]
    assert "(A) w1\n(B) w2\n(C) w3\n(D) w4" in row["prompt"] and "<text>\nctx\n</text>" in row["prompt"]
    assert row["answers"] == ["C"] and row["metric"] == "choice_accuracy" and row["length"] == "short"
    assert score(row["metric"], "The correct answer is (C)", row["answers"]) == 100.0
    path.write_text(json.dumps([{**record, "answer": "E"}]))
    with pytest.raises(ValueError, match="answer must be A, B, C or D, got 'E'"):
        load_longbench_v2(str(path))
