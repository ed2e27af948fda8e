"""The planner's memory model: per-GPU bytes of one OPSDL step, phase by phase, for a model and a run shape.

The estimate follows the real `OPSDLTrainer` step, phase by phase:

1. generation: the long prompt + completion, whole on every rank (KV cache, one prefill layer at a time);
2. teacher no-grad forward on the short prompt + the same completion (one layer's temporaries at a time);
3. student forward on prompt + completion, activations kept for the backward (all of them, or one checkpoint per
   layer with gradient checkpointing), split `sp_size` ways with sequence parallelism; with `context_gradient="none"`
   over the completion only, attending to the prompt's keys/values kept from generation (or prefilled, chunked, after
   vLLM generation), each layer's attention saving the context's keys/values + the completion's for the backward;
4. the chunked loss over the `N` completion positions, never the `[N, vocab]` logits: on GPUs TRL's
   `ChunkedDivergenceFunction` (`[min(N, 4096), 32768]` fp32 tiles), on CPU `loss_utils.FusedReverseKL`;
5. backward (the loss's fp32 `lm_head` gradient, then the backbone, one recomputed layer at a time with
   checkpointing);
6. optimizer step.

The peak is the largest phase. Per-token activation sizes are those autograd saves for a Llama/Qwen2-style decoder
layer with SDPA/flash attention (counted with `saved_tensors_hooks` on CPU: 73,324 predicted vs 73,273 bytes/token
measured for the 4-layer calibration model). Weights, gradients and optimizer states follow the ZeRO paper's
accounting (bf16 weights and gradients, fp32 master weights + Adam moments under DeepSpeed). What is measured and
what is assumed is listed in docs/long_context.md.
"""

from dataclasses import dataclass, field
from functools import lru_cache


GIB = 2**30
TOKEN_CHUNK_SIZE = 4096  # rows of a loss tile (trl.kernels.chunked_divergence.TOKEN_CHUNK_SIZE)
VOCAB_CHUNK_SIZE = 32768  # columns of a loss tile (trl.kernels.chunked_divergence.VOCAB_CHUNK_SIZE)
CHUNK_ELEMENTS = 1 << 21  # logits per chunk of the CPU loss path (trl_opsdl.loss_utils.CHUNK_ELEMENTS)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
TEACHER_KINDS = ("base", "live", "ema")
DEVICES = ("cuda", "cpu")
# How generation runs: HF generate with the ZeRO-3 shards gathered into a whole model (TRL's default
# `ds3_gather_for_generation=True`), HF generate gathering layer by layer (`ds3_gather_for_generation=False`), or a
# vLLM server on other GPUs (`use_vllm=True, vllm_mode="server"`: nothing generated on the training GPUs).
GENERATION_MODES = ("gathered", "sharded", "vllm-server")
CONTEXT_GRADIENTS = ("full", "none")  # OPSDLConfig.context_gradient
CHECKPOINTING_POLICIES = ("full", "selective")  # OPSDLConfig.activation_checkpointing_policy
# The model's attention kernel: transformers' SDPA path repeats keys/values to the query head count whenever attention
# needs a mask; flash attention reads grouped keys/values as they are.
ATTENTION_IMPLEMENTATIONS = ("sdpa", "flash_attention_2")
# CUDA context, NCCL and cuBLAS workspaces (fixed), plus an allowance for allocator fragmentation (share of the GPU).
CUDA_RESERVE_BYTES = 2 * GIB
FRAGMENTATION_SHARE = 0.05
# A suggested configuration must also leave this share of the GPU free: the GPU-side accounting is measured on one H100.
SUGGESTION_HEADROOM = 0.10
# Chunk-sized fp32 temporaries alive at once in the CPU reverse-KL forward (`loss_utils._reverse_kl_pass`: student
# logits and log-probs, teacher logits and log-probs, probabilities, one product); its backward only rescales.
CPU_LOSS_FORWARD_TEMPORARIES = 6


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a decoder-only model, read from its config."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    num_params: int
    layer_params: int
    lm_head_params: int
    # (in_features, out_features) of every linear layer inside one decoder layer, for LoRA on all of them
    layer_linears: tuple = ()
    sliding_window_layers: bool = False

    def lora_params(self, rank: int) -> int:
        """Trainable parameters of LoRA with `rank` on every linear projection of every decoder layer."""
        return self.num_layers * sum(rank * (n_in + n_out) for n_in, n_out in self.layer_linears)


