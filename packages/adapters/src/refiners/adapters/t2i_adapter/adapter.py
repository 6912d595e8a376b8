"""`T2IAdapter`: add the features of a condition image, computed once by a `T2IEncoder`, to a UNet's down blocks.

The features go where diffusers' `UNet2DConditionModel` adds its `down_intrablock_additional_residuals`: one per
resolution of the encoder, at the output of its last transformer where the resolution has attention (before the
downsampler), else at the output of the whole level (after the downsampler, if any); a feature left over goes to the
middle block's output. In every case before the map is kept as a skip connection, so that the skip carries it too.
Injected, the adapter wraps the layer that keeps that skip (`ResidualAccumulator`), and the first skip concatenation
of the up blocks (which takes the middle block's output) when the encoder has a feature for it. Several T2I-Adapters
stack, each by name with its own scale (diffusers' `MultiAdapter` sums their weighted features). Ejected, the UNet is
what it was.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Self, TypeVar

from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.adapters.t2i_adapter.model import FullT2IEncoder, FullT2IEncoderXL, LightT2IEncoder, T2IEncoder
from refiners.fluxion.context import Contexts
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_metadata_from_safetensors, load_state_dict_from_safetensors
from refiners.foundationals.latent_diffusion.model import DENOISING_CONTEXT, GUIDED_KEY, NUM_STEPS_KEY, STEP_INDEX_KEY
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.unet import SDXLUNet
from refiners.foundationals.latent_diffusion.unet import (
    DownBlocks,
    ResidualAccumulator,
    ResidualConcatenator,
    UNet,
    UNetTopology,
    UpBlocks,
)

__all__ = [
    "T2I_ADAPTER_CONTEXT",
    "FeaturePoint",
    "feature_points",
    "T2IFeatureAddition",
    "T2IAdapter",
    "SD1T2IAdapter",
    "SDXLT2IAdapter",
]

T2I_ADAPTER_CONTEXT = "t2i_adapter"
"""`T2I_ADAPTER_CONTEXT[name]`: the features of the T2I-Adapter `name` (its `set_condition_features`)."""

UNetT = TypeVar("UNetT", bound=UNet)


@dataclass(frozen=True)
class FeaturePoint:
    """Where a UNet takes a T2I-Adapter feature.

    Attributes:
        down_block: The index of the child Chain of `DownBlocks` whose output takes it, or None for the middle block's
            output.
        channels: The map's channels there.
        stride: The map's downscale there, relative to the latents.
    """

    down_block: int | None
    channels: int
    stride: int


def feature_points(topology: UNetTopology) -> list[FeaturePoint]:
    """Where a UNet of this topology takes T2I-Adapter features, in order: one per resolution, then the middle block
    (as diffusers' `UNet2DConditionModel.forward` consumes `down_intrablock_additional_residuals`).

    Args:
        topology: The UNet's shape.
    """
    points: list[FeaturePoint] = []
    index, levels = 1, len(topology.channels)  # down block 0 is the input convolution
    for level, width in enumerate(topology.channels):
        index += topology.layers_per_block
        downsamples = level < levels - 1
        if topology.attention_levels[level] or not downsamples:
            points.append(FeaturePoint(index - 1, width, 2**level))
        else:  # diffusers' `DownBlock2D` adds it after its downsampler
            points.append(FeaturePoint(index, width, 2 ** (level + 1)))
        index += 1 if downsamples else 0
    points.append(FeaturePoint(None, topology.channels[-1], 2 ** (levels - 1)))
    return points


class T2IFeatureAddition(fl.ContextModule):
    """Add the `index`-th feature of the T2I-Adapter `name`, times its scale, to the input.

    Args:
        name: The T2I-Adapter's name in the UNet.
        index: Which of its features.
        downscale: How many image pixels a cell of that feature spans (for the size check's message).
        scale: The features' scale (diffusers' `adapter_conditioning_scale`).
        conditioning_factor: The fraction of the steps it acts on, from the first (diffusers'
            `adapter_conditioning_factor`).
    """

    def __init__(
        self, name: str, index: int, downscale: int, scale: float = 1.0, conditioning_factor: float = 1.0
    ) -> None:
        super().__init__()
        self.name = name
        self.index = index
        self.downscale = downscale
        self.scale = scale
        self.conditioning_factor = conditioning_factor

    def _active(self) -> bool:
        denoising = self.use_context(DENOISING_CONTEXT)
        step, num_steps = denoising.get(STEP_INDEX_KEY), denoising.get(NUM_STEPS_KEY)
        if step is None or num_steps is None:
            return True  # called outside a denoising loop: every call is a step it acts on
        return step < int(num_steps * self.conditioning_factor)  # StableDiffusionXLAdapterPipeline's rule

    def forward(self, x: Tensor) -> Tensor:
        features: tuple[Tensor, ...] | None = self.use_context(T2I_ADAPTER_CONTEXT).get(self.name)
        if features is None:
            raise ValueError(
                f"the T2I-Adapter {self.name!r} has no condition features: call its adapter's "
                "`set_condition_features(adapter.compute_condition_features(image_tensor))` before the forward"
            )
        feature = features[self.index]
        if feature.shape[-2:] != x.shape[-2:]:
            image = self.downscale * feature.shape[-2], self.downscale * feature.shape[-1]
            wanted = self.downscale * x.shape[-2], self.downscale * x.shape[-1]
            raise ValueError(
                f"the condition image of the T2I-Adapter {self.name!r} is {image[0]}x{image[1]} (height x width) but "
                f"the latents are of a {wanted[0]}x{wanted[1]} image: resize the condition image to "
                f"{wanted[0]}x{wanted[1]}"
            )
        if not self._active():
            return x
        if x.shape[0] != feature.shape[0]:
            if x.shape[0] % feature.shape[0] != 0:
                raise ValueError(
                    f"the T2I-Adapter {self.name!r} has features of {feature.shape[0]} condition images for "
                    f"{x.shape[0]} latents: give one image, or one per latent"
                )
            feature = feature.repeat(x.shape[0] // feature.shape[0], 1, 1, 1)  # diffusers' copies for guidance
        return x + feature.to(device=x.device, dtype=x.dtype) * self.scale


class _PointAdapter(fl.Chain, fl.Adapter[fl.Module]):
    """Add a feature before the target (the layer that keeps a skip, or the one that takes the middle output)."""

    def __init__(self, target: fl.Module, addition: T2IFeatureAddition) -> None:
        with self.setup_adapter(target):
            super().__init__(addition, target)


class T2IAdapter(fl.Chain, fl.Adapter[ResidualAccumulator], Generic[UNetT]):
    """A T2I-Adapter for a UNet: `inject()` it, set its condition features, generate; `eject()` it.

    The adapter wraps the first place a feature goes (the `ResidualAccumulator` that keeps its skip); the
    others are wrapped by adapters it holds and injects with it. The encoder is held beside the UNet, not in it: it
    runs once per condition image (`compute_condition_features`), and moves with `adapter.encoder.to(...)`.

    Args:
        target: The UNet.
        encoder: The T2I-Adapter's encoder, its features of the UNet's widths and resolutions.
        name: Its name (several T2I-Adapters in one UNet have distinct names).
        scale: The features' scale (diffusers' `adapter_conditioning_scale`).
        conditioning_factor: The fraction of the steps it acts on, from the first (diffusers'
            `adapter_conditioning_factor`).
    """

    def __init__(
        self,
        target: UNetT,
        encoder: T2IEncoder,
        name: str = "t2i_adapter",
        scale: float = 1.0,
        conditioning_factor: float = 1.0,
    ) -> None:
        if not 0.0 <= conditioning_factor <= 1.0:
            raise ValueError(f"the conditioning factor must be in [0, 1], got {conditioning_factor}")
        points = feature_points(target.topology)
        count = len(encoder.feature_channels)
        fits = count in (len(points) - 1, len(points)) and all(
            channels == point.channels and downscale * points[0].stride == encoder.feature_downscales[0] * point.stride
            for channels, downscale, point in zip(
                encoder.feature_channels, encoder.feature_downscales, points, strict=False
            )
        )
        if not fits:
            wanted = [(point.channels, point.stride) for point in points]
            given = list(zip(encoder.feature_channels, encoder.feature_downscales, strict=True))
            raise ValueError(
                f"the T2I-Adapter {name!r} ({type(encoder).__name__}, features (channels, downscale) {given}) does not "
                f"fit the {type(target).__name__} (channels {target.topology.channels}, which takes features "
                f"(channels, stride) {wanted}, the last one optional): it was trained for another UNet"
            )
        self.name = name
        self.unet = [target]  # lists: not children
        self._encoder = [encoder]
        down_blocks = list(target.ensure_find(DownBlocks).layers(fl.Chain))
        middle = target.ensure_find(UpBlocks).layer(0, fl.Chain).ensure_find(ResidualConcatenator)
        targets: list[fl.Module] = [
            middle if point.down_block is None else down_blocks[point.down_block].ensure_find(ResidualAccumulator)
            for point in points[:count]
        ]
        additions = [
            T2IFeatureAddition(name, i, downscale, scale, conditioning_factor)
            for i, downscale in enumerate(encoder.feature_downscales)
        ]
        self._points = [_PointAdapter(t, addition) for t, addition in zip(targets[1:], additions[1:], strict=True)]
        first = targets[0]
        assert isinstance(first, ResidualAccumulator)
        with self.setup_adapter(first):
            super().__init__(additions[0], first)

    def init_context(self) -> Contexts:
        return {
            T2I_ADAPTER_CONTEXT: {},
            DENOISING_CONTEXT: {STEP_INDEX_KEY: None, NUM_STEPS_KEY: None, GUIDED_KEY: False},
        }

    @property
    def encoder(self) -> T2IEncoder:
        """The encoder of the condition image (it runs once per image, outside the UNet's forward)."""
        return self._encoder[0]

    @property
    def additions(self) -> list[T2IFeatureAddition]:
        """The layers that add the features, one per feature."""
        return [self.layer("T2IFeatureAddition", T2IFeatureAddition)] + [
            point.layer("T2IFeatureAddition", T2IFeatureAddition) for point in self._points
        ]

    @property
    def scale(self) -> float:
        """The features' scale (diffusers' `adapter_conditioning_scale`)."""
        return self.additions[0].scale

    @scale.setter
    def scale(self, value: float) -> None:
        for addition in self.additions:
            addition.scale = value

    @property
    def conditioning_factor(self) -> float:
        """The fraction of the steps it acts on, from the first."""
        return self.additions[0].conditioning_factor

    @conditioning_factor.setter
    def conditioning_factor(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"the conditioning factor must be in [0, 1], got {value}")
        for addition in self.additions:
            addition.conditioning_factor = value

    def inject(self, parent: fl.Chain | None = None) -> Self:
        unet = self.unet[0]
        if any(addition.name == self.name for addition in unet.layers(T2IFeatureAddition)):
            raise ValueError(
                f"a T2I-Adapter named {self.name!r} is already injected in this {type(unet).__name__}: give each "
                "T2I-Adapter its own name"
            )
        super().inject(parent)
        for point in self._points:
            point.inject()
        return self

    def eject(self) -> None:
        self.set_context(T2I_ADAPTER_CONTEXT, {self.name: None})  # the UNet keeps no tensor of it
        for point in self._points:
            point.eject()
        super().eject()

    def compute_condition_features(self, image: Tensor) -> tuple[Tensor, ...]:
        """The encoder's features of a condition image (once per image: they serve every step).

        Args:
            image: `(batch, in_channels, height, width)` in [0, 1], as big as the image generated (diffusers' adapter
                image), e.g. `image_to_tensor(depth_map)`; one for all latents or one per latent.
        """
        encoder = self.encoder
        factor = max(encoder.feature_downscales)
        if image.dim() != 4 or image.shape[1] != encoder.in_channels:
            raise ValueError(
                f"the condition image must be (batch, {encoder.in_channels}, height, width) in [0, 1], got shape "
                f"{tuple(image.shape)}"
            )
        if image.shape[-2] % encoder.downscale_factor or image.shape[-1] % encoder.downscale_factor:
            raise ValueError(
                f"the condition image is {image.shape[-2]}x{image.shape[-1]} (height x width): the T2I-Adapter "
                f"{self.name!r} needs sides that are multiples of {encoder.downscale_factor} (of {factor} to keep "
                "every feature whole)"
            )
        parameter = next(encoder.parameters())
        return tuple(encoder(image.to(device=parameter.device, dtype=parameter.dtype)))

    def set_condition_features(self, features: tuple[Tensor, ...]) -> None:
        """Set the features the next forwards add (`compute_condition_features`' output).

        Args:
            features: One map per feature of the encoder.
        """
        encoder = self.encoder
        shapes = [tuple(feature.shape[:2]) for feature in features]
        if len(features) != len(encoder.feature_channels) or any(
            shape[1] != channels for shape, channels in zip(shapes, encoder.feature_channels, strict=False)
        ):
            raise ValueError(
                f"the T2I-Adapter {self.name!r} takes {len(encoder.feature_channels)} feature maps of channels "
                f"{encoder.feature_channels} (its `compute_condition_features`), got (batch, channels) {shapes}"
            )
        self.set_context(T2I_ADAPTER_CONTEXT, {self.name: tuple(features)})


def _given(
    weights: Path | str | None,
    encoder: T2IEncoder | None,
    kind: str | None,
    kinds: tuple[type[T2IEncoder], ...],
    adapter: str,
    unet: UNet,
) -> T2IEncoder:
    """The encoder given, or built from the record in its converted file (`refiners-convert t2i-adapter`) and loaded,
    or built new (random weights) of `kind` for the UNet's widths."""
    names = " or ".join(repr(k.kind) for k in kinds)
    if sum(x is not None for x in (weights, encoder)) > 1:
        raise ValueError("give the T2I-Adapter's converted file (weights=...) or its encoder (encoder=...), not both")
    if encoder is not None:
        built: T2IEncoder = encoder
    elif weights is not None:
        config = ModelConfig.from_metadata(load_metadata_from_safetensors(weights))
        if config is None:
            raise ValueError(
                f"{weights} does not record its model: convert the T2I-Adapter with `refiners-convert t2i-adapter "
                "--from SOURCE --to FILE`"
            )
        recorded = {k.__name__: k for k in (FullT2IEncoder, LightT2IEncoder, FullT2IEncoderXL)}.get(config.class_name)
        if recorded is None:
            raise ValueError(f"{weights} holds a {config.class_name}, not a T2I-Adapter")
        if recorded not in kinds:
            channels = config.arguments.get("channels")
            raise ValueError(
                f"{weights} holds a {config.class_name} T2I-Adapter (channels {channels}), for {recorded.adapter}, but "
                f"{adapter} takes {names} for a {type(unet).__name__} (channels {unet.topology.channels})"
            )
        built = config.build(kinds, device="meta")
        load_state_dict_from_safetensors(built, weights)
    elif kind is not None:
        chosen = next((k for k in kinds if k.kind == kind), None)
        if chosen is None:
            raise ValueError(f"{adapter} takes a T2I-Adapter of kind {names}, got kind={kind!r}")
        return chosen.for_unet(unet.topology.channels, device=unet.device, dtype=unet.dtype)
    else:
        raise ValueError(
            "give the T2I-Adapter's converted file (weights=...), its encoder (encoder=...), or a kind to build a new one"
        )
    if kind is not None and built.kind != kind:
        raise ValueError(f"the T2I-Adapter is a {built.kind!r}, not a {kind!r}: leave kind out, or give another file")
    return built.to(device=unet.device, dtype=unet.dtype)


class SD1T2IAdapter(T2IAdapter[SD1UNet]):
    """A T2I-Adapter for `SD1UNet`: diffusers' `full_adapter` or `light_adapter` (TencentARC's SD1.4/1.5 adapters),
    from a file converted by `refiners-convert t2i-adapter`, a built encoder, or new of a kind.

    Args:
        target: The UNet.
        name: The T2I-Adapter's name in the UNet.
        scale: The features' scale (diffusers' `adapter_conditioning_scale`).
        kind: `"full_adapter"` or `"light_adapter"`: a new encoder of the UNet's widths (random weights, e.g. to
            train), or, with `weights`, the kind the file must hold.
        weights: The converted file (the encoder is built from the record it holds).
        encoder: The encoder, in place of `weights`.
    """

    def __init__(
        self,
        target: SD1UNet,
        name: str = "t2i_adapter",
        scale: float = 1.0,
        kind: str | None = None,
        weights: Path | str | None = None,
        *,
        encoder: T2IEncoder | None = None,
    ) -> None:
        encoder = _given(weights, encoder, kind, (FullT2IEncoder, LightT2IEncoder), type(self).__name__, target)
        super().__init__(target, encoder, name, scale)


class SDXLT2IAdapter(T2IAdapter[SDXLUNet]):
    """A T2I-Adapter for `SDXLUNet`: diffusers' `full_adapter_xl` (TencentARC's `t2i-adapter-*-sdxl-1.0`), from a file
    converted by `refiners-convert t2i-adapter`, a built encoder, or new.

    Args:
        target: The UNet.
        name: The T2I-Adapter's name in the UNet.
        scale: The features' scale (diffusers' `adapter_conditioning_scale`).
        kind: `"full_adapter_xl"`: a new encoder of the UNet's widths (random weights), or, with `weights`, the kind
            the file must hold.
        weights: The converted file (the encoder is built from the record it holds).
        encoder: The encoder, in place of `weights`.
        adapter_conditioning_factor: The fraction of the steps it acts on, from the first (diffusers'
            `StableDiffusionXLAdapterPipeline`: the features are added while the step's index is below
            `int(num_steps * adapter_conditioning_factor)`).
    """

    def __init__(
        self,
        target: SDXLUNet,
        name: str = "t2i_adapter",
        scale: float = 1.0,
        kind: str | None = None,
        weights: Path | str | None = None,
        *,
        encoder: T2IEncoder | None = None,
        adapter_conditioning_factor: float = 1.0,
    ) -> None:
        encoder = _given(weights, encoder, kind, (FullT2IEncoderXL,), type(self).__name__, target)
        super().__init__(target, encoder, name, scale, adapter_conditioning_factor)

    @property
    def adapter_conditioning_factor(self) -> float:
        """The fraction of the steps it acts on, from the first (diffusers' `adapter_conditioning_factor`)."""
        return self.conditioning_factor

    @adapter_conditioning_factor.setter
    def adapter_conditioning_factor(self, value: float) -> None:
        self.conditioning_factor = value
