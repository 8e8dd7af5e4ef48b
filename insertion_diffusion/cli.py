"""The ``insertion-diffusion`` command: a LightningCLI with models and DataModules in subclass mode.

``insertion-diffusion fit|validate|test|predict --config configs/star/easy_flexmdm.yaml``

The DataModule's tokenizer and max length are linked into the model when both are instantiated, so a
user's own DataModule (``--data.class_path my_pkg.MyData``) needs nothing else changed.

Options added to Lightning's (see docs/distributed.md):

* ``--global_batch_size N``: ``fit`` sets ``trainer.accumulate_grad_batches = N / (data.batch_size * world size)``.
* ``--ema_decay D``: keep an exponential moving average of the weights (Lightning's ``EMAWeightAveraging``);
  validation, the checkpoints' ``state_dict`` and everything after ``fit`` use the averaged weights.
* ``--exception_checkpoint.*``: the checkpoint written when ``fit`` is interrupted (always on; see
  :class:`~insertion_diffusion.callbacks.guards.ExceptionCheckpoint`).
"""

from __future__ import annotations

import os
import sys
import zipfile
from collections.abc import Sequence

import lightning.pytorch as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

# Imported so that short class names (``--model FlexMDM``) resolve.
import insertion_diffusion.data
import insertion_diffusion.models  # noqa: F401
from insertion_diffusion.callbacks.guards import ExceptionCheckpoint, newest_resume_checkpoint, stop_report
from insertion_diffusion.callbacks.predictions import JsonlPredictionWriter


