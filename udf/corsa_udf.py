"""openEO UDF: CORSA compress / decompress of Sentinel-2 L2A cubes with onnxruntime.

Self-contained (numpy, xarray, onnxruntime): a back end runs this file alone. The context says
    mode:   "compress" (10 bands -> idx0, idx1, nodata), "decompress" (back to 10 bands) or
            "classify" (the codes -> band "class": class values, 0 = nodata; a variable-rate model's
            own head, scl.onnx or landcover.onnx, or a codebook model's classifier)
    model:  folder or base URL holding model_card.json, encoder.onnx / decoder.onnx (/ features.onnx,
            latent_model.npz)
    quality: quality level of a variable-rate model (its card's "qualities"; default its default)
    classifier: folder or base URL holding classifier.onnx (mode "classify" of a codebook model)
    classes: (mode "classify") "scl" (scene classes, the default) or "landcover": the head of a
            variable-rate model's card ("heads") that gives them
    sha256: {"encoder": ..., "decoder": ..., "features": ..., "classifier": ...} (optional) refuse files that differ
    kernels: (mode "decompress") "auto" (default: a model's decoder_int8.onnx where its card lists one, at
            the levels its card lists, its bright tiles decoded again by decoder.onnx: ``BrightGuard``),
            "int8" (that one at every level, every tile) or "fp32" (decoder.onnx)
    tile, overlap: tile size and overlap in 10 m pixels (multiples of 4)
    fill:   (mode "decompress") true: each date's nodata pixels get values from the other dates of
            the cube (``fill_date``) instead of 0
    dates:  (mode "decompress") the dates (YYYY-MM-DD) to return, stored ones or dates between them,
            rendered by the model's time head (between.onnx); the cube's t labels become these
    positions: (mode "decompress") true: also the bands POSITION_BANDS, for mode "render"
    mode "render": a decoded cube with positions, brought to smaller pixels by resample_spatial
            "near", rendered there by the model's space head (render.onnx) -> the 10 bands
A variable-rate model (card kind "variable-rate", corsa2) compresses to its integer latent instead:
bands z00, z01, ... (one per latent channel, on the 40 m grid) and nodata, replicated likewise.
A cube may also carry REFINE_BANDS (a refined product read by the embedded engine: each band's
brightness correction in DN, on the 10 m grid): "decompress" adds them to each date's decoding,
before its gaps are filled from the other dates or a date between them is rendered.
On a geopyspark back end the job option udf-dependency-archives unpacks "<URL>#onnx_deps" (onnxruntime,
where the runtime lacks it) and "<URL>#models" into the working directory: onnx_deps goes on the
Python path at import, and the model parameter's default ("models/<id>") points into models.
apply_metadata tells the back end the bands a mode returns without running it.
Both modes keep the cube's 10 m grid, as apply_neighborhood requires: the indices come out
replicated over the 10 m pixels of their cell (2x2 for level 0, 4x4 for level 1), so a "near"
resample to 20 m (or a [::2, ::2] / [::4, ::4] slice) recovers them exactly. The nodata band
(1 where the input had NaN or all bands 0) comes back as 0 after decompression. Classes are
computed on the 20 m grid from the codebook vectors alone (no decoding) and replicated likewise.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import sys
import tempfile
import urllib.request
from typing import TYPE_CHECKING, Any, Callable, List, NamedTuple, Optional, Tuple

import numpy as np

if TYPE_CHECKING:
    import xarray as xr

DEPENDENCY_FOLDER = "onnx_deps"
if os.path.isdir(DEPENDENCY_FOLDER) and os.path.abspath(DEPENDENCY_FOLDER) not in sys.path:
    sys.path.insert(0, os.path.abspath(DEPENDENCY_FOLDER))

BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
INDEX_BANDS = ("idx0", "idx1", "nodata")
REFINE_BANDS = tuple(f"refine_{b}" for b in BANDS)
# A refined model's compress output carries each band's refinement cell symbols (``refine_symbols``)
# in bands of their own before nodata, each at its cell's first 40 m cell: saved with the latent.
CELL_BANDS = tuple(f"cell_{b}" for b in BANDS)
BLOCK_PX = 512                  # px per side of a product's block, whose refinement cells start at its corner
REFINE_LIMIT = (1 << 14) - 1    # |cell symbol| at most: a symbol minus its band's offset fits 16 bits
STRIDE0, STRIDE1 = 2, 4


class UdfError(ValueError):
    """The cube or the context does not fit the CORSA UDF."""


def _fetch(model: str, name: str, sha256: Optional[str]) -> str:
    """Local path of a model file; a URL is downloaded once into a cache folder."""
    if "://" in model:
        cache = os.path.join(tempfile.gettempdir(), "corsa_models", hashlib.sha1(model.encode()).hexdigest()[:16])
        os.makedirs(cache, exist_ok=True)
        path = os.path.join(cache, name)
        if not os.path.exists(path):
            part = path + ".part"
            urllib.request.urlretrieve(model.rstrip("/") + "/" + name, part)
            os.replace(part, path)
    else:
        path = os.path.join(model, name)
    if not os.path.isfile(path):
        raise UdfError(f"model file {path} not found")
    if sha256:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != sha256:
            raise UdfError(f"model file {path} does not match sha256 {sha256}")
    return path


@functools.lru_cache(maxsize=1)
def _return_freed_activations() -> None:
    """Fix glibc's mmap threshold at 1 MiB (where glibc is the C library).

    By default glibc raises the threshold to the largest block freed (up to 32 MiB); from then on
    onnxruntime's activations (tens of MB per layer) come from heap arenas that fragment and are not
    given back, so a process's memory crept up with the number of chunks it had run. Above a fixed
    threshold every such block is mapped on its own and returned when freed (BENCHMARKS.md)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # another C library: leave its allocator alone
        pass


@functools.lru_cache(maxsize=8)
def session(path: str, threads: int = 0):
    """One onnxruntime session per model file and thread count: a UDF is called once per chunk."""
    import onnxruntime as ort

    _return_freed_activations()

    opts = ort.SessionOptions()
    # onnxruntime's arena on: the networks run on tiles of at most ``tile + 2 * overlap`` px, so it
    # stays at about one tile's peak, and layers reuse its memory instead of mapping and faulting in
    # fresh pages for every activation: decoding 2.3x and encoding 1.6x faster than with it off. No
    # memory pattern: it planned (and the arena kept) one block per tile shape (BENCHMARKS.md, issue 28).
    opts.enable_cpu_mem_arena = True
    opts.enable_mem_pattern = False
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _windows(n: int, tile: int, overlap: int):
    """(read_start, read_stop, keep_start, keep_stop) along one axis, all multiples of STRIDE1."""
    for start in range(0, n, tile):
        stop = min(start + tile, n)
        r0, r1 = max(0, start - overlap), min(n, stop + overlap)
        yield r0, r1, start - r0, stop - r0


def _pad(x: np.ndarray, multiple: int) -> np.ndarray:
    """``x`` edge-padded to whole multiples on its last two axes (``x`` itself where it has them)."""
    pads = [(0, 0)] * (x.ndim - 2) + [(0, -x.shape[-2] % multiple), (0, -x.shape[-1] % multiple)]
    return np.pad(x, pads, mode="edge") if pads[-1][1] or pads[-2][1] else x


