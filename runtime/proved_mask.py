"""``ProvedMask``: an attention mask that crosses a frame boundary as proved facts.

Why: transformers builds its mask in one place (``create_causal_mask``) and uses it in every
decoder layer. When a graph break puts the builder and the layers in different frames, the
layers' frame receives an opaque ``[B, H, S, S]`` tensor: a frame input it cannot prove causal,
so every attention ran replicated. Re-proving a tensor by its values in the next frame would
need an S×S check per call; instead the frame that *builds* the mask proves it (``mask_proof``,
from the ops that made it) and hands out this value: to every reader the exact mask, held as
the facts that determine it.

The value (a wrapper tensor subclass, traced by Dynamo through ``__tensor_flatten__``):
  * logically the full mask, of the builder's shape, dtype and strides;
  * stored as ``tokens``: the per-token data its visibility reads, ``[n, B, S]`` int64 — the
    packed-document ids (transformers' packed sequences) when ``spec.docs``, then the key
    validity (0/1, a padding mask) when ``spec.key_padding`` — or an empty ``[0]`` tensor;
  * ``facts`` (``MaskFacts``, frozen and hashable): the visibility ``AttentionSpec`` (a band of
    positions, documents, key padding) and how visibility is encoded (bool True = visible, bool
    True = hidden, or an additive float mask, 0 where visible and one ``fill`` value where
    hidden). Dynamo guards on the flatten context, which is the facts less the length S: S is
    read back from the mask's last size, so a new length does not recompile the frames the mask
    crosses.

A compiled frame that receives it rebuilds the mask in its graph from index ranges and ``tokens``
(``seqpar_compiler/mask_frames.py``): the attention rules prove that as they prove a mask built
in the frame, the ring takes the spec and the per-token data, and the S×S nodes die unused.
Eager code that reads it (an op outside a compiled frame) gets the materialised mask, with a
warning, since at long context an S×S mask is what this value exists to avoid.

Shape legend: B batch, H mask heads (often 1), S sequence length; mask [B, H, S, S] (or any
leading dims ending in [S, S]); tokens [n, B, S] int64 (n ≤ 2) or [0].
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from seqpar_compiler.kernels import AttentionSpec

__all__ = ["MaskFacts", "ProvedMask", "visibility", "materialize", "token_rows"]

_ENCODINGS = ("visible", "hidden", "additive")


@dataclass(frozen=True)
class MaskFacts:
    """What determines a proved mask: ``visible[b, q, kv]`` is the visibility of ``spec`` (a band
    ``-behind <= kv - q <= ahead``, ``doc[b, q] == doc[b, kv]`` with ``spec.docs``,
    ``valid[b, kv]`` with ``spec.key_padding``), encoded per ``encoding`` (``fill`` is the hidden
    value of an additive mask)."""

    S: int = field(hash=False)      # a SymInt while Dynamo traces a symbolic length: not hashable
    spec: AttentionSpec
    encoding: str
    fill: float = 0.0

    def __post_init__(self):
        if self.encoding not in _ENCODINGS:
            raise ValueError(f"MaskFacts.encoding must be one of {_ENCODINGS}; got {self.encoding!r}")
        if self.spec != self.spec.visibility:
            raise ValueError(f"MaskFacts.spec holds visibility only (a band, documents, key padding); "
                             f"got {self.spec}")

    def describe(self) -> str:
        return self.spec.describe()


def token_rows(spec: AttentionSpec) -> dict[str, int]:
    """Which row of ``tokens`` holds what: {"docs": i, "key_padding": j} for the spec's flags."""
    names = [name for name in ("docs", "key_padding") if getattr(spec, name)]
    return {name: i for i, name in enumerate(names)}


