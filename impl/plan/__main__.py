"""python -m impl plan: will it fit? Per-device bytes by term for a model and a technique mix, against a device.

    python -m impl plan llama-2-7b --finetune qlora --lora-rank 64 --dtype bfloat16 --checkpointing every \\
        --device RTX-4090-24GB
    python -m impl plan llama-2-13b --dtype bfloat16 --mixed-precision --zero-stage 3 --world-size 8 \\
        --device-memory 80GiB --sweep seq_len=1024,2048,4096 --out plots/

Prints the bytes of every term of `impl.plan.TERMS` on the device that holds the most (the largest pipeline
stage), the total, whether it fits and by how much, and the single changes that save most (`impl.plan.levers`).
`--sweep SETTING=V1,V2,...` varies one setting and plots the stacked terms against it with the device's memory
drawn; `--json` prints the same figures as one JSON object. Every figure comes from `impl.plan.plan`; the
formulas, and the measurement that backs them, are in `impl.plan.terms` and `impl.plan.validate`.
"""

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

from impl.common import cli
from impl.plan.configs import unvalidated
from impl.plan.devices import DEVICES, device, parse_memory
from impl.plan.setup import CHECKPOINTING, DTYPES, FINETUNES, OPTIMIZERS, SCHEDULES, Setup
from impl.plan.shapes import KNOWN_MODELS, model_shape
from impl.plan.terms import TERMS, levers, plan

# What each term counts (the README's column guide).
TERM_HELP = {
    "weights": "parameters this device holds (its ZeRO-3 shard, TP slice, PP stage; a QLoRA base's unquantized rest)",
    "nf4_codes_scales": "QLoRA's frozen base: 4-bit codes and the quantization constants (double-quantized or not)",
    "lora_weights": "the LoRA adapters A and B",
    "gradients": "gradients of the trainable parameters (ZeRO-2/3: this rank's shard)",
    "fp32_master": "fp32 master copy of the trainable parameters under mixed precision",
    "optimizer_states": "Adam's m and v, SGD's momentum, or the 8-bit states with their block scales",
    "activations_saved": "tensors saved for backward (after the checkpointing policy)",
    "recompute_peak": "one segment's activations rebuilt during backward (checkpointing)",
    "pipeline_in_flight": "activations of further micro-batches a pipeline stage holds at once",
    "kv_cache": "keys and values of every cached token (int8 with its scales when asked)",
    "temporary_peak": "the largest transient: logits and their gradient, or one layer's dequantized cache",
    "padding": "ZeRO's padding of each tensor to a multiple of the data-parallel ranks",
}


def human(n: int | float) -> str:
    """Bytes in binary units with three significant figures: 4.45 GiB, 12.0 MiB, 512 B."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = n / scale  # 1000 to 1023.x of a unit: four figures, not "1e+03"
            return f"{sign}{value:.3g} {unit}" if value < 999.5 else f"{sign}{value:.0f} {unit}"
    return f"{sign}{int(n)} B"


def _memory(text: str) -> tuple[str, int]:
    try:
        return text.strip(), parse_memory(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--device-memory ")) from None


def _device(text: str):
    try:
        return device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--device ")) from None


def _targets(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"must be linear names separated by commas (q_proj,v_proj), got {text!r}")
    return names


def _sweep(text: str):
    from impl.plan.sweep import parse_sweep

    try:
        return parse_sweep(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--sweep ")) from None


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("impl.plan.__main__", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help=f"a known shape {sorted(KNOWN_MODELS)} or a config.json path")
    parser.add_argument("--config-json", type=cli.existing_file, help="a transformers config.json (gpt2/llama)")
    t = parser.add_argument_group("technique mix (defaults: impl.plan.Setup's)")
    t.add_argument("--inference", action="store_true", help="plan one decoding step with a KV cache, not training")
    t.add_argument("--dtype", choices=DTYPES)
    t.add_argument("--mixed-precision", action="store_true", default=None,
                   help="16-bit compute, fp32 master, optimizer")
    t.add_argument("--finetune", choices=FINETUNES)
    t.add_argument("--lora-rank", type=cli.positive_int)
    t.add_argument("--lora-targets", type=_targets,
                   help="linear names, comma-separated (default: q_proj,v_proj; GPT: c_attn)")
    t.add_argument("--nf4-block-size", type=cli.positive_int, help="QLoRA: values per NF4 constant (even)")
    t.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=None, help="QLoRA (default on)")
    t.add_argument("--optimizer", choices=OPTIMIZERS)
    t.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3))
    t.add_argument("--world-size", type=cli.positive_int, help="ranks in all: data x tensor x pipeline parallel")
    t.add_argument("--tp", type=cli.positive_int, help="tensor-parallel degree (divides the heads)")
    t.add_argument("--pp", type=cli.positive_int, help="pipeline stages")
    t.add_argument("--micro-batches", type=cli.positive_int, help="micro-batches per step through the pipeline")
    t.add_argument("--schedule", choices=SCHEDULES)
    t.add_argument("--checkpointing", choices=CHECKPOINTING)
    t.add_argument("--checkpoint-every", type=cli.positive_int, help="blocks per segment with every-k")
    t.add_argument("--seq-len", type=cli.positive_int)
    t.add_argument("--micro-batch", type=cli.positive_int, help="sequences per micro-batch")
    t.add_argument("--packing", action="store_true", default=None, help="several documents per row")
    t.add_argument("--dropout", action="store_true", default=None, help="dropout on (its masks are saved for backward)")
    t.add_argument("--kv-len", type=cli.positive_int, help="inference: cache slots per sequence")
    t.add_argument("--kv-batch", type=cli.positive_int, help="inference: sequences decoded together")
    t.add_argument("--kv-int8", action="store_true", default=None, help="inference: int8 KV cache")
    d = parser.add_mutually_exclusive_group(required=True)
    d.add_argument("--device-memory", type=_memory, help="memory per device: 24GiB, 80GB, 81920MiB...")
    d.add_argument("--device", type=_device, help=f"a device from the table: {[x.name for x in DEVICES]}")
    parser.add_argument("--sweep", type=_sweep, help="vary one setting: seq_len=512,1024,2048 (writes a PNG)")
    parser.add_argument("--out", type=cli.writable_dir, default=None, help="folder for the sweep's PNG (default .)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


_FLAGS = {"mode": "inference"}  # Setup field -> its option where the names differ


def _flag(field: str) -> str:
    return "--" + _FLAGS.get(field, field).replace("_", "-")


def setup_from_args(args: argparse.Namespace) -> Setup:
    """The Setup the options ask for; options not given keep Setup's defaults. A ValueError names the option."""
    given = {f.name: getattr(args, f.name) for f in fields(Setup) if getattr(args, f.name, None) is not None}
    given.pop("mode", None)
    if args.inference:
        given["mode"] = "inference"
    try:
        return Setup(**given)
    except ValueError as err:
        raise ValueError(_name_options(str(err))) from None


