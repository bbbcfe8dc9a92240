"""The world model's contract: configuration, output shapes and scales, causality (MODEL.md §1), gradient
routing of the four tasks, and input validation. Smoke-sized, CPU."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from VRNN.aime_config import AIMEConfig
from VRNN.dpgmm_stickbreaking_prior_vrnn import TASK_LOSS_KEYS, DPGMMVariationalRecurrentAutoencoder
from VRNN.ema import ModelEMA

A = 3
B, T = 2, 4



pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py

def _model(seed: int = 0, **overrides) -> DPGMMVariationalRecurrentAutoencoder:
    torch.manual_seed(seed)
    return DPGMMVariationalRecurrentAutoencoder.from_config(AIMEConfig.preset("smoke", **overrides), action_dim=A)


def _batch(seed: int = 0, b: int = B, t: int = T):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (b, t, 3, 64, 64), generator=g, dtype=torch.uint8)
    actions = torch.rand(b, t, A, generator=g) * 2 - 1
    return obs, actions


@pytest.fixture(scope="module")
def model():
    return _model()


# ------------------------------------------------------------------------------------------------ config
def test_config_resolution_and_public_keywords():
    import inspect

    public = {k: v.default for k, v in inspect.signature(DPGMMVariationalRecurrentAutoencoder).parameters.items()
              if k not in ("device", "config")}
    assert list(public)[:10] == ["max_components", "input_dim", "latent_dim", "hidden_dim", "attention_dim",
                                 "action_dim", "sequence_length", "img_perceiver_channels", "img_disc_layers",
                                 "disc_num_heads"]
    paper = AIMEConfig.preset("paper")
    assert all(getattr(paper, k) == v for k, v in public.items())  # keyword defaults = the paper sizes
    smoke = AIMEConfig.preset("smoke")
    m = DPGMMVariationalRecurrentAutoencoder(latent_dim=5, action_dim=2, config=smoke)
    assert m.config.latent_dim == 5 and m.config.action_dim == 2 and m.action_dim == 2
    assert m.config.hidden_dim == smoke.hidden_dim  # keyword left at its default: the config's value
    assert m.config.replace(latent_dim=smoke.latent_dim, action_dim=smoke.action_dim) == smoke
    m2 = DPGMMVariationalRecurrentAutoencoder.from_config(smoke, action_dim=7)
    assert m2.config == smoke.replace(action_dim=7)
    with pytest.raises(ValueError, match="AIMEConfig"):
        DPGMMVariationalRecurrentAutoencoder(config={"latent_dim": 3})


def test_forward_shapes_and_loss_scale(model):
    obs, actions = _batch()
    losses, out = model.compute_total_loss(obs, actions)
    c = model.config
    k, r, s = c.max_components, c.attention_resolution, c.num_slots
    expected = {
        "reconstructions": (B, T, 3, 64, 64), "latents": (B, T, c.latent_dim), "z_means": (B, T, c.latent_dim),
        "z_logvars": (B, T, c.latent_dim), "hidden_states": (B, T, c.hidden_dim), "context": (B, T, c.context_dim),
        "pi": (B, T, k), "attention_maps": (B, T, r, r), "attention_prior_maps": (B, T, r, r),
        "slot_maps": (B, T, s, r, r), "recon_nats": (B, T), "kl_z": (B, T), "kl_sticks": (B, T),
        "kl_alpha": (B, T), "cluster_entropy": (B, T), "attention_kl": (B, T), "K_eff": (B, T),
        "prior_means": (B, T, k, c.latent_dim), "stick_a": (B, T, k - 1),
    }
    for key, shape in expected.items():
        assert tuple(out[key].shape) == shape, key
    assert all(isinstance(v, torch.Tensor) for v in out.values())
    assert bool((out["reconstructions"].abs() <= 1).all())
    assert torch.allclose(out["pi"].sum(-1), torch.ones(B, T), atol=1e-5)
    assert torch.allclose(out["attention_maps"].sum((-2, -1)), torch.ones(B, T), atol=1e-5)
    for key in TASK_LOSS_KEYS + ("recon_loss", "kl_z", "kl_sticks", "kl_alpha", "hierarchical_kl",
                                 "cluster_entropy", "attention_kl", "attention_dynamics_loss",
                                 "attention_diversity", "gram_enc_loss", "bits_per_dim", "K_eff"):
        assert losses[key].dim() == 0 and bool(torch.isfinite(losses[key])), key
    dims = 3 * 64 * 64
    losses = {k: v.detach() for k, v in losses.items()}
    assert float(losses["recon_loss"]) == pytest.approx(float(out["recon_nats"].mean()) / dims, rel=1e-5)
    assert float(losses["hierarchical_kl"]) == pytest.approx(float(losses["kl_sticks"] + losses["kl_alpha"]),
                                                             rel=1e-5)
    nelbo = losses["recon_loss"] + losses["kl_z"] + losses["kl_sticks"] + losses["kl_alpha"]
    assert float(losses["bits_per_dim"]) == pytest.approx(float(nelbo) / math.log(2), rel=1e-5)
    # Each weight applied once: the ELBO task equals its documented combination.
    # KL_z enters through its balanced, free-nats-clipped form (config.kl_prior_scale / kl_posterior_scale).
    expected_total = (losses["recon_loss"] + (losses["kl_z_balanced"] + losses["hierarchical_kl"])
                      - c.entropy_weight * losses["cluster_entropy"])
    assert float(losses["total_vae_loss"]) == pytest.approx(float(expected_total), rel=1e-5)
    # An untrained model is near or above the uniform 8 bits/dim, and far below absurd values.
    assert 4.0 < float(losses["bits_per_dim"]) < 14.0


def test_loss_weights_come_from_the_config_only():
    import inspect

    keywords = set(inspect.signature(DPGMMVariationalRecurrentAutoencoder.compute_total_loss).parameters)
    assert not keywords & {"entropy_weight", "lambda_recon", "lambda_att_dyn", "lambda_gram", "lambda_div"}
    obs, actions = _batch()
    heavy = _model(lambda_recon=3.0)
    light = _model(lambda_recon=1.0)
    torch.manual_seed(3)
    lh, _ = heavy.compute_total_loss(obs, actions, beta=0.0, adversarial_weight=0.0)
    torch.manual_seed(3)
    ll, _ = light.compute_total_loss(obs, actions, beta=0.0, adversarial_weight=0.0)
    assert float(lh["recon_loss"]) == pytest.approx(float(ll["recon_loss"]), rel=1e-5)
    gap = float(lh["total_vae_loss"]) - float(ll["total_vae_loss"])
    assert gap == pytest.approx(2.0 * float(ll["recon_loss"]), rel=1e-4)


def test_loss_weights_scale_their_terms(model):
    obs, actions = _batch()
    torch.manual_seed(3)
    l1, _ = model.compute_total_loss(obs, actions, beta=1.0, adversarial_weight=1.0)
    torch.manual_seed(3)
    l2, _ = model.compute_total_loss(obs, actions, beta=0.0, adversarial_weight=0.0)
    # beta=0 removes the KLs; what is left is recon - entropy_weight * H(pi), with the config's weight.
    expected = float(l2["recon_loss"]) - model.config.entropy_weight * float(l2["cluster_entropy"])
    assert float(l2["total_vae_loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(l2["adversarial_loss"]) == 0.0 and float(l1["adversarial_loss"]) != 0.0
    assert float(l2["attention_loss"]) < float(l1["attention_loss"]) + 1e-6


# ------------------------------------------------------------------------------------------------ causality
def _run(model, obs, actions, seed=0, is_first=None):
    torch.manual_seed(seed)
    return model.forward_sequence(obs, actions, is_first=is_first, generator=torch.Generator().manual_seed(seed))


def test_causality_prior_attention_prior_and_h_ignore_present_and_future(model):
    model.eval()  # no codebook updates; same noise through the seeded generator
    obs, actions = _batch(1)
    obs = obs.float() / 127.5 - 1
    k = 2
    perturbed = obs.clone()
    perturbed[:, k:] = torch.rand_like(perturbed[:, k:]) * 2 - 1
    base, pert = _run(model, obs, actions), _run(model, perturbed, actions)
    at_or_before = ("hidden_states", "prior_means", "prior_logvars", "stick_a", "stick_b", "alpha_shape",
                    "alpha_rate", "attention_prior_maps", "pi", "kl_sticks", "kl_alpha")
    for key in at_or_before:  # functions of x_{<t}: unchanged at t <= k
        assert torch.equal(base[key][:, :k + 1], pert[key][:, :k + 1]), key
    for key in ("z_means", "context", "attention_maps", "recon_nats", "kl_z"):  # x_{<=t}: unchanged at t < k
        assert torch.equal(base[key][:, :k], pert[key][:, :k]), key
    # The posterior and the context at t = k do see x_k.
    assert not torch.allclose(base["z_means"][:, k], pert["z_means"][:, k])
    assert not torch.allclose(base["context"][:, k], pert["context"][:, k])
    # And x_k reaches h_{k+1}, hence the prior at k + 1.
    assert not torch.allclose(base["hidden_states"][:, k + 1], pert["hidden_states"][:, k + 1])
    model.train()


def test_actions_enter_after_their_frame(model):
    model.eval()
    obs, actions = _batch(2)
    changed = actions.clone()
    changed[:, 1] = -actions[:, 1]
    base, pert = _run(model, obs, actions), _run(model, obs, changed)
    # a_1 (taken after x_1) first reaches h_2.
    assert torch.equal(base["hidden_states"][:, :2], pert["hidden_states"][:, :2])
    assert not torch.allclose(base["hidden_states"][:, 2], pert["hidden_states"][:, 2])
    model.train()


def test_is_first_resets_the_state(model):
    model.eval()
    obs, actions = _batch(3)
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[0, 2] = True
    out = _run(model, obs, actions, is_first=is_first)
    h1 = out["hidden_states"][:, 0]
    assert torch.allclose(out["hidden_states"][0, 2], h1[0])       # back to the learned h_1
    assert not torch.allclose(out["hidden_states"][1, 2], h1[1])   # the other row carries on
    model.train()


# ------------------------------------------------------------------------------------------------ gradients
def test_every_task_reaches_its_modules_and_nothing_is_detached():
    model = _model(1)
    with torch.no_grad():  # open the residual gates (initialised at 0, which zeroes their bodies' gradients)
        for name, p in model.named_parameters():
            if name.endswith(".gate"):
                p.fill_(0.1)
    ema = ModelEMA(model, 0.9)
    with torch.no_grad():  # make the EMA encoder differ so that Gram anchoring has something to pull
        for p in model.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    obs, actions = _batch(4)
    losses, _ = model.compute_total_loss(obs, actions, ema_model=ema.module)
    assert float(losses["gram_enc_loss"]) > 0
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("discriminator.")]
    names, params = [n for n, _ in named], [p for _, p in named]
    reached = {}
    for key in TASK_LOSS_KEYS:
        grads = torch.autograd.grad(losses[key], params, allow_unused=True, retain_graph=True)
        reached[key] = {n for n, g in zip(names, grads) if g is not None and float(g.abs().sum()) > 0}

    def hits(key, prefix):
        return any(n.startswith(prefix) for n in reached[key])

    assert hits("total_vae_loss", "perceiver.tokenizer.")          # ELBO trains the Perceiver via c_t
    assert hits("total_vae_loss", "perceiver.temporal.")
    for prefix in ("encoder.", "decoder.", "cell.prior.", "cell.posterior.", "cell.lstm.", "cell.attention.",
                   "cell.lstm.h0"):
        assert hits("total_vae_loss", prefix), prefix
    assert hits("perceiver_loss", "perceiver.tokenizer.") and hits("perceiver_loss", "perceiver.decoder.")
    assert not hits("perceiver_loss", "decoder.")
    assert hits("attention_loss", "cell.attention.prior_") and hits("attention_loss", "cell.attention.motion_head")
    assert hits("attention_loss", "cell.attention.features.")
    assert hits("adversarial_loss", "decoder.")                      # the adversarial task reaches the decoder
    # Nothing silently detached: the four tasks together reach every generator parameter.
    unreached = [n for n in names if not any(n in r for r in reached.values())]
    assert not unreached, unreached
    # Gram anchoring pulls the encoder (only through the ELBO task).
    g = torch.autograd.grad(losses["gram_enc_loss"], list(model.encoder.parameters()), allow_unused=True)
    assert any(x is not None and float(x.abs().sum()) > 0 for x in g)


def test_discriminator_loss_trains_only_the_discriminator(model):
    obs, actions = _batch(5)
    _, out = model.compute_total_loss(obs, actions)
    d = model.discriminator_loss(obs, out)
    assert {"disc_loss", "real_score", "fake_score"} <= set(d)
    gen = model.generator_parameters()
    grads = torch.autograd.grad(d["disc_loss"], gen + model.discriminator_parameters(), allow_unused=True)
    assert all(g is None for g in grads[:len(gen)])
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads[len(gen):])
    ids = {id(p) for p in gen}
    assert not ids & {id(p) for p in model.discriminator_parameters()}
    assert len(gen) + len(model.discriminator_parameters()) == len(list(model.parameters()))


def test_wgan_gp_discriminator_loss():
    model = _model(2, disc_loss="wgan-gp")
    obs, actions = _batch(6)
    _, out = model.compute_total_loss(obs, actions)
    d = model.discriminator_loss(obs, out)
    assert "gradient_penalty" in d and bool(torch.isfinite(d["disc_loss"]))
    d["disc_loss"].backward()


def test_parameter_groups_cover_generator_once(model):
    groups = model.parameter_groups(1e-3, 0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.generator_parameters()}
    by_name = {g["name"]: g for g in groups}
    assert by_name["perceiver"]["lr"] == pytest.approx(1.5e-3)
    assert by_name["attention"]["lr"] == pytest.approx(1.2e-3)
    assert by_name["initial_state/no_decay"]["lr"] == pytest.approx(1e-4)
    for g in groups:
        if g["name"].endswith("no_decay"):
            assert g["weight_decay"] == 0.0 and all(p.dim() < 2 or g["name"].startswith("initial") for p in g["params"])
        else:
            assert g["weight_decay"] == 0.01 and all(p.dim() >= 2 for p in g["params"])
    torch.optim.AdamW(groups)  # accepted as is


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("bad,match", [
    (lambda o, a: (o[0], a), "shape"),                                          # rank 4
    (lambda o, a: (o[:, :, :2], a), "shape"),                                   # 2 channels
    (lambda o, a: (o.float(), a), r"\[-1, 1\]"),                                # float frames in [0, 255]
    (lambda o, a: (o.to(torch.int32), a), "dtype"),
    (lambda o, a: (torch.full(o.shape, float("nan")), a), "NaN"),
    (lambda o, a: (o[..., :32, :32], a), "input_dim"),                          # wrong size
    (lambda o, a: (o, a[..., :2]), "A=3"),                                      # action size
    (lambda o, a: (o, a[:, :3]), "T=4"),                                        # T mismatch
    (lambda o, a: (o, a[:1]), "B=2"),                                           # B mismatch
    (lambda o, a: (o, torch.full_like(a, float("inf"))), "NaN or inf"),
])
def test_bad_inputs_raise_clear_errors(model, bad, match):
    obs, actions = _batch()
    o, a = bad(obs, actions)
    with pytest.raises(ValueError, match=match):
        model.forward_sequence(o, a)


def test_resize_only_when_input_dim_says_so():
    model = _model(0, input_dim=32)
    obs, actions = _batch(b=1, t=2)
    small = torch.nn.functional.interpolate(obs.float().flatten(0, 1), size=(32, 32)).view(1, 2, 3, 32, 32) / 127.5 - 1
    with pytest.warns(UserWarning, match="resizing"):
        out = model.forward_sequence(small, actions)
    assert out["reconstructions"].shape == (1, 2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.forward_sequence(obs, actions)  # 64 x 64 frames need no resize and raise no warning


@pytest.mark.parametrize("overrides", [
    {"likelihood": "gaussian"},
    {"likelihood": "mdl"},
    {"max_components": 1},
    {"use_perceiver": False, "use_attention": False, "use_discriminator": False},
    {"free_nats": 0.0, "kl_prior_scale": 1.0, "kl_posterior_scale": 1.0},
    {"use_spectral_norm": True, "use_squeeze_excitation": True},
    {"random_stick_order": True, "alpha_samples": 0, "lstm_layers": 2},
    {"lambda_slot_recon": 1.0},
    {"perceiver_features": "encoder", "attention_features": "encoder"},
    {"posterior_side_inputs": False},
    {"perceiver_downsample": 8, "perceiver_features": "encoder"},
    {"perceiver_downsample": 8},
    {"residual_cell_max_side": 8, "decoder_upsample": "transposed"},
    {"residual_cell_max_side": 0},
])
def test_config_variants_train(overrides):
    model = _model(5, **overrides)
    obs, actions = _batch(7, t=2)
    losses, _ = model.compute_total_loss(obs, actions)
    assert all(bool(torch.isfinite(losses[k])) for k in TASK_LOSS_KEYS)
    assert 4.0 < losses["bits_per_dim"].item() < 14.0
    sum(losses[k] for k in TASK_LOSS_KEYS).backward()
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    if overrides.get("likelihood") == "gaussian":
        assert model.likelihood.log_scale.grad is not None
    if overrides.get("lambda_slot_recon"):
        assert losses["attention_slot_recon"].item() > 0
        assert model.cell.attention.slot_decoder_out[-1].weight.grad.abs().sum() > 0
    else:
        assert float(losses["attention_slot_recon"]) == 0.0


def test_encoder_features_feed_perceiver_and_attention_but_their_tasks_leave_the_encoder_alone():
    """perceiver_features / attention_features = "encoder": the Perceiver's tokenizer and the attention
    posterior read the encoder's maps (no pyramid, no strided tokenizer convs), detached, so neither task's
    gradient reaches the encoder, while both still depend on the frame."""
    model = _model(3, perceiver_features="encoder", attention_features="encoder")
    assert not hasattr(model.cell.attention.features, "stem")
    assert model.perceiver.tokenizer.encoder.net[0].kernel_size == (1, 1)
    obs, actions = _batch(4)
    losses, _ = model.compute_total_loss(obs, actions)
    encoder = list(model.encoder.parameters())
    for task in ("perceiver_loss", "attention_loss"):
        grads = torch.autograd.grad(losses[task], encoder, allow_unused=True, retain_graph=True)
        assert all(g is None or float(g.abs().max()) == 0.0 for g in grads), task
    model.eval()
    with torch.no_grad():
        x = model._prepare_observations(obs)
        ctx = model.extract_context(x)
        changed = x.clone()
        changed[:, 1:] = -changed[:, 1:]
        ctx2 = model.extract_context(changed)
    assert torch.allclose(ctx[:, 0], ctx2[:, 0], atol=1e-5) and not torch.allclose(ctx[:, 1], ctx2[:, 1], atol=1e-4)


def test_task_parameters_partition_what_each_task_trains(model):
    """The aggregator balances only parameters that several tasks train: the decoder (ELBO, adversarial),
    the Perceiver (ELBO, its own task) and the attention schema (ELBO, attention task)."""
    tasks = model.task_parameters()
    ids = {k: {id(p) for p in v} for k, v in tasks.items()}
    gen = {id(p) for p in model.generator_parameters()}
    assert ids["total_vae_loss"] == gen
    assert ids["perceiver_loss"] == {id(p) for p in model.perceiver.parameters()}
    assert ids["attention_loss"] == {id(p) for p in model.cell.attention.parameters()}
    assert ids["adversarial_loss"] == {id(p) for p in model.decoder.parameters()}
    # The attention task reads the state detached: its graph does not reach the LSTM or the encoder.
    obs, actions = _batch(4)
    losses, _ = model.compute_total_loss(obs, actions)
    own = [p for n, p in model.named_parameters() if n.startswith(("cell.lstm.", "encoder.", "cell.posterior."))]
    grads = torch.autograd.grad(losses["attention_loss"], own, allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)


def test_imagination_reads_only_the_recurrent_state(model, monkeypatch):
    """After the observed frames, imagination runs neither the Perceiver nor the encoders: the imagined
    frames are decoded from (z_t, h_t), so no position beyond the context reaches the Perceiver."""
    obs, actions = _batch(6, t=3)
    calls = []
    real = model.perceiver.extract_context
    monkeypatch.setattr(model.perceiver, "extract_context",
                        lambda video, features=None: calls.append(video.shape[1]) or real(video, features))
    out = model.generate_future_sequence(obs[:, :2], actions[:, :2], torch.zeros(B, 5, A), temperature=0.0)
    assert out["frames"].shape == (B, 5, 3, 64, 64)
    assert calls == [2]  # the context once, never the imagined frames


def test_imagination_runs_every_module_in_eval_mode_and_restores_the_mode():
    """generate_future_sequence runs in eval mode and leaves the model's mode as it found it: a training
    model trains again afterwards; a model in eval mode with one submodule left training (which the rollout
    skips switching only when nothing is training) still imagines with that submodule in eval mode."""
    model = _model()
    obs, actions = _batch(11, t=3)
    seen = []
    model.decoder.register_forward_pre_hook(lambda module, _inputs: seen.append(module.training))
    future = torch.zeros(B, 2, A)
    model.train()
    model.generate_future_sequence(obs[:, :2], actions[:, :2], future, temperature=0.0)
    assert seen == [False] and all(m.training for m in model.modules())
    model.eval()
    model.decoder.train()
    model.generate_future_sequence(obs[:, :2], actions[:, :2], future, temperature=0.0)
    assert seen == [False, False] and not any(m.training for m in model.modules())
    model.generate_future_sequence(obs[:, :2], actions[:, :2], future, temperature=0.0)
    assert seen == [False, False, False] and not any(m.training for m in model.modules())


def test_imagination_returns_ordinary_tensors_and_the_decoder_the_same_values_without_autograd(model):
    """generate_future_sequence runs under torch.inference_mode but returns ordinary tensors (usable in
    autograd and in place); the decoder's channels-last path without autograd gives the values of the
    autograd path, as a contiguous tensor."""
    obs, actions = _batch(10, t=3)
    out = model.generate_future_sequence(obs[:, :2], actions[:, :2], torch.zeros(B, 4, A), temperature=0.0)
    for key, value in out.items():
        assert not value.is_inference(), key
    out["frames"].mul_(1.0)                                        # in place works outside inference mode
    w = torch.ones((), requires_grad=True)
    (out["frames"] * w).sum().backward()                           # and autograd
    x = torch.randn(6, model.config.latent_dim + model.config.hidden_dim)
    maps = torch.softmax(torch.randn(6, model.config.attention_resolution ** 2), -1)
    maps = maps.view(6, model.config.attention_resolution, model.config.attention_resolution)
    model.eval()
    with torch.no_grad():
        fast = model.decoder(x, maps)
    with torch.enable_grad():
        ref = model.decoder(x, maps).detach()
    model.train()
    assert fast.is_contiguous()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side_inputs", [False, True])
def test_imagination_attends_to_the_last_context_frame_only(side_inputs):
    """attention_last_only (what generate_future_sequence asks for): the attention posterior runs on the last
    frame, and the final state (h, z, A_T) equals that of filtering with every frame's attention; when the
    posterior reads s_t (posterior_side_inputs) every frame's attention is still computed."""
    model = _model(1, posterior_side_inputs=side_inputs, attention_features="encoder").eval()
    obs, actions = _batch(9, t=3)
    x, a = model._prepare_observations(obs), model._prepare_actions(actions, B, 3)
    with torch.no_grad():
        _, full, extras_full = model._observe_loop(x, a, None, None, perceiver_loss=False, posterior_mean=True)
        _, last, extras_last = model._observe_loop(x, a, None, None, perceiver_loss=False, posterior_mean=True,
                                                   attention_last_only=True)
    for name in ("h", "z_prev", "map_prev", "center_prev"):
        torch.testing.assert_close(getattr(last, name), getattr(full, name))
    assert extras_last["attention"]["map"].shape[1] == (3 if side_inputs else 1)


