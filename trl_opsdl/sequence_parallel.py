"""Ulysses sequence parallelism for OPSDL's long student forward (DeepSpeed-Ulysses style, on torch.distributed).

TRL 1.16 refuses sequence parallelism in every trainer that generates: the inputs exist only after generation, so the
raw batch cannot be split by the data loader (accelerate's `UlyssesSPDataLoaderAdapter`). OPSDL splits after
generation instead, inside the loss:

1. every rank of a sequence-parallel (SP) group holds the same sequences (`sp_broadcast_batch`, right after
   generation: the group's first rank's batch wins);
2. `sp_student_hidden_states` gives each rank one contiguous slice of every prompt + completion; each attention layer
   swaps "my slice, all heads" for "the whole sequence, my heads" with an all-to-all, runs the model's own attention
   kernel (SDPA or flash) causally, and swaps back; MLPs and norms only ever see the local slice, so activation memory
   per rank is 1/sp of the sequence;
3. the completion positions' hidden states are gathered to every rank, which computes the (short) loss and the
   teacher's short forward unsplit, exactly as without SP.

Padding: prompts are left-padded and completions right-padded. Each row is rotated so that its tokens start at position
0 and padding only follows them; causal attention then needs no padding mask (none is materialized: a 128K x 128K mask
would not fit), and RoPE, which depends only on relative positions, gives the same values.

Gradients: every rank computes the same loss from the same gathered hidden states. Each rank's parameter gradient is
the part flowing through its slice, scaled by the group size, so that the mean over the group (what DDP and DeepSpeed
compute over all ranks) is the full gradient: SP ranks look like data-parallel replicas holding the same sequences.

How a trainer uses it (`tests/sp_trainer_worker.py` does exactly this and trains like one process):

    # __init__, after the parent's (every rank, collective):
    check_sequence_parallel(self.accelerator.unwrap_model(self.model), sp_size, self.accelerator.num_processes)
    self._sp_group = sequence_parallel_group(sp_size)            # None when sp_size == 1
    # end of _generate_and_score_completions, once the batch (loss mask included) is complete:
    output = sp_broadcast_batch(output, self._sp_group, device)
    output["num_items_in_batch"] = self.accelerator.gather(output["loss_mask"].sum()).sum()
    # the student forward in _compute_loss (the teacher's stays as it is):
    student_hidden_BKH = sp_student_hidden_states(unwrapped_student, input_ids, attention_mask, logits_to_keep,
                                                  self._sp_group)
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist


SP_KWARG = "opsdl_sequence_parallel"  # forwarded by transformers from the backbone call down to the attention function
SUPPORTED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")
ULYSSES_PREFIX = "opsdl_ulysses_"  # + one of SUPPORTED_ATTENTION: the named attention of `ulysses_attention_name`
_GROUPS = {}


@dataclass(frozen=True)
class SPState:
    """The sequence-parallel group as the attention wrapper sees it. `group=None`: one rank, no communication."""

    group: object
    size: int
    rank: int


def head_split_problem(num_heads: int, num_kv_heads: int, sp_size: int, name: str = "the model") -> str | None:
    """Why Ulysses cannot split these attention heads `sp_size` ways (each rank gets whole heads), or None."""
    if num_heads % sp_size:
        return (
            f"sequence_parallel_size={sp_size} does not divide the {num_heads} attention heads of {name}: each rank "
            "of the group computes a whole number of heads. Pick a divisor of the head count."
        )
    if num_kv_heads % sp_size and sp_size % num_kv_heads:
        return (
            f"sequence_parallel_size={sp_size} and the {num_kv_heads} key/value heads of {name} do not divide each "
            "other: pick a size that divides the key/value heads, or a multiple of them (the heads are then copied)."
        )
    return None


def check_sequence_parallel(model, sp_size: int, world_size: int) -> None:
    """Refuse what the sequence-parallel student forward cannot serve, with what to change. Call it in the trainer."""
    if sp_size < 1:
        raise ValueError(f"sequence_parallel_size={sp_size} must be at least 1 (1 turns sequence parallelism off).")
    if sp_size == 1:
        return
    if world_size % sp_size:
        raise ValueError(
            f"sequence_parallel_size={sp_size} does not divide the {world_size} processes: each group of "
            f"{sp_size} consecutive ranks shares its sequences. Launch a multiple of {sp_size} processes."
        )
    config = model.config.get_text_config()
    name = getattr(config, "_name_or_path", None) or config.model_type
    problem = head_split_problem(
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        sp_size,
        name,
    )
    if problem:
        raise ValueError(problem)
    implementation = model.config._attn_implementation.removeprefix(ULYSSES_PREFIX)
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"Sequence parallelism runs the model's attention kernel on whole sequences without a mask, which "
            f"attn_implementation={implementation!r} cannot do (eager builds an L x L mask). Load the model with "
            f"attn_implementation='sdpa' or 'flash_attention_2' (model_init_kwargs={{'attn_implementation': 'sdpa'}})."
        )
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        raise ValueError(
            f"{name} has sliding-window attention layers; the sequence-parallel attention is causal over the whole "
            "sequence and would attend past the window. Use sequence_parallel_size=1 for this model."
        )
    if getattr(model.config, "vision_config", None) is not None:
        raise ValueError(
            "Sequence parallelism splits token sequences only; vision-language models (image inputs) are not served. "
            "Use sequence_parallel_size=1."
        )


def sequence_parallel_group(sp_size: int):
    """This rank's SP group: consecutive blocks of `sp_size` ranks. Every rank must call it (collective, cached)."""
    if sp_size == 1:
        return None
    if sp_size not in _GROUPS:
        world, rank = dist.get_world_size(), dist.get_rank()
        mine = None
        for start in range(0, world, sp_size):
            group = dist.new_group(list(range(start, start + sp_size)))
            if start <= rank < start + sp_size:
                mine = group
        _GROUPS[sp_size] = mine
    return _GROUPS[sp_size]


