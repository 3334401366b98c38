"""``SEQPAR_OUTPUT=local`` has one meaning (issue 13): the plain local shards of a model compiled
as one frame. Across frames it is refused with an error that names the fix, and the default
``gather`` mode's ``x.to_local()`` gives the same shard without communication. One 2-rank spawn."""
import pytest

import output_local_workers as W
from seqpar_compiler.launch import run_ranks

CASES = [("whole-local", dict(arrangement="whole", output="local")),
         ("break-local", dict(arrangement="graph-break", output="local")),
         ("per-block-local", dict(arrangement="per-block", output="local")),
         ("fsdp-per-block-local", dict(arrangement="fsdp-per-block", output="local")),
         ("ddp-local", dict(arrangement="ddp", output="local")),
         ("break-gather", dict(arrangement="graph-break", output="gather")),
         ("fsdp-per-block-gather", dict(arrangement="fsdp-per-block", output="gather"))]


@pytest.fixture(scope="module")
def results():
    return run_ranks(W.run_cases, 2, CASES, timeout=600, pg_timeout=300)


@pytest.mark.parametrize("case", ["whole-local", "break-gather", "fsdp-per-block-gather"])
def test_local_shard_is_the_schedule_slice_of_the_single_device_output(results, case):
    for res in results:
        r = res[case]
        assert r["error"] is None, r
        assert r["type"] == "Tensor" and r["local_shape"][1] == 48 // 2, r
        assert r["local_rel"] <= 1e-5 and r["gathers"] == 0, r


@pytest.mark.parametrize("case", ["break-local", "per-block-local", "fsdp-per-block-local", "ddp-local"])
def test_local_outputs_passed_into_another_frame_are_refused_with_the_fix(results, case):
    for res in results:
        err = res[case]["error"]
        assert err is not None and "SEQPAR_OUTPUT=local" in err and "to_local()" in err, err
