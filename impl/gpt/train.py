"""python -m impl.gpt.train: nanoGPT's character-level Shakespeare run on `impl.training.Trainer`.

The recipe of karpathy/nanoGPT `train.py` with `config/train_shakespeare_char.py`: AdamW (Loshchilov & Hutter
2019) with weight decay on the matrices only, beta2 = 0.99, gradient clipping at 1.0, and the learning rate of
GPT-3 (Brown et al. 2020, appendix B): linear warm-up, then cosine decay to `min_lr` at `lr_decay_iters`.
Configuration is a dataclass with named presets and one CLI flag per field; bf16 autocast on CUDA.

    python -m impl.gpt.train --preset cpu --out runs/cpu  # losses, loss_curve.png, sample.txt, report.md
    torchrun --nproc-per-node 2 -m impl train --out runs/z3 --parallel zero3 --device cpu  # impl.gpt.train_parallel

A run with checkpoints in OUT/ckpt resumes from the newest one; one written for another model refuses to load.
"""

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from impl.common import cli, resolve_device, seed_everything
from impl.gpt.data import CharTokenizer, get_batch, load_shakespeare, train_val_split
from impl.gpt.model import GPT, GPTConfig
from impl.gpt.parallel import MODES, launch_env, plan_layout
from impl.gpt.run_log import RunLog


