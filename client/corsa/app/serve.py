"""``corsa serve``: a local no-code page, the counterpart of Terrascope's app for our services.

    corsa serve --port 8765 [--collection SENTINEL2_L2A=PATH] [--service corsa2_openeo_compress_s2]

The page's form is generated from the service UDP's parameters (process_graphs/<id>.json): a
bounding box is drawn on a map (Leaflet, from the npm registry into web/, served from here: no tile
server is reachable, so the map shows the local collection's footprint over a quicklook of it), a
temporal interval is two dates, the model a choice among the shipped models and the quality a
choice showing each level's measured CF and PSNR (their cards), other numbers and strings by their
schema; descriptions from the UDP. Submitting runs the job on the embedded engine over the local
collection (SENTINEL2_L2A -> a folder or file; by default the demo's scene, the shared data's
Major-TOM scene), with progress, then packs the job's files into the product (with its STAC
Collection), decodes it and shows CF (from the product's bytes), PSNR against the input and a
before / after quicklook, with the product's and the decoded files for download. A bad parameter
gets a message that names it, in the page. One job runs at a time; the server listens on 127.0.0.1 only.
"""
from __future__ import annotations

import html
import json
import shutil
import sys
import tempfile
import threading
import traceback
import uuid
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import rasterio
import rasterio.warp

from corsa.formats import stac_catalog
from corsa.formats import job_files
from corsa.formats import product
from corsa.formats import stream_format
from corsa.core import progress
from corsa.blocks import render
from corsa.openeo.apex import local_arguments, read_udp
from corsa.codec.models import MODELS_URL, shipped_cards
from corsa.app.sample import default_scene, quicklook, write_input
from corsa.core.metrics import compression_factor, psnr
from corsa.core.scene import BANDS
from corsa.formats.sources import Catalogue

SERVICE = "corsa2_openeo_compress_s2"
COLLECTION = "SENTINEL2_L2A"


class ParameterError(ValueError):
    """A form value that does not fit the UDP's parameter."""


def _schemas(param: dict) -> list[dict]:
    s = param["schema"]
    return s if isinstance(s, list) else [s]


def _subtype(param: dict) -> str | None:
    return next((s.get("subtype") for s in _schemas(param) if s.get("subtype")), None)


def _types(param: dict) -> set[str]:
    out = set()
    for s in _schemas(param):
        t = s.get("type")
        out |= set(t) if isinstance(t, list) else {t}
    return out


def model_choices() -> list[tuple[str, str]]:
    """(value, label) of each shipped variable-rate model, as its card describes it, the default first:
    the value is the location the services name it by (``codec.MODELS_URL``)."""
    out = []
    for card in sorted(shipped_cards(), key=lambda c: not c.get("default")):
        if card.get("kind") == "variable-rate":
            gain = (card.get("gain_over_classical_db") or {}).get("mean_over_levels_1_8")
            out.append((f"{MODELS_URL}/{card['id']}", card["id"] + (" (default)" if card.get("default") else "") + (
                f": {gain:+.1f} dB over JPEG 2000 / JPEG XL at the same size" if gain is not None else "")))
    return out


WEB = Path(__file__).resolve().parents[3] / "web" / "node_modules" / "leaflet" / "dist"
# What a person reads above each parameter (the UDP's name for any other: a new parameter shows by itself).
TITLES = {"spatial_extent": "Area", "temporal_extent": "Dates", "max_cloud_cover": "Cloud cover at most (%)",
          "model": "Model", "quality": "Quality"}
# ... and in plain words below it (the UDP's own description for any other; it stays as the tooltip).
HELP = {"spatial_extent": "The area whose images are compressed.",
        "temporal_extent": "Images taken from the first date up to the day before the second are compressed.",
        "max_cloud_cover": "Images with more cloud than this are left out.",
        "model": "The learned codec that compresses the images; the default is the best one measured.",
        "quality": "Higher levels keep more detail and make larger files. The figures beside each level are "
                   "measured on test images from several sources."}


