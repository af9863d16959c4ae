"""The multi-agent layer: agents that hold their own weights, the strategies by which they agree
(`agents.sync`), and (next) environments, policies, rollouts and RL objectives. Builds on
`trainer` (ParallelDims, parallelize, the loop's parts); never imported by `model` or `trainer`."""
