"""Storage engines: Zarr (directory or zip) and HDF5 (netCDF4-compatible), behind one interface.

The rest of attnformat calls :func:`engine_for` and uses the returned engine's ``open_tree`` and
``write_tree``; nothing else asks which engine a path uses.
"""

from attnformat.engines.common import Engine, Location, engine_for, engine_name_for_path

__all__ = ["Engine", "Location", "engine_for", "engine_name_for_path"]
