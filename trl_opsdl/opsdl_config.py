"""`OPSDLConfig`: TRL's `DistillationConfig` plus what a short-context self-teacher needs."""

import warnings
from dataclasses import dataclass, field

import torch
from trl import DistillationConfig


TEACHER_KINDS = ("base", "live", "ema")
DISTILLATION_MODES = ("full_logits", "sampled_token", "topk_logits")
TRUNCATION_POLICIES = ("error", "middle", "left")
CHECKPOINTING_POLICIES = ("full", "selective")
SAMPLED_TOKEN_BASELINES = ("none", "mean")
CONTEXT_GRADIENTS = ("full", "none")


def default_bf16(fp16: bool) -> bool:
    """`bf16` when the user leaves it unset: on only where a CUDA device supports it, and never with fp16."""
    return not fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class OPSDLConfig(DistillationConfig):
    r"""
    Configuration class for the [`OPSDLTrainer`].

    OPSDL (On-Policy Self-Distillation for Long context, arXiv 2604.17535) samples a response to the long prompt and
    trains it towards what the *same* model predicts for those tokens given only the short, relevant context. Every
    field of [`~trl.DistillationConfig`] applies; the ones below are added or have other defaults.

    Parameters:
        > Parameters that control the teacher

        teacher_prompt_column (`str`, *optional*, defaults to `"teacher_prompt"`):
            Dataset column holding the short prompt (the relevant context + the same question) the teacher is
            conditioned on. Same format as `prompt`: both plain text or both conversational.
        teacher_model_kind (`str`, *optional*, defaults to `"base"`):
            Which weights score the short prompt when no explicit `teacher_model` is given. `"base"`: the frozen
            initial weights (with PEFT, the same model with its adapters disabled, at no extra memory; without PEFT, a
            frozen copy). `"live"`: the current weights under no-grad — student and teacher drift together and can
            collapse (see the docs). `"ema"`: an exponential moving average of the student, saved in checkpoints.
        teacher_update_rate (`float`, *optional*, defaults to `0.01`):
            With `teacher_model_kind="ema"`, after each optimizer step `teacher = (1 - rate) * teacher + rate *
            student` (the name and rule of TRL's `SDFTConfig`; its update is TRL's `SyncRefModelCallback`).

        > Parameters that control the loss

        distillation_mode (`str`, *optional*, defaults to `"full_logits"`):
            `"full_logits"`: exact per-token reverse KL over the whole vocabulary (the generalized JSD of `beta`,
            1.0 = reverse KL). `"sampled_token"`: the point-wise estimator `log p_student(y_t) - log p_teacher(y_t)`
            of the sampled token, used as a stop-gradient advantage in a policy-gradient surrogate. `"topk_logits"`:
            reverse KL over the student's top-`loss_top_k` tokens plus one bucket for the rest of the vocabulary.
        loss_top_k (`int`, *optional*, defaults to `20`):
            Number of student top tokens kept by `"topk_logits"`.
        sampled_token_clip (`float`, *optional*):
            With `"sampled_token"`, clip the per-token advantage to `[-clip, clip]`. `None` disables clipping.
        sampled_token_baseline (`str`, *optional*, defaults to `"none"`):
            With `"sampled_token"`, a baseline subtracted from the per-token advantage before clipping: `"mean"` (the
            mean advantage over the micro-batch's loss tokens) or `"none"`. A constant baseline leaves the surrogate's
            expected gradient unchanged (`E[grad log p] = 0`) and removes the push-down of every sampled token that a
            negative mean advantage gives a finite batch.
        loss_chunk_size (`int`, *optional*):
            Completion positions projected to the vocabulary at once by the plain-torch loss path (`"topk_logits"`,
            and `"full_logits"` off Triton devices). `None`: about 8 MiB of fp32 logits per chunk.
        exclude_eos_from_loss (`bool`, *optional*, defaults to `False`):
            Leave the end-of-turn tokens out of the loss (and out of the token count that normalizes it).

        > Parameters that control the prompts

        max_prompt_length (`int`, *optional*):
            Maximum number of tokens of the (long) student prompt. `None`: no limit.
        max_teacher_prompt_length (`int`, *optional*):
            Maximum number of tokens of the (short) teacher prompt. `None`: no limit.
        truncation_policy (`str`, *optional*, defaults to `"error"`):
            What happens to a prompt longer than its limit: `"error"` stops with the row and its length, `"middle"`
            keeps the head and the tail (LongBench's convention), `"left"` keeps the tail. Truncations are counted
            and logged as `opsdl/truncated_prompts` and `opsdl/truncated_teacher_prompts`.
        short_prompt_ratio (`float`, *optional*, defaults to `0.0`):
            Share of each batch whose student prompt is replaced by its own teacher prompt. Against a frozen `"base"`
            teacher these rows anchor the model to its initial short-context behaviour.

        > Parameters that control memory

        activation_checkpointing_policy (`str`, *optional*, defaults to `"full"`):
            With `gradient_checkpointing=True` (`activation_checkpointing`), what each checkpointed layer keeps.
            `"full"`: only its input; the whole layer is recomputed in the backward (the parent's behaviour).
            `"selective"`: the outputs of matmuls and attention; only the elementwise ops (norms, rotary, activation,
            products) are recomputed — more memory than `"full"`, about a fifth less than no checkpointing, for no
            extra matmul or attention FLOPs (docs/scaling.md has its measured cost). Needs non-reentrant
            checkpointing.
        context_gradient (`str`, *optional*, defaults to `"full"`):
            `"full"`: the student runs forward and backward over the whole long prompt + completion. `"none"`: the
            long prompt's per-layer keys and values are constants — kept from generation's cache (same weights within
            a generation batch), else computed by a no-grad prefill — and the forward with gradient runs over the
            completion positions only, attending to them. The gradient then flows through the completion's queries,
            keys, values and MLPs and their attention over the context, not into how the context is encoded: a step
            costs about generation + teacher + a forward/backward over the completion, and its memory is the cache.
            Not with `sequence_parallel_size > 1` (nothing long is left to split).
        context_prefill_chunk_size (`int`, *optional*, defaults to `4096`):
            With `context_gradient="none"`, positions per forward of the no-grad prefill (used when generation's
            cache can't be kept: vLLM, tool calls, or weights changed since generation). Bounds its peak memory.

        > Parameters that control sequence parallelism

        sequence_parallel_size (`int`, *optional*, defaults to `1`):
            Split each prompt + completion across this many consecutive ranks for the student's forward and backward
            (DeepSpeed-Ulysses style all-to-all in attention, after generation). Generation, the teacher's short
            forward and the loss stay whole. `1` turns it off. Needs `sdpa` or flash attention, and head counts that
            the size divides.

    > [!NOTE]
    > These parameters have default values different from [`~trl.DistillationConfig`]:
    > - `disable_dropout`: defaults to `True`: the teacher is the model itself, and dropout would make it noisy.
    > - `bf16`: defaults to `True` only where a CUDA device supports it (the parent's `True` fails on a CPU).
    > - `learning_rate`: defaults to `1e-5` instead of `1e-6`.
    """

    learning_rate: float = field(default=1e-5, metadata={"help": "The initial learning rate for AdamW."})
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Disable dropout: the teacher is the model itself, and dropout would make it noisy."},
    )

    # Parameters that control the teacher
    teacher_prompt_column: str = field(
        default="teacher_prompt",
        metadata={"help": "Dataset column with the short prompt (relevant context + the same question)."},
    )
    teacher_model_kind: str = field(
        default="base",
        metadata={
            "help": "Weights that score the short prompt: 'base' (frozen initial weights), 'live' (current weights, "
            "may collapse) or 'ema' (moving average of the student).",
            "choices": list(TEACHER_KINDS),
        },
    )
    teacher_update_rate: float = field(
        default=0.01,
        metadata={"help": "EMA teacher: teacher = (1 - rate) * teacher + rate * student after each step."},
    )

    # Parameters that control the loss
    distillation_mode: str = field(
        default="full_logits",
        metadata={
            "help": "'full_logits' (exact reverse KL over the vocabulary), 'sampled_token' (point-wise estimator as a "
            "policy-gradient advantage) or 'topk_logits' (student top-k plus a tail bucket).",
            "choices": list(DISTILLATION_MODES),
        },
    )
    loss_top_k: int = field(default=20, metadata={"help": "Student top tokens kept by 'topk_logits'."})
    sampled_token_clip: float | None = field(
        default=None,
        metadata={"help": "Clip the per-token advantage of 'sampled_token' to [-clip, clip]. None: no clipping."},
    )
    sampled_token_baseline: str = field(
        default="none",
        metadata={
            "help": "Baseline subtracted from 'sampled_token' advantages: 'mean' (over the micro-batch's loss tokens) "
            "or 'none'.",
            "choices": list(SAMPLED_TOKEN_BASELINES),
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Completion positions per vocabulary projection chunk. None: about 8 MiB of logits."},
    )
    exclude_eos_from_loss: bool = field(
        default=False, metadata={"help": "Leave end-of-turn tokens out of the loss and of its token count."}
    )

    # Parameters that control the prompts
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Maximum tokens of the student (long) prompt. None: no limit."}
    )
    max_teacher_prompt_length: int | None = field(
        default=None, metadata={"help": "Maximum tokens of the teacher (short) prompt. None: no limit."}
    )
    truncation_policy: str = field(
        default="error",
        metadata={
            "help": "For a prompt over its limit: 'error', 'middle' (keep head and tail) or 'left' (keep the tail).",
            "choices": list(TRUNCATION_POLICIES),
        },
    )
    short_prompt_ratio: float = field(
        default=0.0,
        metadata={"help": "Share of each batch whose student prompt is replaced by its teacher prompt."},
    )

    # Parameters that control memory
    activation_checkpointing_policy: str = field(
        default="full",
        metadata={
            "help": "With gradient checkpointing: 'full' (recompute whole layers) or 'selective' (keep matmul and "
            "attention outputs, recompute only elementwise ops).",
            "choices": list(CHECKPOINTING_POLICIES),
        },
    )

    context_gradient: str = field(
        default="full",
        metadata={
            "help": "'full': forward/backward over the whole prompt + completion. 'none': the prompt's keys/values are "
            "constants (from generation's cache or a no-grad prefill); gradient through the completion positions only.",
            "choices": list(CONTEXT_GRADIENTS),
        },
    )
    context_prefill_chunk_size: int = field(
        default=4096,
        metadata={"help": "With context_gradient='none': positions per forward of the no-grad prefill."},
    )

    # Parameters that control sequence parallelism
    sequence_parallel_size: int = field(
        default=1,
        metadata={
            "help": "Split each prompt + completion across this many consecutive ranks for the student's forward and "
            "backward (Ulysses, after generation; generation, the teacher forward and the loss stay whole). 1: off. "
            "Needs attn_implementation 'sdpa' or 'flash_attention_2'."
        },
    )

    def __post_init__(self):
        # The parent turns bf16 on whenever fp16 is off, which fails on a machine without a bf16-capable GPU.
        if self.bf16 is None:
            self.bf16 = default_bf16(self.fp16)
        # Pinned host memory only serves a copy to an accelerator; without one torch ignores it and warns every epoch.
        if self.dataloader_pin_memory and not torch.accelerator.is_available():
            self.dataloader_pin_memory = False
        super().__post_init__()

        # transformers and TRL accept these at 0 or below and fail (or train 0 steps) much later, naming other things.
        for name in ("max_completion_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be a positive integer (it counts tokens or rows).")
        if not self.temperature > 0:  # TRL divides the logits by it; 0 or less is no sampling distribution
            raise ValueError(
                f"temperature={self.temperature} must be positive (1.0 samples the model's own distribution; lower "
                "values sharpen it)."
            )
        if self.teacher_model_kind not in TEACHER_KINDS:
            raise ValueError(
                f"teacher_model_kind={self.teacher_model_kind!r} is not one of {TEACHER_KINDS}. Use 'base' (the "
                "default, frozen initial weights), 'live' or 'ema'."
            )
        if self.distillation_mode not in DISTILLATION_MODES:
            raise ValueError(
                f"distillation_mode={self.distillation_mode!r} is not one of {DISTILLATION_MODES}. Use "
                "'full_logits' (the default, exact reverse KL)."
            )
        if self.truncation_policy not in TRUNCATION_POLICIES:
            raise ValueError(
                f"truncation_policy={self.truncation_policy!r} is not one of {TRUNCATION_POLICIES}. Use 'error' (the "
                "default), 'middle' or 'left'."
            )
        if self.distillation_mode != "full_logits" and self.beta != 1.0:
            raise ValueError(
                f"distillation_mode={self.distillation_mode!r} estimates the reverse KL only, but beta={self.beta}. "
                "Set beta=1.0, or use distillation_mode='full_logits' for forward KL (0.0) or JSD (0 < beta < 1)."
            )
        if not 0.0 < self.teacher_update_rate <= 1.0:
            raise ValueError(
                f"teacher_update_rate={self.teacher_update_rate} must be in (0, 1]; 0.01 keeps the teacher close to "
                "its recent past, 1.0 copies the student after each step."
            )
        if self.loss_top_k < 1:
            raise ValueError(f"loss_top_k={self.loss_top_k} must be at least 1 (20 is a good default).")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size={self.loss_chunk_size} must be at least 1, or None for automatic.")
        if self.sampled_token_clip is not None and self.sampled_token_clip <= 0:
            raise ValueError(
                f"sampled_token_clip={self.sampled_token_clip} must be positive, or None to disable clipping."
            )
        if self.sampled_token_baseline not in SAMPLED_TOKEN_BASELINES:
            raise ValueError(
                f"sampled_token_baseline={self.sampled_token_baseline!r} is not a baseline; use 'mean' or 'none'."
            )
        for name in ("max_prompt_length", "max_teacher_prompt_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be a positive number of tokens, or None for no limit.")
        if self.sequence_parallel_size < 1:
            raise ValueError(
                f"sequence_parallel_size={self.sequence_parallel_size} must be at least 1 (1 turns sequence "
                "parallelism off)."
            )
        if self.context_gradient not in CONTEXT_GRADIENTS:
            raise ValueError(
                f"context_gradient={self.context_gradient!r} is not one of {CONTEXT_GRADIENTS}. Use 'full' (the "
                "default) or 'none' (the prompt's keys/values as constants)."
            )
        if self.context_prefill_chunk_size < 1:
            raise ValueError(
                f"context_prefill_chunk_size={self.context_prefill_chunk_size} must be a positive number of tokens "
                "(4096 is a good default)."
            )
        if self.context_gradient == "none" and self.sequence_parallel_size > 1:
            raise ValueError(
                f"context_gradient='none' runs no forward with gradient over the long prompt, so "
                f"sequence_parallel_size={self.sequence_parallel_size} has nothing to split. Set "
                "sequence_parallel_size=1, or context_gradient='full'."
            )
        if self.activation_checkpointing_policy not in CHECKPOINTING_POLICIES:
            raise ValueError(
                f"activation_checkpointing_policy={self.activation_checkpointing_policy!r} is not one of "
                f"{CHECKPOINTING_POLICIES}. Use 'full' (the default) or 'selective'."
            )
        if self.activation_checkpointing_policy == "selective":
            self._use_selective_checkpointing()
        if not 0.0 <= self.short_prompt_ratio <= 1.0:
            raise ValueError(f"short_prompt_ratio={self.short_prompt_ratio} must be in [0, 1].")
        if self.teacher_model_kind == "live":
            warnings.warn(
                "teacher_model_kind='live' scores the short prompt with the weights being trained: student and "
                "teacher drift together, so nothing holds the student to what the model knew, and the KL can stay "
                "low while the replies collapse (e.g. the end token is no longer emitted). Prefer 'base' or 'ema'.",
                UserWarning,
                stacklevel=2,
            )

    def _use_selective_checkpointing(self):
        # transformers passes `activation_checkpointing_kwargs` to `torch.utils.checkpoint.checkpoint` for each layer,
        # and TRL passes them again when it re-enables checkpointing after generation: the policy travels there.
        from .checkpointing import SELECTIVE_CHECKPOINTING

        # `activation_checkpointing` is transformers' newer name (5.18+); older 5.x releases only have the old one.
        if not getattr(self, "activation_checkpointing", self.gradient_checkpointing):
            raise ValueError(
                "activation_checkpointing_policy='selective' needs gradient_checkpointing=True (it chooses what a "
                "checkpointed layer keeps). Set gradient_checkpointing=True, or leave the policy at 'full'."
            )
        kwargs = dict(getattr(self, "activation_checkpointing_kwargs", self.gradient_checkpointing_kwargs) or {})
        if kwargs.get("use_reentrant"):
            raise ValueError(
                "activation_checkpointing_policy='selective' needs non-reentrant checkpointing, but "
                "gradient_checkpointing_kwargs has use_reentrant=True. Remove use_reentrant (or set it to False)."
            )
        kwargs.update(use_reentrant=False, context_fn=SELECTIVE_CHECKPOINTING)
        # `gradient_checkpointing_kwargs` is transformers' deprecated alias, still read by TRL: both names must agree.
        self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs = kwargs
