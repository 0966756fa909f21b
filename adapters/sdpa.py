"""Capture attention computed with ``torch.nn.functional.scaled_dot_product_attention`` (SDPA).

For models that never materialize their attention weights: timm-style vision transformers,
custom PyTorch models, anything whose attention modules call SDPA. While the ``with`` block
runs, every SDPA call made inside one of the captured modules is intercepted (a
``TorchFunctionMode``, so ``F.scaled_dot_product_attention``, ``from torch.nn.functional import
scaled_dot_product_attention`` and ``torch._C._nn.scaled_dot_product_attention`` are all seen):
the real kernel runs first and its output is returned unchanged, then the call's weights are
recomputed from its own ``query``, ``key``, ``attn_mask``, ``is_causal``, ``scale`` and
``enable_gqa``, in blocks of query rows, and written as that module's layer of its site (or
reduced to top-k weights, row statistics or head means: ``keep=``). Memory holds one block of
weights plus what is kept of a layer. Hooks and the mode are removed on exit, also after an
exception.

Which modules: by default every module whose class's ``forward`` calls
``scaled_dot_product_attention`` in its own source (timm's ``Attention``, most custom attention
classes). When SDPA is called from a helper function instead (Hugging Face's attention
interface, ``nn.MultiheadAttention``), pass ``modules=``: module types, module paths, or the
result of :func:`find_attention_modules`, which runs one forward pass and returns the innermost
modules that called SDPA. SDPA calls outside the captured modules are not written; a warning
on exit counts them.
"""

from __future__ import annotations

import inspect
import os
import textwrap
import warnings
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from attnformat.adapters.errors import CaptureStateError, UnsupportedModelError
from attnformat.adapters.keep import keeps_by_site
from attnformat.adapters.kernel import AttentionCall, CallWriter
from attnformat.adapters.module_sessions import ModuleHookSession, recorder_keywords
from attnformat.adapters.recorder import Recorder

_SDPA = torch.nn.functional.scaled_dot_product_attention
_SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

ModuleSelection = Iterable[type] | Iterable[str] | Mapping[str, nn.Module] | Callable[[str, nn.Module], bool] | None


def find_attention_modules(model: nn.Module, *args, **kwargs) -> dict[str, nn.Module]:
    """Run ``model(*args, **kwargs)`` once and return the innermost modules that called SDPA, in model order.

    The forward pass runs under ``torch.no_grad()`` and its output is discarded. Pass the
    result to :func:`capture` as ``modules=`` when the default discovery (modules whose own
    ``forward`` calls SDPA) finds nothing, e.g. for models whose attention calls SDPA through a
    helper function.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> def attend(q, k, v):  # SDPA called from a helper: the default discovery cannot see it
    ...     return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    >>> class Attention(nn.Module):
    ...     def forward(self, x):
    ...         return attend(x, x, x)
    >>> model = nn.Sequential(nn.Linear(4, 4), Attention(), Attention())
    >>> list(find_attention_modules(model, torch.randn(1, 3, 4)))
    ['1', '2']
    """
    stack: list[str] = []
    callers: set[str] = set()

    class Tracer(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is _SDPA and stack:
                callers.add(stack[-1])
            return func(*args, **(kwargs or {}))

    def entering(path):
        def hook(module, args):
            stack.append(path)
        return hook

    def leaving(module, args, output):
        stack.pop()

    handles = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(entering(path)))
        handles.append(module.register_forward_hook(leaving, always_call=True))
    try:
        with Tracer(), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {path: module for path, module in model.named_modules() if path in callers}


