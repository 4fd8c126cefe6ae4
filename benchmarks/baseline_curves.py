"""Rate-distortion curves of JPEG 2000 and JPEG XL for every test scene, swept once and cached.

    python -m benchmarks.baseline_curves            # fills benchmarks/results/baseline_curves.json
    python -m benchmarks.baseline_curves --force    # recomputes every scene

Instead of bisecting each classical codec to each CF a model reaches (benchmarks/rd.py, one
bisection per scene, codec, layout and target), each codec's quality knob is swept over a fixed
grid spanning about CF 8 to 300, and PSNR is read off the curve by linear interpolation in log CF
(shared/EVAL_PROTOCOL.md allows either). The sweep is paid once per scene: every model and quality
level is then compared at equal size against the same curves. Both layouts of
``benchmarks.baselines`` are swept; ``psnr_at`` keeps the better one at each CF.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from corsa.formats.datasets import load_split
from corsa.core.metrics import compression_factor, psnr
from corsa.core.scene import Scene, nodata_mask, to_uint16

from .baselines import CODECS, code_scene
from .rd import SPLIT_FILE

LAYOUTS = ("10m", "20m")
# Knob grids, steps of about 1.5-1.8x in CF (the protocol suggests CF 16, 24, 32.7, 48, ...): few
# points, as the sweep is the slow part. JPEG 2000's knob is OpenJPEG's PSNR target at 16-bit peak,
# about 16.3 dB above the protocol's PSNR (peak 10000): 35..68 dB gives about 19..52 dB, CF ~8 to a
# few hundred (small patches stop near CF 170, where the codestream headers dominate). The low end
# is for hard scenes (a TerraMesh cell needs target 42 for CF 32); on easy small scenes, targets
# below ~45 break OpenJPEG's rate control (garbage decodes), which ``_front`` discards. JPEG XL's
# knob is 1/distance (distance 25, libjxl's maximum, to 0.25) on a log scale, about CF 5 to 100-900.
GRID: dict[str, list[float]] = {
    "jpeg2000": np.linspace(35.0, 68.0, 15).round(3).tolist(),
    "jpegxl": np.geomspace(1 / 25, 4.0, 12).round(5).tolist(),
}
DEFAULT_CACHE = Path(__file__).resolve().parent / "results" / "baseline_curves.json"


def split_cache(split: str) -> Path:
    """Where a split's curves are cached: the test split's in DEFAULT_CACHE, another's beside it."""
    return DEFAULT_CACHE if split == "test" else DEFAULT_CACHE.with_name(f"baseline_curves_{split}.json")

Curves = dict  # the cache's JSON: {"grid": GRID, "scenes": {name: {..., "curves": {codec: {layout: [point]}}}}}


def sweep_scene(scene: Scene) -> dict:
    """Every (codec, layout, knob) point of one scene: knob, bytes, CF and PSNR."""
    curves: dict[str, dict[str, list[dict]]] = {}
    for name, knobs in GRID.items():
        for layout in LAYOUTS:
            points = []
            for knob in knobs:
                size, decoded = code_scene(scene.data, CODECS[name], knob, layout)
                points.append({"knob": knob, "bytes": size, "cf": round(compression_factor(scene.pixels, size), 4),
                               "psnr": round(psnr(scene.data, decoded), 4)})
            curves.setdefault(name, {})[layout] = points
    return {"group": scene.group, "level": scene.extra.get("level", "L2A"), "shape": list(scene.data.shape[1:]),
            "floor_psnr": round(_mean_image_psnr(scene.data), 4), "curves": curves}


def _mean_image_psnr(data: np.ndarray) -> float:
    """PSNR of the scene replaced by each band's mean: what a decoder knows from (almost) no bits."""
    valid = ~nodata_mask(data)
    means = data[:, valid].mean(1) if valid.any() else np.zeros(data.shape[0])
    return psnr(data, to_uint16(np.broadcast_to(means[:, None, None], data.shape)))


def load(path: Path = DEFAULT_CACHE) -> Curves:
    """The cache, or an empty one; a cache swept over another grid counts as empty."""
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("grid") == GRID:
            return cached
        print(f"{path} was swept over another knob grid: recomputing every scene")
    return {"grid": GRID, "scenes": {}}


def fill(scenes: list[Scene], path: Path = DEFAULT_CACHE, force: bool = False) -> Curves:
    """The curves of every scene, sweeping only those missing from the cache (all with ``force``).
    The cache is rewritten after each scene, so an interrupted run keeps what it finished."""
    curves = {"grid": GRID, "scenes": {}} if force else load(path)
    todo = [s for s in scenes if s.name not in curves["scenes"]]
    t_all = time.time()
    for i, s in enumerate(todo, 1):
        t = time.time()
        curves["scenes"][s.name] = sweep_scene(s)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(curves, indent=1))
        print(f"[{i}/{len(todo)}] {s.name} {s.data.shape[1]}x{s.data.shape[2]} px: {time.time() - t:.1f} s "
              f"(total {time.time() - t_all:.0f} s)", flush=True)
    return curves


def _front(points: list[dict], floor: float) -> tuple[np.ndarray, np.ndarray]:
    """log CF and PSNR of the points no other point beats at once in CF and PSNR, CF ascending:
    a knob setting that is both larger and worse than another is never the one to use. Points
    worse than the scene's band means (``floor``) are a codec's failed rate control, not an
    operating point: interpolating towards them would understate the codec."""
    best, keep = floor, []
    for p in sorted(points, key=lambda p: -p["cf"]):
        if p["psnr"] > best:
            best = p["psnr"]
            keep.append(p)
    keep.reverse()
    return np.log([p["cf"] for p in keep]), np.array([p["psnr"] for p in keep])


def psnr_at(curves: Curves, scene: str, codec: str, cf: float) -> float | None:
    """The codec's PSNR at this CF on one scene: the better of the two layouts, each interpolated
    linearly in log CF between swept points; None where the CF is outside both layouts' sweeps
    (never extrapolated)."""
    best, entry = None, curves["scenes"][scene]
    for points in entry["curves"][codec].values():
        x, y = _front(points, entry["floor_psnr"])
        if x.size and x[0] <= np.log(cf) <= x[-1]:
            value = float(np.interp(np.log(cf), x, y))
            best = value if best is None else max(best, value)
    return best


def best_classical_at(curves: Curves, scene: str, cf: float) -> tuple[float, str] | None:
    """The best classical codec at this CF on one scene: (PSNR, codec name), None if none reaches it."""
    found = [(v, c) for c in CODECS if (v := psnr_at(curves, scene, c, cf)) is not None]
    return max(found) if found else None


def main(argv: list[str] | None = None) -> Curves:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--force", action="store_true", help="recompute every scene, not only the missing ones")
    p.add_argument("--scenes", nargs="+", help="only these test scenes (by name)")
    p.add_argument("--out", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args(argv)
    scenes = load_split(SPLIT_FILE, "test")
    if args.scenes:
        scenes = [s for s in scenes if s.name in args.scenes]
    curves = fill(scenes, args.out, args.force)
    for s in scenes:
        ranges = {c: [f"{min(q['cf'] for q in pts):.0f}-{max(q['cf'] for q in pts):.0f}"
                      for pts in curves["scenes"][s.name]["curves"][c].values()] for c in CODECS}
        print(f"{s.name}: swept CF range per layout (10m, 20m): {ranges}")
    return curves


if __name__ == "__main__":
    main()