def model_shape_from_config(config, name: str = "model") -> ModelShape:
    """Build a `ModelShape` from a transformers config: parameter counts from the model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    text = config.get_text_config()
    for attribute in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if getattr(text, attribute, None) is None:
            raise ValueError(
                f"{name}: config.json has no `{attribute}`. The planner models dense decoder-only transformers "
                "(Llama, Qwen2, Mistral, ...); give it such a model's config."
            )
    if getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None):
        raise ValueError(
            f"{name}: a mixture-of-experts model ({text.model_type}); the planner models dense decoder-only "
            "transformers only."
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    num_params = sum(p.numel() for p in model.parameters())
    layers = model.get_decoder().layers
    layer_params = sum(p.numel() for p in layers[0].parameters())
    lm_head = model.get_output_embeddings()
    layer_linears = tuple(
        (module.in_features, module.out_features)
        for module in layers[0].modules()
        if isinstance(module, torch.nn.Linear)
    )
    num_heads = text.num_attention_heads
    return ModelShape(
        name=name,
        model_type=text.model_type,
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // num_heads,
        intermediate_size=text.intermediate_size,
        vocab_size=text.vocab_size,
        tied_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        num_params=num_params,
        layer_params=layer_params,
        lm_head_params=lm_head.weight.numel(),
        layer_linears=layer_linears,
        sliding_window_layers="sliding_attention" in (getattr(text, "layer_types", None) or ()),
    )


@lru_cache(maxsize=8)
def load_model_shape(model: str) -> ModelShape:
    """Read `config.json` of a local folder (or a hub id, where a network exists) into a `ModelShape`."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not read a model config from {model!r}: {error}. Pass a folder containing config.json, or a hub "
            "id on a machine with network access."
        ) from error
    return model_shape_from_config(config, name=model)


@dataclass(frozen=True)
class RunShape:
    """The run to plan: sequence lengths, parallelism and precision. Lengths are in tokens."""

    context_length: int  # the long student prompt
    completion_length: int = 512  # DistillationConfig.max_completion_length
    teacher_context_length: int | None = None  # the short teacher prompt; None: an eighth of the context
    batch_size: int = 1  # per_device_train_batch_size
    gradient_accumulation_steps: int = 1
    # Sequences generated at once per GPU. None: TRL's, batch_size x gradient_accumulation_steps (DistillationTrainer
    # generates a whole accumulation window in one `generate` call).
    generation_batch_size: int | None = None
    num_gpus: int = 8
    gpu_memory_gib: float = 80.0
    zero_stage: int = 3  # 0: no DeepSpeed (single process or DDP)
    offload: bool = False  # ZeRO optimizer offload to CPU (ZeRO-3: parameters too)
    lora_rank: int | None = None
    sp_size: int = 1
    gradient_checkpointing: bool = True
    # OPSDLConfig.activation_checkpointing_policy, with checkpointing on: "full" keeps one hidden state per layer,
    # "selective" the outputs of matmuls and attention (trl_opsdl/checkpointing.py)
    activation_checkpointing_policy: str = "full"
    dtype: str = "bf16"
    device: str = "cuda"
    teacher_kind: str = "base"
    generation: str = "gathered"
    prefill_chunk_size: int | None = None  # generation_kwargs={"prefill_chunk_size": N}: the prompt N tokens at a time
    context_gradient: str = "full"  # OPSDLConfig.context_gradient
    context_prefill_chunk_size: int = 4096  # OPSDLConfig.context_prefill_chunk_size (used after vLLM generation)
    attn_implementation: str = "sdpa"  # the model's `attn_implementation`

    @property
    def teacher_length(self) -> int:
        return self.teacher_context_length if self.teacher_context_length is not None else self.context_length // 8

    def flags(self) -> str:
        """The `trl-opsdl plan` arguments that describe this run's parallelism and memory switches."""
        parts = [f"--num-gpus {self.num_gpus}", f"--zero-stage {self.zero_stage}"]
        if self.offload:
            parts.append("--offload")
        if self.sp_size > 1:
            parts.append(f"--sp-size {self.sp_size}")
        if self.lora_rank:
            parts.append(f"--lora-rank {self.lora_rank}")
        parts.append("--gradient-checkpointing" if self.gradient_checkpointing else "--no-gradient-checkpointing")
        if self.gradient_checkpointing and self.activation_checkpointing_policy != "full":
            parts.append(f"--activation-checkpointing-policy {self.activation_checkpointing_policy}")
        if self.generation != "gathered":
            parts.append(f"--generation {self.generation}")
        if self.prefill_chunk_size:
            parts.append(f"--prefill-chunk-size {self.prefill_chunk_size}")
        if self.context_gradient != "full":
            parts.append(f"--context-gradient {self.context_gradient}")
        if self.attn_implementation != "sdpa":
            parts.append(f"--attn-implementation {self.attn_implementation}")
        return " ".join(parts)

    def describe(self) -> str:
        zero = (
            "no DeepSpeed"
            if self.zero_stage == 0
            else f"ZeRO-{self.zero_stage}" + (" + offload" if self.offload else "")
        )
        training = f"LoRA r={self.lora_rank}" if self.lora_rank else "full fine-tuning"
        checkpointing = "gradient checkpointing" if self.gradient_checkpointing else "no gradient checkpointing"
        if self.gradient_checkpointing and self.activation_checkpointing_policy != "full":
            checkpointing = f"{self.activation_checkpointing_policy} {checkpointing}"
        sp = f", sequence parallel {self.sp_size}" if self.sp_size > 1 else ""
        generation = "" if self.generation == "gathered" else f", generation {self.generation}"
        if self.prefill_chunk_size:
            generation += f", prefill in chunks of {self.prefill_chunk_size}"
        context = ", context keys/values without gradient" if self.context_gradient == "none" else ""
        return f"{self.num_gpus} GPU(s), {zero}, {training}, {checkpointing}{sp}{generation}{context}"


