"""Checkpointing guards: a checkpoint when ``fit`` is interrupted, none when the loss went non-finite.

The ``insertion-diffusion`` command always adds :class:`ExceptionCheckpoint` (options under
``--exception_checkpoint.*``): on SIGTERM (a scheduler's pre-emption), Ctrl-C or a crash it writes
``on_exception.ckpt`` next to the run's ``last.ckpt``; ``fit --ckpt_path last`` resumes from whichever of the two
is newer (:func:`newest_resume_checkpoint`). It writes nothing when training stopped on a non-finite loss or
gradient (``FloatingPointError``): the weights were about to become NaN, and the last good checkpoint must stay the
newest.

Under DDP it also stops every process on the same step when SIGTERM or SIGINT (Ctrl-C) arrives
(:meth:`ExceptionCheckpoint.on_train_start`): Lightning 2.6's own SIGTERM handler runs a collective inside the signal
handler, and Ctrl-C raises ``KeyboardInterrupt`` wherever each rank happens to be; with the signal reaching every
rank (``scancel``, ``kill`` of the process group, a terminal's Ctrl-C, the parent forwarding it to its children)
the ranks' collectives no longer pair up and the run hangs.

It does what Lightning's ``OnExceptionCheckpoint`` does, but is a plain callback: Lightning turns every ``fit``
without a ``ckpt_path`` into ``fit(ckpt_path="last")`` as soon as an ``OnExceptionCheckpoint`` is configured (a
fresh run would silently continue an old one that logged into the same directory), and any ``Checkpoint`` callback
replaces the ``ModelCheckpoint`` Lightning adds by default.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import lightning.pytorch as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["ExceptionCheckpoint", "checkpoint_dir", "is_nonfinite_stop", "newest_resume_checkpoint", "stop_report",
           "stop_signal"]

_stop_signal: int | None = None


def stop_signal() -> int | None:
    """The signal that stopped this process's last multi-process ``fit`` (``signal.SIGTERM`` or ``signal.SIGINT``,
    agreed by all ranks), or None. The command reads it to print the right message and exit code."""
    return _stop_signal


def stop_report() -> tuple[str, int]:
    """``(what stopped the run, exit code)`` after a ``SIGTERMException``: Ctrl-C exits like an interrupted
    process (130), SIGTERM like a terminated one (143), so job schedulers do not count the run as finished."""
    return ("Ctrl-C (SIGINT)", 130) if _stop_signal == signal.SIGINT else ("SIGTERM", 143)


def is_nonfinite_stop(exception: BaseException | None) -> bool:
    """Whether ``exception`` (or one it was raised from) is a non-finite-loss stop (``FloatingPointError``)."""
    seen: set[int] = set()
    while exception is not None and id(exception) not in seen:
        if isinstance(exception, FloatingPointError):
            return True
        seen.add(id(exception))
        exception = exception.__cause__ or exception.__context__
    return False


def checkpoint_dir(trainer: L.Trainer) -> str:
    """The directory the trainer's first ``ModelCheckpoint`` writes to (resolved the way Lightning does it)."""
    cb = trainer.checkpoint_callback
    if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None:
        return str(cb.dirpath)
    if trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
        version = logger.version
        version = version if isinstance(version, str) else f"version_{version}"
        return os.path.join(save_dir, str(logger.name), version, "checkpoints")
    return os.path.join(trainer.default_root_dir, "checkpoints")


def newest_resume_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest of the run's ``last*.ckpt`` files and its exception checkpoint, or None if there is none."""
    candidates: set[str] = set()
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint):
            candidates |= {str(p) for p in cb._find_last_checkpoints(trainer)}
        elif isinstance(cb, ExceptionCheckpoint):
            if not cb.ckpt_path:
                cb.resolve_dir(trainer)
            candidates.add(cb.ckpt_path)
    existing = [p for p in candidates if os.path.isfile(p)]
    return max(existing, key=os.path.getmtime) if existing else None


