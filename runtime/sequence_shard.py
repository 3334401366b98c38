"""``SequenceShard``: a full tensor that lives split over the sequence-parallel group.

Why a value and not a graph rewrite: real training compiles block by block, breaks graphs and
runs eager code between frames (FSDP2's root, the embedding, the loss). A frame cannot know
whether its output goes to the user or to the next block, so it hands out a value that is both:
to every reader it is the full tensor, to every op that can stay sharded it is this rank's shard.

The value (a wrapper tensor subclass, traced by Dynamo through ``__tensor_flatten__`` like DTensor):
  * logically the full global tensor, identical on every rank of the group (its ``shape`` is the
    global shape: user code sees single-device shapes);
  * stored as ``_local``: this rank's tokens along ``spec.dim`` in the schedule's layout
    (``layout.py``), where the dim is the flattening of (pre, S, post), pre = post = 1 for a plain
    sequence dim (``logits.view(-1, V)`` gives pre = B);
  * ``spec`` (``ShardSpec``, frozen, hashable) holds dim, pre, post, the global length S, the
    schedule and the group name. Dynamo guards on the flatten context, which is the spec less S:
    S is read back from the outer size (``outer_size[dim] // (pre·post)``), so a new length is a
    new size, not a new context, and automatic dynamic shapes (or ``dynamic=True``) trace every
    frame once for all lengths (a SymInt S while tracing; seqpar specialises per length).

Where a sequence is split and joined:
  * split once, by the first compiled frame that needs it (its entry shard) or ``from_local``;
  * frames whose inputs are SequenceShards take their local shard (no entry shard, no same-batch
    check: shards differ by rank); sequence-carrying frame outputs leave as SequenceShards;
  * joined only where something needs the whole sequence: an op with no eager rule below
    (warned gather fallback), or a read of the data (``.item()``, ``.tolist()``, ``.numpy()``,
    printing, ``full_tensor()``). A reduction to a scalar (the loss) is a local reduction plus an
    all-reduce, never a gather.

Autograd (docs/architecture.md gradient convention): autograd runs on the logical (full) values, so the
gradient of a SequenceShard is the full gradient, itself held as a SequenceShard; the gradient
of a plain replicated tensor comes out plain and whole (a contraction over the sequence, e.g.
a weight's gradient, is a local matmul plus an all-reduce). ``from_local`` / ``to_local`` are
autograd Functions: the gradient of a shard stays a shard, the compiled frame's local gradient
(the local rows of the full gradient) is wrapped without communication.

Eager ops (``__torch_dispatch__``, the compiler's rules in small): pointwise ops and ``*_like``
stay local (a plain operand with the full sequence length is sliced in the layout, one with a
broadcast sequence dim is used as is); views, transposes and expands map the sequence dim;
reductions over the sequence dim are local + all-reduce; matmuls shard or contract; softmax,
layer norm, embedding and NLL loss (forward and backward) stay local. Anything else gathers the
sequence and runs replicated, with a warning naming the op (correct, slower).
"""
from __future__ import annotations

import pickle
from fractions import Fraction
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import layout_of
from .ring_op import resolve_group
from .sequence_ops import gather_sequence_op
from .sharding.placements import seq_factors

__all__ = ["ShardSpec", "SequenceShard", "from_local", "to_local", "full_tensor", "gather_count", "grad_sum"]

aten = torch.ops.aten
_c10d = torch.ops._c10d_functional


