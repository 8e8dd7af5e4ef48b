"""The ``insertion-diffusion`` command: a LightningCLI with models and DataModules in subclass mode.

``insertion-diffusion fit|validate|test|predict --config configs/star/easy_flexmdm.yaml``

The DataModule's tokenizer and max length are linked into the model when both are instantiated, so a
user's own DataModule (``--data.class_path my_pkg.MyData``) needs nothing else changed.
"""

from __future__ import annotations

import sys
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


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the console script and ``python -m insertion_diffusion``."""
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
