"""What the captures of chosen PyTorch modules share (:mod:`attnformat.adapters.torch`, :mod:`attnformat.adapters.sdpa`).

Both hook a set of modules found by path, name each module's site and layer the same way
(:func:`~attnformat.adapters.sessions.site_names_from_paths`, then 0, 1, 2... in model order) and
write the same provenance into the file.
"""

from __future__ import annotations

import os

from collections.abc import Callable, Mapping

import torch

from attnformat.adapters.sessions import HookSession, layer_numbers, site_names_from_paths


def recorder_keywords(model, adapter: str, *, model_name: str | None, description: str | None, overwrite: bool,
                     dtype: str) -> dict:
    """The :class:`~attnformat.adapters.Recorder` options of a capture of ``model`` by the adapter module ``adapter``.

    Parameters
    ----------
    model : torch.nn.Module
        The model captured (its class names the model unless ``model_name`` does).
    adapter : str
        The adapter's module, written as ``model_adapter``.
    model_name, description, overwrite, dtype
        As the adapter's ``capture`` takes them.

    Returns
    -------
    dict
        Keywords of :class:`~attnformat.adapters.Recorder`; the file is written in the background
        where a core is spare (:func:`write_behind_helps`).

    Examples
    --------
    >>> from torch import nn
    >>> options = recorder_keywords(nn.Linear(2, 2), "attnformat.adapters.sdpa", model_name=None, description=None,
    ...                             overwrite=False, dtype="float32")
    >>> options["model_name"], options["model_adapter"], options["background"] == write_behind_helps(nn.Linear(2, 2))
    ('Linear', 'attnformat.adapters.sdpa', True)
    """
    return {"model_name": model_name or type(model).__name__, "model_framework": f"torch {torch.__version__}",
            "model_adapter": adapter, "description": description, "overwrite": overwrite, "dtype": dtype,
            "background": write_behind_helps(model)}


def write_behind_helps(model) -> bool:
    """Whether a capture of ``model`` should compress and store each layer while the model computes the next.

    Writing behind overlaps the file's work with the model's only when a core is idle meanwhile:
    a model on an accelerator leaves the CPU to the writer; on the CPU, torch's threads already
    use every core they are given, and a writer thread beside them costs more than it hides
    (measured at 4096 tokens on 2 cores with torch on both: dense capture of 2 layers 1.89x the
    plain forward writing behind, 1.40x writing in line). So: behind when the model's parameters
    are not on the CPU, or when this process may run on more cores than torch's intra-op threads.

    Parameters
    ----------
    model : torch.nn.Module
        The model captured.

    Returns
    -------
    bool

    Examples
    --------
    >>> import os, torch
    >>> from torch import nn
    >>> write_behind_helps(nn.Linear(2, 2)) == (len(os.sched_getaffinity(0)) > torch.get_num_threads())
    True
    """
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    if parameter is not None and parameter.device.type != "cpu":
        return True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores > torch.get_num_threads()


class ModuleHookSession(HookSession):
    """A capture of chosen modules: ``modules`` by path, ``sites`` maps each path to (site, layer).

    ``layer_counts`` holds the number of layers of each site and ``tokens`` the token
    descriptions given per site (keywords of :meth:`Recorder.describe`).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    >>> session = ModuleHookSession(dict(model.named_children()), pathlib.Path(tempfile.mkdtemp()) / "x.attn.zarr",
    ...                             site_names=lambda path: "linear", tokens=None, recorder_options={})
    >>> session.sites, session.layer_counts
    ({'0': ('linear', 0), '1': ('linear', 1)}, {'linear': 2})
    """

    def __init__(self, modules: Mapping, destination, *, site_names: Mapping[str, str] | Callable[[str], str] | None,
                 tokens: Mapping[str, Mapping] | None, recorder_options: Mapping):
        super().__init__(destination, recorder_options=recorder_options)
        self.modules = dict(modules)
        names = site_names_from_paths(self.modules, site_names)
        numbers = layer_numbers(names)
        self.sites = {path: (names[path], numbers[path]) for path in self.modules}
        self.layer_counts = {site: sum(1 for s, _ in self.sites.values() if s == site) for site, _ in self.sites.values()}
        self.tokens = {site.strip("/"): dict(kw) for site, kw in (tokens or {}).items()}
