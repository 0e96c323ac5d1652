"""airbox-build: customise the Sophgo BM1684X AirBox vendor flash package."""

__version__ = "0.1.0"
