"""Key → value retrieval: a synthetic long/short prompt pair builder with an exact answer.

A context is a list of pairs `K<i> V<a> V<b> V<c>` (a key token, then a value of `value_length` value tokens), and the
question `Q K<i>` asks for the value of one key in the context. Keys in one context are distinct; value tokens are
drawn from a small alphabet, so they repeat across pairs and act as distractors. The answer is the value's tokens.

The long (student) prompt is the whole context + the question; the short (teacher) prompt is the single relevant
pair + the same question — what OPSDL distills from.

    >>> ds = build_kv_retrieval(2, num_pairs=3, seed=0)
    >>> ds[0]["prompt"]            # 'K23 V6 V1 V30 K104 V2 V20 V5 K61 V9 V17 V7 Q K104'
    >>> ds[0]["teacher_prompt"]    # 'K104 V2 V20 V5 Q K104'
    >>> ds[0]["answers"]           # ['V2 V20 V5']
"""

import random

from datasets import Dataset


KEY_PREFIX = "K"
VALUE_PREFIX = "V"
QUERY_TOKEN = "Q"
TASK_NAME = "kv_retrieval"


def kv_symbols(num_keys: int = 128, num_values: int = 32) -> list[str]:
    """Every word a key-value prompt or answer can contain, in a fixed order (for building a word-level vocabulary)."""
    return (
        [QUERY_TOKEN]
        + [f"{KEY_PREFIX}{i}" for i in range(num_keys)]
        + [f"{VALUE_PREFIX}{i}" for i in range(num_values)]
    )


def sample_kv_context(
    rng: random.Random, num_pairs: int, num_keys: int = 128, num_values: int = 32, value_length: int = 3
) -> list[tuple[str, list[str]]]:
    """`num_pairs` (key, value tokens) pairs with distinct keys, drawn from `rng`."""
    keys = rng.sample(range(num_keys), num_pairs)
    return [
        (f"{KEY_PREFIX}{k}", [f"{VALUE_PREFIX}{rng.randrange(num_values)}" for _ in range(value_length)]) for k in keys
    ]


def format_pair(key: str, value: list[str]) -> str:
    return " ".join([key, *value])


def format_question(key: str) -> str:
    return f"{QUERY_TOKEN} {key}"


def _check(name: str, value: int, minimum: int, hint: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}; {hint}")


def build_kv_retrieval(
    num_examples: int,
    num_pairs: int | tuple[int, int] = 16,
    *,
    seed: int = 0,
    num_keys: int = 128,
    num_values: int = 32,
    value_length: int = 3,
    conversational: bool = False,
) -> Dataset:
    r"""
    Build `num_examples` key → value retrieval rows, deterministically for a `seed`.

    Args:
        num_examples (`int`):
            Number of rows.
        num_pairs (`int` or `tuple[int, int]`, *optional*, defaults to `16`):
            Pairs in each long context: a number, or an inclusive `(low, high)` range drawn uniformly per row.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the row generator; the same arguments and seed give the same rows.
        num_keys (`int`, *optional*, defaults to `128`):
            Size of the key alphabet `K0 … K{num_keys-1}`; a context holds at most this many pairs (keys are distinct).
        num_values (`int`, *optional*, defaults to `32`):
            Size of the value-token alphabet `V0 … V{num_values-1}`.
        value_length (`int`, *optional*, defaults to `3`):
            Value tokens per key.
        conversational (`bool`, *optional*, defaults to `False`):
            Wrap `prompt` and `teacher_prompt` as a single user message each, for chat models.

    Returns:
        [`~datasets.Dataset`] with columns `prompt` (all pairs + question), `teacher_prompt` (the relevant pair +
        question), `answers` (a one-element list with the value, space-separated), `task` (`"kv_retrieval"`) and
        `length` (the number of pairs in `prompt`).
    """
    _check("num_examples", num_examples, 1, "ask for at least one row.")
    _check("num_keys", num_keys, 1, "the key alphabet needs at least one key.")
    _check("num_values", num_values, 1, "the value alphabet needs at least one token.")
    _check("value_length", value_length, 1, "a value needs at least one token.")
    low, high = (num_pairs, num_pairs) if isinstance(num_pairs, int) else tuple(num_pairs)
    _check("num_pairs", low, 1, "a context needs at least one pair.")
    _check("num_pairs", high, low, "give an inclusive (low, high) range with low <= high.")
    if high > num_keys:
        raise ValueError(
            f"num_pairs={num_pairs!r} asks for more pairs than there are distinct keys (num_keys={num_keys}); "
            "raise num_keys or lower num_pairs."
        )

    rng = random.Random(seed)
    rows = {"prompt": [], "teacher_prompt": [], "answers": [], "task": [], "length": []}
    for _ in range(num_examples):
        pairs = sample_kv_context(rng, rng.randint(low, high), num_keys, num_values, value_length)
        key, value = pairs[rng.randrange(len(pairs))]
        question = format_question(key)
        prompt = " ".join([*(format_pair(k, v) for k, v in pairs), question])
        teacher_prompt = f"{format_pair(key, value)} {question}"
        if conversational:
            prompt = [{"role": "user", "content": prompt}]
            teacher_prompt = [{"role": "user", "content": teacher_prompt}]
        rows["prompt"].append(prompt)
        rows["teacher_prompt"].append(teacher_prompt)
        rows["answers"].append([" ".join(value)])
        rows["task"].append(TASK_NAME)
        rows["length"].append(len(pairs))
    return Dataset.from_dict(rows)
