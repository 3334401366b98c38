"""Which (query, key) pairs of one attention block are visible, from global indices.

The ring never builds an S×S mask. A block is one query chunk against one key chunk; the
global position of every row is affine (``start + i * stride``: contiguous chunks for the
``ring``/``zigzag``/``distflash`` layouts, stride P for ``striped``), so the visible key range
of each query row, and whether a whole block is empty, full or partial, follow from integer
arithmetic. Per-token data (document ids, key validity) is compared only where needed.

What is visible and how scores are formed is the block's ``AttentionSpec`` (``attention_spec``:
a band ``-behind <= k_pos - q_pos <= ahead``, same document, valid key; soft-cap, ALiBi). Score
semantics change scores, not visibility: block kinds and tiles depend on visibility only.

Shape legend: B batch, M query rows of the block, N key rows of the block, Hq query heads.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .attention_spec import AttentionSpec

__all__ = ["BlockMask", "BlockKind", "classify_block", "visible_key_range", "TilePlan", "plan_tiles",
           "dense_visibility", "alibi_bias", "position_bias", "add_position_bias_grad", "split_tiles"]


class BlockKind(enum.Enum):
    EMPTY = "empty"      # no pair visible: the block is skipped
    FULL = "full"        # every pair visible: no mask at all
    PARTIAL = "partial"  # some pairs visible


@dataclass(frozen=True)
class BlockMask:
    """The mask of one block as data: its spec, the global positions of its rows and the
    per-token data of those rows.

    Query row i sits at global position ``q_start + i * q_stride``, key row j at
    ``k_start + j * k_stride`` (strides > 0). ``q_doc [B or 1, M]`` and ``k_doc [B or 1, N]``
    are integer document ids (both or neither, with ``spec.docs``); ``k_valid [B or 1, N]`` bool
    marks the keys that may be seen (``spec.key_padding``; None when every key of the block is
    valid: the ring drops an all-true one so kernels keep their unmasked fast paths);
    ``alibi_slopes [Hq]`` (float, no grad) with ``spec.alibi``; ``rel_bias [Hq, 2S − 1]`` (float)
    with ``spec.rel_bias``: the bias of every offset ``k_pos − q_pos`` from −(S − 1) to S − 1;
    ``rel_bias_grad [Hq, 2S − 1]`` (fp32/fp64) when the table is learned: the backward adds the
    block's gradient of every offset into it (the math kernel, which forms the score gradient).
    """

    q_start: int = 0
    q_stride: int = 1
    k_start: int = 0
    k_stride: int = 1
    spec: AttentionSpec = field(default_factory=AttentionSpec)
    q_doc: torch.Tensor | None = None
    k_doc: torch.Tensor | None = None
    k_valid: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    rel_bias: torch.Tensor | None = None
    rel_bias_grad: torch.Tensor | None = None

    @classmethod
    def of(cls, *, causal: bool = False, window: int | None = None, softcap: float | None = None,
           alibi_slopes: torch.Tensor | None = None, **fields) -> BlockMask:
        """A block mask from the classic arguments (``AttentionSpec.of``), the rest as fields."""
        spec = AttentionSpec.of(causal=causal, window=window, softcap=softcap, alibi=alibi_slopes is not None,
                                docs=fields.get("q_doc") is not None,
                                key_padding=fields.get("k_valid") is not None)
        return cls(spec=spec, alibi_slopes=alibi_slopes, **fields)

    @property
    def causal(self) -> bool:
        return self.spec.causal

    @property
    def window(self) -> int | None:
        return self.spec.window

    @property
    def softcap(self) -> float | None:
        return self.spec.softcap

    @property
    def positional(self) -> bool:
        """True when positions matter (a band bounded on some side)."""
        return self.spec.positional

    @property
    def has_docs(self) -> bool:
        return self.q_doc is not None

    @property
    def has_padding(self) -> bool:
        return self.k_valid is not None

    @property
    def per_token(self) -> bool:
        """Visibility reads per-token data (documents or key padding): tiles are dense."""
        return self.has_docs or self.has_padding

    @property
    def plain_scores(self) -> bool:
        """True when scores are ``scale · q kᵀ`` as they are (no ALiBi bias, no soft-capping):
        what kernels without a bias or cap input (ATen flash) compute exactly."""
        return self.alibi_slopes is None and self.rel_bias is None and self.spec.softcap is None

    @property
    def position_biased(self) -> bool:
        """Scores get a bias from global positions (ALiBi, a relative-position table): every
        kernel call needs its rows' true positions."""
        return self.alibi_slopes is not None or self.rel_bias is not None


