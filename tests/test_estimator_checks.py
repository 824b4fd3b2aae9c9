"""scikit-learn's conventions, on net1 and net9 at tiny sizes: its own checks
where they take any estimator, and the ones that fit, written here with faces
(sklearn's fit on small random tables, which no net of 96x96 faces takes)."""
import copy

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.utils import estimator_checks

import kfkd
import kfkd_beyond
import kfkd_engine
import kfkd_io

NETS = ['net1', 'net9']


def tiny(name):
    """net1 or net9, small and quick; net9 keeps its mirror_axis='measured'."""
    if name == 'net1':
        return clone(kfkd.net1).set_params(module__hidden_units=8, max_epochs=2, verbose=0,
                                           device='cpu')
    return clone(kfkd_beyond.net9).set_params(module__width=4, max_epochs=1, verbose=0,
                                              device='cpu', precision='fp32', test_shifts=0)


@pytest.fixture(scope='module')
def faces(demo_dir):
    X, y = kfkd.load2d(data_dir=demo_dir)
    return X[:64], y[:64]


def data(name, faces):
    X, y = faces
    return (X.reshape(len(X), -1) if name == 'net1' else X), y


def hashes(net):
    return {key: joblib.hash(value) for key, value in net.get_params(deep=False).items()}


@pytest.fixture(scope='module', params=NETS)
def trained(request, faces):
    """(name, the net fitted with torch's seed 0, its parameters' hashes
    before, and what it predicted and lost then)."""
    name = request.param
    net = tiny(name)
    before = hashes(net)
    torch.manual_seed(0)
    net.fit(*data(name, faces))
    first = net.predict(data(name, faces)[0]), [row['train_loss'] for row in net.history]
    return name, net, before, first


@pytest.mark.parametrize('check', ['check_get_params_invariance', 'check_estimator_cloneable',
                                   'check_estimator_repr',
                                   'check_parameters_default_constructible'])
@pytest.mark.parametrize('name', NETS)
def test_scikit_learns_own_checks(name, check):
    # (check_set_params tries values such as -inf for skorch's private
    # _params_to_validate, which breaks skorch's set_params itself)
    getattr(estimator_checks, check)(name, tiny(name))


def test_fit_changes_no_parameter(trained):
    """check_estimators_overwrite_params' test: every parameter hashes the
    same after fit; net9's mirror_axis stays 'measured', the axis it measured
    is the fitted attribute mirror_axis_."""
    name, net, before, _ = trained
    assert [key for key, value in hashes(net).items() if before[key] != value] == []
    assert net.mirror_axis == tiny(name).mirror_axis
    assert isinstance(net.mirror_axis_, float) and net.columns_ == tuple(kfkd_io.COLUMNS)


def test_fit_twice_gives_the_same(trained, faces):
    """check_fit_idempotent's test, with torch's seed as the random state."""
    name, net, _, first = trained
    X, y = data(name, faces)
    torch.manual_seed(0)
    net.fit(X, y)
    assert np.array_equal(net.predict(X), first[0])
    assert [row['train_loss'] for row in net.history] == first[1]


def test_a_clone_of_a_fitted_net_is_a_fresh_net_with_its_settings(trained):
    name, net, *_ = trained
    twin = clone(net)
    assert not twin.initialized_ and not hasattr(twin, 'mirror_axis_')
    assert hashes(twin) == hashes(tiny(name))


def test_a_second_fit_on_other_faces_measures_their_axis(trained, faces):
    """fit starts afresh: the axis of the first data is not the second's
    (net9 measures its axis; net1 keeps the tutorial's, whatever the data)."""
    name, net, *_ = trained
    X, y = data(name, faces)
    moved = y.copy()
    moved[:, 0::2] += 0.5 / kfkd_engine.HALF  # labels half a pixel right: the axis one more
    first = net.mirror_axis_
    net.fit(X, moved)
    assert net.mirror_axis_ == pytest.approx(first + (name == 'net9'), abs=0.15)
    assert net.mirror_axis == tiny(name).mirror_axis


def test_reading_a_model_changes_no_entry_it_is_given(trained):
    name, net, *_ = trained
    entry, weights = kfkd_engine.model_entry(net, net.module_.state_dict(), name)
    del entry['settings']['test_shifts']  # as files from before test-time shifts
    kept = copy.deepcopy(entry)
    restored = kfkd_engine.restore_net(entry, weights, 'the entry', 'cpu')
    assert entry == kept
    assert restored.test_shifts == 0 and restored.mirror_axis_ == net.mirror_axis_
