"""Temporal discriminator (MODEL.md section 2.7): shapes, time-causality, losses and their gradients."""

import pytest
import torch

from VRNN.temporal_discriminator import (
    TemporalDiscriminator,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
    gradient_penalty,
)

D = 3



def make(layers=1, seed=0, **kw):
    torch.manual_seed(seed)
    return TemporalDiscriminator(D, channels=8, num_layers=layers, num_heads=2, **kw)


def window(b=2, t=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, 3, 64, 64, generator=g) * 2 - 1, torch.randn(b, t, D, generator=g)


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_shapes(spectral_norm):
    d = make(layers=2, spectral_norm=spectral_norm)
    x, z = window()
    out = d(x, z)
    assert out["frame_scores"].shape == (2, 4) and out["sequence_score"].shape == (2,)
    assert len(out["features"]) == 3
    assert all(f.shape == (2, 4, 64, 8) for f in out["features"])
    assert TemporalDiscriminator(D, 8, 1, 2, patch_size=16)(x, z)["features"][0].shape == (2, 4, 16, 8)


def test_frame_scores_are_time_causal():
    d = make(layers=2)
    # Break the zero-initialised FiLM so that z actually enters the scores.
    for name, p in d.named_parameters():
        if "film" in name:
            torch.nn.init.normal_(p, std=0.5)
    x, z = window(t=5)
    base = d(x, z)["frame_scores"]
    for t in range(5):
        x2, z2 = x.clone(), z.clone()
        x2[:, t] = torch.rand_like(x2[:, t])
        changed = d(x2, z)["frame_scores"]
        torch.testing.assert_close(changed[:, :t], base[:, :t], rtol=0, atol=0)
        assert (changed[:, t:] - base[:, t:]).abs().amax() > 0
        z2[:, t] += 1.0
        changed_z = d(x, z2)["frame_scores"]
        torch.testing.assert_close(changed_z[:, :t], base[:, :t], rtol=0, atol=0)
        assert (changed_z[:, t] - base[:, t]).abs().amax() > 0


def test_sequence_score_sees_the_first_frame():
    d = make(layers=1)
    x, z = window()
    x2 = x.clone()
    x2[:, 0] = -x2[:, 0]
    assert (d(x, z)["sequence_score"] - d(x2, z)["sequence_score"]).abs().amax() > 0


@pytest.mark.parametrize("kind", ["hinge", "wgan-gp"])
def test_discriminator_learns_to_separate(kind, one_thread):
    d = make()
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    z = torch.zeros(2, 3, D)
    fake = torch.full((2, 3, 3, 64, 64), 0.3)  # constant frames
    losses, real_scores, fake_scores = [], [], []
    for _ in range(12):
        real = torch.rand(2, 3, 3, 64, 64, generator=g) * 2 - 1  # noise
        real_out, fake_out = d(real, z), d(fake, z)
        loss = discriminator_loss(real_out, fake_out, kind)
        if kind == "wgan-gp":
            loss = loss + 10.0 * gradient_penalty(d, real, fake, z, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        real_scores.append(real_out["frame_scores"].mean().item())
        fake_scores.append(fake_out["frame_scores"].mean().item())
    assert sum(losses[-3:]) < sum(losses[:3])
    assert real_scores[-1] > fake_scores[-1]
    # The generator's loss is low when fakes score high: real-looking inputs give a lower generator loss.
    with torch.no_grad():
        assert generator_loss(d(real, z), kind) < generator_loss(d(fake, z), kind)


def test_hinge_loss_values():
    real = {"frame_scores": torch.full((2, 3), 2.0), "sequence_score": torch.full((2,), 2.0)}
    fake = {"frame_scores": torch.full((2, 3), -2.0), "sequence_score": torch.full((2,), -2.0)}
    assert discriminator_loss(real, fake, "hinge").item() == 0.0  # separated beyond the margin
    assert discriminator_loss(fake, real, "hinge").item() == pytest.approx(6.0)
    assert generator_loss(fake, "hinge").item() == pytest.approx(2.0)
    assert discriminator_loss(real, fake, "wgan-gp").item() == pytest.approx(-4.0)


def test_gradient_penalty_finite_positive_and_trains_critic():
    d = make()
    x, z = window()
    fake = torch.zeros_like(x)
    gp = gradient_penalty(d, x, fake, z, z_fake=z + 1.0, generator=torch.Generator().manual_seed(0))
    assert gp.dim() == 0 and torch.isfinite(gp) and gp > 0
    gp.backward()
    assert d.patch_embed.weight.grad is not None and d.patch_embed.weight.grad.abs().sum() > 0
    # A critic with zero input gradient has penalty exactly 1.
    torch.nn.init.zeros_(d.frame_head.weight)
    torch.nn.init.zeros_(d.sequence_head.weight)
    torch.testing.assert_close(gradient_penalty(d, x, fake, z).detach(), torch.tensor(1.0))


def test_feature_matching_gradient_reaches_generated_input():
    d = make()
    x, z = window()
    generated = torch.zeros_like(x, requires_grad=True)
    real_feats = d(x, z)["features"]
    loss = feature_matching_loss(real_feats, d(generated, z)["features"])
    assert loss > 0
    loss.backward()
    assert generated.grad is not None and generated.grad.abs().sum() > 0
    assert torch.isfinite(generated.grad).all()
    same = feature_matching_loss(real_feats, [f.clone() for f in real_feats])
    assert same.item() == 0.0
    # Generator loss gradient also reaches the generated frames.
    generated.grad = None
    generator_loss(d(generated, z)).backward()
    assert generated.grad.abs().sum() > 0


def test_bad_inputs_raise():
    d = make()
    x, z = window()
    with pytest.raises(ValueError, match="x"):
        d(x[:, :, :, :32, :32], z)
    with pytest.raises(ValueError, match="x"):
        d(x[0], z)
    with pytest.raises(ValueError, match="z"):
        d(x, z[:, :2])
    with pytest.raises(ValueError, match="z"):
        d(x, torch.zeros(2, 4, D + 1))
    with pytest.raises(ValueError, match="num_heads"):
        TemporalDiscriminator(D, channels=6, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match="patch_size"):
        TemporalDiscriminator(D, channels=8, num_layers=1, num_heads=2, patch_size=7)
    out = d(x, z)
    with pytest.raises(ValueError, match="kind"):
        discriminator_loss(out, out, "bce")
    with pytest.raises(ValueError, match="equally long"):
        feature_matching_loss(out["features"], out["features"][:1])
    with pytest.raises(ValueError, match="equal shape"):
        gradient_penalty(d, x, x[:1], z)


@pytest.mark.parametrize("preset", ["smoke", "cpu"])
def test_from_config(preset):
    from VRNN.aime_config import AIMEConfig

    cfg = AIMEConfig.preset(preset)
    d = TemporalDiscriminator.from_config(cfg)
    out = d(torch.zeros(1, 2, 3, 64, 64), torch.zeros(1, 2, cfg.latent_dim))
    assert out["frame_scores"].shape == (1, 2) and len(out["features"]) == cfg.img_disc_layers + 1


def test_rows_are_independent():
    d = make(layers=2)
    x, z = window(b=3)
    out, out1 = d(x, z), d(x[1:2], z[1:2])
    torch.testing.assert_close(out1["frame_scores"], out["frame_scores"][1:2])
    torch.testing.assert_close(out1["sequence_score"], out["sequence_score"][1:2])
