"""The GPT's training run on several processes: `python -m impl train` under torchrun (see `impl.gpt.parallel`).

    torchrun --nproc-per-node 2 -m impl train --out runs/ddp --parallel zero3 --device cpu
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 -m impl train --out ... --parallel fsdp2

It is the single-process run of `impl.gpt.train` spread over the ranks, step for step:

- Every rank draws the same global batch (`--batch-size` windows, from the same seeded RNG as one process) and
  takes its slice, batch_size / dp windows; the engines average gradients over the data-parallel ranks, so each
  step's gradient is the gradient of the global batch, and the loss curve is the single-process one (in fp32,
  up to the order of summation). The logged loss is the mean over the ranks' slices, the global batch's mean.
- The same AdamW, learning-rate schedule and global gradient-norm clipping as one process.
- Checkpoints hold the full model and optimizer state in the single-process format, written by rank 0 with
  `impl.training.save_checkpoint` (atomic: a crash loses nothing already checkpointed); every rank reads the
  newest valid one at start and takes its part. So a run resumes at any world size, mode or TP degree, and
  with `--parallel none` in one process. On several nodes OUT must be a folder every node sees.
- Rank 0 writes the run log, the report and the sample; evaluations run on every rank, each on its slice.

With dropout > 0 each data-parallel rank draws its dropout masks from its own generator (seeded by the seed,
the step and the rank), so ranks do not repeat each other's masks; such a run is not the single-process one.
"""

import contextlib
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from impl.common import resolve_device, seed_everything
from impl.gpt.data import get_batch, load_shakespeare
from impl.gpt.model import GPT
from impl.gpt.parallel import (
    Engine,
    Layout,
    init_groups,
    load_full_model,
    load_named_optimizer_state,
    named_optimizer_state,
)
from impl.gpt.run_log import RunLog
from impl.gpt.train import TrainConfig, _autocast, _finish_run, _prepare_data, lr_at, make_optimizer

TIMEOUT_S = 900.0  # every collective; a rank that stops answering fails the run after this long


def _lr(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based), computed as LambdaLR does in the single process."""
    return cfg.learning_rate * (lr_at(step, cfg) / cfg.learning_rate)


def _mirror(cfg: TrainConfig, vocab_size: int):
    """A single-process GPT, its AdamW and LambdaLR on the CPU, built without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        model = GPT(cfg.model_config(vocab_size))
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_at(it, cfg) / cfg.learning_rate)
    return model, optimizer, scheduler


def _at_step(scheduler, step: int, cfg: TrainConfig) -> None:
    """The scheduler (and its optimizer's learning rate) as the single-process run has them after `step` steps."""
    lr = _lr(step, cfg)
    for group in scheduler.optimizer.param_groups:
        group["lr"] = lr
    state = scheduler.state_dict()
    state.update(last_epoch=step, _step_count=step + 1, _last_lr=[lr] * len(scheduler.optimizer.param_groups))
    scheduler.load_state_dict(state)


class RankRun:
    """One rank's part of the run: its engine, its slice of each global batch, saving and resuming."""

    def __init__(self, cfg: TrainConfig, layout: Layout, engine: Engine, splits: dict, vocab_size: int, config: dict):
        self.cfg, self.layout, self.engine, self.splits = cfg, layout, engine, splits
        self.vocab_size, self.config = vocab_size, config
        self.per_rank = cfg.batch_size // layout.dp
        self.lo = layout.dp_rank * self.per_rank

    def slice(self, batch):
        return tuple(t[self.lo : self.lo + self.per_rank].to(self.engine.device) for t in batch)

    def dp_mean(self, value: torch.Tensor) -> float:
        value = value.detach().float().reshape(1).to(self.engine.device)
        dist.all_reduce(value, group=self.engine.dp_group)
        return value.item() / self.layout.dp

    def dropout_rng(self, step: int, micro: int):
        """Own dropout masks per data-parallel rank; the global RNG (the data) stays the same on every rank."""
        if self.cfg.dropout == 0 or self.layout.dp == 1:
            return contextlib.nullcontext()
        devices = [self.engine.device] if self.engine.device.type == "cuda" else []
        stack = contextlib.ExitStack()
        stack.enter_context(torch.random.fork_rng(devices=devices))
        torch.manual_seed(((self.cfg.seed * 1_000_003 + step) * 64 + micro) * 4096 + self.layout.dp_rank)
        return stack

    def step(self, step: int) -> float:
        """One optimizer step over grad_accum_steps global batches, each rank on its slice; the global mean loss."""
        engine, cfg = self.engine, self.cfg
        engine.module.train()
        engine.zero_grad()
        losses = []
        for micro in range(cfg.grad_accum_steps):
            x, y = self.slice(get_batch(self.splits["train"], cfg.block_size, cfg.batch_size))  # global RNG
            with engine.sync(last=micro == cfg.grad_accum_steps - 1), self.dropout_rng(step, micro):
                with _autocast(engine.device):
                    loss = engine.loss(x, y)
                (loss / cfg.grad_accum_steps).backward()
            losses.append(loss.detach())
        engine.step(_lr(step, cfg))
        return self.dp_mean(torch.stack(losses).mean())

    @torch.no_grad()
    def estimate(self, iters: int) -> dict:
        """estimate_loss of the single process, each rank on its slice of the same batches."""
        self.engine.module.eval()
        generator = torch.Generator().manual_seed(self.cfg.seed)
        out = {}
        for name, data in self.splits.items():
            losses = []
            for _ in range(iters):
                x, y = self.slice(get_batch(data, self.cfg.block_size, self.cfg.batch_size, generator))
                with _autocast(self.engine.device):
                    losses.append(self.dp_mean(self.engine.loss(x, y)))
            out[name] = sum(losses) / len(losses)
        self.engine.module.train()
        return out

    def gathered(self):
        """Collective: on rank 0 the single-process model, optimizer and scheduler holding the full state."""
        state = self.engine.full_state()
        if state is None:
            return None
        model, optimizer, scheduler = _mirror(self.cfg, self.vocab_size)
        load_full_model(model, state[0])
        load_named_optimizer_state(model, optimizer, state[1])
        return model, optimizer, scheduler

    def save(self, directory: Path, step: int) -> None:
        from impl.training import save_checkpoint

        mirror = self.gathered()
        if mirror is not None:
            model, optimizer, scheduler = mirror
            _at_step(scheduler, step, self.cfg)
            save_checkpoint(directory, step, model=model, optimizer=optimizer, scheduler=scheduler,
                            config=self.config, keep_last=2)  # fmt: skip

    def resume(self, directory: Path):
        """Every rank reads the newest valid checkpoint (RNGs included) and takes its part; None if there is none."""
        from impl.training import resume

        model, optimizer, scheduler = _mirror(self.cfg, self.vocab_size)
        checkpoint = resume(directory, model=model, optimizer=optimizer, scheduler=scheduler, config=self.config)
        if checkpoint is not None:
            self.engine.load_full_state(model.state_dict(), named_optimizer_state(model, optimizer))
        dist.barrier()
        return checkpoint


