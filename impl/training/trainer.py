"""A small training loop: gradient accumulation, clipping, LR schedule, periodic crash-safe checkpoints.

One optimizer step (Algorithm 1 of Adam, Kingma & Ba 2015, for the update itself) averages the gradient of
`grad_accum_steps` micro-batches: each micro-batch loss is divided by `grad_accum_steps` before `backward`, so
the accumulated gradient is the mean over the effective batch, as in nanoGPT's `train.py`. Then the global
gradient norm is clipped (Pascanu et al. 2013), the optimizer steps and the scheduler steps.

Usage (the GPT CLI does exactly this):

    from impl.training import Trainer

    def loss_fn(model, batch):                     # batch: whatever `data` yields
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    trainer = Trainer(
        model, optimizer, loss_fn,
        data=lambda: get_batch("train"),           # a callable drawing from the checkpointed RNGs, or an iterator
                                                   # with state_dict()/load_state_dict() (e.g. data.ShuffledBatches)
        scheduler=scheduler,                       # optional, anything with step()/state_dict()/load_state_dict()
        grad_accum_steps=4, clip_grad_norm=1.0,
        checkpoint_dir="out/ckpt", checkpoint_every=100, keep_last=3,
        config=asdict(model_config),               # saved with each checkpoint; resume refuses another one
    )
    trainer.resume()                               # newest valid checkpoint in checkpoint_dir, if there is one
    trainer.fit(5000, callback=lambda step, loss: ...)   # trains until trainer.step_count == 5000
    loss = trainer.step()                          # or one optimizer step at a time

A run killed at any moment and restarted with the same code ends with bitwise the same parameters and
optimizer state as an uninterrupted run (CPU, fp32; tests/test_training_resume.py), because a checkpoint holds
every piece of state the next step reads: weights, optimizer, scheduler, every RNG and the data position. The
callback runs before its step's checkpoint is written, so an evaluation that draws random batches there is
replayed exactly too.
"""

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from impl.common.checks import check_positive_int
from impl.training.checkpoint import Checkpoint, save_checkpoint
from impl.training.checkpoint import resume as resume_checkpoint

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class Trainer:
    """Trains `model` with `optimizer` on `loss_fn(model, batch)` over batches from `data`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        data: Callable[[], Any] | Iterator[Any],
        *,
        scheduler: Any | None = None,
        grad_accum_steps: int = 1,
        clip_grad_norm: float | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        keep_last: int = 3,
        config: dict | None = None,
        progress: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
        stateful = all(hasattr(data, a) for a in ("__next__", "state_dict", "load_state_dict"))
        if not (stateful or (callable(data) and not hasattr(data, "__next__"))):
            raise TypeError(
                "data must be a callable returning a batch, or an iterator with state_dict()/load_state_dict() "
                f"(so its position can be checkpointed), got {type(data).__name__}"
            )
        if scheduler is not None and not all(hasattr(scheduler, a) for a in ("step", "state_dict", "load_state_dict")):
            raise TypeError(
                f"scheduler must have step()/state_dict()/load_state_dict(), got {type(scheduler).__name__}"
            )
        check_positive_int("grad_accum_steps", grad_accum_steps)
        if clip_grad_norm is not None and not (isinstance(clip_grad_norm, int | float) and clip_grad_norm > 0):
            raise ValueError(f"clip_grad_norm must be None or a number > 0, got {clip_grad_norm!r}")
        if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an int >= 0 (0: never), got {checkpoint_every!r}")
        if checkpoint_every > 0 and checkpoint_dir is None:
            raise ValueError(f"checkpoint_every={checkpoint_every} needs a checkpoint_dir, got None")
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.data = data
        self.scheduler = scheduler
        self.grad_accum_steps = grad_accum_steps
        self.clip_grad_norm = clip_grad_norm
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.keep_last = keep_last
        self.config = config
        self.progress = progress
        self.step_count = 0  # optimizer steps taken, across resumes
        self._saved_step: int | None = None

    def _next_batch(self) -> Any:
        return next(self.data) if hasattr(self.data, "__next__") else self.data()

    def step(self) -> float:
        """One optimizer step over `grad_accum_steps` micro-batches; returns their mean loss."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for _ in range(self.grad_accum_steps):
            loss = self.loss_fn(self.model, self._next_batch())
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
            (loss / self.grad_accum_steps).backward()
            losses.append(loss.detach())
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step_count += 1
        return torch.stack(losses).mean().item()

    def save(self) -> Path:
        """Write a checkpoint of the current state to `checkpoint_dir` (keeping the newest `keep_last`)."""
        if self.checkpoint_dir is None:
            raise ValueError("save() needs a checkpoint_dir, got None")
        path = save_checkpoint(
            self.checkpoint_dir,
            self.step_count,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            data=self.data,
            config=self.config,
            keep_last=self.keep_last,
        )
        self._saved_step = self.step_count
        return path

    def resume(self) -> Checkpoint | None:
        """Load the newest valid checkpoint of `checkpoint_dir` (None, and nothing changed, when there is none)."""
        if self.checkpoint_dir is None:
            raise ValueError("resume() needs a checkpoint_dir, got None")
        checkpoint = resume_checkpoint(
            self.checkpoint_dir,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            data=self.data,
            config=self.config,
        )
        if checkpoint is not None:
            self.step_count = self._saved_step = checkpoint.step
        return checkpoint

    def fit(self, num_steps: int, callback: Callable[[int, float], Any] | None = None) -> list[float]:
        """Train until `step_count == num_steps` (a total, so a resumed run stops where the original would);
        checkpoints every `checkpoint_every` steps and at the end; returns the losses of the steps taken here.
        `callback(step, loss)` runs after each step, before that step's checkpoint."""
        if not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps must be an int >= 0, got {num_steps!r}")
        from tqdm.auto import tqdm

        losses = []
        bar = tqdm(total=num_steps, initial=self.step_count, disable=not self.progress, desc="train")
        with bar:
            while self.step_count < num_steps:
                loss = self.step()
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if callback is not None:  # before the checkpoint, so RNG draws in an evaluation are saved too
                    callback(self.step_count, loss)
                if self.checkpoint_every and self.step_count % self.checkpoint_every == 0:
                    self.save()
        if self.checkpoint_dir is not None and self._saved_step != self.step_count:
            self.save()
        return losses
