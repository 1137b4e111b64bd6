import os

# Triton kernels run under the interpreter on machines without a CUDA GPU. The variable must be
# set before triton decorates any kernel, hence here, before any test module imports mixq.kernels.
try:
    import torch

    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=False)
settings.load_profile("ci")


def cpu_kernel_paths() -> list[str]:
    """The C++ kernel families this CPU can run (AVX-512 VNNI, AVX2, scalar); none without mixq._C."""
    try:
        from mixq import _C
    except ImportError:
        return []
    return (["vnni"] if _C.has_vnni() else []) + (["avx2"] if _C.has_avx2() else []) + ["scalar"]


@pytest.fixture(params=cpu_kernel_paths() or ["unbuilt"])
def kernel_path(request):
    """Runs a test on every kernel family this CPU has, then restores the automatic choice."""
    from mixq import _C

    _C.set_kernel_path(request.param)
    assert _C.kernel_path() == request.param
    yield request.param
    _C.set_kernel_path("auto")


def pytest_collection_modifyitems(config, items):
    if _cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
