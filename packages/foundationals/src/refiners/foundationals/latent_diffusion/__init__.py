"""Latent diffusion: the models and solvers of Stable Diffusion."""
