"""Run outputs: metrics.jsonl, loss.png and Weights & Biases (offline by default).

Only rank 0 constructs a live tracker; other ranks get a `NullTracker`, so nothing is written
twice and W&B sees one run per job.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
from pathlib import Path

from .files import atomic_write_text


class NullTracker:
    def log(self, row: dict) -> None: ...
    def log_sample(self, step: int, prompt: str, text: str) -> None: ...
    def plot(self) -> None: ...
    def finish(self) -> None: ...


class Tracker(NullTracker):
    def __init__(self, run_dir: Path, config: dict, mode: str, project: str, entity: str | None,
                 group: str | None, tags: list[str], resume_step: int | None):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.plot_path = run_dir / "loss.png"
        self.rows: list[dict] = []
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()
        self.wandb = None
        if mode != "disabled":
            self.wandb = self._init_wandb(config, mode, project, entity, group, tags)

    def _truncate_after(self, step: int) -> None:
        """On resume, keep the history up to the checkpoint so the file reads as one run."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if row.get("step", 0) <= step:
                kept.append(row)
        self.rows = kept
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def _init_wandb(self, config, mode, project, entity, group, tags):
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb
        except ImportError:
            warnings.warn("wandb is not installed: tracking to metrics.jsonl only", stacklevel=2)
            return None
        run_id_file = self.run_dir / "wandb_run_id"
        # Keep one W&B run across resumes of the same run directory.
        run_id = run_id_file.read_text().strip() if run_id_file.exists() else uuid.uuid4().hex[:8]
        run_id_file.write_text(run_id)
        return wandb.init(project=project, entity=entity, group=group, tags=tags, name=self.run_dir.name,
                          id=run_id, resume="allow", dir=str(self.run_dir), mode=mode, config=config,
                          settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))

    def log(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.rows.append(clean)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            # Text (where a figure comes from, e.g. MFU's peak) is run information, not a series.
            for k, v in row.items():
                if isinstance(v, str):
                    self.wandb.summary[k] = v
            self.wandb.log({k: v for k, v in row.items() if k != "step" and v is not None and not isinstance(v, str)},
                           step=row["step"])

    def log_sample(self, step: int, prompt: str, text: str) -> None:
        with open(self.run_dir / "samples.txt", "a") as f:
            f.write(f"--- step {step} ---\n{text}\n")
        if self.wandb is not None:
            import wandb

            self.wandb.log({"sample": wandb.Html(f"<pre>{_escape(text)}</pre>")}, step=step)

    def plot(self) -> None:
        import matplotlib.pyplot as plt

        fig = self.figure()
        tmp = self.plot_path.with_name(".loss.tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, self.plot_path)

    def figure(self):
        """loss.png's figure: the train loss, the validation loss on the fixed evaluation sample
        (one line: every point, the last included, on the same blocks) and, as separate markers,
        the whole validation split where it was evaluated (at the end)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.rows if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in self.rows if r.get("val_loss") is not None]
        full = [(r["step"], r["val_loss_full"]) for r in self.rows if r.get("val_loss_full") is not None]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation (fixed sample)")
        if full:
            ax.plot(*zip(*full), "D", markersize=7, linestyle="none", label="validation (full split)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(self.run_dir.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        return fig

    def finish(self) -> None:
        self.plot()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
