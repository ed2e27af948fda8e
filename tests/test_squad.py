"""The real-document builder (SQuAD-format articles → long/short pairs) and the scorers of generative readers."""

import json
import math

import pytest

from tests.real_fixtures import bpe_chat_tokenizer, squad_articles, write_squad
from trl_opsdl.data.squad import build_squad_pairs, load_squad, split_articles
from trl_opsdl.evaluation import contains_answer, token_f1
from trl_opsdl.tokenization import count_tokens, prompt_text


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_chat_tokenizer()


@pytest.fixture(scope="module")
def articles():
    return load_squad(squad_articles(num_articles=6, paragraphs=8))


def test_load_squad_reads_articles_paragraphs_and_questions(tmp_path, articles):
    path = write_squad(tmp_path / "squad.json", num_articles=2, paragraphs=3)
    loaded = load_squad(path)
    assert [len(a["paragraphs"]) for a in loaded] == [3, 3]
    q = loaded[0]["questions"][0]
    assert q["answers"] and q["answers"][0] in loaded[0]["paragraphs"][q["paragraph"]]


def test_gold_paragraph_is_in_both_prompts_and_the_long_one_is_longer(tokenizer, articles):
    rows = build_squad_pairs(articles, tokenizer, lengths=[256, 512], num_samples=10, seed=0).to_list()
    by_id = {(a["title"], q["question"]): a["paragraphs"][q["paragraph"]] for a in articles for q in a["questions"]}
    for row in rows:
        gold = by_id[(row["article"], row["question"])]
        assert gold in prompt_text(tokenizer, row["prompt"])
        assert gold in prompt_text(tokenizer, row["teacher_prompt"])
        assert row["question"] in prompt_text(tokenizer, row["prompt"])
        assert count_tokens(tokenizer, row["teacher_prompt"]) < count_tokens(tokenizer, row["prompt"])


def test_long_prompt_length_is_within_5_percent_of_the_target(tokenizer, articles):
    rows = build_squad_pairs(articles, tokenizer, lengths=[256, 512, 900], num_samples=12, seed=3).to_list()
    for row in rows:
        measured = count_tokens(tokenizer, row["prompt"])  # independent of the builder's own count
        assert measured == row["prompt_tokens"]
        assert abs(measured - row["length"]) <= 0.05 * row["length"], (measured, row["length"])


def test_past_the_article_end_filler_comes_from_other_articles_of_the_same_split(tokenizer, articles):
    train, held = split_articles(articles, 2, seed=0)
    held_text = " ".join(p for a in held for p in a["paragraphs"])
    rows = build_squad_pairs(train, tokenizer, lengths=[1500], num_samples=4, seed=0).to_list()
    for row in rows:  # an 8-paragraph article is ~700 tokens: 1,500 needs other articles, never held-out ones
        text = prompt_text(tokenizer, row["prompt"])
        assert not any(p[:60] in text for a in held for p in a["paragraphs"]), held_text[:80]
        assert sum(a["title"].split("_")[0] in text for a in train) >= 2


def test_no_article_is_in_both_splits_and_the_split_is_seeded(articles):
    train, held = split_articles(articles, 2, seed=5)
    assert len(held) == 2 and len(train) == len(articles) - 2
    assert not {a["title"] for a in train} & {a["title"] for a in held}
    assert [a["title"] for a in split_articles(articles, 2, seed=5)[1]] == [a["title"] for a in held]
    assert [a["title"] for a in split_articles(articles, 2, seed=6)[1]] != [a["title"] for a in held]


def test_builder_is_deterministic_for_a_seed(tokenizer, articles):
    one = build_squad_pairs(articles, tokenizer, lengths=[300], num_samples=8, seed=1).to_list()
    two = build_squad_pairs(articles, tokenizer, lengths=[300], num_samples=8, seed=1).to_list()
    other = build_squad_pairs(articles, tokenizer, lengths=[300], num_samples=8, seed=2).to_list()
    assert one == two
    assert [r["prompt"] for r in one] != [r["prompt"] for r in other]


def test_the_gold_paragraph_depth_varies_with_the_seed(tokenizer, articles):
    rows = build_squad_pairs(articles, tokenizer, lengths=[600], num_samples=20, seed=0).to_list()
    depths = [r["depth"] for r in rows]
    assert min(depths) < 0.3 and max(depths) > 0.7


