"""agents.rl.objectives against independent references: every formula recomputed with Python loops
in float64, and the gradients of the losses on tiny categorical policies against closed forms and
torch.autograd on exactly computed objectives (enumerating every action)."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest
import torch

from agents.rl.objectives import (
    MovingAverageBaseline,
    discounted_returns,
    entropy_loss,
    grpo_advantages,
    kl_estimate,
    masked_mean,
    normalize_advantages,
    objective_loss,
    policy_gradient_loss,
    ppo_policy_loss,
    ppo_stats,
    reinforce_advantages,
    value_loss,
)
from model.kernels.reference import token_entropy, token_logprob_and_entropy

D = torch.float64


def close(a, b, tol=1e-12):
    a = torch.as_tensor(a, dtype=D)
    b = torch.as_tensor(b, dtype=D)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=tol, atol=tol), (a, b)


def rand_batch(seed, n=5, length=7, nan_padding=True):
    """logprobs/entropy/mask [n, length] with rows of different lengths (one empty) and NaN padding."""
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(n, length, generator=g, dtype=D) * 3
    entropy = torch.rand(n, length, generator=g, dtype=D) * 2
    lengths = [length, 3, 0, 1, length - 2][:n]
    mask = torch.tensor([[j < lengths[i] for j in range(length)] for i in range(n)])
    if nan_padding:
        logprobs = logprobs.masked_fill(~mask, float("nan"))
        entropy = entropy.masked_fill(~mask, float("nan"))
    return logprobs, entropy, mask


def rows_and_tokens(mask):
    m = mask.tolist()
    return sum(any(r) for r in m), sum(sum(r) for r in m)


# --------------------------------------------------------------------------------------------------
# Returns and advantages.


def hand_returns(rewards, gammas, lengths, from_start):
    out = []
    for b, row in enumerate(rewards):
        g = gammas[b]
        res = []
        for t in range(len(row)):
            if t >= lengths[b]:
                res.append(0.0)
                continue
            total = 0.0
            for k in range(t, lengths[b]):
                total += g ** (k - t) * row[k]
            res.append(g ** t * total if from_start else total)
        out.append(res)
    return out


@pytest.mark.parametrize("from_start", [False, True])
def test_discounted_returns_match_a_loop(from_start):
    rng = random.Random(0)
    rewards = [[rng.uniform(-2, 2) for _ in range(6)] for _ in range(4)]
    lengths = [6, 3, 1, 0]
    step_mask = torch.tensor([[t < n for t in range(6)] for n in lengths])
    # Padding after an episode's end holds garbage: it must not leak into the returns.
    padded = [[r if t < lengths[b] else 1e6 for t, r in enumerate(row)] for b, row in enumerate(rewards)]
    for gamma in (0.9, 1.0, 0.0):
        got = discounted_returns(torch.tensor(padded, dtype=D), gamma, step_mask, from_start=from_start)
        close(got, hand_returns(rewards, [gamma] * 4, lengths, from_start))
    per_agent = [0.5, 1.0, 0.99, 0.0]  # a gamma per episode (rows of different agents)
    got = discounted_returns(torch.tensor(padded, dtype=D), torch.tensor(per_agent, dtype=D), step_mask,
                             from_start=from_start)
    close(got, hand_returns(rewards, per_agent, lengths, from_start))


def test_discounted_returns_of_the_signalling_speaker():
    # The speaker acts at step 0, the shared reward arrives at step 1: G_0 = gamma * r_1.
    r = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=D)
    close(discounted_returns(r, 0.9), [[0.9, 1.0], [0.0, 0.0]])
    close(discounted_returns(torch.tensor([1.0, 0.0, 1.0], dtype=D), 0.5), [1.0, 0.0, 1.0])  # one-step episodes


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan"), "0.9", [0.9, 0.9, 0.9]])
def test_gamma_outside_0_1_is_one_line(gamma):
    with pytest.raises(ValueError, match=r"^gamma must be"):
        discounted_returns(torch.zeros(2, 3, dtype=D), gamma)


def test_reinforce_baselines_match_a_loop():
    rng = random.Random(1)
    R = [rng.uniform(-1, 3) for _ in range(7)]
    mask = [True, True, False, True, True, True, False]
    valid = [r for r, m in zip(R, mask) if m]
    t, tm = torch.tensor(R, dtype=D), torch.tensor(mask)
    mean = sum(valid) / len(valid)
    close(reinforce_advantages(t, tm, "mean"), [r - mean if m else 0.0 for r, m in zip(R, mask)])
    loo = [r - (sum(valid) - r) / (len(valid) - 1) if m else 0.0 for r, m in zip(R, mask)]
    close(reinforce_advantages(t, tm, "loo"), loo)
    close(reinforce_advantages(t, tm, "none"), [r if m else 0.0 for r, m in zip(R, mask)])
    close(reinforce_advantages(t, tm, 0.25), [r - 0.25 if m else 0.0 for r, m in zip(R, mask)])
    v = [rng.uniform(-1, 1) for _ in R]
    close(reinforce_advantages(t, tm, torch.tensor(v, dtype=D)), [r - b if m else 0.0 for r, b, m in zip(R, v, mask)])
    close(reinforce_advantages(torch.tensor([2.0], dtype=D), None, "loo"), [2.0])  # one entry: b = 0
    with pytest.raises(ValueError, match="^baseline must be 'mean', 'loo', 'none', a number or a tensor"):
        reinforce_advantages(t, tm, "median")


def test_moving_average_baseline_uses_only_earlier_batches():
    base = MovingAverageBaseline(decay=0.8)
    b = 0.0
    rng = random.Random(2)
    for _ in range(5):
        R = [rng.uniform(0, 1) for _ in range(4)]
        close(base.advantages(torch.tensor(R, dtype=D)), [r - b for r in R])
        b = 0.8 * b + 0.2 * sum(R) / 4
        assert base.value == pytest.approx(b, abs=1e-15)
    copy = MovingAverageBaseline(0.5)
    copy.load_state_dict(base.state_dict())
    assert copy.state_dict() == base.state_dict() == {"decay": 0.8, "value": base.value, "batches": 5}
    with pytest.raises(ValueError, match=r"^decay must be in \[0, 1\), got 1.0$"):
        MovingAverageBaseline(1.0)


@pytest.mark.parametrize("scale", [True, False])
def test_grpo_advantages_match_statistics_per_group(scale):
    rng = random.Random(3)
    group_size, groups = 4, 3
    R = [float(rng.randint(0, 1)) for _ in range(group_size * groups)]
    R[4:8] = [1.0, 1.0, 1.0, 1.0]  # a group where every episode got the same reward
    mask = [True] * len(R)
    mask[9] = False
    expected = []
    for g in range(groups):
        rows = list(range(g * group_size, (g + 1) * group_size))
        vals = [R[i] for i in rows if mask[i]]
        mean = statistics.fmean(vals)
        std = statistics.stdev(vals)  # sample standard deviation (n - 1)
        for i in rows:
            if not mask[i]:
                expected.append(0.0)
            else:
                expected.append((R[i] - mean) / (std + 1e-6) if scale else R[i] - mean)
    got = grpo_advantages(torch.tensor(R, dtype=D), group_size, torch.tensor(mask), scale=scale)
    close(got, expected, tol=1e-9)
    assert got[4:8].abs().max() == 0  # no signal from a group with one outcome
    # Multi-step returns [B, S]: statistics over all of the group's (episode, step) entries.
    R2 = torch.tensor([[1.0, 0.5], [0.0, 9.0], [2.0, 0.0], [3.0, 1.0]], dtype=D)
    m2 = torch.tensor([[True, True], [True, False], [True, False], [True, True]])
    got2 = grpo_advantages(R2, 2, m2)
    for rows in [(0, 1), (2, 3)]:
        entries = [(i, t) for i in rows for t in range(2) if m2[i, t]]
        vals = [R2[i, t].item() for i, t in entries]
        mean, std = statistics.fmean(vals), statistics.stdev(vals)
        for i, t in entries:
            assert got2[i, t].item() == pytest.approx((R2[i, t].item() - mean) / (std + 1e-6), abs=1e-12)
    assert got2[1, 1] == 0 and got2[2, 1] == 0
    with pytest.raises(ValueError, match=r"^returns must have a multiple of group_size=5 rows, got shape \(12,\)$"):
        grpo_advantages(torch.tensor(R, dtype=D), 5)
    with pytest.raises(ValueError, match=r"^group_size must be an integer >= 1, got 0$"):
        grpo_advantages(torch.tensor(R, dtype=D), 0)


def test_normalize_advantages_matches_population_statistics():
    A = [0.3, -1.0, 2.5, 0.0, 7.0]
    mask = [True, True, True, True, False]
    vals = A[:4]
    mean, std = statistics.fmean(vals), statistics.pstdev(vals)
    close(normalize_advantages(torch.tensor(A, dtype=D), torch.tensor(mask)),
          [(a - mean) / (std + 1e-8) for a in vals] + [0.0])


# --------------------------------------------------------------------------------------------------
# Token-level losses against loops.


@pytest.mark.parametrize("normalizer", ["rows", "tokens", 3.0])
def test_policy_gradient_and_entropy_losses_match_loops(normalizer):
    logprobs, entropy, mask = rand_batch(0)
    A = [0.5, -1.25, 3.0, 2.0, -0.1]
    alphas = [0.0, 0.1, 0.2, 0.3, 0.05]
    rows, tokens = rows_and_tokens(mask)
    Z = {"rows": rows, "tokens": tokens}.get(normalizer, normalizer)
    pg = ent = ent_rows = 0.0
    for n in range(5):
        for t in range(7):
            if mask[n, t]:
                pg -= A[n] * logprobs[n, t].item()
                ent -= 0.2 * entropy[n, t].item()
                ent_rows -= alphas[n] * entropy[n, t].item()
    close(policy_gradient_loss(logprobs, torch.tensor(A, dtype=D), mask, normalizer), pg / Z)
    close(entropy_loss(entropy, mask, 0.2, normalizer), ent / Z)
    close(entropy_loss(entropy, mask, torch.tensor(alphas, dtype=D), normalizer), ent_rows / Z)
    # advantages per token
    A_tok = torch.arange(35, dtype=D).reshape(5, 7) / 10
    hand = -sum(A_tok[n, t].item() * logprobs[n, t].item() for n in range(5) for t in range(7) if mask[n, t])
    close(policy_gradient_loss(logprobs, A_tok, mask, normalizer), hand / Z)


def test_masked_positions_get_no_gradient_even_when_nan():
    logprobs, entropy, mask = rand_batch(1)
    lp = logprobs.clone().requires_grad_(True)
    ent = entropy.clone().requires_grad_(True)
    A = torch.tensor([1.0, float("nan"), 2.0, -1.0, 0.5], dtype=D)  # row 1 is valid: use a finite one
    A[1] = 0.7
    A_tok = A[:, None].expand(5, 7).clone().masked_fill(~mask, float("nan"))
    old = (logprobs - 0.1).masked_fill(~mask, float("inf"))
    values = torch.randn(5, 7, dtype=D).masked_fill(~mask, float("nan")).requires_grad_(True)
    loss = (policy_gradient_loss(lp, A_tok, mask) + entropy_loss(ent, mask, 0.3)
            + ppo_policy_loss(lp, old, A_tok, mask) + value_loss(values, torch.zeros(5, 7, dtype=D), mask))
    loss.backward()
    assert torch.isfinite(loss)
    for t in (lp, ent, values):
        assert torch.isfinite(t.grad).all() and (t.grad[~mask] == 0).all()
        assert (t.grad[mask] != 0).any()
    assert kl_estimate(logprobs, old, mask).isfinite()
    assert masked_mean(logprobs, mask).isfinite()


def hand_ppo(lp, old, A, mask, eps):
    total, grads, clipped = 0.0, {}, 0
    for n in range(len(lp)):
        for t in range(len(lp[n])):
            if not mask[n][t]:
                continue
            rho = math.exp(lp[n][t] - old[n][t])
            a = A[n]
            unclipped, clip_term = rho * a, min(max(rho, 1 - eps), 1 + eps) * a
            total += min(unclipped, clip_term)
            # d/dlp of the min: the unclipped term's rho * a unless the clipped term is strictly smaller
            grads[n, t] = -rho * a if unclipped <= clip_term else 0.0
            clipped += abs(rho - 1) > eps
    return -total, grads, clipped


@pytest.mark.parametrize("normalizer", ["rows", "tokens"])
def test_ppo_surrogate_and_its_gradient_match_a_loop(normalizer):
    g = torch.Generator().manual_seed(4)
    lp = -torch.rand(4, 6, generator=g, dtype=D) * 2
    old = lp + (torch.rand(4, 6, generator=g, dtype=D) - 0.5)  # ratios from about 0.6 to 1.6
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 1:] = False
    A = [1.5, -2.0, 0.5, -0.3]
    eps = 0.2
    total, grads, clipped = hand_ppo(lp.tolist(), old.tolist(), A, mask.tolist(), eps)
    rows, tokens = rows_and_tokens(mask)
    Z = rows if normalizer == "rows" else tokens
    assert 0 < sum(v == 0.0 for v in grads.values()) < len(grads)  # both clipped and unclipped tokens
    x = lp.clone().requires_grad_(True)
    loss = ppo_policy_loss(x, old, torch.tensor(A, dtype=D), mask, eps, normalizer)
    close(loss, total / Z)
    loss.backward()
    close(x.grad, [[grads.get((n, t), 0.0) / Z for t in range(6)] for n in range(4)])
    stats = ppo_stats(lp, old, mask, eps)
    assert stats["clip_fraction"] == pytest.approx(clipped / tokens)
    k3 = statistics.fmean(math.exp(lp[n, t] - old[n, t]) - 1 - (lp[n, t] - old[n, t]).item()
                          for n in range(4) for t in range(6) if mask[n, t])
    assert stats["approx_kl"] == pytest.approx(k3, rel=1e-12)
    with pytest.raises(ValueError, match=r"^clip_eps must be in \(0, 1\), got 0$"):
        ppo_policy_loss(x, old, torch.tensor(A, dtype=D), mask, 0)


def test_ppo_at_ratio_one_has_the_policy_gradient():
    logprobs, _, mask = rand_batch(5)
    A = torch.tensor([0.5, -1.0, 2.0, 1.0, -0.25], dtype=D)
    a = logprobs.clone().requires_grad_(True)
    b = logprobs.clone().requires_grad_(True)
    ppo_policy_loss(a, logprobs.detach(), A, mask).backward()
    policy_gradient_loss(b, A, mask).backward()
    close(a.grad, b.grad)


def test_value_loss_matches_a_loop_clipped_and_not():
    V = [0.5, 1.5, -0.2, 3.0]
    R = [1.0, 1.0, 0.0, 0.0]
    old = [0.4, 1.0, -0.5, 2.0]
    mask = [True, True, True, False]
    eps = 0.2
    plain = sum(0.5 * (v - r) ** 2 for v, r, m in zip(V, R, mask) if m) / 3
    clipped = sum(0.5 * max((v - r) ** 2, (o + min(max(v - o, -eps), eps) - r) ** 2)
                  for v, r, o, m in zip(V, R, old, mask) if m) / 3
    t = torch.tensor(V, dtype=D, requires_grad=True)
    close(value_loss(t, torch.tensor(R, dtype=D), torch.tensor(mask)), plain)
    loss = value_loss(t, torch.tensor(R, dtype=D), torch.tensor(mask), torch.tensor(old, dtype=D), eps)
    close(loss, clipped)
    loss.backward()
    # V=1.5, old=1.0: the clipped prediction 1.2 is nearer R=1 than 1.5, so the max keeps (V - R)^2.
    # V=-0.2, old=-0.5: clipped -0.3 is farther from R=0 than -0.2, so the max is the clipped term (no gradient).
    close(t.grad, [(0.5 - 1.0) / 3, (1.5 - 1.0) / 3, 0.0, 0.0])
    with pytest.raises(ValueError, match="clipped value loss needs old_values"):
        value_loss(t, torch.tensor(R, dtype=D), None, None, 0.2)


def test_kl_estimators_match_a_loop():
    lp = [[-1.0, -0.5], [-2.0, -0.1]]
    ref = [[-1.2, -0.4], [-1.0, -3.0]]
    mask = [[True, True], [True, False]]
    pairs = [(lp[i][j], ref[i][j]) for i in range(2) for j in range(2) if mask[i][j]]
    k1 = statistics.fmean(a - b for a, b in pairs)
    k3 = statistics.fmean(math.exp(b - a) - 1 - (b - a) for a, b in pairs)
    args = torch.tensor(lp, dtype=D), torch.tensor(ref, dtype=D), torch.tensor(mask)
    close(kl_estimate(*args, kind="k1"), k1)
    close(kl_estimate(*args, kind="k3"), k3)


@pytest.mark.parametrize("alpha", [-0.1, float("nan"), [0.1, -1.0]])
def test_negative_alpha_is_one_line(alpha):
    _, entropy, mask = rand_batch(0, n=2)
    with pytest.raises(ValueError, match=r"^alpha must be >= 0.0"):
        entropy_loss(entropy, mask, alpha)


def test_bad_normalizer_and_algorithm_are_one_line():
    logprobs, entropy, mask = rand_batch(0)
    with pytest.raises(ValueError, match="^normalizer must be 'rows', 'tokens' or a positive number, got 'episodes'$"):
        policy_gradient_loss(logprobs, torch.zeros(5, dtype=D), mask, "episodes")
    with pytest.raises(ValueError, match="^algorithm must be one of reinforce, grpo, ppo, got 'a2c'$"):
        objective_loss("a2c", logprobs, entropy, mask, torch.zeros(5, dtype=D))
    with pytest.raises(ValueError, match="^ppo needs old_logprobs, values and returns$"):
        objective_loss("ppo", logprobs, entropy, mask, torch.zeros(5, dtype=D))


# --------------------------------------------------------------------------------------------------
# Gradients on tiny categorical policies.

R3 = [1.0, 0.0, 2.5]  # reward of each of 3 actions


def categorical(theta):
    """log p and the exact entropy of softmax(theta), written out (the reference)."""
    logp = theta - torch.logsumexp(theta, 0)
    return logp, -(logp.exp() * logp).sum()


def one_token_rows(theta, actions):
    """The policy as the token layer sees it, in float64: (logprobs, entropy) [N, 1] for N one-token
    actions a_n under softmax(theta)."""
    logp, H = categorical(theta)
    lp = torch.stack([logp[a] for a in actions]).reshape(-1, 1)
    return lp, H.expand(len(actions), 1)


def test_one_token_rows_are_what_the_token_layer_computes():
    theta = torch.tensor([0.3, -0.2, 0.1], dtype=D, requires_grad=True)
    lp, ent = one_token_rows(theta, [2, 0])
    lp32, ent32 = token_logprob_and_entropy(theta.expand(2, 1, 3), torch.tensor([[2], [0]]))  # float32
    close(lp32, lp.detach(), tol=1e-6)
    close(ent32, ent.detach(), tol=1e-6)
    g = torch.autograd.grad((lp * 0.3 + ent * 0.7).sum(), theta)[0]
    g32 = torch.autograd.grad((lp32 * 0.3 + ent32 * 0.7).sum(), theta)[0]
    close(g32, g, tol=1e-6)


def test_expected_policy_gradient_is_the_closed_form():
    """E_a[grad L(a)] = -grad E[r] = -p * (r - E[r]) for a softmax policy, whatever the constant
    baseline; one-sample losses are weighted by p(a) (exact expectation, no sampling)."""
    theta0 = torch.tensor([0.3, -0.2, 0.1], dtype=D)
    p = theta0.softmax(0)
    mean_r = sum(pi * r for pi, r in zip(p.tolist(), R3))
    closed = [-pi * (r - mean_r) for pi, r in zip(p.tolist(), R3)]
    for baseline in (0.0, 0.7, mean_r):
        expected = torch.zeros(3, dtype=D)
        for a in range(3):
            theta = theta0.clone().requires_grad_(True)
            lp, _ = one_token_rows(theta, [a])
            loss = policy_gradient_loss(lp, torch.tensor([R3[a] - baseline], dtype=D), torch.ones(1, 1, dtype=torch.bool))
            (grad,) = torch.autograd.grad(loss, theta)
            expected += p[a] * grad
        close(expected, closed)
    # ... and autograd on E[r] computed exactly agrees (the sign: descending L ascends E[r]).
    theta = theta0.clone().requires_grad_(True)
    (grad_J,) = torch.autograd.grad((theta.softmax(0) * torch.tensor(R3, dtype=D)).sum(), theta)
    close(grad_J, [-c for c in closed])


def test_sampled_policy_gradient_with_baselines_converges_to_the_closed_form():
    theta0 = torch.tensor([0.3, -0.2, 0.1], dtype=D)
    p = theta0.softmax(0)
    mean_r = sum(pi * r for pi, r in zip(p.tolist(), R3))
    closed = torch.tensor([-pi * (r - mean_r) for pi, r in zip(p.tolist(), R3)], dtype=D)
    n = 20000
    actions = torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(0)).tolist()
    returns = torch.tensor([R3[a] for a in actions], dtype=D)
    for baseline in ("none", "mean", "loo"):
        theta = theta0.clone().requires_grad_(True)
        lp, _ = one_token_rows(theta, actions)
        adv = reinforce_advantages(returns, None, baseline)
        (grad,) = torch.autograd.grad(policy_gradient_loss(lp, adv, torch.ones(n, 1, dtype=torch.bool)), theta)
        # standard error of each component is below 0.01 at n = 20000 for these rewards
        assert (grad - closed).abs().max() < 0.04, (baseline, grad, closed)


def test_entropy_term_gradient_is_alpha_times_the_exact_entropy_gradient():
    alpha = 0.37
    for theta0 in ([0.3, -0.2, 0.1], [4.0, -3.0, 0.0], [0.0, 0.0, 0.0]):
        theta = torch.tensor(theta0, dtype=D, requires_grad=True)
        _, ent = one_token_rows(theta, [0])  # [1, 1]
        (grad_loss,) = torch.autograd.grad(entropy_loss(ent, None, alpha), theta)
        theta_ref = torch.tensor(theta0, dtype=D, requires_grad=True)
        H = torch.distributions.Categorical(logits=theta_ref).entropy()  # torch's own exact entropy
        (grad_H,) = torch.autograd.grad(H, theta_ref)
        close(grad_loss, -alpha * grad_H)
        # the same through the token layer's entropy (float32 inside)
        (grad32,) = torch.autograd.grad(entropy_loss(token_entropy(theta.reshape(1, 1, 3)), None, alpha), theta)
        close(grad32, -alpha * grad_H, tol=1e-6)
        # closed form dH/dtheta_k = -p_k (log p_k + H)
        p = torch.tensor(theta0, dtype=D).softmax(0)
        Hv = -(p * p.log()).sum()
        close(grad_H, -p * (p.log() + Hv))
        close(ent, [[Hv.item()]])
        # one engine over several agents: rows with their own alpha, padding rows ignored
        ents = one_token_rows(theta, [0, 1, 2])[1].expand(3, 2)
        mask = torch.tensor([[True, False], [True, False], [False, False]])
        (g2,) = torch.autograd.grad(entropy_loss(ents, mask, torch.tensor([0.1, 0.5, 9.0], dtype=D), normalizer=1.0),
                                    theta)
        close(g2, -(0.1 + 0.5) * grad_H)


def test_exact_gradient_ascent_reaches_the_entropy_regularised_optimum():
    """max_p sum_a p_a r_a + alpha H(p) is p = softmax(r / alpha). Descend the losses' exact expected
    gradient (each action's loss weighted by p(a) through per-row alpha and advantages)."""
    for alpha, lr in ((0.5, 5.0), (2.0, 1.0)):
        target = torch.tensor(R3, dtype=D).div(alpha).softmax(0)
        theta = torch.zeros(3, dtype=D, requires_grad=True)
        opt = torch.optim.SGD([theta], lr=lr)
        for _ in range(2000):
            if (theta.softmax(0).detach() - target).abs().max() < 1e-10:
                break
            opt.zero_grad()
            p = theta.softmax(0).detach()
            lp, ent = one_token_rows(theta, [0, 1, 2])
            mean_r = float((p * torch.tensor(R3, dtype=D)).sum())
            adv = p * (torch.tensor(R3, dtype=D) - mean_r)  # p(a) * A(a): the expectation over a
            out = objective_loss("reinforce", lp, ent, torch.ones(3, 1, dtype=torch.bool), adv, alpha=alpha * p,
                                 normalizer=1.0)
            out["loss"].backward()
            opt.step()
        close(theta.softmax(0).detach(), target, tol=1e-9)


def test_discounted_two_step_gradient_is_the_gradient_of_the_discounted_objective():
    """A two-step game: the agent picks a0 from softmax(theta0), then a1 from softmax(theta1[a0]);
    r0 = u[a0] at step 0, r1 = w[a0, a1] at step 1. Summing over all 9 trajectories, the expected
    gradient of the loss with A_t = gamma^t G_t (from_start=True) is -grad J exactly, J = E[r0 + gamma r1]
    written out; the reward-to-go without gamma^t is not (unless gamma = 1)."""
    gamma = 0.7
    u = torch.tensor([0.2, -0.5, 1.0], dtype=D)
    w = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.5, 0.0], [0.0, 3.0, -0.5]], dtype=D)
    th0 = torch.tensor([0.1, -0.3, 0.2], dtype=D, requires_grad=True)
    th1 = torch.tensor([[0.0, 0.5, -0.5], [0.3, 0.0, 0.1], [-0.2, 0.4, 0.0]], dtype=D, requires_grad=True)

    p0 = th0.softmax(0)
    p1 = th1.softmax(1)
    J = sum(p0[a0] * p1[a0, a1] * (u[a0] + gamma * w[a0, a1]) for a0, a1 in itertools.product(range(3), repeat=2))
    grad_J = torch.autograd.grad(J, (th0, th1))

    for from_start, exact in ((True, True), (False, False)):
        expected = [torch.zeros_like(th0), torch.zeros_like(th1)]
        for a0, a1 in itertools.product(range(3), repeat=2):
            weight = (p0[a0] * p1[a0, a1]).item()
            rewards = torch.tensor([[u[a0].item(), w[a0, a1].item()]], dtype=D)
            adv = discounted_returns(rewards, gamma, from_start=from_start)[0]  # [2]: steps 0 and 1
            # one row per step, one token each
            lp = torch.stack([one_token_rows(th0, [a0])[0][0], one_token_rows(th1[a0], [a1])[0][0]])
            # the normaliser is the number of episodes (1), not the number of rows (2)
            loss = policy_gradient_loss(lp, adv, torch.ones(2, 1, dtype=torch.bool), normalizer=1.0)
            g0, g1 = torch.autograd.grad(loss, (th0, th1))
            expected[0] += weight * g0
            expected[1] += weight * g1
        matches = all(torch.allclose(e, -g, atol=1e-12) for e, g in zip(expected, grad_J))
        assert matches is exact


