"""Idioms of the corpus along the sequence itself (issue 12 follow-up): chunked losses (parts of
the sequence, ``passes/range_rules.py``; ops with no part rule of their own through the
sharding core), max/min over the sequence (``passes/extreme_rules.py``),
a slice returned from the frame, and a scan inside a chunk (a warned, exact fallback)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_corpus import S, V, idiom
from idioms_ops import _LM, _lm, _loss_idiom


class _ChunkedCrossEntropy(_LM):
    """Chunked cross-entropy (Liger / torchtune style): hidden states split along the sequence,
    head + loss per chunk, summed."""

    def forward(self, ids, y):
        h = self.body(self.emb(ids))
        total = 0
        for hc, yc in zip(h.split(8, dim=1), y.split(8, dim=1)):
            total = total + F.cross_entropy(self.head(hc).flatten(0, 1), yc.flatten(), reduction="sum")
        return total / y.numel()


idiom("chunked-cross-entropy-over-sequence")(_lm(_ChunkedCrossEntropy))


class _ChunkedCrossEntropyChunk(_LM):
    """``chunk`` of the logits and labels (uneven pieces: 32 = 11 + 11 + 10), loss ``none``
    summed per chunk, then the mean over the valid targets."""

    def forward(self, ids, y):
        logits = self.head(self.body(self.emb(ids)))
        y = torch.where(y % 7 == 0, torch.full_like(y, -100), y)
        total = 0
        for lg, tg in zip(logits.chunk(3, dim=1), y.chunk(3, dim=1)):
            total = total + F.cross_entropy(lg.reshape(-1, V), tg.reshape(-1), reduction="none").sum()
        return total / (y != -100).sum()


idiom("chunked-cross-entropy-chunk")(_lm(_ChunkedCrossEntropyChunk))


class _ChunkedCrossEntropySlices(_LM):
    """``logits[:, i:i + n]`` slices in a loop, ``torch.split`` with sizes for the labels,
    per-chunk ``mean`` losses weighted by the chunk's share, a z-loss term on each chunk."""

    def forward(self, ids, y):
        h = self.body(self.emb(ids))
        sizes = [4, 12, 6, 10]
        total, at = 0, 0
        for n, tg in zip(sizes, torch.split(y, sizes, dim=1)):
            lg = self.head(h[:, at:at + n])
            at += n
            total = total + F.cross_entropy(lg.flatten(0, 1), tg.flatten(), label_smoothing=0.1) * (n / S)
            total = total + 1e-3 * lg.float().pow(2).mean()
        return total


idiom("chunked-cross-entropy-slices")(_lm(_ChunkedCrossEntropySlices))


@_loss_idiom("max-pool-over-sequence")
def _max_pool(self, logits, y):
    """Max-pooling a sequence (a classifier head): all-reduce MAX, the gradient to the argmax
    on the rank that holds it."""
    return logits.max(dim=1).values.softmax(-1)[:, 0].sum()


@_loss_idiom("amax-min-over-sequence")
def _amax(self, logits, y):
    """``amax`` / ``torch.min(dim)`` over the sequence, with their indices returned."""
    lo = torch.min(logits, 1)
    return logits.amax(1).logsumexp(-1).sum() + lo.values.sum(), lo.indices


