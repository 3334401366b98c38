"""Frames and the training stack: shard values in and out of compiled frames.

A compiled frame is one piece of the user's step: the whole model, one block under per-block
compile (torchtitan), the part before or after a graph break, a piece of DDP's split. The
backend cannot tell which, so the sequence crosses frame boundaries as a value that is full to
every reader and sharded to every op: ``SequenceShard`` (``runtime/sequence_shard.py``).

  * **Inputs.** A placeholder whose example is a SequenceShard is already ``Shard(dim)`` in the
    shard's own layout: no entry shard, no same-batch check (shards differ by rank), and the
    frame takes the shard's S and schedule (the data are laid out already). At run time it is
    unwrapped with ``to_local`` (differentiable, no communication).
  * **Outputs.** With ``SEQPAR_OUTPUT=gather`` (the default: the user sees single-device values)
    every output that carries the sequence leaves as a SequenceShard made with ``from_local``:
    the next frame takes it as it is, eager code runs on it sharded, and reading it (``.item()``,
    printing, ``.numpy()``, ``full_tensor()``) gathers it. A scalar loss is all-reduced inside
    the frame and leaves plain. With ``SEQPAR_OUTPUT=local`` outputs are plain local shards, for a
    model compiled as one frame: such a shard passed into another compiled frame is refused.
  * **Masks** cross frames as ``ProvedMask`` facts (``mask_frames.py``).

The compiled graph itself sees local tensors only: the rewritten graph is compiled on the
shards' local (fake) examples, and the glue here converts at the frame's edges.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .runtime.grad_collectives import shard_entry_activation
from .runtime.sequence_ops import shard_sequence_op
from .runtime.sequence_shard import SequenceShard, ShardSpec, from_local, full_tensor, to_local

__all__ = ["frame_shard_inputs", "entry_activations", "check_frame_shards", "seed_shard_inputs", "exit_specs",
           "local_examples", "ddp_piece_length", "note_token_lengths", "first_piece_length", "proof_values",
           "wrap_frame", "LOCAL_OUTPUT_HINT", "refuse_local_in_ddp_pieces"]


def frame_shard_inputs(example_inputs: Sequence[Any]) -> dict[int, ShardSpec]:
    """Positions of the frame's inputs that arrive as SequenceShards, with their specs."""
    return {i: x.spec for i, x in enumerate(example_inputs) if isinstance(x, SequenceShard)}


