"""Short-context extraction: chunking, BM25 retrieval (recall pinned on a fixed fixture), self-extraction's quote
matching, pairs from user columns, and the dataset report."""

import logging

import pytest
import torch

from tests.conftest import hotpot_records, tiny_model, tiny_tokenizer
from trl_opsdl.data import (
    BM25Extractor,
    SelfExtractor,
    build_from_columns,
    build_multidoc_qa,
    build_ruler,
    dataset_report,
    evidence_recall,
    split_chunks,
)
from trl_opsdl.data.templates import QA_TEMPLATE, render_prompt


CONTEXT = (
    "Zorbia is a country. Its capital is Kelmar.\n\n"
    "Plimb is a mountain. It is covered in snow. Goats climb it.\n\n"
    "The Ansu river flows through Kelmar."
)


def test_chunks_cover_the_context_and_respect_the_size():
    spans = split_chunks(CONTEXT, chunk_size=8)
    assert spans[0][0] == 0 and spans[-1][1] == len(CONTEXT)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # no gap, no overlap
    # Paragraphs of at most 8 words stay whole; the 11-word one is packed by sentences (4 + 5 > 8, 5 + 3 <= 8).
    assert [CONTEXT[s:e].strip() for s, e in spans] == [
        "Zorbia is a country. Its capital is Kelmar.",
        "Plimb is a mountain.",
        "It is covered in snow. Goats climb it.",
        "The Ansu river flows through Kelmar.",
    ]
    # A run-on sentence is cut into word windows.
    words = " ".join(f"w{i}" for i in range(10))
    assert [words[s:e].strip() for s, e in split_chunks(words, chunk_size=4)] == [
        "w0 w1 w2 w3",
        "w4 w5 w6 w7",
        "w8 w9",
    ]
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        split_chunks(CONTEXT, chunk_size=0)


def test_bm25_keeps_the_matching_chunks_in_context_order():
    extractor = BM25Extractor(top_k=2, chunk_size=8)
    # "river" and "kelmar" match the last paragraph; "capital" and "kelmar" the first: both kept, in context order.
    short = extractor(CONTEXT, "Which river flows near the capital Kelmar?")
    assert short == "Zorbia is a country. Its capital is Kelmar.\nThe Ansu river flows through Kelmar."
    assert BM25Extractor(top_k=1, chunk_size=8)(CONTEXT, "Which river flows near Kelmar?") == (
        "The Ansu river flows through Kelmar."
    )
    # A budget of 8 words leaves room for one 8-word chunk only.
    assert BM25Extractor(top_k=4, chunk_size=8, budget=8)(CONTEXT, "Do goats climb the snow mountain?") == (
        "It is covered in snow. Goats climb it."
    )
    # Nothing in common with the question: the first chunk, so the short context is never empty.
    assert BM25Extractor(chunk_size=8)(CONTEXT, "Zzz qqq?") == "Zorbia is a country. Its capital is Kelmar."
    with pytest.raises(ValueError, match="budget .* must be at least chunk_size"):
        BM25Extractor(chunk_size=64, budget=10)


def test_bm25_merges_adjacent_chunks_so_evidence_across_a_boundary_stays_verbatim():
    extractor = BM25Extractor(top_k=2, chunk_size=8)
    short = extractor(CONTEXT, "Is Plimb covered in snow?")
    assert short == "Plimb is a mountain. It is covered in snow. Goats climb it."
    assert evidence_recall(short, ["Plimb is a mountain. It is covered in snow."]) == 1.0


def test_bm25_evidence_recall_on_the_fixed_hotpotqa_fixture():
    tokenizer = tiny_tokenizer()
    pairs = build_multidoc_qa(hotpot_records(), "hotpotqa", tokenizer, lengths=(200,), seed=0)
    extracted = build_from_columns(pairs, extractor=BM25Extractor(top_k=2, chunk_size=64), tokenizer=tokenizer)
    # Per row: only the first-hop paragraph shares words with the question (1 of 2 gold), except record r1
    # whose two gold paragraphs both do ("tarvel phone"; "founded", "company"): (1/2 + 2/2 + 1/2) / 3.
    recalls = [evidence_recall(s, e) for s, e in zip(extracted["short_context"], extracted["evidence"])]
    assert recalls == [0.5, 1.0, 0.5]
    report = dataset_report(extracted)
    assert report["evidence_recall"] == pytest.approx(2 / 3)
    assert report["evidence_rows"] == 3
    # The teacher prompt keeps the builder's template (the long prompt's context swapped for the extracted one).
    row = extracted[0]
    assert row["teacher_prompt"] == row["prompt"].replace(row["context"], row["short_context"])
    assert report["token_ratio"] < 0.5


