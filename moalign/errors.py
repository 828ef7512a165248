"""One exception type for bad user input: the CLI prints its message as a one-line error."""


class MoalignError(ValueError):
    """Bad input or configuration; the message names the problem."""
