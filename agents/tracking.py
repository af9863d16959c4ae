"""Tracking of a multi-agent run: the pre-training tracker's files (metrics.jsonl, W&B) with a plot of
each agent's return and entropy per step and the evaluations' team success (`agents.png`)."""

from __future__ import annotations

from trainer.tracking import NullTracker, Tracker


class AgentTracker(Tracker):
    agents: list[str] = []
    plot_name = "agents.png"

    @classmethod
    def open(cls, ctx, cfg_dict: dict, resume_step: int | None, agents: list[str]) -> NullTracker:
        """The run's tracker on its first rank, a NullTracker elsewhere."""
        if not ctx.is_main:
            return NullTracker()
        t = ctx.recipe.tracking
        tracker = cls(ctx.run_dir, cfg_dict, t.wandb, t.project, t.entity, t.group, t.tags, resume_step=resume_step)
        tracker.agents = list(agents)
        tracker.plot_path = ctx.run_dir / cls.plot_name
        ctx.tracker = tracker  # the run context finishes it when the run stops for a signal
        return tracker

    def figure(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_r, ax_h) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
        for name in self.agents:
            ret = [(r["step"], r[f"agent/{name}/return"]) for r in self.rows
                   if r.get(f"agent/{name}/return") is not None]
            ent = [(r["step"], r[f"agent/{name}/entropy"]) for r in self.rows
                   if r.get(f"agent/{name}/entropy") is not None]
            if ret:
                ax_r.plot(*zip(*ret), label=f"{name} return", linewidth=1)
            if ent:
                ax_h.plot(*zip(*ent), label=name, linewidth=1)
        ev = [(r["step"], r["eval_success"]) for r in self.rows if r.get("eval_success") is not None]
        if ev:
            ax_r.plot(*zip(*ev), "o-", label="team success (greedy evaluation)")
        opt = [(r["step"], r["eval_success_options"]) for r in self.rows if r.get("eval_success_options") is not None]
        if opt:
            ax_r.plot(*zip(*opt), "s--", label="success with env.eval_options")
        ax_r.set_xlabel("step")
        ax_r.set_ylabel("return per episode / success")
        ax_h.set_xlabel("step")
        ax_h.set_ylabel("entropy (nats per generated token)")
        for ax in (ax_r, ax_h):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(self.run_dir.name)
        fig.tight_layout()
        return fig
