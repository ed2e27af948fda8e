"""Documents only → self-instructed pairs: spans, the model's questions, the filters and the long/short prompts.

Most tests drive the builder with a scripted generator (`Stub`) whose replies depend only on the prompt, so every
filter can be hit on purpose; the command-line tests run real generation on tiny models built from the BPE + ChatML
fixture of `tests/real_fixtures.py`.
"""

import json
import random
import re

import pytest

from tests.real_fixtures import bpe_chat_tokenizer, save_bpe_chat_model
from trl_opsdl.cli import main
from trl_opsdl.data.self_instruct import (
    FILTERS,
    SelfInstructReport,
    answer_with_span,
    build_self_instruct,
    candidate_spans,
    copies_span,
    draw_document_spans,
    draw_spans,
    drop_by_text,
    drop_closed_book,
    drop_inconsistent,
    drop_low_logprob,
    grounded,
    load_documents,
    load_question_template,
    parse_question,
    same_answer,
    write_questions,
)
from trl_opsdl.tokenization import count_tokens, prompt_ids, prompt_text


_TOWNS = ["Avel", "Brisk", "Corma", "Dunhal", "Elsway", "Farrow"]
_PEOPLE = ["Mara Quill", "Tomas Reed", "Ina Voss", "Paul Oder", "Lena Sarr", "Ugo Lint", "Ada Mole", "Rik Tane"]
_FACT = re.compile(r"The (\w+) of (\w+) number (\d+) was built in (\d+) by (\w+ \w+)\.")


def documents(num_documents=6, paragraphs=8, seed=0) -> list[str]:
    """Made-up documents: paragraph p of each states when and by whom thing number p of its town was built."""
    rng = random.Random(seed)
    docs = []
    for d in range(num_documents):
        parts = []
        for p in range(paragraphs):
            filler = " ".join(
                rng.choice(["It", "is", "old", "and", "near", "the", "river", "hill"]) for _ in range(24)
            )
            parts.append(
                f"The mill of {_TOWNS[d]} number {p} was built in {rng.randint(1500, 1990)} by "
                f"{rng.choice(_PEOPLE)}. {filler}. Visitors of {_TOWNS[d]} often talk about it."
            )
        docs.append("\n\n".join(parts))
    return docs


def _text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


class Stub:
    """Scripted replies keyed on paragraph number p of the span (p mod 8 picks which filter the question meets)."""

    def __init__(self, closed_book=None, all_good=False):
        self.closed_book, self.all_good = closed_book or {}, all_good

    def __call__(self, prompts):
        return [self.reply(_text(p)) for p in prompts]

    def reply(self, text):
        fact = _FACT.search(text)
        if "write one question" in text.lower():
            thing, town, p, year, person = fact.groups()
            if self.all_good:
                return f"Who built the {thing} of {town} number {p}?"
            return {
                "0": "   ",  # empty
                "1": f"Question: Tell me about the {thing} of {town} number {p}.",  # not a question
                "2": f"{fact.group(0)[:-1]}?",  # a span sentence with a question mark
                # towns 0-2: an echo naming nothing in the span; towns 3-5: one grounded question, twice repeated
                "3": "What is this text about?" if town in _TOWNS[:3] else "Who often talks about the mill?",
                "4": f"Who built the {thing} of {town} number {p}?",  # low log-prob
                "5": f"Who built the {thing} of {town} number {p}?",  # inconsistent samples
                "6": f"When was the {thing} of {town} number {p} built?",  # answerable closed-book
                "7": f"1. Who built the {thing} of {town} number {p}?\nAnswer: {person}",  # kept
            }[p]
        if text.startswith("Answer the question with a few words"):  # closed book
            return self.closed_book.get(text.split("Question: ")[-1], "It was built in 1066.")
        if fact:  # the answer given the span
            return fact.group(5) if "Who" in text.split("Question: ")[-1] else f"In {fact.group(4)}."
        return "a town"

    def logprob(self, prompts, completions):
        return [-4.0 if "number 4?" in _text(p) else -0.2 for p in prompts]

    def sample(self, prompts, k):
        return [
            [f"someone {j}" for j in range(k)] if "number 5?" in _text(p) else [self.reply(_text(p))] * k
            for p in prompts
        ]


