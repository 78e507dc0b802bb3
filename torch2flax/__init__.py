"""torch2flax: port timm backbones to Flax and train them from PyTorch data pipelines."""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("torch2flax")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