def _positional_kind(mask: BlockMask, M: int, N: int) -> BlockKind:
    spec = mask.spec
    if not spec.positional:
        return BlockKind.FULL
    q_lo, q_hi = mask.q_start, mask.q_start + (M - 1) * mask.q_stride
    k_lo, k_hi = mask.k_start, mask.k_start + (N - 1) * mask.k_stride
    if spec.ahead is not None and k_lo - q_hi > spec.ahead:       # every key is too far ahead
        return BlockKind.EMPTY
    if spec.behind is not None and q_lo - k_hi > spec.behind:     # every key is too far behind
        return BlockKind.EMPTY
    full = ((spec.ahead is None or k_hi - q_lo <= spec.ahead)
            and (spec.behind is None or q_hi - k_lo <= spec.behind))
    return BlockKind.FULL if full else BlockKind.PARTIAL


def _doc_kind(mask: BlockMask) -> BlockKind:
    if not mask.has_docs:
        return BlockKind.FULL
    qd, kd = mask.q_doc, mask.k_doc
    q_min, q_max = qd.amin(dim=-1), qd.amax(dim=-1)
    k_min, k_max = kd.amin(dim=-1), kd.amax(dim=-1)
    # Ranges that do not overlap in any batch row share no document (sound for any ids).
    if bool(((q_max < k_min) | (k_max < q_min)).all()):
        return BlockKind.EMPTY
    if bool(((q_min == q_max) & (k_min == k_max) & (q_min == k_min)).all()):
        return BlockKind.FULL
    return BlockKind.PARTIAL


def _padding_kind(mask: BlockMask) -> BlockKind:
    if not mask.has_padding:
        return BlockKind.FULL
    if not bool(mask.k_valid.any()):
        return BlockKind.EMPTY
    return BlockKind.FULL if bool(mask.k_valid.all()) else BlockKind.PARTIAL


def classify_block(mask: BlockMask, M: int, N: int) -> BlockKind:
    """Empty, full or partial, before any kernel runs (cheap: integer arithmetic and, with
    per-token data, one min/max or any/all per batch row)."""
    if M == 0 or N == 0:
        return BlockKind.EMPTY
    kinds = []
    for kind_of in (lambda: _positional_kind(mask, M, N), lambda: _doc_kind(mask), lambda: _padding_kind(mask)):
        kind = kind_of()
        if kind is BlockKind.EMPTY:
            return kind
        kinds.append(kind)
    return BlockKind.FULL if all(k is BlockKind.FULL for k in kinds) else BlockKind.PARTIAL


