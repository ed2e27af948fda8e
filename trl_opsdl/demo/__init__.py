"""The CPU demo of OPSDL, as a package: one module per job.

- `model`: the demo's tokenizer and model (`build_demo_tokenizer`, `build_demo_model`) and `load_demo_model`.
- `config`: `DemoConfig`, one field per `trl-opsdl demo` option.
- `toy`: `trl-opsdl demo` — `run_demo`, key-value accuracy, the OPSDL training run.
- `pretrain`: how the shipped demo model was pretrained (`--rebuild-model`).
- `compare`: `--compare` — OPSDL's default recipe against TRL's SFT and DPO at the same budget, over seeds.
- `real`: `trl-opsdl demo --real` — a pretrained instruct model (SmolLM2-135M-Instruct) on SQuAD articles.
- `real_compare`: `--real --compare` — the same comparison on the real model.

The names are imported on first use, so `trl-opsdl demo` loads neither the pretraining loop nor the comparisons. The
variants and ablations tried while building the demos are in the repository's `experiments/`, not in the package.
"""

import importlib


_EXPORTS = {
    "model": (
        "DEMO_MODEL_DIR", "NUM_KEYS", "NUM_VALUES", "VALUE_LENGTH", "build_demo_model", "build_demo_tokenizer",
        "load_demo_model",
    ),
    "config": ("ALL_LINEAR", "DemoConfig", "RealDemoConfig"),
    "toy": (
        "check_demo_config", "demo_table", "eval_sets", "greedy_answers", "kv_accuracy",
        "lora_config", "opsdl_args", "plot_demo", "run_demo", "train_opsdl",
    ),
    "pretrain": ("PretrainConfig", "pretrain_demo_model"),
    "compare": (
        "COMPARE_METHODS", "compare_table", "plot_compare", "run_compare", "run_method", "train_baseline",
    ),
    "real": ("check_real_config", "interval95", "measure", "plot_real", "quick_config", "real_table", "run_real_demo"),
    "real_compare": ("REAL_COMPARE_METHODS", "run_real_compare", "short_check_set", "write_real_compare"),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    raise AttributeError(f"module 'trl_opsdl.demo' has no attribute {name!r}")
