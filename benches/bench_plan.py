"""The memory planner (`impl.plan`) against measurement, and the famous "will it fit" questions it answers.

`planner`: one row per configuration of `impl.plan.validate.CONFIGS` (small GPT and Llama shapes, every technique
and their pairs, 1-4 gloo ranks): each is run for one real training or decoding step and measured
(`validate.measure_all`), then planned for the same pipeline stage and data-parallel rank. The row's metrics are
predicted and measured bytes as `validate.compare` pairs them: the model states (weights, NF4 codes and scales,
LoRA, gradients, fp32 master, optimizer states, KV cache, ZeRO's padding: the planner's claim is exact equality),
the activations saved for backward (pipeline micro-batches in flight included), everything above the model states
("dynamic": activations and transients) and the step's peak, with their relative errors. The peak
memory column is the measured peak of the step; the time column is the planner's own time to plan it. Under the
table: predicted against measured for every term of every configuration, with the y = x line.

`planner-worst-error`: one row per measured term: the largest relative error over all configurations, and where.

`planner-questions`: 7B QLoRA on a 24 GB card, 13B full fine-tune with ZeRO-3 on 8 x 80 GB, 70B decoding with a
32k KV cache on 8 x 80 GB (`impl.plan.questions`): the planner's per-device total and verdict, the largest value
of one setting that fits, beside DeepSpeed's ZeRO-2/ZeRO-3 model-states estimators and accelerate's weights-only
estimate-memory for the same model (`impl.plan.estimators`, written from their documentation).
"""

import io

import pytest

from impl.plan import plan
from impl.plan import validate as v
from impl.plan.__main__ import human
from impl.plan.questions import QUESTIONS, answer

# What `validate.compare` pairs up per configuration: each model state as the device holds it, the activations
# kept for backward, everything above the model states ("dynamic"), the peak; and the model states summed.
POINTS = (*v.STATE_CHECKS, "activations", "dynamic", "peak")


def _smoke_names() -> list[str]:
    """A handful for --size smoke, still holding every measured term: a one-rank full fine-tune, a one-rank QLoRA
    under mixed precision (NF4, LoRA, fp32 master), a decoding step, a two-rank configuration (one process group)."""
    picks = []
    for test in (lambda st: st.mode == "train" and st.world_size == 1 and st.finetune == "full",
                 lambda st: st.world_size == 1 and st.finetune == "qlora" and st.mixed_precision,
                 lambda st: st.mode == "inference", lambda st: st.world_size == 2):  # fmt: skip
        picks += [name for name, _, st in v.CONFIGS if test(st)][:1]
    return picks


# Seconds on the 2-core reference CPU (python -m impl bench's budget): measuring every configuration dominates.
ESTIMATED_S = {"smoke": 30, "small": 100, "full": 60}
ALL = [name for name, _, _ in v.CONFIGS]
SWEEPS = {"config": {"smoke": _smoke_names(), "small": ALL, "full": ALL}}  # parametrizes test_planner per --size


def pairs(name: str, measured: dict) -> dict[str, tuple[int, int]]:
    """(predicted, measured) per point of one configuration (`validate.compare`), with the model states summed."""
    out = v.compare(name, measured)
    states = [out[k] for k in v.STATE_CHECKS if k in out]
    out["model_states"] = (sum(p for p, _ in states), sum(m for _, m in states))
    return out


@pytest.fixture(scope="module")
def measurements(size) -> dict[str, dict]:
    """Every configuration of this size measured once for the module (one or two groups of gloo processes)."""
    return v.measure_all(SWEEPS["config"][size])


