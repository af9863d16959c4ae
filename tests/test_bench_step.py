"""bench/bench_step.py (training step: plain GPT vs ours) and bench/gpu_check.sh.

The smoke test runs `bench_step.py --quick` on CPU in a subprocess that refuses every import the
GPU machine lacks (DeepSpeed, transformers, pydantic, ...), so it also proves the benchmark needs
nothing but torch and this repo's model package.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path[:0] = [str(BENCH)]

import bench_step  # noqa: E402

# Top-level packages of requirements.txt that the GPU machine's bare Python does not have.
NOT_ON_GPU_MACHINE = ("deepspeed", "transformers", "pydantic", "tokenizers", "tqdm", "yaml", "wandb",
                      "datasets", "safetensors", "trainer", "launch")

# Hides those packages from every import finder: `import x` raises ModuleNotFoundError and
# importlib.util.find_spec("x") returns None, as on a Python that lacks them.
BLOCKER = f"""
import runpy, sys
class Hide:
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {NOT_ON_GPU_MACHINE!r}:
            return None
        find = getattr(self.inner, 'find_spec', None)
        return find(name, path, target) if find else None
    def __getattr__(self, attr):
        return getattr(self.inner, attr)
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""

def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in {r.label for r in bench_step.ROWS.values()}:
            rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    cmd = [sys.executable, "-c", BLOCKER, str(BENCH / "bench_step.py"), "--quick", "--device", "cpu",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, out


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


def test_quick_run_writes_its_section_only(quick_run):
    _, out = quick_run
    files = list(out.glob("*-quick.md"))
    assert len(files) == 1
    text = files[0].read_text()
    assert text.count(bench_step.SECTION_BEGIN) == 1 and text.count(bench_step.SECTION_END) == 1


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

GPU_CHECK = BENCH / "gpu_check.sh"


def test_gpu_check_parses():
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)


def _script_commands() -> tuple[str, dict[str, list[str]]]:
    text = GPU_CHECK.read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    body = body.replace("\\\n", " ")
    arrays: dict[str, list[str]] = {}
    for name, content in re.findall(r"\b([A-Z_]+)=\(([^)]*)\)", body):
        arrays.setdefault(name, []).extend(shlex.split(content))
    return body, arrays


def _flags_on_lines(body: str, arrays: dict[str, list[str]], needle: str) -> set[str]:
    flags = set()
    lines = [line for line in body.splitlines() if needle in line]
    assert lines, f"gpu_check.sh does not run {needle}"
    for line in lines:
        flags |= set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line))
        for name in re.findall(r"\$\{([A-Z_]+)\[@\]\}", line):
            flags |= {a for a in arrays.get(name, []) if a.startswith("--")}
    return flags


@pytest.mark.parametrize("needle, cmd", [
    ("bench/bench_kernels.py", [sys.executable, "bench/bench_kernels.py", "--help"]),
    ("bench/bench_step.py", [sys.executable, "bench/bench_step.py", "--help"]),
    ("-m model.kernels.build", [sys.executable, "-m", "model.kernels.build", "--help"]),
])
def test_gpu_check_passes_only_existing_flags(needle, cmd):
    body, arrays = _script_commands()
    flags = _flags_on_lines(body, arrays, needle)
    help_text = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True, timeout=120).stdout
    known = set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))
    assert flags and flags <= known, f"{needle}: {sorted(flags - known)} not accepted"


def test_gpu_check_references_existing_files_and_marker():
    body, _ = _script_commands()
    paths = set(re.findall(r"\b((?:bench|tests|model)/[\w./-]+\.(?:py|sh))", body))
    assert {"bench/bench_kernels.py", "bench/bench_step.py", "tests/test_kernels.py"} <= paths
    for p in paths:
        assert (REPO / p).is_file(), p
    assert (REPO / "model/kernels/build.py").is_file()
    assert "-m gpu" in body and '"gpu:' in (REPO / "pyproject.toml").read_text()
    # The wheels it installs offline are the ones `make gpu-wheels` downloads.
    make = (REPO / "Makefile").read_text()
    assert "build/gpu-wheels" in body and re.search(r"-d build/gpu-wheels[\s\\]+pytest ninja", make)
