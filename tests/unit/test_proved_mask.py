"""``ProvedMask`` and the frame glue of ``mask_frames`` in one process (issue 13): the facts
rebuild the exact mask in every encoding, a builder frame's provable mask outputs become facts
(and only provable ones), and a receiving frame rebuilds the mask in its graph to the same value."""
import warnings

import pytest
import torch

from seqpar_compiler.backend import _model_state_inputs
from seqpar_compiler.mask_frames import carry_mask_outputs, expand_mask_inputs
from seqpar_compiler.passes.mask_proof import evaluate
from seqpar_compiler.kernels import AttentionSpec
from seqpar_compiler.runtime.proved_mask import MaskFacts, ProvedMask, materialize

S = 12
DOCS = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
MIN = torch.finfo(torch.float32).min
TOKENS = DOCS[None]                                  # the documents row of a mask's per-token data


def _facts(causal, window, docs, encoding, fill=0.0):
    return MaskFacts(S, AttentionSpec.of(causal=causal, window=window, docs=docs), encoding, fill)


def _reference(causal, window, docs, encoding, fill=MIN):
    i = torch.arange(S)
    visible = torch.ones(S, S, dtype=torch.bool)
    if causal:
        visible &= i[None, :] <= i[:, None]
    if window is not None:
        visible &= i[None, :] > i[:, None] - window
    visible = visible.expand(2, 1, S, S)
    if docs:
        visible = visible & (DOCS[:, None, :, None] == DOCS[:, None, None, :])
    if encoding == "visible":
        return visible
    if encoding == "hidden":
        return ~visible
    return torch.zeros(2, 1, S, S).masked_fill(~visible, fill)


@pytest.mark.parametrize("causal,window,docs", [(True, None, False), (True, 4, False), (True, None, True),
                                                (False, None, True), (True, 3, True)])
@pytest.mark.parametrize("encoding", ["visible", "hidden", "additive"])
def test_facts_rebuild_the_exact_mask(causal, window, docs, encoding):
    ref = _reference(causal, window, docs, encoding)
    facts = _facts(causal, window, docs, encoding, MIN)
    got = materialize(facts, TOKENS if docs else torch.empty(0, dtype=torch.long), ref.shape, ref.stride(), ref.dtype)
    assert torch.equal(got, ref)


def test_bad_encoding_is_refused():
    with pytest.raises(ValueError, match="encoding must be one of"):
        _facts(True, None, False, "bias")


def test_eager_reads_materialise_with_a_warning_naming_the_op():
    facts = _facts(True, None, True, "visible")
    ref = _reference(True, None, True, "visible")
    m = ProvedMask(TOKENS, facts, ref.shape, ref.stride(), torch.bool)
    assert isinstance(m.detach(), ProvedMask) and m.detach().facts == facts      # no materialising
    inner, meta = m.__tensor_flatten__()
    again = ProvedMask.__tensor_unflatten__({n: getattr(m, n) for n in inner}, meta, m.shape, m.stride())
    assert torch.equal(again.full_tensor(), ref)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(m.logical_not(), ~ref)
    assert any("logical_not" in str(w.message) and "proved causal documents" in str(w.message) for w in caught)


def _capture(fn, *args):
    """Dynamo's graph and example inputs of ``fn`` (run eagerly afterwards)."""
    got = []

    def backend(gm, example_inputs):
        got.append((gm, list(example_inputs)))
        return gm.forward
    torch._dynamo.reset()
    torch.compile(fn, backend=backend)(*args)
    return got[0]


def _causal_float(x):
    i = torch.arange(x.shape[1])
    mask = torch.zeros(x.shape[1], x.shape[1]).masked_fill(i[None, :] > i[:, None], float("-inf"))
    return x * 2, mask


def test_builder_frame_hands_out_facts_for_a_proved_mask():
    gm, ex = _capture(_causal_float, torch.randn(2, S, 4))
    layout = carry_mask_outputs(gm, ex, _model_state_inputs(gm, ex))
    assert layout[0] is None                       # x * 2 stays a plain output
    exit_ = layout[1]
    assert exit_.facts == _facts(True, None, False, "additive", float("-inf"))
    assert exit_.shape == (S, S)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert len(out) == 1                            # the S x S output is gone from the graph


def _padding_mask(x, keep):
    return x * 2, keep[:, None, :] & keep[:, :, None]       # depends on user data: proves nothing


def test_an_unprovable_mask_is_left_as_a_tensor():
    gm, ex = _capture(_padding_mask, torch.randn(2, S, 4), torch.rand(2, S) > 0.3)
    assert carry_mask_outputs(gm, ex, _model_state_inputs(gm, ex)) is None


def _consume(scores, mask):
    return (scores + mask[:, :, :, :S]).softmax(-1)


@pytest.mark.parametrize("encoding,docs", [("additive", True), ("visible", True), ("hidden", False)])
def test_receiving_frame_rebuilds_the_same_mask_in_its_graph(encoding, docs):
    ref = _reference(True, 4, docs, encoding)
    mask = ProvedMask(TOKENS if docs else torch.empty(0, dtype=torch.long),
                      _facts(True, 4, docs, encoding, MIN), ref.shape, ref.stride(), ref.dtype)
    scores = torch.randn(2, 1, S, S)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                    # the capture runs the frame eagerly too
        gm, ex = _capture(_consume, scores, mask)
    examples, positions = expand_mask_inputs(gm, ex)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    (i,) = positions
    assert examples[i] is mask.tokens
    slice_node = next(n for n in gm.graph.nodes if n.op == "call_function" and "getitem" in str(n.target)
                      and isinstance(n.args[1], tuple) and any(isinstance(i, slice) for i in n.args[1]))
    rebuilt = evaluate(gm, slice_node, dict(zip(placeholders, examples)))
    assert torch.equal(rebuilt, ref)
