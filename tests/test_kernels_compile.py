"""The fused kernels under torch.compile(fullgraph=True) (CPU library; the CUDA ops take the same
path, see model/kernels/ops.py).

Each op is compiled alone with the inductor backend and compared with the same op run eagerly:
outputs and every gradient (random upstream gradients, per token for the per-token losses),
float32 and bfloat16.  The compiled graph must contain the kernel ops
(forward and backward), so a silent fallback to the PyTorch reference fails.  Both runs execute
the same kernels; only the glue around them (dtype casts, the loss mean) is compiled, so the
tolerances are tight: float32 rtol 1e-5 / atol 1e-6 x max|eager|, bfloat16 one bf16 rounding
(rtol 8e-3) / atol 1e-5 x max|eager|.

Tiny GPTs (gpt2 and llama style, kernels=fused) compiled with fullgraph=True match eager loss
(rel 1e-5) and parameter gradients (relative error 1e-4, floored at 1% of the median gradient
norm, as in test_kernels.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
import torch.fx
from torch._dynamo.testing import CompileCounterWithBackend

from model.kernels import build, get_ops, reference
from model.kernels import ops as kops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (8e-3, 1e-5)}  # rtol, atol (x max|eager|)


@pytest.fixture(scope="module")
def fused():
    build.load("cpu")  # a build failure is a test failure here
    torch._dynamo.reset()
    yield get_ops("fused")
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Every test compiles its own function (often the same code object with another closure):
    # start from empty caches so no test runs into dynamo's recompile limit.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def graph_ops(counter: CompileCounterWithBackend) -> set[str]:
    """Every call_function target in the captured graphs, autograd.Function bodies included."""
    names = set()
    for gm in counter.graphs:
        for m in gm.modules():
            if isinstance(m, torch.fx.GraphModule):
                names |= {str(n.target).removesuffix(".default") for n in m.graph.nodes if n.op == "call_function"}
    return names


def compile_full(fn):
    counter = CompileCounterWithBackend("inductor")
    return torch.compile(fn, backend=counter, fullgraph=True), counter


def run(fn, inputs: dict, grad_names, seed=0):
    leaves = {k: (v.detach().clone().requires_grad_(k in grad_names) if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items()}
    out = fn(**leaves)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed + 7)
    ups = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, ups)
    return [o.detach() for o in outs], {k: leaves[k].grad for k in grad_names}


def assert_same(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    scale = expected.detach().double().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * max(scale, 1e-30),
                               msg=lambda m: f"{what} ({dtype}): {m}")


def _cases(dtype):
    """name -> (fn(ops, **inputs), inputs, grad names, kernel ops that must be in the graph)."""
    B, T, D = 3, 5, 40
    x, r = randn(B, T, D, dtype=dtype, seed=1, scale=2.0), randn(B, T, D, dtype=dtype, seed=2)
    w, b = randn(D, dtype=dtype, seed=3), randn(D, dtype=dtype, seed=4)
    fused_gu = randn(B, T, 2 * D, dtype=dtype, seed=5)  # gate/up as strided chunks of one GEMM
    Hq, Hk, Tr, Dh = 4, 2, 6, 16
    q = randn(2, Tr, Hq, Dh, dtype=dtype, seed=6).transpose(1, 2)  # [B, H, T, D], unit last stride
    k = randn(2, Tr, Hk, Dh, dtype=dtype, seed=7).transpose(1, 2)
    cos, sin = reference.rope_cache(Tr, Dh, 10000.0, dtype=dtype)
    V = 77
    logits = randn(2, 9, V, dtype=dtype, seed=8, scale=3.0)
    targets = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(9))
    targets[0, :3] = -1  # ignore_index=-1 below
    targets[1, 4] = -1
    return {
        "layer_norm_residual": (lambda ops, x, r, w, b: ops.layer_norm(x, w, b, 1e-5, residual=r),
                                dict(x=x, r=r, w=w, b=b), ["x", "r", "w", "b"], ["layer_norm_fwd", "layer_norm_bwd"]),
        # only y leaves the graph: the residual sum's gradient is not materialised by the caller
        "layer_norm_y_only": (lambda ops, x, r, w: ops.layer_norm(x, w, None, 1e-5, residual=r)[0] * 2,
                              dict(x=x, r=r, w=w), ["x", "r", "w"], ["layer_norm_fwd", "layer_norm_bwd"]),
        "rms_norm_residual": (lambda ops, x, r, w: ops.rms_norm(x, w, 1e-6, residual=r),
                              dict(x=x, r=r, w=w), ["x", "r", "w"], ["rms_norm_fwd", "rms_norm_bwd"]),
        "rms_norm_no_weight": (lambda ops, x: ops.rms_norm(x, None, 1e-6),
                               dict(x=x), ["x"], ["rms_norm_fwd", "rms_norm_bwd"]),
        "bias_gelu": (lambda ops, x, b: ops.bias_gelu(x, b), dict(x=x, b=b), ["x", "b"],
                      ["bias_gelu_fwd", "bias_gelu_bwd"]),
        "swiglu_strided": (lambda ops, gu: ops.swiglu(*gu.chunk(2, dim=-1)), dict(gu=fused_gu), ["gu"],
                           ["swiglu_fwd", "swiglu_bwd"]),
        "rope_gqa": (lambda ops, q, k, cos, sin: ops.rope(q, k, cos, sin), dict(q=q, k=k, cos=cos, sin=sin),
                     ["q", "k"], ["rope_fwd"]),
        "cross_entropy": (lambda ops, logits, t: ops.cross_entropy(logits, t, ignore_index=-1),
                          dict(logits=logits, t=targets), ["logits"], ["ce_fwd", "ce_bwd"]),
        # in place eagerly; written out of place under compile (same gradient)
        "cross_entropy_inplace": (lambda ops, logits, t: ops.cross_entropy(logits * 1, t, ignore_index=-1,
                                                                          inplace_backward=True),
                                  dict(logits=logits, t=targets), ["logits"], ["ce_fwd", "ce_bwd"]),
        # per-token outputs: `run` backpropagates a random gradient per token; row-strided views
        "token_cross_entropy": (lambda ops, logits, t: ops.token_cross_entropy(logits[:, :-1], t[:, 1:],
                                                                              ignore_index=-1),
                                dict(logits=logits, t=targets), ["logits"], ["ce_fwd", "ce_bwd"]),
        "token_entropy": (lambda ops, logits: ops.token_entropy(logits[:, :-1]), dict(logits=logits), ["logits"],
                          ["ce_ent_fwd", "ce_ent_bwd"]),
        "token_logprob_and_entropy": (lambda ops, logits, t: ops.token_logprob_and_entropy(logits, t, ignore_index=-1),
                                      dict(logits=logits, t=targets), ["logits"], ["ce_ent_fwd", "ce_ent_bwd"]),
    }


CASE_NAMES = list(_cases(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_op_compiled_matches_eager(fused, case, dtype):
    fn, inputs, grad_names, kernel_ops = _cases(dtype)[case]

    def op(**kw):
        return fn(fused, **kw)

    compiled, counter = compile_full(op)
    outs_c, grads_c = run(compiled, inputs, grad_names)
    outs_e, grads_e = run(op, inputs, grad_names)
    assert counter.frame_count == 1
    in_graph = graph_ops(counter)
    for name in kernel_ops:
        assert f"llmk_cpu.{name}" in in_graph, f"{name} not in the compiled graph: {sorted(in_graph)}"
    for i, (a, e) in enumerate(zip(outs_c, outs_e)):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_same(a, e, dtype, f"{case} output {i}")
    for k in grad_names:
        assert grads_c[k] is not None and grads_c[k].dtype == grads_e[k].dtype
        assert_same(grads_c[k], grads_e[k], dtype, f"{case} grad {k}")


def test_fake_impls_cover_every_op(fused):
    """KERNEL_OPS is every op of the library, and each has a fake/meta kernel (shape-only run)."""
    lib = build.load("cpu")
    kops.register_fake_impls(lib)  # idempotent
    schemas = {s.name.split("::", 1)[1]: s for s in torch._C._jit_get_all_schemas()
               if s.name.startswith("llmk_cpu::")}
    assert set(schemas) == set(kops.KERNEL_OPS)
    for name, schema in schemas.items():
        args = []
        for a in schema.arguments:
            t = str(a.type)
            if t in ("Tensor", "Optional[Tensor]"):
                args.append(torch.empty(2, 3, device="meta") if t == "Tensor" else None)
            else:
                args.append({"float": 1e-5, "int": 0, "bool": False}[t])
        assert getattr(lib, name)(*args) is None, name


def test_fallback_under_compile(fused):
    """Inputs the kernels do not cover trace the reference (no graph break), noted at trace time."""
    kops.reset_warnings()
    x, b = randn(4, 9, dtype=torch.float64, seed=20), randn(9, dtype=torch.float64, seed=21)
    compiled, counter = compile_full(lambda x, b: fused.bias_gelu(x, b))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = compiled(x, b)
    assert any("bias_gelu uses the PyTorch reference" in str(r.message) for r in rec), [str(r.message) for r in rec]
    assert not any("llmk_cpu" in n for n in graph_ops(counter))
    torch.testing.assert_close(y, reference.bias_gelu(x, b))
    kops.reset_warnings()


def test_first_use_inside_compiled_function_builds_and_runs():
    """A process whose first kernel call is traced loads the library during tracing (cached build
    here: the load itself still happens inside dynamo) and runs the fused ops."""
    code = """
