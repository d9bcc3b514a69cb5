"""`kiln zoo`: the model names `kiln build`, `kiln bench` and `kiln predict` accept."""

from __future__ import annotations

from kiln.cli.app import command
from kiln.cli.common import console


@command("zoo")
def zoo() -> None:
    """List the model names kiln build accepts.

    Also accepted: any torchvision classifier, timm/NAME and path/to/file.py:factory.
    """
    from kiln import zoo as models

    console.print(" ".join(models.names()), soft_wrap=False)
    console.print("also accepted: any torchvision classifier (e.g. torchvision/convnext_tiny), timm/NAME, "
                  "and path/to/file.py:factory (a function returning a module and its example inputs)")