def _stub_for(docs, all_good=False):
    """The stub, knowing the year of each paragraph 6: its closed-book answer matches the span's."""
    years = re.findall(r"The mill of (\w+) number 6 was built in (\d+)", "\n".join(docs))
    return Stub({f"When was the mill of {town} number 6 built?": f"In {year}, I think." for town, year in years},
                all_good)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_chat_tokenizer()


@pytest.fixture(scope="module")
def docs():
    return documents()


def _build(docs, tokenizer, **kwargs):
    kwargs = {"lengths": [256, 512], "num_samples": 48, "seed": 0, "span_tokens": 80, **kwargs}
    stub = kwargs.pop("generator", None) or _stub_for(docs)
    return build_self_instruct(docs, tokenizer=tokenizer, generator=stub, min_logprob=-1.0, k=3, **kwargs)


@pytest.fixture(scope="module")
def built(docs, tokenizer):
    return _build(docs, tokenizer)


def test_every_filter_is_counted(built):
    dataset, report = built
    report = report.to_dict()
    q = report["questions"]
    assert report["spans"]["drawn"] == q["generated"] == 48  # one span per paragraph
    assert q["dropped"] == {
        "empty": 6,
        "not_a_question": 6,
        "copies_span": 6,
        "not_grounded": 3,
        "duplicate": 2,
        "low_logprob": 6,
        "inconsistent": 6,
        "closed_book": 6,
    }
    assert set(q["dropped"]) == set(FILTERS)
    assert q["kept"] == 7 == q["generated"] - sum(q["dropped"].values())  # paragraph 7 of each + one of paragraph 3
    assert len(dataset) == 2 * q["kept"] == report["rows"]
    assert {name for name in report["dropped_examples"]} == set(FILTERS)
    kept = sorted(set(dataset["question"]))
    assert kept[-1] == "Who often talks about the mill?" and all(
        re.match(r"Who built the mill of \w+ number 7\?", x) for x in kept[:-1]
    )
    rows = [r for r in dataset.to_list() if "number 7" in r["question"]]
    assert all(r["answers"] and r["answers"][0] in r["span"] for r in rows)  # the model's own answer, from the span


def test_span_is_verbatim_in_its_document_and_in_both_prompts_and_the_teacher_prompt_is_shorter(
    built, docs, tokenizer
):
    dataset, _ = built
    for row in dataset.to_list():
        doc = docs[int(row["document_id"])]
        assert doc[row["span_start"] : row["span_start"] + len(row["span"])] == row["span"]
        long_text, short_text = prompt_text(tokenizer, row["prompt"]), prompt_text(tokenizer, row["teacher_prompt"])
        assert row["span"] in long_text and row["span"] in short_text
        assert row["question"] in long_text and row["question"] in short_text
        assert count_tokens(tokenizer, row["teacher_prompt"]) < count_tokens(tokenizer, row["prompt"])
        # in place: the long context holds the document's own text right before and after the span
        at = row["context"].index(row["span"])
        before = row["context"][:at].split("\n\n")[-1]
        assert doc[: row["span_start"]].endswith(before)


def test_long_prompt_length_is_within_5_percent_of_the_target(built, tokenizer):
    dataset, _ = built
    for row in dataset.to_list():
        measured = count_tokens(tokenizer, row["prompt"])  # independent of the builder's own count
        assert measured == row["prompt_tokens"]
        assert abs(measured - row["length"]) <= 0.05 * row["length"], (measured, row["length"])


def test_past_the_document_ends_other_documents_fill_the_long_prompt(tokenizer):
    docs = documents(num_documents=6, paragraphs=3)  # ~160 tokens each: 700 needs other documents
    dataset, _ = _build(docs, tokenizer, lengths=[700], num_samples=12, generator=_stub_for(docs, all_good=True))
    assert len(dataset)
    for row in dataset.to_list():
        towns = {town for town in _TOWNS if f"of {town} number" in row["context"]}
        assert len(towns) >= 3
        assert abs(row["prompt_tokens"] - 700) <= 35


