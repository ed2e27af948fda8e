"""Data builders: RULER-style tasks at a target length in the user's tokens, multi-document QA with the gold
paragraphs as the short context, and their bad inputs."""

import collections
import json
import logging
import random
import re

import pytest

from tests.conftest import WORDS, bpe_tokenizer, hotpot_records, tiny_tokenizer
from trl_opsdl.data import RULER_TASKS, build_multidoc_qa, build_ruler, count_tokens, load_records, load_tokenizer
from trl_opsdl.data.lengths import largest_fitting
from trl_opsdl.data.ruler import _ALL_TEMPLATE_TEXT, DEFAULT_FILLER, FWE_NOISE, pseudo_words
from trl_opsdl.data.templates import MULTI_DOC_QA_TEMPLATE, render_prompt


@pytest.fixture(scope="module")
def bpe():
    text = [DEFAULT_FILLER, _ALL_TEMPLATE_TEXT, " ".join(pseudo_words(300)), " ".join(str(i) for i in range(1000))]
    return bpe_tokenizer(text * 3, vocab_size=1000)


def direct_count(tokenizer, prompt):
    """Token count computed without the library: the trainer tokenizes plain prompts with `tokenizer(text)`."""
    if isinstance(prompt, str):
        return len(tokenizer(prompt)["input_ids"])
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def content(prompt):
    return prompt if isinstance(prompt, str) else prompt[0]["content"]


def check_ruler_acceptance(dataset, tokenizer):
    """Answers in both prompts, length within 5%, teacher prompt at most a tenth at 4096."""
    seen = set()
    for row in dataset:
        seen.add((row["task"], row["length"]))
        prompt, teacher = content(row["prompt"]), content(row["teacher_prompt"])
        assert row["answers"], row["id"]
        for answer in row["answers"]:
            assert answer in prompt and answer in teacher, (row["id"], answer)
        n = direct_count(tokenizer, row["prompt"])
        assert n == row["num_tokens"] and n <= row["length"]
        assert abs(n - row["length"]) <= 0.05 * row["length"], (row["id"], n)
        assert direct_count(tokenizer, row["teacher_prompt"]) == row["teacher_num_tokens"]
        if row["length"] == 4096:
            assert row["teacher_num_tokens"] <= n / 10, (row["id"], row["teacher_num_tokens"])
        # The short context is the answering lines in their original order.
        cursor = 0
        for line in row["evidence"]:  # each found after the previous one (str.index raises otherwise)
            cursor = prompt.index(line, cursor) + len(line)
        assert all(line in teacher for line in row["evidence"])
    return seen


@pytest.mark.parametrize("which", ["word-level", "bpe"])
def test_ruler_acceptance_every_task_and_length(which, bpe):
    tokenizer = tiny_tokenizer() if which == "word-level" else bpe
    lengths = (512, 4096) if which == "word-level" else (1024, 4096)
    dataset = build_ruler(tokenizer, lengths=lengths, num_samples=2, seed=1)
    seen = check_ruler_acceptance(dataset, tokenizer)
    assert seen == {(t, n) for t in RULER_TASKS for n in lengths}
    assert len(dataset) == len(RULER_TASKS) * 2 * 2


def test_ruler_conversational_lengths_count_the_chat_template(bpe):
    dataset = build_ruler(bpe, tasks=["niah_single", "cwe"], lengths=(1024,), num_samples=1, conversational=True)
    check_ruler_acceptance(dataset, bpe)
    row = dataset[0]
    assert row["prompt"][0]["role"] == "user" and len(row["prompt"]) == 1
    # The chat template's own tokens are part of the count.
    assert row["num_tokens"] > len(bpe(row["prompt"][0]["content"])["input_ids"])


def test_ruler_with_vocabulary_words_lets_a_word_level_model_read_keys_and_values():
    tokenizer = tiny_tokenizer()
    words = [w for w in WORDS if w.startswith("w")]
    filler = ["b c d .", "f g h .", "j k l ."]
    dataset = build_ruler(
        tokenizer, tasks=["niah_single", "niah_multikey", "vt", "cwe"], lengths=(300,), num_samples=2, filler=filler,
        words=words, value_type="words", separate_punctuation=True, freq_common=3,
    )  # fmt: skip
    unk = tokenizer.unk_token_id
    for row in dataset:
        context_ids = tokenizer(row["context"])["input_ids"]
        for answer in row["answers"]:
            assert tokenizer.convert_tokens_to_ids(answer) in context_ids, (row["id"], answer)
        for unit in filler:
            assert unk not in tokenizer(unit)["input_ids"]
        # Only the fixed sentence words ("One of the special magic ...", "VAR", list numbers) may be unknown.
        known = [tokenizer.convert_ids_to_tokens(i) for i in context_ids if i != unk]
        assert set(known) <= set(words) | set("bcdfghjkl0123456789") | {".", ":", "=", "of", "the", "is"}


