"""`--sweep`: one setting of the technique mix varied over a list of values, the per-device terms of each plan
stacked in a bar, and the device's memory drawn across, so the value where the total crosses it can be read off.
"""

from dataclasses import fields, replace
from pathlib import Path

from impl.plan.setup import Setup
from impl.plan.shapes import ModelShape
from impl.plan.terms import TERMS, Plan, plan

# The settings worth sweeping: the integers of the mix (lengths, batches, degrees) and the policies.
SWEEPABLE = ("seq_len", "micro_batch", "world_size", "tp", "pp", "micro_batches", "zero_stage", "lora_rank",
             "kv_len", "kv_batch", "checkpoint_every", "nf4_block_size", "checkpointing", "optimizer", "finetune",
             "dtype", "schedule")  # fmt: skip


def parse_sweep(text: str) -> tuple[str, tuple]:
    """"seq_len=512,1024,2048" -> ("seq_len", (512, 1024, 2048)); values typed as Setup's field. A ValueError
    naming --sweep otherwise (an unknown setting, a value of the wrong type, fewer than two values, repeats)."""
    name, sep, rest = str(text).partition("=")
    name = name.strip().replace("-", "_")
    usage = f"--sweep must be SETTING=V1,V2,... with SETTING one of {list(SWEEPABLE)}"
    if not sep or name not in SWEEPABLE:
        raise ValueError(f"{usage}, got {text!r}")
    kind = {f.name: f.default for f in fields(Setup)}[name]
    values = []
    for item in rest.split(","):
        item = item.strip()
        if isinstance(kind, int):
            try:
                values.append(int(item))
            except ValueError:
                raise ValueError(f"{usage}; {name} takes ints, got {item!r} in {text!r}") from None
        elif item:
            values.append(item)
        else:
            raise ValueError(f"{usage}; an empty value in {text!r}")
    if len(values) < 2 or len(set(values)) != len(values):
        raise ValueError(f"{usage}; at least two distinct values, got {text!r}")
    return name, tuple(values)


def sweep(shape: ModelShape, setup: Setup, setting: str, values: tuple) -> list[Plan]:
    """One plan per value of `setting`, the rest of `setup` kept. A ValueError names the value that fails."""
    plans = []
    for value in values:
        try:
            plans.append(plan(shape, replace(setup, **{setting: value})))
        except ValueError as err:
            raise ValueError(f"--sweep {setting}={value}: {err}") from None
    return plans


def plot(plans: list[Plan], setting: str, values: tuple, device_bytes: int, out_dir: Path, device_name: str) -> Path:
    """Stacked bars of the terms per value with the device's memory as a line; written to
    `<out_dir>/plan-<model>-<setting>.png`, whose path is returned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = 2**30
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs = list(range(len(values)))
    bottom = [0.0] * len(values)
    colors = plt.get_cmap("tab20")
    for i, term in enumerate(TERMS):
        heights = [p.terms[term] / gib for p in plans]
        if any(heights):
            ax.bar(xs, heights, bottom=bottom, label=term, color=colors(i))
            bottom = [b + h for b, h in zip(bottom, heights)]
    ax.axhline(device_bytes / gib, color="black", linestyle="--", label=f"device: {device_name}")
    ax.set_xticks(xs, [str(v) for v in values])
    ax.set_xlabel(setting)
    ax.set_ylabel("per-device GiB")
    shape = plans[0].shape
    ax.set_title(f"{shape.name}, {plans[0].setup.mode}: per-device memory by term against {setting}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in shape.name)
    path = out_dir / f"plan-{slug}-{setting}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