def model_levels() -> dict[str, dict]:
    """Each shipped variable-rate model's quality levels as the choice shows them (those the service codes: not the
    levels a card makes of a base and a residual layer): the mean over the test sources of CF and PSNR (its card),
    and its default level; by the model's location."""
    out = {}
    for card in shipped_cards():
        if card.get("kind") != "variable-rate":
            continue
        levels = []
        for q in card["qualities"]:
            if q.get("layer"):      # the page runs the service, which stores a layered level's base only
                continue
            mean = (q.get("test") or {}).get("mean_over_sources") or {}
            figures = (f": files {mean['cf']:.0f}x smaller than the raw bands, {mean['psnr_db']:.1f} dB"
                       if "cf" in mean and "psnr_db" in mean else "")
            levels.append([q["quality"], f"{q['quality']}{figures}"])
        out[f"{MODELS_URL}/{card['id']}"] = {"levels": levels, "default": card["default_quality"]}
    return out


def _options(choices: list, value) -> str:
    return "".join(f'<option value="{html.escape(str(v))}"{" selected" if v == value else ""}>{html.escape(t)}</option>'
                   for v, t in choices)


def form_fields(udp: dict, defaults: dict) -> str:
    """The form's inputs, one group per UDP parameter, from its schema; the model as a choice
    among the shipped models (their cards)."""
    parts = []
    models, levels = model_choices(), model_levels()
    model = defaults.get("model") or (models[0][0] if models else None)
    for p in udp["parameters"]:
        name, description = p["name"], html.escape(p.get("description", p["name"]))
        label = html.escape(HELP.get(name, p.get("description", name)))
        value = defaults.get(name, p.get("default"))
        sub, types = _subtype(p), _types(p)
        if name == "model" and models:
            inputs = f'<select name="{name}">{_options(models, model)}</select>'
        elif name == "quality" and model in levels:
            chosen = value if value is not None else levels[model]["default"]
            inputs = f'<select name="{name}">{_options(levels[model]["levels"], chosen)}</select>'
        elif sub == "bounding-box":
            inputs = (f'<div id="map" data-parameter="{name}" role="application" aria-label="map: drag to draw the area"></div>'
                      '<p class="help">Drag on the map to draw the area, or type its corners (degrees):</p>')
            inputs += "".join(f'<label>{k} <input type="number" step="any" name="{name}.{k}" value="{(value or {}).get(k, "")}"'
                              f' required></label>' for k in ("west", "south", "east", "north"))
            inputs += f'<input type="hidden" name="{name}.crs" value="{(value or {}).get("crs", "EPSG:4326")}">'
        elif sub == "temporal-interval":
            inputs = "".join(f'<label>{k} <input type="date" name="{name}.{i}" value="{(value or ["", ""])[i] or ""}"'
                             f' required></label>' for i, k in enumerate(("from", "to (excluded)")))
        elif types & {"number", "integer"}:
            s = next(s for s in _schemas(p) if s.get("type"))
            bounds = "".join(f' {a}="{s[k]}"' for a, k in (("min", "minimum"), ("max", "maximum")) if k in s)
            step = "1" if "integer" in types else "any"
            required = "" if "null" in types or p.get("optional") else " required"
            inputs = (f'<input type="number" step="{step}" name="{name}"{bounds} value="{"" if value is None else value}"'
                      f'{required}>')
        else:
            inputs = f'<input type="text" name="{name}" value="{html.escape(str(value or ""))}">'
        parts.append(f'<fieldset data-parameter="{html.escape(name)}"><legend>{html.escape(TITLES.get(name, name))}</legend>'
                     f'<p class="help" title="{description}">{label}</p>{inputs}</fieldset>')
    return "\n".join(parts)


