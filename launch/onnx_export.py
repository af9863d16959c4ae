"""A model as an ONNX Runtime folder (`make export ... FORMAT=onnx|onnx-int8`) and a decoder over it.

The folder holds
    model.onnx        the decoder with its KV cache as inputs/outputs (`model.onnx`'s docstring), its
                      attention as ONNX Runtime's MultiHeadAttention op where the model has one kv head
                      per query head (GPT-2 style; Llama without grouped kv heads), after ONNX Runtime's
                      transformer optimiser (its fusions: SkipLayerNormalization, ...); the graph as
                      traced is not kept
    model.int8.onnx   (onnx-int8) the same graph with its MatMul weights quantised to int8 by
                      `onnxruntime.quantization.quantize_dynamic` (activations quantised per call)
    onnx.json         what a runtime needs: names, layer/head sizes, vocabulary, which files
    tokenizer.json    the run's tokenizer, when it has one

`OrtDecoder` runs such a folder: prefill, then one token per step, feeding `present` back as `past`.
Why the optimiser runs before quantisation: the traced graph's MatMuls take transposed weights
that `quantize_dynamic` leaves as fp32 Transpose + int8 MatMul chains, slower than fp32 (measured:
a GPT-2-124M decode step 28 ms int8 vs 18 ms fp32 on 2 cores); after the optimiser the weights are
plain initialisers and int8 takes 5.6 ms.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from model.onnx import export_decoder, fused_attention_applies, input_names, output_names, prefill_feeds

FORMATS = ("hf", "onnx", "onnx-int8")
MANIFEST = "onnx.json"


def write_onnx_folder(model, out_dir: str | Path, tokenizer_path: Path | None, int8: bool) -> dict:
    """Export `model` (GPT, CPU, kernels='torch') into `out_dir`; returns the manifest."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    traced = out / "traced.onnx"
    fused_attention = fused_attention_applies(model)
    export_decoder(model, traced, fused=fused_attention)
    # The optimiser's "gpt2" fusions match the pre-norm decoder blocks of both styles. Its attention
    # fusions do not match the traced masked SDPA (kept for grouped kv heads); the export emits
    # MultiHeadAttention itself where it applies (model/onnx.py), which the optimiser leaves alone. Its
    # GELU fusions are off: they rewrite the graph's Gelu(approximate="tanh") as BiasGelu, which is the
    # erf GELU (measured on gpt-tiny's shape: logits 1.7e-4 from PyTorch's instead of 1.4e-6, at the
    # same speed as leaving the Gelu node alone; ORT's session turns that Gelu into its FastGelu, the
    # same tanh form, by itself).
    options = FusionOptions("gpt2")
    options.enable_gelu = options.enable_bias_gelu = False
    opt = optimizer.optimize_model(str(traced), model_type="gpt2", num_heads=c.n_head, hidden_size=c.d_model,
                                   opt_level=1, optimization_options=options)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.save_model_to_file(str(out / "model.onnx"))
    traced.unlink()
    files = {"fp32": "model.onnx"}
    if int8:
        quantize_dynamic(str(out / "model.onnx"), str(out / "model.int8.onnx"), weight_type=QuantType.QInt8)
        files["int8"] = "model.int8.onnx"
    if tokenizer_path is not None and tokenizer_path.exists():
        shutil.copyfile(tokenizer_path, out / "tokenizer.json")
    manifest = {"format": "onnx-int8" if int8 else "onnx", "files": files, "n_layer": c.n_layer,
                "n_kv_head": model.blocks[0].attn.n_kv_head, "head_dim": c.head_dim,
                "vocab_size": c.vocab_size, "max_seq_len": c.max_seq_len, "style": c.style,
                "inputs": input_names(c.n_layer), "outputs": output_names(c.n_layer), "fused_ops": fused,
                "attention": "MultiHeadAttention" if fused_attention else "sdpa"}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


class OrtDecoder:
    """Greedy/step decoding over an exported folder with ONNX Runtime on the CPU.

    `logits(prompts)` runs the prefill of left-padded rows and returns the last position's logits;
    `step(tokens)` appends one token per row and returns its logits. State: the mask and `present`."""

    def __init__(self, folder: str | Path, variant: str = "fp32", threads: int | None = None):
        import onnxruntime as ort

        folder = Path(folder)
        self.manifest = json.loads((folder / MANIFEST).read_text())
        if variant not in self.manifest["files"]:
            raise ValueError(f"{folder} has no {variant} model; it has {sorted(self.manifest['files'])}")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3  # no warnings about unused initialisers on every load
        self.session = ort.InferenceSession(str(folder / self.manifest["files"][variant]), so,
                                            providers=["CPUExecutionProvider"])
        self.past: list[np.ndarray] = []
        self.mask: np.ndarray | None = None

    def prefill(self, prompts: list[list[int]]) -> np.ndarray:
        """Left-pad `prompts`, run them, return logits [B, T, V] (padding positions included)."""
        m = self.manifest
        feeds = prefill_feeds(prompts, m["n_layer"], m["n_kv_head"], m["head_dim"])
        return self._run(feeds["input_ids"], feeds["attention_mask"], [feeds[n] for n in m["inputs"][2:]])

    def step(self, tokens: list[int]) -> np.ndarray:
        """One token per row after what came before; returns logits [B, V]."""
        mask = np.concatenate([self.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        return self._run(np.asarray(tokens, np.int64)[:, None], mask, self.past)[:, -1]

    def _run(self, ids, mask, past) -> np.ndarray:
        names = self.manifest["inputs"]
        feeds = {"input_ids": ids, "attention_mask": mask, **dict(zip(names[2:], past))}
        # Plain run, numpy in and out. IO binding (present kept as OrtValues and bound as the next
        # past) was slower here: binding 2 + 2L inputs and 1 + 2L outputs from Python each step cost
        # more than the copies it saves (gpt-tiny's shape: 0.90 vs 0.85 ms a step).
        logits, *present = self.session.run(None, feeds)
        self.past, self.mask = present, mask
        return logits

    def greedy(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        """`n` greedy tokens after each prompt (no eos)."""
        last = self.prefill(prompts)[:, -1]
        out: list[list[int]] = [[] for _ in prompts]
        for i in range(n):
            tok = last.argmax(-1).tolist()
            for r, t in enumerate(tok):
                out[r].append(int(t))
            if i < n - 1:
                last = self.step(tok)
        return out