def _scatter(measurements: dict) -> "object":
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, (ax, err_ax) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1.1, 1]})
    colors = plt.get_cmap("tab10")
    low, high = float("inf"), 0.0
    for i, term in enumerate(POINTS):
        pts = [pm for n, m in measurements.items() if (pm := pairs(n, m).get(term)) and pm[1]]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.scatter(ys, xs, s=14, color=colors(i), label=f"{term} ({len(pts)})", alpha=0.8)
        low, high = min(low, *xs, *ys), max(high, *xs, *ys)
        errors = [100 * v.relative_error(p, m) for p, m in pts]
        offsets = [i + 0.3 * (k / max(len(errors) - 1, 1) - 0.5) for k in range(len(errors))]
        err_ax.scatter(offsets, errors, s=14, color=colors(i), alpha=0.8)
    ax.plot([low, high], [low, high], color="black", linewidth=0.8, label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured bytes (one real step)")
    ax.set_ylabel("predicted bytes (impl.plan.plan)")
    ax.set_title(f"planner against measurement: {len(measurements)} configurations", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    err_ax.axhline(0, color="black", linewidth=0.8)
    err_ax.set_xticks(range(len(POINTS)), POINTS, rotation=35, ha="right", fontsize=8)
    err_ax.set_ylabel("(predicted - measured) / measured, %")
    err_ax.set_title("relative error per term, one dot per configuration", fontsize=10)
    err_ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


@pytest.mark.benchmark(group="planner")
def test_planner(bench, measurements, config):
    shape, setup = v.BY_NAME[config]
    m = measurements[config]
    got = pairs(config, m)
    (pred_states, meas_states), (pred_peak, meas_peak) = got["model_states"], got["peak"]
    act = got.get("activations")
    info = bench(
        lambda: plan(shape, setup, stage=m["stage"], rank=m["dp_rank"]),
        variant="planner",
        device="cpu",  # the planner and the measured steps (gloo ranks) run on the CPU in every session
        params=dict(config=config),
        metrics={
            "world": setup.world_size,
            "model states predicted": human(pred_states),
            "model states measured": human(meas_states),
            "model states equal": "yes" if pred_states == meas_states else f"NO, {pred_states - meas_states:+} B",
            "activations predicted": human(act[0]) if act else "-",
            "activations measured": human(act[1]) if act else "-",
            "activations rel err": v.relative_error(*act) if act else None,
            "dynamic rel err": v.relative_error(*got["dynamic"]),
            "peak predicted": human(pred_peak),
            "peak measured": human(meas_peak),
            "peak rel err": v.relative_error(pred_peak, meas_peak),
        },
    )
    info["peak_bytes"] = meas_peak  # the measured step's peak, not the planner's (it allocates no tensors)
    if config == next(iter(measurements)):
        bench.save_image("planner_predicted_vs_measured", _scatter(measurements))


@pytest.mark.benchmark(group="planner-worst-error")
@pytest.mark.parametrize("term", [*POINTS, "model_states"])
def test_planner_worst_error(bench, measurements, term):
    found = {n: pm for n, m in measurements.items() if (pm := pairs(n, m).get(term)) and (pm[0] or pm[1])}
    if not found:
        pytest.skip(f"no configuration of this --size holds {term}")
    errors = {n: v.relative_error(p, m) for n, (p, m) in found.items()}
    worst = max(errors, key=lambda n: abs(errors[n]))
    info = bench(
        lambda: [pairs(n, m) for n, m in measurements.items()],
        variant="planner",
        device="cpu",  # the planner and the measured steps (gloo ranks) run on the CPU in every session
        params=dict(term=term),
        metrics={
            "configurations": len(found),
            "exact": sum(e == 0 for e in errors.values()),
            "worst rel err": errors[worst],
            "worst at": worst,
            "predicted there": human(found[worst][0]),
            "measured there": human(found[worst][1]),
        },
    )
    info["peak_bytes"] = None


@pytest.mark.benchmark(group="planner-questions")
@pytest.mark.parametrize("question", QUESTIONS, ids=[q.name for q in QUESTIONS])
def test_planner_questions(bench, question):
    a = answer(question)
    verdict = f"fits, {human(a['margin'])} to spare" if a["fits"] else f"does not fit, {human(-a['margin'])} over"
    na = "n/a (training model states only)"
    info = bench(
        lambda: answer(question),
        variant="planner",
        device="cpu",  # the planner and the measured steps (gloo ranks) run on the CPU in every session
        params=dict(question=question.name),
        metrics={
            "model": a["model"],
            "device": f"{a['devices']} x {a['device']}",
            "planner per device": human(a["planner_total"]),
            "verdict": verdict,
            "largest that fits": f"{a['stretch']} = {a['stretch_max']}",
            "DeepSpeed ZeRO-2 per GPU": human(a["deepspeed_zero2"]) if a["deepspeed_zero2"] is not None else na,
            "DeepSpeed ZeRO-3 per GPU": human(a["deepspeed_zero3"]) if a["deepspeed_zero3"] is not None else na,
            "weights only per device": f"{human(a['weights_only'])} ({question.weights_dtype})",
            "accelerate training (Adam) per device": (human(a["weights_only_training"])
                                                      if a["weights_only_training"] is not None else "n/a"),
        },
    )
    info["peak_bytes"] = None
