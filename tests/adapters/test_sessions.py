"""HookSession: hooks installed before a failure inside ``_install`` are removed, and the file says incomplete."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnformat
from attnformat.adapters.sessions import HookSession


class _HalfInstalled(HookSession):
    """Installs a real forward hook, then fails, as a capture does when its second module is unsupported."""

    def __init__(self, module, destination):
        super().__init__(destination, recorder_options={"model_name": "toy"})
        self.module = module

    def _install(self):
        yield self.module.register_forward_hook(lambda *args: None)
        raise RuntimeError("second module unsupported")


def test_hooks_installed_before_a_failure_are_removed(tmp_path):
    module = nn.Linear(2, 2)
    session = _HalfInstalled(module, tmp_path / "x.attn.zarr")
    with pytest.raises(RuntimeError, match="second module unsupported"):
        session.__enter__()
    assert len(module._forward_hooks) == 0  # the hook installed before the failure is gone
    assert not session.active
    module(torch.zeros(1, 2))  # and the module still runs
    assert attnformat.open(tmp_path / "x.attn.zarr").attrs["completeness"] == "incomplete"
