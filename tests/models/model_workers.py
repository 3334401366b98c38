"""Run models through `torch.compile(backend=seqpar)` on spawned ranks and compare with eager."""
from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))        # tests/step_probes.py

import seqpar_compiler as sp  # noqa: E402
from models import GPT, GPTConfig, Llama, LlamaConfig  # noqa: E402

MODELS = {"gpt": lambda: GPT(GPTConfig()), "llama": lambda: Llama(LlamaConfig()),
          "gpt-manual": lambda: GPT(GPTConfig(attention="manual")),
          "gpt-window": lambda: GPT(GPTConfig(attention="manual", window=5)),
          "gpt-prefix-lm": lambda: GPT(GPTConfig(attention="manual", prefix=8)),
          "gpt-tagged-pointwise": lambda: _with_erf_activation(GPT(GPTConfig()))}


class _ErfClampActivation(torch.nn.Module):
    """Ops no rule lists by hand (erf, clamp, softplus): sharded because aten tags them pointwise."""

    def forward(self, x):
        return 0.5 * x * (1 + torch.erf(x * 0.7071)).clamp(max=1.9) + 0.1 * torch.nn.functional.softplus(x)


def _with_erf_activation(model):
    for block in model.blocks:
        block.mlp[1] = _ErfClampActivation()
    return model


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def _batch(S, B=2, vocab=256, ignore_tail=False):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab, (B, S), generator=g)
    tgt = torch.randint(0, vocab, (B, S), generator=g)
    if ignore_tail:
        tgt[:, -5:] = -1          # GPT's ignore_index: the mean counts only the rest
    return idx, tgt


