"""Checkpoint safety: a crash while a step is saved again, a dangling `latest`, one shared
verification of a checkpoint for every rank, settings that change on resume, and replayed steps
that end in exactly the same weights and Adam moments as a run that was never interrupted."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import signal
from pathlib import Path

import pytest
import torch

from tests.trainutil import metrics, run_train, train_losses
from trainer import checkpoint as ckpt
from trainer import optim_state
from trainer.consolidate import consolidated_state_dict

# ------------------------------------------------------------------ which checkpoint `latest` means


def _fake_checkpoint(root: Path, name: str, complete: bool = True) -> Path:
    folder = root / name
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "weights.pt").write_bytes(name.encode())
    (folder / "meta.json").write_text(json.dumps({"step": int(name[5:13])}))
    if complete:
        (folder / "manifest.json").write_text(json.dumps(ckpt._manifest(folder)))
    return folder


def _latest(root: Path):
    said = []
    return ckpt.latest_checkpoint(root, warn=said.append), said


def test_latest_pointing_at_a_complete_folder_needs_no_fallback(tmp_path):
    for s in (4, 8):
        _fake_checkpoint(tmp_path, ckpt.step_dir_name(s))
    (tmp_path / "latest").write_text("step_00000008\n")
    assert _latest(tmp_path) == (tmp_path / "step_00000008", [])
    assert _latest(tmp_path / "nothing-here") == (None, [])


@pytest.mark.parametrize("damage", ["missing", "incomplete"])
def test_dangling_latest_falls_back_to_newest_complete_with_one_warning(tmp_path, damage):
    for s in (4, 8, 12):
        _fake_checkpoint(tmp_path, ckpt.step_dir_name(s))
    _fake_checkpoint(tmp_path, "step_00000016.partial", complete=False)  # a save that never finished
    (tmp_path / "latest").write_text("step_00000012\n")
    if damage == "missing":
        shutil.rmtree(tmp_path / "step_00000012")
    else:
        (tmp_path / "step_00000012" / "manifest.json").unlink()
    found, said = _latest(tmp_path)
    assert found == tmp_path / "step_00000008"
    assert len(said) == 1 and said[0].startswith("warning: ") and "step_00000012" in said[0], said
    assert "step_00000008" in said[0] and damage in said[0]


def test_fallback_never_goes_past_the_step_latest_names(tmp_path):
    """Folders newer than the one `latest` names belong to another trajectory (a resume from an
    older checkpoint): a dangling pointer to step 8 falls back to step 4, not to step 12."""
    for s in (4, 12):
        _fake_checkpoint(tmp_path, ckpt.step_dir_name(s))
    (tmp_path / "latest").write_text("step_00000008\n")
    found, said = _latest(tmp_path)
    assert found == tmp_path / "step_00000004" and len(said) == 1
    (tmp_path / "latest").write_text("garbage\n")  # no step to bound it: the newest complete one
    found, said = _latest(tmp_path)
    assert found == tmp_path / "step_00000012" and len(said) == 1 and "'garbage'" in said[0]


def test_a_copy_set_aside_by_an_interrupted_resave_is_found(tmp_path):
    _fake_checkpoint(tmp_path, "step_00000004")
    _fake_checkpoint(tmp_path, "step_00000008.previous")
    (tmp_path / "latest").write_text("step_00000008\n")
    found, said = _latest(tmp_path)
    assert found == tmp_path / "step_00000008.previous" and len(said) == 1
    # ... but not in preference to a complete step_00000008 (the re-save got that far)
    _fake_checkpoint(tmp_path, "step_00000008")
    assert _latest(tmp_path) == (tmp_path / "step_00000008", [])


def test_no_pointer_but_complete_checkpoints(tmp_path):
    """A crash between the first checkpoint's rename and its `latest`: resume it, say so once."""
    _fake_checkpoint(tmp_path, "step_00000004")
    found, said = _latest(tmp_path)
    assert found == tmp_path / "step_00000004" and len(said) == 1 and "no 'latest'" in said[0]


