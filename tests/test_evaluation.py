"""evaluate / make_evaluation_plots / write_report with the real model on the smoke preset.

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
from VRNN.evaluation import (
    PSNR_CAP_DB,
    eval_sequence_length,
    evaluate,
    make_evaluation_plots,
    scalar_metrics,
    write_report,
)

ACTION_DIM = 2
HORIZON_KEYS = ("pred_psnr", "pred_ssim", "copy_last_psnr", "copy_last_ssim", "mean_frame_psnr",
                "mean_frame_ssim")
SCALAR_KEYS = ("recon_psnr", "recon_ssim", "bits_per_dim", "kl_z", "kl_sticks", "kl_alpha", "recon_loss",
               "neg_elbo_nats_per_dim", "K_eff", "perceiver_accuracy", "pred_psnr_mean", "copy_last_psnr_mean",
               "mean_frame_psnr_mean")


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
    return AIMEConfig.preset("smoke", eval_horizon=3, batch_size=2, eval_windows=3, action_dim=ACTION_DIM)


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    return DPGMMVariationalRecurrentAutoencoder.from_config(config, action_dim=ACTION_DIM)


@pytest.fixture(scope="module")
def data(config):
    return MovingSquares(5, eval_sequence_length(config))


@pytest.fixture(scope="module")
def result(model, data, config):
    return evaluate(model, data, config, "cpu")


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
    assert result["used_ema"] is False
    json.dumps(result, allow_nan=False)
    row = scalar_metrics(result)
    assert row["eval/bits_per_dim"] == result["bits_per_dim"] and "eval/pred_psnr" not in row


def test_baselines_match_direct_computation(result, data, config):
    t0, f = config.eval_context_frames, config.eval_horizon
    idx = torch.linspace(0, len(data) - 1, config.eval_windows).round().long().tolist()
    obs = torch.stack([data[i]["observations"] for i in idx])
    target = obs[:, t0:t0 + f]
    copy = obs[:, t0 - 1:t0].expand_as(target)
    mean = obs[:, :t0].mean(1, keepdim=True).expand_as(target)
    expected = {
        "copy_last_psnr": psnr_per_image(copy, target).clamp(max=PSNR_CAP_DB).mean(0),
        "copy_last_ssim": ssim_per_image(copy, target).mean(0),
        "mean_frame_psnr": psnr_per_image(mean, target).clamp(max=PSNR_CAP_DB).mean(0),
        "mean_frame_ssim": ssim_per_image(mean, target).mean(0),
    }
    for key, values in expected.items():
        assert result[key] == pytest.approx(values.tolist(), abs=1e-4), key


def test_static_scene_baselines_are_perfect(model, config):
    res = evaluate(model, MovingSquares(2, eval_sequence_length(config), static=True), config, "cpu",
                   max_windows=2)
    assert res["copy_last_psnr"] == pytest.approx([PSNR_CAP_DB] * config.eval_horizon)
    assert res["copy_last_ssim"] == pytest.approx([1.0] * config.eval_horizon)
    assert res["mean_frame_psnr"] == pytest.approx([PSNR_CAP_DB] * config.eval_horizon)
    assert res["pred_psnr_mean"] < PSNR_CAP_DB         # an untrained model does not copy perfectly


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
                "mixture_weights", "attention", "rollout_gif"}
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
    assert "copy-last PSNR" in text and "bits/dim" in text and "K_eff" in text


def test_plots_from_dataset_without_attention(model, data, result, tmp_path):
    paths = make_evaluation_plots(model, data, result, tmp_path / "plots", visualize_attention=False)
    assert "attention" not in paths and "loss_curves" not in paths     # no metrics.jsonl here
    assert paths["open_loop"].is_file()
