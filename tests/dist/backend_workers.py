"""Functions run on spawned ranks for the backend tests."""
import warnings

import torch
import torch.distributed as dist

import seqpar_compiler as sp
from seqpar_compiler.backend import sequence_group
from seqpar_compiler.input_check import InputMismatchError


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def backend_cases(rank, world):
    res = {}
    # SEQPAR_DEGREE=2 on 4 ranks: {0,1} and {2,3}
    g = sequence_group(2)
    members = torch.tensor([rank])
    gathered = [torch.zeros(1, dtype=torch.long) for _ in range(2)]
    dist.all_gather(gathered, members, group=g)
    res["degree_members"] = sorted(int(t) for t in gathered)
    try:
        sequence_group(3)
        res["degree_error"] = None
    except ValueError as e:
        res["degree_error"] = str(e)
    # replicated fallback: correct, warned
    model = _model()
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend=sp.backend(inner="aot_eager"))
        out = compiled(x)
    res["fallback_ok"] = bool(torch.allclose(out, model(x), atol=1e-6))
    res["fallback_warned"] = any("runs replicated" in str(w.message) for w in caught)
    # different batches on different ranks: a clear error on every rank
    torch._dynamo.reset()
    compiled = torch.compile(_model(), backend=sp.backend(inner="aot_eager"))
    try:
        compiled(x + rank)
        res["mismatch_error"] = None
    except InputMismatchError as e:
        res["mismatch_error"] = str(e)
    torch._dynamo.reset()
    unchecked = torch.compile(_model(), backend=sp.backend(inner="aot_eager", check_inputs=False))
    res["unchecked_runs"] = bool(torch.isfinite(unchecked(x + rank)).all())
    # nothing sequence-parallel in it is not an op that failed to shard: strict mode still runs it
    torch._dynamo.reset()
    strict = torch.compile(_model(), backend=sp.backend(inner="aot_eager", fallback="error"))
    res["strict_runs"] = bool(torch.allclose(strict(x), model(x), atol=1e-6))
    return res
