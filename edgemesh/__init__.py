"""edgemesh: a handful of ordinary devices serving models none of them could serve alone."""

__version__ = "0.1.0"
