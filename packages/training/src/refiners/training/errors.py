"""The errors a user fixes by changing the data, the weights or a setting, with messages for their audience.

A message that tells the user to change a setting names it as the user wrote it: `skip_unreadable=True` for who
calls `CaptionedImageDataModule(...)`, `--data.skip_unreadable true` for who runs `refiners-train`. So the error
holds the setting as a `Setting`, not as text, and each front end renders it (`TrainingSetupError.render`).
"""

import shlex
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Setting", "TrainingSetupError"]


@dataclass(frozen=True)
class Setting:
    """A setting (an argument of a module, data module or callback) that an error message names.

    Attributes:
        name: The argument's name, e.g. `skip_unreadable`.
        value: The value to suggest (`True`, `"tiny"`), a placeholder in angle brackets (`"<folder>"`), or None to
            name the setting alone.

    Example:
        ```py
        from refiners.training.errors import Setting

        assert str(Setting("skip_unreadable", True)) == "skip_unreadable=True"
        assert str(Setting("weights", "<folder>")) == "weights=<folder>"
        assert Setting("base", "tiny").command_line("--model.base") == "--model.base tiny"
        ```
    """

    name: str
    value: bool | int | float | str | None = None

    @property
    def is_placeholder(self) -> bool:
        """Whether the value stands for what the user chooses (`<folder>`), to be written as it is."""
        return isinstance(self.value, str) and self.value.startswith("<") and self.value.endswith(">")

    def __str__(self) -> str:
        """The setting as Python code writes it (`name=value`)."""
        if self.value is None:
            return self.name
        return f"{self.name}={self.value if self.is_placeholder else repr(self.value)}"

    def command_line(self, flag: str) -> str:
        """The setting as a command line writes it, with `flag` for its option (`--data.skip_unreadable true`).

        Args:
            flag: The option of the setting, e.g. `--data.skip_unreadable`.
        """
        match self.value:
            case None:
                return flag
            case bool():
                return f"{flag} {str(self.value).lower()}"
            case str() if not self.is_placeholder:
                return f"{flag} {shlex.quote(self.value)}"
            case _:
                return f"{flag} {self.value}"


class TrainingSetupError(ValueError):
    """The training cannot start as set up: the data, the weights or a setting is wrong; the message says what,
    where, and how to fix it. `refiners-train` prints it alone (no traceback) and exits with status 1.

    Args:
        parts: The message: text, and the settings it names (rendered by `render`).

    Example:
        ```py
        from refiners.training.errors import Setting, TrainingSetupError

        error = TrainingSetupError("a.png cannot be read: pass ", Setting("skip_unreadable", True), " to leave it out")
        assert str(error) == "a.png cannot be read: pass skip_unreadable=True to leave it out"
        assert error.render(lambda setting: setting.command_line(f"--data.{setting.name}")) == (
            "a.png cannot be read: pass --data.skip_unreadable true to leave it out"
        )
        ```
    """

    def __init__(self, *parts: str | Setting) -> None:
        self.parts = parts
        super().__init__(self.render(str))

    @property
    def settings(self) -> list[Setting]:
        """The settings the message names."""
        return [part for part in self.parts if isinstance(part, Setting)]

    def render(self, setting: Callable[[Setting], str]) -> str:
        """The message, with each setting written by `setting` (the default, `str`, writes Python's `name=value`).

        Args:
            setting: Writes a setting for the message's reader.
        """
        return "".join(part if isinstance(part, str) else setting(part) for part in self.parts)