def test_evidence_recall_and_token_ratio_by_hand():
    assert evidence_recall("a b c\nd e", ["a  b", "e f", "d e"]) == pytest.approx(2 / 3)
    assert evidence_recall("anything", []) is None
    rows = [
        {"prompt": "w1 w2 w3 w4", "teacher_prompt": "w1", "answers": ["x"]},
        {"prompt": "w1 w2", "teacher_prompt": "w1", "answers": ["x"]},
    ]
    from datasets import Dataset

    report = dataset_report(Dataset.from_list(rows), tiny_tokenizer())
    assert report["token_ratio"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert report["compression"] == pytest.approx(6 / 2)
    assert report["mean_prompt_tokens"] == 3 and report["evidence_recall"] is None
    with pytest.raises(ValueError, match="needs a tokenizer"):
        dataset_report(Dataset.from_list(rows))


def test_from_columns_with_evidence_keeps_context_order_and_metadata():
    tokenizer = tiny_tokenizer()
    rows = [
        {
            "context": "w1 w2 . w3 w4 . w5 w6 .",
            "question": "w7 ?",
            "evidence": ["w5 w6 .", "w1 w2 ."],  # given out of order
            "answers": "w6",
            "source": "mine",
        },
        {"context": "w8 w9 .", "question": "w7 ?", "evidence": "w9", "answers": ["w9", "w8"]},
    ]
    dataset = build_from_columns(rows, tokenizer=tokenizer)
    row = dataset[0]
    assert row["short_context"] == "w1 w2 .\nw5 w6 ."
    assert row["prompt"] == render_prompt(QA_TEMPLATE, rows[0]["context"], "w7 ?", "\nAnswer:")
    assert row["teacher_prompt"] == render_prompt(QA_TEMPLATE, "w1 w2 .\nw5 w6 .", "w7 ?", "\nAnswer:")
    assert row["answers"] == ["w6"] and dataset[1]["answers"] == ["w9", "w8"]
    assert row["source"] == "mine" and row["task"] == "custom" and row["metric"] == "token_f1"
    assert row["num_tokens"] == len(tokenizer(row["prompt"])["input_ids"])
    assert row["length"] == 256  # the smallest power of two >= 256 that holds the prompt

    conversational = build_from_columns(rows, tokenizer=tokenizer, conversational=True)
    assert conversational[0]["teacher_prompt"][0]["content"].startswith("Read the text")


def test_from_columns_bad_inputs(caplog):
    rows = [
        {"context": "w1 w2 .", "question": "w3 ?", "evidence": "w1 w2"},
        {"context": "w4 w5 .", "question": "w3 ?", "evidence": "w9"},
    ]
    with pytest.raises(ValueError, match=r"Row 1: evidence 'w9' does not occur verbatim in its context"):
        build_from_columns(rows)
    with pytest.raises(ValueError, match="Column 'question' is missing; the data has \\['context'\\]"):
        build_from_columns([{"context": "w1"}])
    with pytest.raises(ValueError, match="needs an evidence column 'evidence'"):
        build_from_columns([{"context": "w1", "question": "w2"}])
    with pytest.raises(ValueError, match="Unknown extractor 'tfidf'"):
        build_from_columns(rows, extractor="tfidf")
    with pytest.raises(ValueError, match="Row 0: its evidence is empty"):
        build_from_columns([{"context": "w1", "question": "w2", "evidence": []}])
    with caplog.at_level(logging.WARNING):
        dataset = build_from_columns(
            [rows[0], {"context": " ", "question": "w3"}, {"context": "w1", "question": ""}], extractor="bm25"
        )
    assert len(dataset) == 1
    assert "1 rows with an empty context" in caplog.text and "1 rows with an empty question" in caplog.text
    with pytest.raises(ValueError, match="Every row was skipped"):
        build_from_columns([{"context": "", "question": "w3", "evidence": "x"}])


def test_from_columns_on_a_built_dataset_swaps_only_the_context():
    tokenizer = tiny_tokenizer()
    ruler = build_ruler(tokenizer, tasks=["niah_single"], lengths=(400,), num_samples=2, conversational=True)

    def first_sentence(context, question):  # any user callable
        return context.split(". ")[0] + "."

    dataset = build_from_columns(ruler, extractor=first_sentence, tokenizer=tokenizer)
    for built, row in zip(ruler, dataset):
        assert row["prompt"] == built["prompt"]
        expected = built["prompt"][0]["content"].replace(built["context"], row["short_context"])
        assert row["teacher_prompt"] == [{"role": "user", "content": expected}]
        assert row["length"] == 400 and row["task"] == "niah_single"  # the builder's metadata is kept


class QuotingModel(torch.nn.Module):
    """Stands in for a model that quotes: `generate` appends fixed token ids after the prompt."""

    def __init__(self, reply_ids):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.reply_ids = reply_ids

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        reply = torch.tensor([self.reply_ids[:max_new_tokens]] * input_ids.size(0))
        return torch.cat([input_ids, reply], dim=1)


def test_self_extraction_keeps_only_quotes_found_in_the_context():
    tokenizer = tiny_tokenizer()
    context = "w1 w2 w3 . w4 w5 w6 . w7 w8 w9 ."
    fallback_calls = []

    def fallback(c, q):
        fallback_calls.append(q)
        return "FALLBACK"

    extractor = SelfExtractor(tiny_model(tokenizer), tokenizer, fallback=fallback, progress=False)
    generation = "\n".join(
        [
            "w4 w5 w6 .",  # verbatim
            '- "W7   w8 w9"',  # bullet, quotes, case and spacing differ: matched loosely (fuzzy)
            "w1 w2 w3 x",  # one character off the first sentence: fuzzy (difflib ratio 0.86)
            "w30 w31 w32",  # invented: rejected
            "w5",  # a lone word is not a quote
        ]
    )
    short = extractor.match_quotes(context, "w0 ?", generation)
    # Touching spans merge (the first two sentences are one passage); the loose match stops before the period.
    assert short == "w1 w2 w3 . w4 w5 w6 .\nw7 w8 w9"
    assert extractor.stats == {"rows": 1, "quotes": 4, "exact": 1, "fuzzy": 2, "rejected": 1, "fallback_rows": 0}
    assert extractor.match_quotes(context, "w0 ?", "w30 w31 w32\nnothing here") == "FALLBACK"
    assert extractor.stats["fallback_rows"] == 1 and fallback_calls == ["w0 ?"]


def test_self_extraction_generates_in_batches_through_the_model():
    tokenizer = tiny_tokenizer()
    contexts = ["w1 w2 w3 . w4 w5 w6 .", "w7 w8 w9 . w4 w5 w6 ."]
    reply = tokenizer("w4 w5 w6 .", add_special_tokens=False)["input_ids"]
    extractor = SelfExtractor(QuotingModel(reply), tokenizer, max_new_tokens=8, batch_size=2, progress=False)
    assert extractor.extract_many(contexts, ["w0 ?", "w0 ?"]) == ["w4 w5 w6 .", "w4 w5 w6 ."]
    assert extractor.stats["exact"] == 2
    # A real (random) tiny model end to end: whatever it writes, every kept line is the context's own text.
    extractor = SelfExtractor(tiny_model(tokenizer), tokenizer, max_new_tokens=6, progress=False)
    for context, short in zip(contexts, extractor.extract_many(contexts, ["w0 ?", "w0 ?"])):
        assert all(line in context for line in short.split("\n"))
    assert extractor.stats["rows"] == 2
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        SelfExtractor(tiny_model(tokenizer), None)
