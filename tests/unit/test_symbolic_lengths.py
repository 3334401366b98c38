"""seqpar_compiler/symbolic_lengths.py on one process: a Dynamo graph traced with dynamic=True
specialised to one length is the static graph's equal (issue 13 follow-up)."""
import os
import sys

import torch

from seqpar_compiler.symbolic_lengths import _scalar_placeholders, _specialise, is_symbolic, specialise_per_length

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
from models import Llama, LlamaConfig  # noqa: E402


def _captured(model, *args):
    got = []

    def capture(gm, ex):
        got.append((gm, list(ex)))
        return gm.forward
    torch._dynamo.reset()
    torch.compile(model, backend=capture, dynamic=True)(*args)
    return got[0]


def test_specialised_graph_has_no_symbols_or_item_reads_and_matches_eager():
    torch.manual_seed(0)
    model = Llama(LlamaConfig())
    idx = torch.randint(0, 256, (2, 32))
    gm, ex = _captured(model, idx, idx)
    assert is_symbolic(gm, ex)
    drop = _scalar_placeholders(gm, ex)
    assert drop, "Dynamo lifted no symbolic size or float attribute: nothing to specialise"
    idx48 = torch.randint(0, 256, (2, 48))
    # each SymInt is the batch or the length: told apart by the ids placeholder's symbolic shape
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder" and "idx" in n.name).meta["example_value"]
    args = [(2 if str(e) == str(ids.shape[0]) else 48) if isinstance(e, torch.SymInt) else
            idx48 if e is idx else e for e in ex]
    static = _specialise(gm, args, drop)
    assert not is_symbolic(static, [a for i, a in enumerate(args) if i not in drop])
    assert not [n for n in static.graph.nodes if n.op == "call_method" and n.target == "item"]
    for n in static.graph.nodes:
        ev = n.meta.get("example_value")
        if isinstance(ev, torch.Tensor):
            assert all(isinstance(d, int) for d in ev.shape), (n.name, ev.shape)
    got = static(*[a for i, a in enumerate(args) if i not in drop])
    want = model(idx48, idx48)
    assert torch.allclose(got[-1], want[1], rtol=1e-5, atol=1e-6)


def test_one_specialisation_per_length():
    torch.manual_seed(0)
    model = Llama(LlamaConfig())
    calls = []

    def static_compile(gm, args):
        calls.append(gm)
        return gm.forward

    def backend(gm, ex):
        return specialise_per_length(gm, ex, static_compile)
    torch._dynamo.reset()
    cm = torch.compile(model, backend=backend, dynamic=True)
    for S in (32, 48, 32, 64):
        idx = torch.randint(0, 256, (2, S))
        assert torch.allclose(cm(idx, idx)[1], model(idx, idx)[1], rtol=1e-5, atol=1e-6)
    assert len(calls) == 3
