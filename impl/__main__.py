"""python -m impl: the project's runnable entry points.

python -m impl --help          this list
python -m impl NAME [ARGS...]  run one (each takes --help)

Bad input exits 2 with one `error:` line, Ctrl-C exits 130; --debug or IMPL_DEBUG=1 shows tracebacks.
"""

import importlib
import os
import sys

# name -> (module with a `main(argv)`, one line on what it does). Add each new entry point here.
ENTRY_POINTS: dict[str, tuple[str, str]] = {
    "bench": ("impl.bench", "run the benchmarks on the available device, then render the report (the main job)"),
    "report": ("impl.report.__main__", "render pytest-benchmark JSON files into a markdown report with plots"),
    "compare": ("impl.report.drift", "compare two benchmark runs (time, ratios, memory, errors); a regression guard"),
    "train": ("impl.gpt.train", "train the char-level GPT on Shakespeare (presets cpu / gpu), with checkpoints"),
    "sample": ("impl.gpt.sample", "write text from a GPT checkpoint"),
    "train-zero": ("impl.distributed.train_zero", "train a small MLP with ZeRO stage 0-3 on N ranks; bytes vs formula"),
    "img2img": ("impl.diffusion.img2img", "Stable Diffusion image-to-image (tiny random models without --model-dir)"),
    "rlhf": ("impl.rlhf.__main__", "RLHF on a tiny Shakespeare GPT: reward model, PPO and DPO; rule score and KL"),
    "clip-train": (
        "impl.clip.train",
        "train a small CLIP on scikit-learn's digits; zero-shot accuracy on held-out digits",
    ),
    "glide": ("impl.diffusion.glide", "train GLIDE on the digits; accuracy by guidance scale (CLIP guidance too)"),
    "unclip": ("impl.diffusion.unclip", "train DALL-E 2's prior and decoder on a frozen CLIP; samples, variations"),
    "lora-toy": ("impl.finetune.lora_toy", "the LoRA teaching toy: a rank-2 update recovers a shifted MLP"),
    "plan": (
        "impl.plan.__main__",
        "will it fit: per-device bytes by term for a model and a technique mix against a device's memory",
    ),
}


def usage() -> str:
    width = max(len(n) for n in ENTRY_POINTS)
    lines = ["usage: python -m impl NAME [ARGS...]   (python -m impl NAME --help for each)", "", "entry points:"]
    lines += [
        f"  {name:<{width}}  {text}   [python -m {module.removesuffix('.__main__')}]"
        for name, (module, text) in ENTRY_POINTS.items()
    ]
    return "\n".join(lines)


# (module, class) of further user-caused failures.
USER_ERRORS = (
    ("impl.training.checkpoint", "CheckpointError"),
    ("safetensors", "SafetensorError"),
    ("torch", "OutOfMemoryError"),
)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Failures the user can fix (bad input, a file, a full disk, a corrupt checkpoint): one line.
    Looked up among the modules already imported, so `python -m impl --help` imports nothing heavy."""
    found: list[type[BaseException]] = [ValueError, TypeError, OSError]  # OSError: missing, read-only, disk full
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, (ValueError, TypeError)) else f"{type(err).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    """Run one entry point. Bad input exits 2 with one `error:` line, Ctrl-C exits 130 with one line; a
    traceback only with --debug (anywhere on the line) or IMPL_DEBUG=1, and for failures that are bugs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours = argv.index("--") if "--" in argv else len(argv)  # after "--", arguments belong to a tool (pytest)
    debug = "--debug" in argv[:ours] or os.environ.get("IMPL_DEBUG", "") not in ("", "0")
    argv = [a for a in argv[:ours] if a != "--debug"] + argv[ours:]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in ENTRY_POINTS:
        print(f"error: unknown entry point {name!r}; expected one of {sorted(ENTRY_POINTS)}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    from impl.common import cli

    cli._prog = f"python -m impl {name}"
    try:
        code = importlib.import_module(ENTRY_POINTS[name][0]).main(rest)
    except SystemExit as stop:  # argparse: usage and one `error:` line already printed, code 2
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"interrupted: python -m impl {name} stopped by Ctrl-C", file=sys.stderr)
        return 130
    except Exception as err:
        if debug or not isinstance(err, _user_errors()):
            raise  # a bug: the traceback is what a report needs
        print(f"error: {_one_line(err)}  (--debug or IMPL_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    finally:
        cli._prog = None
    return code if isinstance(code, int) else 0  # some mains return their results for tests


if __name__ == "__main__":
    sys.exit(main())
