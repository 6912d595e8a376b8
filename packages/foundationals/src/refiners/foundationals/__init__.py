"""refiners.foundationals: see the workspace README."""

__all__: list[str] = []
