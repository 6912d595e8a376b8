"""DoubleTextEncoder computes what diffusers' `StableDiffusionXLPipeline.encode_prompt` computes."""

import pytest
import torch
from toy_sdxl import WIDTH_G, WIDTH_L, Twins, build_twins

from refiners.foundationals.latent_diffusion.stable_diffusion_xl import DoubleTextEncoder

PROMPTS = ["a cute cat, high quality", "an astronaut riding a horse on the moon"]


@pytest.fixture(scope="module")
def twins() -> Twins:
    return build_twins()


def test_embeddings_match_encode_prompt(twins: Twins) -> None:
    with torch.no_grad():
        embeds, negative_embeds, pooled, negative_pooled = twins.pipeline.encode_prompt(
            PROMPTS,  # pyright: ignore[reportArgumentType] (diffusers takes lists, its annotation says str)
            device=torch.device("cpu"),
            do_classifier_free_guidance=True,
            negative_prompt=["blurry", ""],  # pyright: ignore[reportArgumentType]
        )
        ours, ours_pooled = twins.text_encoder(PROMPTS)
        ours_negative, ours_negative_pooled = twins.text_encoder(["blurry", ""])
    assert ours.shape == (2, 77, WIDTH_L + WIDTH_G) and ours_pooled.shape == (2, WIDTH_G)
    for actual, expected in [
        (ours, embeds),
        (ours_pooled, pooled),
        (ours_negative, negative_embeds),
        (ours_negative_pooled, negative_pooled),
    ]:
        assert expected is not None
        torch.testing.assert_close(actual, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


def test_second_tokenizer_pads_with_exclamation_mark(twins: Twins) -> None:
    tokenizer_l = twins.text_encoder.text_encoder_l.tokenizer
    tokenizer_g = twins.text_encoder.text_encoder_g.tokenizer
    assert tokenizer_l is not None and tokenizer_g is not None
    expected = twins.pipeline.tokenizer_2("a cat", padding="max_length", max_length=77).input_ids
    assert tokenizer_g("a cat")[0].tolist() == expected
    assert tokenizer_l("a cat")[0, -1] == tokenizer_l.end_of_text_token_id
    assert tokenizer_g("a cat")[0, -1] == tokenizer_g.pad_token_id != tokenizer_l.pad_token_id


def test_default_sizes_are_sdxl() -> None:
    encoder = DoubleTextEncoder(device="meta")
    assert encoder.embedding_dim == 2048
    assert encoder.projection.weight.shape == (1280, 1280)
    assert encoder.text_encoder_l.num_layers == 11  # CLIP-L without its last layer: SDXL reads the penultimate one
