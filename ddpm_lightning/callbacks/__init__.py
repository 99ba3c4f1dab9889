"""Lightning callbacks: sample grids and generative metrics."""

from .generative_metrics import GenerativeMetricsCallback
from .sample_grid import SampleGridCallback

__all__ = ["SampleGridCallback", "GenerativeMetricsCallback"]
