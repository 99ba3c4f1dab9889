"""Lightning callbacks: sample grids and generative metrics."""

from .sample_grid import SampleGridCallback, save_grid

__all__ = ["SampleGridCallback", "save_grid"]
