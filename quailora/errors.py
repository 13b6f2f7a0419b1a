"""One exception type for bad input, so callers (CLI, trials) can turn it into a clean message."""


class QuailoraInputError(ValueError):
    """Raised before any compute when an argument, config field or checkpoint is invalid.

    The message always names the offending field/layer and value.
    """
