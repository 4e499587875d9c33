"""Build a job's model and dataset from ``package.module:factory`` import paths."""
from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from psgrid import sparse
from psgrid.errors import InvalidSpec, PermissionDenied
from psgrid.spec import DEFAULT_ALLOWED_MODULES, JobSpec, module_allowed
from psgrid.dataset import Dataset


def import_factory(path: str, allowed: tuple[str, ...] = DEFAULT_ALLOWED_MODULES) -> Callable[..., Any]:
    """The callable named by ``package.module:attribute``.

    PermissionDenied, before anything is imported, when the module is outside
    ``allowed``; InvalidSpec when it cannot be imported or is not callable.
    """
    module_name, _, attr = path.partition(":")
    if not module_allowed(module_name, allowed):
        package = module_name.split(".")[0]
        raise PermissionDenied(f"module {module_name!r} is not in this process's allow-list {list(allowed)}: "
                               f"start it with --allow-modules {package} (psgrid server, worker and serve "
                               "each take the flag)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidSpec(f"cannot import {module_name!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InvalidSpec(f"{path!r} does not name a callable")
    return factory


_SEEDED = threading.Lock()


def build_model(spec: JobSpec, allowed: tuple[str, ...] = ("*",)) -> nn.Module:
    """The model with the job's seeded initial weights (identical on every worker).

    Seeding and drawing from torch's one global generator is done under a lock:
    two threads building models at once (workers in one process, a server's
    threads) would otherwise interleave their draws and get different weights."""
    factory = import_factory(spec.model, allowed)
    with _SEEDED:
        torch.manual_seed(spec.seed)
        model = factory(**spec.model_kwargs)
    if not isinstance(model, nn.Module):
        raise InvalidSpec(f"{spec.model} returned {type(model).__name__}, not a torch.nn.Module")
    sparse.tables(model)  # its embedding tables, named by their paths in the model
    return model


def build_dataset(spec: JobSpec, allowed: tuple[str, ...] = ("*",)) -> Dataset:
    data = import_factory(spec.dataset, allowed)(**spec.dataset_kwargs)
    if not isinstance(data, Dataset):
        raise InvalidSpec(f"{spec.dataset} returned {type(data).__name__}, not a psgrid Dataset")
    return data


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters the server holds, in a stable order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
