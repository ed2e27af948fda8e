"""Prompt templates, prompt rendering and token counting shared by the builders, the extractors and the evaluation.

A row of every OPSDL dataset holds a long `prompt` (full context + question) and a short `teacher_prompt` (the
relevant evidence + the same question). Both are rendered from the same template, so they differ only in the context.
Lengths are counted the way the trainer tokenizes: `tokenizer(text)` for plain prompts (special tokens included),
`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` for conversational ones.
"""

import os


# Multi-document QA (LongBench's multi-document template, with "documents" for "passages").
QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
MULTI_DOC_QA_TEMPLATE = (
    QA_INSTRUCTION
    + "\n\nThe following are given documents.\n\n{context}\n\n"
    + QA_INSTRUCTION
    + "\n\nQuestion: {question}"
)
# Single context + question, for user data.
QA_TEMPLATE = (
    "Read the text and answer the question. Only give me the answer and do not output any other words.\n\n"
    "{context}\n\nQuestion: {question}"
)
QA_ANSWER_PREFIX = "\nAnswer:"


def render_prompt(template: str, context: str, question: str, answer_prefix: str = "", conversational: bool = False):
    """
    Fill `template` (with `{context}` and `{question}` fields) and return a plain prompt or a one-message conversation.

    Args:
        template (`str`):
            Format string with the fields `{context}` and `{question}`.
        context (`str`):
            The (long or short) context.
        question (`str`):
            The question, inserted verbatim.
        answer_prefix (`str`, *optional*, defaults to `""`):
            Text appended to a plain prompt to start the answer (RULER's convention). A conversational prompt ends
            with the user turn, so the prefix is left out there: the chat template opens the assistant turn.
        conversational (`bool`, *optional*, defaults to `False`):
            Return `[{"role": "user", "content": ...}]` instead of a string.
    """
    # `str.format` would choke on braces inside the context or question: substitute the two fields only.
    text = template.replace("{question}", "\0QUESTION\0").replace("{context}", "\0CONTEXT\0")
    text = text.replace("\0QUESTION\0", question).replace("\0CONTEXT\0", context)
    if conversational:
        return [{"role": "user", "content": text}]
    return text + answer_prefix


def prompt_text(tokenizer, prompt) -> str:
    """The exact text a model sees for `prompt`: the string itself, or the chat template applied with a generation
    prompt."""
    if isinstance(prompt, str):
        return prompt
    if tokenizer is None:
        raise ValueError("A conversational prompt needs a tokenizer with a chat template to be rendered; got None.")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"The tokenizer {type(tokenizer).__name__} has no chat template, but the prompts are conversational "
            "(lists of messages). Set `tokenizer.chat_template` or build plain-text prompts (conversational=False)."
        )
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of `prompt`, tokenized exactly as `DistillationTrainer._tokenize_prompts` does."""
    if isinstance(prompt, str):
        return list(tokenizer(text=prompt)["input_ids"])
    text = prompt_text(tokenizer, prompt)  # raises a clear error without a chat template
    # The rendered template already carries the special tokens (BOS, turn markers): don't add them twice.
    return list(tokenizer(text=text, add_special_tokens=False)["input_ids"])


def count_tokens(tokenizer, prompt) -> int:
    """Number of tokens of `prompt` (plain text or messages) under `tokenizer`."""
    return len(prompt_ids(tokenizer, prompt))


def replace_context(prompt, context: str, short_context: str):
    """Return `prompt` with its (only) occurrence of `context` replaced by `short_context`, keeping the template."""
    if isinstance(prompt, str):
        if context not in prompt:
            raise ValueError(
                "The row's `context` does not occur verbatim in its `prompt`; cannot swap in a short one."
            )
        return prompt.replace(context, short_context, 1)
    messages = [dict(m) for m in prompt]
    for message in messages:
        if isinstance(message.get("content"), str) and context in message["content"]:
            message["content"] = message["content"].replace(context, short_context, 1)
            return messages
    raise ValueError("The row's `context` does not occur verbatim in any message of its `prompt`.")


def load_tokenizer(path: str):
    """
    Load a tokenizer from a local folder (or a hub id where a network exists).

    A folder with a `tokenizer.json` is loaded with `PreTrainedTokenizerFast`, which uses that file as is.
    `AutoTokenizer` on a folder whose config names a model type (e.g. `qwen2`) can rebuild another tokenizer class
    and silently ignore a word-level `tokenizer.json` (see docs/data.md).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path is None:
        raise ValueError("No tokenizer given: pass the path of a model or tokenizer folder (e.g. --tokenizer PATH).")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return PreTrainedTokenizerFast.from_pretrained(path)
        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(
                f"No tokenizer could be loaded from the folder {path!r} ({error}). Point to a folder holding "
                "tokenizer.json (or tokenizer files) — e.g. the model folder."
            ) from error
    if os.path.exists(path):
        raise ValueError(f"Tokenizer path {path!r} is a file; pass the folder that holds tokenizer.json.")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"No tokenizer found at {path!r}: it is neither a local folder nor a reachable hub id ({error})."
        ) from error


def largest_fitting(count_at, target: int, cap: int | None = None) -> int:
    """
    Largest `n` (at most `cap`) with `count_at(n) <= target`, assuming `count_at(0)` fits and `count_at` grows with
    `n`. Token counts grow about linearly with the filler, so each probe aims where the line through `(0, count_at(0))`
    and the last probe crosses `target`; a probe that lands outside the bracket falls back to doubling or bisection.
    """
    base = count_at(0)
    lo, hi = 0, (cap + 1 if cap is not None else None)  # lo fits; hi (when known) does not
    n, aimed = 64, 0
    while hi is None or hi - lo > 1:
        n = max(n, lo + 1) if hi is None else min(max(n, lo + 1), hi - 1)
        count = count_at(n)
        if count <= target:
            lo = n
        else:
            hi = n
        estimate = int((target - base) * n / (count - base)) if count > base else None
        aimed += 1
        if estimate is not None and aimed <= 6:
            # Just above the estimate after a fit, on it after an overshoot: the bracket closes in a probe or two.
            n = estimate + 1 if count <= target else estimate
        else:
            n = 2 * n if hi is None else (lo + hi) // 2
        if n <= lo or (hi is not None and n >= hi):
            n = 2 * max(lo, 1) if hi is None else (lo + hi) // 2
    return lo