@dataclass(frozen=True)
class ShardSpec:
    """Where the sequence lies in a SequenceShard and how it is split.

    ``dim`` of the global value has size pre·S·post (the flattening of (pre, sequence, post));
    locally pre·(S/P)·post, in the same order.
    """

    dim: int
    # not hashed (equal specs still hash equal): while Dynamo traces a frame at a symbolic length
    # S is a SymInt, which cannot be hashed
    S: int = field(hash=False)
    schedule: str
    group_name: str
    pre: int = 1
    post: int = 1
    # "none" (SEQPAR_GRAD_REDUCE): the eager rules leave the gradients they make by contracting
    # over the sequence (a weight's, a bias's, an embedding table's) partial, as the compiled
    # frames do, so the one sum DDP/FSDP does over dp × sp ranks counts each token once
    grad_reduce: str = "sum"
    # a part of the sequence (a chunk of a chunked loss: ``h.chunk(n, dim=1)``): the global
    # positions [start, stop) of it; this rank holds its tokens among them, in local order (their
    # number differs between ranks and may be 0: ``Layout.part_rows``). None: the whole sequence
    part: tuple[int, int] | None = None

    @property
    def P(self) -> int:
        group = resolve_group(self.group_name)
        return 1 if group is None else dist.get_world_size(group)

    @property
    def rank(self) -> int:
        group = resolve_group(self.group_name)
        return 0 if group is None else dist.get_rank(group)

    def moved(self, dim: int, pre: int | None = None, post: int | None = None) -> "ShardSpec":
        return ShardSpec(dim, self.S, self.schedule, self.group_name,
                         self.pre if pre is None else pre, self.post if post is None else post, self.grad_reduce,
                         self.part)

    def with_part(self, part: tuple[int, int] | None) -> "ShardSpec":
        """The same dims, holding the positions ``part`` (the whole sequence when it is [0, S))."""
        if part is not None and tuple(part) == (0, self.S) and layout_of(self.schedule).balanced:
            part = None
        return ShardSpec(self.dim, self.S, self.schedule, self.group_name, self.pre, self.post, self.grad_reduce,
                         None if part is None else (int(part[0]), int(part[1])))

    @property
    def length(self):
        """The number of sequence positions the value spans: S, or the part's length."""
        return self.S if self.part is None else self.part[1] - self.part[0]

    @property
    def global_size(self) -> int:
        # post = p/W (a Fraction): a token grid's rows (placements.py). Integer arithmetic only, so
        # a symbolic S (one trace for every length) stays symbolic instead of being specialised
        post = Fraction(self.post)
        return (self.pre * self.length * post.numerator) // post.denominator

    def part_rows(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """This rank's tokens of the part: their local row indices (among its S/P) and their
        offsets in the part, in local order."""
        start, stop = self.part if self.part is not None else (0, self.S)
        return layout_of(self.schedule).part_rows(self.rank, self.P, self.S, start, stop)

    @property
    def local_length(self) -> int:
        """How many of the value's positions this rank holds."""
        return self.S // self.P if self.part is None else len(self.part_rows()[0])


_gathers = [0]


def _global_stride(local: Tensor, dim: int, global_size) -> list | None:
    """The full value's strides laid out as this rank's local tensor is: the dims outside ``dim``
    in memory grow by the shard factor, the ones inside and the broadcast (stride 0) ones keep
    theirs. Why not contiguous strides: a transposed or expanded shard (GQA's ``unsqueeze →
    expand → flatten``) must look non-viewable to the graph traced on the full value exactly
    when its local tensor is, or the graph says ``view`` where the local tensor needs a copy.
    None (contiguous) when the factor is not a whole number or the shard is empty."""
    n = local.shape[dim]
    if isinstance(n, torch.SymInt) or isinstance(global_size, torch.SymInt) or n == 0 or global_size % n:
        return None
    factor = global_size // n
    span = local.stride(dim) * n
    return [st * factor if i != dim and st != 0 and st >= span and span > 0 else st
            for i, st in enumerate(local.stride())]


def gather_count() -> int:
    """All-gathers of SequenceShards run eagerly so far on this rank (fallbacks and reads)."""
    return _gathers[0]


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


class SequenceShard(torch.Tensor):
    """The full tensor of global shape, held as this rank's shard ``_local`` (see module doc).

    Shapes: global ``[..., pre·S·post, ...]`` at ``spec.dim``; ``_local`` ``[..., pre·S/P·post, ...]``.
    """

    _local: Tensor
    spec: ShardSpec
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, local: Tensor, spec: ShardSpec, requires_grad: bool = False, *, shape=None, stride=None):
        if shape is None:
            shape = list(local.shape)
            shape[spec.dim] = spec.global_size
        if stride is None:
            stride = _global_stride(local, spec.dim, shape[spec.dim])
        out = torch.Tensor._make_wrapper_subclass(cls, shape, strides=stride, dtype=local.dtype,
                                                  device=local.device, requires_grad=requires_grad)
        out._local = local
        out.spec = spec
        return out

    def __repr__(self, *, tensor_contents=None) -> str:       # printing reads the whole value
        return _reading(self, lambda: f"SequenceShard({full_tensor(self)!r}, spec={self.spec})")

    def __tensor_flatten__(self):
        # the length is left out: Dynamo guards on this context by equality, and a length in it
        # would recompile every frame at every new length (recompile limit after 8)
        # A part keeps its range and S: its outer size is the part's length, not S, and frames
        # given different chunks are different frames (their rows differ by rank and by chunk)
        s = self.spec
        part = None if s.part is None else (*s.part, s.S)
        return ["_local"], (s.dim, s.schedule, s.group_name, s.pre, s.post, s.grad_reduce, part)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        # Dynamo passes the outer size and stride it made (symbolic under dynamic shapes, each
        # with a source it can guard on); rebuilding them from the inner tensor gives sizes
        # with no source, and guard building fails (IndexError in produce_guards_verbose).
        dim, schedule, group_name, pre, post, grad_reduce, part = ctx
        if part is not None:
            spec = ShardSpec(dim, part[2], schedule, group_name, pre, post, grad_reduce, part[:2])
            return SequenceShard(inner["_local"], spec, shape=outer_size, stride=outer_stride)
        frac = Fraction(post)                    # integer arithmetic: a symbolic size stays symbolic
        S = (outer_size[dim] * frac.denominator) // (pre * frac.numerator)
        spec = ShardSpec(dim, S, schedule, group_name, pre, post, grad_reduce)
        return SequenceShard(inner["_local"], spec, shape=outer_size, stride=outer_stride)

    def __coerce_same_metadata_as_tangent__(self, expected_metadata, expected_type=None):
        """A gradient arriving at a compiled frame in another form than the frame guessed.

        AOT autograd guesses each tangent's type from the forward output; a frame that ran
        replicated (no attention in it, or a fallback) guesses a plain tensor, while the next
        frame's backward hands back a SequenceShard. The value is the same either way: gather it
        for a plain tensor, re-slice it for a shard of another layout."""
        if expected_type is not None and not issubclass(expected_type, SequenceShard):
            return gather_local(self._local, self.spec)
        if expected_metadata == self.__tensor_flatten__()[1]:
            return self
        dim, schedule, group_name, pre, post, grad_reduce, part = expected_metadata
        if dim != self.spec.dim or group_name != self.spec.group_name:
            return None                          # not the same value's layout: AOT reports it
        if (pre, post) != (self.spec.pre, self.spec.post) or part is not None or self.spec.part is not None:
            return None
        spec = ShardSpec(dim, self.spec.S, schedule, group_name, pre, post, grad_reduce)
        return SequenceShard(slice_local(gather_local(self._local, self.spec), spec), spec,
                             shape=self.shape, stride=self.stride())

    def full_tensor(self) -> Tensor:
        return _reading(self, lambda: full_tensor(self))

    def to_local(self) -> Tensor:
        """This rank's shard (schedule layout; no communication; its gradient stays local)."""
        return to_local(self)

    # Leaving the group: the readers below return plain full tensors (an all-gather, so every rank of
    # the group calls them together, as it runs the same script)
    def tolist(self):
        return _reading(self, lambda: full_tensor(self).tolist())

    def numpy(self, *args, **kwargs):
        return _reading(self, lambda: full_tensor(self.detach()).numpy(*args, **kwargs))

    def cpu(self, *args, **kwargs):
        """The plain full tensor in host memory (``.cpu()`` is how code takes data out of a model)."""
        return _reading(self, lambda: full_tensor(self).cpu(*args, **kwargs))

    def __reduce_ex__(self, protocol):
        # pickle / torch.save: the other ranks' parts are not here, and gathering them inside
        # pickling would hang whenever only some ranks save (the usual `if rank == 0: save`)
        raise pickle.PicklingError(
            f"seqpar: cannot pickle or torch.save a SequenceShard (shape {list(self.shape)}, split over the "
            f"sequence-parallel group {self.spec.group_name!r}; this rank holds only its part of the sequence). "
            f"Save a plain tensor: x.full_tensor() (an all-gather: call it on every rank of the group, then save "
            f"on any) or x.to_local() (this rank's part, no communication)")

    @classmethod
    @torch._disable_dynamo         # eager rules run below Dynamo (its frames see the subclass, not this)
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from .sequence_shard_rules import dispatch
        from .token_rows import TokenRows
        if any(issubclass(t, TokenRows) for t in types):
            return NotImplemented          # a shard meeting its own token rows: TokenRows' rules
        try:
            return dispatch(func, args, kwargs or {})
        except Exception as exc:
            _raise_if_group_gone(args, kwargs, exc)
            raise


