"""`refiners-train`: LoRA fine-tuning of Stable Diffusion from a config file, on Lightning's command line.

    refiners-train fit --config configs/sd15-lora.yaml
    refiners-train fit --config configs/sd15-lora.yaml --data.data_dir my_images --trainer.max_steps 2000
    refiners-train fit --config configs/sd15-lora.yaml --ckpt_path outputs/.../checkpoints/last.ckpt  # resume

It is Lightning's `LightningCLI` over `LoraFineTuning` and `CaptionedImageDataModule`: every argument of the module
(`model.*`), the data (`data.*`) and the `Trainer` (`trainer.*`: devices, strategy, precision, callbacks, loggers...)
comes from the config or the command line, and `refiners-train fit --print_config` shows them all. An `ExportLora`
callback is always there (configure it under `export`): the LoRA is written at every checkpoint and at the end.
"""

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from refiners.training.callbacks import ExportLora
from refiners.training.data import CaptionedImageDataModule
from refiners.training.module import LoraFineTuning

__all__ = ["LoraTrainingCLI", "main"]


class LoraTrainingCLI(LightningCLI):
    """`LightningCLI` for `LoraFineTuning` and `CaptionedImageDataModule`, with an `ExportLora` under `export`.

    The optimizer is the module's `optimizer` argument (its parameter groups carry their own learning rates), not
    LightningCLI's `--optimizer`.

    Args:
        args: The command line arguments (default: `sys.argv[1:]`), or a dict of the config.
        run: Run the subcommand (fit...); otherwise only instantiate the classes.
    """

    def __init__(self, args: ArgsType = None, run: bool = True) -> None:
        super().__init__(
            LoraFineTuning,
            CaptionedImageDataModule,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ExportLora, "export")


def main(args: ArgsType = None) -> None:
    """The `refiners-train` command.

    Args:
        args: The command line arguments (default: `sys.argv[1:]`).
    """
    LoraTrainingCLI(args=args)


if __name__ == "__main__":
    main()
