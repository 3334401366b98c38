"""Hugging Face training clients on sequence groups (issue 22), run on spawned ranks and in one process.

Each client function trains a tiny Llama (random weights from a config, sdpa attention, fp32)
through one client — ``transformers.Trainer``, TRL's ``SFTTrainer`` (packing on and off),
accelerate with a plain loop, a plain loop with ``DistributedSampler`` — and returns plain data:
per-step loss and gradient norm, the gradients at the first optimizer step, the parameters after
the last, evaluation results, and what the step communicated. ``compiled=True`` is the seqpar
run (``model.compile(backend=seqpar)`` + ``seqpar_compiler.hf``), on ranks launched like
torchrun; ``compiled=False`` is the same client in one process (the pytest process), the
reference. fp32 throughout: SFTConfig defaults to ``bf16=True`` (autocast), where one process
and seqpar both differ from fp32 by bf16 rounding (~1e-2 relative in gradients).
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))

VOCAB, S = 128, 32


def tokenizer():
    """A word-level tokenizer over ``t0 … t124`` built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def token_rows(n: int, seed: int, lengths=(S, S)):
    """``n`` rows of random token ids, each of a length drawn from ``lengths`` (inclusive)."""
    import datasets
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        L = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        rows.append({"input_ids": torch.randint(3, VOCAB, (L,), generator=g).tolist()})
    return datasets.Dataset.from_list(rows)


def llama():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   attn_implementation="sdpa", pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return transformers.LlamaForCausalLM(cfg)


def _compile(model, compiled: bool):
    if compiled:
        import seqpar_compiler as sp
        model.compile(backend=sp.backend(inner="aot_eager", schedule="zigzag"))
    return model


