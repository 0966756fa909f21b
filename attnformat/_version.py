"""Version of the attnformat package (the library, not the file format)."""

__version__ = "0.1.0"
