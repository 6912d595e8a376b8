"""Fluxion: a declarative layer on PyTorch."""
