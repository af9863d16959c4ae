"""Int8 weight-only quantisation of a model's linear layers, for serving.

Each `nn.Linear` weight W [out, in] becomes int8 values q and one float scale per output row,
s = max|W_row| / 127, q = round(W / s) (symmetric, per channel; |W - q s| <= s / 2 elementwise).
The forward computes (x @ q^T) * s + b in the activations' dtype: the same as a linear layer with
weight q s, with a quarter of the weight memory of fp32 (activations are not quantised). It is a
memory saving first: on a CPU the int8 -> float conversion of every step costs time that an int8
matmul kernel (ONNX Runtime's, `launch.onnx_export`) does not.

A tied output head (`lm_head` sharing `tok_emb`'s weight) stays in float: quantising it would need
a second copy of the embedding matrix, undoing the saving.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Int8Linear", "quantize_int8_weight_only"]


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x):
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8_weight_only(model: nn.Module) -> dict[str, int]:
    """Replace every `nn.Linear` of `model` in place by an `Int8Linear` (a tied head excepted);
    returns {"layers": replaced, "bytes_before": weight bytes, "bytes_after": ...}."""
    tied = getattr(getattr(model, "lm_head", None), "weight", None) is getattr(getattr(model, "tok_emb", None),
                                                                            "weight", object())
    before = after = layers = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or (tied and child is getattr(model, "lm_head", None)):
                continue
            q = Int8Linear(child)
            setattr(parent, name, q)
            before += child.weight.numel() * child.weight.element_size()
            after += q.qweight.numel() + q.scale.numel() * q.scale.element_size()
            layers += 1
    return {"layers": layers, "bytes_before": before, "bytes_after": after}
