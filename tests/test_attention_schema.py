"""Attention schema (MODEL.md section 2.4): distributions, determinism, losses, gradients, learnability."""

import pytest
import torch

from VRNN.attention_schema import AttentionSchema, SlotAttention, center_of_mass, upsample_map

H, C, D, A = 12, 6, 4, 8



def make(resolution=8, slots=3, seed=0):
    torch.manual_seed(seed)
    return AttentionSchema(H, C, D, A, resolution=resolution, num_slots=slots, slot_dim=8, iterations=2)


def inputs(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, 64, 64, generator=g) * 2 - 1, torch.randn(b, H, generator=g),
            torch.randn(b, C, generator=g), torch.randn(b, D, generator=g))


@pytest.mark.parametrize("resolution", [8, 16])
def test_shapes_and_distributions(resolution):
    m = make(resolution)
    x, h, c, z = inputs()
    feats = m.encode_features(x)
    assert feats.shape == (2, resolution * resolution, 8)
    post = m.posterior_step(feats, c)
    r = resolution
    assert post["map"].shape == (2, r, r) and post["slot_maps"].shape == (2, 3, r, r)
    assert post["slot_features"].shape == (2, 3, 8) and post["center"].shape == (2, 2)
    assert post["state"].shape == (2, A)
    torch.testing.assert_close(post["slot_maps"].sum(1), torch.ones(2, r, r))
    assert (post["slot_maps"] >= 0).all() and (post["slot_maps"] <= 1).all()
    assert (post["map"] >= 0).all()
    torch.testing.assert_close(post["map"].sum((1, 2)), torch.ones(2))
    assert (post["center"].abs() < 1).all()
    prior = m.prior_step(m.initial_map(2), h, z)
    assert prior["logits"].shape == (2, r * r) and prior["map"].shape == (2, r, r)
    assert prior["motion"].shape == (2, 2)
    torch.testing.assert_close(prior["map"].sum((1, 2)), torch.ones(2))
    torch.testing.assert_close(m.initial_map(2).sum((1, 2)), torch.ones(2))
    seq = m.encode_sequence(x.reshape(1, 2, 3, 64, 64))
    torch.testing.assert_close(seq[0], feats)


def test_encoder_map_features_replace_the_pyramid():
    """encoder_widths given: features come from the encoder's stage maps (any resolution, resized to R),
    frames are refused, and maps of the wrong widths are a ValueError that names the expected ones."""
    torch.manual_seed(0)
    m = AttentionSchema(H, C, D, A, resolution=8, num_slots=3, slot_dim=8, iterations=2, encoder_widths=(4, 6, 6))
    maps = [torch.randn(2, 4, 16, 16), torch.randn(2, 6, 8, 8), torch.randn(2, 6, 4, 4)]
    feats = m.encode_encoder_maps(maps)
    assert feats.shape == (2, 64, 8)
    post = m.posterior_step(feats, torch.randn(2, C))
    torch.testing.assert_close(post["map"].sum((1, 2)), torch.ones(2))
    moved = m.encode_encoder_maps([maps[0], maps[1].flip(-1), maps[2]])
    assert not torch.allclose(moved, feats)
    with pytest.raises(ValueError, match="encode_encoder_maps"):
        m.encode_features(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"C_i = \(4, 6, 6\)"):
        m.encode_encoder_maps(maps[:2])
    with pytest.raises(ValueError, match="encode_features"):
        make().encode_encoder_maps(maps)


def test_encoder_map_features_pool_before_projecting_equals_projecting_first():
    """The larger maps are area-pooled before their 1x1 projection (cheaper); the features equal those of
    projecting every map first and then resizing it (pool down, nearest up)."""
    torch.manual_seed(0)
    m = AttentionSchema(H, C, D, A, resolution=8, num_slots=3, slot_dim=8, iterations=2, encoder_widths=(4, 6, 6))
    maps = [torch.randn(2, 4, 32, 32), torch.randn(2, 6, 8, 8), torch.randn(2, 6, 4, 4)]
    f = m.features
    fused = 0.0
    for x, lateral in zip(maps, f.laterals):
        y = lateral(x)
        y = (torch.nn.functional.adaptive_avg_pool2d(y, 8) if y.shape[-1] > 8
             else torch.nn.functional.interpolate(y, size=(8, 8), mode="nearest"))
        fused = fused + y
    reference = f.mlp(f.norm(fused.flatten(2).transpose(1, 2) + f.position(f.position_code)))
    torch.testing.assert_close(m.encode_encoder_maps(maps), reference, rtol=1e-5, atol=1e-5)


