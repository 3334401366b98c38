"""The worked example of docs/adding_a_sharding_rule.md works as the page says.

The rule's code is taken from the page itself (its one ``python`` block that registers into
``RULES``) and executed in each spawned rank, so the page cannot drift from what is tested.
"""
import pathlib
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqpar_compiler.launch import run_ranks

DOC = pathlib.Path(__file__).parents[2] / "docs" / "adding_a_sharding_rule.md"
S, WIDTH, VOCAB = 32, 16, 64


def rule_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    found = [b for b in blocks if "RULES[" in b]
    assert len(found) == 1, f"expected one python block registering a rule in {DOC}, found {len(found)}"
    return found[0]


@torch.library.custom_op("mylib::rms_norm", mutates_args=())
def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The page's "own fused kernel": RMSNorm over the last dim as one opaque op."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@fused_rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.eps = inputs[2]


def _backward(ctx, g):
    x, w = ctx.saved_tensors
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ctx.eps)
    gw = g * w
    dx = r * gw - x * r.pow(3) * (gw * x).mean(-1, keepdim=True)
    dw = (g * x * r).reshape(-1, x.shape[-1]).sum(0)
    return dx, dw, None


fused_rms_norm.register_autograd(_backward, setup_context=_setup)


class _FusedRMSNorm(nn.Module):
    def __init__(self, width, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(width) + 0.1 * torch.randn(width)), eps

    def forward(self, x):
        return fused_rms_norm(x, self.weight, self.eps)


class RMSNormAttention(nn.Module):
    """Embedding → a fused RMSNorm custom op → causal SDPA → loss: the norm meets shards."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.norm = _FusedRMSNorm(WIDTH, eps=1e-6)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.out = nn.Linear(WIDTH, VOCAB)

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.norm(self.emb(idx))                                                 # (B, T, C)
        q, k, v = (t.view(B, T, 2, WIDTH // 2).transpose(1, 2) for t in self.qkv(x).split(WIDTH, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)                  # (B, 2, T, C/2)
        y = y.transpose(1, 2).reshape(B, T, WIDTH)
        logits = self.out(x + y)
        return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _compiled_step(code: str | None):
    import seqpar_compiler as sp
    from seqpar_compiler.passes.rewrite import SeqparFallbackError
    if code is not None:
        exec(compile(code, str(DOC), "exec"), {})
    torch.manual_seed(0)
    model, ref = RMSNormAttention(), RMSNormAttention()
    ref.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    idx, tgt = torch.randint(0, VOCAB, (2, S), generator=g), torch.randint(0, VOCAB, (2, S), generator=g)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=sp.backend(inner="aot_eager", fallback="error", schedule="zigzag"))
    try:
        loss = compiled(idx, tgt)
    except Exception as err:                     # Dynamo wraps backend errors
        cause = err
        while cause is not None and not isinstance(cause, SeqparFallbackError):
            cause = cause.__cause__ or cause.__context__
        return {"fallback": str(cause) if cause is not None else repr(err)}
    loss.backward()
    r_loss = ref(idx, tgt)
    r_loss.backward()
    return {"fallback": None, "loss": _rel(loss, r_loss),
            "grads": {n: _rel(p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref.parameters())}}


def _both(rank, P, code):
    return {"without": _compiled_step(None), "with": _compiled_step(code)}


def test_rms_norm_rule_from_the_docs_removes_the_fallback_and_is_exact():
    results = run_ranks(_both, 2, rule_code(), timeout=240)
    for rank, res in enumerate(results):
        assert res["without"]["fallback"] and "rms_norm" in res["without"]["fallback"], (rank, res["without"])
        got = res["with"]
        assert got["fallback"] is None, (rank, got)
        assert got["loss"] <= 1e-5, (rank, got)
        worst = max(got["grads"].items(), key=lambda kv: kv[1])
        assert worst[1] <= 1e-4, (rank, worst)
