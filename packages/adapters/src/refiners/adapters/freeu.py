"""FreeU (Si et al., 2023, https://arxiv.org/abs/2309.11497): reweigh the UNet's decoder, no training.

In the first up blocks (the lowest resolutions), each residual block's input is the backbone feature map concatenated
with a skip connection. FreeU amplifies the backbone (`b`: the first half of its channels) and damps the skip
connection's lowest frequencies (`s`: a Fourier filter), which sharpens details without new weights. As diffusers'
`enable_freeu(s1, s2, b1, b2)` does, level `i` (from the lowest resolution) uses `backbone_scales[i]` and
`skip_scales[i]`:

    backbone[:, :C/2] *= b_i
    skip = IFFT(FFT(skip) * mask_i)    mask_i = s_i on the centred 2x2 lowest frequencies, 1 elsewhere

The backbone's scaling is the constant one, as diffusers has it (not the FreeU repository's later variant, which
scales by the channel mean's min-max normalisation). Here this is an adapter on each of these blocks'
`ResidualConcatenator`, which reweighs `cat([backbone, skip])`.
"""

from collections.abc import Sequence
from typing import Self

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.foundationals.latent_diffusion.unet import ResidualBlock, ResidualConcatenator, UNet, UpBlocks

__all__ = ["SDFreeUAdapter", "FreeUConcatenation", "FreeUReweighting", "fourier_filter"]


def fourier_filter(x: Tensor, scale: float, threshold: int = 1) -> Tensor:
    """Multiply each channel's lowest spatial frequencies by `scale` (FreeU's skip filter).

    The centred spectrum's `2 * threshold` square around the zero frequency is scaled (as diffusers' `fourier_filter`
    indexes it: a side of 1 keeps its single frequency in the square). Computed in float32, returned in `x`'s dtype.

    Args:
        x: The feature maps, `(batch, channels, height, width)`.
        scale: The factor of the low frequencies.
        threshold: Half the side of the square of low frequencies.
    """
    height, width = x.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    mask = torch.ones(height, width, device=x.device)
    rows, columns = height // 2, width // 2
    mask[rows - threshold : rows + threshold, columns - threshold : columns + threshold] = scale
    filtered = torch.fft.ifftn(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return filtered.to(dtype=x.dtype)


class FreeUReweighting(fl.Module):
    """On `cat([backbone, skip])`: the backbone's first half of channels times `backbone_scale`, the skip connection
    Fourier-filtered with `skip_scale`.

    Args:
        backbone_channels: The number of channels of the backbone (the first ones of the input).
        backbone_scale: FreeU's `b`.
        skip_scale: FreeU's `s`.
    """

    def __init__(self, backbone_channels: int, backbone_scale: float, skip_scale: float) -> None:
        super().__init__()
        self.backbone_channels = backbone_channels
        self.backbone_scale = backbone_scale
        self.skip_scale = skip_scale

    def forward(self, x: Tensor) -> Tensor:
        half = self.backbone_channels // 2
        return torch.cat(
            [
                x[:, :half] * self.backbone_scale,
                x[:, half : self.backbone_channels],
                fourier_filter(x[:, self.backbone_channels :], self.skip_scale),
            ],
            dim=1,
        )


class FreeUConcatenation(fl.Chain, fl.Adapter[ResidualConcatenator]):
    """A skip concatenation followed by FreeU's reweighting (`FreeUReweighting`).

    Args:
        target: The `ResidualConcatenator` of an up block.
        backbone_channels: The number of channels of the backbone (the input of the concatenator).
        backbone_scale: FreeU's `b`.
        skip_scale: FreeU's `s`.
    """

    def __init__(
        self, target: ResidualConcatenator, backbone_channels: int, backbone_scale: float, skip_scale: float
    ) -> None:
        with self.setup_adapter(target):
            super().__init__(target, FreeUReweighting(backbone_channels, backbone_scale, skip_scale))


class SDFreeUAdapter:
    """FreeU on a Stable Diffusion UNet (SD1, SDXL, any `UNet`): `inject` reweighs its first up levels, `eject` undoes it.

    Example:
        ```py
        from refiners.adapters.freeu import SDFreeUAdapter
        from refiners.foundationals.latent_diffusion import SD1UNet
        from refiners.foundationals.latent_diffusion.stable_diffusion_1.presets import TINY

        unet = TINY.unet.build((SD1UNet,))
        freeu = SDFreeUAdapter(target=unet, backbone_scales=[1.5, 1.6], skip_scales=[0.9, 0.2]).inject()
        freeu.eject()
        ```

    Args:
        target: The UNet.
        backbone_scales: `b` for each level from the lowest resolution (diffusers' `b1`, `b2`); the recommended
            values are `[1.5, 1.6]` for SD1.5 and `[1.3, 1.4]` for SDXL.
        skip_scales: `s` for the same levels (`s1`, `s2`): `[0.9, 0.2]` for both.
    """

    def __init__(self, target: UNet, backbone_scales: Sequence[float], skip_scales: Sequence[float]) -> None:
        levels = len(target.topology.channels)
        if len(backbone_scales) != len(skip_scales) or not 0 < len(backbone_scales) <= levels:
            raise ValueError(
                f"give as many backbone_scales as skip_scales, one per up level from the lowest resolution (1 to "
                f"{levels} for this UNet), got {list(backbone_scales)} and {list(skip_scales)}"
            )
        self.target = target
        self.backbone_scales = list(backbone_scales)
        self.skip_scales = list(skip_scales)
        per_level = target.topology.layers_per_block + 1
        skip_channels = target.topology.skip_channels
        self.concatenations: list[FreeUConcatenation] = []
        for index, block in enumerate(target.layer("UpBlocks", UpBlocks).layers(fl.Chain)):
            level = index // per_level
            if level >= len(backbone_scales):
                break
            concatenator = block.ensure_find(ResidualConcatenator)
            backbone = block.ensure_find(ResidualBlock).in_channels - skip_channels[concatenator.n]
            self.concatenations.append(
                FreeUConcatenation(concatenator, backbone, backbone_scales[level], skip_scales[level])
            )
        self._injected = False

    def inject(self) -> Self:
        """Put the reweighting after the skip concatenation of each up block of the chosen levels."""
        if self._injected:
            raise ValueError("this SDFreeUAdapter is already injected; eject it first")
        for concatenation in self.concatenations:
            concatenation.inject()
        self._injected = True
        return self

    def eject(self) -> None:
        """Take the reweighting out: the UNet is as it was before `inject`."""
        if not self._injected:
            raise ValueError("this SDFreeUAdapter is not injected: nothing to eject")
        for concatenation in self.concatenations:
            concatenation.eject()
        self._injected = False
