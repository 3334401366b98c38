"""Which (query, key) pairs of one attention block are visible, from global indices.

The ring never builds an S×S mask. A block is one query chunk against one key chunk; the
global position of every row is affine (``start + i * stride``: contiguous chunks for the
``ring``/``zigzag``/``distflash`` layouts, stride P for ``striped``), so the visible key range
of each query row, and whether a whole block is empty, full or partial, follow from integer
arithmetic. Packed-document ids are per-token data and are compared only where needed.

Mask kinds (DESIGN §3), combined by conjunction:
  causal   key visible iff k_pos <= q_pos
  window   key visible iff q_pos - W < k_pos <= q_pos   (a window is always causal)
  doc ids  key visible iff q_doc == k_doc

Score semantics carried the same way, as data evaluated per block from global positions
(issue 12), never as an S×S tensor:
  softcap  s ← cap · tanh(s / cap)                        (Gemma 2), applied before the bias
  alibi    s ← s + slopes[h] · (k_pos − q_pos)            (ALiBi, signed form)
They change scores, not visibility: block kinds and tiles depend on the mask kinds only.

Shape legend: B batch, M query rows of the block, N key rows of the block.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

__all__ = ["BlockMask", "BlockKind", "classify_block", "visible_key_range", "TilePlan", "plan_tiles",
           "dense_visibility", "alibi_bias", "split_tiles"]


class BlockKind(enum.Enum):
    EMPTY = "empty"      # no pair visible: the block is skipped
    FULL = "full"        # every pair visible: no mask at all
    PARTIAL = "partial"  # some pairs visible


@dataclass(frozen=True)
class BlockMask:
    """The mask of one block as data.

    Query row i sits at global position ``q_start + i * q_stride``, key row j at
    ``k_start + j * k_stride`` (strides > 0). ``q_doc [B, M]`` and ``k_doc [B, N]`` are integer
    document ids or both None. ``alibi_slopes [Hq]`` (float, no grad) adds
    ``slopes[h] · (k_pos − q_pos)`` to the scores of head h; ``softcap`` (> 0) caps the scores
    as ``cap · tanh(s / cap)`` before the bias.
    """

    q_start: int = 0
    q_stride: int = 1
    k_start: int = 0
    k_stride: int = 1
    causal: bool = False
    window: int | None = None
    q_doc: torch.Tensor | None = None
    k_doc: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    softcap: float | None = None

    @property
    def positional(self) -> bool:
        """True when positions matter (causal or window)."""
        return self.causal or self.window is not None

    @property
    def has_docs(self) -> bool:
        return self.q_doc is not None

    @property
    def plain_scores(self) -> bool:
        """True when scores are ``scale · q kᵀ`` as they are (no ALiBi bias, no soft-capping):
        what kernels without a bias or cap input (ATen flash) compute exactly."""
        return self.alibi_slopes is None and self.softcap is None


def _positional_kind(mask: BlockMask, M: int, N: int) -> BlockKind:
    if not mask.positional:
        return BlockKind.FULL
    q_lo, q_hi = mask.q_start, mask.q_start + (M - 1) * mask.q_stride
    k_lo, k_hi = mask.k_start, mask.k_start + (N - 1) * mask.k_stride
    if q_hi < k_lo:                                    # every key is in the future
        return BlockKind.EMPTY
    if mask.window is not None and q_lo - k_hi >= mask.window:   # every key is too old
        return BlockKind.EMPTY
    full = q_lo >= k_hi and (mask.window is None or q_hi - k_lo < mask.window)
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


def classify_block(mask: BlockMask, M: int, N: int) -> BlockKind:
    """Empty, full or partial, before any kernel runs (cheap: integer arithmetic and, with
    document ids, one min/max per batch row)."""
    if M == 0 or N == 0:
        return BlockKind.EMPTY
    pos = _positional_kind(mask, M, N)
    if pos is BlockKind.EMPTY:
        return pos
    doc = _doc_kind(mask)
    if doc is BlockKind.EMPTY:
        return doc
    return BlockKind.FULL if pos is doc is BlockKind.FULL else BlockKind.PARTIAL


def visible_key_range(mask: BlockMask, M: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row, the half-open range ``[lo, hi)`` of key rows visible by position.

    Positions increase along both chunks, so the visible keys of a row are contiguous.
    Document ids are not considered here. Returns two int64 tensors of shape [M]; a row with
    ``hi <= lo`` sees no key.
    """
    q_pos = mask.q_start + torch.arange(M, dtype=torch.int64) * mask.q_stride
    if mask.positional:
        # last key with k_pos <= q_pos
        hi = torch.div(q_pos - mask.k_start, mask.k_stride, rounding_mode="floor") + 1
    else:
        hi = torch.full((M,), N, dtype=torch.int64)
    if mask.window is not None:
        # first key with k_pos > q_pos - window
        lo = torch.div(q_pos - mask.window - mask.k_start, mask.k_stride, rounding_mode="floor") + 1
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


def _tile_mode(lo: torch.Tensor, hi: torch.Tensor, k0: int, k1: int, has_docs: bool) -> str:
    if has_docs:
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
        mode = _tile_mode(lo[first:], hi[first:], k0, k1, mask.has_docs)
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
        mode = _tile_mode(t_lo, t_hi, k0, k1, mask.has_docs) if bool(a.all()) else "dense"
        tiles.append(TilePlan(q0, q1, k0, k1, mode))
    return tiles


def dense_visibility(mask: BlockMask, tile: TilePlan, device: torch.device) -> torch.Tensor:
    """Boolean visibility of one tile: ``[T, K]`` by position, or ``[B, T, K]`` with documents
    (T = q1 - q0, K = k1 - k0)."""
    q_pos = mask.q_start + torch.arange(tile.q0, tile.q1, dtype=torch.int64, device=device) * mask.q_stride
    k_pos = mask.k_start + torch.arange(tile.k0, tile.k1, dtype=torch.int64, device=device) * mask.k_stride
    diff = q_pos[:, None] - k_pos[None, :]
    visible = torch.ones(diff.shape, dtype=torch.bool, device=device)
    if mask.positional:
        visible &= diff >= 0
    if mask.window is not None:
        visible &= diff < mask.window
    if mask.has_docs:
        q_doc = mask.q_doc[:, tile.q0:tile.q1].to(device)
        k_doc = mask.k_doc[:, tile.k0:tile.k1].to(device)
        visible = visible[None] & (q_doc[:, :, None] == k_doc[:, None, :])
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
