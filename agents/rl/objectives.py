r"""The per-agent objective as losses over token-level tensors (pure functions, no state but the
`MovingAverageBaseline`).

For agent i with policy pi = pi_theta, discount gamma and entropy weight alpha, the objective is

    J(theta) = E[ sum_{t=0..T} gamma^t r_t ] + alpha * H(pi)

and each loss below is minimised, so it is the negative of its part of J.

Two levels of tensors:
  * episode steps, [B, S]: `rewards[b, t]` is this agent's reward at environment step t of episode b
    (0 where it got none, e.g. before the listener has answered), `step_mask[b, t]` is 1 for the
    steps the episode has (0 for padding after its end). Returns and advantages are computed here.
  * tokens, [N, L]: one row per action this agent generated (an (episode, step) pair where it
    acted, in any order), one column per generated position. `logprobs[n, l]` = log pi(y_l | prompt,
    y_<l) of the sampled token, `entropy[n, l]` = the exact entropy -sum_v p_v log p_v of the full
    next-token distribution at that position (computed elsewhere, e.g. by
    `model.kernels.token_logprob_and_entropy`), `mask[n, l]` = 1 on generated tokens, 0 on prompt and
    padding. A row's advantage `advantages[n]` (or one per token, [N, L]) weights all its tokens.
    Select the rows of a [B, S] tensor with a boolean mask of the steps where the agent acted:
    `returns[acted]` gives them in (episode, step) order.

Masks are bool or 0/1; masked-out positions take no part, even when they hold NaN or inf. Where
several agents' rows share one batch, `gamma` and `alpha` may be per-row tensors.

Normalisation (`normalizer`, the Z in the formulas): "rows" = the number of rows with at least one
token in the mask (default), "tokens" = the number of tokens in the mask, or a positive number.
Since log pi(action) = sum_l logprobs[n, l], the policy-gradient loss with Z = the number of episodes
B has exactly the gradient -(1/B) sum_b sum_t A_{b,t} grad log pi(a_{b,t} | s_{b,t}), the REINFORCE
estimate of -grad E[sum_t gamma^t r_t] when A is `discounted_returns(..., from_start=True)` minus a
baseline that does not depend on the action (and with from_start=False, the usual reward-to-go,
which drops the gamma^t weight of late steps). With one step per episode "rows" is that Z.
"""

from __future__ import annotations

import math

import torch

__all__ = ["MovingAverageBaseline", "discounted_returns", "entropy_loss", "grpo_advantages", "kl_estimate",
           "masked_mean", "masked_sum", "normalize_advantages", "objective_loss", "policy_gradient_loss",
           "ppo_policy_loss", "ppo_stats", "reinforce_advantages", "value_loss"]

ALGORITHMS = ("reinforce", "grpo", "ppo")


# --------------------------------------------------------------------------------------------------
# Helpers.


def _bool_mask(mask, like):
    if mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    mask = torch.as_tensor(mask, device=like.device)
    return mask if mask.dtype == torch.bool else mask != 0


def _zero_where_masked(x, mask):
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x, mask=None):
    """sum of x over the positions where mask is set (NaN/inf elsewhere ignored)."""
    m = _bool_mask(mask, x)
    return _zero_where_masked(x, m.expand(x.shape)).sum()


def masked_mean(x, mask=None):
    """mean of x over the positions where mask is set; 0 when none is."""
    m = _bool_mask(mask, x).expand(x.shape)
    return masked_sum(x, m) / m.sum().clamp(min=1)


def _normalizer(mask, normalizer) -> float | torch.Tensor:
    if isinstance(normalizer, str):
        if normalizer == "rows":
            rows = mask.reshape(mask.shape[0], -1).any(dim=1) if mask.dim() > 1 else mask
            return rows.sum().clamp(min=1)
        if normalizer == "tokens":
            return mask.sum().clamp(min=1)
    elif isinstance(normalizer, (int, float)) and not isinstance(normalizer, bool) and normalizer > 0:
        return float(normalizer)
    raise ValueError(f"normalizer must be 'rows', 'tokens' or a positive number, got {normalizer!r}")


