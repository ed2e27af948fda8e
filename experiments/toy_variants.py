"""The toy demo's variants and ablation grid: what was tried while building `trl-opsdl demo` (docs/demo.md's tables and
the research log), run with the package's comparison harness (`trl_opsdl.demo.compare.run_compare`).

    python experiments/toy_variants.py --set compare                       # the 9 methods of docs/demo.md, seeds 0,1,2
    python experiments/toy_variants.py --set ablation --seeds 0            # what keeps short-context accuracy
    python experiments/toy_variants.py --set compare --methods opsdl_teacher_ema,sft_gold --max-steps 75

Every `trl-opsdl demo` option is an option here too (`--output-dir`, `--max-steps`, `--no-lora`, ...); a set writes
`<output-dir>/<set>.json`, `.md` and `.png`.
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))  # `options` beside this file, however it is started
from options import (  # noqa: E402
    add_config_options,
    add_run_options,
    config_overrides,
    report_bad_settings,
    select_methods,
)


# A method is `trainer` (opsdl | sft_gold | sft_self | dpo) plus `DemoConfig` fields that differ from the demo's.
COMPARE_METHODS = {
    "opsdl": {},
    "opsdl_topk_logits": {"distillation_mode": "topk_logits"},
    "opsdl_sampled_token": {"distillation_mode": "sampled_token"},
    "opsdl_teacher_ema": {"teacher_model_kind": "ema"},
    "opsdl_teacher_live": {"teacher_model_kind": "live"},
    "sft_gold": {"trainer": "sft_gold"},
    "sft_self": {"trainer": "sft_self"},
    "dpo_longpo": {"trainer": "dpo"},
    "dpo_longpo_lr=1e-4": {"trainer": "dpo", "learning_rate": 1e-4},  # DPO collapses at the shared lr (docs/demo.md)
}
# What keeps short-context accuracy: full fine-tuning (the prototype's recipe) with short prompts mixed in, other
# learning rates, steps or context lengths, against LoRA. Each spec is complete, so it does not move with the defaults.
_FULL = {"lora": False, "learning_rate": 3e-4}
_LORA = {"lora": True, "learning_rate": 1e-3}
ABLATION_METHODS = {
    "full_lr=3e-4": _FULL,
    "full_lr=1e-4": {**_FULL, "learning_rate": 1e-4},
    "full_lr=1e-3": {**_FULL, "learning_rate": 1e-3},
    "full_lr=3e-4_spr=0.125": {**_FULL, "short_prompt_ratio": 0.125},
    "full_lr=3e-4_spr=0.25": {**_FULL, "short_prompt_ratio": 0.25},
    "full_lr=3e-4_spr=0.5": {**_FULL, "short_prompt_ratio": 0.5},
    "full_lr=3e-4_steps=300": {**_FULL, "max_steps": 300},
    "full_lr=3e-4_train_pairs=4-32": {**_FULL, "train_pairs": (4, 32)},
    "lora_r=16_lr=1e-3 (default)": _LORA,
    "lora_r=16_lr=5e-4": {**_LORA, "learning_rate": 5e-4},
    "lora_r=16_lr=2e-3": {**_LORA, "learning_rate": 2e-3},
    "lora_r=4_lr=1e-3": {**_LORA, "lora_r": 4},
    "lora_attention_r=16_lr=1e-3": {**_LORA, "lora_target_modules": ("q_proj", "k_proj", "v_proj", "o_proj")},
    "lora_r=16_lr=1e-3_spr=0.125": {**_LORA, "short_prompt_ratio": 0.125},
    "lora_r=16_lr=1e-3_steps=75": {**_LORA, "max_steps": 75},
}
METHOD_SETS = {"compare": COMPARE_METHODS, "ablation": ABLATION_METHODS}


def parse_args(argv=None):
    from trl_opsdl.demo.config import DemoConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--set", choices=list(METHOD_SETS), default="compare", help="Which methods (default: compare)."
    )
    add_run_options(parser)
    parser.add_argument("--eval-every", type=int, default=25, help="Steps between curve points (default: 25).")
    add_config_options(parser, DemoConfig)
    args = parser.parse_args(argv)
    if args.eval_every < 1:
        parser.error(f"--eval-every {args.eval_every} must be at least 1.")
    config = replace(DemoConfig(), **config_overrides(args, DemoConfig))
    return args, config, select_methods(parser, METHOD_SETS[args.set], args.methods)


def main(argv=None) -> int:
    from trl_opsdl.demo.compare import run_compare

    args, config, methods = parse_args(argv)
    seeds = tuple(args.seeds)
    return report_bad_settings(
        "toy_variants.py", lambda: run_compare(config, methods, seeds, eval_every=args.eval_every, name=args.set)
    )


if __name__ == "__main__":
    sys.exit(main())
