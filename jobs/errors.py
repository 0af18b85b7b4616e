"""Errors of the Ray layer that the command turns into one line and an exit code."""


class RayStartError(RuntimeError):
    """The local Ray did not come up (a busy or small machine): the command exits 1 with this
    message, which says what to try."""
