"""The original Stable Diffusion layout ("ldm", single-file checkpoints) in terms of diffusers' and transformers'.

A single-file checkpoint (`v1-5-pruned-emaonly.safetensors`, `.ckpt`) holds the three models of the original
latent-diffusion code under `model.diffusion_model.` (UNet), `first_stage_model.` (autoencoder) and
`cond_stage_model.transformer.` (a transformers `CLIPTextModel`). Their module paths differ from diffusers':
`ModuleRenaming` pairs them, module by module, and the pairs are derived by walking the block structure as
diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` / `convert_ldm_clip_checkpoint` do, so a
diffusers key map (diffusers key -> refiners key) becomes a map from the original keys with `original_key_map`.

The autoencoder's mid-block attention projections are 1x1 convolutions in the original layout (`q`, `k`, `v`,
`proj_out`, 4-D weights): they are flattened into the Linear weights diffusers uses (`to_q`, ..., `to_out.0`).
"""

from collections.abc import Iterable, Mapping

from torch import Tensor

from refiners.converters.engine import KeyMap

# The UNet's module names live with the model (the LoRA loaders read them too); the renaming is re-exported here.
from refiners.foundationals.latent_diffusion.unet_names import ModuleRenaming, ldm_unet_renaming

__all__ = [
    "LDM_PREFIXES",
    "LDM_TRAINING_BUFFERS",
    "ModuleRenaming",
    "ldm_unet_renaming",
    "ldm_autoencoder_renaming",
    "ldm_clip_text_renaming",
    "ldm_component_prefix",
    "is_ldm_checkpoint",
    "ldm_unknown_keys",
    "ldm_ema_keys",
    "original_key_map",
    "ldm_to_diffusers",
    "SGM_PREFIXES",
    "SGM_REFINER_TEXT_ENCODER_2_PREFIX",
    "openclip_to_transformers",
]

LDM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
"""Where each component's keys live in an original single-file checkpoint."""

LDM_TRAINING_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
    }
)
"""Top-level buffers of the original training code: the noise schedule, which refiners' solvers compute themselves."""

_EMA_PREFIX = "model_ema."
# A standalone original-layout autoencoder file (e.g. `vae-ft-mse-840000-ema-pruned`) has no `first_stage_model.`.
_BARE_LDM_VAE_KEY = "encoder.down.0.block.0.conv1.weight"

_VAE_ATTENTION = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))


def _vae_resnet(original: str, diffusers: str) -> list[tuple[str, str]]:
    # Same names inside (norm1, conv1, norm2, conv2) but the 1x1 shortcut.
    return [(original, diffusers), (f"{original}.nin_shortcut", f"{diffusers}.conv_shortcut")]


def _vae_mid_block(part: str) -> list[tuple[str, str]]:
    original, diffusers = f"{part}.mid", f"{part}.mid_block"
    return [
        *_vae_resnet(f"{original}.block_1", f"{diffusers}.resnets.0"),
        *((f"{original}.attn_1.{o}", f"{diffusers}.attentions.0.{d}") for o, d in _VAE_ATTENTION),
        *_vae_resnet(f"{original}.block_2", f"{diffusers}.resnets.1"),
    ]


