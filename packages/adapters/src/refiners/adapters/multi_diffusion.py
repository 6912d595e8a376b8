"""MultiDiffusion (Bar-Tal et al., 2023, https://arxiv.org/abs/2302.08113): one image from several denoisings.

Each step, every target denoises its window of the latents with its own conditioning (a prompt, a guidance scale),
and each latent pixel becomes the weighted mean of what the targets that cover it made of it (the paper's Eq. 5):

    x_{t-1} = sum_i(w_i * m_i * step_i(crop_i(x_t))) / sum_i(w_i * m_i)

Panoramas are windows sliding over a wide latent (`panorama_windows`, as diffusers' `StableDiffusionPanoramaPipeline`
lays them out, columns wrapping around with circular padding); region prompts are targets over the whole latent with
a mask each (or over a box: a window). Nothing is injected: `MultiDiffusion` calls the model's step on each window,
so any family, adapter or guidance term of the model takes part. The solver must step each pixel on its own, from
the current latents only (DDIM, DDPM, Euler: not the multistep DPM-Solver, whose memory of earlier steps is the
whole latent's).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from refiners.foundationals.latent_diffusion.model import LatentDiffusionModel

__all__ = ["Window", "DiffusionTarget", "MultiDiffusion", "panorama_windows"]


@dataclass(frozen=True)
class Window:
    """A rectangle of the latents, in latent pixels; columns past the right edge wrap around to the left one.

    Args:
        top: The first row.
        left: The first column.
        height: The number of rows.
        width: The number of columns.
    """

    top: int
    left: int
    height: int
    width: int

    def _columns(self, x: Tensor) -> Tensor:
        if self.top < 0 or self.left < 0 or self.top + self.height > x.shape[-2] or self.width > x.shape[-1]:
            raise ValueError(f"{self} does not fit in latents of height {x.shape[-2]} and width {x.shape[-1]}")
        return torch.arange(self.left, self.left + self.width, device=x.device) % x.shape[-1]

    def crop(self, x: Tensor) -> Tensor:
        """The window's part of `(batch, channels, height, width)` latents."""
        return x[:, :, self.top : self.top + self.height].index_select(-1, self._columns(x))

    def add_to(self, total: Tensor, crop: Tensor) -> None:
        """Add `crop` (the window's shape) to the window's part of `total`, in place."""
        total[:, :, self.top : self.top + self.height].index_add_(-1, self._columns(total), crop)


@dataclass
class DiffusionTarget:
    """What one window of the latents is denoised with, and how much it counts.

    Args:
        window: Where it applies.
        conditioning: The model's conditioning for a step: `clip_text_embedding` (negative rows first when guided)
            and the family's others (SDXL: `pooled_text_embedding`, `time_ids`).
        condition_scale: The classifier-free guidance scale.
        weight: The target's weight in the mean.
        mask: Weights within the window, `(height, width)` (a region of any shape); None weighs it all by `weight`.
    """

    window: Window
    conditioning: Mapping[str, Tensor]
    condition_scale: float = 7.5
    weight: float = 1.0
    mask: Tensor | None = field(default=None)

    def weights(self, like: Tensor) -> Tensor:
        """The target's weight at each pixel of its window, shaped as `like` (the window's crop)."""
        weights = torch.full_like(like, self.weight)
        if self.mask is not None:
            if tuple(self.mask.shape) != tuple(like.shape[-2:]):
                raise ValueError(
                    f"a target's mask must be its window's size {tuple(like.shape[-2:])}, got {tuple(self.mask.shape)}"
                )
            weights = weights * self.mask.to(device=like.device, dtype=like.dtype)
        return weights


class MultiDiffusion:
    """Denoise latents by several targets at once: each step is the weighted mean of the targets' steps.

    Example:
        ```py
        import torch

        from refiners.adapters.multi_diffusion import DiffusionTarget, MultiDiffusion, panorama_windows
        from refiners.foundationals.latent_diffusion import StableDiffusion_1

        sd = StableDiffusion_1(device="meta")  # SD1.5's sizes; load the weights with from_folder
        multi_diffusion = MultiDiffusion(sd)
        embedding = torch.zeros(2, 77, 768, device="meta")  # sd.compute_clip_text_embedding("a mountain range")
        windows = panorama_windows(64, 256, circular=True)  # a 512x2048 panorama, in latent pixels
        assert [(window.left, window.width) for window in windows[-2:]] == [(240, 64), (248, 64)]  # they wrap
        targets = [DiffusionTarget(window, {"clip_text_embedding": embedding}) for window in windows]
        # for step in sd.steps: x = multi_diffusion(x, step, targets)
        ```

    Args:
        model: The model whose steps are combined.
    """

    def __init__(self, model: LatentDiffusionModel[Any, Any]) -> None:
        self.model = model

    def __call__(
        self, x: Tensor, step: int, targets: Sequence[DiffusionTarget], generator: torch.Generator | None = None
    ) -> Tensor:
        """One step of the whole latents: each target's step on its window, then the weighted mean.

        Args:
            x: The latents, `(batch, latent_channels, height, width)`.
            step: The index of the step in the model's solver's schedule.
            targets: The targets, in the order they are denoised (the order of the sums).
            generator: The random generator of stochastic solvers.
        """
        if not targets:
            raise ValueError("MultiDiffusion needs at least one target")
        total, weights = torch.zeros_like(x), torch.zeros_like(x)
        for target in targets:
            denoised = self.model(
                target.window.crop(x),
                step,
                condition_scale=target.condition_scale,
                generator=generator,
                **target.conditioning,
            )
            target_weights = target.weights(denoised)
            target.window.add_to(total, target_weights * denoised)
            target.window.add_to(weights, target_weights)
        # Pixels no target covers stay zero, as in diffusers.
        return torch.where(weights > 0, total / weights, total)


def panorama_windows(
    height: int, width: int, window_size: int = 64, stride: int = 8, circular: bool = False
) -> list[Window]:
    """Square windows sliding over latents of `height` x `width`, rows first, as diffusers' panorama pipeline has them.

    Windows start every `stride` pixels while they fit (one window along a side no longer than `window_size`); with
    `circular`, along the width they start every `stride` pixels up to the right edge, and wrap around.

    Args:
        height: The latents' height (the image's over 8).
        width: The latents' width.
        window_size: The side of the windows (64: SD1.5's native 512 pixels).
        stride: The offset between two windows.
        circular: Wrap the windows around horizontally (for 360-degree panoramas).
    """
    rows = (height - window_size) // stride + 1 if height > window_size else 1
    if circular:
        columns = width // stride if width > window_size else 1
    else:
        columns = (width - window_size) // stride + 1 if width > window_size else 1
    return [
        Window(row * stride, column * stride, min(window_size, height), min(window_size, width))
        for row in range(rows)
        for column in range(columns)
    ]