def test_observation_reaches_the_state_only_through_z(model):
    """RSSM-style state (docs/MODEL_CHANGES.md): with z_t held fixed, changing x_t leaves h_{t+1} unchanged."""
    obs, actions = _batch(8, t=3)
    x = model._prepare_observations(obs)
    a = model._prepare_actions(actions, B, 3)
    with torch.no_grad():
        steps, _, _ = model._observe_loop(x, a, None, None, perceiver_loss=False, posterior_mean=True)
        state = model.cell.initial_state(B)
        hs = []
        for i in range(3):
            hs.append(state.h)
            state = model.cell.advance(state, steps["z"][:, i], a[:, i])
    torch.testing.assert_close(torch.stack(hs, 1), steps["h"])


def test_posterior_without_side_inputs_reads_frame_and_state_only():
    """posterior_side_inputs=False (the RSSM posterior): q(z_t) reads [f_t; h_t] only, so moving the
    Perceiver's context c_t leaves every z_t unchanged."""
    model = _model(2, posterior_side_inputs=False)
    assert model.cell.posterior.net[0].in_features == model.encoder.feature_dim + model.config.hidden_dim
    obs, actions = _batch(3)
    x = model._prepare_observations(obs)
    a = model._prepare_actions(actions, B, T)
    with torch.no_grad():
        ref, _, _ = model._observe_loop(x, a, None, None, perceiver_loss=False, posterior_mean=True)
        model.perceiver.temporal.register_forward_hook(lambda _m, _i, out: out + 100.0)
        moved, _, _ = model._observe_loop(x, a, None, None, perceiver_loss=False, posterior_mean=True)
    torch.testing.assert_close(ref["z_mean"], moved["z_mean"])


