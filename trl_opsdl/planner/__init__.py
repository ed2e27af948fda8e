"""Per-GPU memory planner for an OPSDL run (`trl-opsdl plan`): which configuration fits before any GPU is rented.

- `memory`: the model of one step's memory, phase by phase (`ModelShape`, `RunShape`, `estimate` -> `Plan`).
- `search`: the configurations a user could switch to, ranked by step time (`cheapest_fit`).
- `report`: the table the command prints (`format_plan`).
"""

from .memory import (
    CHUNK_ELEMENTS,
    CPU_LOSS_FORWARD_TEMPORARIES,
    CUDA_RESERVE_BYTES,
    DEVICES,
    DTYPE_BYTES,
    FRAGMENTATION_SHARE,
    GENERATION_MODES,
    GIB,
    SUGGESTION_HEADROOM,
    TEACHER_KINDS,
    TOKEN_CHUNK_SIZE,
    VOCAB_CHUNK_SIZE,
    ModelShape,
    Plan,
    RunShape,
    activation_bytes,
    estimate,
    load_model_shape,
    model_shape_from_config,
    sequence_parallel_problem,
    validate_run,
)
from .report import format_plan
from .search import candidate_runs, cheapest_fit


__all__ = [
    "CHUNK_ELEMENTS",
    "CPU_LOSS_FORWARD_TEMPORARIES",
    "CUDA_RESERVE_BYTES",
    "DEVICES",
    "DTYPE_BYTES",
    "FRAGMENTATION_SHARE",
    "GENERATION_MODES",
    "GIB",
    "ModelShape",
    "Plan",
    "RunShape",
    "SUGGESTION_HEADROOM",
    "TEACHER_KINDS",
    "TOKEN_CHUNK_SIZE",
    "VOCAB_CHUNK_SIZE",
    "activation_bytes",
    "candidate_runs",
    "cheapest_fit",
    "estimate",
    "format_plan",
    "load_model_shape",
    "model_shape_from_config",
    "sequence_parallel_problem",
    "validate_run",
]
