"""refiners.adapters: see the workspace README."""

__all__: list[str] = []