def test_dangling_latest_with_nothing_to_fall_back_to_is_one_clear_error(tmp_path):
    _fake_checkpoint(tmp_path, "step_00000004", complete=False)
    (tmp_path / "latest").write_text("step_00000004\n")
    with pytest.raises(ckpt.CheckpointError, match=r"names 'step_00000004', which is incomplete .* "
                                                   r"no other complete checkpoint .* train.resume=none"):
        ckpt.latest_checkpoint(tmp_path, warn=pytest.fail)


# ------------------------------------------------------ one verification shared by the ranks


def _verify_worker(rank, world, out):
    import os

    from trainer import resume
    from trainer.recipe import load_recipe, recipe_to_dict

    root = Path(out) / "checkpoints"
    recipe = load_recipe("gpt-tiny", ["train.resume=auto"])
    hashed = []
    real_sha = ckpt.sha256_file

    def counting_sha(path):
        hashed.append(str(Path(path).relative_to(root)))
        return real_sha(path)

    ckpt.sha256_file = counting_sha
    results = {}
    for case in ("ok", "dangling", "corrupt", "model", "none"):
        marker = Path(out) / f"{case}.ready"
        if rank == 0:  # the test's state for this case, set up by rank 0 while the others wait
            _verify_case(root, case, recipe_to_dict(recipe))
            marker.touch()
        torch.distributed.barrier()
        hashed.clear()
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                folder, meta = resume.find_resume(recipe, root, group=None)
                results[case] = ("ok", folder and folder.name, meta and meta["step"])
            except (ckpt.CheckpointError, resume.UsageError) as e:
                results[case] = (type(e).__name__, str(e))
        results[case] += (sorted(hashed), err.getvalue())
        torch.distributed.barrier()
    torch.save(results, os.path.join(out, f"verify_rank{rank}.pt"))


def _verify_case(root: Path, case: str, config: dict) -> None:
    if case == "ok":  # step 4 and step 8, nine files each, `latest` on 8
        for s in (4, 8):
            folder = root / ckpt.step_dir_name(s)
            for i in range(8):
                (folder / "model").mkdir(parents=True, exist_ok=True)
                (folder / "model" / f"part{i}.pt").write_bytes(bytes([s, i]) * 1000)
            (folder / "meta.json").write_text(json.dumps({"step": s, "config": config}))
            (folder / "manifest.json").write_text(json.dumps(ckpt._manifest(folder)))
        (root / "latest").write_text("step_00000008\n")
    elif case == "dangling":  # latest names a step whose folder is gone: step 4, one warning
        (root / "latest").write_text("step_00000006\n")
    elif case == "corrupt":
        # Manifest order: meta.json, part0, ..., part7; entry k is hashed by rank k mod 3. part1
        # (entry 2, rank 2) and part2 (entry 3, rank 0) are altered: the first, part1, is reported.
        (root / "latest").write_text("step_00000004\n")
        for i in (1, 2):
            (root / "step_00000004" / "model" / f"part{i}.pt").write_bytes(b"altered")
    elif case == "model":  # intact files, but the checkpoint was trained with 3 layers of 96
        folder = root / "step_00000008"
        (root / "latest").write_text("step_00000008\n")
        changed = {**config, "model": {**config["model"], "n_layer": 3, "d_model": 96, "kernels": "fused"}}
        (folder / "meta.json").write_text(json.dumps({"step": 8, "config": changed}))
        (folder / "manifest.json").write_text(json.dumps(ckpt._manifest(folder)))
    elif case == "none":
        shutil.rmtree(root)


