"""The `snzoo` command: a thin layer over snzoo's public Python API."""
