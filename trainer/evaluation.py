"""Validation loss, bits per byte, the gzip baseline, text samples and FLOP accounting."""

from __future__ import annotations

import gzip
import math

import torch

from .data import TokenBlocks, iterate_eval

# Dense bf16 peak (TFLOP/s) of GPUs we know; used for MFU unless train.peak_tflops is set.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


@torch.no_grad()
def evaluate(module, blocks: TokenBlocks, batch_size: int, max_batches: int | None, dp_rank: int,
             dp_world: int, device, group=None) -> tuple[float, int]:
    """Mean next-token loss (nats) over the validation blocks, sharded over data-parallel ranks
    and summed with all_reduce. Every rank runs the same number of forward passes (ZeRO-3 needs
    that); a rank with no batch left evaluates its last one again with weight 0."""
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
    """Loss per token converted to bits per UTF-8 byte with the validation split's tokens/byte."""
    return loss_nats / math.log(2) * val_num_tokens / val_bytes


def gzip_bits_per_byte(text: str) -> float:
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


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float, str]:
    """Peak FLOP/s for MFU and where the number comes from."""
    if override_tflops:
        return override_tflops * 1e12, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12, f"{key} bf16 dense peak"
        return 0.0, f"unknown GPU {name!r}: set train.peak_tflops"
    return cpu_peak_flops()


def cpu_peak_flops() -> tuple[float, str]:
    """Theoretical fp32 peak of the cores torch uses: threads x clock x FMA width (AVX-512: 32
    fp32 FMA lanes = 64 FLOP per cycle with two FMA units counted as one; AVX2: 32; else 8).
    A measured matmul would drift with whatever else the machine runs."""
    flags, mhz = "", 0.0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = line
                elif line.startswith("cpu MHz") and not mhz:
                    mhz = float(line.split(":")[1])
    except OSError:
        pass
    per_cycle = 64 if "avx512f" in flags else 32 if " fma" in flags else 8
    ghz = (mhz or 2000.0) / 1000
    threads = torch.get_num_threads()
    return threads * ghz * per_cycle * 1e9, f"CPU fp32 peak {threads} threads x {ghz:.1f} GHz x {per_cycle} FLOP/cycle"
