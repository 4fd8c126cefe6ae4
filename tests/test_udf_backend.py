"""The UDF as a geopyspark back end runs it: alone, from its code text, in the job's working folder
(where udf-dependency-archives unpacks "onnx_deps" and "models"), telling the back end its bands."""
import subprocess
import sys

from openeo.metadata import Band, BandDimension, CubeMetadata, SpatialDimension, TemporalDimension

import corsa_udf
from corsa.codec.models import MODELS_DIR
from corsa.openeo.processes import UDF_CODE
from corsa.core.scene import BANDS

PROBE = ("exec(compile(open({udf!r}).read(), '<udf>', 'exec'), {{}}); "
         "import corsa_probe_dependency; print(corsa_probe_dependency.ANSWER)")


def _run_udf_in(folder, udf_path):
    return subprocess.run([sys.executable, "-c", PROBE.format(udf=str(udf_path))], cwd=folder,
                          capture_output=True, text=True)


def test_onnx_deps_goes_on_the_python_path(tmp_path):
    udf = tmp_path / "udf.py"
    udf.write_text(UDF_CODE)
    work = tmp_path / "job"
    work.mkdir()
    missing = _run_udf_in(work, udf)
    assert missing.returncode != 0 and "No module named 'corsa_probe_dependency'" in missing.stderr
    (work / "onnx_deps").mkdir()
    (work / "onnx_deps" / "corsa_probe_dependency.py").write_text("ANSWER = 42\n")
    found = _run_udf_in(work, udf)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "42"


def _metadata() -> CubeMetadata:
    return CubeMetadata([TemporalDimension("t", ["2022-07-01", "2022-07-10"]),
                         BandDimension("bands", [Band(b) for b in BANDS]),
                         SpatialDimension("x", [0, 1280]), SpatialDimension("y", [0, 1280])])


def test_apply_metadata_names_the_bands_each_mode_returns():
    def bands(context):
        return corsa_udf.apply_metadata(_metadata(), context).band_names

    assert bands({"mode": "compress", "model": str(MODELS_DIR / "corsa512")}) == ["idx0", "idx1", "nodata"]
    latent = bands({"mode": "compress", "model": str(MODELS_DIR / "corsa2"), "quality": 3})
    assert latent[:2] == ["z00", "z01"] and latent[-1] == "nodata" and len(latent) == 65
    assert bands({"mode": "decompress", "model": str(MODELS_DIR / "corsa2")}) == list(BANDS)
    assert bands({"mode": "classify", "model": str(MODELS_DIR / "corsa512")}) == ["class"]
