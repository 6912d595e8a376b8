"""T2I-Adapter: a small encoder of a condition image (depth, sketch, pose, color...) whose features are added to the
UNet's down blocks, computed once for the whole generation.

Example:
    ```py
    import torch
    from refiners.adapters.t2i_adapter import SD1T2IAdapter
    from refiners.foundationals.latent_diffusion import SD1UNet

    unet = SD1UNet(channels=(32, 32, 64, 64), context_embedding_dim=16, num_attention_heads=2)
    adapter = SD1T2IAdapter(unet, name="depth", scale=0.8, kind="full_adapter").inject()
    adapter.set_condition_features(adapter.compute_condition_features(torch.rand(1, 3, 64, 64)))
    unet.set_timestep(999)
    unet.set_clip_text_embedding(torch.randn(1, 77, 16))
    with torch.no_grad():
        noise = unet(torch.randn(1, 4, 8, 8))
    adapter.eject()
    assert noise.shape == (1, 4, 8, 8)
    ```
"""

from refiners.adapters.t2i_adapter.adapter import (
    T2I_ADAPTER_CONTEXT,
    FeaturePoint,
    SD1T2IAdapter,
    SDXLT2IAdapter,
    T2IAdapter,
    T2IFeatureAddition,
    feature_points,
)
from refiners.adapters.t2i_adapter.model import (
    FeatureStages,
    FullT2IEncoder,
    FullT2IEncoderXL,
    LightT2IEncoder,
    T2IEncoder,
    T2IResidualBlock,
)

__all__ = [
    "T2I_ADAPTER_CONTEXT",
    "FeaturePoint",
    "FeatureStages",
    "FullT2IEncoder",
    "FullT2IEncoderXL",
    "LightT2IEncoder",
    "SD1T2IAdapter",
    "SDXLT2IAdapter",
    "T2IAdapter",
    "T2IEncoder",
    "T2IFeatureAddition",
    "T2IResidualBlock",
    "feature_points",
]
