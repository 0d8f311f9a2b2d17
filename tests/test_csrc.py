"""The CUDA extension fsmooth._C: built sources import and register their schemas (runs need a GPU)."""
import os
import shutil

import pytest
import torch

from fsmooth import _ext
from fsmooth._ext import load_extension


def _nvcc_present() -> bool:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return shutil.which("nvcc") is not None or os.path.exists(os.path.join(home, "bin", "nvcc"))


pytestmark = pytest.mark.skipif(not _nvcc_present(), reason="no CUDA toolkit (nvcc): the extension is not built")


def test_extension_imports_and_registers_schemas():
    module, reason = load_extension()
    assert module is not None, reason
    assert torch.ops.fsmooth.abi_version() == _ext.EXTENSION_ABI
    schema = torch.ops.fsmooth.while_loop_supported.default._schema
    assert str(schema) == "fsmooth::while_loop_supported() -> int"
    code = torch.ops.fsmooth.while_loop_supported()
    assert code in (0, 1, 2)
    if not torch.cuda.is_available():
        assert code != 0  # no driver, no conditional nodes
    assert hasattr(torch.classes.fsmooth, "WhileLoopGraph")


def test_build_matches_running_torch_and_sources():
    """What ``gpu_suite.sh setup`` checks before trusting the build (else it rebuilds)."""
    info = _ext.build_info()
    assert info is not None, _ext.abi_reason()
    assert info["torch"] == torch.__version__ and info["cuda"] == str(torch.version.cuda)
    assert info["sources"] == _ext.sources_digest()
    assert _ext.stale_reason() is None


def test_stale_reason_names_a_changed_source_or_another_torch(tmp_path, monkeypatch):
    if _ext.build_info() is None:
        pytest.skip(_ext.abi_reason())
    for src in _ext.SOURCE_DIR.iterdir():
        (tmp_path / src.name).write_bytes(src.read_bytes())
    assert _ext.stale_reason(tmp_path) is None
    (tmp_path / "while_loop.cpp").write_text((tmp_path / "while_loop.cpp").read_text() + "// edited\n")
    assert "changed since fsmooth._C was built" in _ext.stale_reason(tmp_path)
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert "built for torch" in _ext.stale_reason(None)


def test_while_loop_graph_rejects_bad_arguments():
    load_extension()
    cap = torch.full((), 4, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="null cudaGraph_t"):
        torch.classes.fsmooth.WhileLoopGraph(0, torch.zeros((), dtype=torch.bool), cap)
    with pytest.raises(RuntimeError, match="max_trips must be a one-element int64"):
        torch.classes.fsmooth.WhileLoopGraph(1, torch.zeros((), dtype=torch.bool), cap.float())
    with pytest.raises(RuntimeError, match="bool CUDA tensor"):
        torch.classes.fsmooth.WhileLoopGraph(1, torch.zeros((), dtype=torch.bool), cap)


def _skip_without_extension_while_loop():
    from fsmooth.defense.while_loop import extension_while_reason
    reason = extension_while_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.cuda
def test_while_loop_graph_runs_a_counter():
    """A captured body incrementing a counter runs, in one launch, until the counter reaches a limit."""
    _skip_without_extension_while_loop()
    counter = torch.zeros((), dtype=torch.int64, device="cuda")
    limit = torch.full((), 37, dtype=torch.int64, device="cuda")
    cap = torch.full((), 1000, dtype=torch.int64, device="cuda")
    pred = torch.ones((), dtype=torch.bool, device="cuda")
    body = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(body):
        counter.add_(1)
        torch.lt(counter, limit, out=pred)
    loop = torch.classes.fsmooth.WhileLoopGraph(int(body.raw_cuda_graph()), pred, cap)
    counter.zero_()
    pred.fill_(True)
    loop.launch()
    torch.cuda.synchronize()
    assert int(counter) == 37 and int(loop.trips()) == 37
    limit.fill_(5)
    counter.zero_()
    pred.fill_(True)
    loop.launch()
    assert int(counter) == 5 and int(loop.trips()) == 5
    pred.fill_(False)  # the predicate is checked before the first trip
    loop.launch()
    assert int(counter) == 5 and int(loop.trips()) == 0


@pytest.mark.cuda
def test_while_loop_graph_stops_at_max_trips_when_the_predicate_never_clears():
    """A body that never clears the predicate (a bug) still ends: the trip cap is enforced on the device."""
    _skip_without_extension_while_loop()
    counter = torch.zeros((), dtype=torch.int64, device="cuda")
    cap = torch.full((), 41, dtype=torch.int64, device="cuda")
    pred = torch.ones((), dtype=torch.bool, device="cuda")
    body = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(body):
        counter.add_(1)
        pred.fill_(True)
    loop = torch.classes.fsmooth.WhileLoopGraph(int(body.raw_cuda_graph()), pred, cap)
    loop.launch()
    torch.cuda.synchronize()
    assert int(counter) == 41 and int(loop.trips()) == 41
    cap.fill_(0)  # read on the device at each launch: no trip at all
    loop.launch()
    torch.cuda.synchronize()
    assert int(counter) == 41 and int(loop.trips()) == 0


@pytest.mark.cuda
def test_extension_matches_the_running_torch_on_the_gpu():
    """On the GPU machine: the freshly built extension can run WHILE loops and is not stale."""
    assert torch.ops.fsmooth.while_loop_supported() == 0
    assert _ext.stale_reason() is None