def capture(
    model: nn.Module,
    destination: str | os.PathLike | Recorder,
    *,
    modules: ModuleSelection = None,
    site_names: Mapping[str, str] | Callable[[str], str] | None = None,
    tokens: Mapping[str, Mapping] | None = None,
    keep=None,
    block_bytes: int | None = None,
    model_name: str | None = None,
    description: str | None = None,
    overwrite: bool = False,
    dtype: str = "float32",
) -> SdpaCapture:
    """Capture the weights of every SDPA call made inside the attention modules during a ``with`` block.

    Parameters
    ----------
    model
        Any ``nn.Module``.
    destination
        Path of the attention file to write, or a :class:`~attnformat.adapters.Recorder` to
        write into (to share one file between captures).
    modules
        Which modules' SDPA calls to capture: ``None`` (modules whose class's ``forward`` calls
        ``scaled_dot_product_attention`` itself), module classes (every instance), module paths
        (``"blocks.0.attn"``), a ``{path: module}`` mapping such as
        :func:`find_attention_modules` returns, or a function ``(path, module) -> bool``.
        Each module must call SDPA once per forward pass; a call is attributed to the innermost
        captured module running.
    site_names
        Rename sites: maps a module path or a derived site name to a site name, or is a
        function of the module path. By default numeric indices and generic list names are
        dropped (``blocks.3.attn`` becomes ``attn``) and the modules of one site are its
        layers 0, 1, 2... in model order.
    tokens
        Per site, keywords of :meth:`Recorder.describe` (``labels``, ``groups``, ``positions``,
        ``coords``, ``attrs``...). They override what the capture derives from the calls:
        ``attention_type`` is ``"self"`` when query and key lengths are equal, else ``"cross"``
        (override with ``attrs``); ``causal`` is 1 for ``is_causal=True`` or a lower-triangular
        mask; keys that a mask hides from every query are ``key_mask`` false, and for
        self-attention the same tokens are ``query_mask`` false.
    keep
        What to store: a :class:`~attnformat.adapters.keep.Keep` for every site or
        ``{site: Keep}``; default every dense map. A site ``X`` becomes ``X`` (dense maps of the
        selected layers, heads and rows), ``X_topk``, ``X_stats`` and ``X_mean`` as kept, all
        with ``describes = "X"`` (written by :class:`attnformat.adapters.kernel.CallWriter`, as
        :func:`attnformat.adapters.huggingface.capture` writes them).
    block_bytes
        Memory budget of one block of recomputed weights (default
        :data:`attnformat.adapters.kernel.DEFAULT_BLOCK_BYTES`).
    model_name, description, overwrite, dtype
        Passed to the file.

    Returns
    -------
    SdpaCapture
        A context manager; ``.path`` is the file written, ``.sites`` maps module paths to
        (site, layer).

    Notes
    -----
    Query tensors are (batch, heads, L, E) as SDPA documents them: the dimension before L is
    the head axis (a 3-d query is one sample's heads) and further leading dimensions are
    flattened into ``sample``. Interception is per thread: SDPA calls from other threads are
    not seen. Dropout (``dropout_p``) is not applied to the stored weights.

    Examples
    --------
    >>> import torch, tempfile, pathlib, attnformat
    >>> import torch.nn.functional as F
    >>> from torch import nn
    >>> class Attention(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.qkv = nn.Linear(8, 24)
    ...     def forward(self, x):
    ...         q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
    ...         return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
    >>> model = nn.Sequential(Attention(), Attention())
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "custom.attn.zarr"
    >>> with capture(model, out, site_names={"attention": "decoder/self"}):
    ...     _ = model(torch.randn(1, 5, 8))
    >>> site = attnformat.open(out)["decoder/self"]
    >>> dict(site["weights"].sizes), site.attrs["causal"]
    ({'sample': 1, 'layer': 2, 'head': 2, 'query': 5, 'key': 5}, 1)
    """
    found = select_modules(model, modules)
    if not found:
        hint = ("none of the given modules were found" if modules is not None else
                "no module's forward calls torch.nn.functional.scaled_dot_product_attention itself")
        raise UnsupportedModelError(
            f"{type(model).__name__}: {hint}; pass modules= (module classes, paths, or "
            f"attnformat.adapters.sdpa.find_attention_modules(model, example_input)); for nn.MultiheadAttention with "
            f"weights use attnformat.adapters.torch, for Hugging Face models attnformat.adapters.huggingface")
    options = recorder_keywords(model, "attnformat.adapters.sdpa", model_name=model_name, description=description,
                                overwrite=overwrite, dtype=dtype)
    return SdpaCapture(model, found, destination, site_names=site_names, tokens=tokens, keep=keep, block_bytes=block_bytes,
                       recorder_options=options)