def visibility(facts: MaskFacts, tokens: Tensor, device) -> Tensor:
    """Bool visibility [1 or B, 1, S, S] of the facts (True = the key is visible)."""
    S, spec, rows = facts.S, facts.spec, token_rows(facts.spec)
    q = torch.arange(S, device=device).view(1, 1, S, 1)
    kv = torch.arange(S, device=device).view(1, 1, 1, S)
    visible = torch.ones(1, 1, S, S, dtype=torch.bool, device=device)
    if spec.ahead is not None:
        visible = visible & (kv - q <= spec.ahead)
    if spec.behind is not None:
        visible = visible & (q - kv <= spec.behind)
    if spec.docs:
        docs = tokens[rows["docs"]]
        visible = visible & (docs[:, None, :, None] == docs[:, None, None, :])
    if spec.key_padding:
        visible = visible & (tokens[rows["key_padding"]] != 0)[:, None, None, :]
    return visible


def materialize(facts: MaskFacts, tokens: Tensor, shape, stride, dtype: torch.dtype) -> Tensor:
    """The mask itself, of the builder's shape, strides and dtype (fake when ``tokens`` is: the
    index ranges are then made in its fake mode, as Dynamo traces a frame)."""
    if _is_fake(tokens) and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None:
        with tokens.fake_mode:
            return materialize(facts, tokens, shape, stride, dtype)
    visible = visibility(facts, tokens, tokens.device)
    if len(shape) < 4:                              # an [S, S] or [B, S, S] mask (no per-token data then)
        visible = visible.reshape(visible.shape[4 - len(shape):])
    if facts.encoding == "visible":
        value = visible
    elif facts.encoding == "hidden":
        value = ~visible
    else:
        value = torch.where(visible, 0.0, facts.fill).to(dtype)
    if 0 in tuple(stride):                          # the builder's mask was itself a broadcast view
        return value.expand(tuple(shape))
    out = torch.empty_strided(tuple(shape), tuple(stride), dtype=dtype, device=tokens.device)
    return out.copy_(value.expand(tuple(shape)))


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


class ProvedMask(torch.Tensor):
    """The full mask, held as ``tokens`` and ``facts`` (see module doc). Never requires grad."""

    tokens: Tensor
    facts: MaskFacts
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, tokens: Tensor, facts: MaskFacts, shape, stride, dtype: torch.dtype):
        out = torch.Tensor._make_wrapper_subclass(cls, shape, strides=stride, dtype=dtype, device=tokens.device,
                                                  requires_grad=False)
        out.tokens = tokens
        out.facts = facts
        return out

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"ProvedMask({self.facts.describe()}, shape={tuple(self.shape)}, dtype={self.dtype})"

    def __tensor_flatten__(self):
        # S left out of the guarded context (one trace for every length); the rest of the facts
        # in field order
        rest = tuple(getattr(self.facts, f.name) for f in fields(MaskFacts) if f.name != "S")
        return ["tokens"], (rest, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        rest, dtype = meta
        facts = MaskFacts(outer_size[-1], *rest)
        return ProvedMask(inner["tokens"], facts, outer_size, outer_stride, dtype)

    def full_tensor(self) -> Tensor:
        return materialize(self.facts, self.tokens, self.shape, self.stride(), self.dtype)

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
            return ProvedMask(m.tokens, m.facts, m.shape, m.stride(), m.dtype)
        masks = [a for a in args if isinstance(a, ProvedMask)]
        if masks and not _is_fake(masks[0].tokens):
            warnings.warn(f"seqpar: eager op {func} on a proved {masks[0].facts.describe()} attention mask: "
                          f"materialising it ({list(masks[0].shape)}); inside a compiled frame it stays "
                          f"facts, outside one it costs the full S x S, and attention run outside compiled "
                          f"frames runs over the whole sequence on every rank (a torch.utils.checkpoint'ed "
                          f"layer whose body has a graph break runs uncompiled: docs/training.md)", stacklevel=3)
        plain = tree_map(lambda a: a.full_tensor() if isinstance(a, ProvedMask) else a, (args, kwargs))
        return func(*plain[0], **plain[1])