def entry_activations(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], S: int, schedule: str,
                      group_name: str, static: set, grad_reduce: str = "sum") -> dict[int, ShardSpec]:
    """Plain activations ``[B, S, ...]`` (floating point, not model state) entering a frame that
    has attention, takes sequence shards, or is the first piece before any (``first_piece_length``):
    sharded at the frame's edge. Under per-block compile the first block receives
    the eager root's full hidden states, and a block that opens with a hand-written norm (pointwise
    ops) would otherwise never start its sharded part (the rewrite seeds inputs at embeddings,
    linears and norms only). Its backward returns the gradient as a SequenceShard (no gather):
    the eager code that made the activation runs its backward on shards (left partial under
    ``grad_reduce="none"`` by the rules)."""
    from .passes.alias_sets import AliasFacts
    facts = AliasFacts.of(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = {}
    for i, (node, x) in enumerate(zip(placeholders, example_inputs)):
        if facts.key_of(node) is not None:
            continue         # the frame writes into it: the write must reach the caller's tensor, not a shard copy
        if (isinstance(x, torch.Tensor) and not isinstance(x, SequenceShard) and node not in static
                and x.is_floating_point() and x.dim() >= 3 and x.shape[1] == S):   # [B, S, ...] even if C == S
            out[i] = ShardSpec(1, S, schedule, group_name, grad_reduce=grad_reduce)
    return out


def check_frame_shards(shards: dict[int, ShardSpec], S: int | None, group_name: str) -> ShardSpec:
    """The spec every shard input of one frame must share (one length, layout and group)."""
    specs = list(shards.values())
    first = specs[0]
    for spec in specs[1:]:
        if (spec.S, spec.schedule, spec.group_name) != (first.S, first.schedule, first.group_name):
            raise ValueError(f"seqpar: a frame received sequence shards of different layouts ({first} and {spec}); "
                             f"every shard of one frame must have one length, schedule and group")
    if first.group_name != group_name:
        raise ValueError(f"seqpar: a frame received a sequence shard over group {first.group_name!r} but compiles "
                         f"for group {group_name!r}; use one sequence-parallel group for the whole model")
    if S is not None and S != first.S:
        raise ValueError(f"seqpar: a frame's attention has sequence length {S} but its sequence-shard inputs have "
                         f"length {first.S}; a frame may only mix sequences of one length")
    return first


def seed_shard_inputs(ctx, gm: torch.fx.GraphModule, shards: dict[int, ShardSpec]) -> set[str]:
    """Mark the frame's shard placeholders as ``Shard`` (a part as ``SeqRange``) before the rewrite walks the graph (the
    rewrite keeps a placement it finds), and return their names (not user inputs to shard)."""
    from .passes.placement import SeqRange, Shard
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = set()
    for i, spec in shards.items():
        # a part of the sequence (a chunk split off between frames) is the rewrite's SeqRange
        ctx.place[placeholders[i]] = (Shard(spec.dim, spec.pre, spec.post) if spec.part is None
                                      else SeqRange(spec.dim, spec.pre, spec.post, *spec.part))
        names.add(placeholders[i].name)
    return names


def exit_specs(gm: torch.fx.GraphModule, ctx) -> list[ShardSpec | None]:
    """Per output of the (original) graph: the spec of a sequence-carrying output, else None."""
    from .passes.placement import SeqRange, Shard
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    values = out if isinstance(out, (tuple, list)) else (out,)
    specs = []
    for v in values:
        pl = ctx.place.get(v) if isinstance(v, torch.fx.Node) else None
        part = (pl.start, pl.stop) if isinstance(pl, SeqRange) else None      # a chunk leaves as a part
        specs.append(ShardSpec(pl.dim, ctx.S, ctx.schedule, ctx.group_name, pl.pre, pl.post,
                               ctx.grad_reduce).with_part(part)
                     if isinstance(pl, Shard) else None)
    return specs


# test-only: the entry activations' local examples as before the fix (real tensors, so aot gave
# them symbolic sizes with no source); never set outside tests
_DYNAMIC_ENTRY_EXAMPLES = False


def local_examples(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> list[Any]:
    """Examples for the inner compiler: shards become their local (fake) tensors, and the
    rewritten graph's placeholders say so too (aot_autograd reads either)."""
    # the local example requires grad as its shard does (a shard made inside __torch_dispatch__,
    # such as the view FSDP2's pre-forward hook returns, holds a local that does not)
    examples = [_static_example(x._local.detach().requires_grad_(x.requires_grad)) if isinstance(x, SequenceShard)
                else x for x in example_inputs]
    for i, spec in getattr(gm, "seqpar_entry", {}).items():      # sharded at the edge: local shape
        local = shard_sequence_op(examples[i], spec.dim, spec.schedule, spec.group_name)
        # static like a shard's local: a real local tensor has no source, and the symbols aot would
        # give it broke Dynamo's guards (DeepSeek-V3's decoder layer after a graph break)
        examples[i] = (local if _DYNAMIC_ENTRY_EXAMPLES
                       else _static_example(local.detach().requires_grad_(examples[i].requires_grad)))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, x in zip(placeholders, examples):
        if isinstance(node.meta.get("example_value"), SequenceShard):
            node.meta["example_value"] = x
    return examples


def _static_example(local: torch.Tensor) -> torch.Tensor:
    """``local`` as a static-shaped fake tensor of the frame's fake mode. Dynamo hands the backend
    real tensors and aot_autograd fakeifies them from the sources Dynamo recorded; a local tensor
    made here has no source, so aot would give it fresh symbolic sizes that Dynamo cannot guard on
    (IndexError in ``produce_guards_verbose`` as soon as a reshape adds a guard on them)."""
    from torch._guards import TracingContext
    ctx = TracingContext.try_get()
    if ctx is None or ctx.fake_mode is None or isinstance(local, torch._subclasses.FakeTensor):
        return local
    return ctx.fake_mode.from_tensor(local, static_shapes=True)


_LOCAL_OUTPUTS = WeakIdKeyDictionary()      # SEQPAR_OUTPUT=local: plain shards a frame returned


def _refuse_local_shards(args) -> None:
    """A plain local shard (``SEQPAR_OUTPUT=local``) passed into a compiled frame would be read as
    a whole sequence S/P long: a clear error instead (never a wrong answer)."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a in _LOCAL_OUTPUTS:
            raise ValueError(
                f"seqpar: input {i} of this compiled frame is a local shard that another frame returned under "
                f"SEQPAR_OUTPUT=local ({_LOCAL_OUTPUTS[a]}). 'local' gives the caller plain shards of a model "
                f"compiled as one frame; across frames (graph breaks, block-by-block compile, FSDP2 per block, "
                f"DDP's split) keep SEQPAR_OUTPUT=gather: outputs then cross frames as SequenceShards, gathered "
                f"only when read, and x.to_local() is this rank's shard without communication")


# appended to the same-batch check's error under SEQPAR_OUTPUT=local (a view hides a local shard's origin)
LOCAL_OUTPUT_HINT = (". Under SEQPAR_OUTPUT=local a frame's outputs are this rank's plain shards: passed into "
                     "another compiled frame (a graph break, block-by-block compile, FSDP2 per block, DDP's split) "
                     "they differ by rank. Keep SEQPAR_OUTPUT=gather there: outputs cross frames as SequenceShards, "
                     "gathered only when read, and x.to_local() is this rank's shard")


def refuse_local_in_ddp_pieces() -> None:
    """DDP's graph split (``optimize_ddp``) makes every piece a frame whose outputs feed the next:
    ``SEQPAR_OUTPUT=local`` (plain shards) cannot cross them, so say so before compiling."""
    if _ddp_optimizer_frame() is not None:
        raise ValueError("seqpar: SEQPAR_OUTPUT=local gives the plain shards of a model compiled as one frame, "
                         "but DDP's graph split (torch._dynamo.config.optimize_ddp) compiles it as several pieces "
                         "that pass outputs to each other. Keep SEQPAR_OUTPUT=gather (outputs cross pieces as "
                         "SequenceShards, gathered only when read; x.to_local() is this rank's shard) or set "
                         "torch._dynamo.config.optimize_ddp = False")


def wrap_frame(compiled: Callable, shards: dict[int, ShardSpec], exits: list[ShardSpec | None] | None,
               check: Callable | None, entry: dict[int, ShardSpec] | None = None,
               local_exits: list[ShardSpec | None] | None = None,
               whole: dict[int, ShardSpec] | None = None) -> Callable:
    """The frame at run time: shard inputs unwrapped (those in ``whole`` gathered: the frame
    attends over another length than they hold), sequence outputs wrapped, and the same-batch
    check (``check``) on the plain inputs only. Under ``SEQPAR_OUTPUT=local`` (``local_exits``)
    the sequence outputs stay plain local shards, remembered so that passing one into a compiled
    frame is refused."""
    exits = exits or []
    wrap_any = any(s is not None for s in exits)
    local_exits = [(i, s) for i, s in enumerate(local_exits or []) if s is not None]
    entry = entry or {}
    whole = whole or {}
    if not shards and not entry and not whole and not wrap_any and check is None and not local_exits:
        return compiled

    def run(*args):
        _refuse_local_shards(args)
        if check is not None:
            check([a for a in args if not isinstance(a, SequenceShard)])
        if shards or entry or whole:
            args = list(args)
            for i in whole:
                if isinstance(args[i], SequenceShard):
                    args[i] = full_tensor(args[i]).contiguous()
            for i, spec in entry.items():           # gradient back as a SequenceShard, never full length
                args[i] = shard_entry_activation(args[i], spec)
            for i, spec in shards.items():
                if isinstance(args[i], SequenceShard):
                    args[i] = to_local(args[i], spec)
        outs = compiled(*args)
        for i, spec in local_exits:
            if isinstance(outs[i], torch.Tensor):
                _LOCAL_OUTPUTS[outs[i]] = f"sequence dim {spec.dim} of {spec.global_size}, schedule {spec.schedule}"
        if not wrap_any:
            return outs
        wrapped = [from_local(o, s) if s is not None and isinstance(o, torch.Tensor) else o
                   for o, s in zip(outs, exits)]
        return type(outs)(wrapped) if isinstance(outs, tuple) else wrapped
    return run


def _ddp_optimizer_frame():
    """DDPOptimizer's ``compile_fn`` frame when it is compiling a piece of its split, else None."""
    import inspect

    from torch._dynamo.backends.distributed import DDPOptimizer
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "compile_fn" and isinstance(frame.f_locals.get("self"), DDPOptimizer):
            return frame
        frame = frame.f_back
    return None


def proof_values(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], static: set) -> list:
    """Example inputs to prove masks with: DDPOptimizer compiles its pieces on fake tensors, and a
    mask built from a buffer (nanoGPT's ``tril`` ``bias``) cannot be evaluated on a fake one. The
    whole graph's real example of the same placeholder (model state only: split_module keeps the
    names) stands in for it; anything else is left as it is (and proves nothing when fake)."""
    from torch._subclasses.fake_tensor import is_fake
    if not any(isinstance(x, torch.Tensor) and is_fake(x) for x in example_inputs):
        return list(example_inputs)
    frame = _ddp_optimizer_frame()
    whole, real = (frame.f_locals.get("gm"), frame.f_locals.get("example_inputs")) if frame else (None, None)
    if not isinstance(whole, torch.fx.GraphModule) or real is None:
        return list(example_inputs)
    by_name = {n.name: x for n, x in zip((n for n in whole.graph.nodes if n.op == "placeholder"), real)}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = list(example_inputs)
    for i, (node, x) in enumerate(zip(placeholders, example_inputs)):
        r = by_name.get(node.name)
        if node in static and isinstance(r, torch.Tensor) and not is_fake(r) and isinstance(x, torch.Tensor) \
                and r.shape == x.shape and r.dtype == x.dtype:
            out[i] = r
    return out


def ddp_piece_length(attention: list) -> int | None:
    """The sequence length of a DDPOptimizer piece that has no attention of its own.

    Why: ``optimize_ddp`` splits the frame's graph at DDP's bucket boundaries and compiles each
    piece alone; the pieces before the first attention (embedding, first norm) cannot prove a
    sequence length and would run replicated at full length. DDPOptimizer's ``compile_fn`` is on
    the stack while it compiles its pieces, with the whole graph as its ``gm``: its SDPA calls
    give the length (one common query/key length, else None). Hand-written attention in the
    whole graph is not canonicalised here: its softmax(q kᵀ) @ v shape gives the length (the
    length only picks the dim to split; every rule after it is exact whatever the graph)."""
    if attention:
        return None
    frame = _ddp_optimizer_frame()
    whole = frame.f_locals.get("gm") if frame is not None else None
    if not isinstance(whole, torch.fx.GraphModule):
        return None
    from .replicated import _softmax_matmul
    lengths = set()
    for n in whole.graph.nodes:
        if n.op == "call_function" and n.target in (F.scaled_dot_product_attention,
                                                      torch._C._nn.scaled_dot_product_attention):
            q, k = (a.meta.get("example_value") for a in n.args[:2])
            if q is None or k is None or q.dim() < 2 or q.shape[-2] != k.shape[-2]:
                return None
            lengths.add(int(q.shape[-2]))
        elif _softmax_matmul(n):               # hand-written: probs [B, H, S, S] @ v
            probs = n.args[0].meta.get("example_value")
            if probs is None or probs.shape[-1] != probs.shape[-2]:
                return None
            lengths.add(int(probs.shape[-1]))
    return lengths.pop() if len(lengths) == 1 else None


_EMBEDDINGS = (F.embedding, torch.embedding, torch.ops.aten.embedding.default)
_PASS_THROUGH = {"to", "long", "int", "contiguous", "view", "reshape", "clone"}


def note_token_lengths(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], static: set, seen: set) -> None:
    """Adds to ``seen`` the lengths of the user's token tensors this frame takes: dim 1 of an
    integer ``[B, S]`` input (token ids, position ids, labels). Read by ``first_piece_length``."""
    for value in _token_ids(gm, example_inputs, static).values():
        seen.add(int(value.shape[1]))