def test_recurrent_core_runs_in_float32_under_bf16_autocast(model, monkeypatch):
    """Under the trainer's bf16 autocast the LSTM, the posterior head and the DPGMM prior run with autocast
    off (docs/MODEL_CHANGES.md section 14), while the encoder around them stays in bf16."""
    seen: dict[str, list[bool]] = {"lstm": [], "posterior": [], "prior": [], "encoder": []}
    for name, module in (("lstm", model.cell.lstm), ("posterior", model.cell.posterior),
                         ("prior", model.cell.prior), ("encoder", model.encoder)):
        module.register_forward_pre_hook(lambda _m, _i, key=name: seen[key].append(torch.is_autocast_enabled("cpu")))
    monkeypatch.setattr(model.cell.lstm, "step", lambda *a, real=model.cell.lstm.step: (
        seen["lstm"].append(torch.is_autocast_enabled("cpu")), real(*a))[1])
    obs, actions = _batch(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, outputs = model.compute_total_loss(obs, actions)
    assert seen["encoder"] and all(seen["encoder"])
    for key in ("lstm", "posterior", "prior"):
        assert seen[key] and not any(seen[key]), key
    assert outputs["hidden_states"].dtype == torch.float32 and torch.isfinite(losses["total_vae_loss"])


def test_overshooting_imagines_the_rest_of_the_window_from_the_context_alone(monkeypatch):
    """overshoot_weight > 0 adds the open-loop term (docs/MODEL_CHANGES.md 16): the frames after
    overshoot_context are decoded from a prior rollout that never sees them (changing them changes only
    the targets), its gradient reaches the prior's means and the LSTM, and weight 0 adds nothing."""
    obs, actions = _batch(5, b=2, t=6)
    plain = _model(3)
    losses, _ = plain.compute_total_loss(obs, actions)
    assert float(losses["open_loop_recon"]) == 0.0

    model = _model(3, overshoot_weight=0.5, overshoot_context=3).eval()   # eval: the VQ codebook stays put
    decoded: list[torch.Tensor] = []
    real = model.likelihood.log_prob
    def recording(p, x, detach_scale=False):
        decoded.append(p.detach().clone())
        return real(p, x, detach_scale)

    monkeypatch.setattr(model.likelihood, "log_prob", recording)

    def run(frames):
        decoded.clear()
        out, _ = model.compute_total_loss(frames, actions, generator=torch.Generator().manual_seed(0))
        return out, decoded[-1]            # the last decode is the open-loop one: [B * (T - 3), ...]

    losses, open_params = run(obs)
    assert open_params.shape[0] == 2 * 3 and float(losses["open_loop_recon"]) > 0
    total = losses["total_vae_loss"]
    without = total - 0.5 * losses["open_loop_recon"]
    assert torch.isfinite(total) and float(total) > float(without)
    changed = obs.clone()
    changed[:, 3:] = 255 - changed[:, 3:]  # the frames it predicts, not the context
    _, open_params_changed = run(changed)
    torch.testing.assert_close(open_params, open_params_changed)

    model.zero_grad()
    losses["open_loop_recon"].backward()
    for name, module in (("prior", model.cell.prior), ("lstm", model.cell.lstm), ("decoder", model.decoder)):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(bool(g.abs().sum() > 0) for g in grads), name


def _overshoot_pair(switch: str) -> dict[bool, tuple[DPGMMVariationalRecurrentAutoencoder, dict]]:
    """The same overshooting model (smoke preset, 3 of 6 frames observed) with config field ``switch`` True
    and False: {value: (model in eval mode, its losses on one batch)}."""
    obs, actions = _batch(5, b=2, t=6)
    pair = {}
    for value in (True, False):
        torch.manual_seed(0)
        model = _model(3, overshoot_weight=0.5, overshoot_context=3, **{switch: value}).eval()
        pair[value] = model, model.compute_total_loss(obs, actions, generator=torch.Generator().manual_seed(0))[0]
    return pair


def _reached(params) -> bool:
    """Whether any of ``params`` has a non-zero gradient."""
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)


