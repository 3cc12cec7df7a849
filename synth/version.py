"""The version written into generated DICOM headers (the installed project's, else a marker)."""

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("hyperct-node")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0+unknown"
