"""The one greedy generator: the evaluation, the self-extractor and the demo all generate through `greedy_generate`;
and `load_model`, the model they generate with, as the command line loads it.

Prompts are tokenized as the trainer tokenizes them (`trl_opsdl.tokenization.prompt_ids`), sorted by length so that
a batch needs little padding, left-padded, and generated greedily; outputs come back in the order of the prompts.
"""

from .tokenization import prompt_ids


def greedy_generate(model, tokenizer, prompts, max_new_tokens: int, batch_size: int = 16, progress: bool = False,
                    return_ids: bool = False):  # fmt: skip
    """
    Greedy completions of `prompts`.

    Args:
        model ([`~transformers.PreTrainedModel`]):
            A causal LM (a PEFT model or a DDP/DeepSpeed-wrapped one works too). Its train/eval mode is restored.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer; conversational prompts go through its chat template with a generation prompt.
        prompts (`list[str]` or `list[list[dict]]`):
            Plain prompts or message lists, tokenized exactly as the trainer tokenizes them.
        max_new_tokens (`int`):
            Generation budget per prompt.
        batch_size (`int`, *optional*, defaults to `16`):
            Prompts per `generate` call (left-padded; prompts of similar length are batched together).
        progress (`bool`, *optional*, defaults to `False`):
            Show a tqdm progress bar over the batches.
        return_ids (`bool`, *optional*, defaults to `False`):
            Return each completion's new token ids, up to and including its first end token (none when it never
            ended), instead of its text.

    Returns:
        `list[str]` (the new tokens of each prompt, decoded without special tokens and stripped) or, with
        `return_ids=True`, `list[list[int]]`; in the order of `prompts`.
    """
    import torch
    from accelerate.utils import extract_model_from_parallel
    from tqdm.auto import tqdm

    if tokenizer is None:
        raise ValueError("greedy_generate needs the model's tokenizer.")
    if batch_size <= 0 or max_new_tokens <= 0:
        raise ValueError(f"batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be positive.")
    if hasattr(model, "module"):  # DDP and DeepSpeed engines hide `generate` behind `.module`
        # (only then: accelerate imports DeepSpeed to recognize its engine, which logs an accelerator line on a CPU)
        model = extract_model_from_parallel(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad token nor an EOS token to pad batches with; set one.")
    eos_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos_ids = tokenizer.eos_token_id if eos_ids is None else eos_ids
    eos_ids = set(eos_ids) if isinstance(eos_ids, list) else {eos_ids}
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths together: less padding
    device = next(model.parameters()).device
    outputs = [None] * len(ids)
    was_training = model.training
    model.eval()
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="generating", disable=not progress):
                width = max(len(ids[i]) for i in batch)
                input_ids = torch.tensor([[pad_id] * (width - len(ids[i])) + ids[i] for i in batch], device=device)
                attention_mask = torch.tensor(
                    [[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in batch], device=device
                )
                generated = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad_id,
                )
                new_ids = generated[:, width:].tolist()
                if return_ids:
                    for i, row in zip(batch, new_ids):
                        end = next((k for k, token in enumerate(row) if token in eos_ids), None)
                        outputs[i] = row if end is None else row[: end + 1]
                else:
                    texts = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
                    for i, text in zip(batch, texts):
                        outputs[i] = text.strip()
    finally:
        model.train(was_training)
    return outputs


# `load_model`'s precisions, named as TRL's `ModelConfig.dtype` names them.
DTYPES = ("auto", "bfloat16", "float32")


def resolve_dtype(dtype: str = "auto", flag: str = "dtype") -> str:
    """The precision `load_model(..., dtype)` loads in: "bfloat16" or "float32". An unknown `dtype` is one
    `ValueError` naming `flag`."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"{flag} {dtype!r} is not one of {', '.join(DTYPES)}; pick one of them.")
    if dtype == "auto":
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return dtype


def load_model(path: str, flag: str = "--model", dtype: str = "auto"):
    """
    A causal LM ready to generate. `dtype="auto"`: on the GPU in bf16 where one supports it, else on the CPU in fp32
    (bf16 matmuls are slow or missing on most CPUs); `"bfloat16"` / `"float32"` force one (bf16 on a CPU with AMX,
    e.g. Intel Sapphire Rapids, runs long prompts ~2-3x faster than fp32). A model that fails to load (truncated
    weights, a wrong config) is one `ValueError` naming `flag` and the folder.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except Exception as error:  # noqa: BLE001 - truncated weights, a wrong config: one line naming the folder
        raise ValueError(
            f"{flag} {path!r} could not be loaded ({type(error).__name__}: {error}). Check the folder: a complete "
            "model.safetensors and a config.json from save_pretrained."
        ) from error
    return model.to(device)