@dataclass
class Plan:
    """A memory estimate: per-component bytes, per-phase peaks, and the verdict against the per-GPU budget."""

    model: ModelShape
    run: RunShape
    components: dict = field(default_factory=dict)  # name -> bytes per GPU
    phases: dict = field(default_factory=dict)  # name -> peak bytes per GPU during that phase
    activations_other: float = 0.0  # activations with the other gradient-checkpointing setting
    reserve: float = 0.0

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def budget(self) -> float:
        return self.run.gpu_memory_gib * GIB

    @property
    def fits(self) -> bool:
        return self.peak + self.reserve <= self.budget

    @property
    def fits_with_headroom(self) -> bool:
        return self.peak + self.reserve <= (1 - SUGGESTION_HEADROOM) * self.budget


def validate_run(model: ModelShape, run: RunShape) -> None:
    """Refuse shapes the planner (or OPSDL) cannot serve, saying what to change."""
    positive = {
        "context_length": run.context_length,
        "completion_length": run.completion_length,
        "batch_size": run.batch_size,
        "gradient_accumulation_steps": run.gradient_accumulation_steps,
        "num_gpus": run.num_gpus,
        "sp_size": run.sp_size,
    }
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1.")
    if run.teacher_context_length is not None and run.teacher_context_length < 1:
        raise ValueError(f"teacher_context_length={run.teacher_context_length} must be at least 1 token.")
    if run.gpu_memory_gib <= 0:
        raise ValueError(f"gpu_memory_gib={run.gpu_memory_gib} must be positive (e.g. 80 for an H100 80GB).")
    if run.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={run.zero_stage} must be 0 (no DeepSpeed), 1, 2 or 3.")
    if run.offload and run.zero_stage == 0:
        raise ValueError("offload needs DeepSpeed ZeRO: pass --zero-stage 2 or 3 with --offload.")
    if run.lora_rank is not None and run.lora_rank < 1:
        raise ValueError(f"lora_rank={run.lora_rank} must be at least 1, or left out for full fine-tuning.")
    if run.dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={run.dtype!r} is not one of {tuple(DTYPE_BYTES)}.")
    if run.device not in DEVICES:
        raise ValueError(f"device={run.device!r} is not one of {DEVICES}.")
    if run.teacher_kind not in TEACHER_KINDS:
        raise ValueError(f"teacher_kind={run.teacher_kind!r} is not one of {TEACHER_KINDS}.")
    if run.prefill_chunk_size is not None and run.prefill_chunk_size < 1:
        raise ValueError(f"prefill_chunk_size={run.prefill_chunk_size} must be at least 1 token, or None.")
    if run.generation not in GENERATION_MODES:
        raise ValueError(f"generation={run.generation!r} is not one of {GENERATION_MODES}.")
    if run.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={run.attn_implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}.")
    if run.activation_checkpointing_policy not in CHECKPOINTING_POLICIES:
        raise ValueError(
            f"activation_checkpointing_policy={run.activation_checkpointing_policy!r} is not one of "
            f"{CHECKPOINTING_POLICIES}."
        )
    if run.context_gradient not in CONTEXT_GRADIENTS:
        raise ValueError(f"context_gradient={run.context_gradient!r} is not one of {CONTEXT_GRADIENTS}.")
    if run.context_prefill_chunk_size < 1:
        raise ValueError(f"context_prefill_chunk_size={run.context_prefill_chunk_size} must be at least 1 token.")
    if run.context_gradient == "none" and run.sp_size > 1:
        raise ValueError(
            f"context_gradient='none' runs no forward with gradient over the long prompt: sp_size={run.sp_size} has "
            "nothing to split. Use sp_size 1, or context_gradient 'full'."
        )
    if run.num_gpus % run.sp_size:
        raise ValueError(
            f"sp_size={run.sp_size} must divide num_gpus={run.num_gpus}: each sequence-parallel group is sp_size GPUs."
        )
    if run.sp_size > 1:
        problem = sequence_parallel_problem(model, run.sp_size)
        if problem:
            raise ValueError(problem)


