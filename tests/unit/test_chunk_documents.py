"""Chunked attention masks (Llama 4's ``attention_chunk_size``) are proved as a band within
documents whose ids are position // chunk, by evaluation; anything else is not."""
import torch

from seqpar_compiler.passes.mask_proof import band_of, chunk_documents


def _chunked(S, c, causal=True):
    i = torch.arange(S)
    same = (i[:, None] // c) == (i[None, :] // c)
    return same & (i[None, :] <= i[:, None]) if causal else same


def test_causal_chunks_are_causal_documents_of_position_div_chunk():
    vis = _chunked(32, 8)[None, None].expand(2, 1, 32, 32)
    band, ids = chunk_documents(vis, 32)
    assert torch.equal(ids, torch.arange(32) // 8)
    assert torch.equal(band, torch.ones(32, 32, dtype=torch.bool).tril())
    assert band_of(vis, 32) is None                  # no band alone: the chunks are what proves it


def test_a_shorter_last_chunk_and_bidirectional_chunks_are_documents_too():
    _, ids = chunk_documents(_chunked(30, 8), 30)
    assert torch.equal(ids, torch.arange(30) // 8)
    band, ids = chunk_documents(_chunked(32, 4, causal=False), 32)
    assert bool(band.all()) and torch.equal(ids, torch.arange(32) // 4)


def test_masks_that_are_no_chunked_band_prove_nothing():
    S = 32
    vis = _chunked(S, 8).clone()
    vis[20, 17] = False                             # one hole inside a chunk
    assert chunk_documents(vis, S) is None
    uneven = torch.tensor([0] * 8 + [1] * 12 + [2] * 12)          # chunks of unequal length
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    assert chunk_documents(causal & (uneven[:, None] == uneven[None, :]), S) is None
    assert chunk_documents(causal, S) is None                        # plain causal: a band, not chunks
    per_batch = torch.stack([_chunked(S, 8), _chunked(S, 4)])
    assert chunk_documents(per_batch, S) is None                     # chunks that differ by batch row
