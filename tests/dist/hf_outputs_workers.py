"""What leaves a sequence-parallel Hugging Face model (issue 22), on spawned ranks: inference and
evaluation outputs, decoding, saved-tensor hooks at new lengths, and ``SequenceShard`` values
leaving the group (saved, read, used after the group is gone). Each case returns plain data."""
from __future__ import annotations

import io
import logging
import os
import pickle
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

import seqpar_compiler as sp  # noqa: E402
from hf_training_workers import llama  # noqa: E402


def _pair():
    model, ref = llama().eval(), llama().eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _ids(S=32, B=1, seed=1):
    return torch.randint(3, 128, (B, S), generator=torch.Generator().manual_seed(seed))


class _Log(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def eval_no_grad_case():
    """``model.eval()`` + ``no_grad``: sharded (the ring runs) and the logits are eager's."""
    model, ref = _pair()
    model.compile(backend=sp.backend(inner="aot_eager", schedule="zigzag"))
    ids = _ids()
    with torch.no_grad(), sp.stats() as st:
        logits = model(ids, use_cache=False).logits
        expected = ref(ids, use_cache=False).logits
    return {"logits": _rel(logits.full_tensor(), expected), "ring_calls": st.attention_forward_calls,
            "type": type(logits).__name__}


def prefill_and_decode_case(new_tokens: int = 8):
    """Prefill (``use_cache=True, logits_to_keep=1``) and greedy ``generate``: the prefill is sharded
    and exact with its cache held as SequenceShards; decode steps are counted: seqpar compiles per
    frame (backend calls) and per length (specialisations)."""
    model, ref = _pair()
    calls = []
    inner = sp.backend(inner="aot_eager", schedule="zigzag")

    def counting(gm, example_inputs):
        calls.append(1)
        return inner(gm, example_inputs)
    model.compile(backend=counting)
    ids = _ids()
    log = _Log()
    logging.getLogger("seqpar").addHandler(log)
    logging.getLogger("seqpar").setLevel(logging.INFO)
    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught, sp.stats() as st:
            warnings.simplefilter("always")
            out = model(ids, use_cache=True, logits_to_keep=1)
            expected = ref(ids, use_cache=True, logits_to_keep=1)
            prefill_ring = st.attention_forward_calls
            one = model.generate(ids, max_new_tokens=1, do_sample=False)
            one_ref = ref.generate(ids, max_new_tokens=1, do_sample=False)
            prefill_calls = len(calls)
            many = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            many_ref = ref.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    finally:
        logging.getLogger("seqpar").removeHandler(log)
    layer = out.past_key_values.layers[0]
    return {"prefill_logits": _rel(sp_full(out.logits), expected.logits), "prefill_ring": prefill_ring,
            "cache_types": sorted({type(layer.keys).__name__, type(layer.values).__name__}),
            "cache_matches": _rel(sp_full(layer.keys), expected.past_key_values.layers[0].keys),
            "one_token_equal": bool(torch.equal(one, one_ref)), "tokens_equal": bool(torch.equal(many, many_ref)),
            "compiles_before_decoding": prefill_calls, "compiles_while_decoding": len(calls) - prefill_calls,
            "specialised_lengths": sum("specialising the graph" in m for m in log.messages),
            "decode_warnings": sum("decoding" in str(w.message) for w in caught)}


def sp_full(x):
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def hooks_per_length_case(lengths=(32, 48, 64)):
    """A training step at each length under a saved-tensor hook that reads every value it packs. From
    the second length Dynamo traces the HF model with a symbolic length and seqpar specialises it at
    the first call of each length, inside the user's step: the hook must never be handed one of the
    passes' fake tensors (it was, 182 of them at the second length), and every step stays exact and
    sharded."""
    from torch._subclasses.fake_tensor import is_fake
    model, ref = _pair()
    model.train(), ref.train()
    model.compile(backend=sp.backend(inner="aot_eager", schedule="zigzag"))
    fakes, reads = [], []

    def pack(t):
        if is_fake(t):
            fakes.append(tuple(t.shape))
        else:
            reads.append(float(t.detach().float().sum()))      # reads the values, as save_on_cpu copies them
        return t
    worst, rings = 0.0, []
    for S in lengths:
        ids = _ids(S, seed=S)
        for m in (model, ref):
            m.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), sp.stats() as st:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        rings.append(st.attention_forward_calls)
        ref(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        worst = max([worst] + [_rel(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters())])
    return {"fake_packs": len(fakes), "real_packs": len(reads), "worst_grad": worst, "ring_calls": rings}


def shard_exit_case():
    """The logits of a training call leave as a SequenceShard: clones stay one, pickling refuses with
    the way out, readers gather, and after the group is destroyed any use says what happened.
    Destroys the process group: the last case of a spawn."""
    model, ref = _pair()
    model.compile(backend=sp.backend(inner="aot_eager", schedule="zigzag"))
    ids = _ids()
    logits = model(ids, use_cache=False).logits.detach()
    expected = ref(ids, use_cache=False).logits.detach()
    out = {"clone_type": type(logits.clone()).__name__}
    for name, save in (("pickle", lambda: pickle.dumps(logits)), ("torch_save", lambda: torch.save(logits, io.BytesIO())),
                       ("torch_save_dict", lambda: torch.save({"logits": logits}, io.BytesIO()))):
        try:
            save()
            out[name] = "saved"
        except pickle.PicklingError as e:
            out[name] = str(e)
    cpu = logits.cpu()
    out.update(cpu_type=type(cpu).__name__, cpu=_rel(cpu, expected), numpy=_rel(torch.from_numpy(logits.numpy()), expected),
               tolist=_rel(torch.tensor(logits.tolist()), expected), printed="SequenceShard(tensor(" in str(logits))
    dist.destroy_process_group()
    try:
        logits + 1
        out["after"] = "ran"
    except RuntimeError as e:
        out["after"] = str(e)
    try:
        str(logits)
        out["after_print"] = "ran"
    except RuntimeError as e:
        out["after_print"] = str(e)
    out["local_after"] = list(logits.to_local().shape)
    return out


CASES = {"eval": eval_no_grad_case, "decode": prefill_and_decode_case, "hooks": hooks_per_length_case,
         "exit": shard_exit_case}


def run_cases(rank: int, world: int, names):
    import traceback
    out = {}
    for name in names:          # "exit" destroys the group: it must come last
        torch._dynamo.reset()
        try:
            out[name] = CASES[name]()
        except Exception:  # noqa: BLE001 - one failing case must not hide the others
            out[name] = {"error": traceback.format_exc()}
    return out
