"""Recurrent dynamics for the AIME world model: a stacked LSTM with learned initial state and resets."""
from temporal_dynamics.lstm import LSTMLayer, State

__all__ = ["LSTMLayer", "State"]
