"""Long vs short evaluation: greedy generation on `prompt` and on `teacher_prompt`, scored per task and length.

- `metrics`: the scorers (percent), `METRICS` and `TASK_METRICS`.
- `evaluate`: `evaluate_dataset` (generate, score, aggregate), results to JSON and a plot.
- `callback`: `OPSDLEvalCallback`, the same evaluation during training, rows sharded across ranks.
- `longbench`: LongBench (v1) and v2 prompts and loaders for local files.
- `ruler_bench`: `trl-opsdl bench ruler`, the RULER table (families x lengths + short prompts) with cached cells.

The generator itself is `trl_opsdl.generation.greedy_generate` (the data extractors use it too, and the data package
sits below the evaluation). Every name that `trl_opsdl.evaluation` exported before the split is still here.
"""

from ..generation import greedy_generate
from .callback import OPSDLEvalCallback, shard_indices
from .evaluate import (
    RESULT_FILES,
    check_results_dir,
    clear_results,
    evaluate_dataset,
    evaluation_rows,
    flatten_results,
    plot_accuracy_vs_length,
    save_results,
    score_completions,
    summarize,
)
from .longbench import (
    LONGBENCH_DEFAULT_PROMPT,
    LONGBENCH_PROMPTS,
    LONGBENCH_V2_PROMPT,
    load_longbench,
    load_longbench_v2,
)
from .metrics import (
    METRICS,
    TASK_METRICS,
    choice_accuracy,
    classification_score,
    code_similarity,
    contains_answer,
    count_score,
    exact_match,
    interval95,
    normalize_answer,
    parse_choice,
    retrieval_score,
    rouge_l,
    row_metric,
    score,
    string_match_all,
    string_match_part,
    token_f1,
)


__all__ = [
    "LONGBENCH_DEFAULT_PROMPT",
    "LONGBENCH_PROMPTS",
    "LONGBENCH_V2_PROMPT",
    "METRICS",
    "OPSDLEvalCallback",
    "RESULT_FILES",
    "TASK_METRICS",
    "check_results_dir",
    "choice_accuracy",
    "clear_results",
    "classification_score",
    "code_similarity",
    "contains_answer",
    "count_score",
    "evaluate_dataset",
    "evaluation_rows",
    "exact_match",
    "flatten_results",
    "greedy_generate",
    "interval95",
    "load_longbench",
    "load_longbench_v2",
    "normalize_answer",
    "parse_choice",
    "plot_accuracy_vs_length",
    "retrieval_score",
    "rouge_l",
    "row_metric",
    "save_results",
    "score",
    "score_completions",
    "shard_indices",
    "string_match_all",
    "string_match_part",
    "summarize",
    "token_f1",
]
