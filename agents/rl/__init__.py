"""Reinforcement learning for the agents: the per-agent objective as losses over token-level
tensors (`agents.rl.objectives`)."""
