"""The ViT of the original README, as written there, built small, and checked against a plain torch forward."""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.testing import assert_close

import refiners.fluxion.layers as fl


# From the README, unchanged.
class ViT(fl.Chain):
    # The Vision Transformer model structure is entirely defined in the constructor. It is
    # ready-to-use right after i.e. no need to implement any forward function or add extra logic
    def __init__(
        self,
        embedding_dim: int = 512,
        patch_size: int = 16,
        image_size: int = 384,
        num_layers: int = 12,
        num_heads: int = 8,
    ):
        num_patches = image_size // patch_size
        super().__init__(
            fl.Conv2d(in_channels=3, out_channels=embedding_dim, kernel_size=patch_size, stride=patch_size),
            fl.Reshape(num_patches**2, embedding_dim),
            # The Residual layer implements the so-called skip-connection, i.e. x + F(x).
            # Here the patch embeddings (x) are summed with the position embeddings (F(x)) whose
            # weights are stored in the Parameter layer (note: there is no extra classification
            # token in this toy example)
            fl.Residual(fl.Parameter(num_patches**2, embedding_dim)),
            # These are the transformer encoders:
            *(
                fl.Chain(
                    fl.LayerNorm(embedding_dim),
                    fl.Residual(
                        # The Parallel layer is used to pass multiple inputs to a downstream
                        # layer, here multiheaded self-attention
                        fl.Parallel(fl.Identity(), fl.Identity(), fl.Identity()),
                        fl.Attention(
                            embedding_dim=embedding_dim,
                            num_heads=num_heads,
                            key_embedding_dim=embedding_dim,
                            value_embedding_dim=embedding_dim,
                        ),
                    ),
                    fl.LayerNorm(embedding_dim),
                    fl.Residual(
                        fl.Linear(embedding_dim, embedding_dim * 4),
                        fl.GeLU(),
                        fl.Linear(embedding_dim * 4, embedding_dim),
                    ),
                    fl.Chain(
                        fl.Linear(embedding_dim, embedding_dim * 4),
                        fl.GeLU(),
                        fl.Linear(embedding_dim * 4, embedding_dim),
                    ),
                )
                for _ in range(num_layers)
            ),
            fl.Reshape(embedding_dim, num_patches, num_patches),
        )


# The README's Context API diff applied: key and value come from the context "cross_attention".
class CrossAttentionViT(fl.Chain):
    def __init__(
        self,
        embedding_dim: int = 512,
        patch_size: int = 16,
        image_size: int = 384,
        num_layers: int = 12,
        num_heads: int = 8,
    ):
        num_patches = image_size // patch_size
        super().__init__(
            fl.Conv2d(in_channels=3, out_channels=embedding_dim, kernel_size=patch_size, stride=patch_size),
            fl.Reshape(num_patches**2, embedding_dim),
            fl.Residual(fl.Parameter(num_patches**2, embedding_dim)),
            *(
                fl.Chain(
                    fl.LayerNorm(embedding_dim),
                    fl.Residual(
                        fl.Parallel(
                            fl.Identity(),
                            fl.UseContext(context="cross_attention", key="my_embed"),
                            fl.UseContext(context="cross_attention", key="my_embed"),
                        ),  # used to pass multiple inputs to a layer
                        fl.Attention(
                            embedding_dim=embedding_dim,
                            num_heads=num_heads,
                            key_embedding_dim=embedding_dim,
                            value_embedding_dim=embedding_dim,
                        ),
                    ),
                    fl.LayerNorm(embedding_dim),
                    fl.Residual(
                        fl.Linear(embedding_dim, embedding_dim * 4),
                        fl.GeLU(),
                        fl.Linear(embedding_dim * 4, embedding_dim),
                    ),
                    fl.Chain(
                        fl.Linear(embedding_dim, embedding_dim * 4),
                        fl.GeLU(),
                        fl.Linear(embedding_dim * 4, embedding_dim),
                    ),
                )
                for _ in range(num_layers)
            ),
            fl.Reshape(embedding_dim, num_patches, num_patches),
        )


