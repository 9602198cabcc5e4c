from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Models computed inside the test process use one torch thread. They are small, and on a
    2-core host that is busy (CI beside other work) torch's default of one thread per core made
    them up to ~40x slower: intra-op threads spin against each other and the busy neighbours
    (SmolLM2 int8 tests ran past their 300 s timeout under load 12). Daemons and workers the
    tests start pick their own thread counts, as in production."""
    try:
        import torch
    except ImportError:  # a test environment without torch: nothing to pin
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def native_kernels() -> None:
    """Skip without a C compiler; fail if there is one and the native kernels did not build."""
    import shutil

    from edgemesh import kernels

    if kernels.native() is None:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail("a C compiler is here but the native kernels did not build")
        pytest.skip("no C compiler")