def sequence_parallel_problem(model: ModelShape, sp_size: int) -> str | None:
    """Why `sp_size` cannot split this model's attention heads (Ulysses splits heads across the group), or None."""
    from trl_opsdl.sequence_parallel import head_split_problem

    problem = head_split_problem(model.num_heads, model.num_kv_heads, sp_size, model.name)
    if problem is None and model.sliding_window_layers:
        problem = f"{model.name} has sliding-window attention layers, which sequence parallelism does not serve."
    return problem


def activation_bytes(model: ModelShape, run: RunShape, tokens: int, checkpointed: bool) -> tuple:
    """Bytes autograd keeps from the student forward over `tokens` tokens, and what one decoder layer's recompute adds
    in the backward with checkpointing (its whole share without)."""
    b = DTYPE_BYTES[run.dtype]
    h, i, hd = model.hidden_size, model.intermediate_size, model.head_dim
    # Keys/values are saved with their own head count when attention runs without a padding mask (GQA kernels);
    # with padding (batch > 1) transformers' SDPA path repeats them to the query head count first.
    kv_heads = model.num_kv_heads if run.batch_size == 1 or flash(run) else model.num_heads
    # RMSNorm keeps its fp32 input and its normalized output, and the projections after it keep that output: x2 norms
    norms = 2 * (4 * h + 2 * b * h + 4)
    # q and k after RoPE, v, the attention output (shared with o_proj's input) and the fp32 log-sum-exp per head
    attention = b * (2 * model.num_heads * hd + 2 * kv_heads * hd) + 4 * model.num_heads
    if run.sp_size > 1:
        attention += b * model.num_heads * hd  # o_proj keeps the output after the all-to-all, a separate copy
    mlp = 4 * b * i  # gate and up outputs, the activation, and the product fed to down_proj
    # fp32 LoRA adapters on a half-precision model: each adapter casts its input to fp32 (PEFT's `_cast_input_dtype`;
    # the trainer's forward runs without autocast), and its A projection keeps that copy for the backward: four bytes
    # per input feature of every adapted linear (q, k, v, o, gate, up, down). Measured on an H100 (docs/results.md#on-a-gpu).
    lora_copies = 4 * sum(n_in for n_in, _ in model.layer_linears) if fp32_adapters(run) else 0
    per_layer = norms + attention + mlp + lora_copies
    # Shared across layers: input ids (int64), RoPE cos/sin, the final norm, the last hidden state held for the loss
    shared = 8 + 2 * b * hd + (4 * h + b * h) + b * h
    recompute_reuses = 0  # what the backward's recompute of a layer takes from the kept tensors instead of rerunning
    if not checkpointed:
        kept_per_layer = per_layer
    elif run.activation_checkpointing_policy == "selective":
        # The layer's input, every base projection's output, the attention kernel's output and log-sum-exp; LoRA's A
        # outputs (rank-wide, in the adapters' dtype). Everything elementwise and LoRA's B are recomputed.
        adapter_bytes = 4 if fp32_adapters(run) else b
        lora_a = adapter_bytes * (run.lora_rank or 0) * len(model.layer_linears)
        kept_per_layer = (
            b * h + b * sum(n_out for _, n_out in model.layer_linears) + b * model.num_heads * hd
            + 4 * model.num_heads + lora_a
        )  # fmt: skip
        recompute_reuses = kept_per_layer - b * h
    else:
        kept_per_layer = b * h  # full checkpointing: each layer keeps only its input
    return tokens * (model.num_layers * kept_per_layer + shared), tokens * (per_layer - recompute_reuses)


