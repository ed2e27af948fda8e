"""OPSDL's losses as pure functions of hidden states and `lm_head` weights: no trainer state.

Shapes: `N` completion positions (flattened, padding already removed), `H` hidden size, `V` vocabulary. Every
function here projects to the vocabulary only at those `N` positions and never holds an `(N, V)` tensor for the whole
batch: `full_logits` and the sampled-token log-probs use TRL's chunked kernels, `topk_logits` recomputes per chunk.

Each returns per-token values of shape `(N,)`; the caller sums them and divides by the global number of completion
tokens, so the loss is the same whatever the gradient-accumulation split.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from trl.kernels import ChunkedLogProbFunction
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
from trl.kernels.chunked_logprob import _use_triton
from trl.trainer.utils import maybe_gather_lm_head_ctx


LOGPROB_VOCAB_CHUNK = 8192
CHUNK_ELEMENTS = 1 << 21  # logits per chunk of the plain-torch path: 8 MiB in fp32


@dataclass
class LMHead:
    """An `lm_head` as the loss sees it: `logits = softcap(scale * (hidden @ weight.T + bias)) / temperature`."""

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None = None  # (V,)
    logit_scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_model(cls, model) -> "LMHead":
        head = model.get_output_embeddings()
        config = model.config.get_text_config()
        # Same reading of the logit post-processing as DistillationTrainer._compute_loss (Cohere's `logit_scale`,
        # Muse's `output_multiplier`, Falcon-H1's `lm_head_multiplier`, Granite's divisor `logits_scaling`).
        scale = getattr(config, "logit_scale", None)
        if scale is None:
            scale = getattr(config, "output_multiplier", None)
        if scale is None:
            scale = getattr(config, "lm_head_multiplier", None)
        if scale is None and getattr(config, "logits_scaling", None) is not None:
            scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
        return cls(
            head.weight, head.bias, 1.0 if scale is None else scale, getattr(config, "final_logit_softcapping", None)
        )

    def logits(self, hidden_NH: torch.Tensor, temperature: float) -> torch.Tensor:
        """Plain (N, V) logits: only for small chunks and for the reference in the tests."""
        logits_NV = F.linear(hidden_NH.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        logits_NV = logits_NV * self.logit_scale
        if self.softcap is not None:
            logits_NV = self.softcap * torch.tanh(logits_NV / self.softcap)
        return logits_NV / temperature


def full_logits_divergence(
    student_hidden_NH: torch.Tensor,
    teacher_hidden_NH: torch.Tensor,
    student_head: LMHead,
    teacher_head: LMHead,
    tokens_N: torch.Tensor,
    beta: float = 1.0,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    use_kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Exact per-token divergence over the vocabulary, the student's entropy and the sampled tokens' log-probs.

    `beta=1` gives the reverse KL(student || teacher) = sum_v p_s(v) (log p_s(v) - log p_t(v)); `beta=0` the forward
    KL, in between the generalized JSD. Gradients reach the student's hidden states and head only. Returns `(N,)`
    tensors: divergence, entropy, log p_s(tokens), log p_t(tokens) — the last two `None` on the kernel path.

    On CUDA/XPU (Triton) this is TRL's fused `ChunkedDivergenceFunction`. Elsewhere its torch fallback keeps
    `4096 x 32768` fp32 tiles and their temporaries, several times the logits of a short completion, so the positions
    are processed `chunk_size` at a time in plain torch instead, each chunk recomputed in the backward.
    """
    if use_kernel is None:
        use_kernel = _use_triton(student_hidden_NH.device)
    if not use_kernel:
        return chunked_divergence(
            student_hidden_NH, teacher_hidden_NH, student_head, teacher_head, tokens_N, beta=beta,
            temperature=temperature, chunk_size=chunk_size,
        )  # fmt: skip
    divergence_N, entropy_N = ChunkedDivergenceFunction.apply(
        student_hidden_NH,
        student_head.weight,
        student_head.bias,
        teacher_hidden_NH,
        teacher_head.weight,
        teacher_head.bias,
        beta,
        temperature,
        student_head.logit_scale,
        student_head.softcap,
        teacher_head.logit_scale,
        teacher_head.softcap,
    )
    return divergence_N, entropy_N, None, None


