"""python -m impl: the project's runnable entry points.

python -m impl --help          this list
python -m impl NAME [ARGS...]  run one (each takes --help)
"""

import importlib
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
}


def usage() -> str:
    width = max(len(n) for n in ENTRY_POINTS)
    lines = ["usage: python -m impl NAME [ARGS...]   (python -m impl NAME --help for each)", "", "entry points:"]
    lines += [
        f"  {name:<{width}}  {text}   [python -m {module.removesuffix('.__main__')}]"
        for name, (module, text) in ENTRY_POINTS.items()
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in ENTRY_POINTS:
        print(f"error: unknown entry point {name!r}; expected one of {sorted(ENTRY_POINTS)}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(ENTRY_POINTS[name][0])
    try:
        code = module.main(rest)
    except (ValueError, TypeError, FileNotFoundError) as err:  # bad input: one line, not a traceback
        print(
            f"error: {err}  (python -m {module.__name__.removesuffix('.__main__')} shows the traceback)",
            file=sys.stderr,
        )
        return 2
    return code if isinstance(code, int) else 0  # some mains return their results for tests


if __name__ == "__main__":
    sys.exit(main())
