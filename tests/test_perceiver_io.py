"""Tests of the causal Perceiver IO context encoder (perceiver_io, MODEL.md §2.1). Tiny configs, CPU."""

from __future__ import annotations

import types

import pytest
import torch

from perceiver_io import CausalPerceiverIO, EMAVectorQuantizer, PerceiverIOConfig

# 32x32 frames -> 8x8 tokens keep every test cheap; the 64x64 default is exercised once for shapes.
TINY = {"image_size": 32, "tokenizer_channels": 4, "num_res_blocks": 0, "code_dim": 8, "num_codes": 16,
        "num_latents": 8, "latent_channels": 32, "context_dim": 32, "num_heads": 2, "num_self_attn_layers": 1,
        "num_temporal_layers": 1, "max_seq_len": 8}


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def tiny_model(seed: int = 0, **overrides) -> CausalPerceiverIO:
    torch.manual_seed(seed)
    return CausalPerceiverIO(PerceiverIOConfig(**{**TINY, **overrides}))


def random_video(b: int = 2, t: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, 3, size, size, generator=gen) * 2 - 1


COLOURS = torch.tensor([[1.0, 1.0, 1.0], [1.0, -0.5, -0.5]])


def moving_squares(n: int, t: int, gen: torch.Generator, size: int = 32, square: int = 8,
                   step: int = 4) -> torch.Tensor:
    """[n,t,3,size,size] in [-1,1]: a coloured square on black, moving right by `step` px per frame
    (one token) from a random start; row and colour (one of COLOURS) random per video."""
    video = -torch.ones(n, t, 3, size, size)
    for i in range(n):
        x0 = int(torch.randint(0, size - square - step * (t - 1) + 1, (1,), generator=gen))
        y0 = int(torch.randint(0, (size - square) // step + 1, (1,), generator=gen)) * step
        colour = COLOURS[int(torch.randint(0, len(COLOURS), (1,), generator=gen))]
        for s in range(t):
            x = x0 + s * step
            video[i, s, :, y0:y0 + square, x:x + square] = colour[:, None, None]
    return video


# ------------------------------------------------------------------------------------------------------
# Config and API surface
def test_config_validation_and_from_aime_config():
    with pytest.raises(ValueError, match="num_heads"):
        PerceiverIOConfig(latent_channels=30, num_heads=4)
    with pytest.raises(ValueError, match="recon_loss"):
        PerceiverIOConfig(recon_loss="huber")
    with pytest.raises(ValueError, match="downsample"):
        PerceiverIOConfig(downsample=3)
    with pytest.raises(ValueError, match="ema_decay"):
        PerceiverIOConfig(ema_decay=1.0)
    aime = types.SimpleNamespace(
        image_size=64, img_perceiver_channels=4, perceiver_code_dim=8, num_codebook_perceiver=16,
        num_latent_perceiver=4, num_latent_channels_perceiver=8, context_dim=8, perceiver_num_heads=1,
        perceiver_self_attn_layers=1, perceiver_temporal_layers=1, perceiver_max_seq_len=16)
    cfg = PerceiverIOConfig.from_aime_config(aime, recon_loss="mse")
    assert (cfg.tokenizer_channels, cfg.num_codes, cfg.num_latents, cfg.max_seq_len) == (4, 16, 4, 16)
    assert cfg.recon_loss == "mse" and cfg.num_tokens == 256
    with pytest.raises(ValueError, match="lacks"):
        PerceiverIOConfig.from_aime_config(types.SimpleNamespace(image_size=64))


def test_forward_shapes_at_64x64_and_losses_finite():
    cfg = PerceiverIOConfig(**{**TINY, "image_size": 64})
    model = CausalPerceiverIO(cfg)
    video = random_video(2, 3, size=64)
    out = model(video)
    assert out["context"].shape == (2, 3, cfg.context_dim)
    for key in ("total", "recon", "commitment", "next_token_ce", "accuracy", "codebook_perplexity"):
        assert out[key].dim() == 0 and torch.isfinite(out[key]), key
    total = out["recon"] + out["commitment"] + cfg.next_token_weight * out["next_token_ce"]
    assert torch.allclose(out["total"], total)
    logits, indices = model.next_token_logits(video)
    assert logits.shape == (2, 3, 256, cfg.num_codes) and indices.shape == (2, 3, 16, 16)
    assert set(model.compute_loss(video)) == {"total", "recon", "commitment", "next_token_ce", "accuracy",
                                              "copy_accuracy", "codebook_perplexity"}
    model.eval()                                   # the codebook stays as it is from here on
    codes = model.next_token_logits(video)[1].flatten(2)
    copy = (codes[:, :-1] == codes[:, 1:]).float().mean().item()
    assert model(video)["copy_accuracy"].item() == pytest.approx(copy)
    assert model.predict_next_frames(video).shape == video.shape


def test_facade_reexports_canonical_objects():
    import VRNN.perceiver.model as facade_model

    import perceiver_io
    import VRNN.perceiver as facade

    for name in perceiver_io.__all__:
        assert getattr(facade, name) is getattr(perceiver_io, name), name
    assert facade_model.CausalPerceiverIO is perceiver_io.CausalPerceiverIO


# ------------------------------------------------------------------------------------------------------
# Causality
def test_context_and_logits_are_causal():
    model = tiny_model().eval()
    video = random_video(2, 6)
    with torch.no_grad():
        ctx = model.extract_context(video)
        logits, _ = model.next_token_logits(video)
        for t in (1, 3, 5):                                   # perturb frames t.. (0-based)
            changed = video.clone()
            changed[:, t:] = random_video(2, 6 - t, seed=t + 10)
            ctx2 = model.extract_context(changed)
            logits2, _ = model.next_token_logits(changed)
            assert torch.allclose(ctx[:, :t], ctx2[:, :t], atol=1e-5), f"c_<{t} saw frame {t}"
            assert not torch.allclose(ctx[:, t], ctx2[:, t], atol=1e-4), f"c_{t} ignores frame {t}"
            # logits[:, s] predict frame s+1 from frames <= s: unchanged for s < t.
            assert torch.allclose(logits[:, :t], logits2[:, :t], atol=1e-5)
            assert not torch.allclose(logits[:, t], logits2[:, t], atol=1e-4)


def test_feature_map_tokenizer_reads_features_not_pixels():
    """feature_channels > 0: the tokenizer encodes a [B,T,F,h,w] map (1x1 convs), the video still sets the
    reconstruction target; missing or misshaped features are ValueErrors; the context stays causal."""
    model = tiny_model(feature_channels=5, feature_res_blocks=1)
    video = random_video(2, 4)
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(2, 4, 5, 8, 8, generator=gen)
    out = model(video, features)
    assert out["context"].shape == (2, 4, 32) and torch.isfinite(out["total"])
    out["total"].backward()
    assert model.tokenizer.encoder.net[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        ctx = model.extract_context(video, features)
        changed = features.clone()
        changed[:, 2:] = torch.randn(2, 2, 5, 8, 8, generator=gen)
        ctx2 = model.extract_context(video, changed)
        logits, indices = model.next_token_logits(video, features)
    assert torch.allclose(ctx[:, :2], ctx2[:, :2], atol=1e-5) and not torch.allclose(ctx[:, 2], ctx2[:, 2], atol=1e-4)
    assert logits.shape == (2, 4, 64, 16) and indices.shape == (2, 4, 8, 8)
    assert model.generate(video[:, :2], 2, features=features[:, :2]).shape == (2, 2, 3, 32, 32)
    with pytest.raises(ValueError, match="pass features"):
        model.extract_context(video)
    with pytest.raises(ValueError, match=r"\[2, 4, 5, 8, 8\]"):
        model.extract_context(video, features[:, :, :4])
    with pytest.raises(ValueError, match="tokenizes pixels"):
        tiny_model().extract_context(video, features)


def test_batch_elements_are_independent():
    model = tiny_model().eval()
    video = random_video(3, 4)
    with torch.no_grad():
        full = model.extract_context(video)
        single = model.extract_context(video[1:2])
    assert torch.allclose(full[1:2], single, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Codebook
def _codebook_state(model):
    q = model.tokenizer.quantizer
    return [q.embedding.clone(), q.cluster_size.clone(), q.embed_sum.clone(), q.initialized.clone()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_codebook_moves_only_in_training_loss_passes():
    model = tiny_model()
    video = random_video(2, 3)
    before = _codebook_state(model)
    model.eval()
    model(video)["total"].backward()                          # eval mode, even with gradients
    model.extract_context(video)
    assert _same(before, _codebook_state(model))
    model.train()
    with torch.no_grad():                                     # training-mode diagnostics
        model(video)
    model.extract_context(video).sum().backward()             # feature path, training mode
    model.predict_next_frames(video)
    model.generate(video[:, :2], 2)
    assert _same(before, _codebook_state(model))
    model(video)                                              # a training loss pass: initialises
    first = _codebook_state(model)
    assert not _same(before, first) and bool(model.tokenizer.quantizer.initialized)
    model(video)                                              # and then moves by EMA
    assert not torch.equal(first[0], model.tokenizer.quantizer.embedding)


def test_quantizer_nearest_code_straight_through_and_dead_code_restart():
    torch.manual_seed(0)
    vq = EMAVectorQuantizer(num_codes=6, code_dim=4, decay=0.5, dead_code_threshold=0.1)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.cdist(flat, vq.embedding).argmin(1)
    assert torch.equal(out["indices"].flatten(), expected)
    assert torch.allclose(out["quantized"].detach().permute(0, 2, 3, 1).reshape(-1, 4), vq.embedding[expected])
    out["quantized"].sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))        # straight-through: identity gradient
    # Data init, then a code that no batch vector uses decays below the threshold and is restarted at the
    # worst-quantised vector of the batch.
    data = torch.randn(1, 4, 4, 4)
    vq(data, update=True)
    vq.embedding[0] = 100.0
    vq.embed_sum[0] = 100.0 * vq.cluster_size[0]
    vectors = data.permute(0, 2, 3, 1).reshape(-1, 4)
    # Initial usage is 2 x threshold = 0.2 and halves per update: 0.1, then 0.05 < 0.1 -> restart.
    for updates in range(1, 8):
        vq(data, update=True)
        if vq.embedding[0].abs().max() < 50:
            break
    assert updates == 2, updates
    assert torch.cdist(vq.embedding[:1], vectors).min() < 1e-5   # restarted exactly at a batch vector


# ------------------------------------------------------------------------------------------------------
# Learning
def test_tokenizer_overfits_small_batch():
    torch.manual_seed(0)
    model = tiny_model(tokenizer_channels=8)
    frames = moving_squares(4, 2, torch.Generator().manual_seed(1)).flatten(0, 1)   # [8,3,32,32]
    tok = model.tokenizer
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)

    def recon_error() -> float:
        with torch.no_grad():
            return float(tok.recon_loss(tok.decode(tok.encode(frames)["quantized"]), frames))

    start = recon_error()
    for _ in range(120):
        enc = tok.encode(frames, update=True)
        loss = tok.recon_loss(tok.decode(enc["quantized"]), frames) + enc["commitment"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = recon_error()
    assert end < start / 3, (start, end)


def test_next_token_accuracy_on_moving_square_beats_baselines():
    gen = torch.Generator().manual_seed(0)
    train, held_out = moving_squares(48, 4, gen), moving_squares(12, 4, gen)
    model = tiny_model()
    # The codes are the prediction targets, so the tokenizer gets a short head start (it churns most while
    # it learns fast), then everything trains jointly on the full loss.
    tok = model.tokenizer
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    for _ in range(60):
        frames = train[torch.randint(0, len(train), (8,), generator=gen)].flatten(0, 1)
        enc = tok.encode(frames, update=True)
        loss = tok.recon_loss(tok.decode(enc["quantized"]), frames) + enc["commitment"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(120):
        batch = train[torch.randint(0, len(train), (8,), generator=gen)]
        loss = model.compute_loss(batch)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits, indices = model.next_token_logits(held_out)
    pred = logits[:, :-1].argmax(-1)                                         # [B,T-1,hw]
    target, current = indices[:, 1:].flatten(2), indices[:, :-1].flatten(2)
    accuracy = (pred == target).float().mean().item()
    most_frequent = (target == target.flatten().mode().values).float().mean().item()
    copy_last = (current == target).float().mean().item()
    chance = 1.0 / model.config.num_codes
    assert accuracy > max(most_frequent, copy_last) + 0.03, (accuracy, most_frequent, copy_last)
    assert accuracy > 5 * chance


def test_copy_prior_makes_the_untrained_model_predict_no_change():
    video = random_video(2, 4)
    model = tiny_model().eval()
    with torch.no_grad():
        logits, indices = model.next_token_logits(video)
    same = (logits.argmax(-1) == indices.flatten(2)).float().mean()
    assert same > 0.9, float(same)                            # gain ln K dominates the random head
    plain = tiny_model(copy_prior=False).eval()
    assert plain.decoder.copy_gain is None
    with torch.no_grad():
        logits, indices = plain.next_token_logits(video)
    assert (logits.argmax(-1) == indices.flatten(2)).float().mean() < 0.5


def test_gradients_of_context_reach_tokenizer_and_encoder():
    model = tiny_model()
    model.train()
    context = model.extract_context(random_video(2, 3))
    context.pow(2).sum().backward()
    for part in (model.tokenizer.encoder, model.frame_encoder, model.temporal):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads), type(part).__name__
        assert sum(float(g.abs().sum()) for g in grads) > 0, type(part).__name__
    assert all(p.grad is None for p in model.decoder.parameters())           # not on the context path


# ------------------------------------------------------------------------------------------------------
# Generation and round trips
def test_generate_shapes_range_sampling_and_sliding_window():
    model = tiny_model().eval()
    video = random_video(2, 3)
    frames = model.generate(video, 4)
    assert frames.shape == (2, 4, 3, 32, 32)
    assert frames.min() >= -1 and frames.max() <= 1
    a = model.generate(video, 2, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = model.generate(video, 2, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    long = model.generate(video, 8)                           # 3 + 8 frames > max_seq_len = 8
    assert long.shape == (2, 8, 3, 32, 32) and torch.isfinite(long).all()
    # The first generated frame is the argmax next-frame prediction from the context.
    assert torch.allclose(frames[:, 0], model.predict_next_frames(video)[:, -1], atol=1e-5)


def test_state_dict_round_trip_includes_codebook():
    model = tiny_model()
    video = random_video(2, 3)
    model(video)                                              # initialise and move the codebook
    clone = tiny_model(seed=1)
    clone.load_state_dict(model.state_dict())
    model.eval()
    clone.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_tokens(video), clone.encode_tokens(video))
        assert torch.allclose(model.extract_context(video), clone.extract_context(video))


# ------------------------------------------------------------------------------------------------------
# Input validation
@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, 3, 32, 32), "5 dims"),
    (torch.zeros(1, 2, 1, 32, 32), "shape"),
    (torch.zeros(1, 2, 3, 16, 16), "shape"),
    (torch.zeros(1, 9, 3, 32, 32), "max_seq_len"),
    (torch.full((1, 2, 3, 32, 32), 3.0), "within"),
    (torch.full((1, 2, 3, 32, 32), float("nan")), "finite"),
    (torch.zeros(1, 2, 3, 32, 32, dtype=torch.int64), "dtype"),
    (torch.zeros(1, 1, 3, 32, 32), "at least 2"),
    ([[0.0]], "torch.Tensor"),
])
def test_invalid_inputs_raise_value_error(bad, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        model.compute_loss(bad)


def test_uint8_input_matches_scaled_float_and_generate_arguments_checked():
    model = tiny_model().eval()
    raw = torch.randint(0, 256, (1, 3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(model.extract_context(raw), model.extract_context(raw.float() / 127.5 - 1))
    with pytest.raises(ValueError, match="n_frames"):
        model.generate(random_video(1, 2), 0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(random_video(1, 2), 1, temperature=-1.0)
    with pytest.raises(ValueError, match="PerceiverIOConfig"):
        CausalPerceiverIO({"image_size": 64})


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_attention_equals_scaled_dot_product_attention(causal):
    """perceiver_io.encoder.attend_math (matmuls and a float32 softmax; what attend runs for bf16 on the CPU)
    gives the values and gradients of F.scaled_dot_product_attention, causal or not, in float32 and bf16."""
    import torch.nn.functional as F

    from perceiver_io.encoder import attend, attend_math
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 8, generator=g, requires_grad=True) for _ in range(3))
    if not causal:
        k, v = (torch.randn(3, 2, 5, 8, generator=g, requires_grad=True) for _ in range(2))
    ours = attend_math(q, k, v, causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert torch.equal(attend(q, k, v, causal), ref)          # float32: PyTorch's kernel itself
    assert torch.allclose(ours, ref, atol=1e-5)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(grads, grads_ref))
    q16, k16, v16 = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    low = attend(q16, k16, v16, causal)
    assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), ref, atol=0.05)
    grads16 = torch.autograd.grad(low.float().square().sum(), (q16, k16, v16))
    assert all(torch.allclose(a.float(), b, atol=0.1, rtol=0.05) for a, b in zip(grads16, grads_ref))


