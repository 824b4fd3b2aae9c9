"""kfkd.install_as_nolearn(): nolearn's NeuralNet, Lasagne's layers and Theano's
shared variables on kfkd's engine, with nolearn's behaviour."""
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

import kfkd
import kfkd_engine
import kfkd_nolearn

kfkd.install_as_nolearn()
import theano  # noqa: E402  (kfkd's, after install_as_nolearn)
from lasagne import layers  # noqa: E402
from lasagne.updates import adagrad, nesterov_momentum  # noqa: E402
from nolearn.lasagne import BatchIterator, NeuralNet  # noqa: E402


MLP_LAYERS = [('input', layers.InputLayer), ('hidden', layers.DenseLayer),
              ('output', layers.DenseLayer)]


def mlp(**kwargs):
    settings = dict(
        layers=MLP_LAYERS, input_shape=(None, 9216), hidden_num_units=10,
        output_nonlinearity=None, output_num_units=30, update=nesterov_momentum,
        update_learning_rate=0.01, update_momentum=0.9, regression=True, max_epochs=2,
        verbose=0)
    return NeuralNet(**{**settings, **kwargs})


def convnet(**kwargs):
    """The tutorial's net2, as its definition reads."""
    settings = dict(
        layers=[('input', layers.InputLayer), ('conv1', layers.Conv2DLayer),
                ('pool1', layers.MaxPool2DLayer), ('conv2', layers.Conv2DLayer),
                ('pool2', layers.MaxPool2DLayer), ('conv3', layers.Conv2DLayer),
                ('pool3', layers.MaxPool2DLayer), ('hidden4', layers.DenseLayer),
                ('hidden5', layers.DenseLayer), ('output', layers.DenseLayer)],
        input_shape=(None, 1, 96, 96),
        conv1_num_filters=32, conv1_filter_size=(3, 3), pool1_pool_size=(2, 2),
        conv2_num_filters=64, conv2_filter_size=(2, 2), pool2_pool_size=(2, 2),
        conv3_num_filters=128, conv3_filter_size=(2, 2), pool3_pool_size=(2, 2),
        hidden4_num_units=500, hidden5_num_units=500,
        output_num_units=30, output_nonlinearity=None,
        update_learning_rate=0.01, update_momentum=0.9, regression=True, max_epochs=1,
        verbose=0)
    return NeuralNet(**{**settings, **kwargs})


@pytest.fixture(scope='module')
def faces(demo_dir):
    X, y = kfkd.load(data_dir=demo_dir)
    return X[:200], y[:200]


def test_the_tutorials_imports_resolve_to_kfkd():
    import lasagne.layers
    import nolearn.lasagne
    assert nolearn.lasagne.NeuralNet is kfkd_nolearn.NeuralNet
    assert lasagne.layers.DenseLayer is kfkd_nolearn.DenseLayer
    assert theano.shared(np.float32(0.03)).get_value() == np.float32(0.03)
    kfkd.install_as_nolearn()  # a second call changes nothing
    assert sys.modules['nolearn.lasagne'] is nolearn.lasagne


def test_what_the_tutorial_tries_and_catches_is_an_import_error():
    with pytest.raises(ImportError):
        from lasagne.layers.cuda_convnet import Conv2DCCLayer  # noqa: F401


def test_what_is_missing_is_named():
    with pytest.raises(AttributeError, match=r'theano.function is beyond what the tutorial '
                                             r'uses'):
        theano.function([], [])
    with pytest.raises(ImportError, match='Conv2DCCLayer'):
        from lasagne.layers import Conv2DCCLayer  # noqa: F401


def test_refuses_where_the_real_package_is_imported(monkeypatch):
    real = types.ModuleType('lasagne')
    real.__file__ = '/site-packages/lasagne/__init__.py'
    monkeypatch.setitem(sys.modules, 'lasagne', real)
    with pytest.raises(ImportError, match=r'lasagne is already imported \(from '
                                          r'/site-packages/lasagne/__init__.py\)'):
        kfkd.install_as_nolearn()


def test_net2s_definition_builds_kfkds_net2():
    ours = convnet().initialize().net_.module_
    theirs = clone(kfkd.net2).set_params(device='cpu').initialize().module_
    assert [n for n, _ in ours.named_children()] == [n for n, _ in theirs.named_children()]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 8_051_502
    # the same fast layers: ReLU behind each max-pool, as kfkd.ConvNet has it
    assert isinstance(ours.pool1, kfkd_engine.MaxPool2DLayer) and ours.conv1.nonlinearity is None


def test_fits_predicts_and_keeps_nolearns_history(faces):
    X, y = faces
    net = mlp().fit(X, y)
    assert [h['epoch'] for h in net.train_history_] == [1, 2]
    assert {'train_loss', 'valid_loss', 'dur'} <= set(net.train_history_[-1])
    assert net.predict(X[:5]).shape == (5, 30)
    dataset = torch.utils.data.TensorDataset(torch.as_tensor(y))
    # eval_size=0.2 validates on the first fifth, as kfkd's own nets do
    assert list(net.net_.train_split(dataset)[1].indices) == list(
        kfkd.net1.train_split(dataset)[1].indices)


def test_shared_variables_steer_the_optimizer_while_it_trains(faces):
    X, y = faces
    rates = []

    def halve(nn, history):
        rates.append(nn.net_.optimizer_.param_groups[0]['lr'])
        nn.update_learning_rate.set_value(np.float32(nn.update_learning_rate.get_value() / 2))

    net = mlp(update_learning_rate=theano.shared(np.float32(0.04)), on_epoch_finished=[halve])
    net.max_epochs = 3
    net.fit(X, y)
    assert rates == pytest.approx([0.04, 0.02, 0.01])