def _as_torchrun(rank: int, world: int) -> None:
    """What torchrun sets: accelerate and Trainer read the distributed setup from it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))


class _Recorder:
    """Trainer callback: the gradients at the first optimizer step (after DDP's reduction)."""

    def __init__(self):
        from transformers import TrainerCallback

        grads = self.grads = {}

        class Callback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                if state.global_step == 0:
                    grads.update({_name(n): p.grad.detach().clone() for n, p in model.named_parameters()
                                  if p.grad is not None})
        self.callback = Callback()


def _name(n: str) -> str:
    return n.replace("_orig_mod.", "").replace("module.", "")


def _params(model) -> dict:
    return {_name(n): p.detach().clone() for n, p in model.named_parameters()}


class _AllReduceCounter:
    """Elements all-reduced on this rank while active (every gloo all-reduce: seqpar's gradient sums,
    DDP's buckets, losses and control checks), from the profiler's record of each collective."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile
        self._prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        self.sizes = [int(torch.Size(e.input_shapes[0]).numel()) for e in self._prof.events()
                      if e.name == "gloo:all_reduce" and e.input_shapes and e.input_shapes[0]]


def _history(trainer) -> dict:
    logs = trainer.state.log_history
    return {"loss": [h["loss"] for h in logs if "loss" in h],
            "grad_norm": [h["grad_norm"] for h in logs if "grad_norm" in h]}


def _seqpar_warnings(records) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def trainer_client(rank: int, world: int, *, compiled: bool, steps: int = 2, ga: int = 2, per_device: int = 1,
                   checkpointing: bool = True, n_train: int = 12, n_eval: int = 4, count_allreduce: bool = False,
                   degree: int | None = None):
    """``transformers.Trainer`` made by ``sequence_parallel(Trainer)``: fixed-length rows padded by
    the LM collator (an all-ones attention mask), gradient accumulation, gradient checkpointing,
    AdamW, then ``evaluate()`` with a metric that counts the samples it saw."""
    import transformers
    from seqpar_compiler import hf as sp_hf
    if world > 1:
        _as_torchrun(rank, world)
    tok, model = tokenizer(), _compile(llama(), compiled)
    seen = []

    class Probe(sp_hf.sequence_parallel(transformers.Trainer)):
        def training_step(self, model, inputs, *args, **kwargs):
            seen.append(int(inputs["input_ids"].sum()))          # which batch this rank trained on
            return super().training_step(model, inputs, *args, **kwargs)

    def count(eval_pred):
        return {"samples": float(len(eval_pred.label_ids))}

    rec = _Recorder()
    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=per_device, per_device_eval_batch_size=2,
        gradient_accumulation_steps=ga, gradient_checkpointing=checkpointing, max_steps=steps, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        dataloader_drop_last=False, disable_tqdm=True)
    trainer = Probe(model=model, args=args, train_dataset=token_rows(n_train, 1), eval_dataset=token_rows(n_eval, 2),
                    data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False),
                    processing_class=tok, callbacks=[rec.callback], compute_metrics=count,
                    preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
                    **({"seqpar_degree": degree} if degree else {}))
    import seqpar_compiler as sp
    with sp.stats() as st:
        if count_allreduce:
            with _AllReduceCounter() as ar:
                trainer.train()
        else:
            trainer.train()
    metrics = trainer.evaluate()
    out = {**_history(trainer), "grads": rec.grads, "params": _params(model), "seen": seen, "n_eval": n_eval,
           "eval_loss": metrics["eval_loss"], "eval_samples": metrics.get("eval_samples"),
           "ring_calls": st.attention_forward_calls, "backwards": steps * ga,
           "n_params": sum(p.numel() for p in model.parameters())}
    if count_allreduce:
        out["allreduce_elements"] = sum(ar.sizes)
    return out


def sft_client(rank: int, world: int, *, compiled: bool, packing: bool, steps: int = 2, n_train: int = 16,
               n_eval: int = 4, gradient_checkpointing: bool = True, old_layer_input_search: bool = False,
               bf16: bool = False):
    """TRL ``SFTTrainer`` made by ``sequence_parallel(SFTTrainer)``, fp32. Packing: rows of 5-13
    tokens packed best-fit into 32-token bins and flattened padding-free (position ids restart
    per document); no packing: rows of exactly 16 tokens (no padding, so attention stays a ring).
    Also returns seqpar's log warnings (the remat-aware policy used to give up on packed graphs)."""
    import trl
    from seqpar_compiler import hf as sp_hf
    from seqpar_compiler.passes import checkpointing
    if world > 1:
        _as_torchrun(rank, world)
    checkpointing._LAYER_INPUT_THROUGH_VALUE = not old_layer_input_search
    capture = _LogCapture()
    logging.getLogger("seqpar").addHandler(capture)
    tok, model = tokenizer(), _compile(llama(), compiled)
    lengths = (5, 13) if packing else (16, 16)
    rec = _Recorder()
    args = trl.SFTConfig(output_dir=tempfile.mkdtemp(), packing=packing, max_length=32, per_device_train_batch_size=2,
                         per_device_eval_batch_size=2, max_steps=steps, learning_rate=1e-2,
                         lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no",
                         use_cpu=True, seed=0, bf16=bf16, dataloader_drop_last=True, disable_tqdm=True,
                         gradient_checkpointing=gradient_checkpointing)
    trainer = sp_hf.sequence_parallel(trl.SFTTrainer)(
        model=model, args=args, processing_class=tok, train_dataset=token_rows(n_train, 3, lengths),
        eval_dataset=token_rows(n_eval, 4, lengths), callbacks=[rec.callback])
    import seqpar_compiler as sp
    from seqpar_compiler.runtime.sequence_shard import gather_count
    before = gather_count()
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            with sp.stats() as st:
                trainer.train()
            metrics = trainer.evaluate()
    finally:
        logging.getLogger("seqpar").removeHandler(capture)
        checkpointing._LAYER_INPUT_THROUGH_VALUE = True
    return {**_history(trainer), "grads": rec.grads, "params": _params(model), "eval_loss": metrics["eval_loss"],
            "ring_calls": st.attention_forward_calls, "seqpar_warnings": _seqpar_warnings(capture.records),
            "warned": sorted({str(w.message) for w in said if "seqpar" in str(w.message)}),
            "eager_gathers": gather_count() - before}


def accelerate_client(rank: int, world: int, *, compiled: bool, steps: int = 3, ga: int = 2):
    """A hand-written accelerate loop: ``sp_hf.prepare(accelerator, model, optimizer, loader)``,
    shuffled fixed-length rows, gradient accumulation with ``accelerator.accumulate``, AdamW."""
    from accelerate import Accelerator
    from seqpar_compiler import hf as sp_hf
    if world > 1:
        _as_torchrun(rank, world)
    model = _compile(llama(), compiled)
    rows = torch.tensor(token_rows(steps * ga, 5)["input_ids"])
    loader = torch.utils.data.DataLoader(rows, batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ga)
    model, opt, loader = sp_hf.prepare(accelerator, model, opt, loader)
    losses, grads = [], {}
    for i, ids in enumerate(loader):
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            accelerator.backward(loss)
            losses.append(float(loss.detach()))
            if accelerator.sync_gradients and not grads:
                grads = {_name(n): p.grad.detach().clone() for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad()
    return {"loss": losses, "grads": grads, "params": _params(model)}


def plain_loop_client(rank: int, world: int, *, compiled: bool, steps: int = 2, degree: int | None = None,
                      batch: int = 1):
    """A plain loop: ``DistributedSampler(ds, *group_data_parallel())`` and, across groups, DDP over
    ``data_parallel_group()``. In one process: the groups' batches side by side (``batch`` rows)."""
    from seqpar_compiler import hf as sp_hf
    model = _compile(llama(), compiled)
    groups = sp_hf.group_data_parallel(degree).num_replicas
    rows = torch.tensor(token_rows(steps * groups * batch, 6)["input_ids"])
    sampler = torch.utils.data.DistributedSampler(rows, *sp_hf.group_data_parallel(degree), shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(rows, batch_size=batch, sampler=sampler)
    if compiled and sp_hf.group_data_parallel(degree).num_replicas > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, process_group=sp_hf.data_parallel_group(degree))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, grads, seen = [], {}, []
    for ids in loader:
        seen.append(int(ids.sum()))
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(float(loss.detach()))
        grads = grads or {_name(n): p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    return {"loss": losses, "grads": grads, "params": _params(model), "seen": seen}


CLIENTS = {"trainer": trainer_client, "sft": sft_client, "accelerate": accelerate_client, "plain": plain_loop_client}


def run_cases(rank: int, world: int, cases):
    """Every (name, client, kwargs) case in this one spawn; a case that raises is returned as text."""
    import time
    import traceback
    out = {}
    for name, client, kwargs in cases:
        torch._dynamo.reset()
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                out[name] = CLIENTS[client](rank, world, compiled=True, **kwargs)
        except Exception:  # noqa: BLE001 - one failing client must not hide the others' results
            out[name] = {"error": traceback.format_exc()}
        out[name]["seconds"] = time.perf_counter() - start
    return out


def reference(client: str, **kwargs):
    """The same client in this (undistributed) process."""
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return CLIENTS[client](0, 1, compiled=False, **kwargs)