def arguments(udp: dict, form: dict) -> dict:
    """The UDP's arguments from the form's fields, checked against its parameter schemas; a
    ParameterError names the parameter and what is wrong."""
    out = {}
    for p in udp["parameters"]:
        name, sub, types = p["name"], _subtype(p), _types(p)
        if sub == "bounding-box":
            try:
                box = {k: float(form[f"{name}.{k}"]) for k in ("west", "south", "east", "north")}
            except (KeyError, ValueError):
                raise ParameterError(f"{name}: west, south, east and north must be numbers") from None
            if not (box["west"] < box["east"] and box["south"] < box["north"]):
                raise ParameterError(f"{name}: west must be less than east and south less than north, got {box}")
            crs = form.get(f"{name}.crs") or "EPSG:4326"
            if crs == "EPSG:4326" and not (-180 <= box["west"] and box["east"] <= 180 and -90 <= box["south"]
                                           and box["north"] <= 90):
                raise ParameterError(f"{name}: longitudes lie in -180..180 and latitudes in -90..90, got {box}")
            out[name] = {**box, "crs": crs}
        elif sub == "temporal-interval":
            try:
                start, end = (date.fromisoformat(form[f"{name}.{i}"]) for i in (0, 1))
            except (KeyError, ValueError):
                raise ParameterError(f"{name}: both dates must be given as YYYY-MM-DD") from None
            if not start < end:
                raise ParameterError(f"{name}: the first date must come before the second (the second is excluded)")
            out[name] = [start.isoformat(), end.isoformat()]
        elif types & {"number", "integer"}:
            text = str(form.get(name, "")).strip()
            if not text:
                if "null" in types or "default" in p:
                    out[name] = p.get("default")
                    continue
                raise ParameterError(f"{name}: a value is needed")
            try:
                v = float(text)
            except ValueError:
                raise ParameterError(f"{name}: {text!r} is not a number") from None
            if "integer" in types and "number" not in types:
                if v != int(v):
                    raise ParameterError(f"{name}: {text!r} is not a whole number")
                v = int(v)
            s = next(s for s in _schemas(p) if s.get("type"))
            if "minimum" in s and v < s["minimum"] or "maximum" in s and v > s["maximum"]:
                raise ParameterError(f"{name}: {v} is outside {s.get('minimum', '-inf')}..{s.get('maximum', 'inf')}")
            out[name] = v
        else:
            out[name] = str(form.get(name) or p.get("default") or "")
    return out


class Jobs:
    """The page's jobs: run one at a time in a thread, each in its own folder."""

    def __init__(self, udp: dict, source: Path, root: Path):
        self.udp, self.source, self.root = udp, source, root
        self.state: dict[str, dict] = {}
        self.lock = threading.Lock()

    def submit(self, args: dict) -> str:
        job = uuid.uuid4().hex[:12]
        self.state[job] = {"id": job, "status": "queued", "progress": 0.0}
        threading.Thread(target=self._run, args=(job, args), daemon=True).start()
        return job

    def _update(self, job: str, **kw) -> None:
        self.state[job] = {**self.state[job], **kw}

    def _run(self, job: str, args: dict) -> None:
        with self.lock:
            self._update(job, status="running")
            folder = self.root / job
            try:
                with progress.shown(f"job {job}", on_update=lambda done, total: self._update(
                        job, progress=round(done / max(total, 1), 3))):
                    self._update(job, **self._work(folder, args))
                self._update(job, status="finished", progress=1.0)
            except Exception as e:  # the page says what went wrong; the server stays up
                traceback.print_exc()
                self._update(job, status="error", error=f"{type(e).__name__}: {e}")

    def _work(self, folder: Path, args: dict) -> dict:
        from corsa.openeo.engine import Engine

        files = folder / "job_files"
        cat = Catalogue({COLLECTION: self.source})
        args = local_arguments(args)
        node = {"process_id": self.udp["id"], "arguments": args, "result": True}
        Engine(cat, output=files).run({"process_graph": {"job": node}})
        model, quality = node["arguments"].get("model"), args.get("quality")
        written = job_files.pack(files, folder / "product", model, quality)
        stac_catalog.write_product(folder / "product")
        codec = product.stream_codec(folder / "product", stream_format.dates_in(folder / "product")[0], model)
        decoded = render.decompress(folder / "product", codec, folder / "decoded", single=False)
        for path, d in zip(decoded, stream_format.dates_in(folder / "product")):
            stac_catalog.write_decoded(path, d, folder / "product")
        source = cat.load(COLLECTION, args["spatial_extent"], args["temporal_extent"], list(BANDS))
        scores, pixels = [], 0
        for i, path in enumerate(decoded):
            with rasterio.open(path) as f:
                rec = f.read()
            truth = np.nan_to_num(source.isel(t=i).values).astype(np.uint16)
            scores.append(psnr(truth, rec))
            pixels += truth.shape[1] * truth.shape[2]
            if i == 0:
                quicklook(truth.astype(np.float64), rec.astype(np.float64), folder / "quicklook.png")
        size = sum(p.stat().st_size for p in written)
        shutil.rmtree(files)
        downloads = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "quicklook.png")
        return {"cf": compression_factor(pixels, size), "psnr_db": float(np.mean(scores)), "bytes": size,
                "dates": len(decoded), "files": downloads, "quicklook": "quicklook.png"}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Compress Sentinel-2 images</title>
