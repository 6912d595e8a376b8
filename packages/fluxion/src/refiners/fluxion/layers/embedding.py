"""`Embedding`: a lookup table of learned vectors."""

import torch
from torch import Tensor

from refiners.fluxion.layers.module import WeightedModule

__all__ = ["Embedding"]


class Embedding(torch.nn.Embedding, WeightedModule):
    """`torch.nn.Embedding`: map integer ids of shape `(*)` to vectors of shape `(*, embedding_dim)`.

    Args:
        num_embeddings: Number of ids (size of the table).
        embedding_dim: Size of each vector.
        device: Where the table lives.
        dtype: The table's dtype.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input)
