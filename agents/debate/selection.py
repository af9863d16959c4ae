"""What each agent is fine-tuned on, from its own responses and the majority only (no ground truth).

Multi-agent (`debate_rows`): per problem, the pseudo-label is the majority of the last round's answers
(`debate_arith.majority`: >= min_votes votes, no tie; else the problem gives no data). Each agent plays
both roles of the multi-agent fine-tuning recipe:
    generator  its round-1 response, when its answer equals the pseudo-label;
    critic     its responses of rounds 2..R that equal the pseudo-label: "corrected" when its answer in
               the round before differed, "confirmed" when it already agreed.
With debate.critics=separate the critic role in seat i is its own model (critic_i): the rows of rounds
2..R are critic_i's, agent_i keeps its round-1 rows.
With debate.agent_data=split, problem k gives rows to seat k mod N only (its agent and its critic): the
agents learn from disjoint problems, as bagging's ensemble members learn from different samples, so
they are not all pulled towards the same answers on the same problems.
Single agent (`single_rows`): per problem, the pseudo-label is the majority of the agent's own samples
(same rule); its samples that equal it.

A row is (prompt token ids, generated token ids): the SFT loss is the cross-entropy of the generated
tokens given the prompt (agents/debate/sft.py).
"""

from __future__ import annotations

from collections import Counter

from agents.envs.debate_arith import majority, parse_answer

__all__ = ["debate_rows", "single_rows"]


def _by_episode(actions) -> dict[int, dict[int, object]]:
    out: dict[int, dict[int, object]] = {}
    for x in actions:
        out.setdefault(x.episode, {})[x.step] = x
    return out


def debate_rows(rollout_agents: dict, episodes: int, min_votes: int,
                critics: dict[str, str] | None = None, split: bool = False
                ) -> tuple[dict[str, list], dict[str, Counter]]:
    """rollout_agents: agent -> AgentRollout (agents.rollout) of a debate. Returns each agent's rows and
    counts of its rows by kind (generator, corrected, confirmed) and of labelled problems, per seat.
    critics: agent -> the separate critic model that answered in its seat from round 2 on
    (debate.critics=separate); those rounds' rows are then the critic's, round 1's the agent's.
    split: problem k's rows go to seat k mod N only (debate.agent_data=split); every seat still counts
    it as labelled."""
    names = list(rollout_agents)
    critics = critics or {}
    per = {a: _by_episode(rollout_agents[a].actions) for a in names}
    rows: dict[str, list] = {a: [] for a in [*names, *critics.values()]}
    kinds: dict[str, Counter] = {a: Counter() for a in names}
    for k in range(episodes):
        rounds = max(per[names[0]][k]) + 1
        label = majority([parse_answer(per[a][k][rounds - 1].text) for a in names], min_votes)
        if label is None:
            continue
        for i, a in enumerate(names):
            kinds[a]["labelled"] += 1
            if split and i != k % len(names):
                continue
            acts = per[a][k]
            answers = [parse_answer(acts[r].text) for r in range(rounds)]
            for r in range(rounds):
                if answers[r] != label:
                    continue
                kind = "generator" if r == 0 else ("confirmed" if answers[r - 1] == label else "corrected")
                rows[critics.get(a, a) if r else a].append((list(acts[r].prompt), list(acts[r].tokens)))
                kinds[a][kind] += 1
    return rows, kinds


def single_rows(rollout_agents: dict, episodes: int, min_votes: int) -> tuple[list, Counter]:
    """rollout_agents: sample -> AgentRollout of one round where every sample is the same agent."""
    names = list(rollout_agents)
    per = {a: _by_episode(rollout_agents[a].actions) for a in names}
    rows: list = []
    kinds: Counter = Counter()
    for k in range(episodes):
        acts = [per[a][k][0] for a in names]
        answers = [parse_answer(x.text) for x in acts]
        label = majority(answers, min_votes)
        if label is None:
            continue
        kinds["labelled"] += 1
        for x, ans in zip(acts, answers):
            if ans == label:
                rows.append((list(x.prompt), list(x.tokens)))
                kinds["generator"] += 1
    return rows, kinds
