"""Spawned-rank cases for SEQPAR_VERIFY: a correct model passes silently, a sharding rule broken
on purpose is caught with the node named, a broken gradient with the parameter named.

``verify_case`` takes ``break_rule`` (one of ``BREAKS``): a test-only way to make one rule of
``passes/sharding_rules.py`` wrong, patched into the spawned rank only. Switches that restore an
old bug elsewhere can be passed the same way (``switches``: ``{"module.path": {"_FLAG": True}}``).
"""
from __future__ import annotations

import contextlib
import importlib
import operator
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))

import seqpar_compiler as sp  # noqa: E402
from models import GPT, GPTConfig  # noqa: E402
from seqpar_compiler.passes import sharding_rules  # noqa: E402
from seqpar_compiler.verify import SeqparParityError  # noqa: E402


def _off_by_1e3(rule):
    """The rule's output plus 1e-3: a wrong number, no error."""
    def broken(ctx, node):
        out = rule(ctx, node)
        if isinstance(out, str):
            return out
        new, placement = out
        return ctx.emit(operator.add, (new, 1e-3), placement=placement), placement
    return broken


def _weight_grad_off_by_1pct(rule, which: str):
    """The linear whose weight is ``which`` gets its weight as ``1.01 w - 0.01 w.detach()``: the same
    forward (to rounding), a gradient 1% too large."""
    def broken(ctx, node):
        out = rule(ctx, node)
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if isinstance(out, str) or which not in getattr(weight, "name", ""):
            return out
        new, placement = out
        x, w, *rest = new.args
        scaled = ctx.emit(operator.mul, (w, 1.01))
        shift = ctx.emit(operator.mul, (ctx.emit("detach", (w,), op="call_method"), 0.01))
        return ctx.emit(new.target, (x, ctx.emit(operator.sub, (scaled, shift)), *rest), new.kwargs,
                        placement), placement        # the first linear node is left dead
    return broken


BREAKS = {"layer_norm+1e-3": (F.layer_norm, _off_by_1e3),
          "c_attn weight grad": (F.linear, lambda r: _weight_grad_off_by_1pct(r, "c_attn"))}


@contextlib.contextmanager
def _patched(break_rule: str | None, switches: dict | None):
    saved = []
    if break_rule is not None:
        key, make = BREAKS[break_rule]
        saved.append((sharding_rules.RULES, key, sharding_rules.RULES[key]))
        sharding_rules.RULES[key] = make(sharding_rules.RULES[key])
    for module, flags in (switches or {}).items():
        mod = importlib.import_module(module)
        for name, value in flags.items():
            saved.append((vars(mod), name, getattr(mod, name)))
            setattr(mod, name, value)
    try:
        yield
    finally:
        for table, key, value in reversed(saved):
            table[key] = value


class _BrokenGPT(GPT):
    """The GPT with a graph break after its blocks: the hidden states leave the first frame and
    enter the second as a sequence shard."""

    def forward(self, idx, targets=None):
        pos = torch.arange(0, idx.shape[1], dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        torch._dynamo.graph_break()
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _gpt_step(graph_break: bool, S: int):
    cfg = GPTConfig(n_layer=1, block_size=64)
    torch.manual_seed(0)
    model, ref = (_BrokenGPT if graph_break else GPT)(cfg), GPT(cfg)
    ref.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (2, S), generator=g)
    tgt = torch.randint(0, cfg.vocab_size, (2, S), generator=g)
    return model, ref, (lambda m: m(idx, tgt)[1])


def _zoo_step(name: str, S: int):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
    from real_model_zoo import batch_for, build
    model, ref = build(name), build(name)
    ref.load_state_dict(model.state_dict())
    kwargs = batch_for(name, B=2, S=S)
    return model, ref, (lambda m: m(**kwargs).loss)


def verify_case(rank: int, P: int, *, verify: str = "first", break_rule: str | None = None,
                switches: dict | None = None, graph_break: bool = False, zoo: str | None = None, S: int = 16,
                steps: int = 1) -> dict:
    """``steps`` training steps of a 1-layer GPT (or of the real-code tier's model ``zoo``) under
    ``SEQPAR_VERIFY=verify``: what was raised (the parity error's node / parameter), or the loss and
    gradient errors against eager, the warnings and the number of checked calls."""
    from seqpar_compiler import verify as verify_module
    model, ref, loss_of = _zoo_step(zoo, 32 if S == 16 else S) if zoo else _gpt_step(graph_break, S)
    torch._dynamo.reset()
    checked = verify_module.checked_calls()
    with _patched(break_rule, switches), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend=sp.backend(inner="aot_eager", schedule="zigzag", verify=verify))
        try:
            for _ in range(steps):
                model.zero_grad()
                loss = loss_of(compiled)
                loss.backward()
        except Exception as err:  # noqa: BLE001 - Dynamo wraps what a backend raises at compile time
            cause = err
            while cause is not None and not isinstance(cause, SeqparParityError):
                cause = cause.__cause__
            if cause is None:
                return {"raised": f"{type(err).__name__}: {err}"[:1500]}
            return {"parity_error": str(cause), "node": cause.node, "parameter": cause.parameter, "error": cause.error}
    ref_loss = loss_of(ref)
    ref_loss.backward()
    grads = [_rel(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()) if q.grad is not None]
    return {"loss": _rel(loss, ref_loss), "grad": max(grads),
            "warnings": sorted({f"{w.category.__name__}: {w.message}" for w in caught}),
            "checked_calls": verify_module.checked_calls() - checked}


def run_verify_cases(rank: int, P: int, cases: list[tuple[str, dict]]) -> dict:
    return {name: verify_case(rank, P, **kw) for name, kw in cases}