def build_run(cfg: TrainConfig, layout: Layout, device: torch.device, splits: dict, vocab_size: int,
              config: dict | None = None) -> RankRun:  # fmt: skip
    """Collective: join the world and the TP/DP groups, build the seeded GPT (every rank the same) and its engine."""
    tp_group, dp_group = init_groups(layout, device, TIMEOUT_S)
    seed_everything(cfg.seed)
    model = GPT(cfg.model_config(vocab_size)).to(device)
    config = {"model": asdict(model.config)} if config is None else config
    engine = Engine(model, cfg, layout, dp_group, tp_group, device, make_optimizer)
    return RankRun(cfg, layout, engine, splits, vocab_size, config)


def train_parallel(cfg: TrainConfig, out_dir, data_path, layout: Layout, progress: bool = True) -> dict | None:
    """`impl.gpt.train.train` on the ranks of `layout`; the summary on rank 0, None on the others."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", layout.local_rank)
    joined = dist.is_initialized()  # by a launcher in this process, which also ends the group
    try:
        return _train(cfg, Path(out_dir), data_path, layout, device, progress)
    finally:
        if not joined and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, out_dir, data_path, layout, device, progress) -> dict | None:
    from tqdm.auto import tqdm

    tok, splits = _prepare_data(load_shakespeare(data_path), cfg)
    config = {"model": asdict(cfg.model_config(tok.vocab_size)), "chars": tok.chars}  # as one process writes it
    run = build_run(cfg, layout, device, splits, tok.vocab_size, config)
    ckpt = out_dir / "ckpt"
    resumed = run.resume(ckpt)
    step = session_start = resumed.step if resumed else 0
    lead = layout.rank == 0
    log = RunLog(out_dir, start=step) if lead else None
    tqdm.set_lock(threading.RLock())  # not a multiprocessing semaphore that a killed rank would leak
    bar = tqdm(total=cfg.max_iters, initial=step, disable=not (progress and lead), desc=f"train ({layout.mode})")
    start = time.perf_counter()
    saved = step
    try:
        with bar:
            while step < cfg.max_iters:
                last = time.perf_counter()
                loss = run.step(step)
                step += 1
                seconds = time.perf_counter() - last
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if lead:
                    log.step(step, loss, lr_at(step - 1, cfg), seconds=seconds)
                if step % cfg.eval_interval == 0 and step < cfg.max_iters:
                    losses = run.estimate(cfg.eval_iters)
                    if lead:
                        log.eval(step, losses, cfg.eval_iters)
                        if progress:
                            tqdm.write(f"step {step}: train {losses['train']:.4f}, val {losses['val']:.4f}")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    run.save(ckpt, step)
                    saved = step
        if saved != step:
            run.save(ckpt, step)
    finally:
        if lead:
            log.close()
    wall = time.perf_counter() - start
    final = run.estimate(cfg.final_eval_iters)
    mirror = run.gathered()
    if not lead:
        return None
    log.eval(step, final, cfg.final_eval_iters)
    parallel = {"mode": layout.mode, "world_size": layout.world_size, "tp": layout.tp, "dp": layout.dp}
    return _finish_run(
        log, cfg, device, mirror[0].to(device), tok, final=final, steps=step, session_steps=step - session_start,
        resumed=resumed, wall=wall, extra={"parallel": parallel},
    )  # fmt: skip