def test_overshoot_attention_grad_off_keeps_the_loss_and_trains_no_attention_through_the_rollout():
    """overshoot_attention_grad=False (docs/MODEL_CHANGES.md 19): the open-loop term has the same value, its
    gradient still reaches the prior, the LSTM and the decoder, but not the attention schema (with it on,
    the attention prior's convolutions are trained through the rollout's maps)."""
    pair = _overshoot_pair("overshoot_attention_grad")
    torch.testing.assert_close(pair[True][1]["open_loop_recon"], pair[False][1]["open_loop_recon"])
    for grad, (model, losses) in pair.items():
        model.zero_grad()
        losses["open_loop_recon"].backward()
        assert all(_reached(m.parameters()) for m in (model.cell.prior, model.cell.lstm, model.decoder))
        assert _reached(model.cell.attention.prior_in.parameters()) == grad


def test_overshoot_decoder_grad_off_keeps_the_loss_and_trains_the_rollout_not_the_decoder():
    """overshoot_decoder_grad=False: the open-loop term has the same value and its gradient still reaches the
    prior and the LSTM through the decoder, but not the decoder's weights nor the likelihood's scale; the
    teacher-forced reconstruction still trains both."""
    pair = _overshoot_pair("overshoot_decoder_grad")
    torch.testing.assert_close(pair[True][1]["open_loop_recon"], pair[False][1]["open_loop_recon"])
    for grad, (model, losses) in pair.items():
        model.zero_grad()
        losses["open_loop_recon"].backward(retain_graph=True)
        assert _reached(model.cell.prior.parameters()) and _reached(model.cell.lstm.parameters())
        assert _reached(model.decoder.parameters()) == grad
        assert _reached(model.likelihood.parameters()) == grad
        model.zero_grad()
        losses["recon_loss"].backward()
        assert _reached(model.decoder.parameters()) and _reached(model.likelihood.parameters())


def test_decoder_inference_path_equals_the_training_path():
    """Without gradients on the CPU in float32, the decoder's one-channel FiLM convolutions run as an im2col
    matmul (nvae._one_channel_conv3x3); the output equals the convolution path's (with gradients), and the
    matmul equals F.conv2d on its own, for a peaked attention map."""
    import torch.nn.functional as F

    from VRNN.nvae import NVAEDecoder, _one_channel_conv3x3
    torch.manual_seed(0)
    dec = NVAEDecoder(20, 3, channels=4, image_size=32, use_se=False, upsample="transposed")
    x = torch.randn(3, 20)
    att = torch.softmax(torch.randn(3, 8 * 8) * 3, -1).view(3, 8, 8)
    with torch.no_grad():
        fast = dec(x, att)
    assert torch.allclose(fast, dec(x, att).detach(), atol=1e-5)
    m, w, b = torch.rand(2, 1, 16, 16), torch.randn(6, 1, 3, 3), torch.randn(6)
    assert torch.allclose(_one_channel_conv3x3(m, w, b), F.conv2d(m, w, b, padding=1), atol=1e-6)
