"""TRL's fused LM head on sequence shards (``seqpar_compiler/trl_fused_head.py``): each rank
scores its own tokens, the weight's and bias's gradients summed over the group; exact against
one process on a whole shard and on a part of the sequence (``hidden[:, :-1]``). 2 gloo ranks."""
import pytest

pytest.importorskip("trl")

import trl_fused_head_workers as W  # noqa: E402
from seqpar_compiler.launch import run_ranks  # noqa: E402


@pytest.fixture(scope="module")
def results():
    return run_ranks(W.fused_head_cases, 2, timeout=300, pg_timeout=120)


@pytest.mark.parametrize("case", ["whole", "part"])
def test_per_token_outputs_and_gradients_match_one_process(results, case):
    for r in results:
        c = r[case]
        for key in ("log_probs", "entropy", "grad_hidden", "grad_weight", "grad_bias"):
            assert c[key] <= 1e-5, (case, key, c)          # float32, sums in another order
        assert c["is_top1"], c


@pytest.mark.parametrize("case", ["whole", "part"])
def test_each_rank_scores_its_own_rows_without_a_gather_or_a_warning(results, case):
    for r in results:
        c = r[case]
        assert c["sharded"] and c["gathers"] == 0, c
        assert not c["warned"], c["warned"]