def select_modules(model: nn.Module, modules: ModuleSelection = None) -> dict[str, nn.Module]:
    """The modules :func:`capture` hooks, ``{path: module}`` in model order (see its ``modules``).

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.MultiheadAttention(4, 2))
    >>> list(select_modules(model, [nn.MultiheadAttention])), list(select_modules(model, ["0"]))
    (['1'], ['0'])
    """
    named = dict(model.named_modules())
    if modules is None:
        return {path: module for path, module in named.items() if _calls_sdpa(type(module))}
    if callable(modules) and not isinstance(modules, type):
        return {path: module for path, module in named.items() if modules(path, module)}
    if isinstance(modules, Mapping):
        wanted = {id(module) for module in modules.values()}
        return {path: module for path, module in named.items() if id(module) in wanted}
    modules = list(modules)
    types = tuple(m for m in modules if isinstance(m, type))
    paths = [m for m in modules if isinstance(m, str)]
    unknown = [p for p in paths if p not in named]
    if unknown:
        raise UnsupportedModelError(f"{type(model).__name__}: no module at path(s) {unknown}")
    return {path: module for path, module in named.items() if path in paths or (types and isinstance(module, types))}


def _calls_sdpa(cls: type) -> bool:
    """Whether ``cls.forward``'s own source calls scaled_dot_product_attention (torch's own modules excluded)."""
    forward = getattr(cls, "forward", None)
    if forward is None or cls.__module__.startswith("torch."):
        return False
    try:
        source = textwrap.dedent(inspect.getsource(forward))
    except (OSError, TypeError):
        return False
    return "scaled_dot_product_attention(" in source


class _ModeHandle:
    """Removes an entered TorchFunctionMode like a hook handle."""

    def __init__(self, mode: TorchFunctionMode):
        self.mode = mode

    def remove(self) -> None:
        if self.mode is not None:
            mode, self.mode = self.mode, None
            mode.__exit__(None, None, None)


class _Interceptor(TorchFunctionMode):
    def __init__(self, session: SdpaCapture):
        super().__init__()
        self.session = session

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if func is _SDPA:
            self.session._intercepted(args, kwargs)
        return output


