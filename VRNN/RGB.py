"""Compatibility path: RGB moved to ``multi_task_learning`` (canonical: ``multi_task_learning.rgb_optimizer``).

``from VRNN.RGB import RGB`` keeps working and gives the canonical class.
"""

from multi_task_learning import RGB, get_aggregator

__all__ = ["RGB", "get_aggregator"]
