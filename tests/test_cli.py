"""The CLI explains itself: every argument of every command has a help text; progress is sparse lines
when stderr is not a terminal and nothing with --quiet; the normal path prints no library warning."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from rasterio.transform import Affine

from corsa.app import cli
from corsa.codec.models import DEFAULT_MODEL
from corsa.formats.datasets import LOADERS
from test_service import write_scene


def _parsers() -> dict[str, argparse.ArgumentParser]:
    captured = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        captured["root"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            cli.main(["models"])
    finally:
        argparse.ArgumentParser.parse_args = real
    sub = next(a for a in captured["root"]._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_argument_is_described():
    parsers = _parsers()
    assert {"compress", "decompress", "pack", "classify", "reduce", "info", "models", "serve"} <= set(parsers)
    for name, p in parsers.items():
        for action in p._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"corsa {name}: {action.dest} has no help"


@pytest.fixture(scope="module")
def scene_file(data_root, tmp_path_factory):
    s = next(LOADERS["worldstrat"](data_root))
    path = tmp_path_factory.mktemp("cli") / "scene.tif"
    write_scene(path, s.data, Affine(*s.transform), s.crs, s.date)
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corsa.app.cli", *args], capture_output=True, text=True, timeout=300)


def test_progress_lines_and_quiet_and_no_warnings(scene_file, tmp_path):
    r = _run("compress", str(scene_file), "-o", str(tmp_path / "p"), "--model", "corsa2.1")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines and all(line.startswith("corsa compress: ") and "%" in line for line in lines), r.stderr
    assert "\r" not in r.stderr and len(lines) <= 11
    r = _run("decompress", str(tmp_path / "p"), "-o", str(tmp_path / "d.tif"), "--quiet")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    for args in (["compress", str(scene_file), "-o", str(tmp_path / "e"), "--engine", "-q"],
                 ["decompress", str(tmp_path / "e"), "-o", str(tmp_path / "e.tif"), "-q"]):
        r = _run(*args)
        assert r.returncode == 0 and "Warning" not in r.stderr, r.stderr


def test_decompress_imports_only_what_it_needs(scene_file, tmp_path):
    """A decompress off the engine runs without xarray, pandas and dask (their import: 0.6 s of its start)."""
    assert _run("compress", str(scene_file), "-o", str(tmp_path / "p"), "-q").returncode == 0
    code = ("import sys; from corsa.app import cli; "
            f"assert cli.main(['decompress', {str(tmp_path / 'p')!r}, '-o', {str(tmp_path / 'd.tif')!r}, '-q']) == 0; "
            "print(sorted(m for m in ('xarray', 'pandas', 'dask', 'rioxarray') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split("\n")[-2] == "[]", r.stdout + r.stderr
    assert (tmp_path / "d.tif").is_file()


def test_one_default_model_the_one_with_the_best_gain(tmp_path, data_root, capsys):
    """The cards name one default; it is the shipped model with the best measured gain over the
    classical codecs at its speed: a model with a better gain decodes a block more than 1.25x slower
    (its card's int8 block time; corsa3.4: at most 0.03 dB, at levels 1-6, for 1.56x), and `corsa compress` without --model
    writes its product."""
    import json

    from corsa.formats import stream_format
    from corsa.formats import series
    from corsa.codec.models import DEFAULT_MODEL, model_dir

    assert cli.main(["models", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)["models"]
    assert [m["id"] for m in models if m["default"]] == [DEFAULT_MODEL]
    renders = {m["id"]: m["renders"] for m in models}
    assert renders[DEFAULT_MODEL] == renders["corsa4.1"] == ["--date", "--scale / --like"] and renders["corsa2"] == []
    gains = {m["id"]: m["gain_db"] for m in models if m["gain_db"] is not None}

    def block_s(model: str) -> float:
        return json.loads((model_dir(model) / "model_card.json").read_text())["int8"]["test"]["block_s_int8"]

    better = [m for m, g in gains.items() if g > gains[DEFAULT_MODEL]]
    assert len(gains) >= 4 and all(block_s(m) > 1.25 * block_s(DEFAULT_MODEL) for m in better), better
    s = next(LOADERS["bigearthnet"](data_root))
    write_scene(tmp_path / "in.tif", s.data, Affine(*s.transform), s.crs, s.date)
    assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / "prod"), "-q"]) == 0
    [date] = stream_format.dates_in(tmp_path / "prod")
    assert series.header(tmp_path / "prod", date)[1]["model_id"] == DEFAULT_MODEL


@pytest.mark.parametrize("argument, words", [
    (["--bbox", "1,2,3"], "argument --bbox: '1,2,3' is not west,south,east,north"),
    (["--bbox", "a,b,c,d"], "argument --bbox: 'a,b,c,d' is not west,south,east,north"),
    (["--bbox", "5,1,4,2"], "west < east"),
    (["--key-every", "0"], "argument --key-every: '0' is not a whole number of at least 1"),
    (["--key-every", "-2"], "argument --key-every: '-2' is not a whole number of at least 1"),
    (["--dates", "2023-01-01"], "argument --dates: '2023-01-01' is not a date range START/END"),
    (["--dates", "2023-02-01/2023-01-01"], "END excluded and after START"),
    (["--dates", "2023-02-30/"], "is not a date range"),
])
def test_arguments_are_checked_where_they_are_parsed(tmp_path, capsys, argument, words):
    """One line naming the argument and what it accepts, exit 2, nothing written."""
    with pytest.raises(SystemExit) as e:
        cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / "out"), *argument])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "corsa compress: error: " in err and words in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_wrong_model_lists_the_models_there(tmp_path, data_root, capsys):
    s = next(LOADERS["bigearthnet"](data_root))
    write_scene(tmp_path / "in.tif", s.data, Affine(*s.transform), s.crs, s.date)
    assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / "out"), "--model", "corsa9"]) == 2
    err = capsys.readouterr().err
    assert "no model 'corsa9'" in err and "corsa3.1" in err and "corsa512" in err and "Traceback" not in err


def test_help_speaks_to_users(capsys):
    """Every command's help in users' words: the overview lists every command, no module or UDF
    names, and each --quality says what it means for that command."""
    helps = {}
    for command in ([], ["compress"], ["decompress"], ["classify"], ["reduce"], ["pack"], ["serve"]):
        with pytest.raises(SystemExit) as e:
            cli.main(command + ["--help"])
        assert e.value.code == 0
        helps[" ".join(command)] = capsys.readouterr().out
    for name in ("compress", "decompress", "classify", "reduce", "pack", "info", "models", "serve"):
        assert f"corsa {name}" in helps[""], name
    for text in helps.values():
        assert "blockwise" not in text and "UDF" not in text and "corsa." not in text
    assert "job" not in helps["compress"].rsplit("--quality QUALITY", 1)[1].split("--")[0]
    assert "job" in helps["pack"].rsplit("--quality QUALITY", 1)[1].split("--")[0]


def test_the_readme_shows_the_default_models_figures(capsys):
    """The README's figures table is the default model's card (corsa models --table): it follows the default."""
    assert cli.main(["models", "--table"]) == 0
    table = capsys.readouterr().out.strip()
    assert table.startswith(f"| {DEFAULT_MODEL} quality |") and table.count("\n") >= 5
    assert table in (Path(__file__).resolve().parents[1] / "README.md").read_text()
