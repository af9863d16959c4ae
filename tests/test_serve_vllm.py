"""`--engine vllm` (serve/vllm_engine.py) without vLLM: no vLLM is installed on this machine (nor on the lent
GPU machine), so nothing here runs vLLM. What is checked:

- the plan of `vllm serve` processes for real `make export FORMAT=hf` folders (launch.export.export_run) of
  a single-model run and of a multi-agent run (one agent with its own GPT-2-style weights; three LoRA agents
  over one llama-style base, one of them `policy_of` another), the model names equal to the torch server's;
- the PEFT adapter folders the export writes for vLLM: the base with the adapter loaded by peft over
  transformers gives the logits of the agent's merged folder;
- vLLM missing: one line on stderr, exit 2, nothing started;
- model-aware routing (serve.routing, and the router app's 404 for an unknown model);
- the plumbing end to end through a STAND-IN for vLLM's process interface: a small `vllm` executable written
  into tmp_path that parses the command line we pass with the flags vLLM documents (an unknown flag or a bad
  value fails it), checks it, and execs this project's torch server (`python -m serve RUN`) for the run the
  folder was exported from. It is not vLLM and says nothing of how vLLM itself serves the folders.

The runs are tiny checkpoints written here in trainer.checkpoint's layout (no training), so the file takes
seconds, in one process apart from the end-to-end test."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import httpx
import openai
import pytest
import torch

from launch.multiproc import free_port
from serve.procs import ServerDidNotStart, launch_server
from tests.trainutil import REPO, byte_bpe_tokenizer, env

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 32
VOCAB = 320


def _config(style: str) -> dict:
    from model import GPTConfig

    return asdict(GPTConfig(style=style, vocab_size=VOCAB, n_layer=1, n_head=2, d_model=16, max_seq_len=CONTEXT))


def _tokenizer(path: Path) -> None:
    tok = byte_bpe_tokenizer("hello world, the answer is 42\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def _checkpoint(run: Path, states: dict[str, dict], meta: dict) -> None:
    """A finished checkpoint as trainer.checkpoint.save lays it out (one rank, no tensor parallelism)."""
    from trainer.checkpoint import FORMAT, _manifest

    folder = run / "checkpoints" / "step_00000001"
    for name, sd in states.items():
        (folder / name).mkdir(parents=True)
        torch.save({"module": sd}, folder / name / "mp_rank_00_model_states.pt")
    (folder / "meta.json").write_text(json.dumps({**meta, "format": FORMAT, "components": list(states)}))
    (folder / "manifest.json").write_text(json.dumps(_manifest(folder)))
    (run / "checkpoints" / "latest").write_text(folder.name + "\n")


def _gpt(style: str, seed: int):
    from model import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(**_config(style)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"single": runs/tiny, "agents": runs/roles}: the runs, and their exports under exports/."""
    from agents.lora import add_adapters
    from launch.export import export_run

    root = tmp_path_factory.mktemp("vllm")
    single = root / "runs" / "tiny"
    _tokenizer(single / "tokenizer.json")
    _checkpoint(single, {"model": _gpt("gpt2", 0).state_dict()}, {"model_config": _config("gpt2")})

    agents = root / "runs" / "roles"
    for a in ("solo", "x", "y", "z"):
        _tokenizer(agents / "tokenizers" / f"{a}.json")
    shared = _gpt("llama", 1)
    adapters = {"x": {"rank": 2, "alpha": 4.0, "targets": ["q_proj", "v_proj"]},
                "y": {"rank": 4, "alpha": 4.0, "targets": ["q_proj", "gate_proj", "down_proj"]}}
    add_adapters(shared, adapters)
    with torch.no_grad():  # adapters far from peft's zero init, so the agents differ from the base
        for name, p in shared.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    meta = {"model_config": _config("gpt2"), "agent_model_configs": {"solo": _config("gpt2")},
            "lora": {"lora_0": {"config": _config("llama"), "adapters": adapters}},
            "config": {"agents": {"solo": {}, "x": {}, "y": {}, "z": {"policy_of": "x"}}}}
    _checkpoint(agents, {"agent_solo": _gpt("gpt2", 2).state_dict(), "lora_0": shared.state_dict()}, meta)
    for run in (single, agents):
        export_run(str(run), str(root / "exports" / f"{run.name}-hf"))
    return {"single": single, "agents": agents}


