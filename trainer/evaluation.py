"""Validation loss, bits per byte, the gzip baseline and text samples."""

from __future__ import annotations

import gzip
import math

import torch

from .data import TokenBlocks, iterate_eval


@torch.no_grad()
def evaluate(module, blocks: TokenBlocks, batch_size: int, max_batches: int | None, dp_rank: int,
             dp_world: int, device, group=None) -> tuple[float, int]:
    """Mean next-token loss (nats) and the number of predicted tokens over the validation blocks
    of `iterate_eval` (all of them with `max_batches` None, else the fixed sample of `max_batches`
    batches spread evenly over the split), sharded over data-parallel ranks and summed with
    all_reduce. Every rank runs the same number of forward passes (ZeRO-3 needs that); a rank
    with no batch left evaluates its last one again with weight 0."""
    was_training = module.training
    module.eval()
    batches = list(iterate_eval(blocks, batch_size, max_batches))
    per_rank = math.ceil(len(batches) / dp_world)
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(per_rank):
        j = i * dp_world + dp_rank
        weight = 1.0 if j < len(batches) else 0.0
        x, y = batches[min(j, len(batches) - 1)]
        loss = module.loss(x.to(device), y.to(device)).double().cpu()
        n = y.numel()
        total += torch.tensor([loss.item() * n * weight, n * weight], dtype=torch.float64)
    if torch.distributed.is_initialized() and dp_world > 1:
        t = total.to(device)
        torch.distributed.all_reduce(t, group=group)
        total = t.cpu()
    module.train(was_training)
    return float(total[0] / total[1]), int(total[1])


@torch.no_grad()
def evaluate_pipeline(engine, blocks: TokenBlocks, batch_size: int, max_batches: int | None, dims) -> tuple[float, int]:
    """The same quantity through DeepSpeed's pipeline engine: each data-parallel pipeline takes
    its share of the batches; sums are reduced over the data-parallel group."""
    from model.pipeline import pipeline_eval

    batches = list(iterate_eval(blocks, batch_size, max_batches))
    mine = batches[dims.dp_rank::dims.dp]
    if mine:
        loss_sum, n = pipeline_eval(engine, mine)
    else:  # eval_batch is collective over the replica: take part, count nothing
        pipeline_eval(engine, batches[:1])
        loss_sum, n = 0.0, 0
    t = torch.tensor([loss_sum, n], dtype=torch.float64)
    if dims.dp > 1:
        dev = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        t = t.to(dev)
        torch.distributed.all_reduce(t, group=dims.dp_group)
        t = t.cpu()
    return float(t[0] / t[1]), int(t[1])


def bits_per_byte(loss_nats: float, val_num_tokens: int, val_bytes: int) -> float:
    """Bits per UTF-8 byte of the validation text: the mean loss per predicted token (nats),
    in bits, times the split's tokens per byte. Over the full split that is the text's total
    code length in bits over its bytes, with the few tokens no window predicts (the stream's first
    and the tail shorter than a window) charged the mean loss (tested against a float64
    recomputation)."""
    return loss_nats / math.log(2) * val_num_tokens / val_bytes


def gzip_bits_per_byte(text: str) -> float:
    """The `gzip -9` baseline: compressed bits per UTF-8 byte of `text` (header included)."""
    raw = text.encode("utf-8")
    return 8 * len(gzip.compress(raw, compresslevel=9)) / len(raw)


@torch.no_grad()
def sample_text(module, tokenizer, prompt: str, max_new_tokens: int, device, seed: int,
                eos_id: int | None) -> str:
    """A short sample at temperature 0.8, top-k 40, with its own generator so that sampling never
    disturbs the training RNG streams (exact resume depends on that)."""
    if max_new_tokens == 0:
        return ""
    ids = tokenizer.encode(prompt).ids or [eos_id]
    max_len = module.config.max_seq_len
    ids = ids[-(max_len - max_new_tokens):] if max_new_tokens < max_len else ids[-1:]
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = module.training
    module.eval()
    out = module.generate(torch.tensor([ids], device=device), max_new_tokens=min(max_new_tokens, max_len - len(ids)),
                          temperature=0.8, top_k=40, eos_id=eos_id, generator=gen)
    module.train(was_training)
    return tokenizer.decode(out[0].tolist())
