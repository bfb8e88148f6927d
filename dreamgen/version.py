"""The package version, in a leaf module so that any module can stamp it without importing
the package face (``dreamgen/__init__.py`` imports most of the package)."""

__version__ = "0.1.0"