def test_builder_is_deterministic_for_a_seed(docs, tokenizer):
    one = _build(docs, tokenizer, num_samples=20, seed=1)
    two = _build(docs, tokenizer, num_samples=20, seed=1)
    other = _build(docs, tokenizer, num_samples=20, seed=2)
    assert one[0].to_list() == two[0].to_list() and one[1] == two[1]
    assert [r["span_start"] for r in one[0].to_list()] != [r["span_start"] for r in other[0].to_list()]


def test_spans_skip_headings_number_lists_and_boilerplate(tokenizer):
    story = "The mill of Avel number 3 was built in 1850 by Mara Quill. It stood near the river and the old hill. " * 2
    text = "\n\n".join(
        [
            "Chapter One",  # a heading
            story,
            "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25",  # numbers
            "Copyright 2024 by the mill company of Avel. All rights reserved. Reproduction of any part of this "
            "text without written permission of the publisher is not allowed in any form.",  # boilerplate
            story.replace("Avel", "Brisk"),
        ]
    )
    spans, skipped = candidate_spans(text, tokenizer, span_tokens=60)
    kept = [text[s:e] for s, e in spans]
    assert all("mill of" in k and "Copyright" not in k and "Chapter" not in k for k in kept)
    assert any("Brisk" in k for k in kept) and any("Avel number 3" in k for k in kept)
    assert skipped["heading"] >= 1 and skipped["mostly_digits"] >= 1 and skipped["boilerplate"] >= 1


def test_a_text_without_blank_lines_is_not_skipped_whole_for_one_url(tokenizer):
    # (the essays have no blank lines: the whole essay is one "paragraph", and one URL in it must not skip it all)
    story = "The mill of Avel number 3 was built in 1850 by Mara Quill. It stood near the river and the old hill.\n"
    text = story * 6 + "See www.avel.example for more.\n" + story * 6
    spans, skipped = candidate_spans(text, tokenizer, span_tokens=60)
    assert len(spans) >= 4 and not any("www." in text[s:e] for s, e in spans) and skipped["boilerplate"] == 1


def test_spans_are_shared_over_documents_and_spread_over_each(docs, tokenizer):
    per_document = [candidate_spans(d, tokenizer, 80)[0] for d in docs]
    drawn = draw_spans(per_document, 12, seed=0)
    assert sorted({d for d, _, _ in drawn}) == list(range(len(docs)))  # two from each of the six documents
    for d in range(len(docs)):
        starts = [s for doc, s, _ in drawn if doc == d]
        assert min(starts) < 0.45 * len(docs[d]) < max(starts)  # one in each half: spread, not the first two
    assert drawn == draw_spans(per_document, 12, seed=0) != draw_spans(per_document, 12, seed=3)


def test_question_parsing_and_the_text_checks():
    assert parse_question("Question: Who built the mill?\nAnswer: Mara") == "Who built the mill?"
    assert parse_question('1. "When was it built?" Because...') == "When was it built?"
    assert parse_question("Sure! Here is one.\nQ: Where is Avel?") == "Where is Avel?"
    assert (
        parse_question("What a great question! How can writers avoid mistakes?") == "How can writers avoid mistakes?"
    )
    assert parse_question("What did Mr. Smith say in the U.S. Senate?") == "What did Mr. Smith say in the U.S. Senate?"
    assert parse_question("No question here") == "No question here" and parse_question("  \n ") == ""
    span = "The mill of Avel number 3 was built in 1850 by Mara Quill. It is old."
    assert copies_span("The mill of Avel number 3 was built in 1850 by Mara Quill?", span)
    assert copies_span("Was the mill of Avel number 3 built in 1850 by Mara Quill?", span)
    assert not copies_span("Who built the mill of Avel number 3?", span)
    assert grounded("Who built the mill of Avel?", span) and grounded("Who was Mara Quill's father?", span)
    assert not grounded("What is the answer to this question?", span) and not grounded("What is it?", span)
    question = "When was the mill built?"
    assert same_answer("It was built in 1850.", "In 1850, I think.", question)
    assert not same_answer("It was built in 1850.", "It was built in 1900.", question)