def visible_key_range(mask: BlockMask, M: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row, the half-open range ``[lo, hi)`` of key rows visible by position.

    Positions increase along both chunks, so the visible keys of a row are contiguous.
    Per-token data (documents, key padding) is not considered here. Returns two int64 tensors
    of shape [M]; a row with ``hi <= lo`` sees no key.
    """
    spec = mask.spec
    q_pos = mask.q_start + torch.arange(M, dtype=torch.int64) * mask.q_stride
    if spec.ahead is not None:
        # last key with k_pos <= q_pos + ahead
        hi = torch.div(q_pos + spec.ahead - mask.k_start, mask.k_stride, rounding_mode="floor") + 1
    else:
        hi = torch.full((M,), N, dtype=torch.int64)
    if spec.behind is not None:
        # first key with k_pos >= q_pos - behind
        lo = torch.div(q_pos - spec.behind - 1 - mask.k_start, mask.k_stride, rounding_mode="floor") + 1
    else:
        lo = torch.zeros(M, dtype=torch.int64)
    return lo.clamp(0, N), hi.clamp(0, N)


@dataclass(frozen=True)
class TilePlan:
    """One kernel call: query rows ``[q0, q1)`` against key rows ``[k0, k1)``.

    ``mode`` is ``"full"`` (no mask), ``"causal"`` (top-left aligned: row q0+i sees keys
    k0..k0+i) or ``"dense"`` (an explicit mask of the tile, built by ``dense_visibility``).
    """

    q0: int
    q1: int
    k0: int
    k1: int
    mode: str


def _tile_mode(lo: torch.Tensor, hi: torch.Tensor, k0: int, k1: int, per_token: bool) -> str:
    if per_token:
        return "dense"
    if bool((lo == k0).all()) and bool((hi == k1).all()):
        return "full"
    steps = torch.arange(1, lo.numel() + 1, dtype=torch.int64)
    if bool((lo == k0).all()) and bool((hi == k0 + steps).all()):
        return "causal"
    return "dense"


def plan_tiles(mask: BlockMask, M: int, N: int, tile_rows: int) -> list[TilePlan]:
    """Split a block into kernel calls that need at most a tile-sized mask.

    The whole block is one call when it is unmasked or plainly causal (after dropping leading
    rows that see nothing, as in a striped block whose keys start one step later). Otherwise
    query tiles of ``tile_rows`` rows, each against only the keys its rows can see. Rows that
    see no key are left out of every call; the caller gives them out = 0, lse = -inf.
    """
    lo, hi = visible_key_range(mask, M, N)
    alive = hi > lo
    if not bool(alive.any()):
        return []
    first = int(alive.to(torch.int8).argmax())
    if bool(alive[first:].all()):
        k0, k1 = int(lo[first:].min()), int(hi[first:].max())
        mode = _tile_mode(lo[first:], hi[first:], k0, k1, mask.per_token)
        if mode != "dense":
            return [TilePlan(first, M, k0, k1, mode)]
    tiles = []
    for q0 in range(0, M, tile_rows):
        q1 = min(M, q0 + tile_rows)
        a = alive[q0:q1]
        if not bool(a.any()):
            continue
        t_lo, t_hi = lo[q0:q1], hi[q0:q1]
        k0, k1 = int(t_lo[a].min()), int(t_hi[a].max())
        mode = _tile_mode(t_lo, t_hi, k0, k1, mask.per_token) if bool(a.all()) else "dense"
        tiles.append(TilePlan(q0, q1, k0, k1, mode))
    return tiles


def dense_visibility(mask: BlockMask, tile: TilePlan, device: torch.device) -> torch.Tensor:
    """Boolean visibility of one tile: ``[T, K]`` by position, or ``[B or 1, T, K]`` with
    per-token data (T = q1 - q0, K = k1 - k0)."""
    spec = mask.spec
    q_pos = mask.q_start + torch.arange(tile.q0, tile.q1, dtype=torch.int64, device=device) * mask.q_stride
    k_pos = mask.k_start + torch.arange(tile.k0, tile.k1, dtype=torch.int64, device=device) * mask.k_stride
    ahead = k_pos[None, :] - q_pos[:, None]                           # k_pos - q_pos  [T, K]
    visible = torch.ones(ahead.shape, dtype=torch.bool, device=device)
    if spec.ahead is not None:
        visible &= ahead <= spec.ahead
    if spec.behind is not None:
        visible &= -ahead <= spec.behind
    if mask.has_docs:
        q_doc = mask.q_doc[:, tile.q0:tile.q1].to(device)
        k_doc = mask.k_doc[:, tile.k0:tile.k1].to(device)
        visible = visible[None] & (q_doc[:, :, None] == k_doc[:, None, :])
    if mask.has_padding:
        k_valid = mask.k_valid[:, tile.k0:tile.k1].to(device=device, dtype=torch.bool)
        visible = (visible if visible.dim() == 3 else visible[None]) & k_valid[:, None, :]
    return visible


def split_tiles(tiles: list[TilePlan], tile_rows: int) -> list[TilePlan]:
    """The same calls with at most ``tile_rows`` query rows each, for kernels that materialise
    a bias or scores per tile. A causal tile cut into rows is no longer top-left aligned, so its
    pieces are ``dense`` (visibility is evaluated from positions)."""
    out = []
    for t in tiles:
        if t.q1 - t.q0 <= tile_rows:
            out.append(t)
            continue
        mode = "full" if t.mode == "full" else "dense"
        out += [TilePlan(q0, min(t.q1, q0 + tile_rows), t.k0, t.k1, mode) for q0 in range(t.q0, t.q1, tile_rows)]
    return out


def alibi_bias(mask: BlockMask, tile: TilePlan, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The ALiBi bias ``slopes[h] · (k_pos − q_pos)`` of one tile as [Hq, T, K] in ``dtype``.

    Position differences are exact integers before the multiply, so a key near the query gets
    a bias with full relative precision however long the global sequence is.
    """
    q_pos = mask.q_start + torch.arange(tile.q0, tile.q1, dtype=torch.int64, device=device) * mask.q_stride
    k_pos = mask.k_start + torch.arange(tile.k0, tile.k1, dtype=torch.int64, device=device) * mask.k_stride
    diff = (k_pos[None, :] - q_pos[:, None]).to(dtype)                 # [T, K]
    return mask.alibi_slopes.to(device=device, dtype=dtype)[:, None, None] * diff[None]


def _table_index(mask: BlockMask, tile: TilePlan, device: torch.device) -> torch.Tensor:
    """[T, K] int64: the column ``k_pos − q_pos + S − 1`` of the relative-position table."""
    q_pos = mask.q_start + torch.arange(tile.q0, tile.q1, dtype=torch.int64, device=device) * mask.q_stride
    k_pos = mask.k_start + torch.arange(tile.k0, tile.k1, dtype=torch.int64, device=device) * mask.k_stride
    return (k_pos[None, :] - q_pos[:, None]) + (mask.rel_bias.shape[-1] - 1) // 2


def position_bias(mask: BlockMask, tile: TilePlan, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """The bias from positions of one tile as [Hq, T, K] in ``dtype``: ALiBi plus the
    relative-position table's entries ``table[h, k_pos − q_pos + S − 1]``; None without either."""
    bias = None if mask.alibi_slopes is None else alibi_bias(mask, tile, device, dtype)
    if mask.rel_bias is not None:
        rel = mask.rel_bias.to(device=device, dtype=dtype)[:, _table_index(mask, tile, device)]   # [Hq, T, K]
        bias = rel if bias is None else bias + rel
    return bias


def add_position_bias_grad(mask: BlockMask, tile: TilePlan, d_scores: torch.Tensor) -> None:
    """Add a tile's score gradient ``d_scores [Hq, T, K]`` (summed over the batch) into
    ``mask.rel_bias_grad`` at each pair's offset: the table entry of an offset gets the sum
    over every pair at that offset. Invisible pairs carry a zero gradient."""
    Hq = d_scores.shape[0]
    index = _table_index(mask, tile, d_scores.device).reshape(1, -1).expand(Hq, -1)
    mask.rel_bias_grad.scatter_add_(1, index, d_scores.reshape(Hq, -1).to(mask.rel_bias_grad.dtype))