def _no_grad_forward_bytes(model: ModelShape, run: RunShape, tokens: int, adapters: bool = False) -> float:
    """Largest temporaries of a no-grad forward (the teacher's, HF generate's prefill): one layer's at a time.

    Two hidden-state copies (residual and normed), the MLP's activation, up and product, and RoPE's cos/sin: measured
    on CPU at 10,779 bytes/token for the calibration model, 10,752 predicted.

    `adapters`: the forward runs through fp32 LoRA adapters on a half-precision model (generation with the student).
    Inside `up_proj` the layer then holds the residual and normed states, `gate`'s output and `up`'s base output, the
    fp32 copy of the input, and two fp32 `[tokens, intermediate]` tensors: B's output scaled, and its sum with the
    base output before the cast back. On an H100 this predicted the 7B generation peak at 8K and 32K within 2%.
    """
    b = DTYPE_BYTES[run.dtype]
    h, i = model.hidden_size, model.intermediate_size
    per_token = 4 * b * h + 3 * b * i
    if adapters and fp32_adapters(run):
        per_token = max(per_token, 2 * b * h + 4 * h + 2 * b * i + 8 * i)
    return tokens * (per_token + 2 * b * model.head_dim)


def fp32_adapters(run: RunShape) -> bool:
    """LoRA adapters kept in fp32 on a half-precision model: PEFT's default (`autocast_adapter_dtype=True`), which TRL
    keeps except under ZeRO-3, where it builds them in the model's dtype."""
    return run.lora_rank is not None and DTYPE_BYTES[run.dtype] < 4 and run.zero_stage != 3


def _prefill_bytes(model: ModelShape, run: RunShape, batch: int, total_tokens: int) -> float:
    """Largest temporaries of HF generate's prefill: the whole prompt's no-grad forward, or with `prefill_chunk_size`
    one chunk's, plus the `[chunk, cache]` mask each chunk attends through (bool, and its float copy inside SDPA) and
    the copy `torch.cat` makes of one layer's growing cache (measured on CPU within 3%)."""
    b = DTYPE_BYTES[run.dtype]
    hd = model.head_dim
    chunk = min(run.context_length, run.prefill_chunk_size or run.context_length)
    transient = _no_grad_forward_bytes(model, run, batch * chunk, adapters=True)
    if chunk < run.context_length:
        transient += batch * chunk * total_tokens * 5  # the mask, bool + float
        transient += batch * 2 * model.num_kv_heads * hd * b * total_tokens  # one layer's cache, copied by torch.cat
    return transient


def flash(run: RunShape) -> bool:
    return run.attn_implementation == "flash_attention_2"


def student_tokens_full(run: RunShape) -> int:
    """Positions one micro-batch's attention reads: the whole prompt + completion, per row, times the batch."""
    return run.batch_size * (run.context_length + run.completion_length)


