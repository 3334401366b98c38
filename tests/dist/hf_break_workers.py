"""A Hugging Face model with a graph break inside its decoder stack, on spawned ranks (issue 13
follow-up): a forward hook on the first decoder layer that breaks the graph (``print`` or
``torch._dynamo.graph_break()``). The mask and rotary tables are built in one frame and used in
the next; each case returns the relative errors of the loss, logits and every parameter gradient
against single-process eager, the ring-forward count, the step's sequence all-gathers, the
full-length saves and the seqpar warnings."""
from __future__ import annotations

import warnings

import torch

import frames_workers as FW
import seqpar_compiler as sp

__all__ = ["hf_break_case", "run_cases"]


def _break_hook(kind: str):
    def hook(module, args, output):
        if kind == "print":
            print("layer done")
        else:
            torch._dynamo.graph_break()
    return hook


def hf_break_case(rank, P, *, arch="llama", impl="sdpa", kind="graph_break", inner="aot_eager", packed=False,
                  **options):
    """``packed``: position ids that restart (two documents per row), so the mask's document
    ids cross the break with its facts."""
    import transformers
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   attn_implementation=impl)
    m, ref = transformers.LlamaForCausalLM(cfg), transformers.LlamaForCausalLM(cfg)
    ref.load_state_dict(m.state_dict())
    m.model.layers[0].register_forward_hook(_break_hook(kind))
    compiled = torch.compile(m, backend=sp.backend(inner=inner, schedule="zigzag", **options))
    idx = torch.randint(0, 128, (FW.B, FW.S), generator=torch.Generator().manual_seed(1))
    kw = dict(labels=idx, use_cache=False)
    if packed:
        cut = FW.S // 3
        kw["position_ids"] = torch.cat([torch.arange(cut), torch.arange(FW.S - cut)]).expand(FW.B, -1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(idx, **kw).loss.backward()
        m.zero_grad()
        with sp.stats() as st, FW.GatherCounter() as gathers:
            saves, out = FW.full_length_saves(lambda: compiled(idx, **kw), [idx])
            out.loss.backward()
            n_gathers = gathers.calls
    r = ref(idx, **kw)
    r.loss.backward()
    grads = {n: FW._rel(p.grad, q.grad) for (n, p), q in zip(m.named_parameters(), ref.parameters())}
    return {"loss": FW._rel(out.loss, r.loss), "logits": FW._rel(out.logits, r.logits), "grads": grads,
            "ring_calls": st.attention_forward_calls, "layers": cfg.num_hidden_layers, "gathers": n_gathers,
            "full_saves": saves, "logits_type": type(out.logits).__name__,
            "warnings": [str(w.message)[:300] for w in caught if "seqpar" in str(w.message)]}


def run_cases(rank, P, cases):
    return {name: hf_break_case(rank, P, **kw) for name, kw in cases}
