"""HDF5 engine: netCDF4-compatible files written and read through h5netcdf.

netCDF4 has no float16, so float16 variables are stored as float32 (the spec's documented dtype
change); booleans are stored as int8 with xarray's ``dtype: bool`` marker and come back as bool.
Compression is deflate with the shuffle filter, which every netCDF-C build reads without plugins.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import xarray as xr

from attnformat.errors import UnreadableFileError


class Hdf5Engine:
    """An HDF5 file that netCDF-C can read (``.h5``, ``.nc``)."""

    name = "hdf5"

    def open_tree(self, path: Path) -> xr.DataTree:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = xr.open_datatree(str(path), engine="h5netcdf", chunks=None)
        except FileNotFoundError as error:
            raise UnreadableFileError(f"{path}: no such file") from error
        except Exception as error:  # h5py reports damage with several exception classes
            raise UnreadableFileError(f"{path}: not a readable HDF5/netCDF4 file ({type(error).__name__}: {error})") from error
        return tree.map_over_datasets(_strings_as_objects)

    def write_tree(self, tree: xr.DataTree, path: Path, encoding: dict, zarr_format: int) -> None:
        tree.to_netcdf(str(path), mode="w", engine="h5netcdf", encoding=encoding, invalid_netcdf=False)


def _strings_as_objects(dataset: xr.Dataset) -> xr.Dataset:
    # h5netcdf may hand short strings back as fixed-width numpy strings; the Zarr engine gives
    # Python strings (object). One dtype keeps trees from both engines identical.
    fixed = [name for name, variable in dataset.variables.items() if variable.dtype.kind == "U"]
    return dataset.assign({name: dataset[name].astype(object) for name in fixed if name in dataset.data_vars}).assign_coords(
        {name: dataset[name].astype(object) for name in fixed if name in dataset.coords}
    )