def first_piece_length(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], static: set, P: int,
                       seen: set) -> int | None:
    """The sequence length of a frame with no attention before the first one: the embedding, or a
    norm cut off from its layer's attention by a graph break.

    Why: transformers' output capturing (router logits) breaks the first layer's graph before its
    attention, and the model's embedding may be a frame of its own. Such a piece compiles before
    any frame with attention: nothing gives it a length, and it would run at full length on every
    rank, the next frame sharding its output again at entry. Its length is dim 1 of the token ids
    it embeds, or, for an activation ``[B, S, ...]`` it takes, a length an earlier frame of this
    backend took as token ids or attended over (``seen``: the rope and mask frames before it take
    the position ids), or the length of token ids ``[B, S]`` the calling code holds (a root Dynamo
    skipped). The length only picks the dim to split; every rule after it is exact
    whatever the graph. None when neither, or when ``S`` does not split into 2·P equal pieces
    (the frame then stays replicated, as before: a decode step's one token)."""
    ids = _token_ids(gm, example_inputs, static)
    for node in gm.graph.nodes:
        if not ((node.op == "call_function" and node.target in _EMBEDDINGS)
                or (node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.Embedding))):
            continue
        # F.embedding(indices, weight) and an Embedding module take the indices first;
        # torch.embedding / aten.embedding(weight, indices) second
        index = node.args[1] if node.op == "call_function" and node.target is not F.embedding else node.args[0]
        for _ in range(4):                   # input_ids.long(), .to(device), .view(B, S)
            if not (isinstance(index, torch.fx.Node) and index.op == "call_method" and index.target in _PASS_THROUGH):
                break
            index = index.args[0]
        if index in ids:
            return _splits(int(ids[index].shape[1]), P)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    activations = [value for node, value in zip(placeholders, example_inputs)
                   if isinstance(value, torch.Tensor) and node not in static and value.dim() >= 3
                   and value.is_floating_point() and isinstance(value.shape[1], int)]
    for value in activations:
        if int(value.shape[1]) in seen:
            return _splits(int(value.shape[1]), P)
    callers = _callers_token_shapes() if activations else ()
    for value in activations:
        B, S = int(value.shape[0]), int(value.shape[1])
        if any(S == s and b in (B, 1) for b, s in callers):
            return _splits(S, P)
    return None


