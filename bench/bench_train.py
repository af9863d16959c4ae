"""`make bench-train`: tokens/s of our DeepSpeed loop against a plain PyTorch loop, side by side.

All variants train the same model (the default recipe's) on the same batches with AdamW:
  - plain: `model.loss(x, y).backward(); clip; opt.step(); sched.step()` with PyTorch ops,
  - ours/torch: the recipe loop machinery (DeepSpeed engine, NaN guard, step skipper) with the
    PyTorch reference ops,
  - ours/fused: the same with the fused kernels (`model.kernels=fused`), when they build.
The variants alternate in rounds so machine noise hits all of them equally; medians and the
ratios to the plain loop are printed, with MFU against the measured matmul peak.

    python bench/bench_train.py [--steps 30] [--rounds 3] [--recipe gpt-tiny] [--out bench/results] [key=value overrides...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.distributed import init_distributed  # noqa: E402
from trainer.ds_config import deepspeed_config, lr_lambda  # noqa: E402
from trainer.model_setup import build_model, param_groups  # noqa: E402
from trainer.recipe import load_recipe  # noqa: E402
from trainer.step import StepSkipper  # noqa: E402


def batches(recipe, vocab, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    mb, t = recipe.parallel.micro_batch, recipe.data.seq_len
    return [torch.randint(0, vocab, (mb, t + 1), generator=g) for _ in range(steps)]


def with_kernels(recipe, mode):
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"kernels": mode})})


def plain_loop(recipe, vocab, data):
    torch.manual_seed(0)
    model = build_model(with_kernels(recipe, "torch"), vocab)
    o = recipe.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe))
    model.train()
    t0 = time.perf_counter()
    for b in data:
        loss = model.loss(b[:, :-1], b[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return len(data) * data[0].shape[0] * (data[0].shape[1] - 1) / (time.perf_counter() - t0)


def our_loop(recipe, vocab, data, device, kernels="torch"):
    import deepspeed

    recipe = with_kernels(recipe, kernels)
    torch.manual_seed(0)
    model = build_model(recipe, vocab).to(device)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, recipe.optim.weight_decay),
        config=deepspeed_config(recipe, 1, device.type),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe)))
    skipper = StepSkipper(engine)
    engine.train()
    t0 = time.perf_counter()
    for b in data:
        loss = engine(b[:, :-1], targets=b[:, 1:])
        finite = bool(torch.isfinite(loss.detach()).item())
        engine.backward(loss)
        skipper.skip_next = not finite
        engine.step()
    return len(data) * data[0].shape[0] * (data[0].shape[1] - 1) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--recipe", default="gpt-tiny")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                    help="folder for train-<device>.md")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    dist = init_distributed("auto")
    vocab = recipe.model.vocab_size or recipe.data.vocab_size
    data = batches(recipe, vocab, args.steps)
    warm = data[:3]
    variants = {"plain PyTorch loop (torch ops)": lambda d: plain_loop(recipe, vocab, d),
                "ours, DeepSpeed engine, torch ops": lambda d: our_loop(recipe, vocab, d, dist.device, "torch")}
    try:
        from model.kernels import build

        build.load(dist.device.type)
        variants["ours, DeepSpeed engine, fused kernels"] = lambda d: our_loop(recipe, vocab, d, dist.device, "fused")
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        print(f"fused kernels unavailable, row skipped: {e}")
    for fn in variants.values():
        fn(warm)
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            results[name].append(fn(data))
    from model import GPT, GPTConfig
    from model.flops import peak_flops

    peak, source = peak_flops(dist.device, recipe.train.peak_tflops)
    m = recipe.model
    flops = GPT(GPTConfig(style=m.style, vocab_size=vocab, n_layer=m.n_layer, n_head=m.n_head, n_kv_head=m.n_kv_head,
                          d_model=m.d_model, max_seq_len=m.max_seq_len)).flops_per_token(recipe.data.seq_len)
    base = statistics.median(results["plain PyTorch loop (torch ops)"])
    lines = [f"model: {args.recipe} (micro-batch {recipe.parallel.micro_batch} x {recipe.data.seq_len} tokens), "
             f"{args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} threads, device {dist.device}, "
             f"MFU against {source} {peak / 1e12:.2f} TFLOP/s", "",
             "| loop | tokens/s (median) | MFU | vs plain | rounds |", "|---|---:|---:|---:|---|"]
    for name, xs in results.items():
        med = statistics.median(xs)
        lines.append(f"| {name} | {med:,.0f} | {flops * med / peak:.1%} | {med / base:.3f} | "
                     f"{', '.join(f'{x:,.0f}' for x in xs)} |")
    ours = statistics.median(results["ours, DeepSpeed engine, torch ops"])
    lines += ["", f"ratio ours / plain (same ops): {ours / base:.3f}  (goal >= 0.90)"]
    text = "\n".join(lines) + "\n"
    print("\n" + text, end="")
    out = Path(args.out) / f"train-{dist.device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Training step: our loop vs a plain PyTorch loop (`make bench-train`)\n\n" + text)

if __name__ == "__main__":
    main()
