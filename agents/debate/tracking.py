"""Tracking of a debate run: metrics.jsonl (and W&B) as every run, and debate.png: accuracy per iteration
of single / vote / debate, each agent's round-1 accuracy, the baseline, and the agents' diversity."""

from __future__ import annotations

from ..tracking import AgentTracker

__all__ = ["DebateTracker"]


class DebateTracker(AgentTracker):
    plot_name = "debate.png"

    def figure(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        rows = [r for r in self.rows if r.get("debate") is not None]
        fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)

        def line(axis, key, label, style):
            pts = [(r["iteration"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                axis.plot(*zip(*pts), style, label=label)

        line(ax, "debate", "debate (majority after the last round)", "o-")
        line(ax, "vote", "vote (majority of round 1)", "s-")
        line(ax, "single", "single (round-1 accuracy, mean of agents)", "^-")
        line(ax, "baseline/vote", "baseline: single-agent self-training, vote", "s--")
        line(ax, "baseline/single", "baseline: single-agent self-training, single", "^--")
        for a in self.agents:
            line(ax, f"agent/{a}/single", f"{a} round 1", ":")
        line(ax_d, "diversity", "agents' round-1 answers differ (pairs)", "o-")
        line(ax_d, "baseline/diversity", "baseline's samples differ (pairs)", "s--")
        ax.set_ylabel("accuracy on the held-out problems")
        ax_d.set_ylabel("diversity")
        for a in (ax, ax_d):
            a.set_xlabel("fine-tuning iteration")
            a.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole numbers
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
        fig.suptitle(self.run_dir.name)
        fig.tight_layout()
        return fig