def test_prior_step_without_gradient_equals_the_training_path():
    """Without autograd on the CPU (imagination) the prior's convolutions run on channels-last maps; the
    logits equal those of the path that training takes, for a peaked previous map."""
    m = make(resolution=8)
    _, h, _, z = inputs(b=1)
    prev = torch.softmax(torch.randn(1, 64) * 3, -1).view(1, 8, 8)
    training = m.prior_step(prev, h, z, motion=False)["logits"]
    with torch.no_grad():
        inference = m.prior_step(prev, h, z, motion=False)["logits"]
    torch.testing.assert_close(inference, training.detach(), rtol=1e-5, atol=1e-6)


def test_posterior_is_deterministic():
    m = make()
    x, h, c, _ = inputs()
    a = m.posterior_step(m.encode_features(x), c)
    b = m.posterior_step(m.encode_features(x), c)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_posterior_uses_c_and_the_frame():
    m = make()
    x, h, c, _ = inputs()
    feats = m.encode_features(x)
    base = m.posterior_step(feats, c)["map"]
    assert not torch.allclose(base, m.posterior_step(feats, c + 1.0)["map"])
    assert not torch.allclose(base, m.posterior_step(m.encode_features(x.flip(-1)), c)["map"])


def test_attention_kl():
    m = make()
    x, h, c, z = inputs()
    post = m.posterior_step(m.encode_features(x), c)["map"]
    prior = m.prior_step(m.initial_map(2), h, z)["logits"]
    kl = m.attention_kl(post, prior)
    assert kl.shape == (2,) and (kl >= 0).all() and (kl > 1e-6).all()
    same = m.attention_kl(post, post.reshape(2, -1).log())
    torch.testing.assert_close(same, torch.zeros(2), atol=1e-6, rtol=0)
    # Zeros in the posterior map are fine (xlogy), and a peaked map against a uniform prior gives log(R*R).
    onehot = torch.zeros(2, 8, 8)
    onehot[:, 3, 4] = 1.0
    kl_onehot = m.attention_kl(onehot, torch.zeros(2, 64))
    assert torch.isfinite(kl_onehot).all()
    torch.testing.assert_close(kl_onehot, torch.full((2,), float(torch.log(torch.tensor(64.0)))))


def test_diversity_bounds():
    disjoint = torch.zeros(1, 2, 4, 4)
    disjoint[0, 0, :2] = 1.0
    disjoint[0, 1, 2:] = 1.0
    torch.testing.assert_close(AttentionSchema.diversity(disjoint), torch.zeros(1))
    same = torch.rand(1, 1, 4, 4).expand(1, 3, 4, 4)
    torch.testing.assert_close(AttentionSchema.diversity(same), torch.ones(1))
    mixed = torch.rand(5, 3, 4, 4)
    d = AttentionSchema.diversity(mixed)
    assert ((d >= 0) & (d <= 1 + 1e-6)).all()


def test_center_of_mass_and_upsample():
    m = torch.zeros(1, 4, 4)
    m[0, 0, 3] = 1.0  # top-right cell: x = (2*3+1)/4 - 1, y = 1/4 - 1
    torch.testing.assert_close(center_of_mass(m), torch.tensor([[0.75, -0.75]]))
    uniform = torch.full((2, 8, 8), 1 / 64)
    torch.testing.assert_close(center_of_mass(uniform), torch.zeros(2, 2))
    up = upsample_map(uniform, 32)
    assert up.shape == (2, 1, 32, 32)
    torch.testing.assert_close(up, torch.ones(2, 1, 32, 32))
    rnd = torch.rand(2, 8, 8)
    rnd = rnd / rnd.sum((1, 2), keepdim=True)
    torch.testing.assert_close(upsample_map(rnd, 64).mean((1, 2, 3)), torch.ones(2))
    torch.testing.assert_close(upsample_map(rnd, 64, mode="distribution").sum((1, 2, 3)), torch.ones(2))


def test_dynamics_target_is_detached():
    m = make()
    x, h, c, z = inputs()
    feats = m.encode_features(x)
    post_prev = m.posterior_step(feats, c)
    post = m.posterior_step(feats.flip(0), c)
    prior = m.prior_step(post_prev["map"].detach(), h, z)
    loss = m.dynamics_loss(prior["motion"], post_prev["center"], post["center"])
    assert loss.shape == (2,) and (loss > 0).all()
    loss.sum().backward()
    posterior_params = list(m.features.parameters()) + list(m.slot_attention.parameters())
    assert all(p.grad is None for p in posterior_params)
    assert m.motion_head[0].weight.grad is not None and m.motion_head[0].weight.grad.abs().sum() > 0


def test_prior_step_without_motion_gives_the_same_map():
    m = make().eval()
    _, h, _, z = inputs()
    full, lean = m.prior_step(m.initial_map(2), h, z), m.prior_step(m.initial_map(2), h, z, motion=False)
    assert set(lean) == {"logits", "map"}
    torch.testing.assert_close(lean["logits"], full["logits"])
    torch.testing.assert_close(lean["map"], full["map"])


