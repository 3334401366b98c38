"""Real third-party model code from tiny configs: the real-code tier's list.

Each entry builds a ``transformers`` model with random weights (no download) small enough for
two CPU ranks, and the batch it is called with. The list is what a new user would try first:
dense decoders, MoE (both ``experts_implementation`` settings), MLA, parallel-block MQA, ALiBi,
encoders with a padding mask, soft-capped and windowed attention, a padded and a packed Llama.

``build(name)`` returns ``(model, batch_kwargs)``; the model is in train mode with every dropout
0, so one step through seqpar must match one step in one process.
"""
from __future__ import annotations

import torch

__all__ = ["ARCHITECTURES", "build", "batch_for"]

VOCAB = 128
# shared tiny sizes: width 64, 4 heads (2 KV heads where the model has GQA), 2 layers
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=256)
_NO_DROPOUT = dict(attention_dropout=0.0, hidden_dropout=0.0)


def _moe(cls_name, cfg_name, **extra):
    def make(experts="grouped_mm"):
        import transformers
        cfg = getattr(transformers, cfg_name)(**{**_COMMON, "num_key_value_heads": 2, **extra})
        cfg._experts_implementation = experts
        return getattr(transformers, cls_name)(cfg)
    return make


def _plain(cls_name, cfg_name, **extra):
    def make(experts=None):
        import transformers
        cfg = getattr(transformers, cfg_name)(**{**_COMMON, **extra})
        return getattr(transformers, cls_name)(cfg)
    return make


def _bert():
    import transformers
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=256,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(cfg)


def _modernbert():
    import transformers
    cfg = transformers.ModernBertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                                        global_attn_every_n_layers=2, local_attention=16,
                                        attention_dropout=0.0, mlp_dropout=0.0, embedding_dropout=0.0,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                        sep_token_id=2)
    return transformers.ModernBertForMaskedLM(cfg)


def _gpt2():
    import transformers
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                  eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg)


def _gpt_neox():
    return _plain("GPTNeoXForCausalLM", "GPTNeoXConfig", hidden_dropout=0.0, attention_dropout=0.0)()


def _opt():
    import transformers
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                                 dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
    return transformers.OPTForCausalLM(cfg)


def _falcon():
    import transformers
    cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                                    bias=False, alibi=False, hidden_dropout=0.0, attention_dropout=0.0)
    return transformers.FalconForCausalLM(cfg)


def _bloom():
    import transformers
    cfg = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4,
                                   hidden_dropout=0.0, attention_dropout=0.0)
    return transformers.BloomForCausalLM(cfg)


def _mpt():
    import transformers
    cfg = transformers.MptConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=256,
                                 expansion_ratio=2, attn_config={"alibi": True, "attn_pdrop": 0},
                                 resid_pdrop=0.0, emb_pdrop=0.0)
    return transformers.MptForCausalLM(cfg)


def _deepseek_v3(experts="grouped_mm"):
    import transformers
    cfg = transformers.DeepseekV3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                        moe_intermediate_size=32, num_hidden_layers=2, first_k_dense_replace=1,
                                        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                                        num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
                                        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                        v_head_dim=16, max_position_embeddings=256, attention_dropout=0.0)
    cfg._experts_implementation = experts
    return transformers.DeepseekV3ForCausalLM(cfg)


def _llama4(experts="eager", chunk=1024):
    import transformers
    cfg = transformers.Llama4TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                                        intermediate_size_mlp=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                        num_experts_per_tok=1, interleave_moe_layer_step=1,
                                        max_position_embeddings=256, attention_chunk_size=chunk,
                                        no_rope_layers=[1, 1], attention_dropout=0.0)
    return transformers.Llama4ForCausalLM(cfg)       # its experts have one (eager) implementation


def _gemma2():
    return _plain("Gemma2ForCausalLM", "Gemma2Config", num_key_value_heads=2, head_dim=16, sliding_window=8,
                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0, attention_dropout=0.0)()