def test_load_documents_reads_txt_folders_jsonl_and_parquet(tmp_path, docs):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, doc in enumerate(docs[:3]):
        (folder / f"{i}.txt").write_text(doc)
    assert [d["id"] for d in load_documents(str(folder))] == ["0.txt", "1.txt", "2.txt"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": f"d{i}"}) + "\n" for i, d in enumerate(docs[:2])))
    loaded = load_documents(str(jsonl), text_column="body")
    assert [d["id"] for d in loaded] == ["d0", "d1"] and loaded[1]["text"] == docs[1]
    from datasets import Dataset

    Dataset.from_dict({"text": docs[:2]}).to_parquet(str(tmp_path / "docs.parquet"))
    assert [d["text"] for d in load_documents(str(tmp_path / "docs.parquet"))] == docs[:2]


def test_bad_inputs_name_the_value(tmp_path, docs, tokenizer):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"body": docs[0]}) + "\n")
    with pytest.raises(ValueError, match="no text column 'text'.*--text-column"):
        load_documents(str(jsonl))
    with pytest.raises(ValueError, match="does not exist"):
        load_documents(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt files"):
        load_documents(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="num_samples must be positive"):
        _build(docs, tokenizer, num_samples=0)
    with pytest.raises(ValueError, match="fewer than the length 100000"):
        _build(docs, tokenizer, lengths=[100000])
    with pytest.raises(ValueError, match=r"format string with \{span\}"):
        _build(docs, tokenizer, template="Ask about {context}")
    with pytest.raises(ValueError, match="needs a generator with a logprob"):
        build_self_instruct(docs, tokenizer=tokenizer, generator=lambda p: p, min_logprob=-1.0, lengths=[256])
    with pytest.raises(ValueError, match="more than half the shortest length"):
        _build(docs, tokenizer, span_tokens=200, lengths=[256])


# --- the steps, one at a time ---------------------------------------------------------------------------------------


def _report(**fields):
    return SelfInstructReport(settings={}, lengths=[256], **fields)


def test_spans_step_fills_the_report_and_returns_the_drawn_spans_verbatim(docs, tokenizer):
    report = _report()
    texts = draw_document_spans([{"id": str(i), "text": d} for i, d in enumerate(docs)], tokenizer, 80, 10, 0, report)
    per_document = [candidate_spans(d, tokenizer, 80)[0] for d in docs]
    assert report.drawn == draw_spans(per_document, 10, seed=0) and len(texts) == 10
    assert report.span_candidates == sum(map(len, per_document)) == 48
    assert texts == [docs[d][s:e] for d, s, e in report.drawn]
    with pytest.raises(ValueError, match="No span with content"):
        draw_document_spans([{"id": "0", "text": "Chapter One"}], tokenizer, 80, 10, 0, _report())


def test_questions_step_asks_per_span_as_a_user_turn_or_plain_text_and_parses_the_replies():
    asked = []

    def generator(prompts):
        asked.extend(prompts)
        return ["Question: Who built it?\nAnswer: Mara", "no question"]

    report = _report()
    assert write_questions(generator, ["span one", "span two"], "Ask: {span}", True, report) == [
        "Who built it?",
        "no question",
    ]
    assert asked == [[{"role": "user", "content": "Ask: span one"}], [{"role": "user", "content": "Ask: span two"}]]
    assert report.raw_questions[0].startswith("Question:") and report.questions == ["Who built it?", "no question"]
    write_questions(generator, ["span one"], "Ask: {span}", False, _report())
    assert asked[-1] == "Ask: span one"


def test_text_filters_drop_each_question_by_its_first_failing_check():
    span = "The mill of Avel number 3 was built in 1850 by Mara Quill. It is old."
    questions = [
        "",
        "Tell me about the mill.",
        "The mill of Avel number 3 was built in 1850 by Mara Quill?",
        "What is the answer to this question?",
        "Who built the mill of Avel?",
        "Who built the mill of Avel?",
    ]
    report = _report(questions=questions)
    assert drop_by_text([span] * len(questions), report) == [4]
    expected = {"empty": [0], "not_a_question": [1], "copies_span": [2], "not_grounded": [3], "duplicate": [5]}
    assert {name: ids for name, ids in report.dropped.items() if ids} == expected


class _Answers:
    """Replies by prompt: the answer given the span, samples, log-probs and closed-book answers, scripted."""

    def __call__(self, prompts):
        return ["In 1850." if isinstance(p, list) and "Avel" in _text(p) else "In 1066." for p in prompts]

    def logprob(self, prompts, completions):
        return [-0.1 if "Avel" in _text(p) else -3.0 for p in prompts]

    def sample(self, prompts, k):
        return [["In 1850, yes."] * k if "Avel" in _text(p) else ["No idea."] * k for p in prompts]


def test_model_filters_record_what_they_learn_and_drop_by_their_threshold():
    questions = ["When was the mill of Avel built?", "When was the mill of Brisk built?"]
    teacher = {0: [{"role": "user", "content": "Avel mill. " + questions[0]}], 1: [{"role": "user", "content": "x"}]}
    report, generator = _report(questions=questions), _Answers()
    answer_with_span(generator, teacher, [0, 1], 8, report)
    assert report.answers == {0: "In 1850.", 1: "In 1066."}
    assert drop_low_logprob(generator, teacher, [0, 1], -1.0, report) == [0]
    assert report.dropped["low_logprob"] == [1] and report.logprobs == {0: -0.1, 1: -3.0}
    assert drop_inconsistent(generator, teacher, [0, 1], 2, 0.5, 8, report) == [0]
    assert report.dropped["inconsistent"] == [1] and report.agreement == {0: 1.0, 1: 0.0}
    # closed book, no context: "In 1066." for both; question 1's answer given the span was the same, so it goes
    assert drop_closed_book(generator, [0, 1], False, 8, report) == [0]
    assert report.dropped["closed_book"] == [1] and report.closed_book_answers == {0: "In 1066.", 1: "In 1066."}


def test_report_writes_its_dict_and_a_template_file_needs_a_span_field(tmp_path, built):
    _, report = built
    path = report.write(str(tmp_path / "out" / "pairs.jsonl.report.json"))
    assert json.loads(open(path).read()) == json.loads(json.dumps(report.to_dict()))
    assert [o["outcome"] for o in report.to_dict()["outcomes"]].count("kept") == len(report.kept) == 7
    (tmp_path / "t.txt").write_text("Ask about {span}")
    assert load_question_template(str(tmp_path / "t.txt")) == "Ask about {span}"
    assert load_question_template("base").endswith("Question:")
    (tmp_path / "bad.txt").write_text("Ask about {context}")
    with pytest.raises(ValueError, match="has no {span} field"):
        load_question_template(str(tmp_path / "bad.txt"))


# --- the command line, with real generation on tiny models ----------------------------------------------------------


def scripted_chat_model(path, reply: str) -> str:
    """A Llama with the BPE chat tokenizer whose greedy reply to any chat prompt is `reply` then `<|im_end|>`: its
    layers add nothing (zero output projections), so the last hidden state is the last token's one-hot embedding, and
    the output head maps each token to the next one of the script."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = bpe_chat_tokenizer()
    vocab = len(tokenizer)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=vocab + 8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, head_dim=(vocab + 8) // 4, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    start = prompt_ids(tokenizer, [{"role": "user", "content": "x"}])
    script = [start[-1]] + tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(set(script[:-1])) == len(script) - 1, "a scripted token repeats: the next token would be ambiguous"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, config.hidden_size))
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for token, following in zip(script, script[1:]):
            model.lm_head.weight[following, token] = 1.0  # logit ~ sqrt(hidden): the script wins by far
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _cli(capsys, *argv):
    code = main(["build-data", "self-instruct", *argv])
    return code, capsys.readouterr()


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, doc in enumerate(documents(num_documents=4, paragraphs=4)):
        (folder / f"doc{i}.txt").write_text(doc)
    return str(folder)


def test_cli_end_to_end_on_a_tiny_chat_model(tmp_path, folder, capsys):
    model = scripted_chat_model(tmp_path / "model", "Who built it?")
    out = str(tmp_path / "pairs.jsonl")
    args = ["--documents", folder, "--model", model, "--lengths", "256,400", "--num-samples", "6", "--seed", "0",
            "--span-tokens", "100", "--min-logprob", "-1", "--k", "2", "--max-new-tokens", "12", "--output", out]  # fmt: skip
    # Every reply is "Who built it?": the answers with and without the span agree, so the closed-book filter drops
    # the one question left after de-duplication, and the command says so (the report is written all the same).
    code, captured = _cli(capsys, *args)
    assert code == 2 and "Every question was filtered out" in captured.err
    report = json.loads(open(out + ".report.json").read())
    assert report["questions"]["dropped"]["duplicate"] == 5 and report["questions"]["dropped"]["closed_book"] == 1
    code, captured = _cli(capsys, *args, "--no-closed-book", "--overwrite")
    assert code == 0, captured.err
    rows = [json.loads(line) for line in open(out)]
    report = json.loads(open(out + ".report.json").read())
    assert report["questions"]["kept"] == 1 and len(rows) == 2 == report["rows"]
    assert report["answer_logprob"]["min"] > -1  # the scripted reply is near certain
    assert {r["question"] for r in rows} == {"Who built it?"} and all(r["answers"] == ["Who built it?"] for r in rows)
    code, captured = _cli(capsys, *args, "--no-closed-book")
    assert code == 2 and f"--output {out!r} already exists" in captured.err


def test_cli_on_a_random_tiny_model_counts_its_garbage(tmp_path, folder, capsys):
    model = save_bpe_chat_model(tmp_path / "model")
    out = str(tmp_path / "pairs.jsonl")
    code, captured = _cli(capsys, "--documents", folder, "--model", model, "--lengths", "256", "--num-samples", "4",
                          "--span-tokens", "100", "--max-new-tokens", "8", "--output", out)  # fmt: skip
    report = json.loads(open(out + ".report.json").read())
    q = report["questions"]
    assert q["generated"] == 4 == q["kept"] + sum(q["dropped"].values())
    assert code == (0 if q["kept"] else 2)


def test_cli_bad_inputs_exit_2_before_any_model_work(tmp_path, folder, capsys):
    missing_model = str(tmp_path / "no-such-model")  # never loaded: each bad value is caught first
    base = ["--model", missing_model, "--output", str(tmp_path / "o.jsonl")]
    cases = [
        (["--documents", str(tmp_path / "nope")], "does not exist"),
        (["--documents", folder, "--num-samples", "0"], "--num-samples 0: must be positive"),
        (["--documents", folder, "--k", "0"], "--k 0: must be positive"),
        (["--documents", folder, "--template", "fancy"], "--template 'fancy' is neither"),
        (["--documents", folder, "--lengths", "0"], "--lengths [0]: lengths must be positive"),
        (["--documents", folder, "--lengths", "200"], "span_tokens=128 is more than half the shortest length 200"),
    ]
    (tmp_path / "t.txt").write_text("Ask a question about {context}")
    cases.append((["--documents", folder, "--template", str(tmp_path / "t.txt")], "has no {span} field"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    cases.append((["--documents", str(tmp_path / "d.jsonl")], "no text column 'text'"))
    for argv, message in cases:
        code, captured = _cli(capsys, *base, *argv)
        last = captured.err.strip().splitlines()[-1]  # (after datasets' progress bar, for the .jsonl)
        assert code == 2 and message in last and last.startswith("trl-opsdl build-data: error:"), captured.err
        assert "Traceback" not in captured.err