def _group_exists(group_name: str) -> bool:
    try:
        resolve_group(group_name)
        return True
    except Exception:  # noqa: BLE001 - torch raises RuntimeError or ValueError depending on the version
        return False


def _group_gone_error(spec: "ShardSpec") -> RuntimeError:
    return RuntimeError(
        f"seqpar: a SequenceShard of the sequence-parallel group {spec.group_name!r} was used after that group "
        f"was destroyed (dist.destroy_process_group(), or the tensor was loaded or sent to another process). "
        f"It holds only this rank's part of the sequence and the other parts went with the group: x.to_local() "
        f"still gives this rank's part. To keep the whole tensor, take x.full_tensor() (or .cpu(), .tolist(), "
        f".numpy()) on every rank while the group exists")


def _raise_if_group_gone(args, kwargs, exc: Exception) -> None:
    from torch.utils._pytree import tree_leaves
    for leaf in tree_leaves((args, kwargs)):
        if isinstance(leaf, SequenceShard) and not _group_exists(leaf.spec.group_name):
            raise _group_gone_error(leaf.spec) from exc


def _reading(shard: "SequenceShard", read):
    if not _group_exists(shard.spec.group_name):
        raise _group_gone_error(shard.spec)
    return read()


# -- moving between forms (below autograd) ---------------------------------------------------
def _unmerged(local: Tensor, spec: ShardSpec, S_part: int) -> Tensor:
    shape = list(local.shape)
    return local.reshape(shape[:spec.dim] + list(seq_factors(spec.pre, spec.post, S_part)) + shape[spec.dim + 1:])