@pytest.mark.dist
def test_ranks_share_the_sha256_work_and_fail_with_the_same_error(tmp_path):
    from tests.test_tensor_parallel import spawn

    world = 3
    spawn(_verify_worker, world, str(tmp_path))
    r = [torch.load(tmp_path / f"verify_rank{k}.pt", weights_only=False) for k in range(world)]
    files = sorted(["meta.json"] + [f"model/part{i}.pt" for i in range(8)])

    # intact: every file of step 8 hashed exactly once over the ranks, none twice
    assert all(x["ok"][:3] == ("ok", "step_00000008", 8) for x in r)
    hashed = [h for x in r for h in x["ok"][3]]
    assert sorted(hashed) == [f"step_00000008/{f}" for f in files]
    assert all(0 < len(x["ok"][3]) < len(files) for x in r)  # shared, not one rank doing it all

    # a dangling `latest`: the same fallback everywhere, one warning in all, from the first rank
    assert all(x["dangling"][:3] == ("ok", "step_00000004", 4) for x in r)
    warnings = [x["dangling"][4] for x in r]
    assert warnings[1:] == [""] * (world - 1) and warnings[0].count("warning:") == 1
    assert "step_00000006" in warnings[0] and "step_00000004" in warnings[0]

    # two altered files found by ranks 2 and 0: every rank raises the same one-line message, naming
    # the first bad file in manifest order (rank 2's), although rank 0 found another one itself
    kinds = {x["corrupt"][0] for x in r}
    messages = {x["corrupt"][1] for x in r}
    assert kinds == {"CheckpointError"} and len(messages) == 1
    msg = messages.pop()
    assert "model/part1.pt does not match" in msg and "part2" not in msg and "\n" not in msg
    assert "train.resume=" in msg and "step_00000008" in msg  # the other checkpoint to use

    # a changed model: refused on every rank with the same line listing both keys, not kernels
    kinds = {x["model"][0] for x in r}
    messages = {x["model"][1] for x in r}
    assert kinds == {"UsageError"} and len(messages) == 1
    msg = messages.pop()
    from trainer.recipe import load_recipe

    m = load_recipe("gpt-tiny").model
    assert f"model.n_layer 3 -> {m.n_layer}" in msg and f"model.d_model 96 -> {m.d_model}" in msg
    assert "kernels" not in msg.split("(only")[0]

    assert all(x["none"][:3] == ("ok", None, None) for x in r)  # nothing to resume: a fresh start


@pytest.mark.dist
def test_corrupt_file_seen_by_another_rank_is_reported_by_all(tmp_path):
    """The bad file is one that only rank 1 hashes: rank 0 still reports it."""
    from tests.test_tensor_parallel import spawn

    spawn(_corrupt_elsewhere_worker, 2, str(tmp_path))
    r = [torch.load(tmp_path / f"elsewhere_rank{k}.pt", weights_only=False) for k in range(2)]
    assert r[0] == r[1] and r[0][0] == "CheckpointError" and "model/part0.pt is missing" in r[0][1], r


def _corrupt_elsewhere_worker(rank, world, out):
    from trainer import resume
    from trainer.recipe import load_recipe, recipe_to_dict

    root = Path(out) / "checkpoints"
    recipe = load_recipe("gpt-tiny", ["train.resume=auto"])
    if rank == 0:
        _verify_case(root, "ok", recipe_to_dict(recipe))
        (root / "step_00000008" / "model" / "part0.pt").unlink()  # entry 1: rank 1's share
    torch.distributed.barrier()
    try:
        resume.find_resume(recipe, root)
        result = ("ok",)
    except ckpt.CheckpointError as e:
        result = (type(e).__name__, str(e))
    torch.save(result, f"{out}/elsewhere_rank{rank}.pt")


# --------------------------------------------------------------------------- end-to-end runs

# train.peak_tflops: a given MFU ceiling instead of two sgemm measurements per rank and run (MFU is not
# checked here; test_evaluation and test_flops check the measurement).
BASE = ["train.max_steps=8", "train.checkpoint_every=4", "train.keep_checkpoints=5", "model.dropout=0.1",
        "train.eval_every=1000", "train.sample_tokens=0", "train.peak_tflops=1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt-safety")


@pytest.fixture(scope="module")
def base(root):
    """A finished 8-step run with checkpoints at steps 4 and 8."""
    out = run_train(root, "base", *BASE)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "runs" / "base"


def _weights_and_moments(folder: Path) -> tuple[dict, dict]:
    meta = ckpt.verify(folder)
    adam = torch.load(ckpt.component_files(folder, meta) / optim_state.FILE, weights_only=False)
    return consolidated_state_dict(folder, meta), adam


