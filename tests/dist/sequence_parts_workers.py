"""Parts of the sequence between frames, on each spawned rank: a ``SequenceShard`` split along
its sequence dim (``chunk``, uneven ``split``, ``tensor_split``, ``x[:, a:b]``), an output
projection and a cross entropy per chunk (eager, or in a frame compiled with seqpar), the
chunks joined back with ``cat``; each against the same code on the full float64 tensors (the
cross entropy upcasts to float32 as torchtune's does: its errors are float32 rounding).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["part_cases"]

B, S, D, V = 2, 32, 8, 16
SPLITS = {
    "chunk": lambda h: h.chunk(8, dim=1),                     # 8 chunks of 4: whole blocks
    "uneven": lambda h: h.split([5, 11, 3, 13], dim=1),      # chunks that straddle ranks' blocks
    "tensor_split": lambda h: h.tensor_split(3, dim=1),       # slices (11, 11, 10): slice_backward
    "slice": lambda h: [h[:, 3:-2]],                          # x[:, a:b]
    "nested": lambda h: [q for c in h.split([12, 20], dim=1) for q in c.chunk(2, dim=1)],   # parts of parts
}


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _ce(logits, labels):
    return F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")


def _loss(h, W, labels, split, ce):
    """The chunked loss as torchtune writes it: project each chunk, flatten, sum the per-chunk
    cross entropies, divide by the count of targets."""
    chunks = SPLITS[split](h)
    bounds = [c.shape[1] for c in chunks]
    at = 3 if split == "slice" else 0
    total, count = 0.0, 0
    for c, n in zip(chunks, bounds):
        lab = labels[:, at:at + n]
        at += n
        logits = F.linear(c, W)
        total = total + ce(logits.reshape(-1, V), lab.reshape(-1))
        count = count + (lab != -100).sum()
    return total / count, chunks


def _against_one_process(h, W, schedule: str, group: str, step, ref_step=None):
    """``step(h, W) -> (loss, kept values)`` on ``h`` sharded in ``schedule`` and on the whole
    ``h`` (with ``ref_step`` if given), both backward: relative errors of the loss and of h's and
    W's gradients, the eager gathers and seqpar's warnings of the sharded step; its kept values
    and the reference's."""
    from seqpar_compiler.runtime.sequence_shard import ShardSpec, from_local, gather_count, slice_local
    href, Wref = h.clone().requires_grad_(), W.clone().requires_grad_()
    ref, ref_kept = (ref_step or step)(href, Wref)
    ref.backward()
    spec = ShardSpec(1, S, schedule, group)
    local = slice_local(h, spec).requires_grad_()
    Wsp = W.clone().requires_grad_()
    before = gather_count()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, kept = step(from_local(local, spec), Wsp)
        loss.backward()
    return ({"loss": _rel(loss, ref), "grad_h": _rel(local.grad, slice_local(href.grad, spec)),
             "grad_W": _rel(Wsp.grad, Wref.grad), "gathers": gather_count() - before,
             "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)]}, kept, ref_kept)


def part_cases(rank: int, P: int) -> dict:
    from seqpar_compiler.runtime.sequence_shard import SequenceShard, ShardSpec, from_local, slice_local
    torch.manual_seed(0)
    h = torch.randn(B, S, D, dtype=torch.float64)
    W = torch.randn(V, D, dtype=torch.float64)
    labels = torch.randint(0, V, (B, S))
    labels[:, -1] = -100
    labels[1, :5] = -100
    group = dist.group.WORLD.group_name
    compiled_ce = torch.compile(_ce, backend="seqpar")
    out = {}
    # hybrid:2 on 4 ranks: two ranks share each zigzag shard
    for schedule in ("zigzag", "ring", "striped") + (("hybrid:2",) if P == 4 else ()):
        for split in SPLITS:
            for kind, ce in (("eager", _ce), ("compiled", compiled_ce)):
                if kind == "compiled":
                    if schedule != "zigzag":
                        continue                          # one layout compiled: each chunk is a compile
                    torch._dynamo.reset()                 # each split's chunks within the recompile limit
                r, chunks, _ = _against_one_process(h, W, schedule, group,
                                                    lambda x, w: _loss(x, w, labels, split, ce),
                                                    lambda x, w: _loss(x, w, labels, split, _ce))
                held = torch.tensor([c.to_local().shape[1] if isinstance(c, SequenceShard) else -1 for c in chunks])
                dist.all_reduce(held)
                out[(schedule, split, kind)] = {
                    **r, "parts": all(isinstance(c, SequenceShard) and c.spec.part is not None for c in chunks),
                    "held": held.tolist(), "lengths": [c.shape[1] for c in chunks]}
        # joined back: cat of the parts (and of a plain tensor standing for one) is the whole shard
        spec = ShardSpec(1, S, schedule, group)
        x = from_local(slice_local(h, spec), spec)
        parts = x.split([5, 11, 16], dim=1)
        joined = torch.cat([parts[0] * 2, h[:, 5:16] * 2, parts[2] * 2], dim=1)
        out[(schedule, "cat")] = {"whole": isinstance(joined, SequenceShard) and joined.spec.part is None,
                                  "error": _rel(joined.full_tensor(), h * 2)}
    for cut in PART_CUTS:
        for name in PART_REDUCTIONS:
            out[("reduce", cut, name)] = _reduce_case(cut, name, group)
    schedules = ("zigzag", "ring", "striped") + (("hybrid:2",) if P == 4 else ())
    for schedule in schedules:
        for batch in (1, 3):
            for case in ROW_CASES:
                if case in COMPILED_ROW_CASES and (schedule, batch) != ("zigzag", 3):
                    continue                  # a compile per chunk: one layout, one batch
                out[("rows", schedule, case, batch)] = _row_case(schedule, case, batch, group)
    return out


# the batch merged into the sequence dim (``[B·S, V]``) and cut across batch rows, litgpt's
# chunked cross entropy written eagerly; each returns (loss, the values that should stay shards)
def _flat_split(logits, labels, n):
    chunks = logits.reshape(-1, V).split(n)
    targets = labels.reshape(-1).split(n)
    losses = [F.cross_entropy(c, t, ignore_index=-100, reduction="none") for c, t in zip(chunks, targets)]
    return torch.cat(losses).sum() / (labels != -100).sum(), list(chunks) + losses


def _head_chunks(logits, labels):
    """litgpt's finetune form: chunks along the sequence (the last shifted), each flattened with
    the batch, the per-chunk losses joined chunk by chunk (no order of the merged rows)."""
    chunks = list(logits.split(8, dim=1))
    chunks[-1] = chunks[-1][..., :-1, :]
    flat = [c.reshape(-1, V) for c in chunks]
    targets = [t.reshape(-1) for t in labels[..., 1:].split(8, dim=1)]
    losses = [F.cross_entropy(c, t, ignore_index=-100, reduction="none") for c, t in zip(flat, targets)]
    joined = torch.cat(losses)
    return joined.sum() / (labels[..., 1:] != -100).sum(), flat + losses + [joined]


def _reordered(logits, labels):
    """Pieces of the merged rows joined in reverse order, weighted by a plain vector: the
    result depends on every row landing where its rank says it is."""
    pieces = logits.reshape(-1, V).split(10)
    joined = torch.cat(pieces[::-1])
    weights = torch.linspace(0.5, 2.0, joined.shape[0], dtype=joined.dtype)[:, None]
    return (joined * weights).square().sum(), [joined]


def _compiled_chunk_losses(logits, labels):
    """The per-chunk loss compiled with seqpar: each chunk of merged rows enters a frame as a part."""
    torch._dynamo.reset()                     # each case's chunks within the recompile limit
    ce = torch.compile(lambda c, t: F.cross_entropy(c, t, ignore_index=-100, reduction="sum"), backend="seqpar")
    chunks = logits.reshape(-1, V).split(24)
    losses = [ce(c, t) for c, t in zip(chunks, labels.reshape(-1).split(24))]
    return sum(losses) / (labels != -100).sum(), list(chunks)


COMPILED_ROW_CASES = {"flat-split-compiled-loss"}
ROW_CASES = {
    "flat-split-compiled-loss": _compiled_chunk_losses,
    "flat-split-16": lambda lg, lab: _flat_split(lg, lab, 16),
    "flat-split-across-rows": lambda lg, lab: _flat_split(lg, lab, 24),
    "flat-split-uneven": lambda lg, lab: _flat_split(lg, lab, 7),
    "head-chunks-shifted": _head_chunks,
    "reordered": _reordered,
}


def _row_case(schedule: str, case: str, batch: int, group: str) -> dict:
    from seqpar_compiler.runtime.sequence_shard import SequenceShard
    g = torch.Generator().manual_seed(3)
    h = torch.randn(batch, S, D, dtype=torch.float64, generator=g)
    W = torch.randn(V, D, dtype=torch.float64, generator=g)
    labels = torch.randint(0, V, (batch, S), generator=g)
    labels[0, :5] = -100
    r, kept, ref_kept = _against_one_process(h, W, schedule, group,
                                             lambda x, w: ROW_CASES[case](F.linear(x, w), labels))
    return {**r, "shards": all(isinstance(k, SequenceShard) for k in kept),
            # what each kept value reads as (a gather of its rows) equals the one-process value
            "values": max(_rel(k.full_tensor() if isinstance(k, SequenceShard) else k, ref)
                          for k, ref in zip(kept, ref_kept))}


class _Layer(torch.nn.Module):
    """Embedding, one causal attention layer and a head: the loss of positions [3, 29) only, cut
    off before a graph break, as TRL's fused head cuts ``hidden[:, :-1]`` before its Function."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.head = torch.nn.Linear(D, V)

    def forward(self, ids, labels):
        h = self.emb(ids)
        q, k, v = self.qkv(h).view(B, S, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, D)
        part = (h + a)[:, 3:29]
        torch._dynamo.graph_break()
        logits = self.head(part).float()
        return F.cross_entropy(logits.reshape(-1, V), labels[:, 3:29].reshape(-1))


def part_across_a_graph_break(rank: int, P: int) -> dict:
    """A part made in one frame, leaving it as a part, and its loss in the next frame."""
    import copy

    import seqpar_compiler as sp
    from seqpar_compiler.runtime.sequence_shard import gather_count
    torch.manual_seed(0)
    model = _Layer().double()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(model, backend="seqpar")
    before = gather_count()
    with warnings.catch_warnings(record=True) as caught, sp.stats() as st:
        warnings.simplefilter("always")
        loss = compiled(ids, labels)
        loss.backward()
    ref_loss = ref(ids, labels)
    ref_loss.backward()
    grads = {n: _rel(p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref.parameters())}
    return {"loss": _rel(loss, ref_loss), "grads": grads, "ring_calls": st.attention_forward_calls,
            "gathers": gather_count() - before,
            "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)]}


# reductions of a part (ranks hold different counts of its rows): a mean is each rank's sum over
# the global count, never the ranks' local means averaged; the backward of var/std subtracts
# that mean. Ops without a rule gather (warned); all must be exact, values and gradients
PART_CUTS = {
    "part": lambda x: x.split([5, 20, 7], dim=1)[1].reshape(-1, x.shape[-1]),
    "blocks": lambda x: x.reshape(-1, x.shape[-1]).split(24)[1],
}
PART_REDUCTIONS = {
    "mean": lambda c: c.mean(),
    "mean-over-rows": lambda c: c.mean(0),
    "mean-keepdim": lambda c: (c - c.mean(0, keepdim=True)).pow(2).sum(),
    "var": lambda c: c.var(),
    "std-over-rows": lambda c: c.std(0),
    "sum": lambda c: c.sum(0),
    "amax": lambda c: c.amax(0),
    "softmax-over-rows": lambda c: c.softmax(0).pow(2).sum(0),
    "mse": lambda c: F.mse_loss(c, torch.ones_like(c)),
}


def _reduce_case(cut: str, name: str, group: str) -> dict:
    from seqpar_compiler.runtime.sequence_shard import ShardSpec, from_local, slice_local
    h = torch.randn(3, S, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    spec = ShardSpec(1, S, "zigzag", group)
    local = slice_local(h, spec).requires_grad_()
    href = h.clone().requires_grad_()
    op = PART_REDUCTIONS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = op(PART_CUTS[cut](from_local(local, spec)))
        got.sum().backward()
    ref = op(PART_CUTS[cut](href))
    ref.sum().backward()
    got = got.full_tensor() if hasattr(got, "full_tensor") else got
    # relative to the whole gradient's norm: this rank's rows of it may all be zero (amax)
    grad = float((local.grad - slice_local(href.grad, spec)).norm() / href.grad.norm())
    return {"value": _rel(got, ref), "grad": grad}


class _Doubled(torch.nn.Module):
    """Attention over S, a graph break, then the sequence joined to itself (a longer sequence
    made between frames) and attention over 2S."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.qkv1, self.qkv2 = torch.nn.Linear(D, 3 * D), torch.nn.Linear(D, 3 * D)

    @staticmethod
    def _attend(qkv, h):
        n = h.shape[1]
        q, k, v = qkv(h).view(B, n, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        return h + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, n, D)

    def forward(self, ids):
        h = self._attend(self.qkv1, self.emb(ids))
        torch._dynamo.graph_break()
        h = torch.cat([h, h * 2], dim=1)
        return self._attend(self.qkv2, h).square().mean()


def longer_sequence_across_a_break(rank: int, P: int) -> dict:
    """A whole shard joined to another along the sequence in the next frame (Dynamo traces the
    cat into it): that frame attends over 2S, so its shard inputs of length S come in whole and
    it shards at its own length; neither named a merged dim of S nor refused."""
    import copy
    torch.manual_seed(0)
    model = _Doubled().double()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="seqpar")
    import seqpar_compiler as sp
    with warnings.catch_warnings(record=True) as caught, sp.stats() as st:
        warnings.simplefilter("always")
        loss = compiled(ids)
        loss.backward()
    ref_loss = ref(ids)
    ref_loss.backward()
    return {"loss": _rel(loss, ref_loss), "ring_calls": st.attention_forward_calls,
            "grads": max(_rel(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters())),
            "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)]}
