"""Knowledge distillation (trainer/distill.py, `distill.*`): the loss against float64 references, the
run end to end through the command line, exact resume, bad settings."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
import torch.nn.functional as F

from tests.trainutil import run_train, train_losses, train_once
from trainer.distill import distill_loss


class _Fixed(torch.nn.Module):
    """A model that returns given logits (the student or the teacher of a loss test)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, x):
        return self.logits


@pytest.mark.parametrize("alpha,temperature", [(1.0, 1.0), (1.0, 2.5), (0.3, 2.0), (0.0, 1.0)])
def test_loss_is_hintons_kd_mixed_with_cross_entropy(alpha, temperature):
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    student, teacher = _Fixed(s), _Fixed(t)
    loss = distill_loss(student, (torch.zeros(2, 5, dtype=torch.long), y), "cpu", teacher, alpha, temperature)
    # Reference: F.kl_div in float64, batchmean over the 10 token positions, times T^2.
    sd, td = s.double().reshape(-1, 11), t.double().reshape(-1, 11)
    kl = F.kl_div(F.log_softmax(sd / temperature, -1), F.log_softmax(td / temperature, -1), log_target=True,
                  reduction="batchmean") * temperature ** 2
    ce = F.cross_entropy(sd, y.reshape(-1))
    torch.testing.assert_close(loss.double(), alpha * kl + (1 - alpha) * ce, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert student.logits.grad is not None and teacher.logits.grad is None  # the teacher is not trained


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    out = run_train(root, "teacher", "train.max_steps=20", "model.n_layer=2")
    assert out.returncode == 0, out.stderr[-3000:]
    return root


STUDENT = ["model.n_layer=1", "train.max_steps=10", "train.checkpoint_every=5", "distill.temperature=2.0"]


def test_student_learns_the_teacher_and_the_summary_compares_them(root):
    teacher_dir = root / "runs" / "teacher"
    out = run_train(root, "student", *STUDENT, f"distill.teacher={teacher_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    s = json.loads((root / "runs" / "student" / "summary.json").read_text())
    t = json.loads((teacher_dir / "summary.json").read_text())
    cfg = (root / "runs" / "student" / "config.yaml").read_text()
    assert f"tokenizer: {teacher_dir}/tokenizer.json" in cfg  # data.tokenizer defaulted to the teacher's
    # The teacher's loss on the whole validation split, measured by the student's run, is the one
    # the teacher's own run measured (same split, same evaluation).
    assert s["teacher_val_loss_full"] == pytest.approx(t["val_loss_full"], rel=1e-6)
    assert s["ppl_ratio_student_teacher"] == pytest.approx(
        math.exp(s["val_loss_full"] - s["teacher_val_loss_full"]), rel=1e-12)
    assert s["params"] < s["teacher_params"]
    assert {b: set(t) for b, t in s["decode_tokens_per_s"].items()} == {"batch1": {"student", "teacher"},
                                                                       "batch8": {"student", "teacher"}}
    losses = train_losses(root, "student")  # the KL term, falling
    assert losses[10] < losses[1]


def test_a_student_with_another_tokenizer_is_refused(root):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(root / "runs" / "teacher" / "tokenizer.json"))
    tok.add_tokens(["<extra>"])
    tok.save(str(root / "other.json"))
    out = run_train(root, "other", *STUDENT, f"distill.teacher={root / 'runs' / 'teacher'}",
                    f"data.tokenizer={root / 'other.json'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "the teacher was trained with another tokenizer" in out.stderr.strip().splitlines()[-1]


def test_alpha_zero_is_the_plain_language_model_loss(root):
    """With alpha 0 only the cross-entropy term is left: the same losses as a run without a teacher."""
    plain = run_train(root, "plain2", *STUDENT, f"data.tokenizer={root / 'runs' / 'teacher' / 'tokenizer.json'}")
    kd0 = run_train(root, "alpha0", *STUDENT, f"distill.teacher={root / 'runs' / 'teacher'}", "distill.alpha=0")
    assert plain.returncode == 0 and kd0.returncode == 0, kd0.stderr[-3000:]
    a, b = train_losses(root, "plain2"), train_losses(root, "alpha0")
    assert list(a) == list(b) and all(a[k] == pytest.approx(b[k], rel=1e-6) for k in a)


def test_exact_resume_after_sigkill(root):
    """Killed after step 7 (checkpoint at 5), resumed: steps 6-10 as the uninterrupted student run."""
    teacher = f"distill.teacher={root / 'runs' / 'teacher'}"
    train_once(root, "student", *STUDENT, teacher)
    killed = run_train(root, "killed", *STUDENT, teacher, RECIPES_FAULT_KILL_AFTER_STEP="7")
    assert killed.returncode == -signal.SIGKILL
    resumed = run_train(root, "killed", *STUDENT, teacher, "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = train_losses(root, "student"), train_losses(root, "killed")
    assert [a[k] for k in range(6, 11)] == [b[k] for k in range(6, 11)]  # bit for bit


@pytest.mark.parametrize("override,message", [
    ("distill.teacher={root}/nope", "distill.teacher={root}/nope: not a run directory of ours"),
    ("distill.teacher=recipe:no-such-recipe", "no-such-recipe"),
    ("parallel.tp=2", "distill.teacher needs parallel.tp=1 and parallel.pp=1"),
    ("distill.alpha=1.5", "distill.alpha"),
])
def test_bad_settings_are_one_line(root, override, message):
    teacher = f"distill.teacher={root / 'runs' / 'teacher'}"
    out = run_train(root, "bad", *STUDENT, teacher, override.format(root=root))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert message.format(root=root) in out.stderr.strip().splitlines()[-1]


def test_the_distill_tiny_recipe_and_its_teacher_gpt_mini_run_at_reduced_size(root):
    """gpt-mini (distill-tiny's teacher) and distill-tiny, both reduced (tests/trainutil.py's TINY), the
    student distilled from that gpt-mini run."""
    out = run_train(root, "mini", "train.max_steps=3", "model.n_layer=2", recipe="gpt-mini")
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_train(root, "recipe", "train.max_steps=2", "model.n_layer=1",
                    f"distill.teacher={root / 'runs' / 'mini'}", recipe="distill-tiny")
    assert out.returncode == 0, out.stderr[-3000:]
    s = json.loads((root / "runs" / "recipe" / "summary.json").read_text())
    assert s["steps"] == 2 and s["teacher"] == str(root / "runs" / "mini")
    assert s["params"] < s["teacher_params"]


def test_a_recipe_teacher_that_has_not_finished_is_trained_first_or_named(tmp_path):
    """distill-tiny's teacher is recipe:gpt-mini: the launcher trains it first; a rank (which must
    find it finished) says which run is missing."""
    from launch.agents_chain import resolve_chain
    from trainer.errors import UsageError
    from trainer.recipe import load_recipe

    recipe = load_recipe("distill-tiny", [f"run.output_dir={tmp_path}"])
    with pytest.raises(UsageError, match=rf"distill.teacher=recipe:gpt-mini: {tmp_path}/gpt-mini has not finished"):
        resolve_chain(recipe, train_missing=False)