def test_gradient_paths():
    m = make()
    x, h, c, z = inputs()
    post = m.posterior_step(m.encode_features(x), c)
    prior = m.prior_step(m.initial_map(2), h, z)
    kl = m.attention_kl(post["map"].detach(), prior["logits"]).sum()
    kl.backward(retain_graph=True)
    for p in (m.prior_in.weight, m.prior_film[0].weight, m.prior_logits.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.features.parameters())
    m.zero_grad(set_to_none=True)
    # The posterior map (through the KL) reaches the feature pyramid and the slot seeding MLP.
    m.attention_kl(post["map"], prior["logits"].detach()).sum().backward()
    assert m.features.stem[0].weight.grad.abs().sum() > 0
    assert m.slot_seed[0].weight.grad.abs().sum() > 0
    assert m.fusion_head[0].weight.grad.abs().sum() > 0


def test_diversity_gradient_reaches_slot_attention():
    m = make()
    x, h, c, _ = inputs()
    post = m.posterior_step(m.encode_features(x), c)
    m.diversity(post["slot_maps"]).sum().backward()
    assert m.slot_attention.to_q.weight.grad.abs().sum() > 0
    assert m.features.stem[0].weight.grad.abs().sum() > 0


def test_bad_shapes_raise():
    m = make()
    x, h, c, z = inputs()
    with pytest.raises(ValueError, match="frames"):
        m.encode_features(torch.zeros(2, 3, 32, 32))
    feats = m.encode_features(x)
    with pytest.raises(ValueError, match="feats"):
        m.posterior_step(feats[:, :10], c)
    with pytest.raises(ValueError, match="c must be"):
        m.posterior_step(feats, c[:1])
    with pytest.raises(ValueError, match="prev_map"):
        m.prior_step(torch.zeros(2, 4, 4), h, z)
    with pytest.raises(ValueError, match="z_prev"):
        m.prior_step(m.initial_map(2), h, z[:, :2])
    with pytest.raises(ValueError, match="resolution"):
        AttentionSchema(H, C, D, A, resolution=12)
    with pytest.raises(ValueError, match="prior_logits"):
        m.attention_kl(torch.rand(2, 8, 8), torch.rand(2, 10))


