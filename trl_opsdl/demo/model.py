"""The demo's model: a word-level tokenizer over the key-value symbols, a 0.8M-parameter Llama, and
`load_demo_model` for the pretrained one shipped in `trl_opsdl/assets/demo_model`. Nothing here downloads anything.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..data.kv import kv_symbols


DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_model"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
NUM_KEYS, NUM_VALUES, VALUE_LENGTH = 128, 32, 3


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    """The demo's tokenizer: one token per key-value symbol (`K0`.. `V0`.. `Q`) after `<pad> <unk> <s> </s>`, no BOS
    added, padded on the left (as the trainer generates)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + kv_symbols(NUM_KEYS, NUM_VALUES))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = dict(zip(("pad_token", "unk_token", "bos_token", "eos_token"), SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **special)


def build_demo_model(
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 3,
    num_heads: int = 4,
    tie_word_embeddings: bool = True,
    initializer_range: float = 0.02,
):
    """The demo's architecture, randomly initialised from `seed` (0.8M parameters at the defaults), with the
    tokenizer's vocabulary and special ids."""
    special = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("pad", "bos", "eos")}
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        **special,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.update(**special)
    return model


def load_demo_model(path: str | Path | None = None):
    """Load a demo model and tokenizer from `path` (default: the pretrained one shipped in the package)."""
    from transformers.utils import logging as hf_logging

    path = Path(path) if path is not None else DEMO_MODEL_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"No demo model at {str(path)!r} (no config.json). Rebuild it with "
            "`python examples/scripts/pretrain_demo_model.py` or `trl-opsdl demo --rebuild-model`, or pass the "
            "folder it was saved to."
        )
    # Never AutoTokenizer: on some model types it rebuilds a BPE tokenizer and drops every word of ours.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    # A 0.8M-parameter model loads in milliseconds: the weight-loading progress bar would only interleave with the
    # demo's own lines.
    hf_logging.disable_progress_bar()
    try:
        model = LlamaForCausalLM.from_pretrained(path)
    finally:
        hf_logging.enable_progress_bar()
    return model, tokenizer
