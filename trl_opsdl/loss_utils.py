"""OPSDL's losses as pure functions of hidden states and `lm_head` weights: no trainer state.

Tensor names carry their shapes (the legend is in `trl_opsdl/__init__.py`): the hidden states come as `(N, H)`, the
`N` completion positions of the batch with padding removed. Every function here projects to the vocabulary only at
those positions and never holds an `(N, V)` tensor for the whole batch: `full_logits` uses TRL's fused kernel on Triton devices and `FusedReverseKL` (reverse KL) or
`chunked_divergence` elsewhere, the sampled-token log-probs TRL's `ChunkedLogProbFunction`, `topk_logits` recomputes
per chunk.

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
# On a GPU a chunk's cost is mostly its kernel launches: 8 MiB chunks are 13 positions at a 152K vocabulary, and the
# top-k loss took 3-5 s for 4160 positions on an H100 (TRL's kernel: 0.1 s). 128 MiB chunks (220 positions there) keep
# a chunk's temporaries under TRL's own two 512 MiB tiles.
CHUNK_ELEMENTS_CUDA = 1 << 25


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
        if self.logit_scale != 1.0:  # each of these is a pass over (N, V): skipped when it is the identity
            logits_NV = logits_NV * self.logit_scale
        if self.softcap is not None:
            logits_NV = self.softcap * torch.tanh(logits_NV / self.softcap)
        return logits_NV / temperature if temperature != 1.0 else logits_NV


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
    are processed `chunk_size` at a time in plain torch instead: for the reverse KL by `FusedReverseKL` (the gradient
    computed in the forward, nothing recomputed), for other `beta` by `chunked_divergence` (recomputed per chunk).
    """
    if use_kernel is None:
        use_kernel = _use_triton(student_hidden_NH.device)
    if not use_kernel and beta == 1.0:
        return fused_reverse_kl(
            student_hidden_NH, teacher_hidden_NH, student_head, teacher_head, tokens_N, temperature, chunk_size
        )
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


def _reverse_kl_pass(
    student_hidden_NH, teacher_hidden_NH, tokens_N, student_head, teacher_head, temperature, chunk_size, grads,
    row_weight_N=None,
):  # fmt: skip
    """One pass over the positions, `chunk_size` at a time: per-token reverse KL, entropy, token log-probs and, for the
    heads' parameters named in `grads` ("hidden", "weight", "bias"), the gradient of `sum_n row_weight_n * KL_n`.

    With `z` the final logits and `p_s = softmax(z)`, `dKL_n/dz_n = p_s (log p_s - log p_t - KL_n)`: exact, so each chunk
    needs its `(chunk, V)` log-probs once, and the chain rule through `z = softcap(scale * (h W^T + b)) / T` is a
    per-element factor `(scale / T) * (1 - tanh^2(scale * (h W^T + b) / softcap))`. Then `dh = g W`, `dW = g^T h`,
    `db = sum g`: the floor's four matmuls (two projections, two gradient products) and no autograd graph.
    """
    n, hidden_size = student_hidden_NH.shape
    vocab_size = student_head.weight.shape[0]
    out = {key: student_hidden_NH.new_empty(n, dtype=torch.float32) for key in ("kl", "entropy", "s_tok", "t_tok")}
    fp32 = {"dtype": torch.float32, "device": student_hidden_NH.device}
    grad_hidden_NH = torch.empty(n, hidden_size, **fp32) if "hidden" in grads else None
    grad_weight_VH = torch.zeros(vocab_size, hidden_size, **fp32) if "weight" in grads else None
    grad_bias_V = torch.zeros(vocab_size, **fp32) if "bias" in grads else None
    weight_VH = student_head.weight.float()
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            chunk = slice(start, start + chunk_size)
            hidden_CH = student_hidden_NH[chunk].float()
            logits_CV = student_head.logits(hidden_CH, temperature)
            s_logp_CV = torch.log_softmax(logits_CV, dim=-1)
            t_logp_CV = torch.log_softmax(teacher_head.logits(teacher_hidden_NH[chunk], temperature), dim=-1)
            tokens_C1 = tokens_N[chunk, None]
            out["s_tok"][chunk] = s_logp_CV.gather(-1, tokens_C1)[:, 0]
            out["t_tok"][chunk] = t_logp_CV.gather(-1, tokens_C1)[:, 0]
            s_p_CV = s_logp_CV.exp()
            out["entropy"][chunk] = -(s_p_CV * s_logp_CV).sum(-1)
            gap_CV = s_logp_CV.sub_(t_logp_CV)  # log p_s - log p_t, in place: the log-probs are no longer needed
            del t_logp_CV
            kl_C = (s_p_CV * gap_CV).sum(-1)
            out["kl"][chunk] = kl_C
            if not grads:
                continue
            grad_CV = s_p_CV.mul_(gap_CV.sub_(kl_C[:, None]))  # dKL/dz, in place
            if row_weight_N is not None:
                grad_CV.mul_(row_weight_N[chunk, None].float())
            if student_head.softcap is not None:
                # logits_CV = softcap * tanh(u / softcap) / T, so tanh = logits_CV * T / softcap
                tanh_CV = logits_CV.mul_(temperature / student_head.softcap)
                grad_CV.mul_(tanh_CV.square_().neg_().add_(1.0))
            if student_head.logit_scale != temperature:
                grad_CV.mul_(student_head.logit_scale / temperature)
            if grad_hidden_NH is not None:
                grad_hidden_NH[chunk] = grad_CV @ weight_VH
            if grad_weight_VH is not None:
                grad_weight_VH.addmm_(grad_CV.t(), hidden_CH)
            if grad_bias_V is not None:
                grad_bias_V += grad_CV.sum(0)
    return out, grad_hidden_NH, grad_weight_VH, grad_bias_V


