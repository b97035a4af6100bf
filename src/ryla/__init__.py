"""ryla: an image-generation API for FLUX.1-dev (ARCHITECTURE.md maps the packages).

    from ryla import Ryla
    image = Ryla().generate("a red fox in the snow", width=256, height=256, steps=4, seed=7).image

`Ryla` (ryla.pipeline) is imported on first use, so `import ryla` stays light for the CLI and
the server, which load torch only when they need it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ryla")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"


__all__ = ["Generation", "Ryla", "RylaError", "__version__"]


def __getattr__(name: str):
    if name in ("Ryla", "Generation", "RylaError"):
        from ryla import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'ryla' has no attribute {name!r}")
