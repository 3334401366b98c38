"""The ``seqpar`` torch.compile backend.

Stage diagram (docs/architecture.md, "The stages", and docs/how_it_works.md say the same). Each
stage is one module; a graph with no self-attention, or a world of one rank, skips the sharding
stages (warned / logged once).

```
Dynamo FX graph (torch-level, one per frame, global shapes)
  │ groups + inputs : the sequence-parallel group; every rank passes the same batch
  │                   (backend.py, mesh_group.py, input_check.py)
  │ lengths         : a symbolic length → one seqpar compile per concrete length (symbolic_lengths.py)
  │ frame edges     : ProvedMask inputs rebuilt in the graph; SequenceShard inputs taken as shards
  │                   (mask_frames.py, frames.py)
  │ canonicalize    : checkpoint bodies inlined; attention → one canonical node, its mask proved
  │                   (passes/hop_bodies.py, attention_patterns.py, canonicalize.py)
  │ placements +    : one walk: every node placed (Shard / Replicate / Partial …) and emitted
  │ rewrite           locally by a rule; ring or all-to-all attention; all-reduces; gradient sums
  │                   (bucketed); gather fallbacks; sequence outputs leave as SequenceShards
  │                   (passes/rewrite.py and its rules, the sharding core runtime/sharding/, frames.py)
  │ blockwise FFN   : per-token MLP blocks → seqpar::blockwise_ffn over token chunks (also P = 1)
  │                   (passes/blockwise_ffn.py)
  ▼
aot_autograd (joint fw/bw) ── partitioner policy: SEQPAR_CHECKPOINT (also P = 1; passes/checkpointing.py)
  ▼
inductor, or aot_eager with SEQPAR_INNER=aot_eager   (the ring op stays one opaque custom op;
  │                                                  blockwise FFN to here: inner_compile.py)
  ▼ at run time, inside seqpar::ring_attention / seqpar::ulysses_attention
layout → plan → batch_isend_irecv ring (or all-to-all), online-softmax merge → block kernels
```

Every stage from the frame edges down to the inner compile (its backward included) runs in an
agreement window (``compile_agreement.py``): a stage failing on any rank makes every rank of the
group run the original Dynamo graph replicated, warned, never hung. With ``SEQPAR_VERIFY`` the
compiled frame is wrapped by ``verify.py``, which compares its first (or every) call with the
original graph run replicated.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .inner_compile import inner_compile as _inner_compile
from .inner_compile import is_model_state as _is_model_state
from .input_check import check_same_inputs
from .options import OPTIONS, check_environment, resolve_options

__all__ = ["backend", "seqpar_backend", "sequence_group"]

log = logging.getLogger("seqpar")

_logged_once: set[str] = set()
_degree_groups: dict[tuple[int, int], dist.ProcessGroup] = {}


def _log_once(key: str, message: str) -> None:
    if key not in _logged_once:
        _logged_once.add(key)
        log.warning(message)


def _frame_code():
    """The code object Dynamo is compiling now (the user's: a compiled module's frame is torch's
    ``external_utils.inner`` wrapper, whose first traced callee is the module's ``forward``)."""
    import os.path
    from torch._guards import TracingContext
    tc = TracingContext.try_get()
    codes = list(tc.traced_code) if tc is not None and tc.traced_code else []
    dynamo = os.path.dirname(torch._dynamo.__file__)
    return next((c for c in codes if not c.co_filename.startswith(dynamo)), codes[0] if codes else None)


def _frame_name() -> str:
    """``'forward' (models.py:120)``: the frame Dynamo is compiling, for messages."""
    import os.path
    code = _frame_code()
    if code is None:
        return "?"
    return f"'{code.co_name}' ({os.path.basename(code.co_filename)}:{code.co_firstlineno})"


def _warn_at_recompile_limit(example_inputs: Sequence[Any]) -> None:
    """Warn when this compile is the last one Dynamo's recompile limit allows for the frame:
    every later new input shape then runs eagerly, on the whole sequence on every
    rank, and Dynamo's own log line does not say that. Counted from Dynamo's cache entries of
    the frame's code object, which is what its limit counts."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._guards import TracingContext
    tc = TracingContext.try_get()
    if tc is None or not tc.traced_code:
        return
    code = tc.traced_code[0]                                       # the frame Dynamo caches
    compiled = len(_debug_get_cache_entry_list(code)) + 1            # this compile adds one
    limit = torch._dynamo.config.recompile_limit
    if compiled != limit:
        return
    from .runtime.sequence_shard import SequenceShard
    if any(isinstance(x, SequenceShard) and x.spec.part is not None for x in example_inputs):
        # a chunk of the sequence (a chunked loss) is compiled once per chunk, since each rank holds
        # other tokens of each; past the limit Dynamo runs the frame eagerly, where the chunk still
        # computes on each rank's own tokens (the eager rules): slower, not replicated
        log.info("seqpar: frame %s has been compiled %d times, once per chunk of the sequence it received; "
                 "further chunks run eagerly, still on each rank's own tokens", _frame_name(), compiled)
        return
    shapes = ", ".join(str(list(x.shape)) for x in example_inputs
                       if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter))
    warnings.warn(f"seqpar: frame {_frame_name()} has now been compiled {compiled} times (this time for inputs "
                  f"{shapes[:120]}), Dynamo's recompile limit (torch._dynamo.config.recompile_limit = {limit}): "
                  f"from the next new sequence length on it runs EAGER and UNSHARDED, the whole sequence on every "
                  f"rank, with no further word. Pad or bucket sequence lengths to a few sizes, or raise "
                  f"torch._dynamo.config.recompile_limit, or compile with dynamic=True (one Dynamo compile; seqpar "
                  f"specialises it once per length)", stacklevel=3)


def _lead(pg) -> bool:
    """Messages about a whole group are said by its rank 0 only."""
    return pg is None or dist.get_rank(pg) == 0


def sequence_group(degree: int | None = None) -> dist.ProcessGroup | None:
    """The sequence-parallel group of this rank: the whole default group, or with ``degree``
    the consecutive block of ``degree`` ranks this rank belongs to. None without a process group.

    Every rank must call this (``new_subgroups``-style creation is collective), which the
    backend does on every rank at the first compile.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if degree is None or degree == world:
        return dist.group.WORLD
    if world % degree:
        raise ValueError(f"SEQPAR_DEGREE={degree} must divide the world size {world} "
                         f"(allowed: the divisors of {world})")
    key = (world, degree)
    if key not in _degree_groups:
        mine = None
        for start in range(0, world, degree):
            group = dist.new_group(list(range(start, start + degree)))
            if start <= dist.get_rank() < start + degree:
                mine = group
        _degree_groups[key] = mine
    return _degree_groups[key]


def backend(*, group: dist.ProcessGroup | None = None, mesh: Any = None, mesh_dim: str | int | None = None,
            **options: Any) -> Callable:
    """A backend callable with explicit options (lower-case names; they override ``SEQPAR_*``).

    ``torch.compile(model, backend=seqpar_compiler.backend(schedule="zigzag", group=pg))``; the
    group may be named by a DeviceMesh instead: ``mesh=world_mesh["sp"]`` or
    ``mesh=world_mesh, mesh_dim="sp"`` (mesh_group.py).
    """
    from .mesh_group import resolve_sequence_group
    group = resolve_sequence_group(group, mesh, mesh_dim)
    check_environment()          # every SEQPAR_* value at once, and unknown names, before any tracing
    opts = resolve_options(**options)
    if opts["output"] == "local" and opts["schedule"] == "auto":
        # local outputs are in the schedule's layout; the user must know it (docs/architecture.md)
        raise ValueError("SEQPAR_OUTPUT=local needs a fixed schedule, not 'auto': the local outputs are laid out "
                         "by it. Set SEQPAR_SCHEDULE (or backend(schedule=)) to one of ring, zigzag, striped, "
                         "distflash")
    # auto also decides overlap, unless the user fixed it
    opts["auto_overlap"] = "overlap" not in options and not os.environ.get(OPTIONS["overlap"].env)
    # sequence lengths this backend's frames took as token ids or attended over (frames.first_piece_length)
    opts["lengths_seen"] = set()

    def compile_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        pg = group if group is not None else sequence_group(opts["degree"])
        P = 1 if pg is None else dist.get_world_size(pg)
        if _lead(pg):
            _warn_at_recompile_limit(example_inputs)
        from .fsdp_reduction import warn_fsdp_reduces_twice     # FSDP2 would reduce again
        warn_fsdp_reduces_twice(example_inputs, pg if P > 1 else None, opts["grad_reduce"])
        if P == 1:
            _log_once("single", "seqpar: no process group or a group of one rank: compiling with "
                                f"{opts['inner']} and the memory passes only (nothing to shard)")
            return _inner_compile(gm, example_inputs, opts["inner"], checkpoint=opts["checkpoint"],
                                  ffn_chunks=opts["ffn_chunks"])
        if opts["output"] == "local":
            from .frames import refuse_local_in_ddp_pieces
            refuse_local_in_ddp_pieces()
        from .symbolic_lengths import is_symbolic, specialise_per_length
        if is_symbolic(gm, example_inputs):          # dynamic=True: one seqpar compile per length
            return specialise_per_length(gm, example_inputs, compile_graph)
        from .compile_agreement import compile_in_agreement     # one rank failing must not hang the others
        return compile_in_agreement(gm, example_inputs, pg, opts,
                                    lambda pristine: _compile_frame(gm, example_inputs, pg, opts, pristine),
                                    _frame_name())

    return compile_graph


def _compile_frame(gm, example_inputs, pg, opts, pristine) -> Callable:
    """The frame compiled sequence-parallel: the stages of the module diagram from the frame
    edges on, each marked for the agreement (``compile_agreement.stage``)."""
    from .compile_agreement import stage
    from .dump import DumpRecorder     # lazily: `python -m seqpar_compiler.dump` runs that module as __main__
    dump = DumpRecorder.maybe(opts, dist.get_rank(pg), dist.get_world_size(pg))
    from .frames import frame_shard_inputs, local_examples, wrap_frame   # shards across frames
    from .mask_frames import carry_mask_outputs, expand_mask_inputs, mask_examples, wrap_mask_frame
    with stage("frame edges"):
        example_inputs, mask_inputs = expand_mask_inputs(gm, example_inputs)    # masks cross frames as facts
        mask_exits = carry_mask_outputs(gm, example_inputs, _model_state_inputs(gm, example_inputs))
        gm.seqpar_carries_masks = mask_exits is not None
        shards = frame_shard_inputs(example_inputs)
    whole_inputs = {}
    with _hide_user_saved_tensor_hooks():
        try:
            sharded = _shard_graph(gm, example_inputs, pg, opts, dump, shards)
        except _ShardsOfAnotherLength as why:
            if _lead(pg):
                warnings.warn(f"seqpar: frame {_frame_name()} {why}: they are gathered at its entry (their "
                              f"gradient goes back as shards) and the frame shards at its own length", stacklevel=3)
            example_inputs, whole_inputs = _whole_shard_inputs(gm, example_inputs, shards)
            shards = {}
            sharded = _shard_graph(gm, example_inputs, pg, opts, dump, shards)
    target = sharded if sharded is not None else _replicated_target(gm)
    verify = opts["verify"] != "off" and sharded is not None      # a replicated frame is its own reference
    compiled = _inner_compile(target, mask_examples(local_examples(target, example_inputs), mask_inputs),
                              opts["inner"], checkpoint=opts["checkpoint"], ffn_chunks=opts["ffn_chunks"],
                              verify=verify)
    if verify:
        from .verify import _Recorder, verifying
        compiled = _Recorder(compiled)
    from .frames import LOCAL_OUTPUT_HINT
    hint = LOCAL_OUTPUT_HINT if opts["output"] == "local" else ""
    check = (lambda args: check_same_inputs(args, pg, hint)) if opts["check_inputs"] else None
    frame = wrap_mask_frame(wrap_frame(compiled, shards, getattr(sharded, "seqpar_exits", None), check,
                                       getattr(sharded, "seqpar_entry", None),
                                       getattr(sharded, "seqpar_local_exits", None), whole_inputs),
                            mask_exits, mask_inputs)
    if not verify:
        return frame
    return verifying(frame, compiled, pristine=pristine.module(), sharded=sharded, pg=pg, opts=opts,
                     frame=_frame_name())


class _ShardsOfAnotherLength(Exception):
    """The frame's attention runs over another length than its sequence-shard inputs hold."""


def _whole_shard_inputs(gm: torch.fx.GraphModule, example_inputs, shards: dict) -> tuple[list, dict]:
    """Examples with the shard inputs as whole values (the frame gathers them at entry, their
    gradient going back as shards), and those inputs' specs."""
    from .compile_agreement import _whole_example
    examples = list(example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i in shards:
        examples[i] = _whole_example(example_inputs[i])
        if i < len(placeholders):
            placeholders[i].meta["example_value"] = examples[i]
    return examples, dict(shards)


def _replicated_target(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The frame's graph to compile whole when nothing in it is sharded.

    Canonicalization may already have added proved score data as buffers (``_seqpar_*``: ALiBi
    slopes, a relative-position index) before the frame turned out to have nothing to shard (an
    encoder-decoder whose two lengths differ). Dynamo gave those buffers no source, and AOT checks
    every buffer of a Dynamo graph against Dynamo's sources; so such a graph is compiled as a copy
    without them, as the rewritten graphs are, instead of failing and being recompiled pristine."""
    if not hasattr(gm, "_param_name_to_source"):
        return gm
    known = gm._param_name_to_source
    if all(name in known for name, _ in gm.named_buffers()):
        return gm
    return torch.fx.GraphModule(gm, gm.graph)


def _hide_user_saved_tensor_hooks():
    """Identity saved-tensor hooks while the passes run ops on example (fake) values.

    Why: the passes evaluate example values with autograd on; saved-tensor hooks the user has
    active around the compiled call (``save_on_cpu``, a hook counting saves) would pack those
    fake values, and an exception there left a provable attention unproved: HF training calls
    ran replicated under a test's counting hook. Only the innermost hooks
    apply, so identity hooks hide the user's; the compiled step's own saves still reach them.
    Pushed only when the user has hooks: without any, compilation is exactly as before."""
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is None:
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_identity, _identity)


def _identity(t):
    return t


def _model_state_inputs(gm: torch.fx.GraphModule, example_inputs) -> set:
    """The placeholders that are parameters or buffers (static for the mask proofs)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {n for n, value in zip(placeholders, example_inputs) if _is_model_state(n, value)}


def _has_trainable_state(gm: torch.fx.GraphModule, example_inputs) -> bool:
    return any(getattr(value, "requires_grad", False) for value in example_inputs
               if isinstance(value, torch.Tensor)) or any(p.requires_grad for p in gm.parameters())


def _user_input_dims(gm: torch.fx.GraphModule, example_inputs, S: int) -> dict[str, int]:
    """Placeholders that are the user's inputs (not parameters or buffers) with a sequence dim."""
    dims = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, torch.Tensor) or _is_model_state(node, value):
            continue
        shape = tuple(value.shape)
        if len(shape) >= 2 and shape[1] == S:
            dims[node.name] = 1
        elif shape.count(S) == 1:
            dims[node.name] = shape.index(S)
    return dims


def _user_data_inputs(gm: torch.fx.GraphModule, example_inputs) -> set[str]:
    """Placeholders that are the user's tensor inputs (not parameters or buffers), whatever their
    shape: a sequence the model makes from them (an image's patches) is shardable too."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {node.name for node, value in zip(placeholders, example_inputs)
            if isinstance(value, torch.Tensor) and not _is_model_state(node, value)}


def _shard_graph(gm, example_inputs, pg, opts, dump=None, shards=None) -> torch.fx.GraphModule | None:
    """The sequence-parallel graph, or None when the graph has nothing to shard. ``dump`` records
    the graph after each stage (``SEQPAR_DUMP``)."""
    from seqpar_compiler.passes.attention_patterns import canonicalize_handwritten_attention
    from seqpar_compiler.passes.canonicalize import find_attention, sequence_length
    from seqpar_compiler.passes.rewrite import ShardingContext, rewrite_graph
    from seqpar_compiler.runtime import check_sequence_length
    from seqpar_compiler.passes.hop_bodies import inline_hop_bodies
    from .compile_agreement import agreement_checkpoint, refusal, stage
    with stage("canonicalize"):
        inline_hop_bodies(gm)        # attention inside torch.utils.checkpoint bodies is sharded too
        static = _model_state_inputs(gm, example_inputs)
        if dump:
            dump.graph("dynamo", gm)
        from .frames import proof_values        # a DDPOptimizer piece's fake buffers: the real ones prove masks
        canonicalize_handwritten_attention(gm, proof_values(gm, example_inputs, static), static)
        from seqpar_compiler.passes.causal_conv import fuse_padded_convolutions
        fuse_padded_convolutions(gm)     # pad + conv1d, conv1d + slice: one op that keeps the length
        attention = find_attention(gm)
        if dump:
            dump.graph("canonicalize", gm)
        S = sequence_length(attention, prefer=next((spec.S for spec in (shards or {}).values()), None))
    P = dist.get_world_size(pg)
    if shards and S is not None and all(spec.S != S for spec in shards.values()):
        # the frame makes a longer (or shorter) sequence from its shards (cat along the sequence)
        # and attends over that: its shard inputs come in whole and it shards at its own length
        lengths = sorted({spec.S for spec in shards.values()})
        raise _ShardsOfAnotherLength(f"attends over length {S} while its sequence-shard inputs hold length(s) "
                                     f"{lengths} (a sequence made from them inside the frame)")
    if shards:          # inputs already sharded by an earlier frame: their length and layout (frames.py)
        from .frames import check_frame_shards
        with refusal(ValueError):
            first = check_frame_shards(shards, S, pg.group_name)
        S, opts = first.S, {**opts, "schedule": first.schedule}
    from .replicated import hidden_attention_causes, replicated_attention_causes
    # a graph break no longer leaves attention replicated: the sequence crosses it as a
    # SequenceShard and the code at the break runs sharded (frames.py); a function
    # Dynamo was told not to compile (torch.compiler.disable) is still a region it cannot see
    disabled = _new_disabled_regions()
    hidden = hidden_attention_causes(gm) + disabled
    piece_S = None
    if not attention and not shards:     # a DDPOptimizer piece before the first attention (frames.py)
        from .frames import ddp_piece_length
        S = piece_S = ddp_piece_length(attention)
    if not attention and not shards and piece_S is None:
        # no attention at all (a pure state-space model): its chunked scans give the length
        from seqpar_compiler.passes.recurrences import recurrence_length
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        S = piece_S = recurrence_length(gm, [int(x.shape[1]) for n, x in zip(placeholders, example_inputs)
                                             if isinstance(x, torch.Tensor) and x.dim() >= 2
                                             and not _is_model_state(n, x) and not isinstance(x.shape[1], torch.SymInt)])
    from .frames import first_piece_length, note_token_lengths
    seen = opts.setdefault("lengths_seen", set())      # made by backend(); a caller's own opts start empty
    note_token_lengths(gm, example_inputs, static, seen)
    first_piece = False
    if (not attention and not shards and piece_S is None and not hidden
            and _has_trainable_state(gm, example_inputs)):
        # the embedding, or a norm a graph break cut off from the first layer's attention (attention
        # hidden in a disabled function keeps the frame replicated and says so, as before)
        S = piece_S = first_piece_length(gm, example_inputs, static, P, seen)
        first_piece = piece_S is not None
    if (not attention or S is None) and not shards and piece_S is None:
        what = "no" if not attention else "only cross-attention, no"
        _report_replicated(hidden, pg, opts, dump)
        if not hidden and getattr(gm, "seqpar_carries_masks", False):     # mask_frames.py
            log.info("seqpar: frame %s builds attention masks; they leave it as proved facts", _frame_name())
        elif not hidden and not attention and not _has_trainable_state(gm, example_inputs):
            # a helper frame (position tables, a mask it could not prove) computes no layer: said at INFO,
            # so the warning keeps meaning "model layers run replicated here"
            log.info("seqpar: frame %s has %s self-attention and no parameters; it runs replicated", _frame_name(), what)
        elif not hidden:
            # "none" may also be attention of a form nobody proves (heads mixed before the softmax,
            # an einsum-written one behind such a step): say what is recognised
            known = ("" if attention else " seqpar recognises (F.scaled_dot_product_attention, flex_attention, "
                     "or softmax(q·kᵀ)·v whose mask or bias it proves)")
            if dist.get_rank(pg) == 0:
                warnings.warn(f"seqpar: frame {_frame_name()} has {what} self-attention{known}; it runs replicated "
                              f"on each of the {P} ranks", stacklevel=3)
            if dump:
                dump.section("attention run replicated", [f"this frame has {what} self-attention"])
        if dump:
            dump.finish(f"seqpar dump: no self-attention of one length; the graph runs replicated on {P} ranks")
        return None
    schedule, overlap, decision = opts["schedule"], opts["overlap"], None
    with stage("placements and rewrite"):
        from seqpar_compiler.passes.recurrences import collapse_recurrences
        # chunked linear recurrences: state passed rank to rank; collapsed before the layout is
        # chosen, which must then be contiguous for them
        collapse_recurrences(gm, S, P, dist.get_rank(pg))
    from .cost_model_mixing import mixing_specs
    mixing = mixing_specs(gm, S)     # convolutions over time, rolls, scans, recurrences: the layout and the dump
    if schedule == "auto" and not attention:     # nothing to decide on; later pieces adopt the shards' layout
        # a state passed rank to rank needs each rank's positions in one contiguous run
        schedule = "ring" if any(spec.kind == "state" for spec in mixing) else "zigzag"
    if schedule == "auto":
        from .auto_schedule import decide_schedule   # lazily, like the dump (modules runnable with -m)
        agreement_checkpoint()                       # a collective follows: nobody may have failed before it
        with refusal(ValueError):
            decision = decide_schedule(attention, S, pg, opts["profile"],
                                       (True, False) if opts.get("auto_overlap") else (overlap,), mixing)
        schedule, overlap = decision["schedule"], decision["overlap"]
    from .ulysses_api import hybrid_layout        # "hybrid" → "hybrid:u", u from SEQPAR_ULYSSES_DEGREE
    with refusal(ValueError):
        schedule = hybrid_layout(schedule, opts["ulysses_degree"], pg, strict=False)
        check_sequence_length(S, schedule, P, what="the model's sequence length")
    seen.add(S)
    ctx = ShardingContext(S=S, P=P, rank=dist.get_rank(pg), schedule=schedule,
                          group_name=pg.group_name, fallback=opts["fallback"], output="local",
                          kernel=opts["kernel"], overlap=overlap, grad_reduce=opts["grad_reduce"],
                          parts_leave=opts["output"] == "gather")
    from .frames import entry_activations, exit_specs, seed_shard_inputs
    with stage("placements and rewrite"):
        entry = (entry_activations(gm, example_inputs, S, schedule, pg.group_name, static, opts["grad_reduce"])
                 if attention or first_piece or shards else {})
        already = seed_shard_inputs(ctx, gm, {**(shards or {}), **entry})
        dims = {k: v for k, v in _user_input_dims(gm, example_inputs, S).items() if k not in already}
        ctx.data_inputs = _user_data_inputs(gm, example_inputs) - already
        out = rewrite_graph(gm, example_inputs, ctx, dims)
        if opts["grad_reduce"] == "none":          # replicated uses' gradients partial too
            from seqpar_compiler.passes.replicated_grads import share_replicated_gradients
            share_replicated_gradients(out, pg.group_name)
        # outputs that carry the sequence leave as SequenceShards (gathered only when read), or local
        out.seqpar_exits = exit_specs(gm, ctx) if opts["output"] == "gather" else None
        out.seqpar_local_exits = exit_specs(gm, ctx) if opts["output"] == "local" else None
        out.seqpar_entry = entry
        out.seqpar_layout = (S, schedule, pg.group_name)       # SEQPAR_VERIFY gathers node values with it
    if disabled and any(getattr(out, "seqpar_exits", None) or ()):
        # the sequence leaves this frame as SequenceShards, so a disabled function run on them
        # (a chunked loss kept out of Dynamo) is on the eager path, whose rules shard each op
        # or warn naming it: no attention is hidden from seqpar there
        log.info("seqpar: frame %s is followed by a function Dynamo does not compile; it runs eagerly on "
                 "SequenceShards", _frame_name())
        hidden = [c for c in hidden if c not in disabled]
    replicated = replicated_attention_causes(attention, ctx.place, S) + hidden
    _report_replicated(replicated, pg, opts, dump)
    log.info("seqpar: sharded a graph over %d ranks (S=%d, schedule %s): %d fallbacks, collectives: %s",
             P, S, schedule, len(ctx.fallbacks), ", ".join(ctx.collectives))
    if dump:
        from .dump import record_sharded
        dump.graph("rewrite", out, example_inputs)
        record_sharded(dump, S=S, P=P, schedule=schedule, overlap=overlap, attention=attention, ctx=ctx,
                       decision=decision, profile_name=opts["profile"], options=opts, mixing=mixing)
        dump.finish(f"seqpar dump: frame {dump.dir.parent.name}, rank {dump.rank} of {P}, S={S}")
    return out


_break_tracker = []          # one GraphBreakTracker, made at the first sharded compile


def _new_disabled_regions() -> list[str]:
    """Causes for the ``torch.compiler.disable`` graph breaks Dynamo recorded since the last
    sharded compile: attention in such a function runs eagerly, unseen by the compiler."""
    from .replicated import GraphBreakTracker
    if not _break_tracker:
        _break_tracker.append(GraphBreakTracker())
    return [cause for cause in _break_tracker[0].new_breaks() if "torch.compiler.disable" in cause]


def _report_replicated(causes: list[str], pg, opts: dict, dump) -> None:
    """One line per frame (rank 0) when attention runs replicated, the same lines in the dump;
    an error on every rank with ``fallback="error"``."""
    if not causes:
        return
    from seqpar_compiler.passes.rewrite import SeqparFallbackError

    from .replicated import replicated_message
    message = replicated_message(_frame_name(), causes, dist.get_world_size(pg))
    if dump:
        dump.section("attention run replicated", list(dict.fromkeys(causes)))
    if opts["fallback"] == "error":
        raise SeqparFallbackError(message.replace("SEQPAR_FALLBACK=error makes this an error",
                                                  "SEQPAR_FALLBACK=error forbids it"))
    if dist.get_rank(pg) == 0:       # warnings' own filter says it once per frame and cause
        warnings.warn(message, stacklevel=4)


def seqpar_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """``backend="seqpar"``: options from the ``SEQPAR_*`` environment at compile time.

    Its first step checks them (they were also checked when ``seqpar_compiler`` was imported):
    Dynamo wraps what a backend raises in ``BackendCompilerFailed``, and the message inside it
    is the registry's, its first line naming the variable and the allowed values.
    """
    return backend()(gm, example_inputs)
