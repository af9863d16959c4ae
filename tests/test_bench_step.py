"""bench/bench_step.py (training step: plain GPT vs ours) and bench/gpu_check.sh, run as on the GPU machine.

The module's fixture runs the GPU check's CPU rehearsal (`GPU_CHECK_ALLOW_CPU=1 bash
bench/gpu_check.sh`: kernel build, the `gpu` tests (default and tuned launch shapes), the kernel
table, the launch-shape sweep, `bench_step.py --quick`)
under a Python that hides every package of ours the GPU machine's bare Python lacks (DeepSpeed,
transformers, pydantic, ...), so it proves both that the script's command lines work and that the
benchmarks need nothing but torch and this repo's model package. The `train` step has its own
tests (tests/test_gpu_train.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.gpu_machine import bare_python_env

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
GPU_CHECK = BENCH / "gpu_check.sh"
sys.path[:0] = [str(BENCH)]

import bench_step  # noqa: E402

REHEARSED = ("build", "tests", "tuned", "kernels", "sweep", "step")


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in {r.label for r in bench_step.ROWS.values()}:
            rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The rehearsal of every step but `train`: (its process, the folder of its results)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "results"
    e = bare_python_env(tmp / "site", PYTHON=sys.executable, GPU_CHECK_ALLOW_CPU="1",
                        GPU_CHECK_STEPS=" ".join(REHEARSED), GPU_CHECK_OUT=str(out),
                        GPU_CHECK_KERNEL_ARGS="--no-compile")  # the compiled kernel rows take minutes on CPU
    proc = subprocess.run(["bash", str(GPU_CHECK)], cwd=REPO, env=e, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    return proc, out


def test_rehearsal_runs_every_step_and_the_gpu_tests_are_selected(quick_run):
    proc, _ = quick_run
    assert "no GPU: CPU rehearsal (GPU_CHECK_ALLOW_CPU=1)" in proc.stdout
    summary = proc.stdout.split("=== summary", 1)[1].split("=== results", 1)[0]
    status = {line.split()[0]: line.split()[1] for line in summary.splitlines()[1:]
              if line.strip() and not line.startswith("=")}
    assert status == {name: "ok" for name in REHEARSED}, summary
    # `-m gpu tests/test_kernels.py` selects the GPU tests (they skip here) and only them.
    m = re.search(r"(\d+) skipped, (\d+) deselected", proc.stdout)
    assert m and int(m.group(1)) >= 5 and int(m.group(2)) > 0, proc.stdout[-3000:]


def test_quick_run_has_every_row_with_positive_throughput(quick_run):
    proc, out = quick_run
    rows = _table_rows(proc.stdout)
    expected = [bench_step.ROWS[k].label for k in bench_step.DEFAULT_ROWS.split(",")]
    assert list(rows) == expected, proc.stdout
    for label, cells in rows.items():
        tokens_s = float(cells[1].replace(",", ""))  # "n/a" (a failed row) fails here, with its note
        assert tokens_s > 0, (label, cells)
        assert float(cells[2]) > 0
        assert cells[3].endswith("%")
    assert rows[bench_step.ROWS["plain"].label][5] == "1.00x"
    assert rows[bench_step.ROWS["plain-compile"].label][6] == "1.00x"
    assert "compile + warm-up" in rows[bench_step.ROWS["ours-fused-compile"].label][7]


def test_quick_run_initial_losses_agree(quick_run):
    proc, _ = quick_run
    plain = float(re.search(r"initial loss .*?: plain ([0-9.]+)", proc.stdout).group(1))
    for kernels in ("torch", "fused"):
        m = re.search(rf"ours kernels={kernels}: loss ([0-9.]+) \(\|diff\| ([0-9.e+-]+)\)", proc.stdout)
        assert m, proc.stdout
        assert abs(float(m.group(1)) - plain) <= 1e-4 and float(m.group(2)) <= 1e-4
    # Random init: the loss starts near ln(vocab) (vocab 512 in --quick).
    assert abs(plain - 6.238) < 0.2


def test_rehearsal_results_file_has_the_kernel_table_then_the_step_section(quick_run):
    proc, out = quick_run
    files = list(out.glob("*-quick.md"))
    assert len(files) == 1
    text = files[0].read_text()
    assert text.startswith("# ") and "| layer_norm" in text.split(bench_step.SECTION_BEGIN)[0]
    assert text.count(bench_step.SECTION_BEGIN) == 1 and text.rstrip().endswith(bench_step.SECTION_END)
    # the script prints that file last
    assert proc.stdout.rstrip().endswith(text.rstrip()) and f"results ({files[0]})" in proc.stdout
    # the launch-shape sweep's own file: every swept op, each setting, the profiler table
    sweep = [f.read_text() for f in out.glob("*-sweep.md")]
    assert len(sweep) == 1
    for op in ("layer_norm+residual", "rms_norm+residual", "cross_entropy"):
        assert f"## {op} " in sweep[0]
    assert "| ce_bwd_gy=1 |" in sweep[0] and "one step under torch.profiler" in sweep[0]
    # bench_step --profile: time by kernel family per row, every family and the total
    step = text.split(bench_step.SECTION_BEGIN)[1]
    assert "Where one step's" in step and "| **all** |" in step
    assert all(f"| {name} |" in step for name, _ in bench_step.KERNEL_FAMILIES)


def test_write_section_keeps_the_kernel_table_and_replaces_itself(tmp_path):
    path = tmp_path / "dev.md"
    path.write_text("# Fused kernel benchmark\n\n| kernel |\n|---|\n")
    section = f"{bench_step.SECTION_BEGIN}\nfirst\n{bench_step.SECTION_END}\n"
    bench_step.write_section(path, section)
    bench_step.write_section(path, section.replace("first", "second"))
    text = path.read_text()
    assert text.startswith("# Fused kernel benchmark\n\n| kernel |")
    assert "second" in text and "first" not in text and text.count(bench_step.SECTION_BEGIN) == 1
    bench_step.write_section(tmp_path / "new.md", section)  # no kernel table yet: the section alone
    assert (tmp_path / "new.md").read_text() == section


def test_initial_check_catches_different_weights():
    import torch
    from plain_gpt import PlainConfig, PlainGPT, to_ours_state_dict

    torch.manual_seed(0)
    plain = PlainGPT(PlainConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=8))
    sd = to_ours_state_dict(plain)
    cfg = dict(vocab_size=64, n_layer=1, n_head=2, d_model=32, max_seq_len=8, dropout=0.0)
    x = torch.randint(0, 64, (2, 8))
    y = torch.randint(0, 64, (2, 8))
    lines, losses = bench_step.initial_check(plain, sd, cfg, (x, y), "cpu", fused_ok=False, atol=1e-5)
    assert abs(losses["torch"] - losses["plain"]) < 1e-5
    sd["blocks.0.attn.k_proj.weight"] = sd["blocks.0.attn.k_proj.weight"] * 3  # a wrong mapping
    with pytest.raises(SystemExit, match="initial loss check FAILED"):
        bench_step.initial_check(plain, sd, cfg, (x, y), "cpu", fused_ok=False, atol=1e-5)


# ------------------------------------------------------------------------------------ gpu_check.sh


def test_gpu_check_needs_a_gpu_or_the_rehearsal_flag(tmp_path):
    e = bare_python_env(tmp_path / "site", PYTHON=sys.executable, GPU_CHECK_OUT=str(tmp_path / "o"))
    proc = subprocess.run(["bash", str(GPU_CHECK)], cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3 and "set GPU_CHECK_ALLOW_CPU=1" in proc.stderr
    assert not (tmp_path / "o").exists()


def _wheel(folder: Path, name: str, files: dict[str, str]) -> None:
    """A minimal pure-Python wheel `name`-99.0 holding `files` (paths inside the wheel)."""
    dist = f"{name}-99.0.dist-info"
    files = {**files, f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 99.0\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{p},,\n" for p in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name}-99.0-py3-none-any.whl", "w") as z:
        for path, text in {**files, f"{dist}/RECORD": record}.items():
            info = zipfile.ZipInfo(path)
            info.external_attr = (0o755 if "/scripts/" in path else 0o644) << 16
            z.writestr(info, text)


def _machine_without_pytest_and_ninja(tmp_path: Path, with_wheels: bool):
    """A copy of the script in a bare checkout, a Python whose pytest and ninja are hidden (except
    what lands in build/gpu-pylib) and a PATH without ninja; with_wheels: fake pytest and ninja
    wheels in build/gpu-wheels."""
    checkout = tmp_path / "checkout"
    (checkout / "bench").mkdir(parents=True)
    shutil.copy(GPU_CHECK, checkout / "bench" / "gpu_check.sh")
    pylib = checkout / "build" / "gpu-pylib"
    if with_wheels:
        wheels = checkout / "build" / "gpu-wheels"
        wheels.mkdir(parents=True)
        _wheel(wheels, "pytest", {"pytest/__init__.py": "__version__ = '99.0'\n"})
        _wheel(wheels, "ninja", {"ninja/__init__.py": "import os\nBIN_DIR = os.path.join(os.path.dirname(__file__), "
                                                      "os.pardir, 'bin')\n",
                                 "ninja-99.0.data/scripts/ninja": "#!/bin/sh\necho 99.0\n"})
    tools = tmp_path / "tools"  # the commands the script needs, and no ninja
    tools.mkdir()
    for tool in ("bash", "dirname", "cat", "tail", "timeout", "sh"):
        (tools / tool).symlink_to(shutil.which(tool))
    e = bare_python_env(tmp_path / "site", ("pytest", "_pytest", "ninja"), allow_under=pylib, PYTHON=sys.executable,
                        GPU_CHECK_ALLOW_CPU="1", GPU_CHECK_STEPS="none", GPU_CHECK_OUT=str(tmp_path / "o"),
                        PATH=str(tools))
    return subprocess.run([str(tools / "bash"), str(checkout / "bench" / "gpu_check.sh")], cwd=tmp_path, env=e,
                          capture_output=True, text=True, timeout=300), pylib


def test_gpu_check_installs_missing_pytest_and_ninja_from_the_carried_wheels(tmp_path):
    proc, pylib = _machine_without_pytest_and_ninja(tmp_path, with_wheels=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ninja: "))
    assert line == f"ninja: {pylib}/bin/ninja; pytest: 99.0 {pylib}/pytest/__init__.py", line


def test_gpu_check_without_the_wheels_stops_naming_make_gpu_wheels(tmp_path):
    proc, _ = _machine_without_pytest_and_ninja(tmp_path, with_wheels=False)
    assert proc.returncode == 4
    assert "cannot install pytest ninja from build/gpu-wheels (run 'make gpu-wheels'" in proc.stderr


def test_make_gpu_wheels_downloads_what_the_script_installs():
    """`make gpu-wheels` needs the network, so its commands are read with `make -n`: pip downloads
    pytest and ninja into build/gpu-wheels, the folder the script installs from (above)."""
    dry = subprocess.run(["make", "-n", "gpu-wheels"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    cmd = " ".join(dry.stdout.replace("\\\n", " ").split())
    m = re.search(r"-m pip download .*?-d build/gpu-wheels ([\w\s-]+?)(?: \|\||;|$)", cmd)
    assert m, cmd
    assert {"pytest", "ninja"} <= set(m.group(1).split()), m.group(1)
