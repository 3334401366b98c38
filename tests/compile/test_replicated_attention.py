"""When attention runs replicated, rank 0 says so once per frame, naming why (issue 16): an op
with no rule upstream, a mask it cannot prove, attention in a region it cannot see (under
torch.compiler.disable). Attention inside torch.utils.checkpoint is no longer such a region: the
body is inlined and sharded (issue 13), so it says nothing. SEQPAR_FALLBACK=error makes it an
error, and the dump's summary says the same. One spawn of 2 ranks (aot_eager) serves every case."""
import pytest

import replicated_workers as W
from seqpar_compiler.launch import run_ranks

CASES = [("no-rule", dict(how="no-rule")), ("mask-input", dict(how="mask-input")),
         ("checkpoint", dict(how="checkpoint")), ("disabled", dict(how="disabled")),
         ("ring", dict(how="ring")),
         ("disabled-error", dict(how="disabled", fallback="error")),
         ("no-rule-error", dict(how="no-rule", fallback="error"))]


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    dump = str(tmp_path_factory.mktemp("dump"))
    cases = CASES + [("disabled-dump", dict(how="disabled", dump=dump))]
    results = run_ranks(W.run_cases, 2, cases, timeout=600, pg_timeout=300)
    return results, dump


def _replicated(warnings):
    """The replicated-attention line (a frame with no attention at all says so in other words)."""
    return [w for w in warnings if w.startswith("seqpar: attention in frame") and "runs replicated" in w]


@pytest.mark.parametrize("name,words", [
    ("no-rule", ["no sharding rule for", "fft", "replicated_workers.py:"]),
    ("mask-input", ["mask", "input of this frame", "replicated_workers.py:"]),
    ("disabled", ["torch.compiler.disable", "_disabled_attention"]),
])
def test_replicated_attention_is_said_once_on_rank_0_naming_the_cause(res, name, words):
    results, _ = res
    said = _replicated(results[0][name]["warnings"])
    assert len(said) == 1, results[0][name]["warnings"]
    for word in words:
        assert word in said[0], said[0]
    assert "SEQPAR_FALLBACK=error" in said[0]            # and what to do about it
    assert not _replicated(results[1][name]["warnings"]), "rank 1 repeats rank 0's message"
    assert all(r[name]["loss_err"] <= 1e-5 for r in results)      # replicated, and still exact


@pytest.mark.parametrize("name", ["ring", "checkpoint"])
def test_sharded_attention_says_nothing_about_replication(res, name):
    """Plain attention, and attention inside torch.utils.checkpoint (inlined and sharded)."""
    results, _ = res
    assert all(not _replicated(r[name]["warnings"]) for r in results)
    assert all(r[name]["loss_err"] <= 1e-5 and r[name]["ring_calls"] == 1 for r in results)


@pytest.mark.parametrize("name,word", [("disabled-error", "torch.compiler.disable"), ("no-rule-error", "fft")])
def test_fallback_error_refuses_replicated_attention_on_every_rank(res, name, word):
    results, _ = res
    for r in results:
        assert r[name]["error"] and word in r[name]["error"] and "SEQPAR_FALLBACK=error" in r[name]["error"]


def test_dump_summary_names_the_replicated_attention(res):
    from pathlib import Path
    _, dump = res
    summaries = [p.read_text() for p in Path(dump).glob("frame-*/rank0/summary.txt")]
    assert summaries
    text = "\n".join(summaries)
    assert "## attention run replicated" in text and "torch.compiler.disable" in text
