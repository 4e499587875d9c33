"""Serving trained models: a batching inference pipeline with hot model reload.

``psgrid serve`` runs :class:`~psgrid.inference.app.InferenceApp`; the SDK is
:class:`~psgrid.inference.client.InferenceClient`. See docs/serving.md.
"""
from __future__ import annotations


def __getattr__(name: str):
    # Lazy, so that importing the package does not pay for torch and gRPC.
    if name in ("InferenceClient", "Prediction", "ServingStatus"):
        from psgrid.inference import client

        return getattr(client, name)
    if name == "ServeConfig":
        from psgrid.inference.config import ServeConfig

        return ServeConfig
    raise AttributeError(f"module 'psgrid.inference' has no attribute {name!r}")