def sampled_token_logprobs(
    hidden_NH: torch.Tensor, head: LMHead, tokens_N: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`log p(tokens_N)` and the entropy at each position, `(N,)` each, without materializing `(N, V)` logits."""
    with maybe_gather_lm_head_ctx(head.weight, head.bias):
        logprobs_N, entropy_N, *_ = ChunkedLogProbFunction.apply(
            hidden_NH,
            head.weight,
            head.bias,
            tokens_N,
            temperature,
            LOGPROB_VOCAB_CHUNK,
            head.softcap,
            head.logit_scale,
            ("entropy",),
        )
    return logprobs_N, entropy_N


def sampled_token_surrogate(
    student_logprobs_N: torch.Tensor, teacher_logprobs_N: torch.Tensor, clip: float | None = None
) -> torch.Tensor:
    """Policy-gradient surrogate whose gradient estimates the gradient of the reverse KL, per token.

    For a token y sampled from the student, k = log p_s(y) - log p_t(y) is an unbiased estimate of KL(p_s || p_t),
    and E_y[k * grad log p_s(y)] = grad KL (the score-function term; E[grad log p_s] = 0 removes the rest). The advantage
    A = -k is a constant (stop-gradient), optionally clipped to [-clip, clip], and the surrogate is -A * log p_s(y).
    Its value is not the KL: log the KL separately.
    """
    advantage_N = (teacher_logprobs_N - student_logprobs_N).detach()
    if clip is not None:
        advantage_N = advantage_N.clamp(-clip, clip)
    return -advantage_N * student_logprobs_N


def _divergence_chunk(
    student_hidden_NH, teacher_hidden_NH, tokens_N, s_weight, s_bias, t_weight, t_bias, s_scale, s_cap, t_scale, t_cap,
    beta, top_k, temperature,
):  # fmt: skip
    student_head = LMHead(s_weight, s_bias, s_scale, s_cap)
    teacher_head = LMHead(t_weight, t_bias, t_scale, t_cap)
    # Entered here, not around the loop: the checkpointed backward re-runs this function and needs the full heads
    # again under ZeRO-3.
    with maybe_gather_lm_head_ctx(s_weight, s_bias), maybe_gather_lm_head_ctx(t_weight, t_bias):
        s_logp_NV = torch.log_softmax(student_head.logits(student_hidden_NH, temperature), dim=-1)
        with torch.no_grad():
            t_logp_NV = torch.log_softmax(teacher_head.logits(teacher_hidden_NH, temperature), dim=-1)
    if top_k is not None:
        # Reverse KL over the student's top-k tokens (chosen without gradient) and one bucket for the rest of the
        # vocabulary, whose log-mass is log(1 - sum_k p), computed as log1p(-sum).
        topk_NK = s_logp_NV.detach().topk(top_k, dim=-1).indices
        s_logp_NK, t_logp_NK = s_logp_NV.gather(-1, topk_NK), t_logp_NV.gather(-1, topk_NK)
        s_tail_N = torch.log1p(-s_logp_NK.exp().sum(-1).clamp(max=1 - 1e-6))
        t_tail_N = torch.log1p(-t_logp_NK.exp().sum(-1).clamp(max=1 - 1e-6))
        s_buckets_NB = torch.cat([s_logp_NK, s_tail_N[:, None]], dim=-1)
        t_buckets_NB = torch.cat([t_logp_NK, t_tail_N[:, None]], dim=-1)
        divergence_N = (s_buckets_NB.exp() * (s_buckets_NB - t_buckets_NB)).sum(-1)
    elif beta == 1.0:  # reverse KL(s || t)
        divergence_N = (s_logp_NV.exp() * (s_logp_NV - t_logp_NV)).sum(-1)
    elif beta == 0.0:  # forward KL(t || s)
        divergence_N = (t_logp_NV.exp() * (t_logp_NV - s_logp_NV)).sum(-1)
    else:  # generalized JSD: beta KL(t || m) + (1 - beta) KL(s || m), m = (1 - beta) p_s + beta p_t
        log_m_NV = torch.logaddexp(s_logp_NV + math.log(1 - beta), t_logp_NV + math.log(beta))
        divergence_N = beta * (t_logp_NV.exp() * (t_logp_NV - log_m_NV)).sum(-1) + (1 - beta) * (
            s_logp_NV.exp() * (s_logp_NV - log_m_NV)
        ).sum(-1)
    with torch.no_grad():
        entropy_N = -(s_logp_NV.exp() * s_logp_NV).sum(-1)
        s_token_N = s_logp_NV.gather(-1, tokens_N[:, None])[:, 0]
        t_token_N = t_logp_NV.gather(-1, tokens_N[:, None])[:, 0]
    return divergence_N, entropy_N, s_token_N, t_token_N


def positions_per_chunk(vocab_size: int) -> int:
    """Positions per chunk so one chunk's `(positions, V)` fp32 logits stay near 8 MiB."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


def chunked_divergence(
    student_hidden_NH: torch.Tensor,
    teacher_hidden_NH: torch.Tensor,
    student_head: LMHead,
    teacher_head: LMHead,
    tokens_N: torch.Tensor,
    beta: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token divergence (full vocabulary, or top-k + tail with `top_k`), student entropy, and the sampled tokens'
    log-probs under student and teacher, `(N,)` each, in plain torch.

    Positions are processed `chunk_size` at a time (default: `positions_per_chunk(V)`) and each chunk is recomputed
    in the backward (activation checkpointing), so at most one chunk of `(chunk_size, V)` logits lives at once.
    """
    vocab_size = student_head.weight.shape[0] if student_head.weight.numel() else student_hidden_NH.shape[-1]
    chunk_size = chunk_size or positions_per_chunk(vocab_size)
    if top_k is not None:
        top_k = min(top_k, vocab_size - 1)
    outputs = []
    for start in range(0, student_hidden_NH.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        args = (
            student_hidden_NH[chunk],
            teacher_hidden_NH[chunk],
            tokens_N[chunk],
            student_head.weight,
            student_head.bias,
            teacher_head.weight,
            teacher_head.bias,
            student_head.logit_scale,
            student_head.softcap,
            teacher_head.logit_scale,
            teacher_head.softcap,
            beta,
            top_k,
            temperature,
        )
        if torch.is_grad_enabled() and student_hidden_NH.requires_grad:
            outputs.append(checkpoint(_divergence_chunk, *args, use_reentrant=False))
        else:
            outputs.append(_divergence_chunk(*args))
    if not outputs:  # no loss position: an empty result that still reaches the graph
        empty_N = student_hidden_NH.sum(-1).float() * 0
        return empty_N, empty_N.detach(), empty_N.detach(), empty_N.detach()
    return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))
