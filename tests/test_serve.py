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

import pytest

from browser import Browser, binary
from corsa.codec.models import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
UDP = json.loads((ROOT / "process_graphs" / "corsa2_openeo_compress_s2.json").read_text())


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
    legends = re.findall(r"<legend>([^<]+)</legend>", page)
    assert legends == [p["name"] for p in UDP["parameters"]]
    for p in UDP["parameters"]:
        assert html.escape(p["description"]) in page
    # the model: a choice among the shipped variable-rate models, from their cards, the default chosen
    options = re.findall(r'<option value="[^"]*/models_onnx/([^"]+)"( selected)?>([^<]+)</option>', page)
    assert options[0][:2] == (DEFAULT_MODEL, " selected") and "(default)" in options[0][2]
    assert {o[0] for o in options} == {p.parent.name for p in (ROOT / "models_onnx").glob("*/model_card.json")
                                       if json.loads(p.read_text()).get("kind") == "variable-rate"}


def test_a_job_runs_from_the_page(server, browser):
    browser.goto(server)
    browser.eval("document.querySelector('button[type=submit]').click()")
    browser.wait("['finished', 'error'].includes(document.getElementById('status').dataset.state)", 300)
    assert browser.eval("document.getElementById('error').textContent") == ""
    cf, quality_psnr = float(browser.eval("document.getElementById('cf').textContent")), \
        float(browser.eval("document.getElementById('psnr').textContent"))
    assert cf > 10 and quality_psnr > 35
    browser.wait("document.getElementById('quicklook').complete && document.getElementById('quicklook').naturalWidth > 0", 30)
    links = browser.eval("[...document.querySelectorAll('#files a')].map(a => a.href)")
    assert any(h.endswith(".corsa") for h in links) and any(h.endswith("collection.json") for h in links)
    assert any(h.endswith(".tif") for h in links)
    for href in links:
        assert urllib.request.urlopen(href).status == 200


def test_a_bad_parameter_is_named_in_the_page(server, browser):
    browser.goto(server)
    browser.eval("document.querySelector('[name=\"spatial_extent.east\"]').value = "
                 "document.querySelector('[name=\"spatial_extent.west\"]').value - 1")
    browser.eval("document.querySelector('button[type=submit]').click()")
    browser.wait("document.getElementById('error').textContent.length > 0", 30)
    message = browser.eval("document.getElementById('error').textContent")
    assert message.startswith("spatial_extent:") and "west must be less than east" in message
    assert browser.eval("document.getElementById('result').innerHTML") == ""
