"""The training script as a function: `examples/scripts/opsdl.py` and `trl-opsdl train` both call `main`.

It reads top to bottom like TRL's `trl/scripts/distillation.py`: build the model arguments, load the dataset (a local
file or folder, or a hub id), load the tokenizer, train `OPSDLTrainer`, save, push. The arguments are
`ScriptArguments`, `OPSDLConfig` and `ModelConfig`, parsed by `make_parser()`.
"""

import os


def check_vllm(training_args) -> None:
    """Fail before loading any weights when `--use_vllm` is set and vLLM cannot be imported."""
    from trl.import_utils import is_vllm_available

    if training_args.use_vllm and not is_vllm_available():
        raise ImportError(
            f"--use_vllm is set (vllm_mode={training_args.vllm_mode!r}) but vLLM is not installed. Install it on a "
            "CUDA machine with `pip install 'trl_opsdl[vllm]'`, or drop --use_vllm to generate with transformers."
        )


def main(script_args, training_args, model_args):
    """Train OPSDL from parsed arguments; returns the trainer (after `save_model`)."""
    import transformers
    from packaging.version import Version
    from trl import get_peft_config, get_quantization_config

    from .data.reader import load_data
    from .opsdl_trainer import OPSDLTrainer
    from .tokenization import check_model_path, load_tokenizer

    if script_args.dataset_name is None:
        raise ValueError(
            "No dataset: pass --dataset_name, a local .json/.jsonl/.parquet/.csv file, a folder, or a hub id, with "
            "'prompt' and 'teacher_prompt' columns (`trl-opsdl build-data` writes one)."
        )
    if model_args.model_name_or_path is None:
        raise ValueError("No model: pass --model_name_or_path (a local folder or a hub id).")
    check_vllm(training_args)
    check_model_path(model_args.model_name_or_path, "--model_name_or_path")

    # The model is passed to the trainer as a path, not an instance: under ZeRO-3 the frozen `base` teacher is rebuilt
    # from it (a copy of a sharded model holds empty shards).
    def init_kwargs(revision, overrides):  # the model flags, then what the config's `*_init_kwargs` say
        kwargs = dict(revision=revision, trust_remote_code=training_args.trust_remote_code,
                      attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)  # fmt: skip
        return {**kwargs, **(overrides or {})}

    training_args.model_init_kwargs = init_kwargs(model_args.model_revision, training_args.model_init_kwargs)
    teacher_model = training_args.teacher_model_name_or_path  # an explicit teacher; None: the model itself
    if teacher_model is not None:
        training_args.teacher_model_init_kwargs = init_kwargs(
            training_args.teacher_model_revision, training_args.teacher_model_init_kwargs
        )

    try:
        dataset = load_data(
            script_args.dataset_name, None, script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"--dataset_name: {error}") from error
    needed = [script_args.dataset_train_split]
    if training_args.eval_strategy != "no":
        needed.append(script_args.dataset_test_split)
    for split in needed:
        if split not in dataset:
            raise ValueError(
                f"Dataset {script_args.dataset_name!r} has splits {list(dataset)}, not {split!r}. Pick one with "
                "--dataset_train_split / --dataset_test_split (evaluation needs a test split, or --eval_strategy no)."
            )

    # A local folder's tokenizer.json is loaded as is: AutoTokenizer can rebuild another tokenizer from the model type
    # and silently drop words (see `trl_opsdl.tokenization.load_tokenizer`), which would make the loss zero.
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    trainer = OPSDLTrainer(
        model=model_args.model_name_or_path,
        teacher_model=teacher_model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    # `--resume_from_checkpoint` is a string on the command line: "True" means the last complete checkpoint.
    resume = training_args.resume_from_checkpoint
    resume = True if isinstance(resume, str) and resume.lower() == "true" else resume
    trainer.train(resume_from_checkpoint=resume)
    trainer.accelerator.print("Training completed.")

    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        local = os.path.exists(script_args.dataset_name)
        trainer.push_to_hub(dataset_name=None if local else script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")

    # Finish the trackers and destroy the process group (a clean exit after ZeRO-3).
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()
    return trainer


def make_parser(prog: str | None = None):
    """`TrlParser` over `ScriptArguments`, `OPSDLConfig` and `ModelConfig` (and `--config file.yaml`)."""
    from trl import ModelConfig, ScriptArguments, TrlParser

    from .opsdl_config import OPSDLConfig

    return TrlParser((ScriptArguments, OPSDLConfig, ModelConfig), prog=prog)
