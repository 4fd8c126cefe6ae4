"""A time series of one place: each date's integers coded with references to earlier dates.

The same place revisited every few days changes little, so a date's latent is cheaper to code
knowing an earlier date's latent at the same cells (``corsa.codec.latent_coder``'s temporal tables).
What each date stores and decodes to is unchanged: only the entropy coding sees the references.

- Groups: a key date (coded alone) starts a group of at most ``KEY_EVERY`` dates; every later
  date of the group may refer to any earlier date of it. Decoding one date so reads at most
  KEY_EVERY - 1 other dates (their integers only: no network runs for them).
- Sub-blocks of SUB x SUB latent cells each choose their reference (or none), the one that codes
  them in the fewest bits: a cloud on one date is then no worse a reference than a clear one
  elsewhere. The choice is the encoder's; the decoder reads it from the file (formats 4 and 6).
- A date is also coded alone, and written so where that is smaller (the class tables of a date
  alone can beat the temporal tables where the place changed between dates).
- A date of another quality level than its group's key date starts a new group (the tables are
  per level). Appending dates after a product's last date re-codes none of the old ones.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from corsa.core import cluster
from corsa.formats import stream_format
from corsa.core import progress
from corsa.codec.models import VariableRateCodec, model_dir
from corsa.codec.latent_coder import LatentCoder
from corsa.codec.refine_coder import BlockRefinement

KEY_EVERY = 8
ProductError = stream_format.ProductError


@dataclass
class Planned:
    """One date of a series in coding order: its candidate references (indices of earlier dates)."""

    date: str
    quality: int
    candidates: list[int]


def plan(dates: list[str], qualities: list[int], existing: list[list[str]], key_every: int = KEY_EVERY,
         temporal: bool = True) -> list[Planned]:
    """Candidates of every date, in date order. ``existing`` holds the reference dates of the dates
    already written (a prefix of ``dates``): one without references is a key date."""
    if list(dates) != sorted(dates) or len(set(dates)) != len(dates) or "undated" in dates[1:]:
        raise ValueError(f"a series needs distinct dates in order, got {dates}")
    out, start = [], 0
    for i, (d, q) in enumerate(zip(dates, qualities)):
        if i < len(existing):
            refs = existing[i]
            if not refs:
                start = i
            out.append(Planned(d, q, [dates.index(r) for r in refs if r in dates]))
            continue
        if not temporal or d == "undated" or i - start >= key_every or q != qualities[start] or i == start:
            start = i
            out.append(Planned(d, q, []))
        else:
            out.append(Planned(d, q, list(range(start, i))))
    return out


def choose(coder: LatentCoder, level: int, ints: np.ndarray, candidates: list[np.ndarray]
           ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The reference of each sub-block of one block's integers: (choice (sub rows, cols) uint8,
    an index into ``candidates`` or NO_REFERENCE; the reference integers and mask to code with)."""
    rows, cols = -(-ints.shape[1] // stream_format.SUB), -(-ints.shape[2] // stream_format.SUB)
    choice = np.full((rows, cols), stream_format.NO_REFERENCE, np.uint8)
    if not candidates:
        return choice, None, None
    everywhere = np.ones(ints.shape[1:], bool)
    bits = [coder.cell_bits(ints, level, np.zeros_like(ints), ~everywhere)]
    bits += [coder.cell_bits(ints, level, c, everywhere) for c in candidates]
    s = stream_format.SUB
    for r in range(rows):
        for c in range(cols):
            best = int(np.argmin([b[r * s:(r + 1) * s, c * s:(c + 1) * s].sum() for b in bits]))
            choice[r, c] = stream_format.NO_REFERENCE if best == 0 else best - 1
    return choice, *reference(choice, candidates, ints.shape)


def reference(choice: np.ndarray, refs: list[np.ndarray], shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The reference integers and mask of one block from its sub-blocks' choice."""
    ref, has = np.zeros(shape, np.int16), np.zeros(shape[1:], bool)
    s = stream_format.SUB
    for (r, c), k in np.ndenumerate(choice):
        if k != stream_format.NO_REFERENCE:
            ref[:, r * s:(r + 1) * s, c * s:(c + 1) * s] = refs[k][:, r * s:(r + 1) * s, c * s:(c + 1) * s]
            has[r * s:(r + 1) * s, c * s:(c + 1) * s] = True
    return ref, has


class CodedBlock(NamedTuple):
    """One block of one date: its stream coded alone; for a date with candidate references also its
    stream coded with them and its sub-blocks' choice; its refinement stream (None: not refined)."""

    alone: bytes
    refinement: bytes | None
    series: bytes | None = None
    choice: np.ndarray | None = None


def encode_block(codec: VariableRateCodec, planned: list[Planned], new: list[int], block: int,
                 ints_of: Callable[[int, int], np.ndarray], refinement_of: Callable[[int], BlockRefinement | None] | None = None
                 ) -> dict[int, CodedBlock]:
    """One block position of every date in ``new`` (indices into ``planned``). ``ints_of(date index,
    block)`` gives a date's integers of the block (for a date already written, read back from its
    file); each is asked for once. ``refinement_of(date index)``: a new date's refinement of
    the block (asked after its integers), None where it has none."""
    known: dict[int, np.ndarray] = {}

    def get(i: int) -> np.ndarray:
        if i not in known:
            known[i] = ints_of(i, block)
        return known[i]

    out = {}
    for i in new:
        p = planned[i]
        level, x = codec.level(p.quality), get(i)
        cells = refinement_of(i) if refinement_of is not None else None
        coded = CodedBlock(codec.coder.encode(x, level), None if cells is None else codec.refiner.encode(*cells))
        if p.candidates:
            choice, ref, has = choose(codec.temporal_coder, level, x, [get(j) for j in p.candidates])
            coded = coded._replace(series=codec.temporal_coder.encode(x, level, ref, has), choice=choice)
        out[i] = coded
    return out


def encode_dates(codec: VariableRateCodec, planned: list[Planned], fresh: list[int], blocks: int,
                 ints_of: Callable[[int, int], np.ndarray], run: cluster.Local | cluster.Cluster | None = None,
                 refinement_of: Callable[[int, int], BlockRefinement | None] | None = None
                 ) -> list[dict[int, tuple[bytes, np.ndarray]]]:
    """``encode_block`` of every block position, on ``run`` (``corsa.core.cluster``; default: two local
    threads); ``refinement_of(date index, block)``: a date's refinement of a block, or None."""
    def one(k: int) -> dict[int, tuple[bytes, np.ndarray]]:
        return encode_block(codec, planned, fresh, k, ints_of, None if refinement_of is None else lambda i: refinement_of(i, k))

    progress.grow(blocks)
    with nullcontext(run) if run is not None else cluster.runner() as where:
        coded = []
        for c in where.map(one, range(blocks)):
            coded.append(c)
            progress.advance()
    return coded


def write_dates(out: Path, codec: VariableRateCodec, planned: list[Planned], fresh: list[int],
                coded: list[dict[int, CodedBlock]], masks: dict[int, np.ndarray], shape: tuple[int, int],
                transform, crs: str | None) -> list[Path]:
    """The files of the ``fresh`` dates from their coded blocks (``encode_dates``) and nodata masks
    (absent: no nodata); each written under a temporary name, then renamed. A date with candidate
    references is written with them only where that makes its file smaller than coded alone (the
    class tables of a date alone can beat the temporal tables where the place changed)."""
    sha = codec.card["files"]["decoder"]["sha256"]
    written = []
    for i in fresh:
        p, blocks = planned[i], [c[i] for c in coded]
        refinement = [b.refinement for b in blocks]

        def assembled(with_refs: bool) -> bytes:
            return stream_format.assemble(
                [b.series if with_refs else b.alone for b in blocks], masks.get(i, np.zeros(shape, bool)), p.quality,
                transform, crs, p.date, codec.model_id, sha,
                refs=[planned[j].date for j in p.candidates] if with_refs else None,
                choices=[b.choice for b in blocks] if with_refs else None,
                class_tables=not with_refs and codec.coder.classes > 1,
                refinement=None if None in refinement else refinement)

        data = min((assembled(r) for r in ((False, True) if p.candidates else (False,))), key=len)
        written.append(stream_format.write_date(Path(out), data, p.date))
    return written


# -- reading ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _file(path: str, stamp: tuple[int, int]) -> tuple[bytes, dict]:
    """A date file's bytes and header (checked against its CRC once), keyed to its version."""
    data = Path(path).read_bytes()
    return data, stream_format.read_header(data, Path(path).name)


def _stamped(folder: Path, date: str) -> tuple[Path, tuple[int, int]]:
    """A date's file and its (mtime, size): the caches below are keyed to that version of it."""
    path = Path(folder) / stream_format.file_name(date)
    if not path.is_file():
        raise ProductError(f"{path.name} is missing from {folder}")
    st = path.stat()
    return path, (st.st_mtime_ns, st.st_size)


def header(folder: Path, date: str) -> tuple[bytes, dict]:
    path, stamp = _stamped(folder, date)
    data, h = _file(str(path), stamp)
    if h["date"] != date:
        raise ProductError(f"{path.name} holds date {h['date']!r}, not {date}")
    return data, h


def block_refinement(folder: Path, date: str, k: int, codec: VariableRateCodec) -> BlockRefinement | None:
    """Block ``k``'s refinement (cells and loop filter) of one date, None for a date without (before formats 8 to 11)."""
    return _block_refinement(str(folder), date, _stamped(folder, date)[1], k, str(codec.path))


@functools.lru_cache(maxsize=64)
def _block_refinement(folder: str, date: str, stamp: tuple[int, int], k: int, model: str) -> BlockRefinement | None:
    # a block's refinement is read by each of the up to 9 windows over it: decoded once (a few kB a block)
    data, h = header(Path(folder), date)
    offsets = stream_format.refine_offsets(h)
    if offsets is None:
        return None
    start, n = offsets[k]
    return stream_format.decode_refinement(model_codec(model).refiner, data[start:start + n],
                                           stream_format.block_pixels(h["blocks"][k], h["shape"]),
                                           stream_format.file_name(date), h["version"])


def block_layer(folder: Path, date: str, k: int) -> bytes | None:
    """Block ``k``'s residual layer of one date (``corsa.codec.residual_coder.decode_block``), None for a date
    without (before formats 12 and 13)."""
    data, h = header(folder, date)
    offsets = stream_format.layer_offsets(h)
    if offsets is None:
        return None
    start, n = offsets[k]
    return data[start:start + n]


def block_ints(folder: Path, date: str, k: int, codec: VariableRateCodec) -> np.ndarray:
    """Block ``k`` of one date's integers, decoding the blocks of its references first."""
    return _block_ints(str(folder), date, _stamped(folder, date)[1], k, str(codec.path))


@functools.lru_cache(maxsize=64)
def _block_ints(folder: str, date: str, stamp: tuple[int, int], k: int, model: str) -> np.ndarray:
    # 64 blocks of a 96-channel model: 200 MB; a chain of references is decoded once per block
    codec = model_codec(model)
    data, h = header(Path(folder), date)
    cells = h["blocks"][k]
    start, n = stream_format.stream_offsets(h)[k]
    level = codec.level(h["quality"])
    shape = (codec.channels, cells[0].stop - cells[0].start, cells[1].stop - cells[1].start)
    name = stream_format.file_name(date)
    if not h["refs"]:
        return stream_format.decode_block(codec.coder, data[start:start + n], level, cells, name, h["version"])
    if codec.temporal_coder is None:
        raise ProductError(f"{name} is coded with references to other dates; model {codec.model_id} has no temporal tables")
    choice = h["choices"][k]
    refs: list[np.ndarray] = [np.zeros(shape, np.int16)] * len(h["refs"])
    for j in {int(v) for v in np.unique(choice) if v != stream_format.NO_REFERENCE}:
        _, rh = header(Path(folder), h["refs"][j])
        if (rh["shape"], rh["quality"], rh["block"], rh["sha_prefix"]) != (h["shape"], h["quality"], h["block"], h["sha_prefix"]):
            raise ProductError(f"{name} refers to {h['refs'][j]}, which has another grid, quality or model")
        refs[j] = block_ints(Path(folder), h["refs"][j], k, codec)
    ref, has = reference(choice, refs, shape)
    try:
        return codec.temporal_coder.decode(data[start:start + n], level, shape, ref, has,
                                           channel_map=h["version"] not in stream_format.MAPLESS)
    except ValueError as e:
        raise ProductError(f"{name}: {e}") from e


def forget_blocks() -> None:
    """Drop the blocks' integers and refinements this process keeps (a reading measured afresh)."""
    _block_ints.cache_clear()
    _block_refinement.cache_clear()


def check_model(h: dict, codec: VariableRateCodec) -> None:
    """Refuse to decode a stream-format date (its header ``h``) with a model other than the one that
    wrote it: another decoder, or other tables."""
    model_id, sha_prefix = h["model_id"], h["sha_prefix"]
    if not codec.card["files"]["decoder"]["sha256"].startswith(sha_prefix):
        raise ProductError(f"the product was written with model {stream_format.shown(model_id)} (decoder sha256 {sha_prefix}...), "
                           f"the available model {codec.model_id!r} has "
                           f"{codec.card['files']['decoder']['sha256'][:16]}...: decoding would give wrong reflectances")
    stream_format.check_tables(h["version"], codec.coder, f"the product (written with model {stream_format.shown(model_id)})")
    if (stream_format.tables_of(h["version"]) == stream_format.CLASS_VERSION or h["refine_lengths"] is not None) \
            and model_id != codec.model_id:
        raise ProductError(f"the product is coded with the class tables or refinement of model {stream_format.shown(model_id)}, "
                           f"not of {codec.model_id!r}: decoding would give wrong reflectances")
    if h.get("layer_quality") is not None and (h["layer_quality"] not in codec.qualities
                                           or codec.base(h["layer_quality"]) != h["quality"]):
        raise ProductError(f"the product's residual layer makes level {h['layer_quality']} of level {h['quality']}, which "
                           f"model {codec.model_id!r} does not have")


def model_codec(model: str) -> VariableRateCodec:
    """A model by name or folder, opened once per folder: a product names its model by id, its blocks'
    readers by folder, and each opening reads the model's tables again (0.2-0.5 s)."""
    return _folder_codec(str(model_dir(model).resolve()))


@functools.lru_cache(maxsize=4)
def _folder_codec(folder: str) -> VariableRateCodec:
    return VariableRateCodec(folder)


def read_date(folder: Path, date: str, codec: VariableRateCodec) -> stream_format.StreamDate:
    """One date down to its integers, all blocks (references decoded as needed)."""
    data, h = header(folder, date)
    check_model(h, codec)
    codec.level(h["quality"])
    ints = np.zeros((codec.channels,) + h["cells"], np.int16)
    for k, cells in enumerate(h["blocks"]):
        ints[:, cells[0], cells[1]] = block_ints(folder, date, k, codec)
    refinement = None if h["refine_lengths"] is None else \
        [block_refinement(folder, date, k, codec) for k in range(len(h["blocks"]))]
    return stream_format.StreamDate(date, h["quality"], ints, stream_format.read_mask(data, h, stream_format.file_name(date)),
                               h["shape"], h["transform"], h["crs"], h["model_id"], h["sha_prefix"], refinement)