def gather_local(local: Tensor, spec: ShardSpec) -> Tensor:
    """The full value of a shard (an all-gather over the group), below autograd."""
    if spec.P == 1:
        return local
    if not _is_fake(local):
        _gathers[0] += 1
    if spec.part is not None:
        return _gather_part(local, spec)
    shape = list(local.shape)
    shape[spec.dim] = spec.global_size
    full = gather_sequence_op(_unmerged(local, spec, spec.S // spec.P), spec.dim + 1, spec.schedule, spec.group_name)
    return full.reshape(shape)


def _part_offsets(spec: ShardSpec, device) -> Tensor:
    return torch.tensor(spec.part_rows()[1], dtype=torch.long, device=device)


def _gather_part(local: Tensor, spec: ShardSpec) -> Tensor:
    """The whole part: each rank's rows placed at their offsets in zeros, summed over the group
    (ranks hold different numbers of its rows, so no equal-sized all-gather fits)."""
    shape = list(local.shape)
    shape[spec.dim] = spec.global_size
    rows = _unmerged(local, spec, spec.local_length)
    unmerged = list(rows.shape)
    unmerged[spec.dim + 1] = spec.length
    wide = torch.int64 if not local.is_floating_point() and not local.is_complex() else local.dtype
    full = rows.new_zeros(unmerged, dtype=wide).index_copy(spec.dim + 1, _part_offsets(spec, local.device),
                                                            rows.to(wide))
    return all_reduce_sum(full, spec).to(local.dtype).reshape(shape)


def slice_local(full: Tensor, spec: ShardSpec) -> Tensor:
    """This rank's part of a full value in the layout (no communication), below autograd."""
    P = spec.P
    if P == 1:
        return full
    if spec.part is not None:
        shape = list(full.shape)
        shape[spec.dim] = spec.global_size // spec.length * spec.local_length
        rows = _unmerged(full, spec, spec.length).index_select(spec.dim + 1, _part_offsets(spec, full.device))
        return rows.reshape(shape)
    shape = list(full.shape)
    shape[spec.dim] = spec.global_size // P
    return layout_of(spec.schedule).local_part(_unmerged(full, spec, spec.S), spec.dim + 1, spec.rank, P).reshape(shape)


def all_reduce_sum(x: Tensor, spec: ShardSpec) -> Tensor:
    """Sum over the group (functional collective: traceable, works on fake tensors)."""
    if spec.P == 1:
        return x
    return _c10d.wait_tensor(_c10d.all_reduce(x.contiguous(), "sum", spec.group_name))


def grad_sum(x: Tensor, spec: ShardSpec) -> Tensor:
    """A sum over the group made in the backward by contracting over the sequence (a weight's
    gradient): summed under ``grad_reduce="sum"``, left partial under ``"none"`` (the data-parallel
    wrapper's one sum over dp × sp ranks completes it). In the forward (no autograd node is
    running, or a checkpoint recomputes the forward inside the backward with grad mode on) it is
    always a sum: a loss or a norm read by the user must be whole."""
    in_backward = torch._C._current_autograd_node() is not None and not torch.is_grad_enabled()
    if spec.P == 1 or (spec.grad_reduce == "none" and in_backward):
        return x
    return _c10d.wait_tensor(_c10d.all_reduce(x.contiguous(), "sum", spec.group_name))


# -- differentiable conversions -----------------------------------------------------------------
class _FromLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: Tensor, spec: ShardSpec):
        ctx.spec = spec
        return SequenceShard(local.view_as(local), spec)

    @staticmethod
    def backward(ctx, grad):
        return _local_of(grad, ctx.spec), None


class _ToLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard: SequenceShard):
        ctx.spec = shard.spec
        return shard._local.view_as(shard._local)

    @staticmethod
    def backward(ctx, grad):
        return SequenceShard(grad, ctx.spec)


