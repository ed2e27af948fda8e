# /// script
# dependencies = [
#     "trl_opsdl",
#     "peft",
# ]
# ///

"""
OPSDL: the model answers the long `prompt` and learns to match what it predicts, for the same answer, from the short
`teacher_prompt` (the relevant evidence + the same question). The dataset needs both columns: a local .json, .jsonl,
.parquet or .csv file, a folder, or a hub id (`trl-opsdl build-data` writes one). The same script runs as
`trl-opsdl train <same arguments>`.

# Full training, one GPU
```bash
python examples/scripts/opsdl.py \
    --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \
    --dataset_name data/pairs.jsonl \
    --learning_rate 1e-5 \
    --max_completion_length 256 \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 4 \
    --num_train_epochs 1 \
    --output_dir Qwen2.5-1.5B-OPSDL
```

# LoRA (the `base` teacher is then the model with its adapter disabled: no second copy in memory)
```bash
python examples/scripts/opsdl.py \
    --model_name_or_path Qwen/Qwen2.5-7B-Instruct \
    --dataset_name data/pairs.jsonl \
    --learning_rate 1e-4 \
    --max_completion_length 256 \
    --output_dir Qwen2.5-7B-OPSDL \
    --use_peft \
    --lora_r 32 \
    --lora_alpha 64 \
    --lora_target_modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
```

# Several GPUs: DDP, DeepSpeed ZeRO-2, ZeRO-3, ZeRO-3 with CPU offload (set --num_processes to your GPU count)
```bash
accelerate launch --config_file examples/accelerate_configs/zero3.yaml --num_processes 8 \
    examples/scripts/opsdl.py \
    --model_name_or_path Qwen/Qwen2.5-32B-Instruct \
    --dataset_name data/pairs.jsonl \
    --max_completion_length 256 \
    --output_dir Qwen2.5-32B-OPSDL
```
(`ddp.yaml`, `zero2.yaml`, `zero3_offload.yaml` in the same folder; `accelerate launch ... -m trl_opsdl.cli train ...`
runs the CLI the same way.)

# Generation with vLLM (needs `pip install 'trl_opsdl[vllm]'` on a CUDA machine)
Colocated: vLLM shares the training GPUs; the policy weights are synced into it before each generation.
```bash
accelerate launch --config_file examples/accelerate_configs/zero3.yaml examples/scripts/opsdl.py \
    --model_name_or_path Qwen/Qwen2.5-7B-Instruct --dataset_name data/pairs.jsonl --output_dir Qwen2.5-7B-OPSDL \
    --use_vllm --vllm_mode colocate --vllm_gpu_memory_utilization 0.3
```
Server: a separate vLLM server on its own GPU(s) (here GPU 0), training on the others.
```bash
CUDA_VISIBLE_DEVICES=0 trl vllm-serve --model Qwen/Qwen2.5-7B-Instruct
CUDA_VISIBLE_DEVICES=1,2,3,4,5,6,7 accelerate launch --config_file examples/accelerate_configs/zero3.yaml \
    --num_processes 7 examples/scripts/opsdl.py \
    --model_name_or_path Qwen/Qwen2.5-7B-Instruct --dataset_name data/pairs.jsonl --output_dir Qwen2.5-7B-OPSDL \
    --use_vllm --vllm_mode server
```

# A tiny run on CPU (what our tests do)
```bash
python examples/scripts/opsdl.py --model_name_or_path path/to/tiny-model --dataset_name pairs.jsonl \
    --max_steps 2 --per_device_train_batch_size 2 --max_completion_length 8 --gradient_checkpointing false \
    --report_to none --output_dir /tmp/opsdl-tiny
```
"""

from trl_opsdl.train import main, make_parser


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
