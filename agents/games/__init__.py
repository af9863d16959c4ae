"""Self-play of LLM agents in two-player OpenSpiel games, measured by exploitability (NashConv).

    tables    information states, the exact average policy of self-play, policy.json, NashConv
    actions   the game tokenizer, prompts, and the policy's distribution over the legal actions
    selfplay  the training loop (agents.train hands a recipe with env.name openspiel to it)
"""