def ldm_autoencoder_renaming(levels: int = 4, layers_per_block: int = 2) -> ModuleRenaming:
    """The original autoencoder's (`AutoencoderKL` of latent-diffusion) module paths and diffusers' `AutoencoderKL`'s.

    The decoder's resolutions are numbered from the lowest in the original (`decoder.up.3` runs first) and from the
    first to run in diffusers (`decoder.up_blocks.0`).

    Args:
        levels: Resolutions (diffusers' `len(block_out_channels)`; SD1: 4).
        layers_per_block: Resnets per encoder block (the decoder's have one more; SD1: 2).
    """
    pairs: list[tuple[str, str]] = [
        (name, name) for name in ("encoder.conv_in", "encoder.conv_out", "quant_conv", "post_quant_conv")
    ]
    pairs += [(name, name) for name in ("decoder.conv_in", "decoder.conv_out")]
    pairs += [("encoder.norm_out", "encoder.conv_norm_out"), ("decoder.norm_out", "decoder.conv_norm_out")]
    for level in range(levels):
        for index in range(layers_per_block):
            pairs += _vae_resnet(f"encoder.down.{level}.block.{index}", f"encoder.down_blocks.{level}.resnets.{index}")
        if level < levels - 1:
            pairs.append((f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv"))
    pairs += _vae_mid_block("encoder") + _vae_mid_block("decoder")
    linears = ("to_q", "to_k", "to_v", "to_out.0")
    attention = [f"{part}.mid_block.attentions.0.{name}" for part in ("encoder", "decoder") for name in linears]
    for level in range(levels):
        original = f"decoder.up.{levels - 1 - level}"
        for index in range(layers_per_block + 1):
            pairs += _vae_resnet(f"{original}.block.{index}", f"decoder.up_blocks.{level}.resnets.{index}")
        if level < levels - 1:
            pairs.append((f"{original}.upsample.conv", f"decoder.up_blocks.{level}.upsamplers.0.conv"))
    return ModuleRenaming(pairs, conv_as_linear=attention)


def ldm_clip_text_renaming(with_text_model: bool = True) -> ModuleRenaming:
    """The original text encoder's paths (a transformers `CLIPTextModel` itself) and transformers' `text_model.*`.

    Args:
        with_text_model: Whether the checkpoint names the keys `text_model.*` (most do) or, as checkpoints saved
            with older transformers versions, directly `embeddings.*`, `encoder.*`, `final_layer_norm.*`.
    """
    if with_text_model:
        return ModuleRenaming([("text_model", "text_model")])
    return ModuleRenaming((name, f"text_model.{name}") for name in ("embeddings", "encoder", "final_layer_norm"))


def is_ldm_checkpoint(keys: Iterable[str]) -> bool:
    """Whether a single file's keys are in the original layout (rather than one diffusers component's)."""
    prefixes = (*LDM_PREFIXES.values(), "cond_stage_model.", "conditioner.")
    return any(key.startswith(prefixes) for key in keys)


def ldm_component_prefix(keys: Iterable[str], component: str) -> str | None:
    """The prefix of `component`'s keys in an original-layout file, or None if the file lacks the component.

    A standalone original autoencoder file has its keys unprefixed (`encoder.down.0...`): its prefix is "".
    """
    keys = list(keys)
    prefix = LDM_PREFIXES[component]
    if any(key.startswith(prefix) for key in keys):
        return prefix
    if component == "vae" and _BARE_LDM_VAE_KEY in keys:
        return ""
    return None


def ldm_unknown_keys(keys: Iterable[str]) -> list[str]:
    """The keys of an original-layout checkpoint that belong to no Stable Diffusion 1.x component.

    The noise schedule buffers (`LDM_TRAINING_BUFFERS`) and the EMA copy of the UNet that full training checkpoints
    carry (`model_ema.*`; the main weights are converted, as diffusers does by default) are known, not unknown.
    """
    return [
        key
        for key in keys
        if not key.startswith((*LDM_PREFIXES.values(), _EMA_PREFIX)) and key not in LDM_TRAINING_BUFFERS
    ]


def ldm_ema_keys(keys: Iterable[str]) -> list[str]:
    """The tensors of the UNet's EMA copy in a full training checkpoint (`model_ema.*`, less its bookkeeping)."""
    bookkeeping = (f"{_EMA_PREFIX}decay", f"{_EMA_PREFIX}num_updates")
    return [key for key in keys if key.startswith(_EMA_PREFIX) and key not in bookkeeping]


def original_key_map(key_map: KeyMap, renaming: ModuleRenaming, prefix: str) -> KeyMap:
    """`key_map`, from diffusers/transformers keys, rewritten to read the original layout's keys.

    Errors of the conversion then name the keys as the checkpoint has them. The transforms (keyed by target) are
    kept; a source key is ignored when its diffusers name is.

    Args:
        key_map: A map from diffusers/transformers keys (e.g. `diffusers_unet_key_map(unet)`).
        renaming: The component's module pairs (e.g. `ldm_unet_renaming()`).
        prefix: The component's prefix in the checkpoint (e.g. `model.diffusion_model.`).

    Raises:
        ValueError: A key of `key_map` lies outside every paired module (the renaming does not fit the model).
    """
    composed = KeyMap(transforms=dict(key_map.transforms))
    for source, target in key_map.mapping.items():
        if (original := renaming.to_original(source)) is None:
            raise ValueError(f"the original layout has no module for {source!r}: the renaming does not fit the model")
        composed.add(prefix + original, target)

    def ignored(key: str) -> bool:
        if not key.startswith(prefix):
            return False
        diffusers = renaming.to_diffusers(key.removeprefix(prefix))
        return diffusers is not None and key_map.is_ignored(diffusers)

    composed.ignored.append(ignored)
    return composed


def ldm_to_diffusers(checkpoint: Mapping[str, Tensor], renaming: ModuleRenaming, prefix: str) -> dict[str, Tensor]:
    """One component of an original-layout checkpoint, with diffusers/transformers keys and shapes.

    The 1x1 convolution weights of Linear layers (`renaming.conv_as_linear`, the autoencoder's attention) are
    flattened.

    Args:
        checkpoint: The original checkpoint's tensors.
        renaming: The component's module pairs.
        prefix: The component's prefix in the checkpoint.

    Raises:
        ValueError: Keys under `prefix` that no paired module holds; the message lists them.
    """
    converted: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key in checkpoint:
        if not key.startswith(prefix):
            continue
        if (diffusers := renaming.to_diffusers(key.removeprefix(prefix))) is None:
            unknown.append(key)
            continue
        tensor = checkpoint[key]
        module, _, name = diffusers.rpartition(".")
        if module in renaming.conv_as_linear and name == "weight" and tensor.dim() == 4:
            tensor = tensor.flatten(1)
        converted[diffusers] = tensor
    if unknown:
        raise ValueError(f"{len(unknown)} keys under {prefix!r} belong to no known module: {', '.join(unknown[:20])}")
    return converted


SGM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}
"""Where each component's keys live in an SDXL single-file checkpoint (Stability's generative-models, "SGM")."""

SGM_REFINER_TEXT_ENCODER_2_PREFIX = "conditioner.embedders.0.model."
"""OpenCLIP-G's keys in the SDXL refiner's single file: its only text embedder (the base's has CLIP-L first)."""

_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPENCLIP_IGNORED = ("logit_scale",)  # the contrastive loss's temperature: nothing a text encoder computes with


def openclip_to_transformers(checkpoint: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """OpenCLIP's text transformer (SGM's `conditioner.embedders.1.model.*`) with transformers' keys and shapes.

    The fused attention input projection (`attn.in_proj_weight`, `(3 d, d)`) is split into `q_proj`, `k_proj` and
    `v_proj`; `text_projection` (applied as `x @ P`) becomes the weight of transformers' Linear, `P.T`.

    Args:
        checkpoint: The checkpoint's tensors.
        prefix: OpenCLIP's prefix in it (`conditioner.embedders.1.model.`).

    Raises:
        ValueError: Keys under `prefix` that OpenCLIP's text transformer does not have; the message lists them.
    """
    converted: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key in checkpoint:
        if not key.startswith(prefix):
            continue
        name, tensor = key.removeprefix(prefix), checkpoint[key]
        if name in _OPENCLIP_IGNORED:
            continue
        if name == "token_embedding.weight":
            converted["text_model.embeddings.token_embedding.weight"] = tensor
        elif name == "positional_embedding":
            converted["text_model.embeddings.position_embedding.weight"] = tensor
        elif name.startswith("ln_final."):
            converted[f"text_model.final_layer_norm.{name.removeprefix('ln_final.')}"] = tensor
        elif name == "text_projection":
            converted["text_projection.weight"] = tensor.t().contiguous()
        elif name.startswith("transformer.resblocks."):
            index, _, rest = name.removeprefix("transformer.resblocks.").partition(".")
            layer = f"text_model.encoder.layers.{index}"
            if rest.startswith("attn.in_proj_"):
                for projection, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3), strict=True):
                    converted[f"{layer}.self_attn.{projection}.{rest.removeprefix('attn.in_proj_')}"] = part
            elif rest.startswith("attn.out_proj."):
                converted[f"{layer}.self_attn.out_proj.{rest.removeprefix('attn.out_proj.')}"] = tensor
            elif (module := rest.rpartition(".")[0]) in _OPENCLIP_LAYER:
                converted[f"{layer}.{_OPENCLIP_LAYER[module]}.{rest.rpartition('.')[2]}"] = tensor
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} keys under {prefix!r} are not OpenCLIP's text transformer: {', '.join(unknown[:20])}"
        )
    return converted