def test_grpo_on_a_bandit_pushes_towards_the_better_action():
    """Group of 4 samples of one prompt: actions with above-group-mean reward get their probability
    raised by a descent step on the loss, the others lowered."""
    theta = torch.zeros(3, dtype=D, requires_grad=True)
    actions = [0, 1, 2, 2]
    rewards = torch.tensor([R3[a] for a in actions], dtype=D)
    adv = grpo_advantages(rewards, group_size=4)
    lp, _ = one_token_rows(theta, actions)
    loss = policy_gradient_loss(lp, adv, torch.ones(4, 1, dtype=torch.bool))
    (grad,) = torch.autograd.grad(loss, theta)
    new_p = (theta - 0.1 * grad).softmax(0)
    assert new_p[2] > 1 / 3 > new_p[1] and new_p[0] < 1 / 3
    # the closed form of the step: -grad = (1/4) sum_i A_i (e_{a_i} - p)
    p = torch.full((3,), 1 / 3, dtype=D)
    hand = sum(adv[i] * (torch.nn.functional.one_hot(torch.tensor(a), 3).to(D) - p) for i, a in enumerate(actions)) / 4
    close(-grad, hand)


def test_ppo_objective_combines_clipped_policy_entropy_and_value_terms():
    logprobs, entropy, mask = rand_batch(6, nan_padding=False)
    old = logprobs + 0.3
    A = torch.tensor([1.0, -1.0, 0.5, 0.2, -0.4], dtype=D)
    V = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=D)
    R = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], dtype=D)
    out = objective_loss("ppo", logprobs, entropy, mask, A, alpha=0.1, old_logprobs=old, values=V, returns=R,
                         vf_coef=0.25)
    close(out["policy"], ppo_policy_loss(logprobs, old, A, mask))
    close(out["entropy"], entropy_loss(entropy, mask, 0.1))
    close(out["value"], sum(0.5 * (v - r) ** 2 for v, r in zip(V.tolist(), R.tolist())) / 5)
    close(out["loss"], out["policy"] + out["entropy"] + 0.25 * out["value"])
    out = objective_loss("grpo", logprobs, entropy, mask, A, alpha=0.1)
    close(out["loss"], policy_gradient_loss(logprobs, A, mask) + entropy_loss(entropy, mask, 0.1))
    assert out["value"] == 0
