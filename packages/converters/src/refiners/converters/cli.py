"""`refiners-convert`: Stable Diffusion 1.x checkpoints to refiners weights, from the command line.

    refiners-convert sd1 --from SOURCE --to FOLDER                  # clip_text, autoencoder and unet .safetensors
    refiners-convert sdxl --from SOURCE --to FOLDER                 # the same for Stable Diffusion XL
    refiners-convert clip-text --from SOURCE --to clip_text.safetensors [--tokenizer TOKENIZER]
    refiners-convert autoencoder --from SOURCE --to autoencoder.safetensors
    refiners-convert unet --from SOURCE --to unet.safetensors
    refiners-convert lora --from FILE --to FILE.safetensors [--layout {refiners,peft,kohya}] [--lenient]
    refiners-convert sam --from sam_vit_b_01ec64.pth --to FILE.safetensors   # Segment Anything (any size)
    refiners-convert hq-sam --from sam_hq_vit_b.pth --to FILE.safetensors    # HQ-SAM's weights, for HQSAMAdapter
    refiners-convert dinov2 --from SOURCE --to FILE.safetensors     # facebook's .pth, a transformers folder, a Hub id
    refiners-convert clip-image --from SOURCE --to FILE.safetensors # a transformers CLIPVisionModelWithProjection
    refiners-convert controlnet --from SOURCE --to FILE.safetensors # diffusers' ControlNetModel, lllyasviel's files
    refiners-convert ip-adapter --from FILE --to FILE.safetensors   # h94's IP-Adapter files (base, plus, FaceID)
    refiners-convert sd1-to-diffusers --from FOLDER --to FOLDER     # back: a diffusers StableDiffusionPipeline folder

SOURCE is a diffusers folder (or one component's folder), a single checkpoint file (`.safetensors`, `.ckpt`; the
original layout, or one component's weights), or a Hugging Face Hub id such as `runwayml/stable-diffusion-v1-5`.
Every command takes `--dtype {float32,float16,bfloat16}` (default: keep the source's) and `--check`, which runs
the converted model and the reference (diffusers/transformers, from the `reference` extra) on a random input and
prints the max abs difference. Progress goes to stderr, the written paths to stdout. Exit status: 0 on success,
1 on an error or a failed check, 2 on a usage error. A source that already holds refiners weights (what this command
writes) is refused with how to load it instead.

`lora` reads a Stable Diffusion 1.x LoRA file of any layout (PEFT/diffusers, the old attention processors, kohya and
A1111, LyCORIS LoHa/LoKr/LoCon/DoRA; `.safetensors`, or `.bin`/`.pt` read with `torch.load(weights_only=True)`) and
writes it in the refiners layout (`--layout refiners`, the default), as PEFT/diffusers or as kohya files, to the
`.safetensors` file `--to` names (its folder is created if needed). A tensor that no layer of SD1.5 has use for is an
error that lists it (`--lenient`: a warning, the rest is written).
"""

import argparse
import contextlib
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from refiners.adapters.lora import UnmatchedLoraKeysError, UnmatchedLoraKeysWarning, convert_sd1_lora
from refiners.converters.clip_image import add_clip_image_command, run_clip_image_command
from refiners.converters.controlnet import add_controlnet_command, run_controlnet_command
from refiners.converters.dinov2 import add_dinov2_command, run_dinov2_command
from refiners.converters.ip_adapter import add_ip_adapter_command, run_ip_adapter_command
from refiners.converters.reference_check import (
    Comparison,
    compare_autoencoder,
    compare_clip_text,
    compare_unet,
    missing_reference_packages,
)
from refiners.converters.segment_anything import add_sam_commands, run_sam_command
from refiners.converters.sources import Source, SourceError, open_source
from refiners.converters.stable_diffusion import (
    ConversionResult,
    convert_autoencoder,
    convert_clip_text,
    convert_stable_diffusion_1,
    convert_unet,
)
from refiners.converters.t2i_adapter import add_t2i_adapter_command, run_t2i_adapter_command
from refiners.converters.to_diffusers import add_to_diffusers_command, run_to_diffusers_command