def _name_options(message: str) -> str:
    """Setup's messages name its fields ("world_size must ..."); the user typed options (--world-size)."""
    head, _, rest = message.partition(" ")
    return f"{_flag(head)} {rest}" if head in {f.name for f in fields(Setup)} else message


def changed(setup: Setup) -> str:
    """The settings that differ from Setup's defaults, as options: the technique mix in one line."""
    default = Setup()
    parts = [f"{_flag(f.name)}" + ("" if isinstance(v, bool) else f" {','.join(v) if isinstance(v, tuple) else v}")
             for f in fields(Setup) if (v := getattr(setup, f.name)) != getattr(default, f.name)]
    return " ".join(parts) or "(Setup's defaults)"


def report(shape, setup, device_bytes: int, device_name: str) -> dict:
    """Every figure the command prints, as plain data: the plan's terms and total, the verdict, the levers."""
    p = plan(shape, setup)
    return {
        "model": shape.name,
        "shape": asdict(shape),
        "setup": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(setup).items()},
        "stage": p.stage,
        "terms": dict(p.terms),
        "total": p.total,
        "device": device_name,
        "device_bytes": device_bytes,
        "fits": p.fits(device_bytes),
        "margin": device_bytes - p.total,
        "levers": [{"what": what, "saved": saved} for what, saved in levers(shape, setup, device_bytes)],
        "not_validated": unvalidated(shape, setup),
    }


def render(r: dict) -> str:
    """The report as the table the command prints."""
    where = f", pipeline stage {r['stage']} (the largest)" if r["setup"]["pp"] > 1 else ""
    lines = [f"{r['model']}: {r['setup']['mode']}, per-device bytes by term{where}", ""]
    width = max(len(t) for t in TERMS)
    lines.append(f"  {'term':<{width}}  {'bytes':>10}  {'share':>6}  what it counts")
    for term in TERMS:
        n = r["terms"][term]
        share = f"{100 * n / r['total']:.1f}%" if r["total"] else "-"
        lines.append(f"  {term:<{width}}  {human(n):>10}  {share:>6}  {TERM_HELP[term]}")
    lines.append(f"  {'total':<{width}}  {human(r['total']):>10}  {'100%':>6}  ({r['total']:,} bytes)")
    lines.append("")
    device = f"{r['device']} ({human(r['device_bytes'])})"
    if r["fits"]:
        lines.append(f"fits on {device}: {human(r['margin'])} to spare")
    else:
        lines.append(f"does not fit on {device}: {human(-r['margin'])} over")
    if r["levers"]:
        text = "; ".join(f"{x['what']} saves {human(x['saved'])}" for x in r["levers"][:4])
        lines.append(f"largest levers: {text}")
    lines += [f"not validated by measurement: {why}" for why in r["not_validated"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.model is None) == (args.config_json is None):
        parser.error("give a MODEL (a known name or a config.json path) or --config-json PATH, exactly one")
    if args.device is not None:
        device_bytes, device_name = args.device.bytes, args.device.name
    else:
        device_name, device_bytes = args.device_memory
    try:
        shape = model_shape(args.config_json if args.config_json is not None else args.model)
        setup = setup_from_args(args)
        result = report(shape, setup, device_bytes, device_name)
        if args.sweep is not None:
            from impl.plan.sweep import plot, sweep

            setting, values = args.sweep
            plans = sweep(shape, setup, setting, values)
            out = args.out if args.out is not None else Path(".")
            png = plot(plans, setting, values, device_bytes, out, device_name)
            result["sweep"] = {"setting": setting, "values": list(values), "totals": [p.total for p in plans],
                               "fits": [p.fits(device_bytes) for p in plans], "png": str(png)}
    except ValueError as err:  # a shape, a mix or a sweep the planner refuses: one line, exit 2
        parser.error(" ".join(str(err).split()))
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(render(result))
    if "sweep" in result:
        s = result["sweep"]
        cells = ", ".join(f"{v}: {human(t)}{'' if ok else ' (over)'}" for v, t, ok in zip(s["values"], s["totals"],
                                                                                         s["fits"]))
        print(f"\nsweep of {s['setting']}: {cells}\nplot: {s['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
