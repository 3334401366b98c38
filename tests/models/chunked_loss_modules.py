"""Chunked language-model losses as the libraries write them, on a tiny causal transformer
(litgpt's code checked against litgpt 0.5.13's ``utils.py``; neither library is a dependency).

  * litgpt ``chunked_cross_entropy``: ``logits.reshape(-1, V).split(chunk)`` with the targets
    split alike, per-chunk ``cross_entropy(reduction="none")``, ``torch.cat(...).sum()`` over the
    count of targets that are not ignored; and its list form, where the LM head itself ran per
    chunk of the sequence (``x.split(n, dim=1)``) and the targets are split by the chunk length.
  * torchtune ``CEWithChunkedOutputLoss``: the model returns a list of logits chunks
    (``h.chunk(k, dim=1)``, one head call each); the loss sums per-chunk ``reduction="sum"``
    cross entropies (logits upcast ``.float()``) and divides by the count of valid labels.

Shape legend: B batch, T sequence, V vocabulary, D width; a chunk is n tokens of the flattened
``B·T`` rows (litgpt) or T/k positions of every row (list forms).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TinyLM", "litgpt_chunked_cross_entropy", "TorchtuneChunkedCE"]


def litgpt_chunked_cross_entropy(logits, targets, chunk_size: int = 128, ignore_index: int = -100):
    """litgpt.utils.chunked_cross_entropy, its two chunked paths."""
    if isinstance(logits, list):
        logit_chunks = [logit_chunk.reshape(-1, logit_chunk.size(-1)) for logit_chunk in logits]
        target_chunks = [target_chunk.reshape(-1) for target_chunk in targets.split(logits[0].size(1), dim=1)]
        loss_chunks = [F.cross_entropy(lc, tc, ignore_index=ignore_index, reduction="none")
                       for lc, tc in zip(logit_chunks, target_chunks)]
        non_masked_elems = (targets != ignore_index).sum()
        return torch.cat(loss_chunks).sum() / non_masked_elems.maximum(torch.ones_like(non_masked_elems))
    logits = logits.reshape(-1, logits.size(-1))
    targets = targets.reshape(-1)
    logit_chunks = logits.split(chunk_size)
    target_chunks = targets.split(chunk_size)
    loss_chunks = [F.cross_entropy(lc, tc, ignore_index=ignore_index, reduction="none")
                   for lc, tc in zip(logit_chunks, target_chunks)]
    non_masked_elems = (targets != ignore_index).sum()
    return torch.cat(loss_chunks).sum() / non_masked_elems.maximum(torch.ones_like(non_masked_elems))


class TorchtuneChunkedCE(nn.Module):
    """torchtune.modules.loss.CEWithChunkedOutputLoss."""

    def __init__(self, num_output_chunks: int = 4, ignore_index: int = -100):
        super().__init__()
        self.num_output_chunks, self.ignore_index = num_output_chunks, ignore_index

    def compute_cross_entropy(self, logits, labels):
        return F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index, reduction="sum")

    def forward(self, logits: list, labels):
        total_elements = (labels != self.ignore_index).sum()
        labels = [target_chunk.reshape(-1) for target_chunk in labels.chunk(self.num_output_chunks, dim=1)]
        logits = [logit_chunk.reshape(-1, logit_chunk.size(-1)) for logit_chunk in logits]
        total_loss = 0.0
        for logits_chunk, labels_chunk in zip(logits, labels):
            total_loss += self.compute_cross_entropy(logits_chunk, labels_chunk)
        return total_loss / total_elements


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)           # [B, heads, T, D/heads]
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyLM(nn.Module):
    """``ids`` [B, T] → logits [B, T, V], or a list of ``head_chunks`` logits chunks along T (the
    LM head run per chunk, as litgpt's ``lm_head_chunk_size`` and torchtune's chunked output)."""

    def __init__(self, vocab: int = 48, dim: int = 32, heads: int = 4, depth: int = 2, head_chunks: int = 0,
                 chunk_with: str = "split"):
        super().__init__()
        self.head_chunks, self.chunk_with = head_chunks, chunk_with
        self.wte = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.wte(ids)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if not self.head_chunks:
            return self.lm_head(x)
        if self.chunk_with == "split":                                   # litgpt: chunks of n positions
            return [self.lm_head(x_i) for x_i in x.split(x.size(1) // self.head_chunks, dim=1)]
        return [self.lm_head(chunk) for chunk in x.chunk(self.head_chunks, dim=1)]   # torchtune