def loss_tiles(positions: int, vocab_size: int) -> int:
    """How many `[TOKEN_CHUNK_SIZE, VOCAB_CHUNK_SIZE]` tiles TRL's chunked divergence runs over."""
    return -(-positions // TOKEN_CHUNK_SIZE) * -(-vocab_size // VOCAB_CHUNK_SIZE)


def _loss_bytes(model: ModelShape, run: RunShape, lm_head_trainable: bool) -> tuple:
    """Forward and backward bytes of TRL's chunked divergence over the completion positions (unsplit by SP)."""
    b = DTYPE_BYTES[run.dtype]
    n = run.batch_size * run.completion_length  # CPU projects every position; GPU the valid ones (at most this)
    rows = min(n, TOKEN_CHUNK_SIZE)
    buffer = rows * VOCAB_CHUNK_SIZE * 4  # one fp32 tile buffer (student or teacher)
    saved = 2 * n * model.hidden_size * b  # the flattened student and teacher hidden states
    grad_hidden = n * model.hidden_size * 4  # accumulated in fp32
    grad_weight = model.lm_head_params * (4 + (b if b < 4 else 0)) if lm_head_trainable else 0  # fp32, then cast
    if run.device == "cpu":
        # Off Triton devices the reverse KL runs `loss_utils.FusedReverseKL`: `positions_per_chunk(V)` positions at a
        # time, each chunk's temporaries freed before the next, and the gradients of the hidden states and of the head
        # computed in the forward and kept until the backward, which only rescales them.
        chunk_logits = min(n, max(1, CHUNK_ELEMENTS // model.vocab_size)) * model.vocab_size * 4
        forward = CPU_LOSS_FORWARD_TEMPORARIES * chunk_logits + grad_hidden + grad_weight
        backward = 0
    else:
        forward = 2 * buffer
        # The tile cast back to the compute dtype for the two gradient matmuls. From the second tile on, the next cast
        # is made before the previous one is released (`grad_tile = s_tile.to(...)` in TRL's loop): two at once. On an
        # H100 this closed the 0.25 GiB the planner missed at 16384 x 32000 and 4096 x 152064.
        tiles = loss_tiles(n, model.vocab_size)
        backward = 2 * buffer + (min(tiles, 2) * rows * VOCAB_CHUNK_SIZE * b if b < 4 else 0)
    return saved + forward, saved + backward + grad_hidden + grad_weight


def estimate(model: ModelShape, run: RunShape) -> Plan:
    """Per-GPU memory of one OPSDL training step (steady state: optimizer states already allocated)."""
    validate_run(model, run)
    b = DTYPE_BYTES[run.dtype]
    n_gpus = run.num_gpus
    zero, offload = run.zero_stage, run.offload
    psi = model.num_params
    lora = run.lora_rank is not None

    # --- weights, gradients, optimizer states (the ZeRO paper's accounting) ---
    if zero == 3:
        weights = 0 if offload else psi * b / n_gpus
    else:
        weights = psi * b
    if lora:
        trainable = model.lora_params(run.lora_rank)
        # PEFT keeps adapters in fp32: weights, gradients and two Adam moments, 16 bytes per parameter
        weights += 4 * trainable
        gradients = 4 * trainable
        optimizer = 8 * trainable
        resident_gradients = True
    else:
        master = 4 if b < 4 else 0  # DeepSpeed keeps an fp32 master copy of half-precision weights
        if zero == 0:
            gradients = psi * b  # allocated during the backward, freed after the step
            optimizer = 2 * psi * b  # torch AdamW keeps its moments in the parameters' dtype
            resident_gradients = False
        else:
            gradients = psi * b / n_gpus if zero >= 2 else psi * b
            optimizer = 0 if offload else psi * (8 + master) / n_gpus
            resident_gradients = True
    # ZeRO-3 gathers a couple of layers at a time, and the whole lm_head for the chunked loss
    zero3_gathered = (2 * model.layer_params + model.lm_head_params) * b if zero == 3 else 0

    # --- teacher weights ---
    if run.teacher_kind == "live" or (run.teacher_kind == "base" and lora):
        teacher_weights = 0  # the student's own weights (with PEFT: adapters disabled)
    else:
        teacher_weights = psi * b / n_gpus if zero == 3 else psi * b  # a frozen copy (or the EMA copy)

    # --- activations and the forward passes ---
    none = run.context_gradient == "none"
    # "none": the forward with gradient covers the completion positions only (the last prompt token + completion)
    student_tokens = run.batch_size * (run.completion_length if none else run.context_length + run.completion_length)
    local_tokens = -(-student_tokens // run.sp_size)  # sequence parallelism splits the student sequence
    activations, layer_activations = activation_bytes(model, run, local_tokens, run.gradient_checkpointing)
    activations_other, _ = activation_bytes(model, run, local_tokens, not run.gradient_checkpointing)
    recompute = layer_activations if run.gradient_checkpointing else 0
    backward_transient = local_tokens * b * model.hidden_size  # gradient of the hidden states between layers
    teacher_tokens = run.batch_size * (run.teacher_length + run.completion_length)
    # a `live` teacher is the student itself, adapters on; `base` with LoRA disables them; `ema` is a plain copy
    teacher_forward = _no_grad_forward_bytes(model, run, teacher_tokens, adapters=run.teacher_kind == "live")
    teacher_hidden = teacher_tokens * model.hidden_size * b
    lm_head_trainable = not lora
    loss_forward, loss_backward = _loss_bytes(model, run, lm_head_trainable)
    if run.sp_size > 1:
        # every SP rank gathers the completion hidden states for the (unsplit) loss
        loss_forward += run.batch_size * run.completion_length * model.hidden_size * b

    # --- generation: whole sequences on every rank ---
    generation_batch = run.generation_batch_size or run.batch_size * run.gradient_accumulation_steps
    generated_tokens = run.context_length + run.completion_length
    kv_cache = 2 * model.num_layers * model.num_kv_heads * model.head_dim * b * generated_tokens * generation_batch
    prefill = _prefill_bytes(model, run, generation_batch, generated_tokens)
    last_logits = generation_batch * model.vocab_size * 4
    if run.generation == "vllm-server":
        kv_cache = prefill = last_logits = 0
    if zero == 3:
        # the whole model (`ds3_gather_for_generation=True`), or a couple of layers at a time
        gathered_for_generation = psi * b - weights if run.generation == "gathered" else zero3_gathered
    else:
        gathered_for_generation = 0

    # --- "none": the context's keys/values, from the teacher forward to the last micro-step's backward ---
    context_kv = context_saved = context_backward = context_prefill = 0
    kept_from_generation = none and run.generation != "vllm-server"
    if none:
        kv_per_token = 2 * model.num_layers * model.head_dim * b
        # Kept from generation for the whole generation batch (TRL splits it into micro-batches after generating);
        # after vLLM generation nothing is kept and each micro-batch prefills its own, chunk by chunk.
        kept_rows = run.batch_size if run.generation == "vllm-server" else generation_batch
        context_kv = kv_per_token * model.num_kv_heads * run.context_length * kept_rows
        # A layer's attention saves its keys/values (context + completion) for the backward; transformers' SDPA path
        # repeats them to the query head count first (a mask is needed: queries and keys differ in length). Without
        # checkpointing every layer keeps them; with it each layer keeps only its input, and the keys/values exist for
        # the one layer being recomputed, beside their gradients (on an H100 at 32K: 18.2 GiB measured, 17.7 planned).
        saved_heads = model.num_kv_heads if flash(run) else model.num_heads
        layer_kv = 2 * model.head_dim * b * saved_heads * student_tokens_full(run)
        if run.gradient_checkpointing:
            context_saved, context_backward = 0, 2 * layer_kv
        else:
            context_saved = model.num_layers * layer_kv
            context_backward = context_saved + layer_kv
        if run.generation == "vllm-server":
            context_prefill = _no_grad_forward_bytes(
                model, run, run.batch_size * min(run.context_length, run.context_prefill_chunk_size), adapters=True
            )

    resident = weights + teacher_weights + optimizer + (gradients if resident_gradients else 0)
    training = resident + zero3_gathered + context_kv
    lm_head_grad = 0 if (lora or resident_gradients) else model.lm_head_params * b
    phases = {
        "generation": resident + gathered_for_generation + kv_cache + prefill + last_logits,
        # OPSDLTrainer runs the teacher first, so its temporaries never meet the student's activations; the context's
        # keys/values are there already when generation kept them, and prefilled after it otherwise
        "teacher forward": training - (0 if kept_from_generation else context_kv) + teacher_forward,
        "loss": training + context_saved + activations + teacher_hidden + loss_forward,
        "backward": training
        + max(
            context_saved + activations + loss_backward,  # the loss backward, before the backbone's
            context_backward
            + activations
            + recompute
            + lm_head_grad
            + backward_transient,  # the last layer's backward
            (0 if resident_gradients else gradients) + layer_activations + backward_transient,  # the first layer's
        ),
        "optimizer step": resident + (0 if resident_gradients else gradients),
    }
    if context_prefill:
        phases["context prefill"] = training + context_prefill
    components = {
        "weights (student)": weights,
        "weights (teacher)": teacher_weights,
        "gradients": gradients,
        "optimizer states": optimizer,
        "ZeRO-3 gathered parameters": zero3_gathered,
        "activations": activations,
        "recomputed layer (checkpointing)": recompute,
        "context keys/values (context_gradient none)": context_kv + max(context_saved, context_backward),
        "chunked loss": max(loss_forward, loss_backward),
        "teacher forward": teacher_forward + teacher_hidden,
        "generation KV cache": kv_cache,
        "generation prefill": prefill + last_logits + gathered_for_generation,
    }
    reserve = CUDA_RESERVE_BYTES + FRAGMENTATION_SHARE * run.gpu_memory_gib * GIB if run.device == "cuda" else 0
    return Plan(model, run, components, phases, activations_other, reserve)