__all__ = ["main", "build_parser", "CHECK_TOLERANCE", "CHECK_TOLERANCE_AFTER_CAST"]

CHECK_TOLERANCE = 1e-4
"""`--check` fails above this max abs difference, relative to the reference output's scale."""
CHECK_TOLERANCE_AFTER_CAST = 5e-2
"""The same, when the weights were cast to a less precise dtype (their rounding shows in the output)."""

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_COMPONENTS = {"clip-text": ("text_encoder", "tokenizer"), "autoencoder": ("vae",), "unet": ("unet",)}
_REFERENCES = {
    "clip_text": ("clip-text", "transformers' CLIPTextModel", compare_clip_text),
    "autoencoder": ("autoencoder", "diffusers' AutoencoderKL", compare_autoencoder),
    "unet": ("unet", "diffusers' UNet2DConditionModel", compare_unet),
}


def build_parser() -> argparse.ArgumentParser:
    """The `refiners-convert` argument parser."""
    parser = argparse.ArgumentParser(
        prog="refiners-convert",
        description="Convert Stable Diffusion 1.x checkpoints (diffusers folders, original single files, Hugging Face "
        "Hub ids) into refiners weights.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "sd1": "the whole model: clip_text, autoencoder and unet .safetensors files in a folder",
        "clip-text": "the text encoder, for CLIPTextEncoderL (with its tokenizer)",
        "autoencoder": "the autoencoder, for SD1Autoencoder",
        "unet": "the UNet, for SD1UNet (in_channels=9 for an inpainting model)",
    }
    for name, help in helps.items():
        command = commands.add_parser(name, help=help, description=help)
        command.add_argument(
            "--from",
            dest="source",
            required=True,
            metavar="SOURCE",
            help="a diffusers folder, a component's folder, a checkpoint file (.safetensors, .ckpt) or a Hub id",
        )
        command.add_argument(
            "--to",
            dest="dest",
            required=True,
            metavar="FOLDER" if name == "sd1" else "FILE",
            help="the folder to write the files in" if name == "sd1" else "the .safetensors file to write",
        )
        command.add_argument(
            "--dtype", choices=list(_DTYPES), default=None, help="cast the weights (default: keep the source's)"
        )
        if name in ("sd1", "clip-text"):
            command.add_argument(
                "--tokenizer",
                metavar="TOKENIZER",
                default=None,
                help="where to read the CLIP tokenizer when the source has none (single files): a folder with "
                "vocab.json and merges.txt, or a Hub id such as openai/clip-vit-large-patch14",
            )
        command.add_argument(
            "--check",
            action="store_true",
            help="compare the converted model's output with the reference's (diffusers/transformers) on a random "
            "input and print the max abs difference",
        )
    _add_lora_command(commands)
    _add_sdxl_command(commands)
    add_sam_commands(commands)
    add_dinov2_command(commands)
    add_clip_image_command(commands)
    add_controlnet_command(commands)
    add_t2i_adapter_command(commands)
    add_ip_adapter_command(commands)
    add_to_diffusers_command(commands)
    return parser


def _print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _is_cast(result: ConversionResult) -> bool:
    return torch.finfo(result.dtype).eps > torch.finfo(result.source_dtype).eps


def _check(name: str, source: Source, result: ConversionResult) -> bool:
    label, reference, compare = _REFERENCES[name]
    _print_progress(f"{label}: checking against {reference} on a random input...")
    comparison: Comparison = compare(source, result.path)
    return _report(label, comparison, CHECK_TOLERANCE_AFTER_CAST if _is_cast(result) else CHECK_TOLERANCE)


def _report(label: str, comparison: Comparison, tolerance: float) -> bool:
    """Print how far a converted component is from the reference; whether it is within `tolerance`."""
    passed = comparison.relative <= tolerance
    _print_progress(
        f"{label}: max abs difference {comparison.max_abs_difference:.3g} "
        f"({comparison.relative:.3g} of the output's scale {comparison.scale:.3g}; tolerance {tolerance:g}): "
        + ("ok" if passed else "FAILED, the converted model does not compute what the reference computes")
    )
    return passed