class SaveRunConfig(SaveConfigCallback):
    """Save ``config.yaml`` for ``fit`` and ``config_<stage>.yaml`` for other stages.

    A ``test``/``predict`` run logging into the fit's directory must not overwrite the fit's config, which
    later commands reuse with ``--config``.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        name = getattr(stage, "value", stage)
        if name != "fit":
            self.config_filename = f"config_{name}.yaml"
        super().setup(trainer, pl_module, stage)


class InsertionDiffusionCLI(LightningCLI):
    """LightningCLI with the data -> model links and a predictions writer."""

    def _check_ckpt_path(self) -> None:
        ckpt = self.config_init[self.subcommand].get("ckpt_path") if self.subcommand else None
        if ckpt in ("last", "best"):
            raise ValueError(
                f"--ckpt_path {ckpt} only refers to checkpoints of the same process's fit; for "
                f"{self.subcommand} pass the checkpoint file, e.g. --ckpt_path runs/<name>/version_0/checkpoints/last.ckpt"
            )

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint here (to re-apply its hyper-parameters); a truncated or foreign file
        # would surface as a bare OSError. Torch checkpoints are zip archives: check that first.
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and ckpt not in ("last", "best", "hpc", "registry") and os.path.isfile(ckpt) and not zipfile.is_zipfile(ckpt):
            raise ValueError(
                f"--ckpt_path {ckpt!r} is not a readable checkpoint (truncated or not a torch checkpoint); "
                "pass an intact .ckpt file, e.g. the run's checkpoints/last.ckpt"
            )
        if ckpt and os.path.isfile(ckpt):
            self._check_ckpt_model_class(ckpt, sub)
        super()._parse_ckpt_path()

    def _check_ckpt_model_class(self, ckpt: str, sub: str) -> None:
        """Refuse a checkpoint of another method before Lightning tries to merge its hyper-parameters."""
        import torch

        meta = torch.load(ckpt, weights_only=True, map_location="cpu").get("insertion_diffusion") or {}
        model_cfg = self.config[sub].get("model")
        wanted = str(getattr(model_cfg, "class_path", "") or "").rpartition(".")[2]
        saved = meta.get("model_class")
        if saved and wanted and saved != wanted:
            raise ValueError(
                f"checkpoint {ckpt!r} was trained with model {saved}, but the model is {wanted}; "
                f"use --model {saved} (or the config it was trained with)"
            )

    def before_validate(self) -> None:
        self._check_ckpt_path()

    def before_test(self) -> None:
        self._check_ckpt_path()

    def before_predict(self) -> None:
        self._check_ckpt_path()

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tokenizer", "model.init_args.tokenizer", apply_on="instantiate")
        parser.link_arguments("data.max_length", "model.init_args.max_length", apply_on="instantiate")
        parser.add_lightning_class_args(JsonlPredictionWriter, "predictions")
        parser.add_lightning_class_args(ExceptionCheckpoint, "exception_checkpoint")
        parser.add_argument(
            "--global_batch_size", type=int | None, default=None,
            help="fit: rows per optimiser step over all processes; sets trainer.accumulate_grad_batches to "
            "global_batch_size / (data.batch_size * world size), which must divide evenly",
        )
        parser.add_argument(
            "--ema_decay", type=float | None, default=None,
            help="keep an exponential moving average of the weights with this decay (e.g. 0.999) and use it for "
            "validation, checkpoints and everything after fit (Lightning's EMAWeightAveraging)",
        )

    # --- checks before anything is built --------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        _check_devices(cfg.get("trainer") or {})
        decay = cfg.get("ema_decay")
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay={decay} must be in (0, 1), e.g. 0.999")
        n = cfg.get("global_batch_size")
        if n is not None and n < 1:
            raise ValueError(f"global_batch_size={n} must be a positive number of rows")

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.get("ema_decay") is not None:
            callbacks = [*callbacks, EMAWeightAveraging(decay=cfg["ema_decay"])]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self.subcommand in ("fit", None):  # None: built without running (run=False)
            self._apply_global_batch_size()

    def _apply_global_batch_size(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        n = cfg.get("global_batch_size")
        if n is None:
            return
        trainer = self.trainer
        per_rank = getattr(self.datamodule, "batch_size", None)
        if not isinstance(per_rank, int) or per_rank < 1:
            raise ValueError(
                f"global_batch_size={n} needs a DataModule with an integer data.batch_size "
                f"({type(self.datamodule).__name__} has {per_rank!r})"
            )
        world = trainer.world_size
        per_step = per_rank * world
        layout = (f"data.batch_size={per_rank} x world size {world} (trainer.devices={trainer.num_devices} x "
                  f"trainer.num_nodes={trainer.num_nodes})")
        if n % per_step:
            lower, upper = (n // per_step) * per_step, (n // per_step + 1) * per_step
            raise ValueError(
                f"global_batch_size={n} is not a multiple of {layout} = {per_step}; use global_batch_size "
                f"{lower or upper} or {upper}, or change data.batch_size"
            )
        accumulate = n // per_step
        given = cfg["trainer"].get("accumulate_grad_batches", 1)
        if given not in (1, accumulate):
            raise ValueError(
                f"trainer.accumulate_grad_batches={given} conflicts with global_batch_size={n} (which needs "
                f"{accumulate}); set only one of them"
            )
        trainer.accumulate_grad_batches = accumulate
        rank_zero_info(f"global batch {n} rows = {layout} x trainer.accumulate_grad_batches={accumulate}")

    def before_fit(self) -> None:
        for cb in self.trainer.callbacks:
            if isinstance(cb, ExceptionCheckpoint):
                cb.resolve_dir(self.trainer)
        # ``--ckpt_path last``: the newest of last.ckpt and the exception checkpoint (Lightning only looks at the
        # latter when an OnExceptionCheckpoint is configured, which has side effects; see callbacks/guards.py).
        if self.config_init["fit"].get("ckpt_path") == "last":
            newest = newest_resume_checkpoint(self.trainer)
            if newest is not None:
                self.config_init["fit"]["ckpt_path"] = newest
                rank_zero_info(f"resuming from {newest}")


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _check_devices(trainer_cfg) -> None:
    """Refuse more devices than the machine has before Lightning builds anything, naming the keys to change."""
    import torch

    accelerator = str(trainer_cfg.get("accelerator") or "auto")
    devices = trainer_cfg.get("devices")
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if accelerator in ("gpu", "cuda"):
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 0:
            raise ValueError(
                f"trainer.accelerator={accelerator} but this machine has no usable GPU (torch.cuda.is_available() is "
                "False); use --trainer.accelerator cpu (and --trainer.devices N for N CPU processes)"
            )
        if isinstance(devices, int) and devices > gpus:
            raise ValueError(
                f"trainer.devices={devices} but this machine has {gpus} GPU(s); use --trainer.devices {gpus} or -1 "
                "(all), and trainer.num_nodes for more machines"
            )
        return
    if not isinstance(devices, int) or devices <= 1:
        return
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    cores = _available_cpus()
    if on_cpu and devices > cores:
        raise ValueError(
            f"trainer.devices={devices} asks for {devices} CPU processes but this machine has {cores} CPU "
            f"core(s); use --trainer.devices {cores} or fewer (each process is one DDP rank), or run on GPUs"
        )


# Errors that mean "bad input or setting" rather than a bug: shown as one line, not a traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, MisconfigurationException)


def _raised_here(err: BaseException) -> bool:
    tb = err.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and f"{os.sep}insertion_diffusion{os.sep}" in last.tb_frame.f_code.co_filename


def _user_error(err: BaseException) -> BaseException | None:
    """The user error to show from an exception chain: the outermost one raised by this package (ours carry
    the key and the fix; jsonargparse wraps them while instantiating), else the innermost user error."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    ours = [e for e in chain if isinstance(e, USER_ERRORS) and _raised_here(e)]
    if ours:
        return ours[0]
    users = [e for e in chain if isinstance(e, USER_ERRORS)]
    return users[-1] if users else None


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the console script and ``python -m insertion_diffusion``.

    A bad value or file ends the run with ``insertion-diffusion: error: <message>`` and exit code 2; set
    ``INSERTION_DIFFUSION_DEBUG=1`` for the full traceback.
    """
    try:
        _run(args)
    except SIGTERMException:
        # Lightning stopped on SIGTERM (e.g. a scheduler's pre-emption) after saving the exception checkpoint;
        # exit like a terminated process so that job schedulers do not count the run as finished. Under DDP a
        # Ctrl-C takes the same synchronised path (callbacks/guards.py) and exits like an interrupted process.
        name, code = stop_report()
        print(f"insertion-diffusion: stopped by {name}", file=sys.stderr)
        raise SystemExit(code) from None
    except Exception as err:
        user = _user_error(err)
        if user is None or os.environ.get("INSERTION_DIFFUSION_DEBUG"):
            raise
        message = " ".join(str(user).split())  # one line, whatever the library put in it
        print(f"insertion-diffusion: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(args: Sequence[str] | None) -> None:
    InsertionDiffusionCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
