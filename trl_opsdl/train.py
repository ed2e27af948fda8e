"""The training script as a function: `examples/scripts/opsdl.py` and `trl-opsdl train` both call `main`.

It reads top to bottom like TRL's `trl/scripts/distillation.py`: build the model arguments, load the dataset (a local
file or folder, or a hub id), load the tokenizer, train `OPSDLTrainer`, save, push. The arguments are
`ScriptArguments`, `OPSDLConfig` and `ModelConfig`, parsed by `make_parser()`.
"""

import os


DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_pairs(name: str, config: str | None = None, streaming: bool = False):
    """Load a dataset with `prompt` / `teacher_prompt` columns as a `DatasetDict`.

    `name` is a local data file (.json, .jsonl, .parquet, .csv), a folder (written by `save_to_disk`, or holding data
    files), or a dataset id on the Hub.
    """
    from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk

    name = os.path.expanduser(name)  # a `~/...` path from a YAML config is not expanded by a shell
    extension = os.path.splitext(name)[1].lower()
    if os.path.isdir(name):
        saved = any(os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json"))
        dataset = load_from_disk(name) if saved else load_dataset(name, name=config, streaming=streaming)
    elif os.path.isfile(name):
        if extension not in DATA_FILE_BUILDERS:
            raise ValueError(
                f"--dataset_name {name!r} is a {extension or 'extension-less'} file; a local dataset must be one of "
                f"{sorted(DATA_FILE_BUILDERS)} or a folder (from `Dataset.save_to_disk` or holding such files)."
            )
        dataset = load_dataset(DATA_FILE_BUILDERS[extension], data_files=name, streaming=streaming)
    elif extension in DATA_FILE_BUILDERS or name.startswith((".", "/")):
        raise FileNotFoundError(
            f"--dataset_name {name!r} looks like a local path but does not exist (working directory: {os.getcwd()})."
        )
    else:
        dataset = load_dataset(name, name=config, streaming=streaming)
    if isinstance(dataset, (Dataset, IterableDataset)):  # `load_from_disk` of a single split
        dataset = DatasetDict({"train": dataset})
    return dataset


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

    from .data import load_tokenizer
    from .opsdl_trainer import OPSDLTrainer

    if script_args.dataset_name is None:
        raise ValueError(
            "No dataset: pass --dataset_name, a local .json/.jsonl/.parquet/.csv file, a folder, or a hub id, with "
            "'prompt' and 'teacher_prompt' columns (`trl-opsdl build-data` writes one)."
        )
    if model_args.model_name_or_path is None:
        raise ValueError("No model: pass --model_name_or_path (a local folder or a hub id).")
    check_vllm(training_args)

    # The model is passed to the trainer as a path, not an instance: under ZeRO-3 the frozen `base` teacher is rebuilt
    # from it (a copy of a sharded model holds empty shards).
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    teacher_model = training_args.teacher_model_name_or_path  # an explicit teacher; None: the model itself
    if teacher_model is not None:
        teacher_init_kwargs = dict(
            revision=training_args.teacher_model_revision,
            trust_remote_code=training_args.trust_remote_code,
            attn_implementation=model_args.attn_implementation,
            dtype=model_args.dtype,
        )
        teacher_init_kwargs.update(training_args.teacher_model_init_kwargs or {})
        training_args.teacher_model_init_kwargs = teacher_init_kwargs

    dataset = load_pairs(script_args.dataset_name, script_args.dataset_config, script_args.dataset_streaming)
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
    # and silently drop words (see `trl_opsdl.data.load_tokenizer`), which would make the loss zero.
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
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
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
