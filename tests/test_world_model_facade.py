"""The ``world_model`` facade is a pure re-export of the canonical objects in ``VRNN``."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import world_model

CANONICAL = {
    "DPGMMVariationalRecurrentAutoencoder": "VRNN.dpgmm_stickbreaking_prior_vrnn",
    "TASK_LOSS_KEYS": "VRNN.dpgmm_stickbreaking_prior_vrnn",
    "AIMEConfig": "VRNN.aime_config",
    "PRESETS": "VRNN.aime_config",
    "ModelEMA": "VRNN.ema",
    "CheckpointError": "VRNN.vrnn_utilities",
    "DPGMMPrior": "VRNN.dpgmm_prior",
    "Kumaraswamy": "VRNN.stick_breaking",
    "kl_kumaraswamy_beta": "VRNN.stick_breaking",
    "kl_gamma": "VRNN.stick_breaking",
    "stick_breaking_weights": "VRNN.stick_breaking",
    "NVAEEncoder": "VRNN.nvae",
    "NVAEDecoder": "VRNN.nvae",
    "LIKELIHOODS": "VRNN.likelihoods",
    "DiscretizedLogisticMixture": "VRNN.likelihoods",
    "DiscretizedGaussian": "VRNN.likelihoods",
    "AttentionSchema": "VRNN.attention_schema",
    "TemporalDiscriminator": "VRNN.temporal_discriminator",
    "CausalPerceiverIO": "perceiver_io",
    "PerceiverIOConfig": "perceiver_io",
    "VRNNCell": "VRNN.vrnn_cell",
}


def test_every_export_is_the_canonical_object():
    assert sorted(world_model.__all__) == sorted(CANONICAL)
    for name, module in CANONICAL.items():
        assert getattr(world_model, name) is getattr(importlib.import_module(module), name), name


def test_canonical_import_path_works():
    from VRNN.dpgmm_stickbreaking_prior_vrnn import DPGMMVariationalRecurrentAutoencoder

    assert DPGMMVariationalRecurrentAutoencoder is world_model.DPGMMVariationalRecurrentAutoencoder
    assert DPGMMVariationalRecurrentAutoencoder.__module__ == "VRNN.dpgmm_stickbreaking_prior_vrnn"


def test_facade_defines_nothing_of_its_own():
    tree = ast.parse(Path(world_model.__file__).read_text())
    for node in tree.body:
        is_docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        is_all = isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"]
        is_vrnn_import = isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "VRNN"
        assert is_docstring or is_all or is_vrnn_import, ast.dump(node)[:120]


def test_readme_code_runs():
    """The README's python blocks, executed in order in one namespace (smoke preset, seconds)."""
    import re

    import torch

    text = (Path(world_model.__file__).parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        namespace: dict = {}
        for block in blocks:
            exec(compile(block, "world_model/README.md", "exec"), namespace)  # noqa: S102 (our own README)
    finally:
        torch.set_num_threads(threads)
    assert namespace["future"]["frames"].abs().max() <= 1