def test_ruler_is_deterministic_for_a_seed():
    tokenizer = tiny_tokenizer()
    a = build_ruler(tokenizer, lengths=(256,), num_samples=2, seed=3).to_list()
    b = build_ruler(tokenizer, lengths=(256,), num_samples=2, seed=3).to_list()
    c = build_ruler(tokenizer, lengths=(256,), num_samples=2, seed=4).to_list()
    assert a == b
    assert [r["answers"] for r in a] != [r["answers"] for r in c]


def test_niah_single_has_one_needle_at_the_requested_depths():
    tokenizer = tiny_tokenizer()
    dataset = build_ruler(tokenizer, tasks=["niah_single"], lengths=(1000,), num_samples=3)
    assert [round(d) for d in dataset["depth"]] == [0, 50, 100]
    for row in dataset:
        assert row["prompt"].count("One of the special magic numbers") == 1
        needle = f"One of the special magic numbers for {row['question'].split(' for ')[1].split(' ')[0]} is: "
        assert row["evidence"] == [needle + row["answers"][0] + "."]
        expected = render_prompt(
            "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz "
            "you about the numbers afterwards.\n{context}\n{question}",
            row["evidence"][0],
            row["question"],
            row["prompt"][row["prompt"].index(" The special magic numbers for") :],
        )
        assert row["teacher_prompt"] == expected
        value_position = row["context"].index(row["answers"][0]) / len(row["context"])
        assert abs(100 * value_position - row["depth"]) < 5


def test_niah_variants_keep_only_the_asked_needles():
    tokenizer = tiny_tokenizer()
    dataset = build_ruler(
        tokenizer, tasks=["niah_multikey", "niah_multivalue", "niah_multiquery"], lengths=(600,), num_samples=2
    )
    for row in dataset:
        needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", row["context"])
        kept = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", content(row["teacher_prompt"]))
        assert len(needles) == 4
        if row["task"] == "niah_multikey":
            assert len({k for k, _ in needles}) == 4 and len(kept) == 1 and row["answers"] == [kept[0][1]]
        elif row["task"] == "niah_multivalue":
            assert len({k for k, _ in needles}) == 1 and sorted(v for _, v in kept) == sorted(row["answers"])
        else:
            assert len(kept) == 4 and all(k in row["question"] for k, _ in needles)
        assert set(kept) <= set(needles)


def test_variable_tracking_chain_resolves_to_the_answers():
    tokenizer = tiny_tokenizer()
    dataset = build_ruler(tokenizer, tasks=["vt"], lengths=(800,), num_samples=2, num_chains=2)
    for row in dataset:
        value = re.search(r"assigned the value (\S+) in the text above", row["question"]).group(1)
        # Follow the assignments in the long context naively.
        holds = set()
        for target, source in re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\.", row["context"]):
            if source == value or source in holds:
                holds.add(target)
        assert sorted(holds) == sorted(row["answers"]) and len(holds) == 5
        assert len(re.findall(r"VAR \w+ =", row["context"])) == 10  # the second chain is a distractor
        assert row["evidence"] == [line for line in row["evidence"] if any(a in line for a in row["answers"])]


def test_common_and_frequent_words_answers_are_the_most_frequent():
    tokenizer = tiny_tokenizer()
    dataset = build_ruler(tokenizer, tasks=["cwe", "fwe"], lengths=(2048,), num_samples=2)
    for row in dataset:
        if row["task"] == "cwe":
            counts = collections.Counter(line.split(". ", 1)[1] for line in row["context"].split("\n"))
            k = 10
        else:
            counts = collections.Counter(w for w in row["context"].split() if w != FWE_NOISE)
            k = 3
        ranked = counts.most_common()
        assert sorted(row["answers"]) == sorted(w for w, _ in ranked[:k])
        assert ranked[k - 1][1] > ranked[k][1]  # a unique answer
        short_counts = collections.Counter(content(row["teacher_prompt"]).split())
        assert all(short_counts[a] == 3 for a in row["answers"])


