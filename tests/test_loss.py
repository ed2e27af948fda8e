"""Each loss mode, as the trainer computes it, against a naive reference on full logits: values and gradients."""

import copy

import pytest
import torch

from tests.conftest import tiny_model, tiny_tokenizer, trainer_for
from trl_opsdl import loss_utils
from trl_opsdl.loss_utils import LMHead, chunked_divergence, full_logits_divergence, fused_reverse_kl


def make_trainer(tmp_path, model, tokenizer, **config):
    return trainer_for(tmp_path, model=model, tokenizer=tokenizer, max_completion_length=6, **config)


def completion_logits(model, prompt_ids, completion_ids):
    """Logits that predict each completion token, from one unpadded sequence: (K, V)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=ids).logits[0]
    return logits[len(prompt_ids) - 1 : -1]


def naive_loss(student, teacher, batch, mode, beta=1.0, k=20, clip=None, baseline="none"):
    """Full student logits on prompt+completion, full teacher logits on teacher_prompt+completion, per row."""
    total, n_tokens = 0.0, 0
    sampled = []  # sampled_token: (student log-prob, advantage) per row; the baseline needs every row's advantages
    for b in range(batch["prompt_ids"].size(0)):
        prompt = batch["prompt_ids"][b][batch["prompt_mask"][b].bool()].tolist()
        teacher_prompt = batch["teacher_prompt_ids"][b][batch["teacher_prompt_mask"][b].bool()].tolist()
        mask = batch["loss_mask"][b].bool()
        completion = batch["completion_ids"][b][batch["completion_mask"][b].bool()].tolist()
        s_logp = torch.log_softmax(completion_logits(student, prompt, completion), -1)
        with torch.no_grad():
            t_logp = torch.log_softmax(completion_logits(teacher, teacher_prompt, completion), -1)
        mask = mask[: len(completion)]
        s_logp, t_logp = s_logp[mask], t_logp[mask]
        tokens = torch.tensor(completion)[mask]
        if mode == "full_logits":
            if beta == 1.0:
                per_token = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
            else:
                s_p, t_p = s_logp.exp(), t_logp.exp()
                m = torch.log((1 - beta) * s_p + beta * t_p)
                per_token = beta * (t_p * (t_logp - m)).sum(-1) + (1 - beta) * (s_p * (s_logp - m)).sum(-1)
        elif mode == "sampled_token":
            s_tok = s_logp.gather(-1, tokens[:, None])[:, 0]
            t_tok = t_logp.gather(-1, tokens[:, None])[:, 0]
            sampled.append((s_tok, (t_tok - s_tok).detach()))
            per_token = torch.zeros(())
        else:  # topk_logits: student's top-k tokens plus one bucket for the rest
            idx = s_logp.detach().topk(k, -1).indices
            s_k, t_k = s_logp.gather(-1, idx), t_logp.gather(-1, idx)
            s_b = torch.cat([s_k, torch.log(1 - s_k.exp().sum(-1, keepdim=True))], -1)
            t_b = torch.cat([t_k, torch.log(1 - t_k.exp().sum(-1, keepdim=True))], -1)
            per_token = (s_b.exp() * (s_b - t_b)).sum(-1)
        total = total + per_token.sum()
        n_tokens += int(mask.sum())
    if sampled:
        s_tok = torch.cat([s for s, _ in sampled])
        advantage = torch.cat([a for _, a in sampled])
        if baseline == "mean":
            advantage = advantage - advantage.mean()
        if clip is not None:
            advantage = advantage.clamp(-clip, clip)
        total = total + (-advantage * s_tok).sum()
    return total / n_tokens


@pytest.mark.parametrize(
    "mode,extra",
    [
        ("full_logits", {}),
        ("full_logits", {"beta": 0.5}),
        ("sampled_token", {}),
        ("sampled_token", {"sampled_token_clip": 0.01}),
        ("sampled_token", {"sampled_token_baseline": "mean"}),
        ("sampled_token", {"sampled_token_baseline": "mean", "sampled_token_clip": 0.05}),
        ("topk_logits", {"loss_top_k": 5, "loss_chunk_size": 3}),
    ],
)
def test_loss_matches_naive_reference(tmp_path, mode, extra):
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    initial = copy.deepcopy(model)  # the `base` teacher: the frozen initial weights
    trainer = make_trainer(tmp_path, model, tokenizer, distillation_mode=mode, **extra)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(list(trainer.train_dataset.select(range(4))))
    # After one optimizer-free update of the student only, teacher and student differ: move the student a bit.
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)

    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    student_ref = copy.deepcopy(trainer.model)
    student_ref.zero_grad()
    ref = naive_loss(
        student_ref,
        initial,
        batch,
        mode,
        beta=extra.get("beta", 1.0),
        k=extra.get("loss_top_k", 20),
        clip=extra.get("sampled_token_clip"),
        baseline=extra.get("sampled_token_baseline", "none"),
    )
    ref.backward()

    assert loss.item() != 0.0
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-7)
    for name, p in student_ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=f"gradient of {name}")


@pytest.mark.parametrize("beta", [1.0, 0.0, 0.3])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_full_logits_divergence_equals_plain_kl_for_both_implementations(beta, use_kernel):
    # TRL's fused kernel (used on Triton devices) and the chunked torch path (elsewhere) against plain logits.
    torch.manual_seed(0)
    h_s = torch.randn(7, 8, requires_grad=True)
    h_t = torch.randn(7, 8)
    tokens = torch.randint(0, 50, (7,))
    head_s, head_t = LMHead(0.3 * torch.randn(50, 8)), LMHead(0.3 * torch.randn(50, 8))
    div, entropy, s_tok, t_tok = full_logits_divergence(
        h_s, h_t, head_s, head_t, tokens, beta=beta, temperature=0.7, chunk_size=3, use_kernel=use_kernel
    )
    (grad,) = torch.autograd.grad(div.sum(), h_s)
    s_logp = torch.log_softmax(head_s.logits(h_s, 0.7), -1)
    t_logp = torch.log_softmax(head_t.logits(h_t, 0.7), -1)
    s_p, t_p = s_logp.exp(), t_logp.exp()
    if beta == 1.0:
        expected = (s_p * (s_logp - t_logp)).sum(-1)
    elif beta == 0.0:
        expected = (t_p * (t_logp - s_logp)).sum(-1)
    else:
        m = torch.log((1 - beta) * s_p + beta * t_p)
        expected = beta * (t_p * (t_logp - m)).sum(-1) + (1 - beta) * (s_p * (s_logp - m)).sum(-1)
    (expected_grad,) = torch.autograd.grad(expected.sum(), h_s)
    torch.testing.assert_close(div, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(entropy, -(s_p * s_logp).sum(-1), rtol=1e-5, atol=1e-6)
    if not use_kernel:  # the torch path also returns the sampled tokens' log-probs, saving two passes
        torch.testing.assert_close(s_tok, s_logp.gather(-1, tokens[:, None])[:, 0])
        torch.testing.assert_close(t_tok, t_logp.gather(-1, tokens[:, None])[:, 0])


def test_chunking_does_not_change_topk_values_or_gradients():
    torch.manual_seed(0)
    h_s = torch.randn(7, 8, requires_grad=True)
    h_t = torch.randn(7, 8)
    tokens = torch.randint(0, 50, (7,))
    head_s, head_t = LMHead(0.3 * torch.randn(50, 8)), LMHead(0.3 * torch.randn(50, 8))
    one, *_ = chunked_divergence(h_s, h_t, head_s, head_t, tokens, top_k=4, chunk_size=100)
    (g_one,) = torch.autograd.grad(one.sum(), h_s)
    chunked, *_ = chunked_divergence(h_s, h_t, head_s, head_t, tokens, top_k=4, chunk_size=2)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), h_s)
    torch.testing.assert_close(one, chunked)
    torch.testing.assert_close(g_one, g_chunked)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("weighting", ["uniform", "per_row"])
def test_fused_reverse_kl_matches_autograd_on_plain_logits(softcap, weighting):
    # The CPU reverse-KL path computes its gradient in the forward: pin values and the gradients of the hidden states,
    # head weight and bias against autograd through plain logits, with every logit post-processing step switched on.
    torch.manual_seed(0)
    n, h, v = 11, 8, 50
    h_s = torch.randn(n, h, requires_grad=True)
    h_t = torch.randn(n, h)
    tokens = torch.randint(0, v, (n,))
    weight = (0.3 * torch.randn(v, h)).requires_grad_()
    bias = (0.1 * torch.randn(v)).requires_grad_()
    head_s = LMHead(weight, bias, logit_scale=1.7, softcap=softcap)
    head_t = LMHead(0.3 * torch.randn(v, h), 0.1 * torch.randn(v), logit_scale=0.8, softcap=softcap)
    row_weight = torch.full((n,), 0.25) if weighting == "uniform" else torch.rand(n)

    kl, entropy, s_tok, t_tok = fused_reverse_kl(h_s, h_t, head_s, head_t, tokens, temperature=0.7, chunk_size=4)
    got = torch.autograd.grad((kl * row_weight).sum(), (h_s, weight, bias))

    s_logp = torch.log_softmax(head_s.logits(h_s, 0.7), -1)
    t_logp = torch.log_softmax(head_t.logits(h_t, 0.7), -1)
    expected_kl = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    expected = torch.autograd.grad((expected_kl * row_weight).sum(), (h_s, weight, bias))

    torch.testing.assert_close(kl, expected_kl, rtol=1e-5, atol=1e-6)
    for name, g, e in zip(("hidden", "weight", "bias"), got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6, msg=f"gradient of the {name}")
    torch.testing.assert_close(entropy, -(s_logp.exp() * s_logp).sum(-1).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_tok, s_logp.gather(-1, tokens[:, None])[:, 0].detach())
    torch.testing.assert_close(t_tok, t_logp.gather(-1, tokens[:, None])[:, 0])


def test_fused_reverse_kl_without_gradients_and_without_positions(monkeypatch):
    torch.manual_seed(0)
    h_s, h_t = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8)
    head_s, head_t = LMHead(torch.randn(50, 8, requires_grad=True)), LMHead(torch.randn(50, 8))
    tokens = torch.randint(0, 50, (5,))
    requested = []  # the gradients each pass was asked to compute
    real_pass = loss_utils._reverse_kl_pass
    monkeypatch.setattr(loss_utils, "_reverse_kl_pass", lambda *a, **k: requested.append(a[7]) or real_pass(*a, **k))
    with torch.no_grad():  # evaluation: values only, no gradient buffers
        kl, *_ = fused_reverse_kl(h_s, h_t, head_s, head_t, tokens)
    torch.testing.assert_close(kl, fused_reverse_kl(h_s, h_t, head_s, head_t, tokens)[0].detach())
    assert requested == [(), ("hidden", "weight")]
    # No loss position (every completion token masked): an empty KL whose zero sum still backpropagates.
    empty, *_ = fused_reverse_kl(h_s[:0], h_t[:0], head_s, head_t, tokens[:0])
    empty.sum().backward()
    assert empty.shape == (0,) and head_s.weight.grad.abs().sum() == 0


def test_chunks_are_larger_on_cuda_where_launches_dominate():
    # 8 MiB of fp32 logits per chunk on CPU; 128 MiB on CUDA, where 13-position chunks at a 152K vocabulary made the
    # top-k loss 30x slower than TRL's kernel on an H100
    from trl_opsdl.loss_utils import positions_per_chunk

    assert positions_per_chunk(152064) == 13 and positions_per_chunk(152064, "cpu") == 13
    assert positions_per_chunk(152064, "cuda") == 220
    assert positions_per_chunk(32000, "cuda") == 1048
    assert positions_per_chunk(10**9, "cuda") == 1
