"""What every product format shares: the one error for a damaged product, date labels, the grid's
coordinates, a stream-format date (formats 3-7) as a lazy engine cube, and the variable-rate model that decodes a
date. The formats themselves: ``corsa.formats.stream_format`` (3 and 4, variable-rate models) and
``corsa.formats.codebook_product`` (1 and 2, corsa512).
"""
from __future__ import annotations

from pathlib import Path

import corsa_udf
import numpy as np
from rasterio.transform import Affine

from corsa.codec.models import VariableRateCodec
from corsa.formats import series, stream_format
from corsa.formats.series import check_model

# Chunks of the 10 m cubes products are read into (a multiple of 4: whole level-1 cells).
REPLICA_CHUNK = 512

# One error for every format: a product file is missing, truncated, corrupt or inconsistent.
ProductError = stream_format.ProductError


def date_label(t) -> str:
    """The date part of file names: YYYY-MM-DD, or 'undated' for an input without dates."""
    import pandas as pd

    ts = pd.Timestamp(t) if t is not None else pd.NaT
    return "undated" if pd.isna(ts) else ts.strftime("%Y-%m-%d")


def grid_coords(shape: tuple[int, int], transform: Affine | None) -> dict[str, np.ndarray]:
    tr = transform or Affine.identity()
    return {"y": tr.f + (np.arange(shape[0]) + 0.5) * tr.e, "x": tr.c + (np.arange(shape[1]) + 0.5) * tr.a}


def latent_date_cube(folder: Path, date: str, codec: VariableRateCodec):
    """One stream-format date as a lazy (t, [z.., nodata(, refine_..(, filter_..))], y, x) cube on the 10 m input
    grid: blocks are entropy-decoded as chunks are computed, their integers replicated over their 4 x 4 cells,
    and a refined date's correction (formats 8 to 11) and its blocks' loop filters in bands of their own."""
    import dask.array as darr
    import pandas as pd
    import xarray as xr

    path = Path(folder) / stream_format.file_name(date)
    data, h = series.header(folder, date)
    check_model(h, codec)
    codec.level(h["quality"])
    mask = stream_format.read_mask(data, h, path.name)
    (hh, ww), side = h["shape"], 4 * h["block"]
    chunks = (tuple(min(side, hh - y) for y in range(0, hh, side)), tuple(min(side, ww - x) for x in range(0, ww, side)))
    per_row, stat = len(chunks[1]), path.stat()

    def load(block_info=None) -> np.ndarray:
        info = block_info[None]
        iy, ix = info["chunk-location"][1:]
        ints = series.block_ints(folder, date, iy * per_row + ix, codec)
        (y0, y1), (x0, x1) = info["array-location"][1:]
        return np.repeat(np.repeat(ints, 4, 1), 4, 2)[:, : y1 - y0, : x1 - x0]

    def refinement(block_info=None) -> np.ndarray:
        info = block_info[None]
        iy, ix = info["chunk-location"][1:]
        (y0, y1), (x0, x1) = info["array-location"][1:]
        cells = series.block_refinement(folder, date, iy * per_row + ix, codec).cells
        return codec.refiner.field(cells, codec.level(h["quality"]), (y1 - y0, x1 - x0))

    def loop_filter(block_info=None) -> np.ndarray:
        info = block_info[None]
        iy, ix = info["chunk-location"][1:]
        (y0, y1), (x0, x1) = info["array-location"][1:]
        r = series.block_refinement(folder, date, iy * per_row + ix, codec)
        return corsa_udf.filter_layout(r.weights, (y1 - y0, x1 - x0), codec.refiner.filter_shape, r.grid20)

    lat = darr.map_blocks(load, chunks=((codec.channels,),) + chunks, dtype=np.int16,
                          name=f"corsa3-{path}-{stat.st_mtime_ns}-{stat.st_size}")
    nodata = darr.from_array(mask, chunks=chunks) if mask is not None else darr.zeros((hh, ww), bool, chunks=chunks)
    layers, bands = [lat, nodata.astype(np.int16)[None]], list(corsa_udf.latent_bands(codec.channels))
    if h["refine_lengths"] is not None:     # a refined date: each band's correction (corsa_udf.REFINE_BANDS)
        layers.append(darr.map_blocks(refinement, chunks=((len(corsa_udf.REFINE_BANDS),),) + chunks, dtype=np.float32,
                                      name=f"corsa3-refine-{path}-{stat.st_mtime_ns}-{stat.st_size}"))
        bands += corsa_udf.REFINE_BANDS
        if codec.refiner.filter_shape:     # and each block's loop filter (corsa_udf.FILTER_BANDS)
            layers.append(darr.map_blocks(loop_filter, chunks=((len(corsa_udf.FILTER_BANDS),),) + chunks, dtype=np.float32,
                                          name=f"corsa3-filter-{path}-{stat.st_mtime_ns}-{stat.st_size}"))
            bands += corsa_udf.FILTER_BANDS
    cube_data = darr.concatenate(layers)[None]
    t = pd.DatetimeIndex([pd.NaT if date == "undated" else pd.Timestamp(date)])
    cube = xr.DataArray(cube_data, dims=("t", "bands", "y", "x"),
                        coords={"t": t, "bands": bands,
                                **grid_coords(h["shape"], h["transform"])},
                        attrs={"corsa_model_id": h["model_id"], "corsa_quality": h["quality"]})
    cube = cube.rio.write_crs(h["crs"]) if h["crs"] else cube
    return cube.rio.write_transform(h["transform"]) if h["transform"] is not None else cube


def stream_codec(folder: Path, date: str, model: str | Path | None = None) -> VariableRateCodec:
    """The variable-rate model that decodes a stream-format date: ``model`` if given, else the shipped
    model the file names; refused unless its decoder is the one that wrote the file."""
    path = Path(folder) / stream_format.file_name(date)
    h = stream_format.read_header(path.read_bytes(), path.name)
    codec = series.model_codec(str(model)) if model is not None else series.model_codec(h["model_id"])
    check_model(h, codec)
    return codec