def test_posterior_learns_to_attend_to_a_bright_square(one_thread):
    """A few Adam steps move the map's mass onto the salient 16 x 16 square (uniform share: 4/64)."""
    m = make(resolution=8)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    c = torch.zeros(8, C)
    for _ in range(50):
        x, mask = -torch.ones(8, 3, 64, 64), torch.zeros(8, 8, 8)
        for i, (r, col) in enumerate(torch.randint(0, 7, (8, 2), generator=g).tolist()):
            x[i, :, 8 * r:8 * r + 16, 8 * col:8 * col + 16] = 1.0
            mask[i, r:r + 2, col:col + 2] = 1.0
        post = m.posterior_step(m.encode_features(x), c)
        mass = (post["map"] * mask).sum((1, 2))
        loss = -mass.mean() + 0.1 * m.diversity(post["slot_maps"]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert mass.mean() > 0.4  # 0.06 for the uniform map
    assert m.diversity(post["slot_maps"]).mean() < 0.5


def test_prior_learns_a_shift_and_its_motion(one_thread):
    """Maps that move one cell right each step: the prior's KL falls and the motion head finds dx = 2/R."""
    m = make(resolution=8)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    b, rows = 16, torch.arange(16)
    for step in range(60):
        pos = torch.randint(0, 7, (b, 2), generator=g)
        prev, cur = torch.zeros(b, 8, 8), torch.zeros(b, 8, 8)
        prev[rows, pos[:, 0], pos[:, 1]] = 1.0
        cur[rows, pos[:, 0], pos[:, 1] + 1] = 1.0
        prior = m.prior_step(prev, torch.zeros(b, H), torch.zeros(b, D))
        kl = m.attention_kl(cur, prior["logits"]).mean()
        dyn = m.dynamics_loss(prior["motion"], center_of_mass(prev), center_of_mass(cur)).mean()
        if step == 0:
            first_kl = kl.item()
        opt.zero_grad()
        (kl + dyn).backward()
        opt.step()
    assert kl.item() < 0.1 * first_kl
    torch.testing.assert_close(prior["motion"].mean(0).detach(), torch.tensor([0.25, 0.0]), atol=0.08, rtol=0)


@pytest.mark.parametrize("preset", ["smoke", "cpu"])
def test_from_config(preset):
    from VRNN.aime_config import AIMEConfig

    from VRNN.nvae import NVAEEncoder

    cfg = AIMEConfig.preset(preset)
    r = cfg.attention_resolution
    if cfg.attention_features == "encoder":  # the cpu preset: 1x1 projections of the encoder's stage maps
        encoder = NVAEEncoder.from_config(cfg)
        with pytest.raises(ValueError, match="needs encoder_widths"):
            AttentionSchema.from_config(cfg)
        m = AttentionSchema.from_config(cfg, encoder_widths=encoder.map_widths)
        feats = m.encode_encoder_maps(encoder(torch.zeros(1, 3, 64, 64))[1])
    else:
        m = AttentionSchema.from_config(cfg)
        feats = m.encode_features(torch.zeros(1, 3, 64, 64))
    post = m.posterior_step(feats, torch.zeros(1, cfg.context_dim))
    assert post["slot_maps"].shape == (1, cfg.num_slots, r, r)
    assert post["state"].shape == (1, cfg.attention_dim)
    prior = m.prior_step(post["map"], torch.zeros(1, cfg.hidden_dim), torch.zeros(1, cfg.latent_dim))
    assert prior["map"].shape == (1, r, r)


@pytest.mark.parametrize("center", [False, True])
def test_centred_keys_stop_one_slot_taking_every_position(center):
    """Features that share one large direction at every position (as the trained encoder's maps did): the slot
    aligned with it wins every position unless the keys are centred over positions, when the slots split the
    positions by what differs between them."""
    torch.manual_seed(0)
    sa = SlotAttention(8, iterations=1, center_keys=center)
    with torch.no_grad():
        sa.to_q.weight.copy_(3 * torch.eye(8))
        sa.to_k.weight.copy_(3 * torch.eye(8))
    g = torch.Generator().manual_seed(1)
    shared = torch.zeros(8)
    shared[0] = 1.0
    feats = 3 * shared + 0.5 * torch.randn(1, 64, 8, generator=g)
    slots = torch.stack([shared, -shared]).unsqueeze(0) + 0.1 * torch.randn(1, 2, 8, generator=g)
    _, attn = sa(feats, slots)                                    # [1, 2 slots, 64 positions]
    share = attn[0].mean(dim=-1)
    if center:
        assert 0.3 < share[0] < 0.7 and attn[0, 0].std() > 0.2
    else:
        assert attn[0, 0].min() > 0.999                           # slot 0 holds every position


def test_centred_keys_from_config():
    from VRNN.aime_config import AIMEConfig

    assert AIMEConfig.preset("cpu").slot_center_keys and not AIMEConfig().slot_center_keys
    cfg = AIMEConfig.preset("smoke", slot_center_keys=True)
    assert AttentionSchema.from_config(cfg).slot_attention.center_keys


def test_rows_are_independent():
    """No statistic is shared across the batch, so the prior can also run batched over B*T after the loop."""
    m = make()
    x, h, c, z = inputs(b=3)
    feats = m.encode_features(x)
    post, post1 = m.posterior_step(feats, c), m.posterior_step(feats[1:2], c[1:2])
    prior, prior1 = m.prior_step(post["map"], h, z), m.prior_step(post["map"][1:2], h[1:2], z[1:2])
    torch.testing.assert_close(m.encode_features(x[1:2]), feats[1:2])
    for key in ("map", "slot_maps", "center", "state"):
        torch.testing.assert_close(post1[key], post[key][1:2])
    for key in ("logits", "motion"):
        torch.testing.assert_close(prior1[key], prior[key][1:2])


def test_slot_reconstruction_explains_the_frame():
    """The slot decoder blends per-slot images with alpha masks that partition unity; trained on one
    two-colour frame its error falls far below that of predicting the frame's mean colour."""
    torch.manual_seed(0)
    m = AttentionSchema(H, C, D, A, resolution=8, num_slots=2, slot_dim=16, iterations=2, slot_reconstruction=True)
    frame = -torch.ones(1, 3, 64, 64)
    frame[:, 0, :, :32] = 1.0                                    # red left half, black right half
    c = torch.zeros(1, C)
    post = m.posterior_step(m.encode_features(frame), c)
    image, alpha = m.decode_slots(post["slot_features"])
    assert image.shape == (1, 3, 8, 8) and alpha.shape == (1, 2, 8, 8)
    torch.testing.assert_close(alpha.sum(1), torch.ones(1, 8, 8))
    mean_colour_error = (frame - frame.mean((2, 3), keepdim=True)).pow(2).mean()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(40):
        loss = m.slot_reconstruction_loss(frame, m.posterior_step(m.encode_features(frame), c)["slot_features"])
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    assert loss.item() < 0.25 * mean_colour_error.item()


def test_slot_reconstruction_needs_the_decoder():
    m = make()
    with pytest.raises(ValueError, match="slot_reconstruction=True"):
        m.decode_slots(torch.zeros(1, 3, 8))
