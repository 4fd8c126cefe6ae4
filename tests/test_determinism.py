"""The same input and model give byte-identical products, run after run and with 1 or 2 threads
(onnxruntime's intra-op threads and dask's workers on the engine, the block workers of the
block-by-block path); decompression is deterministic too."""
import dask
from openeo.udf import UdfData
import pytest
from rasterio.transform import Affine

from corsa.core import cluster
from corsa.app import cli
from corsa.openeo import engine
from corsa.formats.datasets import LOADERS

from test_bad_inputs import write_tif
from conftest import stored_files


@pytest.fixture
def threads(monkeypatch):
    """Run the engine with ``n`` threads: dask workers, and the UDF's onnxruntime sessions."""
    run_udf_code = engine.run_udf_code
    seen = set()

    def use(n: int):
        def with_threads(code, data):
            seen.add(n)
            return run_udf_code(code, UdfData(datacube_list=data.get_datacube_list(),
                                              user_context={**data.user_context, "threads": n}))
        monkeypatch.setattr(engine, "run_udf_code", with_threads)
        return dask.config.set(num_workers=n)
    use.seen = seen
    return use


def files(folder):
    return {p.name: p.read_bytes() for p in stored_files(folder)}


@pytest.mark.parametrize("model, files_per_date", [("corsa512", 3), ("corsa2", 1)])
def test_products_and_decoding_are_byte_identical(tmp_path, data_root, threads, monkeypatch, model, files_per_date):
    s = next(LOADERS["majortom"](data_root))
    data = s.data[:, 200:800, 300:900].copy()       # 600 px: chunks of 512 and 88 px, computed in parallel
    data[:, :30, :50] = 0
    src = write_tif(tmp_path / "in.tif", data, Affine(*s.transform) * Affine.translation(300, 200), s.crs)
    runs = {}
    for name, n, path in (("first", 1, "--engine"), ("again", 1, "--engine"), ("two_threads", 2, "--engine"),
                          ("blocks_one_worker", 1, None), ("blocks_two_workers", 2, None)):
        with threads(n), monkeypatch.context() as m:
            m.setattr(cluster, "THREADS", n)
            extra = [path] if path else []
            assert cli.main(["compress", str(src), "-o", str(tmp_path / name), "--model", model, *extra]) == 0
            assert cli.main(["decompress", str(tmp_path / name), "-o", str(tmp_path / f"{name}_decoded"), *extra]) == 0
        runs[name] = files(tmp_path / name), files(tmp_path / f"{name}_decoded")
    assert len(runs["first"][0]) == files_per_date and len(runs["first"][1]) == 1
    assert runs["again"] == runs["first"]
    assert runs["two_threads"] == runs["first"]
    assert threads.seen == {1, 2}                   # the UDF really ran with both thread counts
    # corsa512 always runs on the engine; a variable-rate model's default path gives the same bytes
    assert runs["blocks_one_worker"] == runs["blocks_two_workers"] == runs["first"]
