"""evaluate / make_evaluation_plots / write_report with the real model on the smoke preset, and the scoring
core (VRNN/eval_scoring.py) on hand-made predictors: a constant mean frame, copy-last-frame and an oracle.

The data are synthetic windows built here: a coloured square moving over a textured background, its
velocity given by the actions (so frames and actions are related as in the real data).
"""

import json
import math
import re

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from VRNN.advanced_metrics import psnr_per_image, ssim_per_image
from VRNN.aime_config import AIMEConfig
from VRNN.dpgmm_stickbreaking_prior_vrnn import DPGMMVariationalRecurrentAutoencoder
from VRNN.ema import ModelEMA
from VRNN.eval_scoring import (
    BASELINES,
    MOVING_THRESHOLD,
    _beats_from,
    jackknife_ratio_of_means,
    mean_and_se,
    moving_psnr_per_image,
    score_open_loop,
    spread_ratio,
    summarize_open_loop,
    verdict,
)
from VRNN.evaluation import (
    PSNR_CAP_DB,
    compute_mean_frame,
    eval_sequence_length,
    evaluate,
    evaluation_windows,
    load_or_compute_mean_frame,
    make_evaluation_plots,
    scalar_metrics,
    write_report,
)

ACTION_DIM = 2
HORIZON_KEYS = tuple(f"{p}_{m}{se}" for p in ("pred", "copy_last", "context_mean", "train_mean")
                     for m in ("psnr", "moving_psnr", "ssim") for se in ("", "_se")) + (
    "action_shuffle_ratio", "action_shuffle_ratio_se", "moving_fraction")
SCALAR_KEYS = ("recon_psnr", "recon_ssim", "bits_per_dim", "kl_z", "kl_sticks", "kl_alpha", "recon_loss",
               "neg_elbo_nats_per_dim", "K_eff", "perceiver_accuracy", "pred_psnr_mean", "copy_last_psnr_mean",
               "context_mean_psnr_mean", "train_mean_psnr_mean", "pred_moving_psnr_mean", "recon_psnr_se",
               "bits_per_dim_se", "kl_z_nats_per_frame", "kl_z_nats_per_frame_se", "kl_z_nats_per_latent_dim",
               "z_swap_gap_nats_per_frame", "z_swap_gap_nats_per_frame_se", "h_swap_gap_nats_per_frame",
               "h_swap_gap_nats_per_frame_se", "recon_nats_per_frame", "z_mean_spread", "z_posterior_std",
               "z_spread_ratio", "z_spread_ratio_se", "perceiver_copy_accuracy", "perceiver_accuracy_se",
               "perceiver_accuracy_gain", "action_shuffle_ratio_mean", "action_shuffle_ratio_mean_se")


class MovingSquares(Dataset):
    """Windows [L,3,64,64] in [-1,1] of a square moving by its action (pixels per step); static if asked."""

    def __init__(self, n: int, length: int, seed: int = 0, static: bool = False):
        g = torch.Generator().manual_seed(seed)
        yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        self.items = []
        for _ in range(n):
            background = 0.3 * torch.sin(xx / 5 + torch.rand(1, generator=g) * 6).expand(3, 64, 64) - 0.5
            colour = torch.rand(3, 1, 1, generator=g) * 2 - 1
            actions = torch.zeros(length, ACTION_DIM) if static else torch.rand(length, ACTION_DIM, generator=g) * 2 - 1
            pos = torch.rand(2, generator=g) * 30 + 10
            frames = []
            for t in range(length):
                inside = ((xx - pos[0]).abs() < 6) & ((yy - pos[1]).abs() < 6)
                frames.append(torch.where(inside, colour, background))
                pos = (pos + 4 * actions[t]).clamp(6, 57)
            self.items.append({"observations": torch.stack(frames), "actions": actions,
                               "rewards": torch.zeros(length), "is_first": torch.arange(length) == 0})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.fixture(scope="module")
