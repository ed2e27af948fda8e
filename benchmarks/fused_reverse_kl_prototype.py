"""PROTOTYPE, not used by the library (kept for the next step of issue 5): reverse KL(student || teacher) over the vocabulary, its gradient
computed in the forward, chunk by chunk, so nothing is recomputed in the backward and no (N, V) tensor outlives a chunk.

For beta=1 the gradient w.r.t. the student logits is analytic: dKL_n/dz = p_s * (log p_s - log p_t - KL_n). Since the
trainer's loss is sum_n KL_n / divisor, the function returns the SUM (differentiable) and the per-token values
(detached, for logs), plus entropy and sampled-token log-probs from the same pass (no extra projections for logging).
Plain torch, 4 matmuls per chunk (student and teacher projection, grad_hidden, grad_weight): the floor's count.
Temperature / logit_scale / softcap are NOT handled here (multiply the chain-rule factors as TRL's _backward_tile does).
Under ZeRO-3, gather lm_head in the forward (maybe_gather_lm_head_ctx); the backward only rescales stored tensors.
"""

import torch


class FusedReverseKLSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs_NH, W_VH, ht_NH, Wt_VH, tokens_N, chunk):
        N = hs_NH.shape[0]
        kl_N, ent_N, s_tok_N, t_tok_N = (torch.empty(N) for _ in range(4))
        need_grad = torch.is_grad_enabled() or hs_NH.requires_grad or W_VH.requires_grad
        dh_NH = torch.empty(hs_NH.shape, dtype=torch.float32) if hs_NH.requires_grad else None
        dW_VH = torch.zeros(W_VH.shape, dtype=torch.float32) if W_VH.requires_grad else None
        Wf, Wtf = W_VH.float(), Wt_VH.float()
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            ls = torch.log_softmax(hs_NH[s:e].float() @ Wf.t(), -1)  # (c, V) log p_s
            lt = torch.log_softmax(ht_NH[s:e].float() @ Wtf.t(), -1)  # (c, V) log p_t
            tok = tokens_N[s:e, None]
            s_tok_N[s:e], t_tok_N[s:e] = ls.gather(-1, tok)[:, 0], lt.gather(-1, tok)[:, 0]
            lt.sub_(ls).neg_()  # lt <- log p_s - log p_t
            ps = ls.exp()
            ent_N[s:e] = -(ps * ls).sum(-1)
            k = (ps * lt).sum(-1)
            kl_N[s:e] = k
            if need_grad:
                g = ps.mul_(lt.sub_(k[:, None]))  # dKL/dz, in place
                if dh_NH is not None:
                    dh_NH[s:e] = g @ Wf
                if dW_VH is not None:
                    dW_VH.addmm_(g.t(), hs_NH[s:e].float())
        ctx.save_for_backward(dh_NH, dW_VH)
        ctx.mark_non_differentiable(kl_N, ent_N, s_tok_N, t_tok_N)
        return kl_N.sum(), kl_N, ent_N, s_tok_N, t_tok_N

    @staticmethod
    def backward(ctx, g_sum, *_):
        dh_NH, dW_VH = ctx.saved_tensors
        dh = None if dh_NH is None else (dh_NH * g_sum)
        dW = None if dW_VH is None else (dW_VH * g_sum)
        return dh, dW, None, None, None, None
