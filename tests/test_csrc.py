"""The CUDA extension fsmooth._C: built sources import and register their schemas (runs need a GPU)."""
import os
import shutil

import pytest
import torch

from fsmooth._ext import load_extension


def _nvcc_present() -> bool:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return shutil.which("nvcc") is not None or os.path.exists(os.path.join(home, "bin", "nvcc"))


pytestmark = pytest.mark.skipif(not _nvcc_present(), reason="no CUDA toolkit (nvcc): the extension is not built")


def test_extension_imports_and_registers_schemas():
    module, reason = load_extension()
    assert module is not None, reason
    assert torch.ops.fsmooth.abi_version() == 1
    schema = torch.ops.fsmooth.while_loop_supported.default._schema
    assert str(schema) == "fsmooth::while_loop_supported() -> int"
    code = torch.ops.fsmooth.while_loop_supported()
    assert code in (0, 1, 2)
    if not torch.cuda.is_available():
        assert code != 0  # no driver, no conditional nodes
    assert hasattr(torch.classes.fsmooth, "WhileLoopGraph")


def test_while_loop_graph_rejects_bad_arguments():
    load_extension()
    with pytest.raises(RuntimeError, match="null cudaGraph_t"):
        torch.classes.fsmooth.WhileLoopGraph(0, torch.zeros((), dtype=torch.bool))
    with pytest.raises(RuntimeError, match="bool CUDA tensor"):
        torch.classes.fsmooth.WhileLoopGraph(1, torch.zeros((), dtype=torch.bool))


@pytest.mark.cuda
def test_while_loop_graph_runs_a_counter():
    """A captured body incrementing a counter runs, in one launch, until the counter reaches a limit."""
    from fsmooth.defense.while_loop import extension_while_reason
    reason = extension_while_reason()
    if reason is not None:
        pytest.skip(reason)
    counter = torch.zeros((), dtype=torch.int64, device="cuda")
    limit = torch.full((), 37, dtype=torch.int64, device="cuda")
    pred = torch.ones((), dtype=torch.bool, device="cuda")
    body = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(body):
        counter.add_(1)
        torch.lt(counter, limit, out=pred)
    loop = torch.classes.fsmooth.WhileLoopGraph(int(body.raw_cuda_graph()), pred)
    counter.zero_()
    pred.fill_(True)
    loop.launch()
    torch.cuda.synchronize()
    assert int(counter) == 37
    limit.fill_(5)
    counter.zero_()
    pred.fill_(True)
    loop.launch()
    assert int(counter) == 5