def _export(run: Path) -> Path:
    return run.parent.parent / "exports" / f"{run.name}-hf"


def _served_names(run: Path) -> list[str]:
    from serve.loader import load_run

    return sorted(load_run(run).models)


def test_single_model_export_is_one_process_named_as_the_torch_server_names_it(runs):
    from serve.vllm_engine import plan

    out = _export(runs["single"])
    (p,) = plan(out)
    assert p.folder == out.resolve() and p.names == ["tiny"] == _served_names(runs["single"])
    assert p.models == {"tiny"} and not p.loras
    assert p.argv(8123) == ["vllm", "serve", str(out.resolve()), "--served-model-name", "tiny", "--host",
                            "127.0.0.1", "--port", "8123", "--max-model-len", str(CONTEXT)]


def test_lora_agents_share_their_base_process_and_every_name_is_the_torch_servers(runs):
    from serve.vllm_engine import commands, plan

    out = _export(runs["agents"]).resolve()
    assert json.loads((out / "export.json").read_text())["models"] == {
        "solo": {"folder": "solo"},
        "x": {"folder": "x", "lora_base": "lora_0.base", "adapter": "x/adapter"},
        "y": {"folder": "y", "lora_base": "lora_0.base", "adapter": "y/adapter"},
        "z": {"folder": "x", "lora_base": "lora_0.base", "adapter": "x/adapter", "policy_of": "x"}}
    solo, base = plan(out)
    assert (solo.folder, solo.names, solo.models) == (out / "solo", ["solo"], {"solo"})
    assert base.folder == out / "lora_0.base" and not base.routed
    assert base.loras == {"x": out / "x" / "adapter", "y": out / "y" / "adapter", "z": out / "x" / "adapter"}
    assert solo.models | base.models == set(_served_names(runs["agents"])) == {"solo", "x", "y", "z"}
    assert commands([solo, base])(1, 9000) == [
        "vllm", "serve", str(out / "lora_0.base"), "--served-model-name", "lora_0.base", "--host", "127.0.0.1",
        "--port", "9000", "--max-model-len", str(CONTEXT), "--gpu-memory-utilization", "0.450", "--enable-lora",
        "--max-loras", "3", "--max-lora-rank", "8",  # the largest rank, 4, up to one vLLM accepts
        "--lora-modules", f"x={out / 'x' / 'adapter'}", f"y={out / 'y' / 'adapter'}", f"z={out / 'x' / 'adapter'}"]


def test_an_agent_whose_tokenizer_differs_from_the_base_gets_a_process_of_its_own(runs, tmp_path):
    import shutil

    from serve.vllm_engine import plan

    out = tmp_path / "copy"
    shutil.copytree(_export(runs["agents"]), out)
    tok = out / "y" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"hello', '"hellO', 1))
    names = {tuple(sorted(p.models)) for p in plan(out)}
    assert names == {("solo",), ("y",), ("x", "z")}


def test_the_peft_adapter_over_the_base_gives_the_merged_folders_logits(runs):
    """What vLLM's --lora-modules loads, read by peft over transformers: the agent's merged model."""
    import transformers
    from peft import PeftModel

    out = _export(runs["agents"])
    ids = torch.tensor([[1, 5, 9, 40, 200, 7]])
    for agent in ("x", "y"):
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / agent).eval()
        base = transformers.AutoModelForCausalLM.from_pretrained(out / "lora_0.base")
        adapted = PeftModel.from_pretrained(base, out / agent / "adapter").eval()
        with torch.no_grad():
            want, got = merged(ids).logits, adapted(ids).logits
            with adapted.disable_adapter():
                plain = adapted(ids).logits
        assert torch.allclose(got, want, atol=1e-5), (agent, (got - want).abs().max())
        assert not torch.allclose(plain, want, atol=1e-3)  # the adapter does change the model