def _per_row(value, n: int, like, name: str, lo: float, hi: float | None):
    """A float, or a tensor [n] of per-row values, checked against [lo, hi], as a tensor [n, 1]."""
    try:
        t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a number or one per row ({n} rows), got {value!r}") from None
    bad = (t < lo) | (t > hi) if hi is not None else t < lo
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != n) or bad.any() or t.isnan().any():
        allowed = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {allowed} (a number or one per row, {n} rows), got {value!r}")
    return t.reshape(-1, 1) if t.dim() == 1 else t


def _row_advantages(advantages, like):
    a = torch.as_tensor(advantages, dtype=like.dtype, device=like.device)
    if a.dim() == 1:
        a = a.unsqueeze(1)
    if a.shape[0] != like.shape[0]:
        raise ValueError(f"advantages must have one value per row ({like.shape[0]}) or per token "
                         f"{tuple(like.shape)}, got shape {tuple(a.shape)}")
    return a.expand(like.shape)


# --------------------------------------------------------------------------------------------------
# Returns and advantages (episode-step level).


def discounted_returns(rewards, gamma, step_mask=None, *, from_start: bool = False):
    r"""Discounted returns of each step, [B, S] from rewards [B, S]:

        G_{b,t} = sum_{k=t}^{S-1} gamma_b^(k-t) r_{b,k}          (from_start=False: reward-to-go)
        gamma_b^t * G_{b,t} = sum_{k>=t} gamma_b^k r_{b,k}       (from_start=True)

    The second is the part of the episode's return sum_k gamma^k r_k that the action at step t can
    change, so sum_t gamma^t G_t grad log pi(a_t|s_t) is an unbiased estimate of grad E[sum_t
    gamma^t r_t] (the objective exactly); the first is the common practice. gamma: a number in
    [0, 1] or one per episode, [B] (per-agent discounts when several agents' episodes share the
    tensor). Rewards at masked steps count as 0, and masked steps get 0. rewards may be [B] (one
    step per episode: returns are the rewards)."""
    r = torch.as_tensor(rewards)
    if not r.is_floating_point():
        r = r.double()
    squeeze = r.dim() == 1
    if squeeze:
        r = r.unsqueeze(1)
    if r.dim() != 2:
        raise ValueError(f"rewards must be [B, S] (or [B]), got shape {tuple(r.shape)}")
    m = _bool_mask(step_mask, r.squeeze(1) if squeeze else r)
    m = m.reshape(r.shape)
    g = _per_row(gamma, r.shape[0], r, "gamma", 0.0, 1.0)
    r = _zero_where_masked(r, m)
    out = torch.zeros_like(r)
    g_row = g.reshape(-1) if g.dim() else g
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + g_row * running
        out[:, t] = running
    if from_start:
        out = out * g ** torch.arange(r.shape[1], dtype=r.dtype, device=r.device)
    out = _zero_where_masked(out, m)
    return out.squeeze(1) if squeeze else out


