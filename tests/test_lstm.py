"""temporal_dynamics.LSTMLayer: equivalence with torch.nn.LSTM, step == sequence, resets, gradients, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from temporal_dynamics import LSTMLayer

B, T, I, H = 3, 6, 5, 7


def _pair(num_layers: int, seed: int = 0):
    torch.manual_seed(seed)
    ref = nn.LSTM(I, H, num_layers=num_layers, batch_first=True)
    mine = LSTMLayer(I, H, num_layers=num_layers, layer_norm=False)
    mine.load_from_torch_lstm(ref)
    with torch.no_grad():  # a non-trivial learned initial state
        mine.h0.normal_()
        mine.c0.normal_()
    return ref, mine


@pytest.mark.parametrize("num_layers", [1, 3])
def test_matches_torch_lstm(num_layers):
    ref, mine = _pair(num_layers)
    x = torch.randn(B, T, I, generator=torch.Generator().manual_seed(1))
    h, c = mine.initial_state(B)
    out_ref, (h_ref, c_ref) = ref(x, (h.contiguous(), c.contiguous()))
    out, (h_new, c_new) = mine(x)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_new, h_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(c_new, c_ref, atol=1e-5, rtol=0)


def test_state_dict_of_torch_lstm_loads_by_name():
    ref, _ = _pair(2)
    mine = LSTMLayer(I, H, num_layers=2, layer_norm=False)
    missing, unexpected = mine.load_state_dict(ref.state_dict(), strict=False)
    assert set(missing) == {"h0", "c0"} and not unexpected
    torch.testing.assert_close(mine.weight_hh_l1, ref.weight_hh_l1)


def test_load_from_torch_lstm_rejects_other_sizes():
    with pytest.raises(ValueError, match="sizes"):
        LSTMLayer(I, H).load_from_torch_lstm(nn.LSTM(I, H + 1))


@pytest.mark.parametrize("layer_norm", [False, True])
def test_step_equals_sequence(layer_norm):
    torch.manual_seed(0)
    lstm = LSTMLayer(I, H, num_layers=2, layer_norm=layer_norm)
    x = torch.randn(B, T, I)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, 3] = True
    reset[2, 1] = True
    out_seq, (h_seq, c_seq) = lstm(x, reset=reset)
    state, outs = None, []
    for t in range(T):
        o, state = lstm.step(x[:, t], state, reset=reset[:, t])
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs, 1), out_seq, atol=1e-6, rtol=0)
    torch.testing.assert_close(state[0], h_seq, atol=1e-6, rtol=0)
    torch.testing.assert_close(state[1], c_seq, atol=1e-6, rtol=0)


def test_reset_rows_restart_from_initial_state_others_unaffected():
    torch.manual_seed(0)
    lstm = LSTMLayer(I, H, num_layers=2)
    with torch.no_grad():
        lstm.h0.normal_()
        lstm.c0.normal_()
    x = torch.randn(B, T, I)
    t0 = 2
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[1, t0] = True
    out, _ = lstm(x, reset=reset)
    out_plain, _ = lstm(x)
    # row 1 from t0 on equals a fresh run started at t0 from the learned initial state
    fresh, _ = lstm(x[1:2, t0:])
    torch.testing.assert_close(out[1:2, t0:], fresh, atol=1e-6, rtol=0)
    assert not torch.allclose(out[1, t0:], out_plain[1, t0:])
    # before t0, and in the other rows, nothing changes
    torch.testing.assert_close(out[1, :t0], out_plain[1, :t0])
    torch.testing.assert_close(out[[0, 2]], out_plain[[0, 2]])


def test_step_reset_replaces_given_state():
    torch.manual_seed(0)
    lstm = LSTMLayer(I, H, num_layers=2)
    x = torch.randn(B, I)
    state = (torch.randn(2, B, H), torch.randn(2, B, H))
    out, _ = lstm.step(x, state, reset=torch.tensor([True, False, False]))
    out_fresh, _ = lstm.step(x[:1])
    out_kept, _ = lstm.step(x, state)
    torch.testing.assert_close(out[:1], out_fresh)
    torch.testing.assert_close(out[1:], out_kept[1:])


def test_gradients_reach_initial_state_and_weights():
    torch.manual_seed(0)
    lstm = LSTMLayer(I, H, num_layers=2, dropout=0.1)
    x = torch.randn(B, T, I)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, 3] = True
    out, (_, c) = lstm(x, reset=reset)
    (out.square().mean() + c.square().mean()).backward()
    for name, p in lstm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_layer_norm_normalises_output():
    lstm = LSTMLayer(I, H, layer_norm=True)
    out, _ = lstm(torch.randn(B, T, I))
    torch.testing.assert_close(out.mean(-1), torch.zeros(B, T), atol=1e-5, rtol=0)


def test_shape_errors_are_value_errors():
    lstm = LSTMLayer(I, H, num_layers=2)
    with pytest.raises(ValueError, match=r"\[B, T, I=5\]"):
        lstm(torch.randn(B, T, I + 1))
    with pytest.raises(ValueError, match=r"\[B, I=5\]"):
        lstm.step(torch.randn(B, T, I))
    with pytest.raises(ValueError, match="state h"):
        lstm.step(torch.randn(B, I), (torch.zeros(1, B, H), torch.zeros(2, B, H)))
    with pytest.raises(ValueError, match="reset"):
        lstm(torch.randn(B, T, I), reset=torch.zeros(B, T + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="reset"):
        lstm.step(torch.randn(B, I), reset=torch.zeros(B))
    with pytest.raises(ValueError, match="hidden_size"):
        LSTMLayer(I, 0)
