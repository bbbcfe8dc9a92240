"""Stacked LSTM with a learned initial state, per-row episode resets and an optional output LayerNorm.

This is the recurrence of the world model (MODEL.md §2.5): h_{t+1} = LSTM([z_t; a_t; c_t; s_t], h_t). The
world model drives it one step at a time (`step`), because the next input depends on the current state;
`forward` runs a whole sequence when the inputs are known in advance.

Choices where the spec is silent (written down here as MODEL.md asks):
- Parameters are named and laid out exactly like `torch.nn.LSTM` (`weight_ih_l{k}` [4H, I_k],
  `weight_hh_l{k}` [4H, H], `bias_ih_l{k}`, `bias_hh_l{k}` [4H], gate order i, f, g, o), so a
  `torch.nn.LSTM` state dict loads into it (see `load_from_torch_lstm`).
- Weights use torch's LSTM initialisation U(-1/sqrt(H), 1/sqrt(H)); the forget-gate part of `bias_ih`
  starts at 1 so that early in training the cell keeps its memory (Jozefowicz et al., 2015).
- The learned initial state (h0, c0) is one vector per layer, initialised to zeros, shared by all rows.
- The LayerNorm acts on the top layer's output only; the carried state (h, c) is never normalised, so
  with `layer_norm=False` the module computes exactly what `torch.nn.LSTM` computes.
- Dropout (as in `torch.nn.LSTM`) acts on each layer's output before it feeds the next layer, not on the
  top output and not on the carried state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

State = tuple[Tensor, Tensor]

# gate order used by torch.nn.LSTM: input, forget, cell candidate, output
_FORGET_GATE = 1


class LSTMLayer(nn.Module):
    """Stacked LSTM cells with a single-step API, a sequence API and resets to a learned initial state.

    Args:
        input_size: I, features of the input at one step.
        hidden_size: H, size of h and c in every layer.
        num_layers: L, number of stacked cells.
        layer_norm: apply LayerNorm(H) to the top layer's output.
        dropout: dropout probability between stacked layers (training mode only).

    State: a tuple (h, c), each [L, B, H] (same layout as `torch.nn.LSTM`).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, layer_norm: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LSTMLayer: {name} must be a positive int, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LSTMLayer: dropout must be in [0, 1), got {dropout!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = float(dropout)
        for k in range(num_layers):
            in_k = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size, in_k)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
        self.h0 = nn.Parameter(torch.zeros(num_layers, hidden_size))
        self.c0 = nn.Parameter(torch.zeros(num_layers, hidden_size))
        self.norm = nn.LayerNorm(hidden_size) if layer_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        H = self.hidden_size
        for k in range(self.num_layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                nn.init.uniform_(getattr(self, f"{name}_l{k}"), -bound, bound)
            with torch.no_grad():
                getattr(self, f"bias_ih_l{k}")[_FORGET_GATE * H:(_FORGET_GATE + 1) * H].fill_(1.0)
        nn.init.zeros_(self.h0)
        nn.init.zeros_(self.c0)
        if self.norm is not None:
            self.norm.reset_parameters()

    def _layer_params(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}"),
                getattr(self, f"bias_ih_l{k}"), getattr(self, f"bias_hh_l{k}"))

    @torch.no_grad()
    def load_from_torch_lstm(self, lstm: nn.LSTM) -> None:
        """Copy the weights of a unidirectional, batch-independent `torch.nn.LSTM` with the same sizes.

        The initial state and the LayerNorm are left as they are (torch.nn.LSTM has neither).
        """
        if not isinstance(lstm, nn.LSTM):
            raise ValueError(f"load_from_torch_lstm: expected torch.nn.LSTM, got {type(lstm).__name__}")
        mine = (self.input_size, self.hidden_size, self.num_layers)
        theirs = (lstm.input_size, lstm.hidden_size, lstm.num_layers)
        if mine != theirs:
            raise ValueError(f"load_from_torch_lstm: sizes (input, hidden, layers) differ: {theirs} vs {mine}")
        if lstm.bidirectional or lstm.proj_size or not lstm.bias:
            raise ValueError("load_from_torch_lstm: only unidirectional LSTMs with biases and no projection "
                             f"are supported (bidirectional={lstm.bidirectional}, proj_size={lstm.proj_size}, "
                             f"bias={lstm.bias})")
        for k in range(self.num_layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(self, f"{name}_l{k}").copy_(getattr(lstm, f"{name}_l{k}"))

    def initial_state(self, batch_size: int) -> State:
        """The learned initial state expanded to a batch: (h, c), each [L, B, H]. Differentiable in h0/c0."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"initial_state: batch_size must be a positive int, got {batch_size!r}")
        L, H = self.num_layers, self.hidden_size
        return self.h0.unsqueeze(1).expand(L, batch_size, H), self.c0.unsqueeze(1).expand(L, batch_size, H)

    # ------------------------------------------------------------------ checks
    def _check_state(self, state: State, batch_size: int, where: str) -> None:
        if not (isinstance(state, (tuple, list)) and len(state) == 2):
            raise ValueError(f"{where}: state must be a tuple (h, c), got {type(state).__name__}")
        expected = (self.num_layers, batch_size, self.hidden_size)
        for name, t in zip(("h", "c"), state):
            if not isinstance(t, Tensor) or tuple(t.shape) != expected:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{where}: state {name} must have shape [L, B, H] = {list(expected)}, got {shape}")

    def _check_reset(self, reset: Tensor | None, shape: tuple[int, ...], where: str) -> Tensor | None:
        if reset is None:
            return None
        if not isinstance(reset, Tensor) or tuple(reset.shape) != shape:
            got = tuple(reset.shape) if isinstance(reset, Tensor) else type(reset).__name__
            raise ValueError(f"{where}: reset must be a bool tensor of shape {list(shape)}, got {got}")
        if reset.dtype != torch.bool:
            if reset.dtype.is_floating_point or reset.dtype.is_complex:
                raise ValueError(f"{where}: reset must be a bool (or integer 0/1) tensor, got dtype {reset.dtype}")
            reset = reset != 0
        return reset

    # ------------------------------------------------------------------ core
    def _cell(self, gates_x: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, b_hh: Tensor) -> State:
        # gates_x already holds x @ W_ih^T + b_ih, so the sequence API can compute it for all steps at once
        gates = gates_x + F.linear(h, w_hh, b_hh)
        i, f, g, o = gates.chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        return h_new, c_new

    def _apply_reset(self, h: Tensor, c: Tensor, k: int, reset: Tensor | None) -> State:
        if reset is None:
            return h, c
        mask = reset.unsqueeze(-1)  # [B, 1]
        return torch.where(mask, self.h0[k].to(h.dtype), h), torch.where(mask, self.c0[k].to(c.dtype), c)

    def _output(self, h_top: Tensor) -> Tensor:
        return self.norm(h_top) if self.norm is not None else h_top

    def step(self, x: Tensor, state: State | None = None, reset: Tensor | None = None) -> tuple[Tensor, State]:
        """One time step.

        Args:
            x: [B, I] input at this step.
            state: (h, c), each [L, B, H]; None means the learned initial state.
            reset: optional bool [B]; where True the row's state is replaced by the learned initial state
                before the update (the row starts a new episode).
        Returns:
            out [B, H] (the top layer's h, layer-normed when enabled) and the new state (h, c) [L, B, H].
        """
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != self.input_size:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"LSTMLayer.step: x must have shape [B, I={self.input_size}], got {got}")
        B = x.shape[0]
        state = self.initial_state(B) if state is None else state
        self._check_state(state, B, "LSTMLayer.step")
        reset = self._check_reset(reset, (B,), "LSTMLayer.step")
        h_all, c_all = state
        hs, cs = [], []
        inp = x
        for k in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self._layer_params(k)
            h, c = self._apply_reset(h_all[k], c_all[k], k, reset)
            h, c = self._cell(F.linear(inp, w_ih, b_ih), h, c, w_hh, b_hh)
            hs.append(h)
            cs.append(c)
            inp = h
            if self.dropout > 0 and k < self.num_layers - 1:
                inp = F.dropout(inp, self.dropout, self.training)
        return self._output(hs[-1]), (torch.stack(hs), torch.stack(cs))

    def forward(self, x: Tensor, state: State | None = None,
                reset: Tensor | None = None) -> tuple[Tensor, State]:
        """A whole sequence (batch first).

        Args:
            x: [B, T, I] inputs.
            state: (h, c), each [L, B, H], the state before step 0; None means the learned initial state.
            reset: optional bool [B, T]; reset[b, t] True replaces row b's state by the learned initial
                state before step t (typically `is_first`).
        Returns:
            out [B, T, H] (top layer's h per step, layer-normed when enabled) and the final state (h, c).

        Layers are run one after the other over the whole sequence so that each layer's input projection
        is one batched matmul over B*T; this is exact because a reset acts on every layer independently.
        """
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.input_size:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"LSTMLayer.forward: x must have shape [B, T, I={self.input_size}], got {got}")
        B, T, _ = x.shape
        if T == 0:
            raise ValueError("LSTMLayer.forward: x has an empty time axis (T=0)")
        state = self.initial_state(B) if state is None else state
        self._check_state(state, B, "LSTMLayer.forward")
        reset = self._check_reset(reset, (B, T), "LSTMLayer.forward")
        h_all, c_all = state
        h_final, c_final = [], []
        inp = x
        for k in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self._layer_params(k)
            gates_x = F.linear(inp, w_ih, b_ih)  # [B, T, 4H]
            h, c = h_all[k], c_all[k]
            outs = []
            for t in range(T):
                h, c = self._apply_reset(h, c, k, None if reset is None else reset[:, t])
                h, c = self._cell(gates_x[:, t], h, c, w_hh, b_hh)
                outs.append(h)
            h_final.append(h)
            c_final.append(c)
            inp = torch.stack(outs, dim=1)  # [B, T, H]
            if self.dropout > 0 and k < self.num_layers - 1:
                inp = F.dropout(inp, self.dropout, self.training)
        return self._output(inp), (torch.stack(h_final), torch.stack(c_final))

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, hidden_size={self.hidden_size}, num_layers={self.num_layers}, "
                f"layer_norm={self.norm is not None}, dropout={self.dropout}")
