"""The planner's search: every configuration a user could switch to, ranked by relative step time; the cheapest that
fits with headroom is the suggestion."""

from dataclasses import replace
from itertools import product
from math import log2

from .memory import ModelShape, Plan, RunShape, estimate, sequence_parallel_problem


# Relative step-time cost of each memory-saving switch, used only to rank the configurations that fit.
COST_GRADIENT_CHECKPOINTING = 1.33  # one extra forward
COST_ZERO3 = 1.10  # parameter all-gathers in forward and backward
COST_OFFLOAD = 1.60  # optimizer (and parameters) over PCIe
COST_SP_PER_DOUBLING = 0.05  # attention all-to-alls
COST_SHARDED_GENERATION = 1.5  # a parameter all-gather per layer per generated token


def _relative_cost(run: RunShape) -> float:
    cost = 1.0
    if run.gradient_checkpointing:
        cost *= COST_GRADIENT_CHECKPOINTING
    if run.zero_stage == 3:
        cost *= COST_ZERO3
    if run.offload:
        cost *= COST_OFFLOAD
    if run.sp_size > 1:
        cost *= 1 + COST_SP_PER_DOUBLING * log2(run.sp_size)
    if run.generation == "sharded":
        cost *= COST_SHARDED_GENERATION
    return cost


def candidate_runs(model: ModelShape, run: RunShape, max_gpus: int = 64):
    """Configurations that differ from `run` only in memory switches (and, last, in GPU count or LoRA)."""
    stages = sorted({run.zero_stage, 2, 3}) if run.device == "cuda" else [run.zero_stage]
    gpu_counts = [run.num_gpus]
    while gpu_counts[-1] * 2 <= max(max_gpus, run.num_gpus):
        gpu_counts.append(gpu_counts[-1] * 2)
    loras = [run.lora_rank] if run.lora_rank else [None, 16]
    chunks = sorted({run.prefill_chunk_size or 0, 0 if run.context_length <= 4096 else 4096})
    for lora_rank in loras:
        for num_gpus in gpu_counts:
            for zero in stages:
                generations = (
                    {run.generation, "sharded"} if zero == 3 and run.generation != "vllm-server" else {run.generation}
                )
                for offload, checkpointing, generation, chunk in product(
                    [False, True] if zero else [False], (False, True), sorted(generations), chunks
                ):
                    for sp in range(1, num_gpus + 1):
                        if num_gpus % sp or (sp > 1 and sequence_parallel_problem(model, sp)):
                            continue
                        if sp > 1 and run.context_gradient == "none":  # nothing long runs with gradient to split
                            continue
                        yield replace(
                            run,
                            num_gpus=num_gpus,
                            zero_stage=zero,
                            offload=offload,
                            gradient_checkpointing=checkpointing,
                            sp_size=sp,
                            lora_rank=lora_rank,
                            generation=generation,
                            prefill_chunk_size=chunk or None,
                        )


def cheapest_fit(model: ModelShape, run: RunShape, max_gpus: int = 64) -> Plan | None:
    """The configuration that fits with `SUGGESTION_HEADROOM` to spare, keeping the user's training type if any does,
    on the fewest GPUs, at the lowest relative step cost."""
    best, best_key = None, None
    for candidate in candidate_runs(model, run, max_gpus):
        plan = estimate(model, candidate)
        if not plan.fits_with_headroom:
            continue
        key = (candidate.lora_rank != run.lora_rank, candidate.num_gpus, _relative_cost(candidate), plan.peak)
        if best_key is None or key < best_key:
            best, best_key = plan, key
    return best
