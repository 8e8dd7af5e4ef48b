"""The ``insertion-diffusion`` command: a LightningCLI with models and DataModules in subclass mode.

``insertion-diffusion fit|validate|test|predict --config configs/star/easy_flexmdm.yaml``

The DataModule's tokenizer and max length are linked into the model when both are instantiated, so a
user's own DataModule (``--data.class_path my_pkg.MyData``) needs nothing else changed.
"""

from __future__ import annotations

import os
import sys
import zipfile
from collections.abc import Sequence

import lightning.pytorch as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

# Imported so that short class names (``--model FlexMDM``) resolve.
import insertion_diffusion.data
import insertion_diffusion.models  # noqa: F401
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


# Errors that mean "bad input or setting" rather than a bug: shown as one line, not a traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


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
    except Exception as err:
        user = _user_error(err)
        if user is None or os.environ.get("INSERTION_DIFFUSION_DEBUG"):
            raise
        print(f"insertion-diffusion: error: {user}", file=sys.stderr)
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