def _callers_token_shapes(depth: int = 64) -> set:
    """``(B, S)`` of the integer ``[B, S]`` tensors (token or position ids) held by the user's code
    that called this frame: the model's eager root, skipped by Dynamo (a graph break in its layer
    loop), still holds ``input_ids`` in its locals while it runs the first layer. Frames of torch
    and of seqpar are not read."""
    import inspect
    import os
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
    out = set()
    frame = inspect.currentframe()
    for _ in range(depth):
        if frame is None:
            break
        if not frame.f_code.co_filename.startswith(skip):
            out.update((int(v.shape[0]), int(v.shape[1])) for v in frame.f_locals.values()
                       if type(v) is torch.Tensor and _is_token_ids(v))
        frame = frame.f_back
    return out


def _token_ids(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], static: set) -> dict:
    """{placeholder: example} of the user's integer ``[B, S]`` inputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {n: value for n, value in zip(placeholders, example_inputs)
            if isinstance(value, torch.Tensor) and not isinstance(value, SequenceShard) and n not in static
            and _is_token_ids(value) and isinstance(value.shape[1], int)}


def _is_token_ids(value: torch.Tensor) -> bool:
    """An integer ``[B, S]`` tensor: token ids, position ids, labels."""
    return (value.dim() == 2 and not value.is_floating_point() and not value.is_complex()
            and value.dtype is not torch.bool)


def _splits(S: int, P: int) -> int | None:
    return S if S > 1 and S % (2 * P) == 0 else None