def reinforce_advantages(returns, mask=None, baseline="mean"):
    r"""A = R - b for returns R ([N] or [B, S]) over the entries in mask:

        "mean"  b = (1/n) sum_k R_k, the batch mean of the n entries (one b for all; biased by
                O(1/n) since an entry's own return is part of it)
        "loo"   b_j = (1/(n-1)) sum_{k != j} R_k, leave-one-out (RLOO; unbiased; b = 0 when n = 1)
        "none"  b = 0
        a number or a tensor broadcastable to R: that baseline (e.g. `MovingAverageBaseline.value`,
                or a value head's V(s) detached)

    Masked entries get 0."""
    r = torch.as_tensor(returns)
    m = _bool_mask(mask, r).expand(r.shape)
    n = m.sum()
    if isinstance(baseline, str):
        if baseline == "mean":
            b = masked_sum(r, m) / n.clamp(min=1)
        elif baseline == "loo":
            b = (masked_sum(r, m) - r) / (n - 1).clamp(min=1)
            b = torch.where(n > 1, b, torch.zeros_like(b))
        elif baseline == "none":
            b = torch.zeros((), dtype=r.dtype, device=r.device)
        else:
            raise ValueError(f"baseline must be 'mean', 'loo', 'none', a number or a tensor, got {baseline!r}")
    else:
        b = torch.as_tensor(baseline, dtype=r.dtype, device=r.device)
    return _zero_where_masked(r - b, m)


