"""The long prompt's keys and values as constants: `OPSDLConfig.context_gradient="none"`.

With `context_gradient="full"` the student runs forward and backward over the whole long prompt + completion, though
the loss sits on the completion alone. With `"none"` the context is read once without gradient and the student's
forward with gradient covers only the positions whose hidden states are projected to the vocabulary:

    positions 0 .. P-2          the context: per-layer keys/values, no gradient (from generation's cache, or a prefill)
    positions P-1 .. P+K-2      last prompt token + completion[:-1]: forward with gradient, attending to the context

(P: the left-padded prompt width, K: the completion width, L = P + K.) Position P-1 (the last prompt token, whose hidden state
predicts the first completion token) is in the gradient part: the loss positions are exactly those of the full
forward. The gradient equals that of the full forward in which the key and value projections of positions 0..P-2 are
detached — it flows through the completion positions' queries, keys, values and MLPs and their attention over the
context, and not into how the context itself is encoded.

Within one generation batch the weights do not change (the optimizer steps after its last micro-step), so the keys and
values generation's prefill computed for the prompt are exactly the student's: they are kept in the batch (one tensor
per layer, `context_kv_<layer>`, shuffled and split with the rest by TRL) and used once per micro-batch. Where they
cannot be kept (vLLM, tool calls) or are stale (the optimizer stepped since), a chunked no-grad prefill recomputes them.

Shapes follow the package's legend (`trl_opsdl/__init__.py`); here the P axis of a kept tensor holds the P - 1
context positions (the prompt but its last token), A counts key/value heads, and a layer's kept tensor is `kv_B2APD`
(keys and values stacked on dim 1).
"""

import contextlib
import inspect

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


CONTEXT_KV_PREFIX = "context_kv_"  # batch keys: context_kv_0, context_kv_1, ... one per layer
CONTEXT_KV_STEP = "context_kv_step"  # the optimizer step the kept keys/values were computed at (0-d tensor)


class FrozenPrefixLayer(DynamicLayer):
    """One layer's context keys/values, read-only: `update` returns them with the new positions appended but stores
    nothing, so a checkpointed layer's recompute in the backward sees the same states as its forward."""

    def __init__(self, keys_BAPD: torch.Tensor, values_BAPD: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys_BAPD, values_BAPD
        self.device = keys_BAPD.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


def frozen_prefix_cache(kv_by_layer: list[torch.Tensor]) -> Cache:
    """A cache over per-layer `kv_B2APD` tensors that never grows."""
    return Cache(layers=[FrozenPrefixLayer(kv[:, 0], kv[:, 1]) for kv in kv_by_layer])


def cache_to_batch(cache: Cache, context_len: int) -> dict[str, torch.Tensor]:
    """Generation's cache cut to the first `context_len` positions, as batch entries `context_kv_<layer>`; `{}` for a
    cache this module cannot read (sliding-window or non-attention layers)."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or layer.keys is None for layer in layers):
        return {}
    if any(layer.keys.shape[-2] < context_len for layer in layers):
        return {}
    return {
        f"{CONTEXT_KV_PREFIX}{i}": torch.stack(
            [layer.keys[:, :, :context_len].detach(), layer.values[:, :, :context_len].detach()], dim=1
        )
        for i, layer in enumerate(layers)
    }


def pop_context_kv(inputs: dict) -> tuple[list[torch.Tensor] | None, int | None]:
    """Take the kept keys/values out of a micro-batch (so they are freed once its backward is done)."""
    step = inputs.pop(CONTEXT_KV_STEP, None)
    keys = sorted(
        (k for k in inputs if k.startswith(CONTEXT_KV_PREFIX)), key=lambda k: int(k[len(CONTEXT_KV_PREFIX) :])
    )
    kv_by_layer = [inputs.pop(k) for k in keys]
    if not kv_by_layer or step is None:
        return None, None
    return kv_by_layer, int(step)


def _cache_kwarg(backbone) -> str:
    """transformers 5.25 renamed the forward's `past_key_values` to `cache` (the old name warns until 5.40)."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


def position_ids(attention_mask_BL: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (left padding gets 0), as HF generate numbers them."""
    positions_BL = attention_mask_BL.long().cumsum(-1) - 1
    return positions_BL.masked_fill(attention_mask_BL == 0, 0)


@contextlib.contextmanager
def checkpoint_with_read_only_cache(model):
    """transformers drops the cache of a gradient-checkpointed layer (a writing cache would be updated twice by the
    backward's recompute). A `FrozenPrefixLayer` never writes, so the layers may keep it: switch that on meanwhile."""
    layers = [m for m in model.modules() if hasattr(type(m), "_can_checkpoint_with_cache")]
    saved = [m.__dict__.get("_can_checkpoint_with_cache") for m in layers]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m, value in zip(layers, saved, strict=True):
            if value is None:
                del m._can_checkpoint_with_cache
            else:
                m._can_checkpoint_with_cache = value


@torch.no_grad()
def prefill(backbone, input_ids_BP: torch.Tensor, attention_mask_BP: torch.Tensor, chunk_size: int):
    """The context's per-layer `kv_B2APD` without gradient, `chunk_size` positions per forward: the peak is the cache
    plus one chunk's activations, whatever the context length."""
    cache = DynamicCache()
    positions_BP = position_ids(attention_mask_BP)
    context_len = input_ids_BP.size(1)
    for start in range(0, context_len, chunk_size):
        end = min(start + chunk_size, context_len)
        backbone(
            input_ids=input_ids_BP[:, start:end],
            attention_mask=attention_mask_BP[:, :end],
            position_ids=positions_BP[:, start:end],
            use_cache=True,
            **{_cache_kwarg(backbone): cache},
        )
    return [torch.stack([layer.keys, layer.values], dim=1) for layer in cache.layers]


def completion_hidden_states(backbone, kv_by_layer, input_ids_BL, attention_mask_BL, logits_to_keep: int):
    """Last hidden states of the K positions that predict the completion tokens, the context read from `kv_by_layer`.

    `input_ids_BL` is prompt + completion (L = P + K); the forward with gradient runs over positions P-1 .. L-2.
    """
    context_len = input_ids_BL.size(1) - logits_to_keep - 1
    positions_BL = position_ids(attention_mask_BL)
    with checkpoint_with_read_only_cache(backbone):
        out = backbone(
            input_ids=input_ids_BL[:, context_len:-1],
            attention_mask=attention_mask_BL[:, :-1],
            position_ids=positions_BL[:, context_len:-1],
            use_cache=True,
            **{_cache_kwarg(backbone): frozen_prefix_cache(kv_by_layer)},
        )
    return out.last_hidden_state  # (B, K, H)