def config():
    torch.set_num_threads(1)
    return AIMEConfig.preset("smoke", eval_horizon=3, batch_size=2, eval_windows=4, action_dim=ACTION_DIM)


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    return DPGMMVariationalRecurrentAutoencoder.from_config(config, action_dim=ACTION_DIM)


@pytest.fixture(scope="module")
def data(config):
    return MovingSquares(5, eval_sequence_length(config))


@pytest.fixture(scope="module")
def train_mean(config):
    """The mean frame of a separate 'training' set of the same kind of windows."""
    return compute_mean_frame(MovingSquares(6, eval_sequence_length(config), seed=1))


@pytest.fixture(scope="module")
def result(model, data, config, train_mean):
    return evaluate(model, data, config, "cpu", mean_frame=train_mean, split="test")


def test_keys_finite_and_json(result, config):
    assert result["num_windows"] == config.eval_windows
    assert result["horizon"] == config.eval_horizon and result["context_frames"] == config.eval_context_frames
    for key in HORIZON_KEYS:
        assert len(result[key]) == config.eval_horizon, key
        assert all(math.isfinite(v) for v in result[key]), key
    for key in SCALAR_KEYS:
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert len(result["component_usage"]) == config.max_components
    assert sum(result["component_usage"]) == pytest.approx(1.0, abs=1e-4)
    assert 1 <= result["components_used"] <= config.max_components
    assert 0.0 <= result["perceiver_accuracy"] <= 1.0
    assert -1.0 <= result["recon_ssim"] <= 1.0
    assert result["used_ema"] is False and result["split"] == "test"
    assert result["mean_frame_source"] == "training split" and result["moving_threshold"] == MOVING_THRESHOLD
    assert result["verdict"]["code"] in ("beats_every_baseline", "no_better_than_constant", "partial")
    assert result["verdict"]["text"] and set(result["verdict"]["beats_from"]) == set(BASELINES)
    for base in BASELINES:
        assert len(result["gaps"][base]["psnr"]) == config.eval_horizon
    assert 0.0 <= result["perceiver_copy_accuracy"] <= 1.0
    assert result["kl_z_nats_per_frame"] == pytest.approx(result["kl_z"] * 3 * 64 * 64, rel=1e-4)
    json.dumps(result, allow_nan=False)
    row = scalar_metrics(result)
    assert row["eval/bits_per_dim"] == result["bits_per_dim"] and "eval/pred_psnr" not in row


def test_baselines_match_direct_computation(result, data, config, train_mean):
    t0, f = config.eval_context_frames, config.eval_horizon
    idx = torch.linspace(0, len(data) - 1, config.eval_windows).round().long().tolist()
    obs = torch.stack([data[i]["observations"] for i in idx])
    target = obs[:, t0:t0 + f]
    copy = obs[:, t0 - 1:t0].expand_as(target)
    mean = obs[:, :t0].mean(1, keepdim=True).expand_as(target)
    constant = train_mean.expand_as(target)
    expected = {
        "copy_last_psnr": psnr_per_image(copy, target).clamp(max=PSNR_CAP_DB),
        "copy_last_ssim": ssim_per_image(copy, target),
        "context_mean_psnr": psnr_per_image(mean, target).clamp(max=PSNR_CAP_DB),
        "context_mean_ssim": ssim_per_image(mean, target),
        "train_mean_psnr": psnr_per_image(constant, target).clamp(max=PSNR_CAP_DB),
    }
    for key, values in expected.items():
        assert result[key] == pytest.approx(values.mean(0).tolist(), abs=1e-4), key
        se = values.double().std(0) / math.sqrt(values.shape[0])
        assert result[f"{key}_se"] == pytest.approx(se.tolist(), rel=1e-3, abs=1e-6), key
    # moving-pixel PSNR of copy-last, by hand: pixels where the truth differs from the training mean
    moving = ((target - train_mean).abs().amax(2) > MOVING_THRESHOLD).unsqueeze(2).expand_as(target)
    by_hand = torch.tensor([[10 * math.log10(4 / ((copy[i, j] - target[i, j])[moving[i, j]] ** 2).mean().item())
                             for j in range(f)] for i in range(len(idx))])
    assert result["copy_last_moving_psnr"] == pytest.approx(by_hand.mean(0).tolist(), abs=1e-3)


