"""The exceptions vizdeconv raises for problems a user can fix; the CLI prints them on one line."""

import os


class VizDeconvError(Exception):
    """Base class: a wrong model, layer, option or checkpoint (CLI exit code 2)."""


class ModelError(VizDeconvError):
    """A model or its weights cannot be loaded."""


class UnsafeCheckpointError(ModelError):
    """A checkpoint would need arbitrary code to unpickle; it is refused and its code never runs."""


class LayerError(VizDeconvError):
    """No such layer, or a layer the deconvnet cannot pass through."""


class ImageError(VizDeconvError):
    """One input file cannot be used; batch runs report it and go on (CLI exit code 1)."""

    def __init__(self, path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # travels back from DataLoader worker processes
        return type(self), (self.path, self.reason)

    def to_json(self) -> dict:
        return {"image": os.path.abspath(self.path), "reason": self.reason}
