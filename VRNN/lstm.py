"""Compatibility path: the LSTM moved to ``temporal_dynamics`` (canonical: ``temporal_dynamics.lstm``).

``from VRNN.lstm import LSTMLayer`` keeps working and gives the canonical class.
"""

from temporal_dynamics import LSTMLayer

__all__ = ["LSTMLayer"]