def test_ruler_bad_inputs_say_what_to_do():
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="Unknown RULER task.*'niah_triple'"):
        build_ruler(tokenizer, tasks=["niah_triple"], lengths=(512,))
    with pytest.raises(ValueError, match="Target length 30 is shorter than the evidence of task 'vt'"):
        build_ruler(tokenizer, tasks=["vt"], lengths=(30,), num_samples=1)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        build_ruler(None, tasks=["vt"], lengths=(512,))
    with pytest.raises(ValueError, match="needs 11 distinct words, but `words` has only 8"):
        build_ruler(tokenizer, tasks=["cwe"], lengths=(512,), words=[f"w{i}" for i in range(8)])
    with pytest.raises(ValueError, match="could only reach .* tokens for a target of 2048"):
        build_ruler(tokenizer, tasks=["cwe"], lengths=(2048,), words=[f"w{i}" for i in range(40)], num_samples=1)
    with pytest.raises(ValueError, match="Unknown value_type 'ints'"):
        build_ruler(tokenizer, value_type="ints")
    with pytest.raises(ValueError, match="filler is empty"):
        build_ruler(tokenizer, tasks=["vt"], filler=[" "])
    with pytest.raises(ValueError, match="lengths must be positive"):
        build_ruler(tokenizer, tasks=["vt"], lengths=(0,))


