"""``AttentionSpec``: what one attention computes, besides its tensors. The one definition of the
attention vocabulary: the graph passes prove a model's attention *is* one, the op pair carries it
(encoded as a string, the only non-tensor form a custom op takes), proved masks that cross
frames hold its visibility part, the ring plans with it and every block kernel evaluates it.

It lives in ``kernels/``, the lowest layer, so that every layer above may import it.

Visibility (which keys a query sees), a conjunction of:
  band         ``-behind <= k_pos - q_pos <= ahead`` over global positions (None: unbounded on
               that side). ``ahead=0`` is causal; ``ahead=0, behind=W-1`` the causal sliding
               window W (HF's, Mistral's); ``behind=ahead=r`` a bidirectional local window
               (ModernBERT's ``|q - k| <= r``).
  docs         ``doc[b, q] == doc[b, k]``: packed documents / segment ids (ids given per token).
  key_padding  ``valid[b, k]``: keys marked invalid are seen by no query (a padding mask; one
               bool per token). A query that sees no key at all gets out = 0, lse = -inf
               (as F.scaled_dot_product_attention with a boolean mask).

Scores, for the visible pairs: ``s = scale · q kᵀ``; with ``softcap`` ``s ← cap · tanh(s / cap)``
(Gemma 2); with ``alibi`` ``s += slopes[h] · (k_pos − q_pos)`` (slopes given per head, no
gradient); with ``rel_bias`` ``s += table[h, k_pos − q_pos + S − 1]`` (any per-head function of
the offset, given as a [Hq, 2S − 1] table: a symmetric ALiBi, T5's bucketed bias). Then softmax
over the visible keys, times V (whose head dim Dv may differ from D: a shape, not a field).

Per-token and per-head data (doc ids, key validity, slopes) are tensors that travel beside the
spec, never in it: the spec is frozen and hashable (a Dynamo guard and a cache key), the data
is sharded with its tokens and, for keys, travels around the ring with its K/V block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from functools import lru_cache

__all__ = ["AttentionSpec"]

_FLAGS = ("docs", "key_padding", "alibi", "rel_bias")


@dataclass(frozen=True, kw_only=True)
class AttentionSpec:
    """The attention vocabulary (module docstring). Every field has a default meaning "off"."""

    scale: float | None = None
    """Softmax scale on ``q kᵀ``; None where it is not decided (a mask alone)."""
    behind: int | None = None
    """A key may sit at most this many positions before its query (None: any)."""
    ahead: int | None = None
    """A key may sit at most this many positions after its query (None: any; 0: causal)."""
    docs: bool = False
    """Visibility also needs the same document id (ids ``[B, S]`` given)."""
    key_padding: bool = False
    """Visibility also needs the key to be valid (a bool ``[B, S]`` given)."""
    alibi: bool = False
    """Scores get ``slopes[h] · (k_pos − q_pos)`` (slopes ``[Hq]`` given)."""
    rel_bias: bool = False
    """Scores get ``table[h, k_pos − q_pos + S − 1]`` (a table ``[Hq, 2S − 1]`` given)."""
    softcap: float | None = None
    """Scores are capped as ``cap · tanh(s / cap)`` before the bias."""

    def __post_init__(self):
        for name in ("behind", "ahead"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"AttentionSpec.{name} must be an int or None; got {v!r}")
        if self.behind is not None and self.ahead is not None and self.behind + self.ahead < 0:
            raise ValueError(f"AttentionSpec band -{self.behind} <= k - q <= {self.ahead} is empty")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise ValueError(f"softcap must be a finite float > 0 (scores become softcap * tanh(s / softcap)); "
                             f"got {self.softcap}")
        if self.scale is not None and not math.isfinite(self.scale):
            raise ValueError(f"scale must be finite; got {self.scale}")

    @classmethod
    def of(cls, *, causal: bool = False, window: int | None = None, **rest) -> AttentionSpec:
        """The spec of the classic arguments: ``causal``, and a causal sliding ``window`` W
        (key visible iff q − W < k ≤ q; a window is always causal)."""
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, int) or window < 1:
                raise ValueError(f"window must be an int >= 1 (keys with q - window < k <= q are visible); "
                                 f"got {window!r}")
            return cls(behind=window - 1, ahead=0, **rest)
        return cls(ahead=0 if causal else None, **rest)

    @property
    def causal(self) -> bool:
        """No key after its query is visible, and every earlier one up to the band is."""
        return self.ahead == 0

    @property
    def window(self) -> int | None:
        """The causal sliding window W (``behind = W − 1``), None when not causal or unbounded."""
        return self.behind + 1 if self.causal and self.behind is not None else None

    @property
    def positional(self) -> bool:
        """Visibility depends on positions (a band bounded on some side)."""
        return self.behind is not None or self.ahead is not None

    @property
    def plain_scores(self) -> bool:
        """Scores are ``scale · q kᵀ`` as they are: what kernels without bias or cap inputs compute."""
        return not self.alibi and not self.rel_bias and self.softcap is None

    @property
    def visibility(self) -> AttentionSpec:
        """The visibility part alone (what a mask is): band, documents, key padding."""
        return AttentionSpec(behind=self.behind, ahead=self.ahead, docs=self.docs, key_padding=self.key_padding)

    def with_(self, **changes) -> AttentionSpec:
        return replace(self, **changes)

    def describe(self) -> str:
        """A short human name: ``causal``, ``sliding-window 8``, ``band [-8, 8]``, ``full``,
        then ``documents``, ``key padding``, ``ALiBi``, ``soft-cap 50.0``."""
        if self.window is not None:
            parts = [f"sliding-window {self.window}"]
        elif self.causal:
            parts = ["causal"]
        elif self.positional:
            lo = "-inf" if self.behind is None else f"-{self.behind}"
            hi = "inf" if self.ahead is None else str(self.ahead)
            parts = [f"band [{lo}, {hi}]"]
        else:
            parts = ["full"]
        parts += [name for flag, name in (("docs", "documents"), ("key_padding", "key padding"),
                                          ("alibi", "ALiBi"), ("rel_bias", "relative-position bias"))
                  if getattr(self, flag)]
        if self.softcap is not None:
            parts.append(f"soft-cap {self.softcap}")
        return " ".join(parts)

    def encode(self) -> str:
        """The spec as a custom-op argument: ``"scale=0.25,ahead=0,docs"`` (fields that are off
        are left out; floats by ``repr``, which round-trips exactly). ``decode`` inverts it."""
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in _FLAGS:
                if v:
                    parts.append(f.name)
            elif v is not None:
                parts.append(f"{f.name}={v!r}")
        return ",".join(parts)

    @staticmethod
    def decode(text: str) -> AttentionSpec:
        return _decode(text)


@lru_cache(maxsize=1024)
def _decode(text: str) -> AttentionSpec:
    kwargs: dict = {}
    for part in filter(None, text.split(",")):
        name, eq, value = part.partition("=")
        if not eq:
            if name not in _FLAGS:
                raise ValueError(f"unknown attention spec flag {name!r} in {text!r}")
            kwargs[name] = True
        elif name in ("behind", "ahead"):
            kwargs[name] = int(value)
        elif name in ("scale", "softcap"):
            kwargs[name] = float(value)
        else:
            raise ValueError(f"unknown attention spec field {name!r} in {text!r}")
    return AttentionSpec(**kwargs)
