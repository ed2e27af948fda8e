"""Selective activation checkpointing: matmuls and attention are never recomputed, and training is unchanged."""

import json
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import tiny_model, tiny_tokenizer, trainer_for
from trl_opsdl.checkpointing import SELECTIVE_CHECKPOINTING


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops that run (here: during the backward, where a forward op can only be a recompute)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_recomputes_only_elementwise_ops():
    tokenizer = tiny_tokenizer()
    ids = torch.randint(4, len(tokenizer), (2, 12))
    results = {}
    for policy in ("none", "full", "selective"):
        model = tiny_model(tokenizer)
        if policy != "none":
            kwargs = {"use_reentrant": False}
            if policy == "selective":
                kwargs["context_fn"] = SELECTIVE_CHECKPOINTING
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        with FlopCounterMode(display=False) as flops, _OpCounter() as ops:
            loss.backward()
        results[policy] = (flops.get_total_flops(), ops.counts, [p.grad for p in model.parameters()])

    num_layers = model.config.num_hidden_layers
    (flops_none, ops_none, grads_none), (flops_full, _, _), (flops_sel, ops_sel, grads_sel) = results.values()
    # No matmul or attention is recomputed: the backward does the same FLOPs as without checkpointing...
    assert flops_sel == flops_none < flops_full
    # ...while the MLP's activation is recomputed once per layer (without checkpointing its output was kept).
    assert ops_none[torch.ops.aten.silu.default] == 0
    assert ops_sel[torch.ops.aten.silu.default] == num_layers
    for g_ref, g in zip(grads_none, grads_sel, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)


def test_training_with_selective_checkpointing_equals_training_without(tmp_path):
    results = []
    for name, extra in (("none", {}), ("selective", {"activation_checkpointing_policy": "selective"})):
        tokenizer = tiny_tokenizer()
        trainer = trainer_for(
            tmp_path / name,
            tokenizer=tokenizer,
            teacher_model=tiny_model(tokenizer, seed=1),  # a KL far from float32 round-off
            gradient_checkpointing=bool(extra),
            max_steps=2,
            shuffle_dataset=False,
            **extra,
        )
        trainer.train()
        if extra:  # still the selective policy after TRL re-enabled checkpointing around each generation
            layer = trainer.model.model.layers[0]
            assert layer.gradient_checkpointing
            assert layer._gradient_checkpointing_func.keywords["context_fn"] is SELECTIVE_CHECKPOINTING
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results.append((losses, [p.detach().clone() for p in trainer.model.parameters()]))
    kwargs = trainer.args.gradient_checkpointing_kwargs
    assert kwargs["context_fn"] is SELECTIVE_CHECKPOINTING and kwargs["use_reentrant"] is False
    assert json.loads(trainer.args.to_json_string())["activation_checkpointing_policy"] == "selective"
    (losses_a, params_a), (losses_b, params_b) = results
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    for a, b in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


class _MatmulShapes(TorchDispatchMode):
    """The (left, right) shapes of every `mm` that runs."""

    def __init__(self):
        super().__init__()
        self.shapes = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:
            self.shapes[(tuple(args[0].shape), tuple(args[1].shape))] += 1
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_recomputes_lora_b_and_keeps_the_base_matmuls():
    # LoRA's B projection ([T, r] @ [r, out]) writes an output as large as the base projection's: keeping it would
    # double what the matmuls keep, so the policy recomputes it (r/in of the base FLOPs) and keeps everything else.
    # (FlopCounterMode is not used here: its module hooks add view ops to PEFT's recompute, which SAC then refuses.)
    from peft import LoraConfig, get_peft_model

    tokenizer = tiny_tokenizer()
    ids = torch.randint(4, len(tokenizer), (2, 12))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    rank = 4
    results = {}
    for policy in ("none", "selective"):
        model = tiny_model(tokenizer, hidden_size=128)  # every B's width (>= 64) is at least 16 x the rank
        lora = LoraConfig(r=rank, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        model = get_peft_model(model, lora)
        if policy == "selective":
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": SELECTIVE_CHECKPOINTING}
            )
        model.enable_input_require_grads()  # in both: the same gradient matmuls (down to the embeddings' output)
        model.train()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        with _MatmulShapes() as mms:
            loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results[policy] = (mms.shapes, grads)

    (mm_none, grads_none), (mm_sel, grads_sel) = results.values()
    base = model.get_base_model()
    layers, tokens = base.config.num_hidden_layers, ids.numel()
    outs = [m.out_features for n, m in base.model.layers[0].named_modules() if n.endswith(tuple(targets))]
    assert len(outs) == len(targets)
    # The backward's extra matmuls are B's forwards, once per layer, and nothing of the base model. The recompute stops
    # once it has what the backward needs: down_proj's output only enters the residual sum, which saves nothing, so its
    # B is never rerun (the other six feed a saved tensor: RoPE, attention, the norm, the gated product).
    expected = Counter()
    for name, out in zip(targets, outs, strict=True):
        if name != "down_proj":
            expected[((tokens, rank), (rank, out))] += layers
    assert mm_sel - mm_none == expected and not mm_none - mm_sel
    assert grads_sel.keys() == grads_none.keys()
    for name, g_ref in grads_none.items():
        torch.testing.assert_close(grads_sel[name], g_ref, rtol=1e-5, atol=1e-7)