def _cli(*args: str, path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve", *args], cwd=REPO, env=env(PATH=path),
                          capture_output=True, text=True, timeout=120)


def test_without_vllm_it_stops_with_one_line_and_exit_2(runs, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    out = _export(runs["agents"])
    r = _cli(str(out), "--engine", "vllm", "--port", str(free_port()), path=str(empty))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --engine vllm needs vLLM") and "pip install vllm" in lines[0]
    r = _cli(str(out), "--engine", "vllm", "--tp", "2", path=str(empty))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --tp does not apply to --engine vllm (RUN is the exported folder; vLLM's own settings are "
        "`vllm serve` flags)"]


def test_make_serve_engine_reaches_the_server_as_its_engine_flag(runs, tmp_path):
    """`make serve ... ENGINE=vllm` runs `python -m serve ... --engine vllm`: here without vLLM, so
    the server's own one-line error and exit 2 come back through make."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    out = _export(runs["agents"])
    e = {**env(), "PATH": f"{empty}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin"}
    r = subprocess.run(["make", "-s", "serve", f"RUN={out}", "ENGINE=vllm", f"PORT={free_port()}"], cwd=REPO, env=e,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "error: --engine vllm needs vLLM" in r.stderr, r.stderr[-2000:]


def test_routing_sends_each_model_only_to_replicas_serving_it():
    from serve.routing import Router, UnknownModel

    for policy in ("cache_aware", "least_loaded", "round_robin"):
        r = Router(["http://a", "http://b", "http://c"], policy, models=[{"A"}, {"B"}, {"B", "C"}])
        picked = {"A": [], "B": []}
        for i in range(12):  # nothing finishes: the load keeps growing
            for model in ("A", "B"):
                c = r.choose(model, f"prompt {i}")
                r.dispatched(c)
                picked[model].append(c.replica.index)
        assert set(picked["A"]) == {0}, policy
        assert sorted(picked["B"]) == [1] * 6 + [2] * 6, policy  # balanced between the two that serve B
        assert r.choose("C", "x").replica.index == 2
        with pytest.raises(UnknownModel) as e:
            r.choose("D", "x")
        assert e.value.known == ["A", "B", "C"]
        r.replicas[0].alive = False
        with pytest.raises(LookupError) as e:
            r.choose("A", "x")
        assert not isinstance(e.value, UnknownModel)  # served, but out of rotation: a 503, not a 404
        assert r.choose("", "x").replica.index in (1, 2)  # no model name: any replica answers the error


def test_cache_aware_prefix_owner_is_only_kept_for_its_model():
    from serve.routing import Router

    r = Router(["http://a", "http://b", "http://c"], models=[{"B"}, {"B"}, None])
    text = "a shared prefix that fills more than one block of the index"
    first = r.choose("B", text)
    r.dispatched(first)
    r.done(first.replica)
    again = r.choose("B", text)
    assert again.hit and again.replica is first.replica


def test_router_app_answers_unknown_and_missing_models_as_the_server_does():
    from starlette.testclient import TestClient

    from serve.protocol import unknown_model
    from serve.router import build_router_app
    from serve.routing import Router

    router = Router(["http://127.0.0.1:9", "http://127.0.0.1:9"], models=[{"solo"}, {"x", "y"}])
    with TestClient(build_router_app(router)) as client:
        r = client.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
        assert r.status_code == 404 and r.json() == unknown_model("nope", ["solo", "x", "y"]).body()
        assert r.json()["error"]["code"] == "model_not_found"
        r = client.post("/v1/chat/completions", json={"messages": []})
        assert r.status_code == 400 and r.json()["error"]["code"] == "missing_model"


# The stand-in for vLLM's process interface. It declares the `vllm serve` flags serve/vllm_engine.py passes,
# as vLLM documents them (features/lora.md "Serving LoRA Adapters", serving/engine_args, vllm/config/lora.py
# for the ranks); argparse rejects anything else. Then it execs this project's torch server for the run.
STAND_IN = '''#!{python}
"""STAND-IN for vLLM's `vllm serve` process interface (tests/test_serve_vllm.py); this is not vLLM."""
import argparse, json, os, sys
from pathlib import Path

p = argparse.ArgumentParser(prog="vllm", allow_abbrev=False)
p.add_argument("command", choices=["serve"])
p.add_argument("model")
p.add_argument("--served-model-name", nargs="+", required=True)
p.add_argument("--host", required=True)
p.add_argument("--port", type=int, required=True)
p.add_argument("--max-model-len", type=int, required=True)
p.add_argument("--gpu-memory-utilization", type=float)
p.add_argument("--enable-lora", action="store_true")
p.add_argument("--max-loras", type=int)
p.add_argument("--max-lora-rank", type=int, choices=[1, 8, 16, 32, 64, 128, 256, 320, 512])
p.add_argument("--lora-modules", nargs="+", default=[])
a = p.parse_args()
folder = Path(a.model)
assert a.host == "127.0.0.1" and (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
assert a.gpu_memory_utilization is None or 0 < a.gpu_memory_utilization <= 0.9
loras = dict(m.split("=", 1) for m in a.lora_modules)  # vLLM's name=path form
assert bool(loras) == a.enable_lora and (not loras or a.max_loras >= len(loras))
for path in loras.values():
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] <= a.max_lora_rank
    assert (Path(path) / "adapter_model.safetensors").is_file()
(Path(os.environ["STAND_IN_LOG"]) / f"{{a.port}}.json").write_text(json.dumps(sys.argv[1:]))
run = json.loads(os.environ["STAND_IN_RUNS"])[str(folder)]
os.execv(sys.executable, [sys.executable, "-m", "serve", run, "--host", a.host, "--port", str(a.port),
                          "--threads", "1", "--max-slots", "4"])
'''


def test_router_over_stand_in_processes_sends_each_model_to_its_process(runs, tmp_path):
    out = _export(runs["agents"]).resolve()
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "stand-in-argv"
    bin_dir.mkdir()
    log_dir.mkdir()
    exe = bin_dir / "vllm"
    exe.write_text(STAND_IN.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    mapping = {str(out / "solo"): str(runs["agents"]), str(out / "lora_0.base"): str(runs["agents"])}
    port = free_port()
    log = open(tmp_path / "router.log", "w")
    try:
        proc = launch_server([str(out), "--engine", "vllm"], port, log, 180, cwd=REPO,
                             env=env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                                     STAND_IN_RUNS=json.dumps(mapping), STAND_IN_LOG=str(log_dir)))
    except ServerDidNotStart as e:
        raise AssertionError(f"{e}: {(tmp_path / 'router.log').read_text()}") from None
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["solo", "x", "y", "z"]  # the union, base left out
        replicas = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["replicas"]
        assert [r["models"] for r in replicas] == [["solo"], ["x", "y", "z"]]
        for model, want in (("solo", "0"), ("x", "1"), ("y", "1"), ("z", "1"), ("solo", "0"), ("y", "1")):
            raw = client.completions.with_raw_response.create(model=model, prompt="hello", max_tokens=3,
                                                              temperature=0)
            assert raw.headers["x-replica"] == want, model
            assert raw.parse().model == model
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="lora_0.base", prompt="hello", max_tokens=1)
        assert e.value.body["code"] == "model_not_found"
        argvs = [json.loads(f.read_text()) for f in sorted(log_dir.iterdir())]
        assert sorted(a[1] for a in argvs) == [str(out / "lora_0.base"), str(out / "solo")]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        log.close()
    assert rc == 0, (tmp_path / "router.log").read_text()[-3000:]