class _MaxTies(_LM):
    """Ties across ranks that get different gradients: ``round(logits) · gain[position]`` with
    ``gain`` all ones, so many positions tie for the maximum and each tie's gradient lands on
    its own ``gain`` entry. ``max(dim)`` must give the first global position all of it (and
    return that index), ``amax`` and ``max()`` must spread it evenly, as eager does."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(S))

    def loss(self, logits, y):
        c = logits.detach().round() * self.gain[:, None]                 # ~6 ties per maximum
        v, i = c.max(dim=1)
        return v.sum() + c.amax(dim=(0, 1)).sum() + c.min() + F.cross_entropy(logits.view(-1, V), y.view(-1)), i


idiom("max-over-sequence-with-ties")(_lm(_MaxTies))


class _ChunkReturned(_LM):
    """A slice along the sequence that spans two ranks' tokens, returned from the frame (the
    part is gathered at the exit, exactly, with its gradient) next to the loss."""

    def forward(self, ids, y):
        logits = self.head(self.body(self.emb(ids)))
        return self.loss(logits, y), logits[:, 6:20].tanh()


idiom("sequence-slice-returned")(_lm(_ChunkReturned))


class _TableAtIndices(_LM):
    """Whole tables read at per-token indices by plain indexing (CodeGen / GPT-J's sinusoid
    buffer ``embed_positions[position_ids]``, a learned table ``bias[ids]``): each rank reads its
    own tokens' rows; the learned table's gradient is the scatter of its local rows, summed."""

    def __init__(self):
        super().__init__()
        angle = torch.arange(2 * S)[:, None] / 10.0 ** (torch.arange(4) / 4.0)
        self.register_buffer("sincos", torch.cat([angle.sin(), angle.cos()], -1), persistent=False)
        self.bias = nn.Parameter(torch.randn(V, 8) * 0.1)

    def forward(self, ids, y):
        pos = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        table = torch.cat([self.sincos[pos + 3], self.bias[ids]], -1)          # [B, S, 16]
        h = self.emb(ids)
        h = h + table.repeat(1, 1, h.shape[-1] // 16)
        return self.loss(self.head(self.body(h)), y)


idiom("table-read-at-per-token-indices")(_lm(_TableAtIndices))


class _SequenceClassifier(_LM):
    """HF's sequence classifiers: each row's last non-padding token found by ``argmax`` over the
    sequence of position × mask, its logits picked by ``logits[arange(B), last]``; and an
    ``argmin`` over the sequence with ``keepdim`` picked the same way (pairs of [B, 1] indices)."""

    def forward(self, ids, y):
        logits = self.head(self.body(self.emb(ids)))                                   # [B, S, V]
        rows = torch.arange(ids.shape[0], device=ids.device)
        last = (torch.arange(ids.shape[1], device=ids.device) * (ids != 3).int()).argmax(-1)
        pooled = logits[rows, last]                                                   # [B, V]
        lowest = logits[..., 0].argmin(dim=1, keepdim=True)                           # [B, 1]
        picked = logits[rows[:, None], lowest]                                        # [B, 1, V]
        return F.cross_entropy(pooled, y[:, 0]) + picked.square().mean()


idiom("sequence-classifier-pooling")(_lm(_SequenceClassifier))


class _TokenPooling(_LM):
    """BERT's pooler: the [CLS] token ``h[:, 0]``, and a token in another rank's half
    ``h[:, S // 2, :]``, through a head into the loss (the rank that holds neither still runs
    its backward: the ring's needs every rank)."""

    def forward(self, ids, y):
        h = self.body(self.emb(ids))
        pooled = torch.tanh(h[:, 0]) + h[:, S // 2, :]
        return F.cross_entropy(self.head(pooled), y[:, 0])


idiom("token-pooling-at-fixed-positions")(_lm(_TokenPooling))


class _NormAndLogSoftmaxInChunk(_LM):
    """Ops on a chunk that no part rule names, planned by the sharding core with the chunk's
    local length: an RMS norm and a final-logit soft-cap per chunk, then log-softmax and a
    ``gather`` of the target's log-probability along the vocabulary (a hand-written NLL)."""

    def forward(self, ids, y):
        h = self.body(self.emb(ids))
        total = 0
        for hc, yc in zip(h.chunk(4, dim=1), y.chunk(4, dim=1)):
            logits = self.head(F.rms_norm(hc, (hc.shape[-1],), eps=1e-6))
            logits = 30.0 * torch.tanh(logits / 30.0)
            lp = torch.log_softmax(logits.float(), dim=-1)
            total = total - lp.gather(-1, yc.unsqueeze(-1)).sum()
        return total / y.numel()


idiom("norm-and-log-softmax-inside-a-chunk")(_lm(_NormAndLogSoftmaxInChunk))


class _CumsumInChunk(_LM):
    """A running sum inside a chunk of the sequence: no exact rule on a part, so the part is
    gathered (warned, exact) and the loss of that chunk runs replicated."""

    def forward(self, ids, y):
        h = self.body(self.emb(ids))
        inner = h[:, 4:28].cumsum(1) / 24
        return F.cross_entropy(self.head(inner).flatten(0, 1), y[:, 4:28].flatten())


idiom("cumsum-inside-a-chunk", fallback="cumsum")(_lm(_CumsumInChunk))


class _CumsumInChunksOfOneRank(_LM):
    """A running sum inside each of 4 chunks, each held whole by one rank (zigzag on 2 ranks):
    every chunk is gathered for the warned fallback, and a rank gathers the zero rows of two
    chunks it does not hold. Those two gathers are equal expressions on that rank only; merged
    by a common-subexpression pass, the ranks' collectives paired up wrongly (a silently wrong
    loss, now compiled without that pass for graphs that differ by rank)."""

    def forward(self, ids, y):
        h = self.body(self.emb(ids))
        total = 0
        for hc, yc in zip(h.chunk(4, dim=1), y.chunk(4, dim=1)):
            inner = self.head(hc).float().cumsum(1) / 8
            total = total + F.cross_entropy(inner.flatten(0, 1), yc.flatten(), reduction="sum")
        return total / y.numel()


idiom("cumsum-inside-chunks-held-by-one-rank", fallback="cumsum")(_lm(_CumsumInChunksOfOneRank))