class MovingAverageBaseline:
    r"""An exponential moving average of returns as a REINFORCE baseline (one per agent):

        A = R - b_{k-1},     b_k = decay * b_{k-1} + (1 - decay) * mean(R of batch k)

    The batch's advantages use the average of the batches *before* it, so the baseline does not
    depend on the actions it weights (unbiased). Before any batch b_0 = 0, or `initial`.
    `state_dict()` / `load_state_dict()` for checkpoints."""

    def __init__(self, decay: float = 0.9, initial: float = 0.0):
        if not (isinstance(decay, (int, float)) and 0.0 <= decay < 1.0):
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.value = float(initial)
        self.batches = 0

    def advantages(self, returns, mask=None):
        """R - b (masked entries 0), then b takes in this batch's mean return."""
        r = torch.as_tensor(returns)
        m = _bool_mask(mask, r).expand(r.shape)
        adv = _zero_where_masked(r - self.value, m)
        if m.any():
            mean = float(masked_sum(r.detach().double(), m) / m.sum())
            self.value = self.decay * self.value + (1.0 - self.decay) * mean
            self.batches += 1
        return adv

    def state_dict(self) -> dict:
        return {"decay": self.decay, "value": self.value, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.value, self.batches = float(state["decay"]), float(state["value"]), int(state["batches"])


def grpo_advantages(returns, group_size: int, mask=None, *, eps: float = 1e-6, scale: bool = True):
    r"""Group-normalised advantages (GRPO): the rows of `returns` ([G * group_size] or
    [G * group_size, S]) come in consecutive groups of `group_size` episodes of the same prompt
    (task). Over the n_g entries of group g in the mask:

        mean_g = (1/n_g) sum R,   std_g = sqrt( sum (R - mean_g)^2 / (n_g - 1) )   (0 when n_g = 1)
        A = (R - mean_g) / (std_g + eps)       (scale=False: A = R - mean_g, as Dr. GRPO)

    (the sample standard deviation, as TRL's GRPO). A group whose returns are all equal gets A = 0.
    Masked entries get 0."""
    r = torch.as_tensor(returns)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    if r.dim() not in (1, 2) or r.shape[0] % group_size:
        raise ValueError(f"returns must have a multiple of group_size={group_size} rows, got shape {tuple(r.shape)}")
    m = _bool_mask(mask, r).expand(r.shape)
    shape = r.shape
    groups = shape[0] // group_size
    rg = _zero_where_masked(r, m).reshape(groups, -1)
    mg = m.reshape(groups, -1)
    n = mg.sum(dim=1, keepdim=True)
    mean = rg.sum(dim=1, keepdim=True) / n.clamp(min=1)
    dev = _zero_where_masked(rg - mean, mg)
    adv = dev
    if scale:
        var = (dev * dev).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
        adv = dev / (var.sqrt() + eps)
    return _zero_where_masked(adv, mg).reshape(shape)


def normalize_advantages(advantages, mask=None, eps: float = 1e-8):
    r"""(A - mean A) / (std A + eps) over the entries in mask (population std), the whitening PPO
    applies per batch. Masked entries get 0."""
    a = torch.as_tensor(advantages)
    m = _bool_mask(mask, a).expand(a.shape)
    mean = masked_mean(a, m)
    var = masked_mean((a - mean) ** 2, m)
    return _zero_where_masked((a - mean) / (var.sqrt() + eps), m)


# --------------------------------------------------------------------------------------------------
# Losses (token level).


def policy_gradient_loss(logprobs, advantages, mask=None, normalizer="rows"):
    r"""REINFORCE / GRPO surrogate (advantages are constants):

        L = -(1/Z) sum_{n,l} mask_{n,l} A_n logprobs_{n,l}

    grad L = -(1/Z) sum_n A_n grad log pi(row n's action) since the tokens' log-probabilities add up
    to the action's. advantages [N] (per row) or [N, L]; they are detached."""
    m = _bool_mask(mask, logprobs).expand(logprobs.shape)
    a = _zero_where_masked(_row_advantages(advantages, logprobs).detach(), m)
    return -(a * _zero_where_masked(logprobs, m)).sum() / _normalizer(m, normalizer)


def entropy_loss(entropy, mask=None, alpha=0.0, normalizer="rows"):
    r"""The entropy term of J as a loss:

        L_H = -(1/Z) sum_{n,l} mask_{n,l} alpha_n H_{n,l}

    where H_{n,l} is the exact entropy of the next-token distribution at each generated position.
    For a one-token action H is the policy's entropy H(pi(.|s)) and grad L_H = -alpha grad H
    exactly; over several tokens sum_l H_{n,l} has expectation the action's entropy (chain rule) and
    its gradient is taken through the entropies at the sampled prefixes only (the usual entropy
    bonus). alpha: a number >= 0 or one per row [N] (per-agent weights in a shared batch)."""
    m = _bool_mask(mask, entropy).expand(entropy.shape)
    al = _per_row(alpha, entropy.shape[0], entropy, "alpha", 0.0, None)
    return -(al * _zero_where_masked(entropy, m)).sum() / _normalizer(m, normalizer)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask=None, clip_eps: float = 0.2, normalizer="rows"):
    r"""PPO's clipped surrogate, per token:

        rho = exp(logprobs - old_logprobs)
        L = -(1/Z) sum_{n,l} mask min(rho A_n, clip(rho, 1 - eps, 1 + eps) A_n)

    Its gradient is -(1/Z) mask A rho grad logprobs where the min picks the unclipped term, 0 where it
    picks the clipped one (rho > 1 + eps with A > 0, rho < 1 - eps with A < 0). At rho = 1 (first
    epoch) it equals `policy_gradient_loss`'s. old_logprobs and advantages are detached."""
    if not (isinstance(clip_eps, (int, float)) and 0.0 < clip_eps < 1.0):
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps!r}")
    m = _bool_mask(mask, logprobs).expand(logprobs.shape)
    a = _zero_where_masked(_row_advantages(advantages, logprobs).detach(), m)
    diff = _zero_where_masked(logprobs, m) - _zero_where_masked(old_logprobs.detach(), m)
    ratio = diff.exp()
    surrogate = torch.minimum(ratio * a, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * a)
    return -surrogate.sum() / _normalizer(m, normalizer)


@torch.no_grad()
def ppo_stats(logprobs, old_logprobs, mask=None, clip_eps: float = 0.2) -> dict[str, float]:
    """{"clip_fraction": share of tokens in mask with |rho - 1| > eps, "approx_kl": k3 estimate of
    KL(old || new) per token} for logging."""
    m = _bool_mask(mask, logprobs).expand(logprobs.shape)
    diff = _zero_where_masked(logprobs - old_logprobs, m)
    clipped = ((diff.exp() - 1.0).abs() > clip_eps) & m
    return {"clip_fraction": float(clipped.sum() / m.sum().clamp(min=1)),
            "approx_kl": float(kl_estimate(old_logprobs, logprobs, m, kind="k3"))}