def _assert_identical(a: Path, b: Path) -> None:
    (wa, ma), (wb, mb) = _weights_and_moments(a), _weights_and_moments(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"weight {k} differs"
    assert ma["step"] == mb["step"] and ma["moments"].keys() == mb["moments"].keys() and ma["moments"]
    for k, (ea, eas) in ma["moments"].items():
        assert torch.equal(ea, mb["moments"][k][0]), f"exp_avg of {k} differs"
        assert torch.equal(eas, mb["moments"][k][1]), f"exp_avg_sq of {k} differs"


def test_crash_while_a_step_is_saved_again_leaves_a_resumable_run(root, base):
    """Resuming a finished run at train.max_steps saves step 8 again over the finished step_8/.
    Killed in the middle (the old folder set aside, the new one not yet in place), `latest` names
    a missing folder; the next resume falls back, with one warning, to the set-aside copy of step 8
    and continues exactly as a resume of the intact run does."""
    crash, ref = root / "runs" / "resave", root / "runs" / "resave-ref"
    shutil.copytree(base, crash)
    shutil.copytree(base, ref)
    killed = run_train(root, "resave", *BASE, "train.resume=auto", RECIPES_FAULT_KILL_IN_RESAVE="8")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ck = crash / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000008"
    assert not (ck / "step_00000008").exists() and ckpt.is_complete(ck / "step_00000008.previous")
    assert (ck / "step_00000008.partial").is_dir()  # the new copy, complete but not yet renamed

    args = [*BASE[1:], "train.max_steps=10", "train.resume=auto"]
    resumed = run_train(root, "resave", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warnings = [line for line in resumed.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "step_00000008" in warnings[0] and "missing" in warnings[0], resumed.stderr
    assert "resumed from step_00000008.previous" in resumed.stdout
    assert (ck / "latest").read_text().strip() == "step_00000010"
    assert not list(ck.glob("*.previous")) and not list(ck.glob("*.partial"))

    intact = run_train(root, "resave-ref", *args)
    assert intact.returncode == 0, intact.stderr[-3000:]
    assert "warning" not in intact.stderr.lower()
    a, b = train_losses(root, "resave"), train_losses(root, "resave-ref")
    assert [a[s] for s in (9, 10)] == [b[s] for s in (9, 10)]  # bit-identical (dropout on)
    _assert_identical(ck / "step_00000010", ref / "checkpoints" / "step_00000010")


def _lr_at(step: int, lr: float, max_steps: int, warmup: int = 2, min_ratio: float = 0.1) -> float:
    """The rate optimizer step `step` (1-based) uses: linear warm-up, then cosine to min_ratio."""
    i = step - 1
    if i < warmup:
        return lr * (i + 1) / warmup
    progress = min(1.0, (i - warmup) / (max_steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_changed_optimizer_settings_are_applied_and_said(root, base):
    """DeepSpeed's load restores the optimizer's param_groups and the scheduler's base rates: a
    resume with a new lr, beta2, weight decay and horizon (max_steps) must use the new ones."""
    ck4 = base / "checkpoints" / "step_00000004"
    out = run_train(root, "changed", *BASE, f"train.resume={ck4}", "optim.lr=0.006", "optim.beta2=0.99",
                    "optim.weight_decay=0.05", "train.max_steps=12")
    assert out.returncode == 0, out.stderr[-3000:]
    said = [line for line in out.stdout.splitlines() if line.startswith("resume: settings changed")]
    assert len(said) == 1, out.stdout
    for fragment in ("optim.lr 0.002 -> 0.006", "optim.beta2 0.95 -> 0.99", "optim.weight_decay 0.1 -> 0.05",
                     "train.max_steps 8 -> 12", "step 5"):
        assert fragment in said[0], said[0]
    rows = {r["step"]: r for r in metrics(root, "changed") if "lr" in r}
    assert sorted(rows) == list(range(5, 13))
    for s in range(5, 13):
        assert rows[s]["lr"] == pytest.approx(_lr_at(s, 0.006, 12), rel=1e-12), s
    old = {r["step"]: r for r in metrics(root, "base") if "lr" in r}
    assert old[5]["lr"] == pytest.approx(_lr_at(5, 0.002, 8), rel=1e-12)  # what the checkpoint held
    # step 5's loss is taken before its update (same weights); from step 6 the new update shows
    assert rows[5]["loss"] == old[5]["loss"] and rows[6]["loss"] != old[6]["loss"]
    states = torch.load(root / "runs" / "changed" / "checkpoints" / "step_00000012" / "model" /
                        "mp_rank_00_model_states.pt", weights_only=False)
    groups = states["optimizer"]["param_groups"]
    assert [tuple(g["betas"]) for g in groups] == [(0.9, 0.99)] * 2
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]  # no decay on biases/norms/embeddings
    assert [g["initial_lr"] for g in groups] == [0.006] * 2


def test_unchanged_settings_say_nothing(root, base):
    out = run_train(root, "same", *BASE, f"train.resume={base / 'checkpoints' / 'step_00000004'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "settings changed" not in out.stdout
    a, b = train_losses(root, "same"), train_losses(root, "base")
    assert [a[s] for s in range(5, 9)] == [b[s] for s in range(5, 9)]


def test_changed_model_settings_are_refused_in_one_line(root, base):
    out = run_train(root, "other-model", *BASE, f"train.resume={base / 'checkpoints' / 'step_00000008'}",
                    "model.n_layer=3", "model.dropout=0.0", "model.kernels=auto")
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "model.n_layer 2 -> 3" in lines[0] and "model.dropout 0.1 -> 0.0" in lines[0]
    assert "model.kernels" not in lines[0].split("(only")[0]  # the same model, another implementation
    assert not (root / "runs" / "other-model" / "checkpoints").exists()


# --------------------------------------------- steps replayed after a kill: the very same state

REPLAY = ["train.max_steps=7", "train.checkpoint_every=3", "model.dropout=0.1", "train.eval_every=1000",
          "train.sample_tokens=0", "model.kernels=fused", "train.peak_tflops=1"]
LAYOUTS = {"fused": ("gpt-tiny", []),
           "pp2-fused": ("gpt-tiny-pp2", ["parallel.micro_batch=4", "parallel.global_batch=8"])}


@pytest.mark.parametrize("layout", ["fused", pytest.param("pp2-fused", marks=pytest.mark.dist)])
def test_replayed_steps_end_in_identical_weights_and_adam_moments(root, layout):
    """Killed after step 5 (the checkpoint is step 3): steps 4 and 5 are replayed. The final
    consolidated weights and Adam moments equal the uninterrupted run's, bit for bit."""
    recipe, extra = LAYOUTS[layout]
    ref = run_train(root, f"replay-ref-{layout}", *REPLAY, *extra, recipe=recipe, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "kernels: fused" in ref.stdout
    name = f"replay-{layout}"
    killed = run_train(root, name, *REPLAY, *extra, recipe=recipe, timeout=600, RECIPES_FAULT_KILL_AFTER_STEP="5")
    assert killed.returncode != 0 and max(train_losses(root, name)) == 5, killed.stderr[-3000:]
    resumed = run_train(root, name, *REPLAY, *extra, "train.resume=auto", recipe=recipe, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step_00000003" in resumed.stdout
    a, b = train_losses(root, f"replay-ref-{layout}"), train_losses(root, name)
    assert [a[s] for s in range(4, 8)] == [b[s] for s in range(4, 8)]
    final = "checkpoints/step_00000007"
    _assert_identical(root / "runs" / f"replay-ref-{layout}" / final, root / "runs" / name / final)
    if layout == "pp2-fused":
        _corrupted_is_refused_by_every_rank(root, name, recipe, extra)


def _corrupted_is_refused_by_every_rank(root: Path, name: str, recipe: str, extra: list[str]) -> None:
    """Two processes resume a checkpoint with an altered file: one line, exit 2, and rank 1 stops
    with the very same message (in its log)."""
    run = root / "runs" / name
    target = sorted((run / "checkpoints" / "step_00000007" / "model").glob("layer_*"))[-1]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    out = run_train(root, name, *REPLAY, *extra, "train.max_steps=9", "train.resume=auto", recipe=recipe,
                    timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and target.name in lines[0] and "does not match" in lines[0], out.stderr
    assert "step_00000006" in lines[0]  # the complete checkpoint to use instead
    assert lines[0].removeprefix("error: ") in (run / "logs" / "rank1.log").read_text()