<link rel="stylesheet" href="/static/leaflet.css">
<style>body{{font-family:sans-serif;max-width:62em;margin:1.5em auto;padding:0 1em;color:#222}}
fieldset{{margin:.6em 0;border:1px solid #ccc;border-radius:4px}} legend{{font-weight:bold}}
.help{{color:#555;margin:.2em 0;font-size:.92em}} #error{{color:#b00}} label{{margin-right:1em}}
#map{{height:380px;margin:.4em 0;background:#eef;cursor:crosshair}} select{{max-width:100%}}
button{{font-size:1.1em;padding:.4em 1.4em}} #result img{{max-width:100%;border:1px solid #ccc}}
.service{{color:#777;font-size:.85em}}</style></head>
<body><h1>Compress Sentinel-2 images</h1>
<p>Draw an area on the map, choose the dates, a model and a quality, and press <b>Compress</b>. This computer
compresses the ten Sentinel-2 bands of the area with a learned codec, then shows how much smaller the files are,
how close the decompressed image is to the original, and the files to download.</p>
<p class="service">Service: {summary}</p>
<form id="job">{fields}<button type="submit">Compress</button></form>
<p id="error" role="alert"></p><p id="status" aria-live="polite"></p><div id="result"></div>
{map_script}<script src="/static/leaflet.js"></script>
<script>
const form = document.getElementById("job");
const levels = {levels};
const modelChoice = form.querySelector("select[name=model]"), qualityChoice = form.querySelector("select[name=quality]");
if (modelChoice && qualityChoice) modelChoice.addEventListener("change", () => {{
  const m = levels[modelChoice.value];
  if (!m) return;
  qualityChoice.replaceChildren(...m.levels.map(([q, text]) => new Option(text, q, q === m.default, q === m.default)));
}});
async function setUpMap() {{
  const el = document.getElementById("map");
  if (!el || !window.L) {{ if (el) el.remove(); return; }}
  const info = await (await fetch("/collection/map.json")).json();
  const map = L.map(el, {{dragging: false, boxZoom: false, doubleClickZoom: false, attributionControl: false}});
  L.imageOverlay("/collection/background.png", info.corners).addTo(map);
  const footprint = L.geoJSON(info.footprint, {{style: {{color: "#333", weight: 1, fill: false}}}}).addTo(map);
  map.fitBounds(footprint.getBounds(), {{padding: [12, 12]}});
  const field = k => form.querySelector(`[name="${{el.dataset.parameter}}.${{k}}"]`);
  const sides = ["west", "south", "east", "north"];
  const typed = () => {{
    const v = sides.map(k => parseFloat(field(k).value));
    return v.some(isNaN) ? null : L.latLngBounds([v[1], v[0]], [v[3], v[2]]);
  }};
  const box = L.rectangle(typed() || footprint.getBounds(), {{color: "#c0392b", weight: 2}}).addTo(map);
  let start = null;
  map.on("mousedown", e => {{ start = e.latlng; }});
  map.on("mousemove", e => {{ if (start) box.setBounds(L.latLngBounds(start, e.latlng)); }});
  map.on("mouseup", e => {{
    if (!start) return;
    if (!start.equals(e.latlng)) {{
      box.setBounds(L.latLngBounds(start, e.latlng));
      const b = box.getBounds();
      [b.getWest(), b.getSouth(), b.getEast(), b.getNorth()].forEach((v, i) => {{ field(sides[i]).value = v.toFixed(5); }});
    }}
    start = null;
  }});
  sides.forEach(k => field(k).addEventListener("change", () => {{ const b = typed(); if (b) box.setBounds(b); }}));
  window.corsaMap = map;
}}
setUpMap();
form.addEventListener("submit", async (e) => {{
  e.preventDefault();
  document.getElementById("error").textContent = "";
  document.getElementById("result").innerHTML = "";
  const fields = Object.fromEntries(new FormData(form).entries());
  const r = await fetch("/jobs", {{method: "POST", headers: {{"Content-Type": "application/json"}}, body: JSON.stringify(fields)}});
  const answer = await r.json();
  if (!r.ok) {{ document.getElementById("error").textContent = answer.error; return; }}
  poll(answer.id);
}});
const kinds = {{".corsa": "compressed date", ".json": "STAC description", ".tif": "decompressed GeoTIFF"}};
async function poll(id) {{
  const s = await (await fetch("/jobs/" + id)).json();
  const status = document.getElementById("status");
  status.textContent = {{queued: "Waiting", running: "Compressing", finished: "Done", error: "Failed"}}[s.status] + ": " +
    Math.round(100 * s.progress) + "%";
  status.dataset.state = s.status;
  if (s.status === "error") {{ document.getElementById("error").textContent = s.error; return; }}
  if (s.status !== "finished") {{ setTimeout(() => poll(id), 500); return; }}
  const links = s.files.map(f => `<li><a href="/files/${{id}}/${{f}}">${{f}}</a> (${{kinds[f.slice(f.lastIndexOf("."))] || "file"}})</li>`).join("");
  document.getElementById("result").innerHTML =
    `<h2>Result</h2><p id="figures">Files <b><span id="cf">${{s.cf.toFixed(1)}}</span> times smaller</b> than the raw bands
     (${{s.bytes}} bytes for ${{s.dates}} date(s)); decompressed image <b><span id="psnr">${{s.psnr_db.toFixed(2)}}</span> dB</b>
     PSNR from the original (higher is closer; above 40 dB differences are hard to see).</p>
     <p>Original (left) and decompressed (right):</p><img id="quicklook" src="/files/${{id}}/${{s.quicklook}}" alt="before and after">
     <h3>Downloads</h3><ul id="files">${{links}}</ul>`;
}}
</script></body></html>
"""


def map_background(source: Path, out: Path, size: int = 768) -> dict:
    """The map's background, as no tile server is reachable: a true-colour quicklook of the local
    collection's first date, warped to the map's Web Mercator (so it lies right under drawn boxes),
    as a PNG transparent where there is no data; and the collection's footprint. Returns the
    quicklook's corners (south-west, north-east, degrees) and the footprint as GeoJSON."""
    cube = Catalogue({COLLECTION: source}).load(COLLECTION, bands=["B04", "B03", "B02"])
    rgb = np.nan_to_num(cube.isel(t=0).values.astype(np.float32))
    src_crs, src_tr = cube.rio.crs, cube.rio.transform()
    h, w = rgb.shape[1:]
    left, bottom, right, top = rasterio.transform.array_bounds(h, w, src_tr)
    dst_tr, dw, dh = rasterio.warp.calculate_default_transform(src_crs, "EPSG:3857", w, h, left, bottom, right, top)
    scale = max(dw, dh) / size
    dw, dh = max(1, round(dw / scale)), max(1, round(dh / scale))
    dst_tr = dst_tr * rasterio.Affine.scale(scale)
    warped = np.zeros((3, dh, dw), np.float32)
    rasterio.warp.reproject(rgb, warped, src_transform=src_tr, src_crs=src_crs, dst_transform=dst_tr,
                            dst_crs="EPSG:3857", resampling=rasterio.warp.Resampling.average, src_nodata=0, dst_nodata=0)
    valid = warped.any(0)
    lo, hi = np.percentile(rgb[:, rgb.any(0)], [1, 99]) if rgb.any() else (0, 1)
    img = (np.clip((warped - lo) / max(hi - lo, 1), 0, 1) ** (1 / 1.4) * 255).astype(np.uint8)
    with rasterio.open(out, "w", driver="PNG", width=dw, height=dh, count=4, dtype="uint8") as dst:
        dst.write(np.concatenate([img, (valid * 255).astype(np.uint8)[None]]))
    x0, y1 = dst_tr * (0, 0)
    x1, y0 = dst_tr * (dw, dh)
    west, south, east, north = rasterio.warp.transform_bounds("EPSG:3857", "EPSG:4326", x0, y0, x1, y1)
    # The footprint's edges, 16 points each: a UTM tile is not a box in degrees.
    t = np.linspace(0, 1, 16, endpoint=False)
    xs = np.concatenate([left + t * (right - left), np.full(16, right), right - t * (right - left), np.full(16, left)])
    ys = np.concatenate([np.full(16, bottom), bottom + t * (top - bottom), np.full(16, top), top - t * (top - bottom)])
    lon, lat = rasterio.warp.transform(src_crs, "EPSG:4326", xs, ys)
    ring = [[round(x, 6), round(y, 6)] for x, y in zip(lon + lon[:1], lat + lat[:1])]
    return {"corners": [[south, west], [north, east]],
            "footprint": {"type": "Feature", "properties": {"name": str(source)},
                          "geometry": {"type": "Polygon", "coordinates": [ring]}}}


def defaults_for(source: Path) -> dict:
    """Form defaults: a 256 px box at the source's centre and its date."""
    cube = Catalogue({COLLECTION: source}).load(COLLECTION)
    t = str(cube["t"].values[0])[:10] if "t" in cube.dims and not cube["t"].isnull().any() else "2022-07-06"
    x, y = cube["x"].values, cube["y"].values
    cx, cy = len(x) // 2, len(y) // 2
    x0, x1, y0, y1 = x[max(0, cx - 128)], x[min(len(x) - 1, cx + 127)], y[max(0, cy - 128)], y[min(len(y) - 1, cy + 127)]
    w, s, e, n = rasterio.warp.transform_bounds(cube.rio.crs, "EPSG:4326", min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    end = str(np.datetime64(t) + np.timedelta64(1, "D"))
    return {"spatial_extent": {"west": round(w, 5), "south": round(s, 5), "east": round(e, 5), "north": round(n, 5),
                               "crs": "EPSG:4326"}, "temporal_extent": [t, end]}


def make_handler(udp: dict, jobs: Jobs, page: str, background: dict):
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: dict) -> None:
            self._send(code, json.dumps(obj).encode(), "application/json")

        def log_message(self, *_) -> None:   # requests are not news on stderr
            pass

        def do_GET(self) -> None:
            if self.path in ("/", "/index.html"):
                return self._send(200, page.encode(), "text/html; charset=utf-8")
            if self.path == "/collection/map.json":
                return self._json(200, background)
            if self.path == "/collection/background.png":
                return self._send(200, (jobs.root / "background.png").read_bytes(), "image/png")
            if self.path.startswith("/static/"):
                path = (WEB / self.path[len("/static/"):]).resolve()
                if WEB.resolve() in path.parents and path.is_file():
                    kind = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}.get(path.suffix, "application/octet-stream")
                    return self._send(200, path.read_bytes(), kind)
            if self.path.startswith("/jobs/"):
                state = jobs.state.get(self.path[len("/jobs/"):])
                return self._json(200, state) if state else self._json(404, {"error": "no such job"})
            if self.path.startswith("/files/"):
                job, _, rest = self.path[len("/files/"):].partition("/")
                base = (jobs.root / job).resolve()
                path = (base / rest).resolve()
                if job in jobs.state and path.is_file() and base in path.parents:
                    kind = "image/png" if path.suffix == ".png" else "application/octet-stream"
                    return self._send(200, path.read_bytes(), kind)
            self._json(404, {"error": f"nothing at {self.path}"})

        def do_POST(self) -> None:
            if self.path != "/jobs":
                return self._json(404, {"error": f"nothing at {self.path}"})
            try:
                form = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                self._json(201, {"id": jobs.submit(arguments(udp, form))})
            except ParameterError as e:
                self._json(400, {"error": str(e)})
            except ValueError as e:
                self._json(400, {"error": f"the form's data is not JSON: {e}"})

    return Handler


def serve(port: int, source: Path | None = None, service: str = SERVICE, ready=print) -> None:
    """Serve the page on 127.0.0.1:``port`` (0: any free port) until interrupted."""
    udp = read_udp(service)
    with tempfile.TemporaryDirectory(prefix="corsa-serve-") as root:
        # The demo's scene (the shared data's Major-TOM scene) as the 10-band GeoTIFF a collection reads.
        source = Path(source) if source else write_input(default_scene(), Path(root) / "input.tif")
        background = map_background(source, Path(root) / "background.png")
        page = PAGE.format(summary=html.escape(udp.get("summary", udp["id"])), fields=form_fields(udp, defaults_for(source)),
                           levels=json.dumps(model_levels()), map_script="" if (WEB / "leaflet.js").is_file() else
                           "<!-- no map: run 'npm ci' in web/ (scripts/setup.sh does) -->")
        if not (WEB / "leaflet.js").is_file():
            print(f"corsa serve: no map library at {WEB} (run 'npm ci' in web/): the area is typed in", file=sys.stderr)
        jobs = Jobs(udp, source, Path(root))
        server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(udp, jobs, page, background))
        ready(f"corsa serve: http://127.0.0.1:{server.server_address[1]}/ ({udp['id']} over {source})")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