class ExceptionCheckpoint(Callback):
    """Save a checkpoint when ``fit`` stops on an exception or a signal (SIGTERM, Ctrl-C), except on a
    non-finite loss; remove it when a later ``fit`` in the same directory finishes.

    Args:
        dirpath: where to write; default: the run's checkpoint directory (that of its ``ModelCheckpoint``).
        filename: file name without the ``.ckpt`` extension.

    Under DDP it saves only on signals, which reach every process: saving is collective, and an exception raised
    on one process alone would leave the save waiting for the others. For SIGTERM and SIGINT it replaces the handlers
    (Lightning's broadcasts from inside the signal handler and can deadlock) by one that only records the signal; after
    every training batch the ranks agree on it with one all-reduce, and all of them stop at the end of that same
    batch, so the collective save below runs on every rank.
    """

    FILE_EXTENSION = ".ckpt"

    def __init__(self, dirpath: str | None = None, filename: str = "on_exception") -> None:
        if not filename:
            raise ValueError("exception_checkpoint.filename cannot be empty")
        self.dirpath = dirpath
        self.filename = filename
        self._auto_dir: str | None = None
        self.saved_path: str | None = None
        self._pending_signal = 0
        self._synced_stop = False
        self._previous_sigint = None

    def resolve_dir(self, trainer: L.Trainer) -> None:
        """Fix the directory from the trainer before ``fit`` starts (so ``--ckpt_path last`` can find the file)."""
        if self.dirpath is None:
            self._auto_dir = checkpoint_dir(trainer)

    @property
    def ckpt_path(self) -> str:
        """The file this callback writes ("" while its directory is not known yet)."""
        directory = self.dirpath or self._auto_dir
        return os.path.join(directory, self.filename + self.FILE_EXTENSION) if directory else ""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None and self._auto_dir is None:
            self._auto_dir = checkpoint_dir(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its signal handlers just before training starts and restores the previous ones at
        # teardown; SIGINT's is restored here (on_train_end / on_exception), so the handlers set here live exactly
        # as long as this fit.
        global _stop_signal
        _stop_signal = None
        self._pending_signal = 0
        self._synced_stop = (trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
                             and threading.current_thread() is threading.main_thread())
        if not self._synced_stop:
            return
        launcher = trainer.strategy.launcher

        def record(signum: int, frame: object) -> None:
            if not self._pending_signal and launcher is not None:
                launcher.kill(signum)  # processes this one started (single-node ddp): stop them too
            self._pending_signal = max(self._pending_signal, int(signum))
            print(f"[rank {trainer.global_rank}] {signal.Signals(signum).name}: stopping all ranks after this "
                  "training batch (SIGKILL stops at once, without a checkpoint)", file=sys.stderr, flush=True)

        # signal.signal returns None for a handler not set from Python; SIG_DFL is the closest thing to restore then
        self._previous_sigint = signal.signal(signal.SIGINT, record) or signal.SIG_DFL  # Ctrl-C reaches every rank
        signal.signal(signal.SIGTERM, record)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        if not self._synced_stop:
            return
        # Every rank reaches this point once per batch, so the all-reduce pairs up whatever each rank was doing
        # when its signal arrived; a signal on any rank stops them all here (SIGTERM wins over SIGINT).
        flag = torch.tensor([float(self._pending_signal)], device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            global _stop_signal
            _stop_signal = int(flag.item())
            # The flag Lightning's own SIGTERM handler sets: the loop then raises SIGTERMException once this batch
            # is complete (after its validation and periodic checkpoint, as in a single process), on every rank.
            trainer._signal_connector.received_sigterm = True

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if getattr(trainer.state.fn, "value", trainer.state.fn) != "fit" or is_nonfinite_stop(exception):
            return
        if trainer.world_size > 1 and not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return
        if not self.ckpt_path:
            self._auto_dir = checkpoint_dir(trainer)
        trainer.save_checkpoint(self.ckpt_path)
        self.saved_path = self.ckpt_path
        rank_zero_info(f"saved {self.ckpt_path} at step {trainer.global_step}")
        if trainer.is_global_zero:
            print(f"insertion-diffusion: interrupted at step {trainer.global_step}; checkpoint saved to "
                  f"{self.ckpt_path} (resume with: fit --ckpt_path last)", file=sys.stderr, flush=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # A finished fit removes its exception checkpoint, so an old one never wins over a newer last.ckpt.
        path = self.ckpt_path
        if getattr(stage, "value", stage) == "fit" and path and os.path.exists(path):
            trainer.strategy.remove_checkpoint(path)
