"""``ProvedMask``: an attention mask that crosses a frame boundary as proved facts (issue 13).

Why: transformers builds its mask in one place (``create_causal_mask``) and uses it in every
decoder layer. When a graph break puts the builder and the layers in different frames, the
layers' frame receives an opaque ``[B, H, S, S]`` tensor: a frame input it cannot prove causal,
so every attention ran replicated. Re-proving a tensor by its values in the next frame would
need an S×S check per call; instead the frame that *builds* the mask proves it (``mask_proof``,
from the ops that made it) and hands out this value: to every reader the exact mask, held as
the facts that determine it.

The value (a wrapper tensor subclass, traced by Dynamo through ``__tensor_flatten__``):
  * logically the full mask, of the builder's shape, dtype and strides;
  * stored as ``docs``: the packed-document ids ``[B, S]`` when visibility also needs the same
    document (transformers' packed sequences), else an empty tensor on the mask's device;
  * ``facts`` (``MaskFacts``, frozen and hashable): causal, window, whether there are documents,
    and how visibility is encoded (bool True = visible, bool True = hidden, or an additive float
    mask, 0 where visible and one ``fill`` value where hidden). Dynamo guards on the flatten
    context, which is the facts less the length S: S is read back from the mask's last size, so
    a new length does not recompile the frames the mask crosses (issue 13).

A compiled frame that receives it rebuilds the mask in its graph from index ranges and ``docs``
(``seqpar_compiler/mask_frames.py``): the attention rules prove that as they prove a mask built
in the frame, the ring takes causal/window/doc ids, and the S×S nodes die unused. Eager code
that reads it (an op outside a compiled frame) gets the materialised mask, with a warning,
since at long context an S×S mask is what this value exists to avoid.

Shape legend: B batch, H mask heads (often 1), S sequence length; mask [B, H, S, S] (or any
leading dims ending in [S, S]); docs [B, S] integer or [0].
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

__all__ = ["MaskFacts", "ProvedMask", "visibility", "materialize"]

_ENCODINGS = ("visible", "hidden", "additive")


@dataclass(frozen=True)
class MaskFacts:
    """What determines a proved mask: ``visible[b, q, kv] = (not causal or kv <= q) and (window
    is None or q - kv < window) and (not docs or doc[b, q] == doc[b, kv])``, encoded per
    ``encoding`` (``fill`` is the hidden value of an additive mask)."""

    S: int = field(hash=False)      # a SymInt while Dynamo traces a symbolic length: not hashable
    causal: bool
    window: int | None
    docs: bool
    encoding: str
    fill: float = 0.0

    def __post_init__(self):
        if self.encoding not in _ENCODINGS:
            raise ValueError(f"MaskFacts.encoding must be one of {_ENCODINGS}; got {self.encoding!r}")

    def describe(self) -> str:
        kind = "sliding-window" if self.window is not None else "causal" if self.causal else "full"
        return kind + (" document" if self.docs else "")


def visibility(facts: MaskFacts, docs: Tensor, device) -> Tensor:
    """Bool visibility [1 or B, 1, S, S] of the facts (True = the key is visible)."""
    S = facts.S
    q = torch.arange(S, device=device).view(1, 1, S, 1)
    kv = torch.arange(S, device=device).view(1, 1, 1, S)
    visible = kv <= q if facts.causal else torch.ones(1, 1, S, S, dtype=torch.bool, device=device)
    if facts.window is not None:
        visible = visible & (kv > q - facts.window)
    if facts.docs:
        visible = visible & (docs[:, None, :, None] == docs[:, None, None, :])
    return visible


def materialize(facts: MaskFacts, docs: Tensor, shape, stride, dtype: torch.dtype) -> Tensor:
    """The mask itself, of the builder's shape, strides and dtype (fake when ``docs`` is: the
    index ranges are then made in its fake mode, as Dynamo traces a frame)."""
    if _is_fake(docs) and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None:
        with docs.fake_mode:
            return materialize(facts, docs, shape, stride, dtype)
    visible = visibility(facts, docs, docs.device)
    if len(shape) < 4:                              # an [S, S] or [B, S, S] mask (no documents then)
        visible = visible.reshape(visible.shape[4 - len(shape):])
    if facts.encoding == "visible":
        value = visible
    elif facts.encoding == "hidden":
        value = ~visible
    else:
        value = torch.where(visible, 0.0, facts.fill).to(dtype)
    if 0 in tuple(stride):                          # the builder's mask was itself a broadcast view
        return value.expand(tuple(shape))
    out = torch.empty_strided(tuple(shape), tuple(stride), dtype=dtype, device=docs.device)
    return out.copy_(value.expand(tuple(shape)))


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


class ProvedMask(torch.Tensor):
    """The full mask, held as ``docs`` and ``facts`` (see module doc). Never requires grad."""

    docs: Tensor
    facts: MaskFacts
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, docs: Tensor, facts: MaskFacts, shape, stride, dtype: torch.dtype):
        out = torch.Tensor._make_wrapper_subclass(cls, shape, strides=stride, dtype=dtype, device=docs.device,
                                                  requires_grad=False)
        out.docs = docs
        out.facts = facts
        return out

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"ProvedMask({self.facts.describe()}, shape={tuple(self.shape)}, dtype={self.dtype})"

    def __tensor_flatten__(self):
        # S left out of the guarded context (one trace for every length); the rest of the facts
        # in field order
        rest = tuple(getattr(self.facts, f.name) for f in fields(MaskFacts) if f.name != "S")
        return ["docs"], (rest, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        rest, dtype = meta
        facts = MaskFacts(outer_size[-1], *rest)
        return ProvedMask(inner["docs"], facts, outer_size, outer_stride, dtype)

    def full_tensor(self) -> Tensor:
        return materialize(self.facts, self.docs, self.shape, self.stride(), self.dtype)

    def tolist(self):
        return self.full_tensor().tolist()

    def numpy(self, *args, **kwargs):
        return self.full_tensor().numpy(*args, **kwargs)

    @classmethod
    @torch._disable_dynamo
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            (m,) = args
            return ProvedMask(m.docs, m.facts, m.shape, m.stride(), m.dtype)
        masks = [a for a in args if isinstance(a, ProvedMask)]
        if masks and not _is_fake(masks[0].docs):
            warnings.warn(f"seqpar: eager op {func} on a proved {masks[0].facts.describe()} attention mask: "
                          f"materialising it ({list(masks[0].shape)}); inside a compiled frame it stays "
                          f"facts, outside one it costs the full S x S", stacklevel=3)
        plain = tree_map(lambda a: a.full_tensor() if isinstance(a, ProvedMask) else a, (args, kwargs))
        return func(*plain[0], **plain[1])
