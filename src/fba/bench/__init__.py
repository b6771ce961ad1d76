"""Measuring: peak training memory and step time, side by side, as ratios to BP."""

from fba.bench.memory import peak_memory

__all__ = ["peak_memory"]
