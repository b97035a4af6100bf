"""ryla: an image-generation API for FLUX.1-dev (ARCHITECTURE.md maps the packages)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ryla")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
