"""corsa serve: the local no-code page, in a real browser (headless Chromium). Its form is the
compress service's UDP parameters; submitting runs the job on the embedded engine and the page
shows CF, PSNR, the quicklook and the files; a bad parameter gets a message naming it, in the page."""
import html
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from browser import Browser, binary
from corsa.codec.models import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
UDP = json.loads((ROOT / "process_graphs" / "corsa2_openeo_compress_s2.json").read_text())
SCREENSHOTS = ROOT / "tests" / "screenshots"


@pytest.fixture(scope="module")
def server():
    proc = subprocess.Popen([sys.executable, "-m", "corsa.app.cli", "serve", "--port", "0"], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    line = proc.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:\d+/", line)
    assert m, line
    yield m.group(0)
    proc.terminate()
    proc.wait(20)


@pytest.fixture(scope="module")
def browser():
    if binary() is None:
        pytest.fail("no headless Chromium: apt-get install chromium-headless-shell (see README)")
    b = Browser()
    yield b
    b.close()


def test_the_form_is_the_services_parameters(server):
    page = urllib.request.urlopen(server).read().decode()
    assert re.findall(r'<fieldset data-parameter="([^"]+)">', page) == [p["name"] for p in UDP["parameters"]]
    for p in UDP["parameters"]:
        assert f'title="{html.escape(p["description"])}"' in page
    # the model: a choice among the shipped variable-rate models, from their cards, the default chosen
    options = re.findall(r'<option value="[^"]*/models_onnx/([^"]+)"( selected)?>([^<]+)</option>', page)
    assert options[0][:2] == (DEFAULT_MODEL, " selected") and "(default)" in options[0][2]
    shipped = {p.parent.name: json.loads(p.read_text()) for p in (ROOT / "models_onnx").glob("*/model_card.json")}
    assert {o[0] for o in options} == {k for k, c in shipped.items() if c.get("kind") == "variable-rate"}
    # the quality: the default model's levels with their measured CF and PSNR, its default chosen
    card = shipped[DEFAULT_MODEL]
    levels = re.findall(r'<select name="quality">(.*?)</select>', page)[0]
    chosen = re.findall(r'<option value="(\d+)"( selected)?>(\d+): files (\d+)x smaller than the raw bands, ([\d.]+) dB',
                        levels)
    assert [int(c[0]) for c in chosen] == [q["quality"] for q in card["qualities"]]
    assert [int(c[0]) for c in chosen if c[1]] == [card["default_quality"]]
    first = card["qualities"][0]["test"]["mean_over_sources"]
    assert (int(chosen[0][3]), float(chosen[0][4])) == (round(first["cf"]), round(first["psnr_db"], 1))


def _page_point(browser: Browser, lat: float, lon: float) -> tuple[float, float]:
    return tuple(browser.eval(f"(() => {{ const r = document.getElementById('map').getBoundingClientRect(); "
                              f"const p = corsaMap.latLngToContainerPoint([{lat}, {lon}]); "
                              f"return [r.left + p.x, r.top + p.y]; }})()"))


def _choose(browser: Browser, name: str, value: str) -> None:
    """Pick a choice as a person does: the value set, then the change event the page listens to."""
    browser.eval(f"{{ const c = document.querySelector('select[name={name}]'); c.value = '{value}'; "
                 "c.dispatchEvent(new Event('change')); }")
    assert browser.eval(f"document.querySelector('select[name={name}]').value") == value


def test_a_job_runs_from_the_page(server, browser):
    """As a person: draw the area on the map, pick a model and a quality, run, read the result."""
    browser.send("Emulation.setDeviceMetricsOverride", width=1100, height=900, deviceScaleFactor=1, mobile=False)
    browser.goto(server)
    browser.wait("!!window.corsaMap && document.querySelector('.leaflet-image-layer').complete", 30)
    info = json.loads(urllib.request.urlopen(server + "collection/map.json").read())
    ring = np.array(info["footprint"]["geometry"]["coordinates"][0])
    (w, s), (e, n) = ring.min(0), ring.max(0)
    corner_a, corner_b = (s + 0.62 * (n - s), w + 0.40 * (e - w)), (s + 0.40 * (n - s), w + 0.60 * (e - w))
    browser.eval("document.querySelector('fieldset[data-parameter=spatial_extent]').scrollIntoView()")
    browser.drag(_page_point(browser, *corner_a), _page_point(browser, *corner_b))
    box = {k: float(browser.eval(f"document.querySelector('[name=\"spatial_extent.{k}\"]').value"))
           for k in ("west", "south", "east", "north")}
    # the fields hold the drawn box (to the pixel the mouse could hit: the map shows ~1/500 of a degree a px)
    for k, v in {"west": corner_a[1], "east": corner_b[1], "south": corner_b[0], "north": corner_a[0]}.items():
        assert abs(box[k] - v) < 3 * (e - w) / 300, (k, box[k], v)
    # another model changes the quality choices to its own levels; then back to the default and level 2
    models = browser.eval("[...document.querySelectorAll('select[name=model] option')].map(o => o.value)")
    other = next((m for m in models if not m.endswith("/" + DEFAULT_MODEL)), None)
    if other:
        _choose(browser, "model", other)
        card = json.loads((ROOT / "models_onnx" / other.rsplit("/", 1)[1] / "model_card.json").read_text())
        service_levels = [q for q in card["qualities"] if not q.get("layer")]   # the service's levels
        assert browser.eval("document.querySelectorAll('select[name=quality] option').length") == len(service_levels)
        _choose(browser, "model", models[0])
    _choose(browser, "quality", "2")
    browser.eval("document.querySelector('button[type=submit]').click()")
    browser.wait("['finished', 'error'].includes(document.getElementById('status').dataset.state)", 300)
    assert browser.eval("document.getElementById('error').textContent") == ""
    cf, quality_psnr = float(browser.eval("document.getElementById('cf').textContent")), \
        float(browser.eval("document.getElementById('psnr').textContent"))
    assert cf > 40 and quality_psnr > 30          # level 2 of the default model: about 100x on its test sources
    browser.wait("document.getElementById('quicklook').complete && document.getElementById('quicklook').naturalWidth > 0", 30)
    # the quicklook shows the drawn box: about 20 % of the scene's sides (input and decoded side by side)
    width = browser.eval("document.getElementById('quicklook').naturalWidth")
    height = browser.eval("document.getElementById('quicklook').naturalHeight")
    scene = json.loads(urllib.request.urlopen(server + "collection/map.json").read())
    assert 0.5 < (width - 8) / 2 / height < 2 and height < 0.35 * 1068, (width, height, scene["corners"])
    links = browser.eval("[...document.querySelectorAll('#files a')].map(a => a.href)")
    assert any(h.endswith(".corsa") for h in links) and any(h.endswith("collection.json") for h in links)
    assert any(h.endswith(".tif") for h in links)
    for href in links:
        assert urllib.request.urlopen(href).status == 200
    SCREENSHOTS.mkdir(exist_ok=True)
    browser.screenshot(SCREENSHOTS / "serve_page.png")     # for a person to look at
    browser.send("Emulation.clearDeviceMetricsOverride")


def test_a_bad_parameter_is_named_in_the_page(server, browser):
    browser.goto(server)
    browser.eval("document.querySelector('[name=\"spatial_extent.east\"]').value = "
                 "document.querySelector('[name=\"spatial_extent.west\"]').value - 1")
    browser.eval("document.querySelector('button[type=submit]').click()")
    browser.wait("document.getElementById('error').textContent.length > 0", 30)
    message = browser.eval("document.getElementById('error').textContent")
    assert message.startswith("spatial_extent:") and "west must be less than east" in message
    assert browser.eval("document.getElementById('result').innerHTML") == ""