def _state(group) -> SPState:
    if group is None:
        return SPState(None, 1, 0)
    return SPState(group, dist.get_world_size(group), dist.get_rank(group))


class _AllToAll(torch.autograd.Function):
    """Chunk `j` of dim 0 goes to rank `j`; chunk `i` of the output came from rank `i`. Its own inverse."""

    @staticmethod
    def forward(ctx, chunks, group):
        ctx.group = group
        return _exchange(chunks, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.group), None


def _exchange(chunks, group):
    # contiguous on both sides: all_to_all_single moves raw memory, and `empty_like` of a permuted gradient would
    # keep its strides
    chunks = chunks.contiguous()
    out = torch.empty_like(chunks, memory_format=torch.contiguous_format)
    dist.all_to_all_single(out, chunks, group=group)
    return out


def _all_to_all(chunks, state: SPState):
    return chunks if state.size == 1 else _AllToAll.apply(chunks, state.group)


def _sequence_to_heads(x_BASD, state: SPState):
    """(B, heads, local length, D) -> (B, heads / sp, full length, D): this rank's heads over the whole sequence."""
    b, heads, length, d = x_BASD.shape
    sp = state.size
    chunks = x_BASD.reshape(b, sp, heads // sp, length, d).permute(1, 0, 2, 3, 4)  # chunk j: rank j's heads
    chunks = _all_to_all(chunks.contiguous(), state)  # chunk i: rank i's slice of the sequence, my heads
    return chunks.permute(1, 2, 0, 3, 4).reshape(b, heads // sp, sp * length, d)


def _heads_to_sequence(x_BSAD, state: SPState):
    """(B, full length, heads / sp, D) -> (B, local length, heads, D): every head over this rank's slice."""
    b, length, heads, d = x_BSAD.shape
    sp = state.size
    chunks = x_BSAD.reshape(b, sp, length // sp, heads, d).permute(1, 0, 2, 3, 4)  # chunk j: rank j's slice
    chunks = _all_to_all(chunks.contiguous(), state)  # chunk i: rank i's heads over my slice
    return chunks.permute(1, 2, 0, 3, 4).reshape(b, length // sp, sp * heads, d)


def _ulysses_attention(core, state, module, query, key, value, *args, **kwargs):
    sp = state.size
    if key.shape[1] < sp:  # fewer key/value heads than ranks: each rank needs a copy of its query heads' kv head
        key = key.repeat_interleave(sp // key.shape[1], dim=1)
        value = value.repeat_interleave(sp // value.shape[1], dim=1)
    query, key, value = (_sequence_to_heads(x, state) for x in (query, key, value))
    # The rows were rotated so padding only follows the tokens: plain causal attention over the whole sequence is
    # exact. Drop the per-slice position ids too (flash attention would read their jumps as packed sequences).
    kwargs.pop("position_ids", None)
    groups = getattr(module, "num_key_value_groups", None)
    module.num_key_value_groups = query.shape[1] // key.shape[1]
    try:
        out_BSAD, _ = core(module, query, key, value, None, *args, **kwargs)
    finally:
        module.num_key_value_groups = groups
    return _heads_to_sequence(out_BSAD, state), None


def ulysses_attention_name(implementation: str) -> str:
    """The name of the attention that runs Ulysses over `implementation` (`sdpa`, flash), registered on first use.

    It is registered with transformers' `AttentionInterface` (and its mask function with `AttentionMaskInterface`) as
    `opsdl_ulysses_<implementation>`: a call carrying the SP state runs Ulysses around the original kernel; a call
    without it (generation, the teacher's forward) goes to the original kernel unchanged. `sdpa` itself is never
    replaced, so other models in the process are not touched.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    core_name = implementation.removeprefix(ULYSSES_PREFIX)
    if core_name not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attn_implementation={implementation!r} cannot run sequence-parallel; use one of {SUPPORTED_ATTENTION}."
        )
    name = ULYSSES_PREFIX + core_name
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    core = ALL_ATTENTION_FUNCTIONS[core_name]

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        state = kwargs.pop(SP_KWARG, None)
        if state is None:
            return core(module, query, key, value, attention_mask, *args, **kwargs)
        return _ulysses_attention(core, state, module, query, key, value, *args, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[core_name])
    return name


def use_ulysses_attention(model) -> None:
    """Point `model`'s attention (only this model's config and its sub-configs) at [`ulysses_attention_name`].
    Idempotent."""
    config = model.config
    config._attn_implementation = ulysses_attention_name(config._attn_implementation)


@dataclass(frozen=True)
class RotationPlan:
    """Where each row's tokens go once rotated to start at 0, and where its completion hidden states land."""

    gather_index_BL: torch.Tensor  # rotated[b, i] = original[b, gather_index[b, i]]
    padded_length: int  # the rotated length, padded to a multiple of the group size
    window_start: int  # the smallest rotated position any row's completion states start at
    window_length: int
    window_index_BK: torch.Tensor  # row b's K completion states inside the gathered window


def rotation_plan(attention_mask_BL: torch.Tensor, logits_to_keep: int, sp_size: int) -> RotationPlan:
    """Rotate each row so its tokens come first, and find the completion positions TRL's forward keeps.

    TRL keeps the hidden states at original positions `L-1-K .. L-2` (each predicts the next token). A row with `s`
    leading pad tokens has them at rotated positions `L-1-K-s .. L-2-s`.
    """
    b, length = attention_mask_BL.shape
    mask = attention_mask_BL.bool()
    positions = torch.arange(length, device=mask.device)
    starts_B = mask.int().argmax(dim=1)
    counts_B = mask.sum(dim=1)
    contiguous = mask == ((positions >= starts_B[:, None]) & (positions < (starts_B + counts_B)[:, None]))
    if not bool(contiguous.all()) or bool((counts_B == 0).any()):
        raise ValueError(
            "Sequence parallelism expects each row as left padding, prompt + completion tokens, right padding (the "
            "attention mask one contiguous run of ones); got a mask with gaps or an empty row."
        )
    if logits_to_keep < 1 or logits_to_keep >= length:
        raise ValueError(
            f"logits_to_keep={logits_to_keep} must be in [1, {length - 1}] for sequences of length {length}."
        )
    gather_index = (positions[None, :] + starts_B[:, None]) % length
    padded = -(-length // sp_size) * sp_size
    first_B = length - 1 - logits_to_keep - starts_B  # rotated position of each row's first kept state (>= 0)
    window_start = int(first_B.min())
    window_length = int((first_B + logits_to_keep).max()) - window_start
    window_index = (first_B - window_start)[:, None] + torch.arange(logits_to_keep, device=mask.device)[None, :]
    return RotationPlan(gather_index, padded, window_start, window_length, window_index)


class _GatherWindow(torch.autograd.Function):
    """Every rank's part of the window `[start, start + length)` of the sequence, summed into the whole window.

    Backward: every rank computed the same loss from the same window, so its gradient there is the same everywhere;
    each rank keeps its own slice's part, times `scale`.
    """

    @staticmethod
    def forward(ctx, local_BSH, start, length, offset, group, scale):
        b, local_length, hidden = local_BSH.shape
        window = local_BSH.new_zeros(b, length, hidden)
        lo, hi = max(start, offset), min(start + length, offset + local_length)
        if lo < hi:
            window[:, lo - start : hi - start] = local_BSH[:, lo - offset : hi - offset]
        if group is not None:
            dist.all_reduce(window, group=group)
        ctx.bounds = (lo, hi, start, offset, local_length, scale)
        return window

    @staticmethod
    def backward(ctx, grad_window):
        lo, hi, start, offset, local_length, scale = ctx.bounds
        b, _, hidden = grad_window.shape
        grad_local = grad_window.new_zeros(b, local_length, hidden)
        if lo < hi:
            grad_local[:, lo - offset : hi - offset] = grad_window[:, lo - start : hi - start] * scale
        return grad_local, None, None, None, None, None


def sp_student_hidden_states(model, input_ids_BL, attention_mask_BL, logits_to_keep: int, group=None):
    """The student's completion hidden states `(B, K, H)`, as `DistillationTrainer._get_last_hidden_state` returns
    them, computed with the sequence split across `group` (every rank of which passes the same inputs).

    Returns the same tensor on every rank of the group. Each rank's parameter gradients are its slice's share times
    the group size: averaged over the group (as DDP / DeepSpeed do over all ranks) they are the single-rank gradients.
    `group=None` runs on one rank (no communication): the same rotation and mask-free attention, for tests.
    """
    from accelerate.utils import is_peft_model

    state = _state(group)
    if is_peft_model(model):
        model = model.base_model.model
    use_ulysses_attention(model)
    plan = rotation_plan(attention_mask_BL, logits_to_keep, state.size)
    rotated_BL = input_ids_BL.gather(1, plan.gather_index_BL)
    extra = plan.padded_length - rotated_BL.shape[1]
    if extra:  # padding after every row's tokens: causal attention never lets earlier positions see it
        rotated_BL = torch.cat([rotated_BL, rotated_BL[:, -1:].expand(-1, extra)], dim=1)
    local_length = plan.padded_length // state.size
    offset = state.rank * local_length
    local_ids_BS = rotated_BL[:, offset : offset + local_length]
    position_ids_BS = torch.arange(offset, offset + local_length, device=input_ids_BL.device)[None, :].expand(
        input_ids_BL.shape[0], -1
    )
    # The backbone, as TRL takes it (`base_model` skips the lm_head); the SP state rides the attention kwargs, so it
    # reaches every layer, and the layers recomputed by gradient checkpointing too.
    hidden_BSH = model.base_model(
        input_ids=local_ids_BS,
        position_ids=position_ids_BS,
        attention_mask=None,
        use_cache=False,
        **{SP_KWARG: state},
    ).last_hidden_state
    window_BWH = _GatherWindow.apply(
        hidden_BSH, plan.window_start, plan.window_length, offset, state.group, float(state.size)
    )
    index_BKH = plan.window_index_BK[:, :, None].expand(-1, -1, window_BWH.shape[-1])
    return window_BWH.gather(1, index_BKH)


def sp_broadcast_batch(batch: dict, group, device=None) -> dict:
    """Give every rank of `group` its first rank's batch (and CPU random state). Call it right after generation.

    The CPU random state travels too, so TRL's `shuffle_sequence_dict` then splits the generation batch into the same
    micro-batches on every rank of the group. Recompute `num_items_in_batch` afterwards (each sequence is then counted
    once per SP rank, which the gradient scale of `sp_student_hidden_states` expects).
    """
    if group is None:
        return batch
    leader = dist.get_global_rank(group, 0)
    payload = [None]
    if dist.get_rank() == leader:
        cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        payload = [(cpu, torch.get_rng_state())]
    dist.broadcast_object_list(payload, src=leader, group=group)
    received, rng_state = payload[0]
    if device is None:
        device = next((v.device for v in batch.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    torch.set_rng_state(rng_state)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in received.items()}