def test_predict_every_scores_every_kth_position_only():
    """predict_every=3: the next-token cross-entropy, accuracy and copy accuracy are those of positions 0, 3,
    6, ... of the full decoder's logits (same weights), and the context is the same for every frame."""
    import torch.nn.functional as F

    full, sparse = tiny_model(), tiny_model(predict_every=3)
    sparse.load_state_dict(full.state_dict())
    full.eval()
    sparse.eval()
    video = torch.rand(2, 8, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        out, ref = sparse(video), full(video)
        logits, indices = full.next_token_logits(video)
    chosen = logits[:, 0:7:3]                                          # sources 0, 3, 6 of T - 1 = 7
    targets = indices.flatten(2)[:, 1:8:3]
    assert torch.allclose(out["next_token_ce"], F.cross_entropy(chosen.flatten(0, 2), targets.flatten()), atol=1e-6)
    assert torch.allclose(out["accuracy"], (chosen.argmax(-1) == targets).float().mean())
    assert torch.allclose(out["copy_accuracy"], (indices.flatten(2)[:, 0:7:3] == targets).float().mean())
    assert torch.allclose(out["context"], ref["context"])
    assert not torch.allclose(out["next_token_ce"], ref["next_token_ce"])
    with pytest.raises(ValueError, match="predict_every"):
        PerceiverIOConfig(predict_every=0)
