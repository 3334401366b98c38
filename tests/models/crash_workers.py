"""Models that crashed seqpar where plain ``torch.compile`` works, built from the real library code
(and one Falcon-style model written here), and one training step of each on spawned ranks.

``crash_case`` reports what a user would see: ``exact`` / ``wrong`` / ``crash``, whether the
compile agreement had to run a frame replicated because a stage failed (its "please report"
warning, with the exception), ring calls, and the error. ``switches`` restores a fixed bug for
the case (``{"module": {"_FLAG": value}}``, set in the spawned rank only).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

import seqpar_compiler as sp  # noqa: E402

V, C, H, LAYERS = 128, 64, 4, 2


class FalconStyleAttention(nn.Module):
    """Falcon's fused multi-query attention (``FalconAttention`` with ``multi_query=True``): one
    projection to H query heads plus one key and one value head, split by indexing with lists
    (``[..., [-2], :]`` keeps the head dim: advanced indexing, a tensor constant in ATen)."""

    def __init__(self):
        super().__init__()
        self.head_dim = C // H
        self.query_key_value = nn.Linear(C, C + 2 * self.head_dim, bias=False)
        self.dense = nn.Linear(C, C, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        fused = self.query_key_value(x).view(B, T, H + 2, self.head_dim)
        q, k, v = fused[..., :-2, :], fused[..., [-2], :], fused[..., [-1], :]    # (B, T, H|1, D)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                          # (B, H|1, T, D)
        k, v = k.expand(B, H, T, self.head_dim), v.expand(B, H, T, self.head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dense(y.transpose(1, 2).reshape(B, T, C))


class FalconStyleBlock(nn.Module):
    """Falcon's parallel block: attention and MLP both read one LayerNorm of the input."""

    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(C)
        self.self_attention = FalconStyleAttention()
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C, bias=False), nn.GELU(), nn.Linear(4 * C, C, bias=False))

    def forward(self, x):
        h = self.input_layernorm(x)
        return x + self.self_attention(h) + self.mlp(h)


class FalconStyleLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, C)
        self.blocks = nn.ModuleList(FalconStyleBlock() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, V, bias=False)

    def forward(self, ids, labels):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1))


class OneHotRoutingLM(FalconStyleLM):
    """Top-1 routing by ``one_hot(router(x).argmax(-1))`` before the blocks, as Mixtral's and
    Qwen3-MoE's eager experts build their expert masks: one_hot has no hand-written rule and
    decomposes to ``idx.unsqueeze(-1) == arange(E)``, a factory inside the generic rule's pieces."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(C, 4, bias=False)
        self.expert_shift = nn.Parameter(torch.randn(4, C) * 0.1)

    def forward(self, ids, labels):
        x = self.emb(ids)
        route = F.one_hot(self.router(x).argmax(-1), 4).to(x.dtype)          # (B, S, E)
        x = x + route @ self.expert_shift
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1))


class BreakBeforeBlocksLM(FalconStyleLM):
    """A graph break before the blocks: the first frame has no attention and no parameters (it
    runs replicated and returns plain activations), the second shards them at its edge; one of
    them, narrow like DeepSeek-V3's RoPE tables after its MoE's graph break, is only sliced along
    its feature dim (a guard ``size >= 4`` that no later guard specialises away)."""

    def forward(self, embeds, labels):
        x, gates = embeds.tanh(), embeds[..., :8].sigmoid()                      # (B, S, C), (B, S, 8)
        torch._dynamo.graph_break()
        x = x * (gates[..., :4].sum(-1, keepdim=True) + gates[..., 4:].sum(-1, keepdim=True))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1))


def _x_transformers_decoder():
    """x-transformers 2.31's decoder with rotary embeddings (its own rotary and einsum code)."""
    from x_transformers import Decoder, TransformerWrapper
    return TransformerWrapper(num_tokens=V, max_seq_len=256,
                              attn_layers=Decoder(dim=C, depth=LAYERS, heads=H, rotary_pos_emb=True))


def _ids(B: int, S: int) -> torch.Tensor:
    return torch.randint(3, V, (B, S), generator=torch.Generator().manual_seed(1))


def _model_and_step(name: str, S: int):
    """(model, its reference copy, a function computing the step's loss from a model)."""
    hand_written = {"falcon-style": FalconStyleLM, "one-hot-routing": OneHotRoutingLM}
    if name in hand_written:
        make, ids = hand_written[name], _ids(2, S)
        step = lambda m: m(ids, ids)                          # noqa: E731
    elif name == "break-before-blocks":
        make, ids = BreakBeforeBlocksLM, _ids(2, S)
        embeds = torch.randn(2, S, C, generator=torch.Generator().manual_seed(2))
        step = lambda m: m(embeds, ids)                       # noqa: E731
    elif name == "x-transformers-rotary":
        make, ids = _x_transformers_decoder, _ids(2, S)
        step = lambda m: F.cross_entropy(m(ids).flatten(0, 1), ids.flatten(0, 1))   # noqa: E731
    else:                                                     # an entry of the real-code tier's zoo
        from real_model_zoo import batch_for, build
        kwargs = batch_for(name, B=2, S=S)
        make = lambda: build(name)                            # noqa: E731
        step = lambda m: m(**kwargs).loss                     # noqa: E731
    torch.manual_seed(0)
    model = make()
    ref = make()
    ref.load_state_dict(model.state_dict())
    return model.train(), ref.train(), step


@contextlib.contextmanager
def _switched(switches: dict | None):
    saved = []
    for module, flags in (switches or {}).items():
        mod = importlib.import_module(module)
        for flag, value in flags.items():
            saved.append((mod, flag, getattr(mod, flag)))
            setattr(mod, flag, value)
    try:
        yield
    finally:
        for mod, flag, value in reversed(saved):
            setattr(mod, flag, value)


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def crash_case(rank: int, P: int, *, model: str, switches: dict | None = None, S: int = 32) -> dict:
    """One step of ``model`` through seqpar (aot_eager, zigzag) against eager in this process."""
    m, ref, step = _model_and_step(model, S)
    torch._dynamo.reset()
    out = {"status": "crash", "reports": []}
    with _switched(switches), warnings.catch_warnings(record=True) as caught, sp.stats() as st:
        warnings.simplefilter("always")
        try:
            loss = step(torch.compile(m, backend=sp.backend(inner="aot_eager", schedule="zigzag")))
            loss.backward()
        except Exception as err:  # noqa: BLE001 - the case reports the crash
            out["error"] = f"{type(err).__name__}: {err}"[:600]
            return out
        finally:
            out["reports"] = [str(w.message)[:600] for w in caught if "please report" in str(w.message)]
    ref_loss = step(ref)
    ref_loss.backward()
    grads = [_rel(p.grad, q.grad) for p, q in zip(m.parameters(), ref.parameters()) if q.grad is not None]
    missing = sum(1 for p, q in zip(m.parameters(), ref.parameters()) if q.grad is not None and p.grad is None)
    out.update(loss=_rel(loss, ref_loss), grad=max(grads) if not missing else float("inf"),
               ring_calls=st.attention_forward_calls)
    out["status"] = "exact" if out["loss"] <= 1e-5 and out["grad"] <= 1e-4 else "wrong"
    return out


def run_crash_cases(rank: int, P: int, cases: list[tuple[str, dict]]) -> dict:
    return {name: crash_case(rank, P, **kw) for name, kw in cases}