SMALL = {"embedding_dim": 64, "patch_size": 16, "image_size": 64, "num_layers": 2, "num_heads": 4}


def reference_forward(vit: fl.Chain, x: Tensor, context: Tensor | None = None) -> Tensor:
    """The README's ViT written with torch ops, reading its weights from the state dict."""
    weights = vit.state_dict()
    dim, heads, patches = SMALL["embedding_dim"], SMALL["num_heads"], SMALL["image_size"] // SMALL["patch_size"]
    x = F.conv2d(x, weights["Conv2d.weight"], weights["Conv2d.bias"], stride=SMALL["patch_size"])
    x = x.reshape(x.shape[0], patches**2, dim)  # the README reshapes (batch, dim, p, p) as is
    x = x + weights["Residual.Parameter.weight"]
    for index in range(1, SMALL["num_layers"] + 1):
        layer = {key.removeprefix(f"Chain_{index}."): value for key, value in weights.items()}
        attention = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        prefix = "Residual_1.Attention."
        attention.load_state_dict(
            {
                "in_proj_weight": torch.cat([layer[f"{prefix}Distribute.Linear_{i}.weight"] for i in (1, 2, 3)]),
                "in_proj_bias": torch.cat([layer[f"{prefix}Distribute.Linear_{i}.bias"] for i in (1, 2, 3)]),
                "out_proj.weight": layer[f"{prefix}Linear.weight"],
                "out_proj.bias": layer[f"{prefix}Linear.bias"],
            }
        )
        x = F.layer_norm(x, (dim,), layer["LayerNorm_1.weight"], layer["LayerNorm_1.bias"])
        key_value = x if context is None else context
        x = x + attention(x, key_value, key_value, need_weights=False)[0]
        x = F.layer_norm(x, (dim,), layer["LayerNorm_2.weight"], layer["LayerNorm_2.bias"])
        hidden = F.gelu(F.linear(x, layer["Residual_2.Linear_1.weight"], layer["Residual_2.Linear_1.bias"]))
        x = x + F.linear(hidden, layer["Residual_2.Linear_2.weight"], layer["Residual_2.Linear_2.bias"])
        hidden = F.gelu(F.linear(x, layer["Chain.Linear_1.weight"], layer["Chain.Linear_1.bias"]))
        x = F.linear(hidden, layer["Chain.Linear_2.weight"], layer["Chain.Linear_2.bias"])
    return x.reshape(x.shape[0], dim, patches, patches)


def test_seed_vit() -> None:
    torch.manual_seed(0)
    vit = ViT(**SMALL)
    x = torch.randn(2, 3, 64, 64)
    y = vit(x)
    assert y.shape == (2, 64, 4, 4)
    # The reference runs through torch.nn.MultiheadAttention (packed projections): allow float32 rounding of another
    # order of operations, no more.
    assert_close(y, reference_forward(vit, x), atol=1e-6, rtol=1e-6)
    # The README's LoRA example walks the attentions and their linears: 2 layers, 4 linears each.
    assert len(list(vit.layers(fl.Attention))) == 2
    assert all(len(list(attention.walk(fl.Linear))) == 4 for attention in vit.layers(fl.Attention))


def test_seed_vit_with_cross_attention_context() -> None:
    torch.manual_seed(0)
    vit = CrossAttentionViT(**SMALL)
    my_embed = torch.randn(2, 16, 64)
    vit.set_context("cross_attention", {"my_embed": my_embed})
    x = torch.randn(2, 3, 64, 64)
    y = vit(x)
    assert y.shape == (2, 64, 4, 4)
    assert_close(y, reference_forward(vit, x, context=my_embed), atol=1e-6, rtol=1e-6)
    # The context is what the attention reads: another embedding gives another output.
    vit.set_context("cross_attention", {"my_embed": torch.randn(2, 16, 64)})
    assert not torch.allclose(vit(x), y)
