"""ControlNet: a copy of the UNet's encoder that steers it with a condition image (edges, depth, pose...).

Stability AI's Control-LoRAs (an SDXL ControlNet stored as low-rank differences from the base UNet, `control_lora`)
load with `SDXLControlnetAdapter.from_control_lora`.

Example:
    ```py
    import torch
    from refiners.adapters.controlnet import SD1Controlnet, SD1ControlnetAdapter
    from refiners.foundationals.latent_diffusion import SD1UNet

    sizes = dict(channels=(32, 32, 64, 64), context_embedding_dim=16, num_attention_heads=2)
    unet = SD1UNet(**sizes)
    controlnet = SD1Controlnet(**sizes, condition_encoder_channels=(8, 8, 8, 8))
    adapter = SD1ControlnetAdapter(unet, name="canny", scale=0.8, controlnet=controlnet).inject()
    adapter.set_controlnet_condition(torch.rand(1, 3, 64, 64))
    unet.set_timestep(999)
    unet.set_clip_text_embedding(torch.randn(1, 77, 16))
    with torch.no_grad():
        noise = unet(torch.randn(1, 4, 8, 8))
    adapter.eject()
    assert noise.shape == (1, 4, 8, 8)
    ```
"""

from refiners.adapters.controlnet.adapter import (
    CONTROLNET_RESIDUALS_CONTEXT,
    ControlnetAdapter,
    ControlnetBranch,
    ControlnetResidualsAddition,
    SD1ControlnetAdapter,
    SDXLControlnetAdapter,
)
from refiners.adapters.controlnet.control_lora import (
    CONTROL_LORA_MARKER,
    condition_encoder_sizes,
    control_lora_state_dict,
    original_controlnet_modules,
)
from refiners.adapters.controlnet.model import (
    CONDITION_KEY,
    CONTROLNET_CONTEXT,
    ConditionEncoder,
    Controlnet,
    ResidualProjections,
    SD1Controlnet,
    SDXLControlnet,
)

__all__ = [
    "CONTROL_LORA_MARKER",
    "condition_encoder_sizes",
    "control_lora_state_dict",
    "original_controlnet_modules",
    "CONDITION_KEY",
    "CONTROLNET_CONTEXT",
    "CONTROLNET_RESIDUALS_CONTEXT",
    "ConditionEncoder",
    "Controlnet",
    "ControlnetAdapter",
    "ControlnetBranch",
    "ControlnetResidualsAddition",
    "ResidualProjections",
    "SD1Controlnet",
    "SD1ControlnetAdapter",
    "SDXLControlnet",
    "SDXLControlnetAdapter",
]
