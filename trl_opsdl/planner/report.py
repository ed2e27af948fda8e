"""The planner's report: the per-phase table `trl-opsdl plan` prints, and the suggestion under it."""

from .memory import GIB, SUGGESTION_HEADROOM, Plan


def format_plan(plan: Plan, suggestion: Plan | None = None) -> str:
    """The per-component breakdown, the phase peaks and the verdict, as `trl-opsdl plan` prints them."""
    model, run = plan.model, plan.run

    def gib(value):
        return f"{value / GIB:9.2f}"

    lines = [
        f"Model: {model.name} ({model.model_type}, {model.num_params / 1e9:.2f}B parameters, {model.num_layers} layers, "
        f"hidden {model.hidden_size}, vocab {model.vocab_size})",
        f"Run: student prompt {run.context_length} + completion {run.completion_length} tokens, teacher prompt "
        f"{run.teacher_length} tokens, batch {run.batch_size} x {run.gradient_accumulation_steps} accumulation steps "
        f"(generated together), {run.dtype} on {run.device}, teacher '{run.teacher_kind}'",
        f"Parallelism: {run.describe()}",
        "",
        "Per-GPU memory by component (GiB):",
    ]
    with_checkpointing, without_checkpointing = (
        (plan.components["activations"], plan.activations_other)
        if run.gradient_checkpointing
        else (plan.activations_other, plan.components["activations"])
    )
    for name, value in plan.components.items():
        if name == "activations":
            for label, amount, used in (
                ("with gradient checkpointing", with_checkpointing, run.gradient_checkpointing),
                ("without gradient checkpointing", without_checkpointing, not run.gradient_checkpointing),
            ):
                lines.append(f"  {'activations, ' + label:42s}{gib(amount)}" + ("   <- this run" if used else ""))
            continue
        note = ""
        if name == "weights (teacher)":
            note = "   (shared with the student)" if value == 0 else "   (frozen copy)"
        lines.append(f"  {name:42s}{gib(value)}{note}")
    lines += ["", "Peak by phase (GiB):"]
    for name, value in plan.phases.items():
        lines.append(f"  {name:42s}{gib(value)}")
    peak_phase = max(plan.phases, key=plan.phases.get)
    lines.append(
        f"  {'+ runtime reserve, added to the peak':42s}{gib(plan.reserve)}   (CUDA context, NCCL, fragmentation)"
    )
    total = plan.peak + plan.reserve
    lines += [
        "",
        f"Peak: {total / GIB:.2f} GiB per GPU ({peak_phase}) of {run.gpu_memory_gib:g} GiB: "
        + ("FITS" if plan.fits else "DOES NOT FIT"),
    ]
    if suggestion is None:
        lines.append(
            f"No configuration with up to 64 GPUs fits with {SUGGESTION_HEADROOM:.0%} to spare; shorten the context, "
            "generate with a vLLM server (--generation vllm-server) or use larger GPUs."
        )
    elif suggestion.run == run:
        lines.append(f"This is already the cheapest configuration that fits with {SUGGESTION_HEADROOM:.0%} to spare.")
    else:
        lines.append(
            f"Cheapest configuration that fits with {SUGGESTION_HEADROOM:.0%} to spare: {suggestion.run.describe()} -> "
            f"{(suggestion.peak + suggestion.reserve) / GIB:.2f} GiB per GPU"
        )
        lines.append(f"  trl-opsdl plan ... {suggestion.run.flags()}")
    return "\n".join(lines)
