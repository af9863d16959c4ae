"""The tracker of a game run: metrics.jsonl and W&B as every agents run, with `games.png`: NashConv of
the measured policy, of the last iterate and (XFP / PSRO) of the oracle's target against steps and
against training seconds."""

from __future__ import annotations

from ..tracking import AgentTracker


class GameTracker(AgentTracker):
    @classmethod
    def open(cls, ctx, cfg_dict: dict, resume_step: int | None, agents: list[str]):
        tracker = super().open(ctx, cfg_dict, resume_step, agents)
        if ctx.is_main:
            tracker.plot_path = ctx.run_dir / "games.png"
        return tracker

    def figure(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_s, ax_t, ax_h) = plt.subplots(1, 3, figsize=(15, 4), dpi=110)
        rows = [r for r in self.rows if r.get("nash_conv") is not None]
        style = {"nash_conv": "o-", "nash_conv_last": "--", "nash_conv_target": ":"}
        for key, label in (("nash_conv", "measured policy"), ("nash_conv_last", "last iterate"),
                           ("nash_conv_target", "the oracle's target (XFP / PSRO)")):
            pts = [(r["step"], r["train_s"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                steps, secs, vals = zip(*pts)
                ax_s.plot(steps, vals, style[key], label=label, linewidth=1, markersize=3)
                ax_t.plot(secs, vals, style[key], label=label, linewidth=1, markersize=3)
        # self-play: each agent's entropy; XFP / PSRO (no episodes): the distillation's KL to the target
        third = "entropy" if any(r.get(f"agent/{n}/entropy") is not None for r in self.rows for n in self.agents) \
            else "kl"
        for name in self.agents:
            ent = [(r["step"], r[f"agent/{name}/{third}"]) for r in self.rows
                   if r.get(f"agent/{name}/{third}") is not None]
            if ent:
                ax_h.plot(*zip(*ent), label=name, linewidth=1)
        ax_s.set_xlabel("step")
        ax_t.set_xlabel("training seconds")
        for ax in (ax_s, ax_t):
            ax.set_ylabel("NashConv (OpenSpiel)")
            ax.set_yscale("log")
        ax_h.set_xlabel("step")
        ax_h.set_ylabel("entropy over the legal actions (nats)" if third == "entropy" else
                        "KL(target || policy) per state, distillation step")
        for ax in (ax_s, ax_t, ax_h):
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
        fig.suptitle(self.run_dir.name)
        fig.tight_layout()
        return fig
