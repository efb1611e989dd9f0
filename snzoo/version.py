"""The package version, importable without importing the rest of snzoo."""

__version__ = "0.1.0"
