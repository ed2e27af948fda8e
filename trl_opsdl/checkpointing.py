"""Selective activation checkpointing: keep what matmuls and attention produce, recompute the elementwise ops.

At long context the student's activations dominate memory. Full checkpointing (TRL's default) keeps one hidden state
per layer and reruns the whole layer in the backward: about a third more compute. Most of a layer's saved bytes,
though, are elementwise results — the norms' intermediates, the rotary embedding, `act(gate)` and `act(gate) * up`
in the MLP — which are cheap to recompute, while the compute is in the matmuls and attention. Torch's selective
checkpointing (`torch.utils.checkpoint.create_selective_checkpoint_contexts`) lets a policy choose per op: here, the
outputs of matmuls and attention kernels are kept and everything else is recomputed from them.

One kind of matmul is recomputed too: a low-rank expansion, whose inner dimension is at most 1/16 of its output width
— LoRA's B projection (`[T, r] @ [r, out]`). Its output is as large as the base projection's, so keeping it would
double what the matmuls keep (on an H100, a 7B model with LoRA on every projection ran out of memory at 8K tokens with
it kept), while recomputing it costs r/in of the base projection's FLOPs.

What it costs (docs/scaling.md has the measurements): about a fifth less peak memory than no checkpointing; the
elementwise recompute is a small share of a step where attention dominates (long prompts) and a larger one on short
prompts.
"""

from functools import cache

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


# aten kernels whose outputs are kept; any that this torch build lacks is skipped.
_SAVED_ATEN_OPS = (
    "mm", "addmm", "bmm", "baddbmm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward", "_efficient_attention_forward",
)  # fmt: skip
# flash-attn 2 registers its kernels as torch custom ops (`attn_implementation="flash_attention_2"`).
_SAVED_FLASH_ATTN_OPS = ("_flash_attn_forward", "_flash_attn_varlen_forward")


@cache
def saved_ops() -> frozenset:
    """The op overloads whose outputs selective checkpointing keeps: matmuls and attention."""
    ops = set()
    for name in _SAVED_ATEN_OPS:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            ops.update(getattr(packet, overload) for overload in packet.overloads())
    try:
        flash_attn = torch.ops.flash_attn
        for name in _SAVED_FLASH_ATTN_OPS:
            packet = getattr(flash_attn, name)
            ops.update(getattr(packet, overload) for overload in packet.overloads())
    except (AttributeError, RuntimeError):  # flash-attn not installed
        pass
    return frozenset(ops)


LOW_RANK_RATIO = 16  # an mm whose inner dimension is at most 1/16 of its output width is recomputed (LoRA's B)


def low_rank_expansion(op, args) -> bool:
    """Whether this `mm`/`addmm` expands a low-rank input: `[M, K] @ [K, N]` with `K * LOW_RANK_RATIO <= N`."""
    packet = op.overloadpacket
    if packet is torch.ops.aten.mm:
        left, right = args[0], args[1]
    elif packet is torch.ops.aten.addmm:
        left, right = args[1], args[2]
    else:
        return False
    return left.shape[-1] * LOW_RANK_RATIO <= right.shape[-1]


def keep_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The policy: keep the outputs of matmuls (but low-rank expansions) and attention, recompute every other op in
    the backward."""
    if op in saved_ops() and not low_rank_expansion(op, args):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class SelectiveCheckpointing(str):
    """`context_fn` of `torch.utils.checkpoint.checkpoint` for `OPSDLConfig(activation_checkpointing_policy=
    "selective")`: each call returns fresh selective-checkpoint contexts with `keep_matmuls_and_attention`.

    It is a `str` so that the training arguments carrying it in `gradient_checkpointing_kwargs` stay JSON-serializable
    (TensorBoard and other integrations log `args.to_json_string()`); the text names what it is.
    """

    def __call__(self):
        return create_selective_checkpoint_contexts(keep_matmuls_and_attention)


SELECTIVE_CHECKPOINTING = SelectiveCheckpointing("trl_opsdl.checkpointing.SELECTIVE_CHECKPOINTING")