def test_system_prompt_and_chat_template_are_applied(tokenizer, articles):
    rows = build_squad_pairs(articles, tokenizer, lengths=[300], num_samples=2, system_prompt="Be brief.").to_list()
    assert rows[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    text = prompt_text(tokenizer, rows[0]["teacher_prompt"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    default = build_squad_pairs(articles, tokenizer, lengths=[300], num_samples=1).to_list()[0]
    assert "You are a helpful AI assistant." in prompt_text(tokenizer, default["prompt"])  # the template's default
    plain = build_squad_pairs(articles, tokenizer, lengths=[300], num_samples=1, conversational=False).to_list()[0]
    assert isinstance(plain["prompt"], str)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lengths": [0]}, "lengths must be positive"),
        ({"lengths": [512], "num_samples": 0}, "num_samples must be positive"),
        ({"lengths": [512], "num_samples": 10**6}, "exceeds"),
        ({"lengths": [40], "max_gold_tokens": 10**4}, "not longer than the short prompt"),
        ({"lengths": [512], "max_gold_tokens": 1}, "No question"),
    ],
)
def test_builder_bad_inputs_name_the_value(tokenizer, articles, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_squad_pairs(articles, tokenizer, **kwargs)


def test_load_squad_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_squad(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a UTF-8 JSON"):
        load_squad(str(bad))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="SQuAD format"):
        load_squad(str(wrong))
    with pytest.raises(ValueError, match="paragraph 0: 'context' must be non-empty"):
        load_squad({"data": [{"title": "t", "paragraphs": [{"context": "  ", "qas": []}]}]})
    with pytest.raises(ValueError, match="num_eval_articles=3 must be between 1 and 1"):
        split_articles([{}, {}], 3)


@pytest.mark.parametrize(
    "reply, answers, expected",
    [
        ("The Avel Rovers won.", ["Avel Rovers"], 100.0),  # inside a sentence, case and punctuation ignored
        ("It was built in 1851.", ["1851"], 100.0),
        ("It was built in 18510.", ["1851"], 0.0),  # whole words only
        ("The rovers", ["Avel Rovers"], 0.0),
        ("Brisk Hawks!", ["Avel Rovers", "the Brisk Hawks"], 100.0),  # articles dropped, any ref
        ("", ["x"], 0.0),
    ],
)
def test_contains_answer_hand_computed(reply, answers, expected):
    assert contains_answer(reply, answers) == expected


def test_token_f1_hand_computed_on_a_sentence_reply():
    # pred tokens: avel rovers won game (4), ref: avel rovers (2); overlap 2 → P=0.5, R=1 → F1=2/3
    assert token_f1("The Avel Rovers won the game.", ["Avel Rovers"]) == pytest.approx(200 / 3)


def test_interval95_hand_computed():
    from trl_opsdl.demo.real import interval95

    low, high = interval95([100.0] * 30 + [0.0] * 70)  # Wilson, p=0.3, n=100: (0.219, 0.396)
    assert (low, high) == (21.9, 39.6)
    low, high = interval95([50.0, 50.0, 50.0])
    assert (low, high) == (50.0, 50.0)
    low, high = interval95([0.0] * 30)  # Wilson, p=0, n=30: (0, 0.114); the bound is +0, not -0 (printed "[-0, 11]")
    assert (low, high) == (0.0, 11.4) and math.copysign(1.0, low) == 1.0
    low, high = interval95([100.0] * 30)
    assert (low, high) == (88.6, 100.0)


def test_ruler_builders_take_the_essays_as_haystack(monkeypatch):
    from tests.conftest import tiny_tokenizer
    from trl_opsdl.data import build_ruler, reader

    words = "w1 w2 w3 w4 w5 w6 w7 w8 w9".split()
    monkeypatch.setattr(reader, "read_essays", lambda: "w1 w2 w3 . w4 w5 w6 . w7 w8 w9 .")
    rows = build_ruler(tiny_tokenizer(), tasks="niah_single", lengths=[120], num_samples=1, filler="essays",
                       words=[f"w{i}" for i in range(10, 40)], value_type="words")  # fmt: skip
    assert "w4 w5 w6" in rows[0]["prompt"] and not any(w in rows[0]["teacher_prompt"].split() for w in words)


def test_load_tokenizer_takes_autotokenizer_for_a_real_bpe_folder(tmp_path):
    from transformers import AutoTokenizer

    from tests.real_fixtures import save_bpe_chat_model
    from trl_opsdl.tokenization import load_tokenizer

    folder = save_bpe_chat_model(tmp_path / "m")
    loaded, auto = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert type(loaded) is type(auto) and loaded.chat_template == auto.chat_template
    assert loaded.eos_token == loaded.pad_token == "<|im_end|>"
    assert loaded("The mill of Avel")["input_ids"] == auto("The mill of Avel")["input_ids"]
