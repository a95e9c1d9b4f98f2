"""User-facing errors: the `qnas` command prints them as one line on stderr and exits with code 2."""


class QnasError(Exception):
    """Bad input named by the message (a file, an argument, a value); never a bug in qnas itself."""


class DataError(QnasError):
    """An image, folder or data set that cannot be used (missing, unreadable, corrupt, too small)."""


class CheckpointError(QnasError):
    """A run folder or checkpoint that is missing, corrupt or from another model."""