def train_step_case(rank, P, *, model, S=32, inner="aot_eager", autocast=False, expect_fallback=False,
                    **options):
    torch.manual_seed(0)
    m, ref = MODELS[model](), MODELS[model]()
    ref.load_state_dict(m.state_dict())
    idx, tgt = _batch(S, ignore_tail=model.startswith("gpt"))
    counter = torch._dynamo.testing.CompileCounter()
    seqpar = sp.backend(inner=inner, **options)

    def counting(gm, ex):
        counter(gm, ex)
        return seqpar(gm, ex)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught, sp.stats() as st:
        warnings.simplefilter("always")
        cm = torch.compile(m, backend=counting)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, loss = cm(idx, tgt)
        loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        r_logits, r_loss = ref(idx, tgt)
    r_loss.backward()
    grads = {n: _rel(p.grad, q.grad) for (n, p), q in zip(m.named_parameters(), ref.parameters())}
    return {"loss": _rel(loss, r_loss), "logits": _rel(logits, r_logits), "grads": grads,
            "frames": counter.frame_count, "logits_shape": list(logits.shape),
            "ring_calls": st.attention_forward_calls,
            "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)]}


def local_output_case(rank, P, *, model="gpt", S=32, schedule="zigzag"):
    torch.manual_seed(0)
    m = MODELS[model]()
    idx, _ = _batch(S)
    torch._dynamo.reset()
    cm = torch.compile(m, backend=sp.backend(inner="aot_eager", output="local", schedule=schedule))
    with torch.no_grad():
        local = cm(idx)
        ref = m(idx)
    from seqpar_compiler.runtime import local_positions
    return {"shape": list(local.shape), "err": _rel(local, ref[:, local_positions(schedule, rank, P, S)])}


def grad_reduce_none_case(rank, P, *, model="llama", S=32):
    """With grad_reduce='none' gradients stay partial: their sum over ranks is the full one."""
    torch.manual_seed(0)
    m, ref = MODELS[model](), MODELS[model]()
    ref.load_state_dict(m.state_dict())
    idx, tgt = _batch(S)
    torch._dynamo.reset()
    cm = torch.compile(m, backend=sp.backend(inner="aot_eager", grad_reduce="none"))
    cm(idx, tgt)[1].backward()
    ref(idx, tgt)[1].backward()
    errs = {}
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        summed = p.grad.clone()
        torch.distributed.all_reduce(summed)
        errs[n] = _rel(summed, q.grad)
    return errs


class _SequenceFFTModel(torch.nn.Module):
    """A model with a sequence-mixing op (an FFT over time) that has no sharding rule."""

    def __init__(self):
        super().__init__()
        self.inner = GPT(GPTConfig())

    def forward(self, idx, targets):
        logits, loss = self.inner(idx, targets)
        return torch.fft.rfft(logits, dim=1).abs(), loss


def fallback_case(rank, P, *, fallback="gather"):
    torch.manual_seed(0)
    m = _SequenceFFTModel()
    idx, tgt = _batch(32)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out, loss = torch.compile(m, backend=sp.backend(inner="aot_eager", fallback=fallback))(idx, tgt)
        except Exception as e:  # noqa: BLE001
            return {"error": str(e)}
    ref_out, ref_loss = m(idx, tgt)
    return {"error": None, "err": _rel(out, ref_out),
            "warnings": [str(w.message) for w in caught if "cannot shard" in str(w.message)]}


def indivisible_case(rank, P):
    m = MODELS["gpt"]()
    idx, tgt = _batch(30)
    torch._dynamo.reset()
    try:
        torch.compile(m, backend=sp.backend(inner="aot_eager", schedule="zigzag"))(idx, tgt)
        return None
    except Exception as e:  # noqa: BLE001
        return str(e)


def run_cases(rank, P, cases):
    fns = {"train": train_step_case, "local": local_output_case, "grad_none": grad_reduce_none_case,
           "fallback": fallback_case, "indivisible": indivisible_case, "hf": hf_case,
           "structure": structure_case, "packed": packed_doc_case}
    return {name: fns[kind](rank, P, **kw) for name, kind, kw in cases}


def hf_case(rank, P, *, arch, impl, schedule="zigzag", S=32, packed_positions=False, B=2, use_cache=None,
            arange_positions=False, checkpointing=False, lengths=None, dynamic=None, **options):
    """A Hugging Face model from a tiny config (random weights, no download), with labels so it
    computes its own loss and use_cache at its default (the graph also returns the KV cache).

    The training call (issue 13 follow-up): ``use_cache=False`` with no position ids (transformers
    then looks for packed sequences in the ids it builds itself), ``arange_positions`` passes
    ``position_ids=arange(S)``, ``checkpointing`` calls ``gradient_checkpointing_enable()``;
    ``options`` go to ``seqpar_compiler.backend`` (``checkpoint="none"``).
    ``lengths`` calls the one compiled model at each length in turn (Dynamo marks the length
    dynamic at the second): every length is checked and the compiles are counted."""
    import transformers
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                       attn_implementation=impl)
        cls = transformers.LlamaForCausalLM
    elif arch == "mistral":
        # a sliding window shorter than one rank's share of the sequence
        cfg = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         sliding_window=7, attn_implementation=impl)
        cls = transformers.MistralForCausalLM
    else:
        # GPT2Config defaults to dropout 0.1: exactness needs 0
        cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=impl)
        cls = transformers.GPT2LMHeadModel
    m, ref = cls(cfg), cls(cfg)
    ref.load_state_dict(m.state_dict())
    if checkpointing:
        for model in (m, ref):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
    if lengths is not None:
        return _hf_lengths(m, ref, lengths, B=B, schedule=schedule, use_cache=use_cache, dynamic=dynamic)
    idx = torch.randint(0, 128, (B, S), generator=torch.Generator().manual_seed(1))
    kwargs = {"labels": idx}
    if use_cache is not None:
        kwargs["use_cache"] = use_cache
    if arange_positions:
        kwargs["position_ids"] = torch.arange(S).expand(B, S)
    if arch == "mistral":
        # its sliding-window cache keeps the last W-1 keys: slicing the sequence, gathered (correct,
        # warned); this case is about the mask, so no cache
        kwargs["use_cache"] = False
    if packed_positions:
        # two packed documents per row: position ids restart. transformers only packs without a
        # cache (with one it attends across documents, eager and compiled alike), as in training
        kwargs["use_cache"] = False
        kwargs["position_ids"] = torch.stack([torch.cat([torch.arange(12), torch.arange(S - 12)]),
                                              torch.cat([torch.arange(5), torch.arange(S - 5)])])
    from step_probes import SequenceGatherCounter, full_length_saves
    torch._dynamo.reset()
    cm = torch.compile(m, backend=sp.backend(inner="aot_eager", schedule=schedule, **options))
    with warnings.catch_warnings(record=True) as caught, sp.stats() as st, SequenceGatherCounter() as gathers:
        warnings.simplefilter("always")
        # only the training calls run under the counting hook: with the default KV cache (a
        # DynamicCache) Dynamo under saved_tensors_hooks fails creating a guard (IndexError in
        # produce_guards_verbose), before seqpar sees a graph
        saves, out = (full_length_saves(lambda: cm(idx, **kwargs), [idx], S) if use_cache is False
                      else ([], cm(idx, **kwargs)))
        out.loss.backward()
    r = ref(idx, **kwargs)
    r.loss.backward()
    grads = {n: _rel(p.grad, q.grad) for (n, p), q in zip(m.named_parameters(), ref.parameters())
             if q.grad is not None}
    return {"loss": _rel(out.loss, r.loss), "logits": _rel(out.logits, r.logits), "grads": grads,
            "ring_calls": st.attention_forward_calls, "ring_backward": st.attention_backward_calls,
            "bytes_sent": st.bytes_sent, "full_saves": saves, "gathers": gathers.calls,
            "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)],
            "fx_warnings": [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                            if f"{os.sep}torch{os.sep}fx{os.sep}" in w.filename]}


