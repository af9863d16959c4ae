"""`--engine onnxruntime`: serve a folder exported with `make export FORMAT=onnx` through ONNX Runtime.

`load_onnx(folder)` reads the export's manifest (`onnx.json`) and tokenizer into a `LoadedRun` with one
model named after the folder. `OrtEngine` gives the scheduler `model.generate.DecodeEngine`'s interface
(prefill, decode, release, free_slots) over one `launch.onnx_export.OrtDecoder` session: each slot keeps its
own ORT state (past keys/values and mask, batch 1) and is stepped on its own, so requests interleave at
token boundaries but are **not batched** into one forward (the exported graph takes one left-padded batch
whose rows share a length; continuous batching over it is not built). Sampling is DecodeEngine's own
(`model.generate.sample_tokens`, one seeded generator per row), so a seed gives the same draws from the
same logits; the logits are ONNX Runtime's, so texts can differ from the torch engine's where the two
round differently (fp32) or where int8 changes the model (`--quantize int8` picks the export's int8 file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.generate import SamplingParams, StepOutput, sample_tokens
from trainer.data import EOS_TOKEN
from trainer.errors import UsageError

from .loader import LoadedRun, ServedModel

__all__ = ["OrtEngine", "load_onnx"]

MANIFEST = "onnx.json"


def load_onnx(folder: str | Path) -> LoadedRun:
    path = Path(folder)
    if not (path / MANIFEST).is_file():
        raise UsageError(f"RUN={folder}: not an ONNX export (no {MANIFEST}; `make export FORMAT=onnx` writes one)")
    manifest = json.loads((path / MANIFEST).read_text())
    if not (path / "tokenizer.json").is_file():
        raise UsageError(f"{path}: the export has no tokenizer.json")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    model = ServedModel(path.name, "model", None, tok, manifest["style"], int(manifest["max_seq_len"]),
                        tok.token_to_id(EOS_TOKEN))
    return LoadedRun(path, path, {}, {path.name: model})


@dataclass
class _Slot:
    params: SamplingParams
    generator: torch.Generator | None
    length: int  # tokens in the ORT state
    past: list
    mask: np.ndarray
    last: int = -1
    n_generated: int = 0
    finish_reason: str | None = None


class OrtEngine:
    def __init__(self, folder: str | Path, variant: str, max_slots: int, threads: int | None = None):
        from launch.onnx_export import OrtDecoder

        if variant not in json.loads((Path(folder) / MANIFEST).read_text())["files"]:
            raise UsageError(f"{folder}: the export has no {variant} model (`make export FORMAT=onnx-int8` writes one for --quantize int8)")
        self.decoder = OrtDecoder(folder, variant, threads=threads)
        self.max_slots = max_slots
        self.max_len = int(self.decoder.manifest["max_seq_len"])
        self._slots: list[_Slot | None] = [None] * max_slots

    def free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self._slots) if s is None]

    def release(self, slot: int) -> None:
        self._slots[slot] = None

    def prefill(self, prompts, slots, params, adapters=None) -> list[StepOutput]:
        if adapters and any(a is not None for a in adapters):
            raise ValueError("the ONNX engine serves no adapters")
        outs = []
        for prompt, slot, p in zip(prompts, slots, params):
            if self._slots[slot] is not None:
                raise ValueError(f"slot {slot} is in use")
            logits = self.decoder.prefill([list(prompt)])[:, -1]
            gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else p.generator
            s = _Slot(p, gen, len(prompt), self.decoder.past, self.decoder.mask)
            self._slots[slot] = s
            outs.append(self._emit(slot, s, logits))
        return outs

    def decode(self, slots) -> list[StepOutput]:
        outs = []
        for slot in slots:
            s = self._slots[slot]
            self.decoder.past, self.decoder.mask = s.past, s.mask
            logits = self.decoder.step([s.last])
            s.past, s.mask, s.length = self.decoder.past, self.decoder.mask, s.length + 1
            outs.append(self._emit(slot, s, logits))
        return outs

    def _emit(self, slot: int, s: _Slot, logits: np.ndarray) -> StepOutput:
        tokens, logprobs, entropies = sample_tokens(torch.from_numpy(np.ascontiguousarray(logits)).float(),
                                                    [s.params], [s.generator])
        tok = int(tokens[0])
        s.last = tok
        s.n_generated += 1
        p = s.params
        if tok in p.eos_ids:
            s.finish_reason = "eos"
        elif tok in p.stop_ids:
            s.finish_reason = "stop"
        elif s.n_generated >= p.max_new_tokens or s.length + 1 >= self.max_len:
            s.finish_reason = "length"
        return StepOutput(slot, tok, float(logprobs[0]), float(entropies[0]), s.finish_reason is not None,
                          s.finish_reason)
