"""The package version, in a module of its own so submodules can report it without importing upward."""
__version__ = "0.1.0"
