"""The tests' tiny offline models: one word-level tokenizer builder and one small-Llama factory (the benchmarks use them
too). Nothing here downloads anything; the demo builds its own model in `trl_opsdl.demo.model`.
"""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]


def word_level_tokenizer(words, chat_template: str | None = None, pad: bool = True) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per whitespace-separated word: ids 0-3 are `<pad> <unk> <s> </s>`, then `words`.

    No BOS is added and padding is on the left (as the trainer generates). `pad=False` leaves out the pad token.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if pad else None,
        padding_side="left",
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama(tokenizer=None, seed: int = 0, hidden_size: int = 128, num_layers: int = 3, num_heads: int = 4,
               num_kv_heads: int | None = None, intermediate_size: int | None = None, vocab_size: int | None = None,
               max_position_embeddings: int = 512, tie_word_embeddings: bool = True, **config_kwargs):  # fmt: skip
    """
    A randomly initialised Llama (seeded with `seed`) whose vocabulary and special tokens are `tokenizer`'s.

    `num_kv_heads` defaults to `num_heads`, `intermediate_size` to `4 * hidden_size`, `vocab_size` to the tokenizer's
    length; other `LlamaConfig` fields go in `config_kwargs` (e.g. `attn_implementation`, `initializer_range`).
    Without a tokenizer the special ids are those of [`word_level_tokenizer`].
    """
    special = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    if tokenizer is not None:
        special = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("pad", "bos", "eos")}
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **special,
        **config_kwargs,
    )
    model = LlamaForCausalLM(config)
    for name, value in special.items():
        setattr(model.generation_config, name, value)
    return model
