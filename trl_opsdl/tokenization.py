"""Tokenizers and prompts as the trainer sees them: loading a tokenizer safely, a prompt's exact text and token ids.

Every length in `trl_opsdl` is counted the way `DistillationTrainer._tokenize_prompts` tokenizes: `tokenizer(text)`
for plain prompts (special tokens included), `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` for
conversational ones. The data builders, the generator and the evaluation all go through these functions.
"""

import os


def load_tokenizer(path: str):
    """
    Load a tokenizer from a local folder (or a hub id where a network exists).

    A folder is loaded with `AutoTokenizer` (the model's own tokenizer class, chat template and special tokens), then
    checked against its `tokenizer.json`: `AutoTokenizer` on a folder whose config names a model type (e.g. `qwen2`)
    can rebuild another tokenizer class and silently ignore a word-level `tokenizer.json` (see docs/data.md). Where
    the two tokenize a probe text differently, the folder is loaded with `PreTrainedTokenizerFast`, which uses that
    file as is.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path is None:
        raise ValueError("No tokenizer given: pass the path of a model or tokenizer folder (e.g. --tokenizer PATH).")
    if os.path.isdir(path):
        file = os.path.join(path, "tokenizer.json")
        if os.path.isfile(file):
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError, TypeError, KeyError):
                return PreTrainedTokenizerFast.from_pretrained(path)
            if _same_as_file(tokenizer, file):
                return tokenizer
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


_PROBE = "Paris is the capital of France. Question: what is 12 + 30? Answer: 42 key w1 V3 K17"


def check_model_path(path: str, flag: str = "--model") -> None:
    """Fail before any work on a local model path that is not a model folder (a hub id is left to the loader)."""
    path = os.path.expanduser(str(path))
    if os.path.isfile(path):
        raise ValueError(f"{flag} {path!r} is a file; pass the model folder (with config.json and the weights).")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{flag} {path!r} has no config.json: it is not a model folder (save_pretrained writes one).")
    if not os.path.exists(path) and path.startswith((".", "/", "~")):
        raise ValueError(f"{flag} {path!r} does not exist (working directory: {os.getcwd()}).")
    if os.path.isdir(path):  # a truncated weights file fails deep in loading; its header says so at once
        from safetensors import safe_open

        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                try:
                    with safe_open(os.path.join(path, name), framework="pt"):
                        pass
                except Exception as error:  # noqa: BLE001 - safetensors raises its own error type
                    raise ValueError(
                        f"{flag} {path!r}: {name} is not a readable safetensors file ({error}); it was probably cut "
                        "short by a download or copy. Copy or save the model again."
                    ) from error


def _same_as_file(tokenizer, file: str) -> bool:
    """Whether `tokenizer` splits a probe text into the ids its `tokenizer.json` gives (the word-level trap)."""
    from tokenizers import Tokenizer

    words = _PROBE.split() + [w for w in list(tokenizer.get_vocab())[:50] if w.isalnum()]
    text = " ".join(words)
    raw = Tokenizer.from_file(file).encode(text, add_special_tokens=False).ids
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) == raw


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
