"""Hybrid models (recurrent layers between attention layers) from tiny configs, for the
recurrence tests and ``bench/hybrid_memory.py``.

``transformers`` models that build from a tiny config and run their torch path on CPU (no
``mamba_ssm`` / ``causal_conv1d`` / ``fla`` kernels): Bamba, NemotronH and GraniteMoeHybrid
(Mamba-2 mixers: causal depthwise conv1d, then the chunked SSD with its inter-chunk state
passing) with attention layers between them. ``fla_gla`` is a model written here in
flash-linear-attention's reference style (``fla_modules.py``).

``build(name, chunk=16)`` returns ``(model, batch_kwargs_fn)``; models are in train mode with no
dropout, so one step through seqpar must match one step in one process.
"""
from __future__ import annotations

import torch

__all__ = ["HYBRIDS", "build", "batch"]

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, max_position_embeddings=1024)


def _bamba(chunk: int, layers: int):
    import transformers
    cfg = transformers.BambaConfig(**_COMMON, num_hidden_layers=layers, attn_layer_indices=list(range(1, layers, 2)),
                                   mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1,
                                   mamba_chunk_size=chunk, mamba_expand=2, attention_dropout=0.0)
    return transformers.BambaForCausalLM(cfg)


def _nemotron_h(chunk: int, layers: int):
    import transformers
    cfg = transformers.NemotronHConfig(**_COMMON, num_hidden_layers=layers,
                                       hybrid_override_pattern="M*" * (layers // 2), mamba_num_heads=8,
                                       mamba_head_dim=16, ssm_state_size=16, n_groups=1, chunk_size=chunk,
                                       attention_dropout=0.0)
    return transformers.NemotronHForCausalLM(cfg)


def _granite_hybrid(chunk: int, layers: int):
    import transformers
    cfg = transformers.GraniteMoeHybridConfig(**_COMMON, num_hidden_layers=layers,
                                              layer_types=["mamba", "attention"] * (layers // 2), mamba_n_heads=8,
                                              mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1,
                                              mamba_chunk_size=chunk, num_local_experts=0, attention_dropout=0.0)
    return transformers.GraniteMoeHybridForCausalLM(cfg)


def _qwen3_next(chunk: int, layers: int):
    """Gated DeltaNet layers whose chunk loop is a Python loop (unrolled by Dynamo; chunk 64 in
    transformers' code, ``chunk`` unused): not recognised as a carried recurrence, gathered."""
    import transformers
    cfg = transformers.Qwen3NextConfig(**_COMMON, num_hidden_layers=layers, head_dim=16,
                                       layer_types=["linear_attention", "full_attention"] * (layers // 2),
                                       linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                                       linear_value_head_dim=16, num_experts=2, num_experts_per_tok=1,
                                       moe_intermediate_size=32, mlp_only_layers=list(range(layers)),
                                       attention_dropout=0.0)
    return transformers.Qwen3NextForCausalLM(cfg)


def _mamba2(chunk: int, layers: int):
    """A pure state-space model (no attention): the frame's length comes from its chunked scans."""
    import transformers
    cfg = transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, state_size=16,
                                    expand=2, n_groups=1, head_dim=16, num_heads=8, chunk_size=chunk)
    return transformers.Mamba2ForCausalLM(cfg)


def _fla_gla(chunk: int, layers: int):
    from fla_modules import GLAHybridLM
    return GLAHybridLM(vocab=VOCAB, width=64, heads=4, layers=layers, chunk=chunk)


HYBRIDS = {"mamba2": _mamba2, "bamba": _bamba, "nemotron_h": _nemotron_h, "granite_hybrid": _granite_hybrid, "fla_gla": _fla_gla,
           "qwen3_next": _qwen3_next}


def build(name: str, *, chunk: int = 16, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    model = HYBRIDS[name](chunk, layers)
    return model.train()


def batch(B: int, S: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}
