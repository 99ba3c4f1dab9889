"""Lightning callbacks: sample grids and generative metrics."""

from .generative_metrics import GenerativeMetricsCallback, make_generative_metrics
from .sample_grid import SampleGridCallback, save_grid

__all__ = ["SampleGridCallback", "save_grid", "GenerativeMetricsCallback", "make_generative_metrics"]
