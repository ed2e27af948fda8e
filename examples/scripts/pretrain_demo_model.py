# /// script
# dependencies = [
#     "trl_opsdl",
# ]
# ///

"""
Rebuild the demo model shipped in `trl_opsdl/assets/demo_model/`: a word-level tokenizer over the key-value symbols
and a 3-layer, hidden-128 Llama (0.83M parameters) trained from scratch on key → value retrieval with 1–8 pairs per
context (loss on answer tokens only, 4 questions per sequence, AdamW lr 1e-3, batch 64, 1500 steps, half the batches a
copy task). It answers short contexts almost perfectly and long ones poorly — the starting point of `trl-opsdl demo`
(docs/demo.md).

Deterministic: one thread and fixed seeds; about 25 minutes on one CPU core (it uses only one).

```bash
python examples/scripts/pretrain_demo_model.py                                   # overwrite the shipped model
python examples/scripts/pretrain_demo_model.py --output_dir my_demo_model --steps 500
trl-opsdl demo --model-path my_demo_model
```
"""

from dataclasses import dataclass, field

from transformers import HfArgumentParser

from trl_opsdl.demo import DEMO_MODEL_DIR, PretrainConfig, pretrain_demo_model


@dataclass
class ScriptArguments:
    output_dir: str = field(default=str(DEMO_MODEL_DIR), metadata={"help": "Where the model and tokenizer are saved."})


if __name__ == "__main__":
    script_args, pretrain_config = HfArgumentParser((ScriptArguments, PretrainConfig)).parse_args_into_dataclasses()
    pretrain_demo_model(pretrain_config, script_args.output_dir)
    print(f"saved the demo model and tokenizer to {script_args.output_dir}")
