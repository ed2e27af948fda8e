"""OPSDL — On-Policy Self-Distillation for Long context (arXiv 2604.17535) — for TRL.

The public names are imported lazily, so `trl-opsdl --help` and the data builders don't pay for importing TRL.
"""

import importlib


__version__ = "0.1.0"

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