def value_loss(values, returns, mask=None, old_values=None, clip_eps: float | None = None, normalizer="rows"):
    r"""The value head's regression loss, values and returns [N] (a value per row, e.g. at the last
    prompt token) or [N, L]:

        L_V = (1/Z) sum mask * 1/2 (V - R)^2
        clipped (old_values and clip_eps given), as PPO2:
        L_V = (1/Z) sum mask * 1/2 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)

    returns (and old_values) are detached."""
    m = _bool_mask(mask, values).expand(values.shape)
    v = _zero_where_masked(values, m)
    r = _zero_where_masked(torch.as_tensor(returns, dtype=values.dtype, device=values.device).detach()
                           .expand(values.shape), m)
    err = (v - r) ** 2
    if clip_eps is not None:
        if old_values is None or not (isinstance(clip_eps, (int, float)) and clip_eps > 0):
            raise ValueError(f"a clipped value loss needs old_values and clip_eps > 0, got clip_eps={clip_eps!r}")
        old = _zero_where_masked(old_values.detach().expand(values.shape), m)
        clipped = old + (v - old).clamp(-clip_eps, clip_eps)
        err = torch.maximum(err, (clipped - r) ** 2)
    return 0.5 * err.sum() / _normalizer(m, normalizer)


def kl_estimate(logprobs, ref_logprobs, mask=None, kind: str = "k3"):
    r"""Mean per-token estimate of KL(pi || pi_ref) from tokens sampled from pi, with
    log r = ref_logprobs - logprobs:  "k1": -log r;  "k3": r - 1 - log r (>= 0, unbiased, low variance;
    Schulman's estimators)."""
    m = _bool_mask(mask, logprobs).expand(logprobs.shape)
    log_r = _zero_where_masked(ref_logprobs - logprobs, m)
    if kind == "k1":
        per = -log_r
    elif kind == "k3":
        per = log_r.exp() - 1.0 - log_r
    else:
        raise ValueError(f"kind must be 'k1' or 'k3', got {kind!r}")
    return masked_mean(per, m)


def objective_loss(algorithm: str, logprobs, entropy, mask, advantages, *, alpha=0.0, old_logprobs=None,
                   values=None, returns=None, old_values=None, clip_eps: float = 0.2,
                   value_clip_eps: float | None = None, vf_coef: float = 0.5, normalizer="rows"):
    r"""One agent's loss for its algorithm, -J as minimised:

        reinforce, grpo:  L = policy_gradient_loss(A) + entropy_loss(alpha)
        ppo:              L = ppo_policy_loss(A, clip_eps) + entropy_loss(alpha)
                              + vf_coef * value_loss(values, returns)

    (advantages from `reinforce_advantages`, `grpo_advantages`, or for PPO returns - V or
    `normalize_advantages` of it; values and returns [N], one per row, with the value loss divided by
    the same Z as the policy term.) Returns {"loss", "policy", "entropy", "value"} (value 0 unless
    ppo; entropy is the term -alpha H / Z, so its gradient is -alpha grad H / Z)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    h = entropy_loss(entropy, mask, alpha, normalizer)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    if algorithm == "ppo":
        if old_logprobs is None or values is None or returns is None:
            raise ValueError("ppo needs old_logprobs, values and returns")
        pol = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps, normalizer)
        val = value_loss(values, returns, None, old_values, value_clip_eps, normalizer)
        if not (isinstance(vf_coef, (int, float)) and vf_coef >= 0 and math.isfinite(vf_coef)):
            raise ValueError(f"vf_coef must be a number >= 0, got {vf_coef!r}")
        return {"loss": pol + h + vf_coef * val, "policy": pol, "entropy": h, "value": val}
    pol = policy_gradient_loss(logprobs, advantages, mask, normalizer)
    return {"loss": pol + h, "policy": pol, "entropy": h, "value": zero}