def test_static_scene_baselines_are_perfect(model, config, train_mean):
    res = evaluate(model, MovingSquares(3, eval_sequence_length(config), static=True), config, "cpu",
                   max_windows=3, mean_frame=train_mean)
    assert res["copy_last_psnr"] == pytest.approx([PSNR_CAP_DB] * config.eval_horizon)
    assert res["copy_last_ssim"] == pytest.approx([1.0] * config.eval_horizon)
    assert res["context_mean_psnr"] == pytest.approx([PSNR_CAP_DB] * config.eval_horizon)
    assert res["pred_psnr_mean"] < PSNR_CAP_DB         # an untrained model does not copy perfectly
    # every action is zero, so another window's actions are the same actions: the ratio is 1 (to the last
    # bits: without autograd the decoder takes oneDNN's channels-last kernels, whose rounding can differ
    # between the own and the shuffled halves of one batch by ~1e-9 of the MSE)
    assert res["action_shuffle_ratio"] == pytest.approx([1.0] * config.eval_horizon)
    assert res["action_shuffle_ratio_se"] == pytest.approx([0.0] * config.eval_horizon, abs=1e-6)
    assert "actions_ignored" in res["verdict"]["flags"]


def test_model_untouched_modes_restored_and_reproducible(model, data, config, result):
    model.train()
    model.discriminator.eval()                      # a mixed mode must come back exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    again = evaluate(model, data, config, "cpu")
    assert model.training and not model.discriminator.training
    assert all(m.training for n, m in model.named_modules() if not n.startswith("discriminator"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # incl. the VQ codebook
    assert torch.equal(rng, torch.get_rng_state())  # global RNG untouched
    assert again["pred_psnr"] == pytest.approx(result["pred_psnr"])
    assert again["bits_per_dim"] == pytest.approx(result["bits_per_dim"])
    model.train()


def test_loader_uint8_and_ema(model, data, config):
    def to_uint8(batch):
        obs = ((batch["observations"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return {**batch, "observations": obs}

    loader = [to_uint8(b) for b in DataLoader(data, batch_size=2)]
    ema = ModelEMA(model, decay=0.9)
    res = evaluate(model, loader, config, "cpu", max_windows=3, ema=ema)
    assert res["num_windows"] == 3 and res["used_ema"] is True
    assert all(math.isfinite(v) for v in res["pred_psnr"])
    assert res["mean_frame_source"].startswith("evaluation windows")   # no training mean was given
    assert res["action_shuffle_windows"] == 2                          # the last batch holds one window


def test_errors(model, config):
    short = MovingSquares(2, config.eval_context_frames + config.eval_horizon - 1)
    with pytest.raises(ValueError, match="eval_sequence_length"):
        evaluate(model, short, config, "cpu")
    with pytest.raises(ValueError, match="max_windows"):
        evaluate(model, short, config, "cpu", max_windows=0)
    with pytest.raises(ValueError, match="world model"):
        evaluate(torch.nn.Linear(2, 2), short, config, "cpu")


def test_plots_gif_and_report(model, data, config, result, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [{"step": s, "total_vae_loss": 2.0 / s, "kl_z": 0.01 * s, "bits_per_dim": 5.0 - 0.1 * s,
             "grad_cos/vae__perceiver": 0.1 * s - 0.3, "grad_cos/vae__attention": 0.2} for s in range(1, 6)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch = next(iter(DataLoader(data, batch_size=2)))
    paths = make_evaluation_plots(model, batch, result, run_dir / "plots", visualize_attention=True)
    expected = {"loss_curves", "grad_cosines", "reconstruction", "open_loop", "psnr_vs_horizon",
                "mixture_weights", "attention", "rollout_gif", "dominant_component", "component_gallery"}
    assert expected <= set(paths)
    for name, path in paths.items():
        assert path.is_file() and path.stat().st_size > 0, name
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == ("GIF" if name == "rollout_gif" else "PNG"), name
    with Image.open(paths["rollout_gif"]) as gif:
        assert gif.n_frames == config.eval_context_frames + config.eval_horizon

    report = write_report(run_dir, result, paths, config)
    text = report.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == len(paths)
    for link in links:
        assert not link.startswith("/") and (run_dir / link).is_file(), link
    for j in range(1, config.eval_horizon + 1):
        assert f"| +{j} |" in text
    assert text.splitlines()[2] == f"**Verdict:** {result['verdict']['text']}."
    for phrase in ("copy-last", "context mean", "mean train frame", "Moving-pixel PSNR", "action-shuffle ratio",
                   "z_t comes from another window", "h_t comes from another window", "copy-current-token",
                   "posterior std", "KL_z (nats/frame)", "bits/dim", "K_eff",
                   "Entropy of the posterior attention maps"):
        assert phrase in text, phrase
    assert 0 < result["attention_map_entropy"] <= result["attention_map_entropy_uniform"] + 1e-6


def test_plots_from_dataset_without_attention(model, data, result, tmp_path):
    paths = make_evaluation_plots(model, data, result, tmp_path / "plots", visualize_attention=False)
    assert "attention" not in paths and "loss_curves" not in paths     # no metrics.jsonl here
    assert paths["open_loop"].is_file()


# --------------------------------------------------------------------------------------------------
# The scoring core on hand-made predictors (no model)
T0, F = 3, 5


@pytest.fixture(scope="module")
def windows():
    """(truth [N,F,3,64,64], context [N,T0,3,64,64], mean training frame [3,64,64]) of moving squares."""
    obs = torch.stack([w["observations"] for w in MovingSquares(16, T0 + F, seed=3).items])
    mean = compute_mean_frame(MovingSquares(12, T0 + F, seed=4))
    return obs[:, T0:], obs[:, :T0], mean


def _score(windows, prediction, shuffled=None):
    truth, context, mean = windows
    summary = summarize_open_loop(score_open_loop(truth, context, prediction, mean, shuffled))
    return summary, verdict(summary)


def test_oracle_beats_every_baseline_from_the_first_step(windows):
    truth = windows[0]
    # an oracle that uses the actions: fed another window's actions it predicts that window's future
    summary, v = _score(windows, truth, shuffled=truth.roll(1, 0))
    assert v["code"] == "beats_every_baseline" and v["text"].startswith(f"prediction beats every baseline from +1 (of +{F})")
    assert v["beats_from"] == {b: 1 for b in BASELINES} and v["flags"] == []
    assert summary["pred_psnr"] == pytest.approx([PSNR_CAP_DB] * F)
    assert summary["pred_moving_psnr"] == pytest.approx([PSNR_CAP_DB] * F)
    ratio, se = summary["action_shuffle_ratio_mean"], summary["action_shuffle_ratio_mean_se"]
    assert ratio > 1e6 and ratio > 1 + 2 * se     # MSE 0 with the right actions: only RATIO_EPS keeps it finite
    assert all(g > 0 for b in BASELINES for g in summary["gaps"][b]["psnr"])


def test_constant_mean_frame_is_flagged(windows):
    truth, _, mean = windows
    constant = mean.expand_as(truth)
    summary, v = _score(windows, constant, shuffled=constant)
    assert v["code"] == "no_better_than_constant"
    assert v["text"].startswith("prediction does not beat the mean training frame")
    assert "actions_ignored" in v["flags"] and "future actions make no difference" in v["text"]
    assert summary["gaps"]["train_mean"]["psnr"] == pytest.approx([0.0] * F, abs=1e-9)
    assert summary["gaps"]["train_mean"]["wins"] == [False] * F
    assert summary["pred_psnr"] == pytest.approx(summary["train_mean_psnr"])
    assert summary["action_shuffle_ratio"] == pytest.approx([1.0] * F)
    # the constant is worse on the pixels that move than on the whole frame (the rest it gets right)
    assert summary["train_mean_moving_psnr_mean"] < summary["train_mean_psnr_mean"]


def test_copy_last_does_not_beat_copy_last(windows):
    truth, context, _ = windows
    copy = context[:, -1:].expand_as(truth)
    summary, v = _score(windows, copy, shuffled=copy)
    assert v["code"] != "beats_every_baseline"
    assert summary["gaps"]["copy_last"]["wins"] == [False] * F and summary["gaps"]["copy_last"]["beats_from"] is None
    assert summary["gaps"]["copy_last"]["psnr"] == pytest.approx([0.0] * F, abs=1e-9)
    assert "copy-last-frame" in v["text"].split("does not beat")[-1]
    # copy-last is sharper than the blurred training mean on these windows, and beats it
    assert summary["gaps"]["train_mean"]["beats_from"] == 1


def test_action_blind_noisy_predictor_has_ratio_one_within_error(windows):
    truth = windows[0]
    g = torch.Generator().manual_seed(0)
    noisy = (truth + 0.2 * torch.randn(truth.shape, generator=g)).clamp(-1, 1)
    other = (truth + 0.2 * torch.randn(truth.shape, generator=g)).clamp(-1, 1)   # same predictor, other actions
    summary, v = _score(windows, noisy, shuffled=other)
    for r, se in zip(summary["action_shuffle_ratio"], summary["action_shuffle_ratio_se"]):
        assert abs(r - 1) < 3 * se + 1e-3, (r, se)
    assert "actions_ignored" in v["flags"]


def test_swap_controls_in_the_verdict(windows):
    truth = windows[0]
    summary, _ = _score(windows, truth, shuffled=truth.roll(1, 0))
    flags = verdict(summary, {"z_swap_gap_nats_per_frame": 5e-4, "z_swap_gap_nats_per_frame_se": 1e-5,
                              "h_swap_gap_nats_per_frame": 120.0, "h_swap_gap_nats_per_frame_se": 10.0})["flags"]
    assert flags == ["z_ignored"]


def test_statistics_helpers():
    x = torch.tensor([[1.0, math.nan], [2.0, 4.0], [4.0, math.nan]])
    mean, se, n = mean_and_se(x)
    assert mean.tolist() == pytest.approx([7 / 3, 4.0]) and n.tolist() == [3, 1]
    assert se[0].item() == pytest.approx(torch.tensor([1.0, 2.0, 4.0]).std().item() / math.sqrt(3))
    assert math.isnan(se[1].item())                                  # one value: no error estimate
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(20, generator=g) + 1, torch.rand(20, generator=g) + 1
    ratio, se = jackknife_ratio_of_means(a, b)
    loo = torch.tensor([(a.sum() - a[i]) / (b.sum() - b[i]) for i in range(20)])
    assert ratio.item() == pytest.approx((a.mean() / b.mean()).item())
    assert se.item() == pytest.approx(math.sqrt(19 / 20 * ((loo - loo.mean()) ** 2).sum().item()), rel=1e-6)
    means, variances = torch.randn(10, 4, 3, generator=g) * 0.5, torch.full((10, 4, 3), 0.25)
    s = spread_ratio(means, variances)
    assert s["posterior_std"] == pytest.approx(0.5)
    assert s["spread"] == pytest.approx(means.var(0).mean().sqrt().item())
    assert s["ratio"] == pytest.approx(s["spread"] / 0.5) and s["ratio_se"] > 0
    empty = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    frames = torch.zeros(1, 1, 3, 64, 64)
    assert math.isnan(moving_psnr_per_image(frames, frames, empty).item())   # nothing moves: undefined


class _Episodes(torch.utils.data.Dataset):
    """Stand-in for DMCVBDataset: window_index over two episodes of 10 and 7 rows, windows of 3."""

    sequence_length = 3

    def __init__(self):
        self.window_index = [(e, s) for e, n in enumerate((10, 7)) for s in range(n - 3 + 1)]

    def __len__(self):
        return len(self.window_index)

    def __getitem__(self, i):
        e, s = self.window_index[i]
        value = torch.full((3, 3, 64, 64), (e * 10 + s) / 20.0 - 0.5)
        return {"observations": value, "actions": torch.zeros(3, ACTION_DIM)}


def test_windows_do_not_overlap_and_cover_every_episode():
    data = _Episodes()
    idx, info = evaluation_windows(data, 100)
    assert [data.window_index[i] for i in idx] == [(0, 0), (0, 3), (0, 6), (1, 0), (1, 3)]
    assert info == {"non_overlapping": True, "available_windows": 5, "num_episodes": 2}
    idx, info = evaluation_windows(data, 2)
    assert info["num_episodes"] == 2 and len(idx) == 2


def test_mean_frame_is_stored_and_reloaded(tmp_path):
    data = _Episodes()
    path = tmp_path / "mean_frame.npy"
    frame = load_or_compute_mean_frame(path, data, max_frames=9)
    # 3 windows of 3 frames, evenly spaced over the 5 non-overlapping ones: (0,0), (0,6), (1,3)
    assert frame.shape == (3, 64, 64) and frame[0, 0, 0].item() == pytest.approx((0 + 6 + 13) / 3 / 20 - 0.5)
    assert torch.equal(load_or_compute_mean_frame(path), frame)      # read back, no dataset needed
    with pytest.raises(FileNotFoundError, match="no mean training frame"):
        load_or_compute_mean_frame(tmp_path / "missing.npy")


# --------------------------------------------------------------------------------------------------
# The trainer: best.pt on validation, eval.json on test
def test_trainer_selects_on_validation_and_reports_on_test(tiny_dmc_data, tmp_path):
    from VRNN.dmc_vb_transition_dynamics_trainer import DMCVBTrainer
    from VRNN.hdf5_io import find_splits
    from VRNN.run_setup import build_model, load_datasets
    from VRNN.vrnn_utilities import load_checkpoint, seed_everything

    torch.set_num_threads(1)
    config = AIMEConfig.preset("smoke", max_steps=2, eval_every=1000, checkpoint_every=1000)
    splits = find_splits(tiny_dmc_data)
    assert splits.validation != splits.test
    train, validation, test = load_datasets(config, *splits)
    config = config.replace(action_dim=train.action_dim)
    seed_everything(config.seed)
    model = build_model(config, train.action_dim, torch.device("cpu"))
    run_dir = tmp_path / "run"
    trainer = DMCVBTrainer(model, train, validation, config, run_dir, progress=False, test_data=test)
    result = trainer.train()
    final = json.loads((run_dir / "eval.json").read_text())
    periodic = json.loads((run_dir / "eval_validation.json").read_text())
    assert final["split"] == "test" and periodic["split"] == "validation" and final["step"] == periodic["step"] == 2
    assert result.evaluation["split"] == "test"
    assert final["bits_per_dim"] != periodic["bits_per_dim"]                   # two different splits
    payload = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert payload["best_bits_per_dim"] == pytest.approx(periodic["bits_per_dim"])   # chosen on validation
    mean = load_or_compute_mean_frame(run_dir / "mean_frame.npy")
    assert torch.allclose(mean, compute_mean_frame(train), atol=1e-6)
    assert final["mean_frame_source"] == "training split"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("test/bits_per_dim" in r for r in rows) and any("eval/bits_per_dim" in r for r in rows)
    # The same protocol on the training split's windows, summarised beside the test figures.
    on_train = json.loads((run_dir / "eval_train.json").read_text())
    assert on_train["split"] == "train" and on_train["step"] == 2
    assert on_train["num_episodes"] == len(train.episode_lengths)
    summary = final["training_windows"]
    assert summary["recon_psnr"] == on_train["recon_psnr"]
    assert summary["lead_over_mean_frame"] == on_train["gaps"]["train_mean"]["psnr_mean"]
    assert summary["memorisation_gap_db"] == pytest.approx(
        on_train["gaps"]["train_mean"]["psnr_mean"] - final["gaps"]["train_mean"]["psnr_mean"])
    assert any("train_windows/bits_per_dim" in r for r in rows)


def test_training_window_summary_and_report_section(tmp_path):
    """The memorisation gap is the training windows' lead over the mean frame minus the held-out one, its SE
    the two SEs in quadrature; the report reads a large gap as memorising and a small one as none."""
    from VRNN.eval_report import _training_windows_section
    from VRNN.evaluation import training_window_summary

    def evaluation(lead, se, recon):
        return {"split": "x", "num_windows": 40, "num_episodes": 4, "recon_psnr": recon, "recon_psnr_se": 0.1,
                "pred_psnr_mean": 20.0 + lead, "pred_psnr_mean_se": 0.2, "action_shuffle_ratio_mean": 1.3,
                "gaps": {"train_mean": {"psnr_mean": lead, "psnr_mean_se": se}}}

    held_out = evaluation(0.5, 0.3, 22.0)
    summary = training_window_summary(evaluation(2.5, 0.4, 24.0), held_out)
    assert summary["lead_over_mean_frame"] == 2.5 and summary["recon_psnr"] == 24.0
    assert summary["memorisation_gap_db"] == pytest.approx(2.0)
    assert summary["memorisation_gap_db_se"] == pytest.approx(0.5)
    text = "\n".join(_training_windows_section({**held_out, "training_windows": summary}))
    assert "| reconstruction PSNR (dB) | 22.00 ± 0.10 | 24.00 ± 0.10 |" in text
    assert "2.00 ± 0.50 dB: the model predicts its training episodes better" in text
    alike = training_window_summary(evaluation(0.6, 0.3, 22.1), held_out)
    assert "no sign of memorising" in "\n".join(_training_windows_section({**held_out, "training_windows": alike}))
    assert training_window_summary(evaluation(0.6, 0.3, 22.1)).get("memorisation_gap_db") is None
    assert _training_windows_section(held_out) == []


def test_component_responsibilities_and_gallery(tmp_path):
    """Responsibilities are a distribution over components and pick the component a latent sits in."""
    from VRNN.vrnn_plots import component_responsibilities, plot_component_gallery

    means = torch.tensor([[[-3.0, 0.0], [3.0, 0.0]]]).expand(4, 2, 2)
    logvars = torch.zeros(4, 2, 2)
    z = torch.tensor([[-3.0, 0.1], [2.9, 0.0], [3.2, 0.3], [-2.5, 0.0]])
    r = component_responsibilities(z, torch.log(torch.full((4, 2), 0.5)), means, logvars)
    torch.testing.assert_close(r.sum(-1), torch.ones(4, dtype=r.dtype))
    assert r.argmax(-1).tolist() == [0, 1, 1, 0]
    frames = torch.rand(4, 3, 64, 64) * 2 - 1
    path = plot_component_gallery(frames, r, tmp_path / "gallery.png", per_component=2)
    assert path is not None and path.stat().st_size > 0


def test_verdict_names_every_won_step_when_a_middle_stretch_is_not_significant():
    """A model that wins +1..+3 and +5 against every baseline but not +4 (a gap under 2 SE) is 'beats every
    baseline from +5', and the text says it also won +1..+3."""
    wins = {b: [True, True, True, False, True] for b in BASELINES}
    wins["copy_last"] = [True] * 5
    gaps = {b: {"wins": w, "beats_from": _beats_from(w), "psnr_mean": 1.0, "psnr_mean_se": 0.1,
                "moving_psnr_mean": 2.0, "moving_psnr_mean_se": 0.1} for b, w in wins.items()}
    v = verdict({"gaps": gaps, "pred_psnr": [30.0] * 5})
    assert v["code"] == "beats_every_baseline"
    assert v["text"].startswith("prediction beats every baseline from +5 (of +5), and at 4 of 5 steps in all "
                                "(+1..+3, +5)")
    clean = {b: dict(g, wins=[True] * 5, beats_from=1) for b, g in gaps.items()}
    assert ", and at" not in verdict({"gaps": clean, "pred_psnr": [30.0] * 5})["text"]