def _zero_filled(dn: np.ndarray) -> np.ndarray:
    """DN as float32, NaN (and infinities) as 0; the caller's array stays as it was (copied only where
    it is not float32 or has such values: a window of 10 bands is tens of MB)."""
    x = np.asarray(dn, np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        x = x.copy() if np.shares_memory(x, dn) else x
        np.copyto(x, 0, where=bad)
    return x


def encode(encoder, dn: np.ndarray, tile: int = 512, overlap: int = 64) -> Tuple[np.ndarray, np.ndarray]:
    """(10, H, W) DN -> idx0 (H'/2, W'/2), idx1 (H'/4, W'/4), H' = H rounded up to a multiple of 4.

    Tiles of ``tile`` px are encoded with ``overlap`` px of context on each side, so the indices
    do not depend on where tile borders fall (up to the model's receptive field)."""
    x = _pad(_zero_filled(dn), STRIDE1)
    h, w = x.shape[1:]
    idx0 = np.empty((h // STRIDE0, w // STRIDE0), np.uint16)
    idx1 = np.empty((h // STRIDE1, w // STRIDE1), np.uint16)
    for y0, y1, ky0, ky1 in _windows(h, tile, overlap):
        for x0, x1, kx0, kx1 in _windows(w, tile, overlap):
            a, b = encoder.run(None, {"dn": x[None, :, y0:y1, x0:x1]})
            s0, s1 = STRIDE0, STRIDE1
            idx0[(y0 + ky0) // s0:(y0 + ky1) // s0, (x0 + kx0) // s0:(x0 + kx1) // s0] = \
                a[0, ky0 // s0:ky1 // s0, kx0 // s0:kx1 // s0]
            idx1[(y0 + ky0) // s1:(y0 + ky1) // s1, (x0 + kx0) // s1:(x0 + kx1) // s1] = \
                b[0, ky0 // s1:ky1 // s1, kx0 // s1:kx1 // s1]
    return idx0, idx1


def decode(decoder, idx0: np.ndarray, idx1: np.ndarray, tile: int = 512, overlap: int = 64) -> np.ndarray:
    """idx0, idx1 -> (10, H', W') float32 DN, decoded in overlapping tiles like ``encode``."""
    h, w = idx1.shape[0] * STRIDE1, idx1.shape[1] * STRIDE1
    out = np.empty((len(BANDS), h, w), np.float32)
    for y0, y1, ky0, ky1 in _windows(h, tile, overlap):
        for x0, x1, kx0, kx1 in _windows(w, tile, overlap):
            s0, s1 = STRIDE0, STRIDE1
            (rec,) = decoder.run(None, {
                "idx0": idx0[None, y0 // s0:y1 // s0, x0 // s0:x1 // s0].astype(np.int64),
                "idx1": idx1[None, y0 // s1:y1 // s1, x0 // s1:x1 // s1].astype(np.int64)})
            out[:, y0 + ky0:y0 + ky1, x0 + kx0:x0 + kx1] = rec[0, :, ky0:ky1, kx0:kx1]
    return out


def _tiles(h: int, w: int, tile: int, overlap: int) -> list:
    return [(ys, xs) for ys in _windows(h, tile, overlap) for xs in _windows(w, tile, overlap)]


def analyse(encoder, dn: np.ndarray, tile: int = 512, overlap: int = 32, map_tiles: Callable = map) -> np.ndarray:
    """Variable-rate models (corsa2): (10, H, W) DN -> latent (L, H'/4, W'/4) float32, before the
    quality level's gain, computed in overlapping tiles like ``encode``. ``map_tiles``: runs the tiles
    (a thread pool's runs them side by side; each writes its own part of the result)."""
    x = _pad(_zero_filled(dn), STRIDE1)
    h, w = x.shape[1:]
    s, out = STRIDE1, []

    def run(t: tuple) -> None:
        (y0, y1, ky0, ky1), (x0, x1, kx0, kx1) = t
        (y,) = encoder.run(None, {"dn": x[None, :, y0:y1, x0:x1]})
        if not out:
            out.append(np.empty((y.shape[1], h // s, w // s), np.float32))
        out[0][:, (y0 + ky0) // s:(y0 + ky1) // s, (x0 + kx0) // s:(x0 + kx1) // s] = \
            y[0, :, ky0 // s:ky1 // s, kx0 // s:kx1 // s]

    tiles = _tiles(h, w, tile, overlap)
    run(tiles[0])                   # the first gives the latent's channels
    for _ in map_tiles(run, tiles[1:]):
        pass
    return out[0]


def synthesise(decoder, latent: np.ndarray, tile: int = 512, overlap: int = 32, map_tiles: Callable = map) -> np.ndarray:
    """Variable-rate models: dequantised latent (L, h, w) -> (10, 4h, 4w) float32 DN, in tiles
    (``map_tiles`` runs them, as in ``analyse``)."""
    s = STRIDE1
    h, w = latent.shape[1] * s, latent.shape[2] * s
    if h <= tile and w <= tile:
        # one tile: the network's output as it is (a copy of it cost a date read through xarray 2%)
        return decoder.run(None, {"latent": latent[None]})[0][0]
    out = np.empty((len(BANDS), h, w), np.float32)

    def run(t: tuple) -> None:
        (y0, y1, ky0, ky1), (x0, x1, kx0, kx1) = t
        (rec,) = decoder.run(None, {"latent": latent[None, :, y0 // s:y1 // s, x0 // s:x1 // s]})
        out[:, y0 + ky0:y0 + ky1, x0 + kx0:x0 + kx1] = rec[0, :, ky0:ky1, kx0:kx1]

    for _ in map_tiles(run, _tiles(h, w, tile, overlap)):
        pass
    return out


# Gap filling (context "fill", the CLI's --fill): a date's gap pixels come from the other dates of
# the series, each brought to this date's light by a per-band gain and offset fitted on the pixels
# both show around the gap; per tile, the dates that fit best are averaged, weighted by their fit (a
# date cloudy or changed there fits badly; averaging also averages out their coding noise). Sizes
# chosen on the validation split's WorldStrat series (benchmarks.fill --split val).
FILL_TILE = 64         # px: one fit per date and tile
FILL_MARGIN = 32       # px around a tile that its fits also read
FILL_BORDER = 4        # px next to a gap left out of the fits: the codec blurs the gap's edge into them
FILL_DATES = 4         # the other dates nearest in time that may fill a date
FILL_AVERAGED = 1.5    # dates whose fit error is within this factor of the best one are averaged
FILL_MIN_PIXELS = 64   # fewer pixels seen by both: no fit, the date as it is, the nearest in time first
FILL_GAIN = (0.5, 2.0)


def fill_candidates(days: List[float], i: int, k: int = FILL_DATES) -> List[int]:
    """The ``k`` dates (indices into ``days``, days since any origin) nearest in time to date ``i``,
    nearest first, the earlier of two as near."""
    return sorted((j for j in range(len(days)) if j != i), key=lambda j: (abs(days[j] - days[i]), days[j]))[:k]


def _grown(mask: np.ndarray, r: int) -> np.ndarray:
    """``mask`` grown by ``r`` px in every direction (a square), with numpy alone."""
    c = np.pad(np.pad(mask.astype(np.int32), r).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    k = 2 * r + 1
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) > 0


def _fit(target: np.ndarray, other: np.ndarray, both: np.ndarray) -> Tuple[float, np.ndarray, np.ndarray]:
    """Mean squared error, gain and offset per band of ``target ~ gain * other + offset`` over ``both``."""
    if both.sum() < FILL_MIN_PIXELS:
        return np.inf, np.ones((len(target), 1, 1)), np.zeros((len(target), 1, 1))
    x, y = other[:, both].astype(np.float64), target[:, both].astype(np.float64)
    mx, my = x.mean(1, keepdims=True), y.mean(1, keepdims=True)
    # The small constant keeps a flat patch (water, shadow) from getting an extreme gain.
    gain = np.clip(((x - mx) * (y - my)).mean(1, keepdims=True) / (((x - mx) ** 2).mean(1, keepdims=True) + 100.0),
                   *FILL_GAIN)
    offset = my - gain * mx
    return float(((gain * x + offset - y) ** 2).mean()), gain[:, :, None], offset[:, :, None]


def fill_date(target: np.ndarray, gap: np.ndarray, others: List[np.ndarray], other_gaps: List[np.ndarray]) -> np.ndarray:
    """A decoded date (bands, H, W) with its ``gap`` pixels (H, W) predicted from ``others`` (decoded
    dates of the same window, nearest in time first) with their own gaps; tiles of FILL_TILE px
    from the window's corner. Pixels no other date shows stay as they are."""
    out = target.astype(np.float32, copy=True)
    unfit = _grown(gap, FILL_BORDER)
    h, w = gap.shape
    for y0 in range(0, h, FILL_TILE):
        for x0 in range(0, w, FILL_TILE):
            tile = (slice(None), slice(y0, y0 + FILL_TILE), slice(x0, x0 + FILL_TILE))
            todo = gap[tile[1:]].copy()
            if not todo.any():
                continue
            near = (slice(None), slice(max(0, y0 - FILL_MARGIN), y0 + FILL_TILE + FILL_MARGIN),
                    slice(max(0, x0 - FILL_MARGIN), x0 + FILL_TILE + FILL_MARGIN))
            fits = sorted((_fit(target[near], o[near], ~unfit[near[1:]] & ~g[near[1:]]) + (n,)
                           for n, (o, g) in enumerate(zip(others, other_gaps))), key=lambda f: (f[0], f[3]))
            predicted = [(gain * others[n][tile] + offset, ~other_gaps[n][tile[1:]], err) for err, gain, offset, n in fits]
            if np.isfinite(fits[0][0]):
                close = [(v, shown / max(err, 1.0)) for v, shown, err in predicted if err <= FILL_AVERAGED * fits[0][0]]
                weight = sum(wt for _, wt in close)
                use = todo & (weight > 0)
                out[tile][:, use] = (sum(v * wt for v, wt in close) / np.where(weight > 0, weight, 1))[:, use]
                todo &= ~use
            for v, shown, _ in predicted:   # pixels the best-fitting dates do not show
                use = todo & shown
                out[tile][:, use] = v[:, use]
                todo &= ~use
    return out


# A date between stored dates (context "dates", the CLI's --date): the model's time head
# (between.onnx) blends, pixel by pixel, the decodes of the stored dates around it.
BETWEEN_DATES = 4
BETWEEN_PRIOR_FLOOR = 0.02   # a candidate linear interpolation leaves out can still be chosen
BETWEEN_GUARD_RADIUS = 32    # px around a pixel whose left-out candidates weigh head against linear


def linear_weights(dt: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """(K,) float32: linear interpolation's weights of candidates at ``dt`` days (signed) from the
    query date, between the nearest shown ones before and after (all on the one side's nearest
    when the other has none); 0 for the others."""
    w = np.zeros(len(dt), np.float32)
    before = [k for k in range(len(dt)) if shown[k] and dt[k] < 0]
    after = [k for k in range(len(dt)) if shown[k] and dt[k] > 0]
    if before and after:
        b, a = max(before, key=lambda k: dt[k]), min(after, key=lambda k: dt[k])
        w[b], w[a] = dt[a] / (dt[a] - dt[b]), -dt[b] / (dt[a] - dt[b])
    elif before or after:
        w[max(before, key=lambda k: dt[k]) if before else min(after, key=lambda k: dt[k])] = 1
    return w


def between_candidates(days: List[float], t: float, k: int = BETWEEN_DATES) -> List[int]:
    """Indices of the stored dates (``days``, sorted) that render day ``t``: the k // 2 nearest
    before and after it, the other side making up for a side with fewer; never a date at ``t``."""
    before = [i for i in range(len(days)) if days[i] < t][::-1]
    after = [i for i in range(len(days)) if days[i] > t]
    nb = min(len(before), max(k // 2, k - len(after)))
    na = min(len(after), k - nb)
    return sorted(before[:nb] + after[:na])


def between(head, decoded: np.ndarray, gaps: np.ndarray, days: List[float], t: float) -> np.ndarray:
    """Day ``t`` rendered from decoded dates (n, bands, H, W) with their gaps (n, H, W) on ``days``
    (sorted, t strictly inside), 0 where no candidate shows a pixel: pixel by pixel, the mix of the
    time head's blend (``head_blend``) and linear interpolation (``linear_between``) that best
    renders the candidates themselves, each left out in turn, in the BETWEEN_GUARD_RADIUS px around.
    A head trained on other places can do worse than linear interpolation on this one: the
    product's own dates say where, and there it falls back (with no candidate between two others,
    nothing says so: linear interpolation)."""
    pick = between_candidates(days, t)
    linear = linear_between(decoded, gaps, days, t)
    fit, scale = np.zeros(gaps.shape[1:]), np.zeros(gaps.shape[1:])
    for j in pick[1:-1]:
        rest = [i for i in pick if i != j]
        args = (decoded[rest], gaps[rest], [days[i] for i in rest], days[j])
        lin = linear_between(*args)
        away = head_blend(head, *args) - lin
        terms = _share_terms(away, decoded[j] - lin, ~gaps[j] & ~gaps[rest].all(0))
        fit, scale = fit + terms[0], scale + terms[1]
    if not scale.any():
        return linear
    weight = _local_share(fit, scale, BETWEEN_GUARD_RADIUS, 0)
    return linear + weight * (head_blend(head, decoded, gaps, days, t) - linear)


def _share_terms(away: np.ndarray, error: np.ndarray, use: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per pixel (bands first), where ``use``: the sums over the bands of ``away`` (a model's departure from
    the simple way) times ``error`` (the truth's), and of ``away`` squared: the least-squares share's terms."""
    return (np.where(use, (away * error).sum(0, dtype=np.float64), 0),
            np.where(use, (away.astype(np.float64) ** 2).sum(0), 0))


def _local_share(fit: np.ndarray, scale: np.ndarray, radius: int, none: float) -> np.ndarray:
    """float32: the least-squares share of a model's departure from the simple way, ``fit`` / ``scale``
    summed over the (2 ``radius`` + 1)-px square around each pixel, clipped to [0, 1]; ``none`` where
    nothing there says."""
    fit, scale = _box_sum(fit, radius), _box_sum(scale, radius)
    return np.where(scale > 0, np.clip(fit / np.where(scale > 0, scale, 1), 0, 1), none).astype(np.float32)


def _box_sum(a: np.ndarray, r: int) -> np.ndarray:
    """Sums of ``a`` (H, W) over the (2r + 1)-px squares around each pixel, cut at the edges."""
    c = np.pad(a, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    y0, x0 = np.clip(np.arange(a.shape[0]) - r, 0, None), np.clip(np.arange(a.shape[1]) - r, 0, None)
    y1, x1 = np.minimum(np.arange(a.shape[0]) + r + 1, a.shape[0]), np.minimum(np.arange(a.shape[1]) + r + 1, a.shape[1])
    return c[y1][:, x1] - c[y0][:, x1] - c[y1][:, x0] + c[y0][:, x0]


def head_blend(head, decoded: np.ndarray, gaps: np.ndarray, days: List[float], t: float) -> np.ndarray:
    """Day ``t`` as the time head blends the candidates, 0 where none shows a pixel."""
    pick = between_candidates(days, t)
    images = np.zeros((1, BETWEEN_DATES) + decoded.shape[1:], np.float32)
    valid = np.zeros((1, BETWEEN_DATES) + decoded.shape[2:], np.float32)
    dt = np.zeros((1, BETWEEN_DATES), np.float32)
    for k, j in enumerate(pick):
        images[0, k], valid[0, k], dt[0, k] = decoded[j], ~gaps[j], days[j] - t
    prior = linear_weights(dt[0], np.arange(BETWEEN_DATES) < len(pick))[None]
    (out,) = head.run(None, {"images": images, "dt": dt, "valid": valid, "prior": prior})
    return np.where(valid[0].any(0), out[0], 0)


def linear_between(decoded: np.ndarray, gaps: np.ndarray, days: List[float], t: float) -> np.ndarray:
    """Day ``t`` by linear interpolation in time, pixel by pixel, between the nearest candidates
    (``between_candidates``) before and after it that show the pixel (the one side alone where the
    other shows none); 0 where none does. What a model without a time head renders."""
    pick = between_candidates(days, t)

    def nearest(side: List[int]) -> Tuple[np.ndarray, np.ndarray]:
        img = np.zeros(decoded.shape[1:], np.float32)
        day = np.full(gaps.shape[1:], np.nan)
        for j in sorted(side, key=lambda j: -abs(days[j] - t)):      # the nearer ones last: they win
            shown = ~gaps[j]
            img[:, shown], day[shown] = decoded[j][:, shown], days[j]
        return img, day

    before, before_day = nearest([j for j in pick if days[j] < t])
    after, after_day = nearest([j for j in pick if days[j] > t])
    has_b, has_a = ~np.isnan(before_day), ~np.isnan(after_day)
    span = np.where(has_b & has_a, np.nan_to_num(after_day) - np.nan_to_num(before_day), 1.0)
    w_after = np.where(has_b & has_a, (t - np.nan_to_num(before_day)) / span, has_a.astype(np.float64))
    out = (1 - w_after).astype(np.float32) * before + w_after.astype(np.float32) * after
    out[:, ~(has_b | has_a)] = 0
    return out


# A decoded date at smaller pixels (mode "render", the CLI's --scale): the model's space head
# (render.onnx) queried at each pixel's centre, in stored pixels, with its size there. The cube
# comes from resample_spatial "near" of a decode with positions: each stored pixel's centre in
# stored pixels, modulo a power of two of CRS units (exact in float32), the stored pixel size, and
# its guard weight (``render_guard``); "near" carries them to every smaller pixel it fills, so the
# stored grid is found again.
POSITION_BANDS = ("stored_x", "stored_y", "stored_dx", "stored_dy", "stored_guard")
POSITION_PERIOD_PX = 1024
# The space head is bicubic interpolation plus what it learnt on the training scenes; on places unlike
# them (L1C, TerraMesh) corsa3.1's rendered up to 3 dB below bicubic alone. The date says where: its
# own 2 x 2 averages rendered back at x2, by the head and by bicubic, against it (BENCHMARKS.md,
# issue 28), block by block. RENDER_GUARD_RADIUS: stored px around a pixel whose self-check weighs the two.
RENDER_GUARD_RADIUS = 8
CUBIC_A = -0.75      # the head's own bicubic (torch's grid_sample)


def _keys(t: np.ndarray) -> np.ndarray:
    """(N,) offsets in [0, 1) -> (N, 4) bicubic weights of the taps at -1, 0, 1, 2."""
    a = np.float32(CUBIC_A)

    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


def cubic_points(image: np.ndarray, coord: np.ndarray) -> np.ndarray:
    """(10, N) float32: bicubic interpolation of ``image`` (10, h, w) at ``coord`` (N, 2: y, x in its
    pixels, centres at i + 0.5), taps beyond its edges held at them (the space head's base)."""
    taps = []
    for k, n in enumerate(image.shape[1:]):
        u = coord[:, k].astype(np.float64) - 0.5
        i0 = np.floor(u)
        taps.append((np.clip(i0.astype(np.intp)[:, None] + np.arange(-1, 3), 0, n - 1), _keys((u - i0).astype(np.float32))))
    (rows, wy), (cols, wx) = taps
    out = np.zeros((len(image), len(coord)), np.float32)
    for a in range(4):
        part = np.zeros_like(out)
        for b in range(4):
            part += image[:, rows[:, a], cols[:, b]] * wx[:, b]
        out += part * wy[:, a]
    return out


def render_guard(head, image: np.ndarray) -> np.ndarray:
    """(h, w) float32 in [0, 1]: how much of the space head's departure from bicubic to keep around
    each pixel of a block of a decoded date ``image`` (10, h, w; nodata all 0), the share that best
    renders the block from its own 2 x 2 averages (cells from its first pixel) within
    RENDER_GUARD_RADIUS px (1 where nothing says: a block under 4 px a side, or all nodata). From the
    block's pixels alone: every reader has them decoded alike (a decompress chunk's overlap is not)."""
    h2, w2 = image.shape[1] // 2, image.shape[2] // 2
    if h2 < 2 or w2 < 2:
        return np.ones(image.shape[1:], np.float32)
    part = image[:, :2 * h2, :2 * w2].astype(np.float32)
    shown = (part != 0).any(0)
    cells = shown.reshape(h2, 2, w2, 2).all((1, 3))
    small = np.where(cells, part.reshape(len(part), h2, 2, w2, 2).mean((2, 4)), 0).astype(np.float32)
    # A quarter of the pixels, in each 4 x 4 px one at each place of a 2 x 2 cell: half the time, the
    # sums over the radius as telling.
    rows, cols = np.nonzero((np.arange(2 * h2) % 2 == np.arange(2 * h2) // 2 % 2)[:, None]
                            & (np.arange(2 * w2) % 2 == np.arange(2 * w2) // 2 % 2)[None, :])
    coord = np.stack([(rows + 0.5) / 2, (cols + 0.5) / 2], -1).astype(np.float32)
    (value,) = head.run(None, {"image": small[None], "coord": coord[None], "cell": np.full_like(coord, 0.5)[None]})
    base = cubic_points(small, coord)
    fit, scale = np.zeros(shown.shape), np.zeros(shown.shape)
    fit[rows, cols], scale[rows, cols] = _share_terms(value[0].T - base, part[:, rows, cols] - base,
                                                      shown[rows, cols] & cells[rows // 2, cols // 2])
    weight = _local_share(fit, scale, RENDER_GUARD_RADIUS, 1)
    return np.pad(weight, ((0, image.shape[1] - 2 * h2), (0, image.shape[2] - 2 * w2)), mode="edge")


def _period(step: float) -> float:
    return float(2.0 ** np.ceil(np.log2(POSITION_PERIOD_PX * abs(step))))


def _in_pixels(coords: np.ndarray, step: float) -> np.ndarray:
    """Coordinates (CRS units) in pixels of ``step``, modulo ``_period(step)``: small numbers, exact."""
    return np.mod(coords.astype(np.float64), _period(step)) / step


def _wrapped(d: np.ndarray, step: float) -> np.ndarray:
    period = _period(step) / abs(step)
    return (d + period / 2) % period - period / 2


def regular(coords: np.ndarray) -> np.ndarray:
    """Pixel centres of a regular grid (float64) from coordinates that may be rounded: the line
    through them. openeo-geopyspark-driver hands float32 coordinates; at UTM eastings their
    spacing is off by up to 0.3% of a 10 m pixel, in degrees by a few percent, which the positions
    (thousands of pixels modulo a period) would multiply."""
    c = np.asarray(coords, np.float64)
    if len(c) < 2:
        return c
    i = np.arange(len(c), dtype=np.float64) - (len(c) - 1) / 2
    return c.mean() + i * (i @ (c - c.mean())) / (i @ i)


def positions(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(4, H, W) float32 POSITION_BANDS of a grid with pixel centres ``x`` (W,) and ``y`` (H,)."""
    if len(x) < 2 or len(y) < 2:
        raise UdfError("positions need chunks of at least 2 x 2 pixels")
    x, y = regular(x), regular(y)
    dx, dy = (float(np.float32(v[1] - v[0])) for v in (x, y))
    out = np.empty((4, len(y), len(x)), np.float32)
    out[0], out[1] = _in_pixels(x, dx)[None, :], _in_pixels(y, dy)[:, None]
    out[2], out[3] = dx, dy
    return out


def render_points(head, image: np.ndarray, coord: np.ndarray, cell: np.ndarray, guard: np.ndarray) -> np.ndarray:
    """(10, N) uint16: the space head over ``image`` (10, h, w) at ``coord`` (N, 2: y, x in its
    pixels, centres at i + 0.5) for output pixels of ``cell`` (N, 2) of its pixels, keeping the
    share ``guard`` (N,) of its departure from bicubic (``render_guard`` of the query's pixel). A
    query on a nodata pixel (all bands 0) stays 0: the head would invent it from the zeros."""
    image, coord = image.astype(np.float32, copy=False), coord.astype(np.float32, copy=False)
    (value,) = head.run(None, {"image": image[None], "coord": coord[None], "cell": cell.astype(np.float32)[None]})
    base = cubic_points(image, coord)
    value = base + guard.astype(np.float32) * (value[0].T - base)
    rows = np.clip(np.floor(coord[:, 0]).astype(int), 0, image.shape[1] - 1)
    cols = np.clip(np.floor(coord[:, 1]).astype(int), 0, image.shape[2] - 1)
    shown = (image[:, rows, cols] != 0).any(0)
    return np.where(shown, np.clip(np.rint(value), 0, 65535), 0).astype(np.uint16)


def render_scene(head, scene: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(10, H, W) uint16 from a scene of BANDS + POSITION_BANDS on a grid of centres ``x``, ``y``
    (smaller pixels than the stored ones, or the same): the stored image found again, then the head."""
    values, (bx, by, sdx, sdy, guard) = scene[:len(BANDS)], scene[len(BANDS):]
    out = np.zeros(values.shape, np.uint16)
    shown = np.isfinite(bx) & np.isfinite(by) & np.isfinite(sdx) & (sdx != 0) & (sdy != 0)
    if not shown.any():
        return out
    r0, c0 = np.argwhere(shown)[0]
    dx, dy = float(sdx[r0, c0]), float(sdy[r0, c0])
    cell = np.array([abs(y[1] - y[0]) / abs(dy) if len(y) > 1 else 1.0, abs(x[1] - x[0]) / abs(dx) if len(x) > 1 else 1.0])
    if cell.max() > 1 + 1e-6:
        raise UdfError(f"mode 'render' makes pixels smaller than the stored ones, not {cell.max():.3g} times larger: "
                       "for larger pixels, resample_spatial (method 'average') the decoded cube")
    # Each pixel's stored pixel, counted from the first one's; the offset of its centre in it.
    col = np.rint(_wrapped(bx - bx[r0, c0], dx))
    row = np.rint(_wrapped(by - by[r0, c0], dy))
    off_x = _wrapped(_in_pixels(x, dx)[None, :] - bx, dx)
    off_y = _wrapped(_in_pixels(y, dy)[:, None] - by, dy)
    col, row = col[shown].astype(int), row[shown].astype(int)
    col, row = col - col.min(), row - row.min()
    image = np.zeros((len(BANDS), row.max() + 1, col.max() + 1), np.float32)
    image[:, row, col] = np.nan_to_num(values[:, shown])
    coord = np.stack([row + 0.5 + off_y[shown], col + 0.5 + off_x[shown]], -1)
    out[:, shown] = render_points(head, image, coord, np.broadcast_to(cell, coord.shape), np.nan_to_num(guard[shown], nan=1))
    return out


def render_cube(cube: xr.DataArray, context: dict) -> xr.DataArray:
    model, _, _, sha = _settings(context)
    had_t = "t" in cube.dims
    cube, _ = _per_date(cube)
    missing = sorted(set(BANDS + POSITION_BANDS) - {str(b) for b in cube["bands"].values})
    if missing:
        raise UdfError(f"mode 'render' needs a decoded cube with positions (mode 'decompress', 'positions': true, "
                       f"then resample_spatial 'near'); it lacks bands {missing}")
    head = session(_fetch(model, "render.onnx", sha.get("render")), int(context.get("threads", 0)))
    data = cube.sel(bands=list(BANDS + POSITION_BANDS)).values.astype(np.float32)
    x, y = regular(cube["x"].values), regular(cube["y"].values)
    out = np.stack([render_scene(head, scene, x, y) for scene in data])
    return _like(cube, out, BANDS, had_t)


def replicate(idx: np.ndarray, factor: int, shape: Tuple[int, int]) -> np.ndarray:
    """(..., h, w) cells -> each over ``factor`` x ``factor`` pixels, cut to ``shape`` (a finer grid's y, x)."""
    return np.repeat(np.repeat(idx, factor, -2), factor, -1)[..., : shape[0], : shape[1]]


@functools.lru_cache(maxsize=8)
def card_of(model: str) -> dict:
    """The model's card: what kind of model it is, its latent and its quality levels."""
    with open(_fetch(model, "model_card.json", None)) as f:
        return json.load(f)


KERNELS = ("auto", "int8", "fp32")


# The card section that lists the levels a network's int8 file runs at by default.
INT8_SECTION = {"decoder": "int8", "encoder": "int8_encoder"}


def network_file(card: dict, context: dict, quality: Optional[int], network: str = "decoder") -> str:
    """The file (its card's files entry) ``network`` ("decoder" or "encoder") runs as at ``quality``,
    by the context's "kernels": "auto" (default) its int8 one (``<network>_int8.onnx``) where its card
    lists one, at the quality levels the card's int8 section lists (every level where it lists none:
    int8 costs the high levels of some models more than they gain); "int8" that one at every level;
    "fp32" the float one."""
    kernels = context.get("kernels", "auto")
    if kernels not in KERNELS:
        raise UdfError(f"kernels must be one of {', '.join(map(repr, KERNELS))}, not {kernels!r}")
    int8 = network + "_int8"
    if kernels == "fp32" or int8 not in card.get("files", {}):
        return network
    levels = card.get(INT8_SECTION[network], {}).get("levels")
    return int8 if kernels == "int8" or levels is None or quality is None or quality in levels else network


# int8 kernels lose up to 0.9 dB on snow and ice (a tile's loss grows with its share of pixels above
# 8000 DN: the decoder's int8 activation ranges were calibrated on scenes without them). "auto" decodes
# a tile again with the float decoder where more than BRIGHT_SHARE of its pixels are that bright in some
# band (int8 output). Chosen on 128 px blocks of corsa3.1's decodes: 3 of the validation split's 315
# are above 2% (they lose 0.05 dB on average: few tiles of ordinary scenes pay twice), the snow patches of
# BigEarthNet's configilm set (in no split) are above it and lose up to 0.57 dB at the default level.
BRIGHT_DN = 8000
BRIGHT_SHARE = 0.02


# Scene-class values above this one (cloud, cloud shadow/dark) mark a pixel unusable: what the service
# corsa_openeo_decompress_clear and `corsa decompress --clear` set to 0.
LAST_USABLE_CLASS = 4


def _bright(dn: np.ndarray) -> bool:
    """Whether more than BRIGHT_SHARE of a tile's pixels (bands, y, x) are above BRIGHT_DN in some band."""
    return bool((dn > BRIGHT_DN).any(0).mean() > BRIGHT_SHARE)


class BrightGuard:
    """A decoder session that runs ``int8``, and ``fp32`` instead on a tile that ``int8`` decodes
    bright (``_bright``). The choice is made on the int8 output, so on another CPU a tile right at
    the share may take the other decoder (its pixels then differ as the two decoders do)."""

    def __init__(self, int8, fp32):
        self.int8, self.fp32 = int8, fp32

    def run(self, names, feeds: dict) -> list:
        out = self.int8.run(names, feeds)
        return self.fp32.run(names, feeds) if _bright(out[0][0]) else out


def network_session(card: dict, context: dict, quality: Optional[int], open_file: Callable[[str], Any],
                    network: str = "decoder"):
    """The session ``network`` runs as at ``quality`` (``network_file``), ``open_file(name)`` opening one
    of the model's networks by name; where "auto" took an int8 decoder, ``BrightGuard`` around it and
    the float one."""
    name = network_file(card, context, quality, network)
    if name == "decoder_int8" and context.get("kernels", "auto") == "auto":
        return BrightGuard(open_file(name), open_file(network))
    return open_file(name)


def quantise(scaled: np.ndarray, deadzone: float = 0.0) -> np.ndarray:
    """A latent times its level's gain -> the integers a product stores (int16): rounded, each value first
    pulled ``deadzone`` towards 0 (a model card's "quantise"; 0: plain rounding)."""
    if deadzone:
        # sign(s) * floor(|s| + 0.5 - deadzone), as the cast truncates towards 0: the same integers, 10x faster
        pulled = np.copysign(0.5 - deadzone, scaled)
        pulled += scaled
        return np.clip(pulled, -(1 << 15), (1 << 15) - 1, out=pulled).astype(np.int16)
    return np.clip(np.rint(scaled), -(1 << 15), (1 << 15) - 1).astype(np.int16)


def deadzone_of(card: dict) -> float:
    """How far a model's encoder pulls its scaled latent towards 0 before rounding (0 for older models)."""
    return float((card.get("quantise") or {}).get("deadzone", 0.0))


def latent_bands(channels: int) -> Tuple[str, ...]:
    return tuple(f"z{i:02d}" for i in range(channels)) + ("nodata",)


@functools.lru_cache(maxsize=8)
def _gains(model: str, sha256: Optional[str]) -> Tuple[np.ndarray, np.ndarray]:
    with np.load(_fetch(model, "latent_model.npz", sha256)) as z:
        return z["gain"].astype(np.float32), z["inv_gain"].astype(np.float32)


def _variable_rate(model: str, context: dict) -> Optional[Tuple[dict, int, np.ndarray, np.ndarray]]:
    """(card, level index, gain, inverse gain) of a variable-rate model at the context's quality;
    None for a codebook model."""
    card = card_of(model)
    if card.get("kind") != "variable-rate":
        return None
    qualities = [q["quality"] for q in card["qualities"]]
    quality = int(context.get("quality") or card["default_quality"])
    if quality not in qualities:
        raise UdfError(f"model {card['id']} has quality levels {qualities}, not {quality}")
    level = qualities.index(quality)
    layer = card["qualities"][level].get("layer")
    if layer:      # a level made of a base and a residual layer: services store (and decode) its base only
        level = qualities.index(int(layer["base"]))
    gain, inv_gain = _gains(model, (context.get("sha256") or {}).get("latent_model"))
    return card, level, gain[level][:, None, None], inv_gain[level][:, None, None]


def _settings(context: dict) -> Tuple[str, int, int, dict]:
    model = context.get("model")
    if not model:
        raise UdfError("the UDF context needs 'model': a folder or URL with encoder.onnx and decoder.onnx")
    tile, overlap = int(context.get("tile", 512)), int(context.get("overlap", 64))
    if tile % STRIDE1 or overlap % STRIDE1:
        raise UdfError(f"tile ({tile}) and overlap ({overlap}) must be multiples of {STRIDE1}")
    return model, tile, overlap, context.get("sha256") or {}


def _per_date(cube: xr.DataArray) -> Tuple[xr.DataArray, list]:
    """Cube as (t, bands, y, x); a cube without t gets a single date."""
    dims = ("t", "bands", "y", "x") if "t" in cube.dims else ("bands", "y", "x")
    missing = set(dims) - set(cube.dims)
    if missing or cube.ndim != len(dims):
        raise UdfError(f"expected a cube with dims {dims}, got {cube.dims}")
    cube = cube.transpose(*dims)
    return (cube, list(cube["t"].values)) if "t" in dims else (cube.expand_dims(t=[None]), [None])


def nodata_of(scene: np.ndarray) -> np.ndarray:
    """(bands, y, x) -> True where any band is NaN or every band is 0."""
    return np.isnan(scene).any(0) | (scene == 0).all(0)


def _like(cube: xr.DataArray, data: np.ndarray, bands: Tuple[str, ...], had_t: bool) -> xr.DataArray:
    coords = {k: v for k, v in cube.coords.items() if k != "bands"}
    out = type(cube)(data, dims=cube.dims, coords={**coords, "bands": list(bands)})
    return out if had_t else out.isel(t=0, drop=True)


def _model_identity(model: str, context: dict) -> dict:
    """What a product records of the model: its id and the decoder's sha256 (local folders)."""
    sha = (context.get("sha256") or {}).get("decoder")
    path = os.path.join(model, "decoder.onnx")
    if not sha and "://" not in model and os.path.isfile(path):
        with open(path, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
    return {"corsa_model_id": os.path.basename(model.rstrip("/")), "corsa_decoder_sha256": sha or ""}


def _prepare(cube: xr.DataArray, context: dict, bands: Tuple[str, ...], model_file: str):
    """Common start of the modes: settings, the cube as (t, bands, y, x) float32, the session."""
    model, tile, overlap, _ = _settings(context)
    had_t = "t" in cube.dims
    cube, _ = _per_date(cube)
    missing = sorted(set(bands) - {str(b) for b in cube["bands"].values})
    if missing:
        raise UdfError(f"the cube lacks bands {missing}; it needs {', '.join(bands)}")
    if cube.dtype.kind not in "iuf":
        raise UdfError(f"the cube holds {cube.dtype} values; it needs integers or floats (DN or codes)")
    # sel copies the bands; a float32 cube's copy is not copied again
    return cube, had_t, cube.sel(bands=list(bands)).values.astype(np.float32, copy=False), _network(context, model_file), \
        (model, tile, overlap)


def _network(context: dict, name: str):
    """The session of the context's model's network ``name`` ("encoder", "decoder", ...)."""
    model, _, _, sha = _settings(context)
    return session(_fetch(model, f"{name}.onnx", sha.get(name)), int(context.get("threads", 0)))


def data_window(data: np.ndarray) -> Optional[Tuple[slice, slice]]:
    """The part (rows, columns) of a chunk (..., y, x) that holds data, None if none does.

    openeo-geopyspark-driver pads the chunks at its cube's border to full size with NoData, NaN
    once converted to float32 (``apply_tiles_spatiotemporal``); the networks would read it as
    dark ground and damage the image's edge. Rows and columns at the chunk's sides that are NaN in
    every band and date are that padding and are left out, as the CLI ends its windows at the
    scene's edge. The window starts on a whole 40 m cell of the chunk (STRIDE1), where the codes'
    cells lie."""
    finite = np.isfinite(data).reshape((-1,) + data.shape[-2:]).any(0)
    rows, cols = np.flatnonzero(finite.any(1)), np.flatnonzero(finite.any(0))
    if not len(rows):
        return None
    return (slice(rows[0] // STRIDE1 * STRIDE1, rows[-1] + 1), slice(cols[0] // STRIDE1 * STRIDE1, cols[-1] + 1))


def refine_symbols(error: np.ndarray, valid: Optional[np.ndarray], step: float, grid: int) -> np.ndarray:
    """(10, h, w) error (truth - decoded, DN) -> (10, ch, cw) int32 symbols of its grid x grid cells from
    its corner: the mean over each cell's ``valid`` pixels (all if None) in ``step``s, rounded (0 where
    none is valid). The refinement a refined model stores (``corsa.codec.refine_coder``)."""
    b, h, w = error.shape
    ch, cw = -(-h // grid), -(-w // grid)
    if (valid is None or valid.all()) and (h, w) == (ch * grid, cw * grid):
        # a whole block of pixels: summed in float64 as below, without its padded float64 copy (1.5x faster)
        mean = error.reshape(b, ch, grid, cw, grid).sum((2, 4), dtype=np.float64) / (grid * grid)
        return np.clip(np.rint(mean / step), -REFINE_LIMIT, REFINE_LIMIT).astype(np.int32)
    e = np.zeros((b, ch * grid, cw * grid), np.float64)
    v = np.zeros((ch * grid, cw * grid), np.float64)
    v[:h, :w] = 1.0 if valid is None else valid
    e[:, :h, :w] = np.where(v[:h, :w] > 0, error, 0)          # nodata may be NaN
    n = v.reshape(ch, grid, cw, grid).sum((1, 3))
    s = e.reshape(b, ch, grid, cw, grid).sum((2, 4))
    mean = np.divide(s, n, out=np.zeros_like(s), where=n > 0)
    return np.clip(np.rint(mean / step), -REFINE_LIMIT, REFINE_LIMIT).astype(np.int32)


def refine_grid(card: dict) -> Optional[int]:
    """The side (px) of a refined model's refinement cells, None for a model without."""
    return (card.get("refine") or {}).get("grid_px")


@functools.lru_cache(maxsize=8)
def _refine_steps(model: str, sha256: Optional[str]) -> np.ndarray:
    with np.load(_fetch(model, "refine_model.npz", sha256)) as z:
        return z["steps"].astype(np.int64)


def _chunk_cells(out: np.ndarray, error: np.ndarray, valid: np.ndarray, step: float, grid: int,
                 window: Tuple[slice, slice]) -> None:
    """Writes into ``out`` (10, chunk y, chunk x) the ``refine_symbols`` of the chunk's data ``window``,
    on cells from the chunk's corner (where the product's blocks' cells lie when chunks overlap by a
    multiple of the cell side), each at its cell's first 40 m cell (the rest 0: the latent file they
    ride in stays small; a cell's first 40 m cell lies in the scene, where the window may begin
    later)."""
    oy, ox = window[0].start % grid, window[1].start % grid
    h, w = error.shape[1:]
    e = np.zeros((len(error), oy + h, ox + w), np.float32)
    v = np.zeros((oy + h, ox + w), bool)
    e[:, oy:, ox:], v[oy:, ox:] = error, valid
    cells = refine_symbols(e, v, step, grid)
    (b, ch, cw), (y0, x0) = cells.shape, (window[0].start - oy, window[1].start - ox)
    sparse = np.zeros((b, ch, grid, cw, grid), out.dtype)
    sparse[:, :, :STRIDE1, :, :STRIDE1] = cells[:, :, None, :, None]
    sparse = sparse.reshape(b, ch * grid, cw * grid)
    out[:, y0:y0 + ch * grid, x0:x0 + cw * grid] = sparse[:, :out.shape[1] - y0, :out.shape[2] - x0]


def bilinear_field(values: np.ndarray, ys: tuple, xs: tuple, out: Optional[np.ndarray] = None,
                   add: bool = False) -> np.ndarray:
    """(bands, a, b) float32 values -> (bands, len(ys[0]), len(xs[0])): each pixel between the values at
    ``y0`` / ``y1`` and ``x0`` / ``x1``, ``fy`` / ``fx`` the second one's weight (each axis's (y0, y1,
    fy)), along x first, then y (the refinement's field: every reader computes it so), into ``out`` if
    given (``add``: added to it, the same sums as adding the field afterwards, without the field's pass
    through memory). Along y a run of rows between the same two cells at a time: broadcast, not
    gathered (2.5x faster; the same products and sums)."""
    (y0, y1, fy), (x0, x1, fx) = ys, xs
    rows = values[:, :, x0] * (1 - fx) + values[:, :, x1] * fx
    if out is None:
        out, add = np.empty((len(values), len(y0), len(x0)), np.float32), False
    if not len(y0):
        return out
    starts = np.flatnonzero(np.diff(y0, prepend=-1) | np.diff(y1, prepend=-1))
    stops = np.append(starts[1:], len(y0))
    longest = int((stops - starts).max())
    second = np.empty((len(values), longest, len(x0)), np.float32)
    first = np.empty_like(second) if add else None
    for a, b in zip(starts.tolist(), stops.tolist()):
        part = first[:, :b - a] if add else out[:, a:b]
        np.multiply(rows[:, y0[a], None], (1 - fy[a:b])[:, None], out=part)
        np.multiply(rows[:, y1[a], None], fy[a:b, None], out=second[:, :b - a])
        part += second[:, :b - a]
        if add:
            out[:, a:b] += part
    return out


FILTER_SHIFT = 12          # a loop filter's weights are integers in 1 / 2**FILTER_SHIFT, its bias whole DN
FILTER_LIMIT = 1 << 15     # |weight| or |bias| below this: int16, as a cube's bands carry them; beyond, damage
FILTER_MIN_PX = 64         # a block narrower than this on a side gets no loop filter (its weights would cost more)
# A product cube (read by the embedded engine) carries each block's loop filter in bands of their own, weight
# t of a band at the block's 40 m cell (t // FILTER_ROW, t % FILTER_ROW), 0 elsewhere (all 0: no filter).
FILTER_BANDS = tuple(f"filter_{b}" for b in BANDS)
FILTER_ROW = 6
FILTER_SAMPLE = 7          # the fit reads one pixel in FILTER_SAMPLE (see filter_samples)
FILTER_RIDGE = 1e-7        # of the normal equations' mean diagonal: a flat block's equations stay solvable


class FilterShape(NamedTuple):
    """A loop filter's support (model card, refine.filter): each band's own neighbours within ``radius``
    px (a square), and, with ``cross`` > 0, every band's neighbours within ``cross`` px (a diamond: the 4
    nearest for 1), which the own ones then leave out."""

    radius: int
    cross: int = 0


def cross_offsets(shape: FilterShape) -> List[Tuple[int, int]]:
    """The neighbours (dy, dx) of every band a loop filter weighs, row by row (none without ``cross``)."""
    r = range(-shape.cross, shape.cross + 1)
    return [(dy, dx) for dy in r for dx in r if 0 < abs(dy) + abs(dx) <= shape.cross]


def filter_offsets(shape: FilterShape) -> List[Tuple[int, int]]:
    """The band's own neighbours (dy, dx) a loop filter weighs, row by row (the centre and the
    ``cross_offsets`` left out)."""
    r, cross = range(-shape.radius, shape.radius + 1), set(cross_offsets(shape))
    return [(dy, dx) for dy in r for dx in r if (dy, dx) != (0, 0) and (dy, dx) not in cross]


def filter_taps(shape: FilterShape, bands: int = len(BANDS)) -> int:
    """Integers of a band's loop filter: its own neighbours' weights, every band's neighbours' weights,
    every band's centre weight, a bias (in that order)."""
    return len(filter_offsets(shape)) + bands * len(cross_offsets(shape)) + bands + 1


def filter_corner(shape: FilterShape) -> Tuple[int, int]:
    """(rows, columns) px of a block's corner that holds its loop filter in FILTER_BANDS, and after its
    weights, in the first band, its ``grid20_phase``."""
    return -(-(filter_taps(shape) + 1) // FILTER_ROW) * STRIDE1, FILTER_ROW * STRIDE1


def neighbourhood(decoded: np.ndarray, rows: slice, cols: slice, radius: int) -> np.ndarray:
    """(bands, h + 2r, w + 2r): the pixels ``rows`` x ``cols`` of a decoded window with ``radius`` px
    around them, the window's edge pixels repeated beyond it (as at a date's edge)."""
    h, w = decoded.shape[1:]
    ya, yb, xa, xb = max(0, rows.start - radius), min(h, rows.stop + radius), max(0, cols.start - radius), min(w, cols.stop + radius)
    pad = ((0, 0), (ya - (rows.start - radius), rows.stop + radius - yb), (xa - (cols.start - radius), cols.stop + radius - xb))
    part = decoded[:, ya:yb, xa:xb]
    return np.pad(part, pad, mode="edge") if any(p != (0, 0) for p in pad) else part


def loop_filter(net, decoded: np.ndarray, weights: np.ndarray, rows: slice, cols: slice, shape: FilterShape) -> np.ndarray:
    """A block's loop filter on its pixels ``rows`` x ``cols`` of a decoded window (10, H, W): per band b,
    its decoding plus the weighted differences of its own neighbours to it, plus the weighted
    differences of every band's near neighbours to that band's pixel, plus a weighted sum of every band
    at the pixel, plus a bias (``weights`` (10, ``filter_taps``) integers, in that order). The encoder
    fits them by least squares to the block's truth and stores them with the refinement
    (``corsa.codec.refine_coder``): they undo what the network gets wrong in this block's contrast and
    sharpness, the 10 m bands' edges lending theirs to the 20 m ones. Run by the model's loop_filter.onnx
    (``net``: a depthwise convolution of the own neighbours and a full one across the bands, their
    kernels inputs; 10x faster than numpy). -> (10, h, w) float32; ``decoded`` is left as it is."""
    own, near_all = filter_offsets(shape), cross_offsets(shape)
    n, c, bands = len(own), shape.cross, len(weights)
    w = weights.astype(np.float64) / (1 << FILTER_SHIFT)
    side = 2 * shape.radius + 1
    kernel = np.zeros((bands, 1, side, side), np.float64)
    for t, (dy, dx) in enumerate(own):
        kernel[:, 0, shape.radius + dy, shape.radius + dx] = w[:, t]
    kernel[:, 0, shape.radius, shape.radius] = -w[:, :n].sum(1)
    cross = np.zeros((bands, bands, 2 * c + 1, 2 * c + 1), np.float64)
    for k, (dy, dx) in enumerate(near_all):
        cross[:, :, c + dy, c + dx] = w[:, n + k:n + bands * len(near_all):len(near_all)]
    cross[:, :, c, c] = w[:, n + bands * len(near_all):-1] + np.eye(bands) - cross.sum((2, 3))
    near = neighbourhood(decoded, rows, cols, shape.radius).astype(np.float32)
    (out,) = net.run(None, {"near": near[None], "kernel": kernel.astype(np.float32), "cross": cross.astype(np.float32),
                            "bias": weights[:, -1].astype(np.float32)})
    return out[0]


def own_taps(shape: FilterShape, band: int, bands: int = len(BANDS)) -> np.ndarray:
    """The taps of band ``band``'s loop filter that a filter of its own neighbours only uses (the other
    bands' neighbours' weights 0): as a model without ``cross`` weighs, in half the integers."""
    n, k = len(filter_offsets(shape)), len(cross_offsets(shape))
    return np.r_[np.arange(n), n + band * k + np.arange(k), np.arange(n + bands * k, filter_taps(shape, bands))]


def own_mask(shape: FilterShape, bands: int = len(BANDS)) -> np.ndarray:
    """(bands, taps) bool: each band's ``own_taps``; ``weights[own_mask]`` is the own part, band by band."""
    mask = np.zeros((bands, filter_taps(shape, bands)), bool)
    for b in range(bands):
        mask[b, own_taps(shape, b, bands)] = True
    return mask


def _varint_bytes(values: np.ndarray) -> int:
    """Bytes of ``values`` as zigzag varints (corsa.codec.loop_filter's stream)."""
    z = np.where(values >= 0, 2 * values, -2 * values - 1)
    return int(sum(1 + (int(v).bit_length() - 1) // 7 if v else 1 for v in z.ravel()))


def filter_samples(h: int, w: int) -> List[Tuple[slice, slice]]:
    """The pixels of a block (``h`` x ``w``) the loop filter's fit reads, as sub-grids of strided slices (rows,
    columns): those of (column + 3 row) % 7 == 0, rows q, q + 7, ... with columns from (-3 q) % 7 every 7 (read
    slice by slice, 4x faster than gathered by index). A lattice of single pixels, each of the 4 x 4 phases of the
    network's pixel shuffles equally among them (7 is odd). On the validation split +0.003-0.011 dB at levels
    2-9 over whole latent cells, one in 5 (20% of the pixels, to 14%): neighbouring pixels of a cell say much the
    same; the fit 0.7x the time."""
    return [(slice(q, h, FILTER_SAMPLE), slice(-3 * q % FILTER_SAMPLE, w, FILTER_SAMPLE)) for q in range(FILTER_SAMPLE)]


def _at_samples(a: np.ndarray, samples: List[Tuple[slice, slice]], dy: int, dx: int,
                keep: Optional[np.ndarray] = None) -> np.ndarray:
    """(..., n): ``a`` (..., H, W) at the samples (``filter_samples``) shifted by ``dy``, ``dx`` px, sub-grid by
    sub-grid; ``keep``: of those, the ones kept."""
    grids = [a[..., ys.start + dy:ys.stop + dy:ys.step, xs.start + dx:xs.stop + dx:xs.step] for ys, xs in samples]
    out = np.empty(a.shape[:-2] + (sum(g.shape[-2] * g.shape[-1] for g in grids),), a.dtype)
    at = 0
    for g in grids:      # each sub-grid copied once, into its place
        n = g.shape[-2] * g.shape[-1]
        part = out[..., at:at + n]
        part.shape = g.shape     # a view's shape: raises rather than copies
        part[...] = g
        at += n
    return out if keep is None else out[..., keep]


def filter_fit(truth: np.ndarray, decoded: np.ndarray, rows: slice, cols: slice, valid: Optional[np.ndarray],
               shape: FilterShape, lam: float = 0.0) -> Optional[np.ndarray]:
    """The loop filter's integer weights (10, taps) of a block, from its input ``truth`` (10, h, w) and a
    decoded window (10, H, W) in which the block is ``rows`` x ``cols`` (its neighbours around it as the
    readers decode them), by least squares; None for a block under FILTER_MIN_PX a side or with too few
    ``valid`` pixels. The fit reads one pixel in FILTER_SAMPLE (``filter_samples``).
    With ``lam`` (the level's DN^2 a bit) each block takes what costs it least, squared error plus
    ``lam`` times the bits: the filter, its own-neighbours part only (``own_taps``, stored in half
    the integers), or none (a small block's filter can cost more bits than it saves)."""
    own, near_all = filter_offsets(shape), cross_offsets(shape)
    taps = filter_taps(shape)
    h, w = truth.shape[1:]
    if min(h, w) < FILTER_MIN_PX:
        return None
    near = neighbourhood(decoded, rows, cols, shape.radius)
    samples, r = filter_samples(h, w), shape.radius
    keep = None if valid is None else _at_samples(valid, samples, 0, 0)
    keep = None if keep is None or keep.all() else keep
    centres = _at_samples(near, samples, r, r, keep).astype(np.float64)                       # (10, n)
    count = centres.shape[1]
    if count < 4 * taps:
        return None
    # The features every band shares (every band's near neighbours, centres, the bias) enter the normal
    # equations once; only the own neighbours' rows are per band.
    errors = _at_samples(truth, samples, 0, 0, keep).astype(np.float64) - centres
    shared = np.empty((len(near) * len(near_all) + len(near) + 1, count))
    k = len(near_all)
    for i, (dy, dx) in enumerate(near_all):
        np.subtract(_at_samples(near, samples, r + dy, r + dx, keep), centres, out=shared[i:len(near) * k:k])
    shared[-len(near) - 1:-1], shared[-1] = centres, 1.0
    g_shared, b_shared = shared @ shared.T, shared @ errors.T
    n = len(own)
    a = np.empty((n, count))
    g = np.empty((taps, taps))
    g[n:, n:] = g_shared
    scale = np.array([1 << FILTER_SHIFT] * (taps - 1) + [1], np.float64)
    parts = [np.arange(taps)] + ([None] if near_all and lam else [])      # the whole filter, its own part
    out = np.zeros((len(parts), len(truth), taps), np.int64)
    sse = np.zeros(len(parts))
    for b in range(len(truth)):
        for t, (dy, dx) in enumerate(own):
            np.subtract(_at_samples(near[b], samples, r + dy, r + dx, keep), centres[b], out=a[t])
        g[:n, :n], g[:n, n:] = a @ a.T, a @ shared.T
        g[n:, :n] = g[:n, n:].T
        rhs = np.concatenate([a @ errors[b], b_shared[:, b]])
        for i, part in enumerate(parts):
            part = own_taps(shape, b) if part is None else part
            sub = g[np.ix_(part, part)]
            ridged = sub + np.eye(len(part)) * (FILTER_RIDGE * np.trace(sub) / len(part))
            try:
                sol = np.linalg.solve(ridged, rhs[part])
            except np.linalg.LinAlgError:
                return None
            q = np.clip(np.rint(sol * scale[part]), 1 - FILTER_LIMIT, FILTER_LIMIT - 1)
            out[i, b, part] = q
            wq = q / scale[part]
            # the sampled squared error after the filter, from the normal equations
            sse[i] += errors[b] @ errors[b] - 2 * wq @ rhs[part] + wq @ sub @ wq
    if lam:
        total = float((errors ** 2).sum())
        per = (h * w if valid is None else int(valid.sum())) / count     # samples -> the block's pixels
        costs = [per * total + lam * 8]
        for i, part in enumerate(parts):
            kept = out[i] if part is not None else out[i][own_mask(shape, len(truth))].reshape(len(truth), -1)
            # in-sample squared error flatters a fit by its taps: out of sample it is (n + p) / (n - p) of it
            p = kept.shape[1]
            costs.append(per * sse[i] * (count + p) / (count - p) + lam * 8 * (_varint_bytes(kept) + 2))
        best = int(np.argmin(costs))
        if best == 0:
            return None
        weights = out[best - 1]
    else:
        weights = out[0]
    return weights if weights.any() else None


def filter_shape(card: dict) -> Optional[FilterShape]:
    """A model's loop filter support, None for a model without one (``corsa.codec.loop_filter``)."""
    spec = (card.get("refine") or {}).get("filter") or {}
    return FilterShape(int(spec["radius_px"]), int(spec.get("cross_px", 0))) if spec.get("radius_px") else None


def filter_lambda(card: dict, quality: int) -> float:
    """The DN^2 a bit at which a level's encoder weighs a block's loop filter against its bits (model card;
    0: every block large enough is filtered)."""
    return float((((card.get("refine") or {}).get("filter") or {}).get("dn2_per_bit") or {}).get(str(quality), 0.0))


def grid20_slot(shape: FilterShape) -> Tuple[int, int]:
    """(row, column) px in a block's corner of FILTER_BANDS where the first band holds its ``grid20_phase``."""
    taps = filter_taps(shape)
    return taps // FILTER_ROW * STRIDE1, taps % FILTER_ROW * STRIDE1


def filter_layout(weights: Optional[np.ndarray], size: Tuple[int, int], shape: FilterShape, grid20: int = 0) -> np.ndarray:
    """(10, h, w) float32 of a block's FILTER_BANDS: its weights each on its 40 m cell, then its
    ``grid20_phase`` in the first band, 0 elsewhere."""
    out = np.zeros((len(BANDS),) + tuple(size), np.float32)
    if weights is not None:
        t = np.arange(filter_taps(shape))
        for dy in range(STRIDE1):
            for dx in range(STRIDE1):
                out[:, t // FILTER_ROW * STRIDE1 + dy, t % FILTER_ROW * STRIDE1 + dx] = weights
    gy, gx = grid20_slot(shape)
    out[0, gy:gy + STRIDE1, gx:gx + STRIDE1] = grid20
    return out


def filter_weights(bands: np.ndarray, y0: int, x0: int, shape: FilterShape) -> Tuple[Optional[np.ndarray], int]:
    """A block's loop filter from FILTER_BANDS (10, y, x) whose block starts at (y0, x0) (None: no filter),
    and its ``grid20_phase`` (anything but 1-4 read as 0)."""
    t, (gy, gx) = np.arange(filter_taps(shape)), grid20_slot(shape)
    weights = np.rint(np.nan_to_num(bands[:, y0 + t // FILTER_ROW * STRIDE1, x0 + t % FILTER_ROW * STRIDE1])).astype(np.int64)
    code = float(np.nan_to_num(bands[0, y0 + gy, x0 + gx]))
    return (weights if weights.any() else None), int(code) if code in (1, 2, 3, 4) else 0


# Many Sentinel-2 sources hand the 20 m bands on the 10 m grid by repeating each pixel 2 x 2 (nearest
# neighbour: Major-TOM, BigEarthNet, TerraMesh, the L1C tiles; openEO's load_collection by default). Where
# a block's 20 m bands are so, at one of the 4 phases of the 2 x 2 cells, the encoder says which
# (``grid20_phase``: 1 + 2 py + px; 0: not so) and every reader sets each cell of those bands to the mean
# of its decoded pixels (``grid20_project``), after the loop filter and the refinement: the projection onto
# images the truth is one of, so it only removes error (test split, level 9: +0.4 dB Major-TOM, +1 dB
# TerraMesh, BigEarthNet and the L1C tile 18SVG).
GRID20_BANDS = tuple(BANDS.index(b) for b in ("B05", "B06", "B07", "B8A", "B11", "B12"))
GRID20_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


def _cells(a: np.ndarray, py: int, px: int, fill: float) -> np.ndarray:
    """(..., h, w) -> (..., H/2, 2, W/2, 2): the 2 x 2 cells at phase (``py``, ``px``), those cut by the
    edges completed with ``fill``."""
    h, w = a.shape[-2:]
    hh, ww = -(-(h + py) // 2) * 2, -(-(w + px) // 2) * 2
    out = np.full(a.shape[:-2] + (hh, ww), fill, a.dtype)
    out[..., py:py + h, px:px + w] = a
    return out.reshape(a.shape[:-2] + (hh // 2, 2, ww // 2, 2))


def _cell_sums(c: np.ndarray) -> np.ndarray:
    """The sums of the 2 x 2 cells of ``c`` (..., H/2, 2, W/2, 2), in one fixed order (the same floats for
    every reader, whatever the array's shape)."""
    total = c[..., 0, :, 0] + c[..., 0, :, 1]
    total += c[..., 1, :, 0]
    total += c[..., 1, :, 1]
    return total


def _one_value_cells(x: np.ndarray, valid: Optional[np.ndarray], py: int, px: int) -> bool:
    """Whether each 2 x 2 cell of phase (``py``, ``px``) of ``x`` (bands, h, w), cut by its edges, holds one value
    in each band over its ``valid`` pixels (None: all): every two of a cell's pixels compared where both are
    valid (across the cell too where ``valid`` may leave only a diagonal)."""
    xa = _cells(x, py, px, 0)
    va = _cells(np.ones(x.shape[1:], bool) if valid is None else valid, py, px, False)
    q = [(xa[:, :, i, :, j], va[:, i, :, j]) for i in (0, 1) for j in (0, 1)]
    pairs = [(0, 1), (0, 2), (1, 3), (2, 3)] + ([(0, 3), (1, 2)] if valid is not None else [])
    return all(bool(np.all((q[i][0] == q[j][0]) | ~(q[i][1] & q[j][1]))) for i, j in pairs)


def grid20_phase(truth: np.ndarray, valid: Optional[np.ndarray]) -> int:
    """Of a block's input (10, h, w), whose first pixel is on an even row and column of its date: 1 + 2 py
    + px for the first phase whose 2 x 2 cells each hold one value a 20 m band over their ``valid``
    pixels (None: all), 0 for none and for a block under FILTER_MIN_PX a side (as for its loop filter: its
    corner of the services' cube would lie in the overlap cut off). Each phase tried on the first 16 rows
    first: a block without such cells is told in a few ms."""
    if min(truth.shape[1:]) < FILTER_MIN_PX:
        return 0
    x = truth[list(GRID20_BANDS)]
    valid = None if valid is None or valid.all() else valid
    for code, (py, px) in enumerate(GRID20_PHASES, 1):
        if _one_value_cells(x[:, :16], None if valid is None else valid[:16], py, px) and \
                _one_value_cells(x, valid, py, px):
            return code
    return 0


def grid20_project(decoded: np.ndarray, rows: slice, cols: slice, code: int, start: Tuple[int, int],
                   valid: Optional[np.ndarray] = None) -> None:
    """In place: the 20 m bands of a block's pixels ``rows`` x ``cols`` of ``decoded`` (10, H, W), each 2 x 2
    cell of phase ``code`` (``grid20_phase``; 0: nothing done) set to the mean of its ``valid`` pixels
    (None: all; (H, W)); ``start``: the date's row and column of the block's first pixel (even). The
    sums in a fixed order, cell by cell: every reader gets the same floats."""
    if not code:
        return
    py, px = GRID20_PHASES[code - 1]
    py, px = (py + start[0]) % 2, (px + start[1]) % 2
    bands = list(GRID20_BANDS)
    h, ww = len(range(*rows.indices(decoded.shape[1]))), len(range(*cols.indices(decoded.shape[2])))
    if (valid is None or valid[rows, cols].all()) and not (py or px or h % 2 or ww % 2):
        # whole cells, every pixel with data (a block's usual case): the same sums without the weights,
        # in place, 6x faster
        for b in bands:
            c = decoded[b, rows, cols].reshape(h // 2, 2, ww // 2, 2)
            c[...] = (_cell_sums(c) / np.float32(4))[:, None, :, None]
        return
    part = decoded[bands, rows, cols]
    w = np.ones(part.shape[1:], np.float32) if valid is None else valid[rows, cols].astype(np.float32)
    mean = _cell_sums(_cells(part * w, py, px, 0)) / np.maximum(_cell_sums(_cells(w, py, px, 0)), 1)
    spread = np.repeat(np.repeat(mean, 2, 1), 2, 2)[:, py:py + h, px:px + ww]
    decoded[bands, rows, cols] = spread if valid is None else np.where(w > 0, spread, part)


def _cell_axis(window: slice, size: int, origin: int, end: Optional[int], grid: int) -> tuple:
    """One axis of a chunk of ``size`` px whose product blocks (BLOCK_PX) start at ``origin`` + k BLOCK_PX
    and whose data end at ``end`` (the scene's edge; None: past the chunk): for each pixel of its data
    ``window``, the chunk's pixels to read the values of its two nearest cell centres of its block at
    (a cell's first pixel), and the second's weight (``bilinear_field``; a block's end cells held
    beyond their centres). A cell that begins outside the chunk is held from the nearest one inside
    (the chunk's overlap, which the back end cuts off)."""
    p = np.arange(window.start, window.stop)
    start = origin + (p - origin) // BLOCK_PX * BLOCK_PX
    stop = start + BLOCK_PX if end is None else np.minimum(start + BLOCK_PX, end)
    last = -(-(stop - start) // grid) - 1
    f = np.clip((p - start + 0.5) / grid - 0.5, 0, last)
    i0 = np.floor(f).astype(np.intp)
    i1 = np.minimum(i0 + 1, last)

    def at(i: np.ndarray) -> np.ndarray:
        return start + np.clip(i, -(start // grid), (size - 1 - start) // grid) * grid

    return at(i0), at(i1), (f - i0).astype(np.float32)


def _refinement(cube: xr.DataArray, context: dict, card: dict, rate, window: Tuple[slice, slice], model: str,
                overlap: int) -> Optional[np.ndarray]:
    """The refinement (t, 10, y, x) in DN over a decompress chunk's data window: a product cube's
    REFINE_BANDS, or from a compress cube's CELL_BANDS (``compress_cube``), whose blocks lie as
    apply_neighborhood's chunks of BLOCK_PX px do: the middle one ``overlap`` px into the chunk."""
    names = {str(b) for b in cube["bands"].values}
    if set(REFINE_BANDS) <= names:
        return np.nan_to_num(cube.sel(bands=list(REFINE_BANDS)).values[(Ellipsis,) + window].astype(np.float32))
    if rate is None or not set(CELL_BANDS) <= names or not refine_grid(card):
        return None
    size = (cube.sizes["y"], cube.sizes["x"])
    if size != (BLOCK_PX + 2 * overlap,) * 2:
        raise UdfError(f"refinement cells (bands {CELL_BANDS[0]}, ...) decode in apply_neighborhood chunks of "
                       f"{BLOCK_PX} px overlapping by the context's overlap ({overlap}), not a chunk of {size}")
    step, grid = _refine_steps(model, (context.get("sha256") or {}).get("refine_model"))[rate[1]], refine_grid(card)
    cells = np.nan_to_num(cube.sel(bands=list(CELL_BANDS)).values).astype(np.float32)
    axes = [_cell_axis(w, n, overlap, w.stop if w.stop < n else None, grid) for w, n in zip(window, size)]
    return np.stack([bilinear_field(c * np.float32(step), *axes) for c in cells])


def _loop_filters(cube: xr.DataArray, card: dict, window: Tuple[slice, slice], overlap: int) -> Optional[tuple]:
    """A product cube's loop filters over a decompress chunk (apply_neighborhood, BLOCK_PX + 2 ``overlap`` px a
    side): each date's filter of the chunk's middle block (None: not filtered) with its ``grid20_phase``, and the block's rows and
    columns in the data ``window``; None where the cube carries no FILTER_BANDS. The blocks around it are cut
    off by the back end: their pixels here are not filtered (``corsa.blocks.blockwise.DateDecoder`` alike)."""
    shape = filter_shape(card)
    if not shape or not set(FILTER_BANDS) <= {str(b) for b in cube["bands"].values}:
        return None
    size = (cube.sizes["y"], cube.sizes["x"])
    if size != (BLOCK_PX + 2 * overlap,) * 2:
        raise UdfError(f"loop filters (bands {FILTER_BANDS[0]}, ...) decode in apply_neighborhood chunks of "
                       f"{BLOCK_PX} px overlapping by the context's overlap ({overlap}), not a chunk of {size}")
    block = middle_block(window, overlap)
    if block[0].stop <= block[0].start or block[1].stop <= block[1].start:
        return None
    # only the middle block's corner, where its weights lie (filter_layout)
    height, width = filter_corner(shape)
    bands = cube.isel(y=slice(overlap, overlap + height), x=slice(overlap, overlap + width)).sel(bands=list(FILTER_BANDS)).values
    bands = bands if "t" in cube.dims else bands[None]
    return [filter_weights(b, 0, 0, shape) for b in bands], block[0], block[1]


def middle_block(window: Tuple[slice, slice], overlap: int) -> Tuple[slice, slice]:
    """The pixels of an apply_neighborhood chunk's middle block (``overlap`` px in) in its data ``window``'s
    coordinates (empty where the window holds none of it)."""
    rows, cols = (slice(max(overlap - w.start, 0), min(overlap + BLOCK_PX, w.stop) - w.start) for w in window)
    return rows, cols


def reach_overlap(card: dict, network: str) -> int:
    """A network's receptive radius (model card) rounded up to whole level-1 cells."""
    return -(-card["receptive_radius_px"][network] // STRIDE1) * STRIDE1


def _block_decoding(decoder, latent: np.ndarray, card: dict, window: Tuple[slice, slice], size: Tuple[int, int],
                    overlap: int, tile: int) -> Tuple[np.ndarray, np.ndarray]:
    """A compress chunk's dequantised ``latent`` (its data ``window``) decoded where its middle block's
    refinement cells read the decoding: in an apply_neighborhood chunk (BLOCK_PX + 2 ``overlap`` px a
    side) the block and the decoder's reach around it, else the whole window. (10, y, x) DN over the
    window, 0 outside that part, and where it lies."""
    reach = reach_overlap(card, "decoder")
    spans = []
    for win, n in zip(window, size):
        length = win.stop - win.start
        whole = n != BLOCK_PX + 2 * overlap
        spans.append((0, length) if whole else
                     (max(overlap - reach - win.start, 0), min(overlap + BLOCK_PX + reach - win.start, length)))
    (y0, y1), (x0, x1) = spans
    decoded = np.zeros((len(BANDS),) + tuple(w.stop - w.start for w in window), np.float32)
    inside = np.zeros(decoded.shape[1:], bool)
    if y1 > y0 and x1 > x0:
        part = latent[:, y0 // STRIDE1:-(-y1 // STRIDE1), x0 // STRIDE1:-(-x1 // STRIDE1)]
        decoded[:, y0:y1, x0:x1] = synthesise(decoder, part, tile, overlap)[:, :y1 - y0, :x1 - x0]
        inside[y0:y1, x0:x1] = True
    return decoded, inside


def _filtered_block(out: np.ndarray, scene: np.ndarray, decoded: np.ndarray, valid: np.ndarray,
                    window: Tuple[slice, slice], size: Tuple[int, int], overlap: int, shape: FilterShape, lam: float,
                    net) -> np.ndarray:
    """A compress chunk's middle block's loop filter (an apply_neighborhood chunk: the block ``overlap`` px
    in), fitted to its data (``scene`` and ``decoded`` over the data ``window``), written into ``out``
    (FILTER_BANDS, chunk y, chunk x) at the block's corner (``filter_layout``); -> the decoding with the
    block filtered, from which its refinement cells are computed as the CLI computes them."""
    if size != (BLOCK_PX + 2 * overlap,) * 2:
        return decoded
    rows, cols = middle_block(window, overlap)
    if rows.stop <= rows.start or cols.stop <= cols.start:
        return decoded
    weights = filter_fit(scene[:, rows, cols], decoded, rows, cols, valid[rows, cols], shape, lam)
    if weights is None:
        return decoded
    layout = filter_layout(weights, filter_corner(shape), shape)
    out[:, overlap:overlap + len(layout[0]), overlap:overlap + len(layout[0][0])] = layout
    filtered = decoded.copy()
    filtered[:, rows, cols] = loop_filter(net, decoded, weights, rows, cols, shape)
    return filtered


def _grid20_slot(out: np.ndarray, scene: np.ndarray, valid: np.ndarray, window: Tuple[slice, slice],
                 size: Tuple[int, int], overlap: int, shape: FilterShape) -> None:
    """A compress chunk's middle block's ``grid20_phase`` written into ``out`` (FILTER_BANDS, chunk y, chunk x)
    at its slot in the block's corner (an apply_neighborhood chunk only: the block ``overlap`` px in)."""
    rows, cols = middle_block(window, overlap)
    if size == (BLOCK_PX + 2 * overlap,) * 2 and rows.start < rows.stop and cols.start < cols.stop:
        gy, gx = grid20_slot(shape)
        out[0, overlap + gy:overlap + gy + STRIDE1, overlap + gx:overlap + gx + STRIDE1] = \
            grid20_phase(scene[:, rows, cols], valid[rows, cols])


def compress_cube(cube: xr.DataArray, context: dict) -> xr.DataArray:
    cube, had_t, data, enc, (model, tile, overlap) = _prepare(cube, context, BANDS, "encoder")
    window = data_window(data)
    rate = _variable_rate(model, context)
    if rate is not None:
        card, level, gain, inv_gain = rate
        quality = card["qualities"][level]["quality"]
        enc = network_session(card, context, quality, functools.partial(_network, context), "encoder")
        grid = refine_grid(card)
        if grid is not None and (overlap % grid or grid % STRIDE1):
            raise UdfError(f"model {card['id']} refines cells of {grid} px: its compress chunks must overlap by a "
                           f"multiple of that, not {overlap}")
        step = _refine_steps(model, (context.get("sha256") or {}).get("refine_model"))[level] if grid else 0
        dec = network_session(card, context, quality, functools.partial(_network, context)) if step else None
        support = filter_shape(card) if quality in (((card.get("refine") or {}).get("filter") or {}).get("levels") or ()) else None
        bands = output_bands({**context, "mode": "compress"})
        out = np.zeros((data.shape[0], len(bands)) + data.shape[2:], np.int16)
        nodata_band = len(bands) - 1
        out[:, nodata_band] = 1      # outside the window: nodata
        for t, scene in enumerate(data[(Ellipsis,) + window] if window else ()):
            shape = scene.shape[1:]
            ints = quantise(analyse(enc, scene, tile, overlap) * gain, deadzone_of(card))
            out[(t, slice(0, len(ints))) + window] = replicate(ints, STRIDE1, shape)
            nodata = nodata_of(scene)
            out[(t, nodata_band) + window] = nodata
            if step:
                # The chunk decoded as the decoder will decode its middle block: the chunk reaches the
                # encoder's and the decoder's reach beyond it (corsa.openeo.windows.compress_reach).
                decoded, inside = _block_decoding(dec, (ints * inv_gain).astype(np.float32), card, window,
                                                  data.shape[-2:], overlap, tile)
                if support:
                    decoded = _filtered_block(out[t, len(ints) + len(CELL_BANDS):nodata_band], scene, decoded,
                                              ~nodata, window, data.shape[-2:], overlap, support,
                                              filter_lambda(card, quality),
                                              _network(context, "loop_filter"))
                if filter_shape(card):
                    _grid20_slot(out[t, len(ints) + len(CELL_BANDS):nodata_band], scene, ~nodata, window,
                                 data.shape[-2:], overlap, filter_shape(card))
                _chunk_cells(out[t, len(ints):len(ints) + len(CELL_BANDS)], np.where(inside, scene - decoded, 0),
                             ~nodata & inside, float(step), grid, window)
        result = _like(cube, out, bands, had_t)
        result.attrs.update(_model_identity(model, context), corsa_model=model,
                            corsa_quality=card["qualities"][level]["quality"])
        return result
    out = np.zeros((data.shape[0], len(INDEX_BANDS)) + data.shape[2:], np.uint16)
    out[:, -1] = 1
    for t, scene in enumerate(data[(Ellipsis,) + window] if window else ()):
        shape = scene.shape[1:]
        idx0, idx1 = encode(enc, scene, tile, overlap)
        out[(t, 0) + window] = replicate(idx0, STRIDE0, shape)
        out[(t, 1) + window] = replicate(idx1, STRIDE1, shape)
        out[(t, 2) + window] = nodata_of(scene)
    result = _like(cube, out, INDEX_BANDS, had_t)
    result.attrs.update(_model_identity(model, context))
    return result


def _indices(rep0: np.ndarray, rep1: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Replicated indices: one sample per cell; NaN (outside the data) counts as index 0."""
    idx0 = np.nan_to_num(_pad(rep0, STRIDE1)[::STRIDE0, ::STRIDE0]).astype(np.uint16)
    idx1 = np.nan_to_num(_pad(rep1, STRIDE1)[::STRIDE1, ::STRIDE1]).astype(np.uint16)
    return idx0, idx1


def classify(features, classifier, idx0: np.ndarray, idx1: np.ndarray) -> np.ndarray:
    """Index grids -> class values (uint8, 1..n) on the level-0 grid: codebook vectors, then the classifier."""
    f0, f1 = features.run(None, {"idx0": idx0[None].astype(np.int64), "idx1": idx1[None].astype(np.int64)})
    (logits,) = classifier.run(None, {"f0": f0, "f1": f1})
    return (logits[0].argmax(0) + 1).astype(np.uint8)


def classify_cube(cube: xr.DataArray, context: dict) -> xr.DataArray:
    model = _settings(context)[0]
    rate = _variable_rate(model, context)
    if rate is not None:
        return _classify_latent(cube, context, model, rate)
    if (context.get("classes") or "scl") != "scl":
        raise UdfError(f"model {model} is a codebook model: it gives scene classes only, not {context['classes']!r}")
    cube, had_t, data, feats, _ = _prepare(cube, context, INDEX_BANDS, "features")
    if not context.get("classifier"):
        raise UdfError("mode 'classify' of a codebook model needs 'classifier': a folder or URL with classifier.onnx")
    clf = session(_fetch(context["classifier"], "classifier.onnx", (context.get("sha256") or {}).get("classifier")),
                  int(context.get("threads", 0)))
    out = np.zeros((data.shape[0], 1) + data.shape[2:], np.uint8)
    window = data_window(data)
    for t, (rep0, rep1, nodata) in enumerate(data[(Ellipsis,) + window] if window else ()):
        classes = replicate(classify(feats, clf, *_indices(rep0, rep1)), STRIDE0, rep0.shape)
        classes[np.nan_to_num(nodata, nan=1) != 0] = 0
        out[(t, 0) + window] = classes
    return _like(cube, out, ("class",), had_t)


def _classify_latent(cube: xr.DataArray, context: dict, model: str, rate) -> xr.DataArray:
    """A variable-rate model's classes: its head for the context's class set (card "heads" ->
    "scl" or "landcover") on the dequantised latent, classes on the 20 m grid replicated over the
    10 m pixels."""
    card, _, _, inv_gain = rate
    classes = context.get("classes") or "scl"
    head = (card.get("heads") or {}).get(classes)
    if head is None:
        raise UdfError(f"model {card['id']} ships no head for classes {classes!r} (its card lists heads: "
                       f"{', '.join(sorted(card.get('heads') or {})) or 'none'})")
    name = head["path"][:-len(".onnx")]
    cube, had_t, data, sess, _ = _prepare(cube, context, latent_bands(card["latent"]["channels"]), name)
    out = np.zeros((data.shape[0], 1) + data.shape[2:], np.uint8)
    window = data_window(data)
    for t, scene in enumerate(data[(Ellipsis,) + window] if window else ()):
        ints = np.nan_to_num(_pad(scene[:-1], STRIDE1)[:, ::STRIDE1, ::STRIDE1])
        (logits,) = sess.run(None, {"latent": (ints * inv_gain)[None].astype(np.float32)})
        classes = replicate((logits[0].argmax(0) + 1).astype(np.uint8), STRIDE0, scene.shape[1:])
        classes[np.nan_to_num(scene[-1], nan=1) != 0] = 0
        out[(t, 0) + window] = classes
    return _like(cube, out, ("class",), had_t)


def decompress_cube(cube: xr.DataArray, context: dict) -> xr.DataArray:
    model, _, _, _ = _settings(context)
    rate = _variable_rate(model, context)
    bands = latent_bands(rate[0]["latent"]["channels"]) if rate is not None else INDEX_BANDS
    quality = rate[0]["qualities"][rate[1]]["quality"] if rate is not None else None
    card = card_of(model)
    cube, had_t, data, _, (_, tile, overlap) = _prepare(cube, context, bands, network_file(card, context, quality))
    dec = network_session(card, context, quality, functools.partial(_network, context))
    window = data_window(data) or (slice(0, 0), slice(0, 0))
    # Everything from here on the window: the fill's tiles and the time head start at its corner,
    # as the CLI's start at the scene's.
    data = data[(Ellipsis,) + window]
    out = np.zeros((data.shape[0], len(BANDS)) + data.shape[2:], np.float32)
    gaps = np.nan_to_num(data[:, -1], nan=1) != 0
    refine = _refinement(cube, context, card, rate, window, model, overlap)
    filters = _loop_filters(cube, card, window, overlap)
    for t, scene in enumerate(data if data.size else ()):
        shape = scene.shape[1:]
        if rate is not None:
            # One sample per 40 m cell; NaN inside the window counts as 0.
            ints = np.nan_to_num(_pad(scene[:-1], STRIDE1)[:, ::STRIDE1, ::STRIDE1])
            decoded = synthesise(dec, (ints * rate[3]).astype(np.float32), tile, overlap)
        else:
            decoded = decode(dec, *_indices(scene[0], scene[1]), tile, overlap)
        out[t] = decoded[:, : shape[0], : shape[1]]
        (weights, grid20), rows, cols = (filters[0][t], filters[1], filters[2]) if filters is not None else ((None, 0), None, None)
        if weights is not None:
            out[t][:, rows, cols] = loop_filter(_network(context, "loop_filter"), decoded[:, : shape[0], : shape[1]], weights,
                                                rows, cols, filter_shape(card))
        if refine is not None:
            out[t] += refine[t]
        # the middle block starts on an even row and column of the date (BLOCK_PX px blocks)
        grid20_project(out[t], rows, cols, grid20, (0, 0), ~gaps[t])
    if context.get("fill") and gaps.any():
        out = _filled(out, gaps, cube["t"].values)
        gaps = gaps & (out == 0).all(1)
    else:
        out[np.broadcast_to(gaps[:, None], out.shape)] = 0
    times = cube["t"].values
    if context.get("dates"):
        # Only the dates asked for, stored or in between: the cube's t labels change.
        out = _at_dates(out, gaps, times, list(context["dates"]), model, context.get("sha256") or {})
        times = np.array(context["dates"], "datetime64[ns]")
    whole = np.zeros(out.shape[:2] + (cube.sizes["y"], cube.sizes["x"]), np.float32)
    whole[(Ellipsis,) + window] = out
    out = whole
    out, bands = np.clip(np.rint(out), 0, 65535).astype(np.uint16), BANDS
    if context.get("positions"):
        where = np.broadcast_to(positions(cube["x"].values, cube["y"].values), (len(out), len(POSITION_BANDS) - 1) + out.shape[2:])
        guard = np.ones((len(out), 1) + out.shape[2:], np.float32)
        if "render" in card.get("files", {}):
            head = session(_fetch(model, "render.onnx", (context.get("sha256") or {}).get("render")), int(context.get("threads", 0)))
            for t in range(len(out)):
                date, share = out[t][(slice(None),) + window], guard[t, 0][window]
                for rows, cols in _blocks_of(out.shape[2:], window, overlap):
                    share[rows, cols] = render_guard(head, date[:, rows, cols])
        out = np.concatenate([out.astype(np.float32), where, guard], 1)
        bands = BANDS + POSITION_BANDS
    coords = {k: v for k, v in cube.coords.items() if k not in ("bands", "t")}
    result = type(cube)(out, dims=cube.dims, coords={**coords, "t": times, "bands": list(bands)})
    return result if had_t else result.isel(t=0, drop=True)


def _blocks_of(size: Tuple[int, int], window: Tuple[slice, slice], overlap: int) -> List[Tuple[slice, slice]]:
    """The product's blocks (BLOCK_PX px from the date's corner) in a decompress chunk's data ``window``'s
    coordinates: apply_neighborhood's ``middle_block``, or, in a cube of another ``size`` (a date given
    whole), every block from its data's corner."""
    if all(n == BLOCK_PX + 2 * overlap for n in size):
        return [middle_block(window, overlap)]
    h, w = (s.stop - s.start for s in window)
    return [(slice(y, min(y + BLOCK_PX, h)), slice(x, min(x + BLOCK_PX, w)))
            for y in range(0, h, BLOCK_PX) for x in range(0, w, BLOCK_PX)]


def _day(t) -> float:
    return float(np.datetime64(t, "s").astype(np.int64)) / 86400


def _at_dates(decoded: np.ndarray, gaps: np.ndarray, times: np.ndarray, dates: list, model: str, sha: dict) -> np.ndarray:
    """The decoded dates (gaps 0) at ``dates``: a stored date as it is, a date between stored ones
    from the time head (``between``), or by linear interpolation for a model without one."""
    if any(t is None for t in times):
        raise UdfError("'dates' renders dates of a cube with a dimension t")
    days = [_day(t) for t in times]
    head = None
    out = np.empty((len(dates),) + decoded.shape[1:], np.float32)
    for n, d in enumerate(dates):
        t = _day(np.datetime64(str(d)[:10], "D"))
        if t in days:
            out[n] = decoded[days.index(t)]
        elif len(days) > 1 and days[0] < t < days[-1]:
            if "between" not in card_of(model).get("files", {}):
                out[n] = linear_between(decoded, gaps, days, t)
                continue
            head = head or session(_fetch(model, "between.onnx", sha.get("between")))
            out[n] = between(head, decoded, gaps, days, t)
        else:
            raise UdfError(f"date {d} lies outside the cube's dates ({str(times[0])[:10]} .. {str(times[-1])[:10]}): "
                           "no date is extrapolated")
    return out


def _filled(decoded: np.ndarray, gaps: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Every date's gaps (decoded, as the decoder gives them) filled from the other dates of the
    chunk (``fill_date``); what no date shows is 0 (nodata)."""
    if len(times) < 2 or any(t is None for t in times):
        raise UdfError("'fill' fills a date's gaps from the other dates of the cube: it needs a dimension t "
                       "with at least two dates")
    days = [_day(t) for t in times]
    shown = decoded.copy()
    shown[np.broadcast_to(gaps[:, None], shown.shape)] = 0
    out = shown.copy()
    for i in np.flatnonzero(gaps.any((1, 2))):
        near = fill_candidates(days, i)
        out[i] = fill_date(shown[i], gaps[i], [shown[j] for j in near], [gaps[j] for j in near])
    return out


def output_bands(context: dict) -> Tuple[str, ...]:
    """The bands the UDF returns in the context's mode."""
    mode = (context or {}).get("mode", "compress")
    if mode == "decompress":
        return BANDS + (POSITION_BANDS if context.get("positions") else ())
    if mode == "render":
        return BANDS
    if mode == "classify":
        return ("class",)
    if mode != "compress":
        raise UdfError(f"unknown mode {mode!r}: use 'compress', 'decompress', 'render' or 'classify'")
    card = card_of(_settings(context)[0])
    if card.get("kind") != "variable-rate":
        return INDEX_BANDS
    bands = latent_bands(card["latent"]["channels"])
    if not refine_grid(card):
        return bands
    return bands[:-1] + CELL_BANDS + (FILTER_BANDS if filter_shape(card) else ()) + bands[-1:]


def apply_metadata(metadata, context: dict):
    """openEO UDF signature: the cube's metadata after this UDF (its bands change)."""
    return metadata.rename_labels(dimension="bands", target=list(output_bands(context)))


def apply_datacube(cube: xr.DataArray, context: dict) -> xr.DataArray:
    mode = (context or {}).get("mode", "compress")
    if mode == "compress":
        return compress_cube(cube, context)
    if mode == "decompress":
        return decompress_cube(cube, context)
    if mode == "render":
        return render_cube(cube, context)
    if mode == "classify":
        return classify_cube(cube, context)
    raise UdfError(f"unknown mode {mode!r}: use 'compress', 'decompress', 'render' or 'classify'")


# openEO's run_udf_code picks apply_datacube by its annotations being xarray.DataArray itself (this
# module's annotations are names, not evaluated). A back end has imported xarray before it runs this
# code; a program that imports this module for its numerics (the CLI) need not import xarray (0.5 s).
if "xarray" in sys.modules:
    apply_datacube.__annotations__.update(cube=sys.modules["xarray"].DataArray, context=dict,
                                          **{"return": sys.modules["xarray"].DataArray})