def _local_of(grad, spec: ShardSpec):
    """A gradient arriving at a shard: a SequenceShard in the same spec, another spec, or plain."""
    if grad is None:
        return None
    if isinstance(grad, SequenceShard):
        from .sequence_shard_parts import same_rows
        if same_rows(grad.spec, spec):
            return grad._local
        grad = gather_local(grad._local, grad.spec)
    return slice_local(grad, spec)


def from_local(local: Tensor, spec: ShardSpec) -> SequenceShard:
    """Wrap this rank's shard as the full logical value (differentiable: its gradient is the
    local part of the full gradient, no communication)."""
    return _FromLocal.apply(local, spec)


def to_local(shard: SequenceShard, spec: ShardSpec | None = None) -> Tensor:
    """This rank's shard of a SequenceShard (differentiable, no communication); with ``spec``,
    a value in another layout is re-laid out first (gathered and sliced)."""
    if spec is not None and shard.spec != spec:
        return slice_local(full_tensor(shard), spec)
    return _ToLocal.apply(shard)


class _Full(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard: SequenceShard):
        ctx.spec = shard.spec
        return gather_local(shard._local, shard.spec)

    @staticmethod
    def backward(ctx, grad):
        return SequenceShard(slice_local(grad, ctx.spec), ctx.spec)


def full_tensor(x):
    """The plain full tensor (an all-gather for a SequenceShard; differentiable)."""
    return _Full.apply(x) if isinstance(x, SequenceShard) else x


_gather_warned: set = set()


def warn_gather(op: str, why: str, spec: ShardSpec | None = None) -> None:
    """Said once per op name and group, by the group's rank 0, as the compiler's fallbacks are
    (every rank runs the same code: P copies of one message say nothing more)."""
    if spec is not None:
        if (spec.group_name, op) in _gather_warned or spec.rank != 0:
            return
        _gather_warned.add((spec.group_name, op))
    warnings.warn(f"seqpar: eager op {op} on a SequenceShard {why}: gathering the sequence and computing it "
                  f"replicated (correct, every rank holds the whole sequence of its inputs)", stacklevel=4)