def test_tokenizer_loading_avoids_the_word_level_trap(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    # A config naming a model type that AutoTokenizer would map to a BPE class.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded("w1 w2 key")["input_ids"] == tokenizer("w1 w2 key")["input_ids"]
    with pytest.raises(ValueError, match="No tokenizer given"):
        load_tokenizer(None)
    with pytest.raises(ValueError, match="No tokenizer found at .*missing.: it is neither a local folder"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No tokenizer could be loaded from the folder"):
        load_tokenizer(str(tmp_path / "empty"))


# --- multi-document QA -------------------------------------------------------------------------------------------


def test_qa_short_context_is_exactly_the_gold_paragraphs(tmp_path):
    path = tmp_path / "hotpot.json"
    path.write_text(json.dumps(hotpot_records()))
    tokenizer = tiny_tokenizer()
    dataset = build_multidoc_qa(str(path), "hotpotqa", tokenizer, lengths=(200,), seed=0)
    assert len(dataset) == 3
    row = dataset[0]
    gold = (
        "Document 1:\nZorbia\nZorbia is a country in the north. The capital of Zorbia is Kelmar.\n\n"
        "Document 2:\nKelmar\nKelmar is an old town. The Ansu runs past its walls."
    )
    assert row["teacher_prompt"] == render_prompt(MULTI_DOC_QA_TEMPLATE, gold, row["question"], "\nAnswer:")
    assert row["answers"] == ["Ansu"] and row["metric"] == "token_f1" and row["task"] == "hotpotqa"
    for row in dataset:
        n = direct_count(tokenizer, row["prompt"])
        assert n == row["num_tokens"] and 0.95 * 200 <= n <= 200
        for paragraph in row["evidence"]:
            assert paragraph in row["prompt"]
        # Long context: the gold paragraphs among distractors, each a numbered document.
        assert row["context"].count("Document ") > 2 and row["context"] in row["prompt"]


def test_qa_formats_musique_and_2wiki_and_files(tmp_path):
    musique = {
        "id": "m0",
        "question": "Where was the author of Blue Hills born?",
        "answer": "Tarn",
        "answer_aliases": ["Tarn City"],
        "answerable": True,
        "paragraphs": [
            {
                "idx": 0,
                "title": "Blue Hills",
                "paragraph_text": "Blue Hills was written by Ana Rell.",
                "is_supporting": True,
            },
            {"idx": 1, "title": "Kite", "paragraph_text": "A kite flies in the wind.", "is_supporting": False},
            {"idx": 2, "title": "Ana Rell", "paragraph_text": "Ana Rell was born in Tarn.", "is_supporting": True},
        ],
    }
    unanswerable = {**musique, "id": "m1", "answerable": False}
    path = tmp_path / "musique.jsonl"
    others = [
        {**musique, "id": f"x{i}", "paragraphs": [{**p, "paragraph_text": f"{p['paragraph_text']} {i}"} for p in musique["paragraphs"]]}
        for i in range(3)
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in [musique, unanswerable, *others]))
    tokenizer = tiny_tokenizer()
    dataset = build_multidoc_qa(str(path), "musique", tokenizer, lengths=(90,))
    row = dataset[0]
    assert row["answers"] == ["Tarn", "Tarn City"]
    assert row["evidence"] == [
        "Blue Hills\nBlue Hills was written by Ana Rell.",
        "Ana Rell\nAna Rell was born in Tarn.",
    ]
    assert len(dataset) == 4  # the unanswerable record is skipped

    # 2WikiMultihopQA uses HotpotQA's layout; the hub's dict-of-lists layout works too. Parquet input.
    wiki = [
        {**r, "context": {"title": [c[0] for c in r["context"]], "sentences": [c[1] for c in r["context"]]},
         "supporting_facts": {"title": [f[0] for f in r["supporting_facts"]], "sent_id": [f[1] for f in r["supporting_facts"]]}}
        for r in hotpot_records()
    ]  # fmt: skip
    from datasets import Dataset

    Dataset.from_list(wiki).to_parquet(str(tmp_path / "wiki.parquet"))
    records = load_records(str(tmp_path / "wiki.parquet"))
    dataset = build_multidoc_qa(records, "2wikimqa", tokenizer, lengths=(150,), num_samples=2)
    assert len(dataset) == 2 and dataset[0]["task"] == "2wikimqa"


def test_qa_is_deterministic_and_seed_changes_the_distractors(tmp_path):
    tokenizer = tiny_tokenizer()
    a = build_multidoc_qa(hotpot_records(), "hotpotqa", tokenizer, lengths=(200,), seed=0)
    b = build_multidoc_qa(hotpot_records(), "hotpotqa", tokenizer, lengths=(200,), seed=0)
    c = build_multidoc_qa(hotpot_records(), "hotpotqa", tokenizer, lengths=(200,), seed=1)
    assert a["prompt"] == b["prompt"] and a["prompt"] != c["prompt"]
    assert a["teacher_prompt"] == c["teacher_prompt"]


def test_qa_bad_inputs_are_errors_or_counted_skips(tmp_path, caplog):
    tokenizer = tiny_tokenizer()
    records = hotpot_records()
    with caplog.at_level(logging.WARNING):
        dataset = build_multidoc_qa(records, "hotpotqa", tokenizer, lengths=(60, 200))
    # At 60 tokens the gold paragraphs of two records do not fit: skipped and counted, the rest is built.
    assert "target length shorter than the gold paragraphs" in caplog.text
    skipped = int(re.search(r"(\d+) × target length shorter", caplog.text).group(1))
    assert len(dataset) == 6 - skipped and skipped >= 1
    with pytest.raises(ValueError, match="No row could be built"):
        build_multidoc_qa(records, "hotpotqa", tokenizer, lengths=(10,))
    with pytest.raises(ValueError, match="Unknown QA format 'squad'"):
        build_multidoc_qa(records, "squad", tokenizer)
    with pytest.raises(ValueError, match=r"lacks the field\(s\) \['paragraphs'\]"):
        build_multidoc_qa(records, "musique", tokenizer)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_multidoc_qa(str(tmp_path / "nope.jsonl"), "hotpotqa", tokenizer)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        build_multidoc_qa(records, "hotpotqa", None)
    broken = [{**records[0], "supporting_facts": [["Atlantis", 0]]}, records[1]]
    with caplog.at_level(logging.WARNING):
        dataset = build_multidoc_qa(broken, "hotpotqa", tokenizer, lengths=(100,))
    assert len(dataset) == 1 and "supporting fact's title is not among the context paragraphs" in caplog.text
    empty_question = [{**records[0], "question": "  "}, records[1]]
    assert len(build_multidoc_qa(empty_question, "hotpotqa", tokenizer, lengths=(100,))) == 1


def test_count_tokens_matches_the_trainer_tokenization():
    tokenizer = tiny_tokenizer()
    assert count_tokens(tokenizer, "w1 w2 w3") == 3
    # '<s> user : w1 w2 </s> <s> assistant : ' = 9 tokens
    assert count_tokens(tokenizer, [{"role": "user", "content": "w1 w2"}]) == 9
    with pytest.raises(ValueError, match="has no chat template"):
        count_tokens(tiny_tokenizer(chat_template=False), [{"role": "user", "content": "w1"}])


def test_length_search_matches_a_naive_scan():
    """The interpolating search for the filler amount against trying every amount, on random step functions."""
    for trial in range(200):
        rng = random.Random(trial)
        counts = [10]
        for _ in range(2000):
            counts.append(counts[-1] + rng.randint(0, 7))  # tokens added by one more unit: uneven, sometimes 0
        target = rng.randint(10, counts[-1] + 50)
        cap = rng.choice([None, rng.randint(0, 2000)])

        def count_at(n, counts=counts):
            return counts[n] if n <= 2000 else counts[-1] + (n - 2000)

        limit = cap if cap is not None else 2000 + 100
        naive = max(n for n in range(limit + 1) if count_at(n) <= target)
        assert largest_fitting(count_at, target, cap) == naive, trial
