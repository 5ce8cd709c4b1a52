"""The one way this project stops on bad input: a single line that says what is wrong and how to fix it."""


class UsageError(SystemExit):
    """Raised for bad flags, files or checkpoints; Python prints the message and exits with status 1."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def require(condition: bool, message: str) -> None:
    """Stop with `message` unless `condition` holds."""
    if not condition:
        raise UsageError(message)


class TrainingError(UsageError):
    """A run that cannot go on (a non-finite loss, say): one line, like bad input, naming where it happened."""
