"""A user's script, as the dump tool runs it: one training step of the example GPT (one layer)
compiled with backend="seqpar" on two gloo ranks spawned here. Options come from SEQPAR_* env."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "examples"))


def train_step(rank, world):
    import torch
    import seqpar_compiler  # noqa: F401  (registers the backend)
    from models import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1))
    g = torch.Generator().manual_seed(1)
    idx, tgt = torch.randint(0, 256, (2, 32), generator=g), torch.randint(0, 256, (2, 32), generator=g)
    logits, loss = torch.compile(model, backend="seqpar")(idx, tgt)
    loss.backward()
    return float(loss)


if __name__ == "__main__":
    from seqpar_compiler.launch import run_ranks
    losses = run_ranks(train_step, 2, timeout=300)
    print("losses", losses)