import torch
import model.kernels.build as b
from model.kernels import get_ops, reference
ops = get_ops("fused")
f = torch.compile(lambda x, u: ops.swiglu(x, u), fullgraph=True)
x = torch.randn(5, 12, requires_grad=True)
u = torch.randn(5, 12)
assert not b._LOADED
y = f(x, u)
assert "cpu" in b._LOADED
y.sum().backward()
torch.testing.assert_close(y, reference.swiglu(x, u))
print("ok")
"""
    build.load("cpu")  # make sure the cached build exists; the child only loads it
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_vocab_parallel_cross_entropy_compiles(fused):
    """One-rank group: the all-reduces trace as functional collectives; kernel path, in place."""
    import torch.distributed as dist

    from model.kernels import vocab_parallel_cross_entropy

    assert not dist.is_initialized()
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/init", rank=0, world_size=1)
        try:
            full = randn(11, 50, seed=30, scale=3.0)
            t = torch.randint(0, 50, (11,), generator=torch.Generator().manual_seed(31))
            t[3] = -100

            def loss(logits):
                return vocab_parallel_cross_entropy(logits * 1, t, 0, None, -100, use_kernels=True,
                                                    inplace_backward=True)

            compiled, counter = compile_full(loss)
            outs_c, grads_c = run(lambda logits: compiled(logits), dict(logits=full), ["logits"])
            outs_e, grads_e = run(loss, dict(logits=full), ["logits"])
            assert "llmk_cpu.ce_bwd" in graph_ops(counter)
            assert_same(outs_c[0], outs_e[0], torch.float32, "loss")
            assert_same(grads_c["logits"], grads_e["logits"], torch.float32, "grad")
        finally:
            dist.destroy_process_group()


def test_vocab_parallel_token_losses_compile(fused):
    """One-rank group: the per-token vocabulary-parallel ops (the combined one, then the CE alone,
    whose backward is ce_bwd with a per-row scale) trace with their all-reduces, kernels in the
    graph, and match eager."""
    import torch.distributed as dist

    from model.kernels import vocab_parallel_token_cross_entropy, vocab_parallel_token_logprob_and_entropy

    assert not dist.is_initialized()
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/init", rank=0, world_size=1)
        try:
            full = randn(2, 6, 50, seed=32, scale=3.0)
            t = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(33))
            t[0, 3] = -100

            def both(logits):
                lp, h = vocab_parallel_token_logprob_and_entropy(logits, t, 0, None, use_kernels=True)
                return lp, h

            def ce(logits):
                return vocab_parallel_token_cross_entropy(logits, t, 0, None, use_kernels=True)

            for fn, kernel_ops in ((both, ("ce_ent_fwd", "ce_ent_bwd")), (ce, ("ce_fwd", "ce_bwd"))):
                torch._dynamo.reset()
                compiled, counter = compile_full(fn)
                outs_c, grads_c = run(compiled, dict(logits=full), ["logits"])
                outs_e, grads_e = run(fn, dict(logits=full), ["logits"])
                assert counter.frame_count == 1
                for name in kernel_ops:
                    assert f"llmk_cpu.{name}" in graph_ops(counter), name
                for a, e in zip(outs_c, outs_e):
                    assert_same(a, e, torch.float32, "output")
                assert_same(grads_c["logits"], grads_e["logits"], torch.float32, "grad")
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_gpt_compiled_matches_eager(fused, style):
    from model import GPT, GPTConfig

    cfg = dict(style=style, vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=16, kernels="fused")
    if style == "llama":
        cfg["n_kv_head"] = 2
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg))
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    y = x.roll(-1, dims=1)
    y[0, :3] = -100
    compiled, counter = compile_full(model)
    results = {}
    for name, fn in (("eager", model), ("compiled", compiled)):
        model.zero_grad(set_to_none=True)
        loss = fn(x, y)
        loss.backward()
        results[name] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert counter.frame_count == 1
    norm_op = "layer_norm" if style == "gpt2" else "rms_norm"
    mlp_op = "bias_gelu" if style == "gpt2" else "swiglu"
    in_graph = graph_ops(counter)
    for name in (f"{norm_op}_fwd", f"{norm_op}_bwd", f"{mlp_op}_fwd", "ce_fwd", "ce_bwd") + (
            ("rope_fwd",) if style == "llama" else ()):
        assert f"llmk_cpu.{name}" in in_graph, name
    (l_e, g_e), (l_c, g_c) = results["eager"], results["compiled"]
    assert l_c == pytest.approx(l_e, rel=1e-5)
    floor = 0.01 * torch.stack([g.norm() for g in g_e.values()]).median()
    for n, g in g_e.items():
        err = (g_c[n] - g).norm() / torch.maximum(g.norm(), floor)
        assert err <= 1e-4, f"{n}: relative grad error {err:.3g}"
