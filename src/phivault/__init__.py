"""phivault: the cloud that connected medical devices send their exams to."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("phivault")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