def test_stop_iteration_ends_training_and_training_finished_is_called(faces):
    X, y = faces
    finished = []

    def stop_after_two(nn, history):
        if history[-1]['epoch'] == 2:
            raise StopIteration()

    net = mlp(on_epoch_finished=stop_after_two,
              on_training_finished=[lambda nn, history: finished.append(len(history))])
    net.max_epochs = 10
    net.fit(X, y)
    assert len(net.train_history_) == 2 and finished == [2]


class Mirror(BatchIterator):
    """A numpy transform, as the tutorial's FlipBatchIterator has one."""
    flip_indices = [(0, 2), (1, 3)]
    seen = []  # (type, shape, flip_indices) of each batch it transformed

    def transform(self, Xb, yb):
        Xb, yb = super().transform(Xb, yb)
        Mirror.seen.append((type(Xb), Xb.shape, self.flip_indices))
        Xb[:] = 0  # changes to a batch stay in it
        return Xb, yb


def test_a_numpy_transform_and_class_attributes_set_on_a_clone(faces):
    X, y = faces
    original = X.copy()
    net = mlp(batch_iterator_train=Mirror(batch_size=64))
    model = clone(net)
    model.batch_iterator_train.flip_indices = ()
    model.output_num_units = 30
    model.fit(X, y)
    assert Mirror.seen and all(kind is np.ndarray and len(shape) == 2 and indices == ()
                               for kind, shape, indices in Mirror.seen)
    train, _ = model.net_.train_split(torch.utils.data.TensorDataset(torch.as_tensor(y)))
    sizes = [min(64, len(train) - start) for start in range(0, len(train), 64)]
    assert [shape[0] for _, shape, _ in Mirror.seen[:len(sizes)]] == sizes
    assert net.batch_iterator_train.flip_indices == [(0, 2), (1, 3)]
    assert np.array_equal(X, original)


def test_attributes_set_before_fit_take_effect():
    model = clone(convnet())
    model.output_num_units = 4
    vars(model).update(dict(hidden4_num_units=20, max_epochs=3))
    module = model.initialize().net_.module_
    assert module.output.out_features == 4 and module.hidden4.out_features == 20


def test_params_pass_between_nets_by_layer_name(faces):
    X, y = faces
    source = mlp().fit(X, y)
    values = source.get_all_params_values()
    assert list(values) == ['hidden', 'output'] and values['hidden'][0].shape == (10, 9216)
    target = clone(source)
    target.output_num_units = 4
    target.load_params_from(source)  # the output layer does not fit: it stays as it was
    assert np.array_equal(target.get_all_params_values()['hidden'][0], values['hidden'][0])
    assert target.get_all_params_values()['output'][0].shape == (4, 10)
    before = target.get_all_params_values()
    target.load_params_from({'hidden': [v * 0 for v in values['hidden']]})
    assert not target.get_all_params_values()['hidden'][0].any()
    assert np.array_equal(target.get_all_params_values()['output'][0], before['output'][0])


def test_pickles_and_predicts_the_same(faces, tmp_path):
    X, y = faces
    net = mlp(update_learning_rate=theano.shared(np.float32(0.01)),
              batch_iterator_train=Mirror(batch_size=128)).fit(X, y)
    with open(tmp_path / 'net.pickle', 'wb') as f:
        pickle.dump(net, f, -1)
    with open(tmp_path / 'net.pickle', 'rb') as f:
        again = pickle.load(f)
    assert np.array_equal(again.predict(X[:8]), net.predict(X[:8]))
    assert len(again.train_history_) == 2


def test_grid_search_over_hidden_num_units(faces):
    X, y = faces
    search = GridSearchCV(mlp(), {'hidden_num_units': [5, 10]}, cv=2).fit(X, y)
    assert search.best_params_['hidden_num_units'] in (5, 10)


def test_other_updates_name_their_optimizers(faces):
    X, y = faces
    net = NeuralNet(layers=MLP_LAYERS, input_shape=(None, 9216), hidden_num_units=10,
                    output_nonlinearity=None, output_num_units=30, update=adagrad,
                    update_learning_rate=0.01, regression=True, max_epochs=1).fit(X, y)
    assert isinstance(net.net_.optimizer_, torch.optim.Adagrad)


@pytest.mark.parametrize('make, error', [
    (lambda: mlp(objective_loss_function=None), "nolearn's NeuralNet\\(objective_loss_function"),
    (lambda: mlp(hiden_num_units=5), 'Unused kwarg: hiden_num_units'),
    (lambda: mlp(hidden_W=None).initialize(), 'hidden_W: DenseLayer takes hidden_num_units'),
    (lambda: mlp(regression=False).initialize(), 'regression=False'),
    (lambda: mlp(update=lambda *a: None).initialize(), 'update=.*kfkd knows sgd'),
    (lambda: layers.DenseLayer(None, num_units=3), 'creating lasagne.layers.DenseLayer'),
    (lambda: nesterov_momentum(None, [], 0.01), 'calling lasagne.updates.nesterov_momentum'),
])
def test_what_the_tutorial_does_not_use_is_a_clear_error(make, error):
    with pytest.raises((NotImplementedError, ValueError, TypeError), match=error):
        make()
