"""Long/short pair builders: each returns a `datasets.Dataset` with `prompt`, `teacher_prompt`, `answers` and
metadata columns, ready for `OPSDLTrainer` and `trl_opsdl.evaluation`."""

from ..tokenization import count_tokens, load_tokenizer
from .columns import build_from_columns, dataset_report, evidence_recall, write_jsonl
from .extract import BM25Extractor, SelfExtractor, split_chunks
from .qa import QA_FORMATS, build_multidoc_qa
from .reader import load_data, load_records
from .ruler import RULER_TASKS, build_ruler
from .templates import render_prompt


__all__ = [
    "BM25Extractor",
    "QA_FORMATS",
    "RULER_TASKS",
    "SelfExtractor",
    "build_from_columns",
    "build_multidoc_qa",
    "build_ruler",
    "count_tokens",
    "dataset_report",
    "evidence_recall",
    "load_data",
    "load_records",
    "load_tokenizer",
    "render_prompt",
    "split_chunks",
    "write_jsonl",
]
# Further builders append their import below (and their names to __all__).
from .kv import build_kv_retrieval  # noqa: E402


__all__ += ["build_kv_retrieval"]
from .self_instruct import SelfInstructReport, build_self_instruct, load_documents  # noqa: E402


__all__ += ["SelfInstructReport", "build_self_instruct", "load_documents"]
