"""`make bench-train`: tokens/s of our DeepSpeed loop against a plain PyTorch loop, side by side.

Both train the same model (the default recipe's) on the same batches with AdamW: the plain loop
is `model.loss(x, y).backward(); clip; opt.step(); sched.step()`, ours is the full recipe loop
machinery (DeepSpeed engine, NaN guard, step skipper, metrics). The runs alternate in rounds so
that machine noise hits both equally; the ratio of medians is printed.

    python bench/bench_train.py [--steps 30] [--rounds 3] [key=value overrides...]
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
from trainer.loop import StepSkipper, build_model, param_groups  # noqa: E402
from trainer.recipe import load_recipe  # noqa: E402


def batches(recipe, vocab, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    mb, t = recipe.parallel.micro_batch, recipe.data.seq_len
    return [torch.randint(0, vocab, (mb, t + 1), generator=g) for _ in range(steps)]


def plain_loop(recipe, vocab, data):
    torch.manual_seed(0)
    model = build_model(recipe, vocab)
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


def our_loop(recipe, vocab, data, device):
    import deepspeed

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
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    dist = init_distributed("auto")
    vocab = recipe.model.vocab_size or recipe.data.vocab_size
    data = batches(recipe, vocab, args.steps)
    warm = data[:3]
    plain_loop(recipe, vocab, warm)
    our_loop(recipe, vocab, warm, dist.device)
    plain, ours = [], []
    for _ in range(args.rounds):
        plain.append(plain_loop(recipe, vocab, data))
        ours.append(our_loop(recipe, vocab, data, dist.device))
    p, o = statistics.median(plain), statistics.median(ours)
    print(f"\nmodel: {args.recipe} (micro-batch {recipe.parallel.micro_batch} x {recipe.data.seq_len} tokens), "
          f"{args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} threads, device {dist.device}")
    print("| loop | tokens/s (median) | rounds |")
    print("|---|---:|---|")
    print(f"| plain PyTorch (AdamW) | {p:,.0f} | {', '.join(f'{x:,.0f}' for x in plain)} |")
    print(f"| ours (DeepSpeed engine) | {o:,.0f} | {', '.join(f'{x:,.0f}' for x in ours)} |")
    print(f"\nratio ours / plain: {o / p:.3f}  (goal >= 0.90)")


if __name__ == "__main__":
    main()