# name -> (builder, batch kind, extra notes); builders that take ``experts`` are MoE
ARCHITECTURES = {
    "llama": (_plain("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2), "causal"),
    "llama-padded": (_plain("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2), "padded"),
    "llama-packed": (_plain("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2), "packed"),
    "mistral-window": (_plain("MistralForCausalLM", "MistralConfig", num_key_value_heads=2, sliding_window=8),
                       "causal"),
    "qwen2": (_plain("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=2), "causal"),
    "qwen3": (_plain("Qwen3ForCausalLM", "Qwen3Config", num_key_value_heads=2, head_dim=16), "causal"),
    "phi3": (_plain("Phi3ForCausalLM", "Phi3Config", num_key_value_heads=2, resid_pdrop=0.0, embd_pdrop=0.0,
                    attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2), "causal"),
    "gemma2-softcap-window": (_gemma2, "causal"),
    "gpt2": (_gpt2, "causal"),
    "gpt-neox": (_gpt_neox, "causal"),
    "opt": (_opt, "causal"),
    "falcon-mqa": (_falcon, "causal"),
    "bloom-alibi": (_bloom, "causal"),
    "mpt-alibi": (_mpt, "causal"),
    "bert-padded": (_bert, "encoder"),
    "modernbert-padded": (_modernbert, "encoder"),
    "mixtral-grouped_mm": (_moe("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2),
                           "causal", "grouped_mm"),
    "mixtral-eager": (_moe("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2),
                      "causal", "eager"),
    # the router's load-balancing loss in the loss (weight 1: its errors would show): sums over every token.
    # transformers' output capturing breaks the first layer's graph before its attention: that piece (an
    # RMSNorm) has no attention and takes its length from the position ids the frames before it took
    "mixtral-eager-aux": (_moe("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2,
                               router_aux_loss_coef=1.0), "aux", "eager"),
    "qwen3-moe-grouped_mm": (_moe("Qwen3MoeForCausalLM", "Qwen3MoeConfig", num_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=32, head_dim=16), "causal", "grouped_mm"),
    "qwen3-moe-eager": (_moe("Qwen3MoeForCausalLM", "Qwen3MoeConfig", num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=32, head_dim=16), "causal", "eager"),
    "llama4-moe": (_llama4, "causal", "eager"),
    # chunked attention shorter than the sequence: a block-diagonal causal mask of 8-token chunks
    "llama4-moe-chunked": (lambda experts: _llama4(experts, chunk=8), "causal", "eager"),
    "deepseek-v3-mla-grouped_mm": (_deepseek_v3, "causal", "grouped_mm"),
    "deepseek-v3-mla-eager": (_deepseek_v3, "causal", "eager"),
    # interleaved sliding / full layers; a shared expert beside the routed ones; partial rotary
    # read from a sinusoid table at position_ids by plain indexing (CodeGen)
    "gemma3-interleaved": (_plain("Gemma3ForCausalLM", "Gemma3TextConfig", num_key_value_heads=2, head_dim=16,
                                  sliding_window=8, layer_types=["sliding_attention", "full_attention"]), "causal"),
    "qwen2-moe-shared-eager": (_moe("Qwen2MoeForCausalLM", "Qwen2MoeConfig", num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=32, shared_expert_intermediate_size=32), "causal", "eager"),
    "codegen-table-rotary": (_plain("CodeGenForCausalLM", "CodeGenConfig", rotary_dim=8, n_embd=64, n_head=4,
                                    n_layer=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), "causal"),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The model of ``name`` with seeded random weights, in train mode."""
    entry = ARCHITECTURES[name]
    builder = entry[0]
    torch.manual_seed(seed)
    model = builder(entry[2]) if len(entry) > 2 else builder()
    return model.train()


def batch_for(name: str, B: int = 2, S: int = 32) -> dict:
    """The call's keyword arguments: ids and labels (the model computes its own loss), plus the
    padding mask or the restarting position ids of packed documents where the entry says so."""
    kind = ARCHITECTURES[name][1]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (B, S), generator=g)
    if kind == "encoder":
        mask = torch.ones(B, S, dtype=torch.long)
        mask[1, S - 7:] = 0                       # right padding on the second row
        labels = torch.where(mask.bool(), ids, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    kwargs = {"input_ids": ids, "labels": ids, "use_cache": False}
    if kind == "padded":
        mask = torch.ones(B, S, dtype=torch.long)
        mask[1, S - 7:] = 0
        kwargs["attention_mask"] = mask
        kwargs["labels"] = torch.where(mask.bool(), ids, -100)
    elif kind == "aux":
        kwargs["output_router_logits"] = True
    elif kind == "packed":
        kwargs["position_ids"] = torch.stack([torch.cat([torch.arange(12), torch.arange(S - 12)]),
                                              torch.cat([torch.arange(5), torch.arange(S - 5)])])
    return kwargs
