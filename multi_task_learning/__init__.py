"""Multi-task gradient aggregation for the AIME world model: RGB (rotation-based gradient balancing),
plus "sum" and "pcgrad" baselines behind one interface and a name registry."""
from .aggregators import AGGREGATORS, PCGrad, SumAggregator, get_aggregator
from .rgb_optimizer import RGB, GradientAggregator, gram_stats, mean_pair_conflict, per_task_gradients

__all__ = [
           "AGGREGATORS",
           "RGB",
           "GradientAggregator",
           "PCGrad",
           "SumAggregator",
           "get_aggregator",
           "gram_stats",
           "mean_pair_conflict",
           "per_task_gradients",
]
