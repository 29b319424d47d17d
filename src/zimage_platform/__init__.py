"""zimage-platform: multi-tenant inference for the Z-Image family."""

__version__ = "0.1.0"
