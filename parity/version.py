"""The parity version (its own module, so stages need not import the package that exposes the API)."""

__version__ = "0.1.0"
