"""The canonical AIME implementation: the model, its parts, the DMC data pipeline, the trainer and scripts.

Importing the package is cheap: it does not import dm_control, start a renderer or build a model. The
facades ``world_model`` and ``training`` re-export the public objects defined here.
"""
