"""The GPU check's ONNX Runtime step: the exported decoder on the GPU's execution providers (TensorRT,
CUDA), its logits against the PyTorch model's, and its decode-step time against the CPU provider's.

A lent GPU machine has torch but not our export's tools (onnx, onnxscript, the ORT transformer
optimiser), so the ONNX folder and the reference are made here, in the project's environment, and
carried there with the wheels:

    .venv/bin/python bench/gpu_onnx.py prepare build/gpu-onnx          # here: export + reference.npz
    python bench/gpu_onnx.py check build/gpu-onnx --results DIR/x.md     # there (numpy + onnxruntime)

`prepare` exports gpt-tiny's architecture (4.27M parameters, seeded initialisation: the check is of
the runtime, not of a trained model's quality) with `make export FORMAT=onnx`'s code
(launch.onnx_export.write_onnx_folder: KV cache as inputs/outputs, ORT's fusions), then writes the
PyTorch model's fp32 logits for a prefill of left-padded rows and 16 greedy decode steps.

`check` runs the same prefill and steps on every provider asked for that this onnxruntime has
(default: TensorRT, CUDA, CPU), feeding the reference's tokens, and writes a marked section of the
results file: per provider the largest |logit - reference| and the median decode-step time at
batch 1 and 8. TensorRT gets optimisation profiles over the dynamic axes (batch, new tokens, past
length; without them it would build a new engine for every past length) and an engine cache in
the folder. A provider that is missing (onnxruntime without the GPU build, TensorRT libraries not
found) or fails to start is one line in the section, not a silent fallback: ORT itself would quietly
run the graph on the CPU, so each session's providers are read back and a session that did not get
the provider asked for counts as unavailable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SECTION_BEGIN = "<!-- gpu_onnx:begin -->"
SECTION_END = "<!-- gpu_onnx:end -->"
PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROMPTS = [[5, 17, 33, 2, 250, 9, 14, 81], [11], [40, 41, 42, 43, 44]]
STEPS = 16
# fp32 on a GPU: TF32 matmuls and other reductions than the CPU's; TensorRT may pick TF32 kernels too
TOLERANCE = {"CPUExecutionProvider": 1e-5, "CUDAExecutionProvider": 2e-3, "TensorrtExecutionProvider": 2e-2}


# ------------------------------------------------------------------------------------ prepare (here)


def prepare(out: Path, seed: int = 0) -> dict:
    """Export the decoder into `out` and write reference.npz (the PyTorch model's logits)."""
    import torch

    from launch.onnx_export import write_onnx_folder
    from trainer.model_setup import build_model
    from trainer.recipe import load_recipe

    recipe = load_recipe("gpt-tiny", ["model.kernels=torch", "model.dropout=0.0"])
    torch.manual_seed(seed)
    model = build_model(recipe, recipe.data.vocab_size).eval()
    manifest = write_onnx_folder(model, out, None, int8=False)
    tokens, logits = reference_logits(model, PROMPTS, STEPS)
    np.savez(out / "reference.npz", tokens=tokens, logits=logits)
    return manifest


def reference_logits(model, prompts: list[list[int]], steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy tokens [steps, B] and logits [steps + 1, B, V]: each row decoded alone by `model`."""
    import torch

    toks, outs = [], []
    with torch.no_grad():
        for p in prompts:
            seq = list(p)
            row_logits = []
            for _ in range(steps + 1):
                last = model(torch.tensor([seq]))[0, -1].float()
                row_logits.append(last.numpy())
                seq.append(int(last.argmax()))
            toks.append(seq[len(p):len(p) + steps])
            outs.append(np.stack(row_logits))
    return np.asarray(toks, np.int64).T, np.stack(outs, axis=1)


# ------------------------------------------------------------------------------------ check (there)


def trt_options(manifest: dict, folder: Path, max_batch: int = 8) -> dict:
    """TensorRT optimisation profiles over the decoder's dynamic axes, and an engine cache."""
    ctx = manifest["max_seq_len"]
    kv = f"{manifest['n_kv_head']}x%dx{manifest['head_dim']}"

    def shapes(b: int, t: int, past: int) -> str:
        dims = {"input_ids": f"{b}x{t}", "attention_mask": f"{b}x{past + t}"}
        dims.update({name: f"{b}x{kv % past}" for name in manifest["inputs"][2:]})
        return ",".join(f"{k}:{v}" for k, v in dims.items())

    cache = folder / "trt-cache"
    cache.mkdir(exist_ok=True)
    return {"trt_profile_min_shapes": shapes(1, 1, 0), "trt_profile_opt_shapes": shapes(max_batch, 1, ctx // 2),
            "trt_profile_max_shapes": shapes(max_batch, ctx, ctx), "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache)}


def session(folder: Path, manifest: dict, provider: str):
    """A session on `provider`, or the reason there is none (a string)."""
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        return f"not in this onnxruntime's providers ({', '.join(ort.get_available_providers())})"
    options = trt_options(manifest, folder) if provider == "TensorrtExecutionProvider" else {}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        s = ort.InferenceSession(str(folder / manifest["files"]["fp32"]), so, providers=[(provider, options)])
    except Exception as e:  # noqa: BLE001 - ORT raises its own types for missing CUDA/TensorRT libraries
        return f"failed to start: {str(e).splitlines()[0][:200]}"
    if s.get_providers()[0] != provider:  # ORT falls back to the CPU provider without raising
        return f"started on {s.get_providers()[0]} instead (its libraries did not load)"
    return s


def run_steps(sess, manifest: dict, prompts: list[list[int]], tokens: np.ndarray) -> list[np.ndarray]:
    """Left-padded prefill, then one reference token per row per step; logits [B, V] of each."""
    from model.onnx import prefill_feeds  # torch and this repo's model package: both on the GPU machine

    feeds = prefill_feeds(prompts, manifest["n_layer"], manifest["n_kv_head"], manifest["head_dim"])
    names = manifest["inputs"]
    out = []
    for i in range(len(tokens) + 1):
        logits, *past = sess.run(None, feeds)
        out.append(logits[:, -1])
        if i < len(tokens):
            mask = np.concatenate([feeds["attention_mask"], np.ones((len(prompts), 1), np.int64)], axis=1)
            feeds = {"input_ids": tokens[i][:, None], "attention_mask": mask, **dict(zip(names[2:], past))}
    return out


def step_ms(sess, manifest: dict, batch: int, past_len: int, repeats: int) -> float:
    """Median time of one decode step of `batch` rows after `past_len` cached positions."""
    names = manifest["inputs"]
    past = np.zeros((batch, manifest["n_kv_head"], past_len, manifest["head_dim"]), np.float32)
    feeds = {"input_ids": np.ones((batch, 1), np.int64), "attention_mask": np.ones((batch, past_len + 1), np.int64),
             **{n: past for n in names[2:]}}
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def check(folder: Path, providers: list[str], repeats: int = 50) -> list[dict]:
    manifest = json.loads((folder / "onnx.json").read_text())
    ref = np.load(folder / "reference.npz")
    rows = []
    for provider in providers:
        t0 = time.perf_counter()
        sess = session(folder, manifest, provider)
        row = {"provider": provider, "start_s": time.perf_counter() - t0}
        if isinstance(sess, str):
            rows.append({**row, "unavailable": sess})
            print(f"{provider}: {sess}", flush=True)
            continue
        got = run_steps(sess, manifest, PROMPTS, ref["tokens"])
        err = max(float(np.abs(g - r).max()) for g, r in zip(got, ref["logits"]))
        past = manifest["max_seq_len"] // 2
        row.update(max_abs_err=err, tolerance=TOLERANCE[provider], ok=err <= TOLERANCE[provider],
                   step_ms_b1=step_ms(sess, manifest, 1, past, repeats),
                   step_ms_b8=step_ms(sess, manifest, 8, past, repeats), past=past)
        print(f"{provider}: max |logit - torch| {err:.2e} (tolerance {row['tolerance']:g}), decode step "
              f"{row['step_ms_b1']:.3f} ms (batch 1), {row['step_ms_b8']:.3f} ms (batch 8)", flush=True)
        rows.append(row)
    return rows


def section(rows: list[dict], ort_version: str, device: str) -> str:
    cpu = next((r for r in rows if r["provider"] == "CPUExecutionProvider" and "unavailable" not in r), None)
    lines = [SECTION_BEGIN, f"## ONNX Runtime {ort_version}: the exported decoder (gpt-tiny shape, fp32) on {device}",
             "", "`bench/gpu_onnx.py check`: a left-padded prefill of 3 rows and 16 decode steps against the "
             "PyTorch model's logits; decode-step time (median) after half the context is cached.", "",
             "| provider | max abs error vs torch | step, batch 1 | step, batch 8 | vs CPU provider (batch 8) | "
             "session start |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "unavailable" in r:
            lines.append(f"| {r['provider']} | not measured: {r['unavailable']} | | | | |")
            continue
        speed = f"{cpu['step_ms_b8'] / r['step_ms_b8']:.2f}x" if cpu else "n/a"
        verdict = "within" if r["ok"] else "OUTSIDE"
        lines.append(f"| {r['provider']} | {r['max_abs_err']:.2e} ({verdict} {r['tolerance']:g}) | "
                     f"{r['step_ms_b1']:.3f} ms | {r['step_ms_b8']:.3f} ms | {speed} | {r['start_s']:.1f} s |")
    return "\n".join(lines + [SECTION_END]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="export the decoder and its reference logits (project environment)")
    pr.add_argument("out", type=Path)
    c = sub.add_parser("check", help="run the folder on the execution providers (numpy + onnxruntime)")
    c.add_argument("folder", type=Path)
    c.add_argument("--results", type=Path, required=True, help="markdown file that gets this step's section")
    c.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    c.add_argument("--repeats", type=int, default=50)
    a = p.parse_args(argv)
    if a.cmd == "prepare":
        m = prepare(a.out)
        print(f"wrote {a.out}: {m['files']['fp32']} ({m['n_layer']} layers) and reference.npz")
        return 0
    try:
        import onnxruntime as ort
    except ImportError:
        msg = "onnxruntime is not installed in this Python: the ONNX Runtime step is not measured"
        print(msg, file=sys.stderr)
        rows, version = [{"provider": pv, "unavailable": "onnxruntime not installed"} for pv in a.providers], "-"
    else:
        if not (a.folder / "reference.npz").exists():
            print(f"{a.folder} has no reference.npz: make it with `.venv/bin/python bench/gpu_onnx.py prepare "
                  f"{a.folder}` and carry it", file=sys.stderr)
            return 2
        rows, version = check(a.folder, a.providers, a.repeats), ort.__version__
    try:
        import torch
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    except ImportError:
        device = "?"
    from record_losses import write_marked_section  # bench/ is this script's first path entry

    a.results.parent.mkdir(parents=True, exist_ok=True)
    write_marked_section(a.results, section(rows, version, device), SECTION_BEGIN, SECTION_END)
    measured = [r for r in rows if "unavailable" not in r]
    return 1 if any(not r["ok"] for r in measured) else 0


if __name__ == "__main__":
    sys.exit(main())