def main(argv: Sequence[str] | None = None) -> int:
    """Run `refiners-convert` with `argv` (default: the command line); returns the exit status.

    Args:
        argv: The arguments, without the program name.
    """
    args = build_parser().parse_args(argv)
    if args.command == "sdxl":
        return _convert_sdxl(args)
    if args.command == "lora":
        return _convert_lora(args)
    if args.command in ("sam", "hq-sam"):
        return run_sam_command(args, _print_progress)
    if args.command == "dinov2":
        return run_dinov2_command(args, _print_progress)
    if args.command == "clip-image":
        return run_clip_image_command(args, _print_progress)
    if args.command == "controlnet":
        return run_controlnet_command(args, _print_progress)
    if args.command == "t2i-adapter":
        return run_t2i_adapter_command(args, _print_progress)
    if args.command == "ip-adapter":
        return run_ip_adapter_command(args, _print_progress)
    if args.command == "sd1-to-diffusers":
        return run_to_diffusers_command(args, _print_progress)
    dtype = _DTYPES[args.dtype] if args.dtype is not None else None
    if args.check and (missing := missing_reference_packages()):
        _print_progress(
            f"refiners-convert: error: --check needs {' and '.join(missing)}: install the reference extra "
            '(pip install "refiners-converters[reference]"), or leave --check out.'
        )
        return 1
    try:
        components = _COMPONENTS.get(args.command, ("unet", "vae", "text_encoder", "tokenizer"))
        source = open_source(args.source, components=components)
        results: dict[str, ConversionResult]
        if args.command == "sd1":
            results = convert_stable_diffusion_1(
                source, args.dest, dtype, tokenizer=args.tokenizer, progress=_print_progress
            )
        else:
            convert: dict[str, Callable[[], ConversionResult]] = {
                "clip-text": lambda: convert_clip_text(
                    source, args.dest, dtype, tokenizer=args.tokenizer, progress=_print_progress
                ),
                "autoencoder": lambda: convert_autoencoder(source, args.dest, dtype, progress=_print_progress),
                "unet": lambda: convert_unet(source, args.dest, dtype, progress=_print_progress),
            }
            results = {args.command.replace("-", "_"): convert[args.command]()}
        for result in results.values():
            print(result.path)
        if args.check:
            # Every component is checked, even after a failure, so that the report is complete.
            passed = [_check(name, source, result) for name, result in results.items()]
            if not all(passed):
                return 1
    except (ValueError, OSError) as error:
        _print_progress(f"refiners-convert: error: {error}")
        return 1
    return 0


def _add_lora_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    help = "a Stable Diffusion 1.x LoRA file of any layout, normalised (refiners layout) or rewritten (PEFT, kohya)"
    command = commands.add_parser("lora", help=help, description=help)
    command.add_argument("--from", dest="source", required=True, metavar="FILE", help="the LoRA file to read")
    command.add_argument("--to", dest="dest", required=True, metavar="FILE", help="the .safetensors file to write")
    command.add_argument(
        "--layout",
        choices=["refiners", "peft", "kohya"],
        default="refiners",
        help="refiners (default), peft (what diffusers' load_lora_weights reads) or kohya (A1111, ComfyUI)",
    )
    command.add_argument(
        "--lenient", action="store_true", help="warn about tensors no SD1.5 layer has use for instead of failing"
    )


_LENIENT_HINT = (
    "Check that the file is a LoRA for Stable Diffusion 1.x; pass --lenient to write the rest and only warn."
)
_LENIENT_NOTE = "They are not written (--lenient)."


def _lora_destination(dest: str) -> Path:
    path = Path(dest).expanduser()
    if path.is_dir():
        raise SourceError(f"the destination {dest} is a folder: pass the .safetensors file to write in it")
    if path.suffix != ".safetensors":
        raise SourceError(f"the destination must be a .safetensors file, got {dest}")
    return path


