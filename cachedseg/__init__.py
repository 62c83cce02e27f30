"""cachedseg: drone-imagery segmentation on a frozen DINOv2 backbone with a resumable Zarr feature cache."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cachedseg")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
