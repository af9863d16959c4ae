"""bench/gpu_onnx.py, the GPU check's ONNX Runtime step, rehearsed on the CPU provider."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.trainutil import REPO as ROOT


def _load_script():
    """bench/gpu_onnx.py as a module, without putting bench/ on sys.path for the other tests."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_onnx", ROOT / "bench" / "gpu_onnx.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_onnx = _load_script()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-onnx")
    gpu_onnx.prepare(out)
    return out


def test_reference_is_the_models_own_greedy_decoding(folder):
    """The reference's tokens are the PyTorch model's greedy continuation of each prompt alone."""
    ref = np.load(folder / "reference.npz")
    assert ref["tokens"].shape == (gpu_onnx.STEPS, len(gpu_onnx.PROMPTS))
    assert ref["logits"].shape[:2] == (gpu_onnx.STEPS + 1, len(gpu_onnx.PROMPTS))
    # each step's token is the argmax of the previous logits
    np.testing.assert_array_equal(ref["logits"][:-1].argmax(-1), ref["tokens"])


def test_cpu_provider_matches_torch_and_the_missing_providers_are_named(folder, tmp_path):
    results = tmp_path / "gpu.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_onnx.py"), "check", str(folder), "--results",
                        str(results), "--repeats", "5"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    text = results.read_text()
    assert text.count(gpu_onnx.SECTION_BEGIN) == 1
    row = next(line for line in text.splitlines() if line.startswith("| CPUExecutionProvider"))
    assert "(within 1e-05)" in row, row
    import onnxruntime as ort

    for provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        line = next(x for x in text.splitlines() if x.startswith(f"| {provider}"))
        if provider not in ort.get_available_providers():
            assert "not measured: not in this onnxruntime's providers" in line
    # a second run replaces the section instead of appending another
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_onnx.py"), "check", str(folder), "--results",
                    str(results), "--repeats", "2", "--providers", "CPUExecutionProvider"], check=True, cwd=ROOT,
                   capture_output=True, timeout=300)
    assert results.read_text().count(gpu_onnx.SECTION_BEGIN) == 1


def test_a_wrong_graph_is_caught(folder, tmp_path):
    """The comparison can fail: a reference of another model's logits is outside the tolerance (exit 1)."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(folder, other)
    ref = dict(np.load(folder / "reference.npz"))
    ref["logits"] = ref["logits"] + np.float32(1e-3) * torch.randn(ref["logits"].shape).numpy()
    np.savez(other / "reference.npz", **ref)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_onnx.py"), "check", str(other), "--results",
                        str(tmp_path / "x.md"), "--repeats", "2", "--providers", "CPUExecutionProvider"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1
    assert "OUTSIDE" in (tmp_path / "x.md").read_text()


@pytest.mark.parametrize("has_ort", [True, False], ids=["onnxruntime", "no-onnxruntime"])
def test_gpu_check_runs_the_onnx_step_on_a_bare_python(folder, tmp_path, has_ort):
    """`make gpu-check`'s onnx step as on the lent machine (torch and numpy, none of our pins): with
    onnxruntime the CPU provider is measured; without it the section says so and the step is ok."""
    from tests.gpu_machine import NOT_ON_GPU_MACHINE, bare_python_env

    hidden = NOT_ON_GPU_MACHINE + (() if has_ort else ("onnxruntime",))
    out = tmp_path / "results"
    e = bare_python_env(tmp_path / "site", hidden=hidden, PYTHON=sys.executable, GPU_CHECK_ALLOW_CPU="1",
                        GPU_CHECK_STEPS="onnx", GPU_CHECK_OUT=str(out), GPU_CHECK_ONNX=str(folder))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.split("=== summary", 1)[1].split("=== results", 1)[0]
    assert re.search(r"^onnx\s+ok\s", summary, re.M), summary
    text = next(out.glob("*.md")).read_text()
    cpu_row = next(line for line in text.splitlines() if line.startswith("| CPUExecutionProvider"))
    if has_ort:
        assert "(within 1e-05)" in cpu_row
    else:
        assert "not measured: onnxruntime not installed" in cpu_row
        assert "onnxruntime is not installed in this Python" in proc.stderr