def _convert_lora(args: argparse.Namespace) -> int:
    created: list[Path] = []
    try:
        dest = _lora_destination(args.dest)
        created = [folder for folder in reversed(dest.parents) if not folder.exists()]
        dest.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnmatchedLoraKeysWarning)
            specs = convert_sd1_lora(Path(args.source), dest, layout=args.layout, strict=not args.lenient)
        for warning in caught:
            message = warning.message
            if isinstance(message, UnmatchedLoraKeysWarning):
                _print_progress(f"refiners-convert: warning: {message.report}\n{_LENIENT_NOTE}")
            else:
                _print_progress(f"refiners-convert: warning: {message}")
    except UnmatchedLoraKeysError as error:
        _remove_empty(created)
        _print_progress(f"refiners-convert: error: {error.report}\n{_LENIENT_HINT}")
        return 1
    except (ValueError, OSError) as error:
        _remove_empty(created)
        _print_progress(f"refiners-convert: error: {error}")
        return 1
    _print_progress(f"lora: {len(specs)} layers, {args.layout} layout")
    print(dest)
    return 0


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders created for a destination that was not written, deepest first (if still empty)."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _add_sdxl_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    help = "a whole Stable Diffusion XL model: clip_text, autoencoder and unet .safetensors files in a folder"
    command = commands.add_parser("sdxl", help=help, description=help)
    command.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="SOURCE",
        help="a diffusers SDXL folder, a Hub id, or a single-file checkpoint (SGM layout)",
    )
    command.add_argument("--to", dest="dest", required=True, metavar="FOLDER", help="the folder to write the files in")
    command.add_argument(
        "--dtype", choices=list(_DTYPES), default=None, help="cast the weights (default: keep the source's)"
    )
    command.add_argument(
        "--config",
        metavar="FOLDER",
        default=None,
        help="for a single file: a diffusers folder (or Hub id) whose configs size the model (default: SDXL base's)",
    )
    command.add_argument(
        "--tokenizer",
        metavar="TOKENIZER",
        default=None,
        help="for a single file without --config: where to read the CLIP tokenizer (a folder or a Hub id such as "
        "openai/clip-vit-large-patch14)",
    )
    command.add_argument(
        "--unet",
        metavar="UNET",
        default=None,
        help="the UNet of a distilled model published alone, instead of SOURCE's: a diffusers UNet folder or Hub id "
        "(latent-consistency/lcm-sdxl) or a UNet file (SDXL-Lightning's sdxl_lightning_4step_unet.safetensors)",
    )
    command.add_argument(
        "--vae",
        metavar="VAE",
        default=None,
        help="another autoencoder of SDXL's architecture instead of SOURCE's: a diffusers folder or Hub id "
        "(madebyollin/sdxl-vae-fp16-fix) or a file",
    )
    command.add_argument(
        "--check",
        action="store_true",
        help="compare each converted component with diffusers'/transformers' on random inputs and print the max abs "
        "difference",
    )


def _convert_sdxl(args: argparse.Namespace) -> int:
    from refiners.converters.stable_diffusion_xl import convert_stable_diffusion_xl, is_refiner

    dtype = _DTYPES[args.dtype] if args.dtype is not None else None
    try:
        written = convert_stable_diffusion_xl(
            args.source,
            args.dest,
            dtype,
            config=args.config,
            tokenizer=args.tokenizer,
            unet=args.unet,
            vae=args.vae,
            progress=_print_progress,
        )
    except (ValueError, OSError) as error:
        _print_progress(f"refiners-convert: error: {error}")
        return 1
    for path in written.values():
        print(path)
    if args.check:
        if missing := missing_reference_packages():
            _print_progress(
                f"refiners-convert: error: --check needs {' and '.join(missing)}: install the reference extra"
            )
            return 1
        from refiners.converters.stable_diffusion_xl import compare_stable_diffusion_xl

        comparisons = compare_stable_diffusion_xl(
            args.source, args.dest, config=args.config, unet=args.unet, vae=args.vae
        )
        tolerance = CHECK_TOLERANCE if dtype in (None, torch.float32) else CHECK_TOLERANCE_AFTER_CAST
        # Every component is reported, even after a failure.
        passed = [_report(name.replace("_", "-"), comparison, tolerance) for name, comparison in comparisons.items()]
        if not all(passed):
            return 1
    pipeline = "StableDiffusion_XL_Refiner" if is_refiner(written["clip_text"]) else "StableDiffusion_XL"
    _print_progress(f"load it with {pipeline}.from_folder({str(args.dest)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
