"""The log of a GPT training run (`python -m impl train`), safe against kills and resumes.

losses.csv gets a row per step, appended and flushed as the step ends; evals.csv a row per evaluation, replaced
atomically. A resumed run first cuts both back to its checkpoint's step, so any number of SIGKILLs and resumes
leaves exactly one row per step and per evaluation. At the end: log.json, loss_curve.png, sample.txt and report.md,
all describing the whole run (steps and throughput summed over every invocation).
"""

import csv
import json
import os
from pathlib import Path

import torch


class RunLog:
    """The files of one run folder; `start` is the step the run resumes from (0 for a fresh one)."""

    LOSS_FIELDS = ("step", "loss", "lr", "seconds")
    EVAL_FIELDS = ("step", "train", "val", "batches")

    def __init__(self, out_dir: Path, start: int):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.dir = out_dir
        self.steps = [r for r in self._read("losses.csv") if int(r["step"]) <= start]
        self.evals = [r for r in self._read("evals.csv") if int(r["step"]) <= start]
        self._write("losses.csv", self.LOSS_FIELDS, self.steps)
        self._write("evals.csv", self.EVAL_FIELDS, self.evals)
        self._losses = open(self.dir / "losses.csv", "a", newline="")  # noqa: SIM115 (closed by close())
        self._writer = csv.DictWriter(self._losses, fieldnames=self.LOSS_FIELDS)

    def _read(self, name: str) -> list[dict]:
        path = self.dir / name
        if not path.is_file():
            return []
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return [r for r in rows if all(r.get(k) for k in r) and r["step"].isdigit()]  # drop a row cut short

    def _write(self, name: str, fieldnames: tuple, rows: list[dict]) -> None:
        """Replace `name` atomically: a kill leaves the old file or the new one, never half of one."""
        tmp = self.dir / f".{name}.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore", restval="")
            writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)

    def step(self, step: int, loss: float, lr: float, seconds: float) -> None:
        row = {"step": step, "loss": loss, "lr": lr, "seconds": seconds}
        self.steps.append(row)
        self._writer.writerow(row)
        self._losses.flush()  # in the OS's hands: survives SIGKILL

    def eval(self, step: int, losses: dict, batches: int) -> None:
        self.evals = [r for r in self.evals if int(r["step"]) != step]  # a rerun's final estimate replaces its own
        self.evals.append({"step": step, "train": losses["train"], "val": losses["val"], "batches": batches})
        self._write("evals.csv", self.EVAL_FIELDS, self.evals)

    def close(self) -> None:
        self._losses.close()

    def timed(self) -> tuple[int, float]:
        """Steps with a duration and their training seconds, over the whole run, every resume included."""
        timed = [float(r["seconds"]) for r in self.steps if r.get("seconds") not in (None, "")]
        return len(timed), sum(timed)

    def finish(self, summary: dict, sample: str) -> None:
        (self.dir / "log.json").write_text(json.dumps({**summary, "evals": self.evals}, indent=1))
        (self.dir / "sample.txt").write_text(sample)
        self._plot(summary)
        self._report(summary, sample)

    def _report(self, summary: dict, sample: str) -> None:
        """report.md: the run as a report section (`python -m impl.report` shows every `<out>/*/report.md`)."""
        from impl.common import device_name

        cfg = summary["config"]
        device = torch.device(summary["device"])
        where = (
            f"{device_name(device)} ({device.type}, {torch.get_num_threads()} torch threads), torch {torch.__version__}"
        )
        shape = f"{cfg['n_layer']} layers, {cfg['n_head']} heads, {cfg['n_embd']} wide, block {cfg['block_size']}"
        lines = [
            f"### GPT `{self.dir.name}`: {summary['params'] / 1e6:.2f}M parameters, {shape}",
            "",
            f"- machine: {where}",
            f"- steps: {summary['steps']} ({summary['session_steps']} in the last invocation), "
            f"batch {cfg['batch_size']} x {cfg['grad_accum_steps']} accumulation, "
            f"lr {cfg['learning_rate']}, dropout {cfg['dropout']}"
            + (f" (resumed from step {summary['resumed_from']})" if summary["resumed_from"] else ""),
            f"- final val loss **{summary['final_val_loss']:.4f}** (train {summary['final_train_loss']:.4f}), "
            f"estimated on {summary['final_eval_batches']} batches; nanoGPT's published figure for the `cpu` "
            "preset's configuration is 1.88",
            f"- training throughput: {summary['tokens_per_s']:.0f} tokens/s, {summary['ms_per_iter']:.1f} ms/iter "
            f"over the whole run (evaluation excluded); last invocation's wall time {summary['wall_seconds']:.1f} s",
            "",
            "![loss curve](loss_curve.png)",
            "",
            "A sample from the final model:",
            "",
            "```text",
            sample.strip("\n"),
            "```",
            "",
        ]
        (self.dir / "report.md").write_text("\n".join(lines))

    def _plot(self, summary: dict) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([int(r["step"]) for r in self.steps], [float(r["loss"]) for r in self.steps], lw=0.6, alpha=0.5,
                label="train (one batch)")  # fmt: skip
        for split in ("train", "val"):
            ax.plot([int(r["step"]) for r in self.evals], [float(r[split]) for r in self.evals], "o-", ms=3,
                    label=f"{split} (estimate)")  # fmt: skip
        title = f"final val loss {summary['final_val_loss']:.3f} ({summary['final_eval_batches']} batches)"
        ax.set(xlabel="step", ylabel="cross-entropy (nats/char)", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.dir / "loss_curve.png", dpi=120)
        plt.close(fig)
