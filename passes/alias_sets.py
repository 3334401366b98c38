"""Which values of a Dynamo graph share storage, and which storages the graph writes.

Reads: ``node.meta["example_value"]`` (Dynamo's fake values: a view shares its base's fake
storage and version counter, so storage identity *is* the alias relation, found by evaluation
rather than by a table of view ops). Writes nothing; the rewrite (``rewrite.py``) reads the facts.

Why this exists: an in-place op on a sharded value is only right if the write lands in the same
local storage every alias of the value reads. A rule that answers a write with a copy (a
gather, a slice in the layout, a reshape that copies locally) leaves the readers of the other
aliases with the old value, with no error. So every storage the graph writes is an *alias set*
that the rewrite treats as one unit: either its local graph provably preserves the aliasing
(``check_local_aliasing``: the rewritten graph is evaluated on fake local tensors and every
member must share one storage, every write must bump it), or the whole set is computed
replicated from its base (the rewrite's ``forced`` storages), where every write is the user's
own op on the full tensors.

Also here: the one dead-code elimination every pass uses. ``torch.fx`` treats every
``call_method`` node as pure, so ``buf[..., :d].copy_(k)`` whose result is unused is deleted by
``Graph.eliminate_dead_code`` and the buffer is read uninitialised.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["AliasFacts", "check_local_aliasing", "eliminate_dead_code", "is_write", "written_inputs", "writes"]

# in-place methods that change no data: metadata and autograd bookkeeping
_NOT_WRITES = {"requires_grad_", "retain_grad", "share_memory_", "record_stream", "pin_memory_"}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul}


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", "") or ""


def _tensor_value(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("example_value"), torch.Tensor)


def written_inputs(node: fx.Node) -> list[fx.Node]:
    """The argument nodes ``node`` writes into (empty for a pure node).

    torch-level forms: ``x.op_(...)``, ``x[i] = v`` (``operator.setitem``), ``x += y``
    (``operator.iadd`` on a tensor), ``f(..., out=t)``, ``F.relu(x, inplace=True)`` and
    ``torch.relu_(x)``; ATen forms from the op schema (``Tensor(a!)`` arguments)."""
    if node.op not in ("call_method", "call_function"):
        return []
    found: list[Any] = []
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        for i, arg in enumerate(target._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                found.append(node.args[i] if i < len(node.args) else node.kwargs.get(arg.name))
    else:
        name = _name(target)
        if node.op == "call_method":
            if name.endswith("_") and not name.startswith("__") and name not in _NOT_WRITES and node.args:
                found.append(node.args[0])
        elif target is operator.setitem or target in _INPLACE_OPERATORS:
            found.append(node.args[0])
        elif (name.endswith("_") and not name.startswith("__") and name not in _NOT_WRITES and node.args
              and getattr(target, "__module__", "") in ("torch", "torch._C._nn", "torch.nn.functional", None)):
            found.append(node.args[0])             # torch.relu_(x), torch.Tensor.add_ called as a function
        elif node.kwargs.get("inplace") is True and node.args:
            found.append(node.args[0])
        out = node.kwargs.get("out")
        if out is not None:
            found.extend(out if isinstance(out, (list, tuple)) else [out])
    return [a for a in found if isinstance(a, fx.Node)]


def is_write(node: fx.Node) -> bool:
    return bool(written_inputs(node))


def writes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if is_write(n)]


# Test-only: True restores torch.fx's own purity (call_method writes deleted when unused), so a
# test can show the parity check (the verify option) catches what this module prevents.
_UNSAFE_FX_PURITY = False


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """``Graph.eliminate_dead_code`` that keeps every write (see the module docstring), in the
    graph and in every body it reads with ``get_attr`` (a higher-order op's: an autograd.Function's
    backward). torch's own pass recurses into those bodies with its default purity, which deleted
    the in-place ``scatter_add_`` of Phimoe's router backward (its result unused): the function's
    gradient came out wrong. So the walk is written here, bodies included."""
    if _UNSAFE_FX_PURITY:
        return graph.eliminate_dead_code()
    graph.lint()
    changed = False
    for node in reversed(graph.nodes):
        if not node.users and not (node.is_impure() or is_write(node)):
            graph.erase_node(node)
            changed = True
    root = graph.owning_module
    if root is not None:
        for target in dict.fromkeys(n.target for n in graph.find_nodes(op="get_attr")):
            body = root
            for part in str(target).split("."):
                body = getattr(body, part, None)
            if isinstance(body, fx.GraphModule) and eliminate_dead_code(body.graph):
                body.recompile()
                changed = True
    return changed


def _storage(value: Any):
    if not isinstance(value, torch.Tensor):
        return None
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    while is_traceable_wrapper_subclass(value):
        # a frame entered with SequenceShards traces wrappers, each with a storage of its own:
        # what aliases is the local tensor inside (a view of a shard views its local)
        names, _ = value.__tensor_flatten__()
        value = getattr(value, names[0])
    try:
        return StorageWeakRef(value.untyped_storage())
    except Exception:  # noqa: BLE001 - a tensor without storage (a sparse or nested example)
        return None


@dataclass
class AliasFacts:
    """The alias sets of a graph that contain a write.

    ``storage``: node -> storage key of its example value (tensor-valued nodes only);
    ``written``: storage key -> the nodes that write into it, in graph order;
    ``members``: storage key -> the nodes whose value lives in it (written storages only);
    ``unexplained``: written storages whose writer no node names (a version bump with no
    write node found): treated as written by every member, so they are forced replicated.
    """

    storage: dict = field(default_factory=dict)
    written: dict = field(default_factory=dict)
    members: dict = field(default_factory=dict)
    unexplained: set = field(default_factory=set)

    @classmethod
    def of(cls, gm: fx.GraphModule) -> "AliasFacts":
        facts = cls()
        for node in gm.graph.nodes:
            key = _storage(node.meta.get("example_value"))
            if key is not None:
                facts.storage[node] = key
        for node in gm.graph.nodes:
            for target in written_inputs(node):
                key = facts.storage.get(target)
                if key is not None:
                    facts.written.setdefault(key, []).append(node)
        bumped = {key for node, key in facts.storage.items()
                  if getattr(node.meta.get("example_value"), "_version", 0) > 0 and node.op != "placeholder"}
        facts.unexplained = bumped - set(facts.written)
        for key in facts.unexplained:
            facts.written[key] = []
        for node, key in facts.storage.items():
            if key in facts.written:
                facts.members.setdefault(key, []).append(node)
        return facts

    def __bool__(self) -> bool:
        return bool(self.written)

    def key_of(self, node: fx.Node):
        """The written storage ``node`` lives in or writes into, else None."""
        key = self.storage.get(node)
        if key in self.written:
            return key
        for target in written_inputs(node):
            key = self.storage.get(target)
            if key in self.written:
                return key
        return None

    def in_sets(self, node: fx.Node, keys) -> bool:
        """``node`` is a member or a writer of one of the storages ``keys``."""
        if not keys:
            return False
        key = self.key_of(node)
        if key in keys:
            return True
        value = node.meta.get("example_value")
        if isinstance(value, (list, tuple)):        # split/unbind: views of one base in a tuple
            return any(_storage(v) in keys for v in value)
        return False

    def base(self, key) -> fx.Node:
        return self.members[key][0] if self.members.get(key) else self.written[key][0]

    def describe(self, key) -> str:
        """``'Tensor.copy_ into new_empty (modeling.py:422)'`` for messages."""
        writers = self.written.get(key) or []
        what = ", ".join(dict.fromkeys(_op_name(w) for w in writers)) or "a write seqpar could not place"
        base = self.base(key)
        return f"{what} into {_op_name(base)} '{base.name}' ({_source_line(writers[0] if writers else base)})"


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "placeholder":
        return "input"
    if isinstance(t, str):
        return f"Tensor.{t}" if node.op == "call_method" else t
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)


def _source_line(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File")]
    if not lines:
        return f"graph node {node.name}"
    last = lines[-1]
    # 'File "/x/y/modeling.py", line 422, in expand_kv' -> 'modeling.py:422'
    try:
        path = last.split('"')[1].rsplit("/", 1)[-1]
        line = last.split("line ")[1].split(",")[0]
        return f"{path}:{line}"
    except IndexError:
        return last


def check_local_aliasing(out: fx.GraphModule, env: dict, emitted: dict, facts: AliasFacts, skip: set,
                         local_inputs: list) -> set:
    """The written storages whose aliasing the rewritten graph ``out`` does not preserve.

    ``out`` is evaluated on fake tensors shaped like this rank's inputs (``local_inputs``, one per
    placeholder: ``(shape, dtype, device)`` or a plain value). For each written storage of the
    original graph not in ``skip``: every member's new value (``env[member]``) must share one
    local storage, no member may be one of the rewrite's own constants (a write would change it
    for every later call), and the nodes emitted for each write (``emitted[writer]``, those still
    in the graph) must bump that storage's version. A storage that fails — or every storage, if
    the graph cannot be evaluated on fake tensors — is returned; the rewrite then computes it
    replicated.
    """
    keys = [k for k in facts.written if k not in skip]
    if not keys:
        return set()
    alive = set(out.graph.nodes)
    watched = {}                      # new node -> [(key, writer, 'before'/'after')]
    for key in keys:
        for writer in facts.written[key]:
            nodes = [n for n in emitted.get(writer, []) if n in alive]
            if not nodes:                  # the write vanished (a rule dropped it)
                watched.setdefault(None, []).append(key)
                continue
            watched.setdefault(nodes[0], []).append((key, writer, "before"))
            watched.setdefault(nodes[-1], []).append((key, writer, "after"))
    bad = set(watched.pop(None, []))
    try:
        values, bumps = _fake_run(out, local_inputs, watched, facts, env)
    except Exception:  # noqa: BLE001 - not evaluable on fake tensors: trust no local write
        return set(keys)
    for key in keys:
        if key in bad:
            continue
        stores = set()
        for member in facts.members.get(key, []):
            new = env.get(member)
            if not isinstance(new, fx.Node) or new not in alive:
                continue
            if new.op == "get_attr" and str(new.target).startswith("_seqpar_"):
                bad.add(key)
                break
            value = values.get(new)
            if isinstance(value, torch.Tensor):
                stores.add(_storage(value))
        if len(stores) > 1:
            bad.add(key)
        for writer in facts.written[key]:
            if bumps.get((key, writer)) is False:
                bad.add(key)
    return bad


def _fake_run(out: fx.GraphModule, local_inputs: list, watched: dict, facts: AliasFacts, env: dict):
    """Run ``out`` on fake tensors; return every node's value and, per (storage, writer), whether
    the writer's emitted nodes bumped the version of the written target's new value."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    values: dict = {}
    bumps: dict = {}
    before: dict = {}

    def target_value(writer):
        for target in written_inputs(writer):
            new = env.get(target)
            if isinstance(values.get(new), torch.Tensor):
                return values[new]
        return None

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            for key, writer, when in watched.get(n, []):
                if when == "before":
                    t = target_value(writer)
                    before[(key, writer)] = None if t is None else t._version
            result = super().run_node(n)
            values[n] = result
            for key, writer, when in watched.get(n, []):
                if when == "after":
                    t = target_value(writer)
                    v0 = before.get((key, writer))
                    bumps[(key, writer)] = t is not None and v0 is not None and t._version > v0
            return result

    grad = torch.is_grad_enabled()
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    try:
        with mode, torch.no_grad():
            args = [torch.empty(spec[0], dtype=spec[1], device=spec[2]) if isinstance(spec, tuple) else spec
                    for spec in local_inputs]
            _Recorder(out).run(*args)
    finally:
        torch.set_grad_enabled(grad)
    return values, bumps