class FusedReverseKL(torch.autograd.Function):
    """Reverse KL(student || teacher) per position over the full vocabulary, its gradient computed in the forward.

    The trainer's loss is `sum_n KL_n / count`, so the backward receives the same weight for every position: it then
    only rescales the gradients kept from the forward (`(N, H)` for the hidden states, `(V, H)` for a trainable head),
    instead of recomputing the projections as activation checkpointing would. Any other weighting is still exact:
    the head's gradient is then recomputed with those weights. Under ZeRO-3 the heads are gathered in both passes.
    """

    @staticmethod
    def forward(ctx, student_hidden_NH, s_weight, s_bias, teacher_hidden_NH, t_weight, t_bias, tokens_N, settings):
        s_scale, s_cap, t_scale, t_cap, temperature, chunk_size, grads = settings
        student_head = LMHead(s_weight, s_bias, s_scale, s_cap)
        teacher_head = LMHead(t_weight, t_bias, t_scale, t_cap)
        with maybe_gather_lm_head_ctx(s_weight, s_bias), maybe_gather_lm_head_ctx(t_weight, t_bias):
            out, grad_hidden_NH, grad_weight_VH, grad_bias_V = _reverse_kl_pass(
                student_hidden_NH, teacher_hidden_NH, tokens_N, student_head, teacher_head, temperature, chunk_size,
                grads,
            )  # fmt: skip
        ctx.save_for_backward(student_hidden_NH, s_weight, s_bias, teacher_hidden_NH, t_weight, t_bias, tokens_N)
        ctx.settings = settings
        ctx.grads = (grad_hidden_NH, grad_weight_VH, grad_bias_V)
        ctx.mark_non_differentiable(out["entropy"], out["s_tok"], out["t_tok"])
        return out["kl"], out["entropy"], out["s_tok"], out["t_tok"]

    @staticmethod
    def backward(ctx, grad_kl_N, *_):
        grad_hidden_NH, grad_weight_VH, grad_bias_V = ctx.grads
        ctx.grads = None
        student_hidden_NH, s_weight, s_bias, teacher_hidden_NH, t_weight, t_bias, tokens_N = ctx.saved_tensors
        if grad_hidden_NH is not None:  # row n of dh depends on KL_n only: exact for any weights
            grad_hidden_NH = grad_hidden_NH.mul_(grad_kl_N[:, None]).to(student_hidden_NH.dtype)
        if grad_weight_VH is not None or grad_bias_V is not None:
            uniform = grad_kl_N.numel() == 0 or bool((grad_kl_N == grad_kl_N[0]).all())
            if uniform:
                scale = grad_kl_N[0] if grad_kl_N.numel() else 0.0
                grad_weight_VH = None if grad_weight_VH is None else grad_weight_VH.mul_(scale)
                grad_bias_V = None if grad_bias_V is None else grad_bias_V.mul_(scale)
            else:
                s_scale, s_cap, t_scale, t_cap, temperature, chunk_size, grads = ctx.settings
                head_grads = tuple(g for g in grads if g != "hidden")
                with maybe_gather_lm_head_ctx(s_weight, s_bias), maybe_gather_lm_head_ctx(t_weight, t_bias):
                    _, _, grad_weight_VH, grad_bias_V = _reverse_kl_pass(
                        student_hidden_NH, teacher_hidden_NH, tokens_N, LMHead(s_weight, s_bias, s_scale, s_cap),
                        LMHead(t_weight, t_bias, t_scale, t_cap), temperature, chunk_size, head_grads, grad_kl_N,
                    )  # fmt: skip
        if grad_weight_VH is not None:
            grad_weight_VH = grad_weight_VH.to(s_weight.dtype)
        if grad_bias_V is not None:
            grad_bias_V = grad_bias_V.to(s_bias.dtype)
        return grad_hidden_NH, grad_weight_VH, grad_bias_V, None, None, None, None, None