class SdpaCapture(ModuleHookSession):
    """The context manager :func:`capture` returns; ``sites`` maps module paths to (site, layer).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from torch import nn
    >>> session = capture(nn.Sequential(nn.Linear(2, 2)), pathlib.Path(tempfile.mkdtemp()) / "x.attn.zarr", modules=[nn.Linear])
    >>> session.sites
    {'0': ('attention', 0)}
    """

    def __init__(self, model, modules, destination, *, site_names, tokens, keep, block_bytes, recorder_options):
        super().__init__(modules, destination, site_names=site_names, tokens=tokens, recorder_options=recorder_options)
        self.model = model
        self.keep = keep
        self.block_bytes = block_bytes
        self.writer = None
        self._descriptions: dict[str, dict] = {}
        self._running: list[str] = []
        self._calls: dict[str, int] = {}
        self._seen: set[str] = set()
        self.uncaptured_calls = 0

    def _install(self):
        self._running.clear()
        self.uncaptured_calls = 0
        self.writer = CallWriter(self.recorder, keeps_by_site(self.keep, sorted(self.layer_counts)), describe=self._descriptions.get,
                                 layer_counts=self.layer_counts, block_bytes=self.block_bytes)
        for path, module in self.modules.items():
            yield module.register_forward_pre_hook(self._enter_hook(path))
            yield module.register_forward_hook(self._exit_hook(path), always_call=True)
        mode = _Interceptor(self)
        mode.__enter__()
        yield _ModeHandle(mode)

    def _restore(self) -> None:
        super()._restore()
        if self.uncaptured_calls:
            warnings.warn(f"{self.path}: {self.uncaptured_calls} scaled_dot_product_attention call(s) ran outside the captured "
                          f"modules and were not written; pass modules= (see attnformat.adapters.sdpa.find_attention_modules)",
                          stacklevel=3)
            self.uncaptured_calls = 0

    def _enter_hook(self, path: str):
        def hook(module, args):
            self._running.append(path)
            self._calls[path] = 0

        return hook

    def _exit_hook(self, path: str):
        def hook(module, args, output):
            if self._running and self._running[-1] == path:
                self._running.pop()

        return hook

    def _intercepted(self, args, kwargs) -> None:
        if not self._running:
            self.uncaptured_calls += 1
            return
        path = self._running[-1]
        site, layer = self.sites[path]
        where = f"{self.path}:{site} [layer={layer}]"
        self._calls[path] += 1
        if self._calls[path] > 1:
            raise CaptureStateError(f"{where}: module {path!r} called scaled_dot_product_attention twice in one forward pass; "
                                    f"capture the modules that make one call each (modules=[...] with their paths)")
        if path in self._seen:
            raise CaptureStateError(f"{where}: module {path!r} ran twice in one capture (a decoding loop or shared weights?); "
                                    f"capture one forward pass per file")
        self._seen.add(path)
        call = dict(_SDPA_DEFAULTS)
        call.update(zip(_SDPA_ARGUMENTS, args))
        call.update(kwargs)
        query, key, mask = (_four_dims(call[name]) for name in ("query", "key", "attn_mask"))
        samples = torch.broadcast_shapes(query.shape[:1], key.shape[:1], mask.shape[:1] if mask is not None else (1,))[0]
        queries, keys = query.shape[-2], key.shape[-2]
        if site not in self._descriptions:
            self._descriptions[site] = self._description(site, path, call, mask, samples, queries, keys)
        attention_type = self._descriptions[site]["attrs"]["attention_type"]
        self.writer.write(AttentionCall.from_tensors(
            query, key, attn_mask=mask, is_causal=bool(call["is_causal"]), scale=call["scale"], module=self.modules[path],
            module_path=path, site=site, layer=layer, attention_type=attention_type, block_bytes=self.block_bytes))

    def _description(self, site: str, path: str, call: dict, mask, samples: int, queries: int, keys: int) -> dict:
        """Describe keywords of a site from its first call: attention type, causality, masks, and the user's tokens."""
        description = dict(self.tokens.get(site, {}))
        causal = queries == keys and (bool(call["is_causal"]) or _is_lower_triangular(mask, queries))
        attrs = {"attention_type": "self" if queries == keys else "cross", "causal": int(causal),
                 "module_class": type(self.modules[path]).__name__}
        attrs.update(description.pop("attrs", {}))
        allowed_keys, allowed_rows = _reachable(mask, samples, queries, keys)
        if allowed_keys is not None and not allowed_keys.all():
            description.setdefault("key_mask", allowed_keys)
            if attrs["attention_type"] == "self":
                allowed_rows = allowed_rows & allowed_keys
        if allowed_rows is not None and not allowed_rows.all():
            description.setdefault("query_mask", allowed_rows)
        description["attrs"] = attrs
        return description


def _four_dims(tensor):
    """(batch, heads, tokens, dim): a 3-d tensor is one sample's heads, further leading dims become the batch."""
    if tensor is None or tensor.dim() == 4:
        return tensor
    if tensor.dim() < 4:
        return tensor.reshape((1,) * (4 - tensor.dim()) + tuple(tensor.shape))
    return tensor.flatten(0, tensor.dim() - 4)


def _blocked(mask: torch.Tensor) -> torch.Tensor:
    """True where a mask hides a key: False in a boolean mask, -inf (or the dtype's minimum) in an additive one."""
    if mask.dtype == torch.bool:
        return ~mask
    return mask <= torch.finfo(mask.dtype).min


def _reachable(mask, samples: int, queries: int, keys: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per sample: keys some query may attend, and query rows with some key to attend (None without a mask)."""
    if mask is None:
        return None, None
    allowed = ~_blocked(mask.detach().cpu())
    while allowed.dim() < 4:
        allowed = allowed[None]
    if allowed.dim() > 4:
        allowed = allowed.flatten(0, allowed.dim() - 4)
    allowed = allowed.expand(samples, allowed.shape[1], queries, keys)
    return allowed.any(dim=(1, 2)).numpy(), allowed.any(dim=(1, 3)).numpy()


def _is_lower_triangular(mask, size: int) -> bool:
    """Whether a mask hides every later key from every query (a causal mask given explicitly, padding or not)."""
    if mask is None or mask.shape[-2:] != (size, size):
        return False
    blocked = _blocked(mask.detach().cpu())
    later = torch.triu(torch.ones(size, size, dtype=torch.bool), diagonal=1)
    return bool((blocked | ~later).all())
