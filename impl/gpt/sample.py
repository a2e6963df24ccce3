"""python -m impl.gpt.sample: text from a checkpoint written by `python -m impl.gpt.train`.

Autoregressive sampling (Radford et al. 2019, section 3) with temperature and top-k truncation (Fan et al.
2018); a seeded generator makes the text reproducible.

    python -m impl.gpt.sample --checkpoint runs/cpu/ckpt --prompt "ROMEO:" --max-new-tokens 300 --seed 1
"""

import sys
from pathlib import Path

import torch

from impl.common import cli, resolve_device
from impl.gpt.data import CharTokenizer
from impl.gpt.model import GPT, GPTConfig


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, CharTokenizer]:
    """The model and tokenizer of a checkpoint directory (`step_XXXXXXXX/`), or of the newest in a run's
    checkpoint folder."""
    from impl.training import load_checkpoint, resume

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint must be an existing directory, got {str(path)!r}")
    found = load_checkpoint(path, restore_rng=False) if (path / "manifest.json").is_file() else None
    found = found or resume(path, restore_rng=False)
    if found is None:
        raise FileNotFoundError(f"checkpoint {str(path)!r} holds no step_XXXXXXXX checkpoint")
    config = found.config or {}
    if set(config) != {"model", "chars"}:
        raise ValueError(f"checkpoint {found.path} must be written by impl.gpt.train, got config keys {sorted(config)}")
    model = GPT(GPTConfig(**config["model"]))
    load_checkpoint(found.path, model=model, config=config, restore_rng=False)
    return model.to(resolve_device(device)).eval(), CharTokenizer(config["chars"])


def sample(
    model: GPT,
    tokenizer: CharTokenizer,
    prompt: str = "\n",
    max_new_tokens: int = 500,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int = 1337,
) -> str:
    """`prompt` followed by `max_new_tokens` sampled characters; the same seed gives the same text."""
    device = model.transformer.wte.weight.device
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)  # (1, T)
    if idx.shape[1] == 0:
        raise ValueError("prompt must hold at least one character, got ''")
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return tokenizer.decode(out[0])


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("impl.gpt.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=cli.existing_dir, required=True,
                        help="a run's ckpt/ folder or one step_XXXXXXXX/ in it")  # fmt: skip
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--max-new-tokens", type=cli.non_negative_int, default=500, help="characters to sample")
    parser.add_argument("--temperature", type=cli.positive_float, default=0.8, help="softmax temperature")
    parser.add_argument("--top-k", type=cli.positive_int, default=200, help="sample among the k likeliest characters")
    parser.add_argument("--seed", type=cli.non_negative_int, default=1337, help="seed of the sampling generator")
    parser.add_argument("--device", type=cli.device, default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--out", type=cli.writable_file, default=None, help="write the text here instead of stdout")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.checkpoint, args.device)
    text = sample(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    if args.out is None:
        print(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
