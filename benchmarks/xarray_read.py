"""Windowed reading through the xarray backend (``xr.open_dataset(product, engine="corsa")``).

    python -m benchmarks.xarray_read --out benchmarks/results/xarray_read.json

A full Sentinel-2 tile (10980 x 10980 px: the Major-TOM scene mirrored, ``benchmarks.scale``) is
compressed with the default model by ``corsa compress``; then: opening it; the first window read
(the decoder's session opened); then, with sessions open and no block's integers decoded before
each, in a fresh Dataset: a 512 x 512 window of one date on one block and across four; that one
block decoded alone (``blockwise.DateDecoder``: its integers and those its decoder reaches
entropy-decoded, then the network: the unit a window read is made of); and the whole date
(``corsa decompress``'s block path to a COG). A 16-date series of a
smaller mosaic (2136 px, 5 x 5 blocks) checks by counting that reading one window of every date
decodes only the blocks under it: decoder runs, and entropy-decoded blocks (the window's and those
its integers reach, references included). Targets (issue 29): window <= 2x one block, <= 1/20 of
the whole date; open < 1 s.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import corsa_udf
import xarray as xr

from corsa.app import cli
from corsa.blocks import blockwise
from corsa.codec.models import DEFAULT_MODEL
from corsa.core.machine import cpu_name
from corsa.formats import product, series, stream_format

from . import report
from .scale import write_mosaic

TILE = 10980
SERIES_SIZE, SERIES_DATES = 2136, 16


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _compress(folder: Path, source: Path) -> float:
    seconds, rc = _timed(lambda: cli.main(["compress", str(source), "-o", str(folder)]))
    if rc != 0:
        raise RuntimeError(f"corsa compress failed ({rc})")
    return seconds


def tile_figures(work: Path) -> dict:
    folder = work / "tile"
    compress_s = None
    if not stream_format.dates_in(folder):       # --work keeps the tile's product between runs
        write_mosaic(work / "tile.tif", TILE)
        compress_s = _compress(folder, work / "tile.tif")
    open_s, ds = _timed(lambda: xr.open_dataset(folder, engine="corsa", mask_and_scale=False))
    date = str(ds.time.values[0])[:10]
    first, _ = _timed(lambda: ds.reflectance.isel(time=0, y=slice(0, 512), x=slice(0, 512)).values)
    # Sessions are open from here on; each read below starts with no block's integers decoded.
    series.forget_blocks()
    on_block, _ = _timed(lambda: xr.open_dataset(folder, engine="corsa", mask_and_scale=False)
                         .reflectance.isel(time=0, y=slice(5120, 5632), x=slice(5120, 5632)).values)
    series.forget_blocks()
    across, _ = _timed(lambda: xr.open_dataset(folder, engine="corsa", mask_and_scale=False)
                       .reflectance.isel(time=0, y=slice(4864, 5376), x=slice(4864, 5376)).values)
    series.forget_blocks()
    decoder = blockwise.DateDecoder(folder, date, product.stream_codec(folder, date))
    ys, xs = (s[10] for s in decoder.spans())
    one_block, _ = _timed(lambda: decoder.block(ys, xs, *decoder.inputs(ys, xs, None)))
    whole, _ = _timed(lambda: blockwise.decompress_date(folder, date, decoder.codec, work / "whole.tif"))
    return {"pixels": TILE * TILE, "blocks": len(decoder.spans()[0]) * len(decoder.spans()[1]),
            "compress_s": None if compress_s is None else round(compress_s, 1), "open_s": round(open_s, 3),
            "first_window_s": round(first, 3),
            "window_on_one_block_s": round(on_block, 3), "window_across_four_blocks_s": round(across, 3),
            "one_block_alone_s": round(one_block, 3), "whole_date_s": round(whole, 1),
            "window_over_block": round(on_block / one_block, 2),
            "window_across_over_block": round(across / one_block, 2),
            "window_share_of_whole_date": round(on_block / whole, 5),
            "window_across_share_of_whole_date": round(across / whole, 5)}


def series_figures(work: Path) -> dict:
    (work / "dates").mkdir()
    for i in range(SERIES_DATES):
        write_mosaic(work / "dates" / f"s{i:02d}.tif", SERIES_SIZE, date_index=i)
    _compress(work / "series", work / "dates")
    folder = work / "series"
    decoder_runs, entropy = [], []
    synthesise = corsa_udf.synthesise
    corsa_udf.synthesise = lambda *a, **k: decoder_runs.append(1) or synthesise(*a, **k)
    series.forget_blocks()
    try:
        ds = xr.open_dataset(folder, engine="corsa", mask_and_scale=False)
        seconds, _ = _timed(lambda: ds.reflectance.isel(y=slice(1024, 1536), x=slice(1024, 1536)).values)
        entropy = series._block_ints.cache_info().misses
    finally:
        corsa_udf.synthesise = synthesise
    blocks = (-(-SERIES_SIZE // blockwise.BLOCK_PX)) ** 2
    return {"size_px": SERIES_SIZE, "dates": SERIES_DATES, "blocks_per_date": blocks, "window": "512 x 512 px, the middle block",
            "read_s": round(seconds, 2), "decoder_runs": len(decoder_runs),
            "entropy_decoded_blocks": entropy, "entropy_decoded_per_date": round(entropy / SERIES_DATES, 2),
            "all_blocks_of_all_dates": blocks * SERIES_DATES}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/xarray_read.json"))
    p.add_argument("--no-tile", action="store_true", help="the series part only (the tile takes minutes)")
    p.add_argument("--work", type=Path, help="a folder kept between runs (the tile's product is made once)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="corsa-xr-") as tmp:
        result = {"model": DEFAULT_MODEL, "cpu": cpu_name(), "series": series_figures(Path(tmp))}
        if not args.no_tile:
            work = args.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            result["tile"] = tile_figures(work)
    return report.save(result, args.out)


if __name__ == "__main__":
    main()
