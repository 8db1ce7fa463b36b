"""The package version, in a module of its own: checkpoints and exports record it without
importing the package's top level (and pyproject.toml reads it statically)."""

__version__ = "0.1.0"
