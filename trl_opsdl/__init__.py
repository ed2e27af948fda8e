"""OPSDL — On-Policy Self-Distillation for Long context (arXiv 2604.17535) — for TRL.

The public names are imported lazily, so `trl-opsdl --help` and the data builders don't pay for importing TRL.

Tensor names end with their shape, one letter per dimension (`logp_BK` is a (B, K) tensor), in every module:

    B  rows of a batch
    L  tokens of a whole row, prompt + completion, padded: what the model reads
    K  completion tokens of a row, padded
    P  prompt tokens of a row, left-padded (L = P + K)
    N  loss tokens: the completion positions of the whole batch, flattened, padding removed
    C  a chunk of those N positions (the losses compute chunk by chunk)
    J  the top-k tokens kept at a position (`distillation_mode="topk_logits"`); U = J + 1: those and the rest
    H  hidden size
    V  vocabulary
    S  one rank's slice of a row's L tokens (sequence parallelism); W the window gathered from all ranks
    A  attention heads; D the size of one head
    1  a dimension of size 1, kept for broadcasting
"""

import importlib


__version__ = "0.2.0"

_EXPORTS = {
    "OPSDLConfig": ".opsdl_config",
    "OPSDLTrainer": ".opsdl_trainer",
    "OPSDLEvalCallback": ".evaluation",
    "evaluate_dataset": ".evaluation",
    "build_ruler": ".data",
    "build_multidoc_qa": ".data",
    "build_from_columns": ".data",
    "build_kv_retrieval": ".data",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'trl_opsdl' has no attribute {name!r}")
