"""`platformctl plan`: GPU memory and placement for a model, method and GPU."""

from llmplatform.errors import NotImplementedYet


def plan() -> None:
    """Print memory breakdown and placement. [being built]"""
    raise NotImplementedYet("`platformctl plan` is being built (issue 2).")