def _hf_lengths(m, ref, lengths, *, B, schedule, use_cache, dynamic):
    """One compiled HF model called at several lengths: exactness per length, ring calls per
    length, compiles in all, and the seqpar / torch.fx warnings."""
    counter = torch._dynamo.testing.CompileCounter()
    seqpar = sp.backend(inner="aot_eager", schedule=schedule)

    def counting(gm, ex):
        counter(gm, ex)
        return seqpar(gm, ex)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=counting, dynamic=dynamic)
    per_length = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for S in lengths:
            idx = torch.randint(0, 128, (B, S), generator=torch.Generator().manual_seed(S))
            kwargs = {"labels": idx} if use_cache is None else {"labels": idx, "use_cache": use_cache}
            m.zero_grad()
            ref.zero_grad()
            with sp.stats() as st:
                out = compiled(idx, **kwargs)
                out.loss.backward()
            r = ref(idx, **kwargs)
            r.loss.backward()
            grads = {n: _rel(p.grad, q.grad) for (n, p), q in zip(m.named_parameters(), ref.parameters())
                     if q.grad is not None}
            per_length[S] = {"loss": _rel(out.loss, r.loss), "logits": _rel(out.logits, r.logits),
                             "grads": grads, "ring_calls": st.attention_forward_calls}
    return {"lengths": per_length, "compiles": counter.frame_count,
            "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)],
            "fx_warnings": [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                            if f"{os.sep}torch{os.sep}fx{os.sep}" in w.filename]}


def structure_case(rank, P, *, model="llama", S=32):
    """Names of nodes of the sharded graph that hold a full-length sequence dim, other than
    inputs and the gathers of outputs (B=1 so no merged dim can equal S by accident)."""
    import torch.distributed as dist
    from torch.fx.passes.shape_prop import ShapeProp

    from seqpar_compiler.backend import _shard_graph
    from seqpar_compiler.options import resolve_options
    captured = {}

    def capture(gm, ex):
        captured.update(gm=gm, ex=ex)
        return gm.forward
    torch.manual_seed(0)
    m = MODELS[model]()
    idx, tgt = _batch(S, B=1)
    torch._dynamo.reset()
    torch.compile(m, backend=capture)(idx, tgt)
    sharded = _shard_graph(captured["gm"], captured["ex"], dist.group.WORLD, resolve_options(inner="aot_eager", schedule="zigzag"))
    ShapeProp(sharded).propagate(*captured["ex"])
    gather = torch.ops.seqpar.gather_sequence.default
    allowed = set()
    full = []
    for n in sharded.graph.nodes:
        metas = n.meta.get("tensor_meta")
        metas = metas if isinstance(metas, (list, tuple)) else [metas]
        shapes = [tuple(t.shape) for t in metas if hasattr(t, "shape")]
        if n.op == "placeholder" or n.target is gather or any(a in allowed for a in n.all_input_nodes):
            allowed.add(n)
            continue
        if any(S in shape for shape in shapes):
            full.append(f"{n.name}: {shapes}")
    ring_nodes = sum(1 for n in sharded.graph.nodes if n.target is torch.ops.seqpar.ring_attention.default)
    return {"full": full, "ring_nodes": ring_nodes}


def packed_doc_case(rank, P, *, schedule="zigzag", S=32):
    """Hand-written attention over packed documents: the ring gets the document ids."""
    from models import PackedDocAttention
    torch.manual_seed(0)
    m, ref = PackedDocAttention(), PackedDocAttention()
    ref.load_state_dict(m.state_dict())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, S, 32, generator=g)
    doc = torch.sort(torch.randint(0, 4, (2, S), generator=g), dim=1).values
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught, sp.stats() as st:
        warnings.simplefilter("always")
        loss = torch.compile(m, backend=sp.backend(inner="aot_eager", schedule=schedule))(x, doc)
        loss.backward()
    r_loss = ref(x, doc)
    r_loss.backward()
    grads = {n: _rel(p.grad, q.grad) for (n, p), q in zip(m.named_parameters(), ref.parameters())}
    return {"loss": _rel(loss, r_loss), "grads": grads, "ring_calls": st.attention_forward_calls,
            "warnings": [str(w.message) for w in caught if "cannot shard" in str(w.message)]}
