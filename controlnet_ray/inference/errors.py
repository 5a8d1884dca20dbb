"""The inference commands' user-facing error (the CLI frame prints it, exit status 2)."""


class InferenceError(RuntimeError):
    """A user-facing problem (bad file, no face, bad angle); the message names file or flag."""