@dataclass
class TrainConfig:
    # model
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # residual width
    block_size: int = 64  # context length of each training window
    dropout: float = 0.0  # embedding and residual dropout
    attention_backend: str = "sdpa"  # impl.attention backend
    # optimization
    batch_size: int = 12  # windows per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_iters: int = 2000  # optimizer steps
    learning_rate: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine
    warmup_iters: int = 100  # linear warm-up steps
    lr_decay_iters: int | None = None  # end of the cosine; None: max_iters
    weight_decay: float = 0.1  # on matrices and embeddings, not on biases or LayerNorm
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    # evaluation and output
    eval_interval: int = 250  # steps between loss estimates
    eval_iters: int = 20  # batches per split for the periodic estimate
    final_eval_iters: int = 200  # batches per split for the final estimate
    checkpoint_every: int = 500  # steps between checkpoints; 0: only at the end
    sample_chars: int = 500  # characters of text sampled at the end
    seed: int = 1337
    device: str = "auto"  # auto, cpu or cuda; bf16 autocast on cuda

    def __post_init__(self) -> None:
        if self.lr_decay_iters is None:
            self.lr_decay_iters = self.max_iters
        for name in ("batch_size", "grad_accum_steps", "max_iters", "eval_interval", "eval_iters", "final_eval_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        if not 0 < self.min_lr <= self.learning_rate:
            raise ValueError(
                f"TrainConfig.min_lr must be in (0, learning_rate={self.learning_rate}], got {self.min_lr}"
            )

    @classmethod
    def from_name(cls, name: str, **overrides) -> "TrainConfig":
        """A preset: `cpu` (nanoGPT's laptop run) or `gpu` (nanoGPT's train_shakespeare_char), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(
            block_size=self.block_size,
            vocab_size=vocab_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            dropout=self.dropout,
            attention_backend=self.attention_backend,
        )


PRESETS: dict[str, dict] = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=2000, dropout=0.0),
    "gpu": dict(
        n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, max_iters=5000, dropout=0.2, eval_iters=200
    ),
}


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Linear warm-up to learning_rate, cosine decay to min_lr at lr_decay_iters, then constant."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of 2 or more dimensions only (matmuls and embeddings)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda" or None
    )


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def estimate_loss(model: GPT, splits: dict[str, torch.Tensor], cfg: TrainConfig, iters: int, device) -> dict:
    """Mean loss over `iters` random batches of each split; its own generator leaves the training RNG alone."""
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed)
    out = {}
    for name, data in splits.items():
        losses = []
        for _ in range(iters):
            x, y = get_batch(data, cfg.block_size, cfg.batch_size, generator)
            with _autocast(device):
                losses.append(model(x.to(device), y.to(device))[1].item())
        out[name] = sum(losses) / len(losses)
    model.train()
    return out


def _prepare_data(text: str, cfg: TrainConfig) -> tuple[CharTokenizer, dict[str, torch.Tensor]]:
    tok = CharTokenizer(text)
    train, val = train_val_split(torch.tensor(tok.encode(text), dtype=torch.long))
    for name, split in (("train", train), ("val", val)):
        if len(split) <= cfg.block_size:
            raise ValueError(
                f"corpus too short: the {name} split has {len(split)} characters, it must be longer than "
                f"block_size={cfg.block_size}"
            )
    return tok, {"train": train, "val": val}


def train(cfg: TrainConfig, out_dir: str | Path, data_path: str | Path | None = None, progress: bool = True) -> dict:
    """Train per `cfg`, writing checkpoints, logs, the loss curve and a sample into `out_dir`; returns the log."""
    from tqdm.auto import tqdm

    from impl.training import Trainer

    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    tok, splits = _prepare_data(load_shakespeare(data_path), cfg)
    model = GPT(cfg.model_config(tok.vocab_size)).to(device)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_at(it, cfg) / cfg.learning_rate)

    def loss_fn(model: GPT, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        with _autocast(device):
            return model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))[1]

    trainer = Trainer(
        model,
        optimizer,
        loss_fn,
        data=lambda: get_batch(splits["train"], cfg.block_size, cfg.batch_size),  # global RNG: checkpointed
        scheduler=scheduler,
        grad_accum_steps=cfg.grad_accum_steps,
        clip_grad_norm=cfg.grad_clip or None,
        checkpoint_dir=out_dir / "ckpt",
        checkpoint_every=cfg.checkpoint_every,
        keep_last=2,
        config={"model": asdict(model.config), "chars": tok.chars},  # what makes a checkpoint loadable
        progress=progress,
    )
    resumed = trainer.resume()
    log = RunLog(out_dir, start=trainer.step_count)  # rows past the checkpoint were lost with the run: dropped
    session_start = trainer.step_count
    last = time.perf_counter()

    def callback(step: int, loss: float) -> None:
        nonlocal last
        log.step(step, loss, lr_at(step - 1, cfg), seconds=time.perf_counter() - last)  # evaluation excluded
        if step % cfg.eval_interval == 0 and step < cfg.max_iters:
            losses = estimate_loss(model, splits, cfg, cfg.eval_iters, device)
            log.eval(step, losses, cfg.eval_iters)
            if progress:
                tqdm.write(f"step {step}: train {losses['train']:.4f}, val {losses['val']:.4f}")
        last = time.perf_counter()

    start = time.perf_counter()
    try:
        trainer.fit(cfg.max_iters, callback=callback)
    finally:
        log.close()
    wall = time.perf_counter() - start
    final = estimate_loss(model, splits, cfg, cfg.final_eval_iters, device)
    log.eval(trainer.step_count, final, cfg.final_eval_iters)
    return _finish_run(
        log, cfg, device, model, tok, final=final, steps=trainer.step_count,
        session_steps=trainer.step_count - session_start, resumed=resumed, wall=wall,
    )  # fmt: skip


def _finish_run(log, cfg, device, model, tok, *, final, steps, session_steps, resumed, wall, extra=None) -> dict:
    """The run's summary (timing over every resume) and a sample from `model`, written by `log`; the summary."""
    timed_steps, train_seconds = log.timed()  # the whole run, over every resume
    summary = {
        "config": asdict(cfg),
        "device": str(device),
        **(extra or {}),
        "params": model.num_params(),
        "resumed_from": resumed.step if resumed else None,
        "steps": steps,
        "session_steps": session_steps,
        "final_val_loss": final["val"],
        "final_train_loss": final["train"],
        "final_eval_batches": cfg.final_eval_iters,
        "wall_seconds": wall,
        "train_seconds": train_seconds,
        "ms_per_iter": 1000 * train_seconds / max(1, timed_steps),
        "tokens_per_s": timed_steps * cfg.batch_size * cfg.block_size * cfg.grad_accum_steps / max(train_seconds, 1e-9),
    }
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    prompt = "\n" if "\n" in tok.chars else tok.chars[0]  # nanoGPT starts from a newline
    start_ids = torch.tensor([tok.encode(prompt)], device=device)  # (1, 1)
    model.eval()
    sample = tok.decode(model.generate(start_ids, cfg.sample_chars, generator=generator)[0, 1:])
    log.finish(summary, sample)
    return summary


# The check of each TrainConfig field on the command line (impl.common.cli); cross-field rules stay in TrainConfig.
_FIELD_TYPES = {
    **dict.fromkeys(("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum_steps"), cli.positive_int),
    **dict.fromkeys(("max_iters", "lr_decay_iters", "eval_interval", "eval_iters"), cli.positive_int),
    "final_eval_iters": cli.positive_int,
    **dict.fromkeys(("warmup_iters", "checkpoint_every", "sample_chars", "seed"), cli.non_negative_int),
    **dict.fromkeys(("learning_rate", "min_lr"), cli.positive_float),
    **dict.fromkeys(("weight_decay", "grad_clip"), cli.non_negative_float),
    **dict.fromkeys(("dropout", "beta1", "beta2"), cli.unit_interval),
    "device": cli.device,
}


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    from impl.attention import BACKENDS

    parser = cli.parser("impl.gpt.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="starting configuration")
    parser.add_argument("--out", type=cli.writable_dir, required=True, help="folder for checkpoints, logs, sample")
    parser.add_argument("--data", type=cli.existing_file, default=None,
                        help="tiny-shakespeare path (default: $TINYSHAKESPEARE or download)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--parallel", choices=MODES, default="none",
                        help="data-parallel engine under torchrun: ddp, fsdp2 (fully_shard), zero1-3 (default: none)")
    parser.add_argument("--tp", type=cli.positive_int, default=1,
                        help="tensor-parallel degree under torchrun: groups of TP consecutive ranks (default: 1)")
    cpu, gpu = TrainConfig.from_name("cpu"), TrainConfig.from_name("gpu")
    for f in fields(TrainConfig):
        preset_values = f"cpu: {getattr(cpu, f.name)}, gpu: {getattr(gpu, f.name)}"
        kind = dict(type=_FIELD_TYPES[f.name]) if f.name in _FIELD_TYPES else dict(choices=BACKENDS)
        parser.add_argument(f"--{f.name.replace('_', '-')}", **kind, default=None, help=f"({preset_values})")
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    try:
        cfg = TrainConfig.from_name(args.preset, **overrides)
        cfg.model_config(vocab_size=1)  # GPTConfig's own rules (n_embd divisible by n_head, ...)
        args.layout = plan_layout(args.parallel, args.tp, cfg.batch_size, cfg.n_head, launch_env())
    except ValueError as err:
        parser.error(str(err))
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    try:  # the corpus is found (or downloaded) before any work, and its absence is the user's to fix
        load_shakespeare(args.data)
    except RuntimeError as err:
        raise FileNotFoundError(str(err)) from err
    if args.layout.world_size > 1 or args.layout.mode != "none":
        from impl.gpt.train_parallel import train_parallel

        summary = train_parallel(cfg, args.out, args.data, args.layout, progress=not args.no_progress)
        if summary is None:  # not rank 0: rank 0 prints
            return 0
    else:
        summary = train(cfg, args.out, args.data, progress=not args.no_progress)
    print(
        f"val loss {summary['final_val_loss']:.4f} ({summary['final_eval_batches']} batches), "
        f"{summary['tokens_per_s']:.0f} tokens/s, {summary['ms_per_iter']:.1f} ms/iter, "
        f"wall {summary['wall_seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
