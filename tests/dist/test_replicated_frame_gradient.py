"""A frame that runs replicated (no attention in it) between a graph break and a sharded frame:
the gradient the sharded frame's backward hands back is a SequenceShard where the replicated
frame's compiled backward expects a plain tensor. SequenceShard coerces itself (gathers) and the
step stays exact (2 ranks, aot_eager, against single-process eager)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqpar_compiler.launch import run_ranks

V, D, B, S = 64, 32, 2, 32


class _ParamFrameThenAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.scale = nn.Parameter(torch.ones(D))
        self.lin = nn.Linear(D, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.head = nn.Linear(D, V)

    def forward(self, ids):
        x = self.emb(ids)
        torch._dynamo.graph_break()
        x = self.lin(x * self.scale)              # a frame with parameters and no attention
        torch._dynamo.graph_break()
        q, k, v = self.qkv(x).view(ids.shape[0], ids.shape[1], 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)
        return self.head(x + y)


def _case(rank, P):
    from seqpar_compiler.runtime.sequence_shard import SequenceShard
    torch.manual_seed(0)
    model, ref = _ParamFrameThenAttention(), _ParamFrameThenAttention()
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="seqpar")
    for _ in range(2):                            # compile, then a step on the compiled frames
        model.zero_grad()
        logits = compiled(ids)
        loss = F.cross_entropy(logits.reshape(-1, V), ids.reshape(-1))
        loss.backward()
    ref_loss = F.cross_entropy(ref(ids).reshape(-1, V), ids.reshape(-1))
    ref_loss.backward()
    grads = {n: float((p.grad - q.grad).norm() / q.grad.norm())
             for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters())}
    return {"loss": float((loss.detach() - ref_loss).abs() / ref_loss.abs()), "grads": grads,
            "sharded_logits": isinstance(logits, SequenceShard)}


def test_gradient_into_a_replicated_frame_is_coerced_and_exact():
    for r in run_ranks(_case, 2, timeout=300, pg_timeout=120):
        assert r["loss"] <= 1e-5, r
        assert set(r["grads"]) == {"emb.weight", "scale", "lin.weight", "lin.bias", "qkv.weight",
                                   "qkv.bias", "head.weight", "head.bias"}
        assert max(r["grads"].values()) <= 1e-4, r["grads"]
        assert r["sharded_logits"], r             # the attention frame ran sequence-parallel