def fused_reverse_kl(
    student_hidden_NH: torch.Tensor,
    teacher_hidden_NH: torch.Tensor,
    student_head: LMHead,
    teacher_head: LMHead,
    tokens_N: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reverse KL(student || teacher), student entropy, log p_s(tokens) and log p_t(tokens), `(N,)` each, in plain
    torch, `chunk_size` positions at a time (default `positions_per_chunk(V)`); see `FusedReverseKL`."""
    vocab_size = _vocab_size(student_head.weight)
    chunk_size = chunk_size or positions_per_chunk(vocab_size, student_hidden_NH.device.type)
    grads = ()
    if torch.is_grad_enabled():
        parts = {"hidden": student_hidden_NH, "weight": student_head.weight, "bias": student_head.bias}
        grads = tuple(name for name, t in parts.items() if t is not None and t.requires_grad)
    settings = (
        student_head.logit_scale, student_head.softcap, teacher_head.logit_scale, teacher_head.softcap, temperature,
        chunk_size, grads,
    )  # fmt: skip
    return FusedReverseKL.apply(
        student_hidden_NH, student_head.weight, student_head.bias, teacher_hidden_NH, teacher_head.weight,
        teacher_head.bias, tokens_N, settings,
    )  # fmt: skip


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
    student_logprobs_N: torch.Tensor,
    teacher_logprobs_N: torch.Tensor,
    clip: float | None = None,
    baseline: str = "none",
) -> torch.Tensor:
    """Policy-gradient surrogate whose gradient estimates the gradient of the reverse KL, per token.

    For a token y sampled from the student, k = log p_s(y) - log p_t(y) is an unbiased estimate of KL(p_s || p_t),
    and E_y[k * grad log p_s(y)] = grad KL (the score-function term; E[grad log p_s] = 0 removes the rest). The advantage
    A = -k is a constant (stop-gradient), optionally clipped to [-clip, clip], and the surrogate is -A * log p_s(y).
    Its value is not the KL: log the KL separately.

    `baseline="mean"` subtracts the mean of A over the N tokens first. Any constant b keeps the expected gradient
    (E[b * grad log p_s] = 0), but on a finite batch a mean A < 0 (the teacher finds the student's own samples less
    likely than the student does) adds a push-down of size |mean A| to every sampled token's log-prob; centred, only
    tokens the teacher likes less than the batch's average are pushed down. (The mean includes the token itself: a bias of order 1/N.)
    """
    advantage_N = (teacher_logprobs_N - student_logprobs_N).detach()
    if baseline == "mean":
        advantage_N = advantage_N - advantage_N.mean()
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
        topk_NJ = s_logp_NV.detach().topk(top_k, dim=-1).indices
        s_logp_NJ, t_logp_NJ = s_logp_NV.gather(-1, topk_NJ), t_logp_NV.gather(-1, topk_NJ)
        s_tail_N = torch.log1p(-s_logp_NJ.exp().sum(-1).clamp(max=1 - 1e-6))
        t_tail_N = torch.log1p(-t_logp_NJ.exp().sum(-1).clamp(max=1 - 1e-6))
        s_buckets_NU = torch.cat([s_logp_NJ, s_tail_N[:, None]], dim=-1)
        t_buckets_NU = torch.cat([t_logp_NJ, t_tail_N[:, None]], dim=-1)
        divergence_N = (s_buckets_NU.exp() * (s_buckets_NU - t_buckets_NU)).sum(-1)
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


def _vocab_size(weight_VH: torch.Tensor) -> int:
    # Under ZeRO-3 a parameter outside its gather is an empty shard; DeepSpeed keeps the full shape in `ds_shape`.
    return getattr(weight_VH, "ds_shape", weight_VH.shape)[0]


def positions_per_chunk(vocab_size: int, device_type: str = "cpu") -> int:
    """Positions per chunk so one chunk's `(positions, V)` fp32 logits stay near 8 MiB (128 MiB on CUDA)."""
    return max(1, (CHUNK_ELEMENTS_CUDA if device_type == "cuda" else CHUNK_ELEMENTS) // vocab_size)


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
    vocab_size = _vocab_size(student_head.weight)
    chunk_size = chunk_size or positions_per_chunk(vocab_size, student_hidden_NH.device.type)
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
