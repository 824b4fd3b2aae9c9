"""The tutorial's own code on kfkd: nolearn.lasagne's NeuralNet, Lasagne's layers
and updates, and Theano's shared variables, on kfkd's engine.

    import kfkd
    kfkd.install_as_nolearn()
    import theano
    from lasagne import layers
    from lasagne.updates import nesterov_momentum
    from nolearn.lasagne import NeuralNet, BatchIterator

Theano, Lasagne and nolearn no longer install or run on today's Python, so the
tutorial's code runs nowhere else. install() (kfkd.install_as_nolearn) puts
modules under those three names into sys.modules, in this process only, as
PyMySQL's install_as_MySQLdb() does for MySQLdb: nothing is installed and
nothing happens without the call. They hold what the tutorial uses, with
nolearn's behaviour; the nets they build are made of kfkd_engine's layers and
train on its KeypointNet, with kfkd's device, precision and speed. What the
tutorial does not use raises an error that names the missing piece.

It stands apart from kfkd.py, whose nets use today's idiom (skorch), and
imports kfkd_engine and kfkd_io only.
"""
import inspect
import math
import sys
import types
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator
from sklearn.metrics import r2_score
from skorch.callbacks import Callback
from skorch.dataset import ValidSplit
from torch import nn

import kfkd_engine
from kfkd_engine import KeypointNet


class Unsupported(NotImplementedError):
    """A piece of Theano, Lasagne or nolearn beyond what the tutorial uses."""

    def __init__(self, what):
        super().__init__(f"{what} is beyond what the tutorial uses, and kfkd's "
                         f"install_as_nolearn() does not provide it")


# --- theano ---

class SharedVariable:
    """theano.shared's variable: a value get_value() reads and set_value()
    changes. A NeuralNet's update_learning_rate or update_momentum given as one
    follows its changes while the net trains (read at each epoch's start)."""

    def __init__(self, value, name=None):
        self.value, self.name = value, name

    def get_value(self, borrow=False):
        return self.value

    def set_value(self, value, borrow=False):
        self.value = value

    def __repr__(self):
        return f'SharedVariable({self.value!r})'


def shared(value, name=None, strict=False, allow_downcast=None, borrow=False):
    return SharedVariable(value, name)


def _value(setting):
    return float(setting.get_value() if isinstance(setting, SharedVariable) else setting)


# --- lasagne.nonlinearities ---

def rectify(x):
    return F.relu(x)


def linear(x):
    return x


identity = linear
sigmoid = torch.sigmoid
tanh = torch.tanh


# --- lasagne.updates: each names an optimizer for NeuralNet(update=...) ---

class Update:
    """A Lasagne update rule, as the torch optimizer that does the same. In
    Lasagne it builds Theano expressions; here it only names the optimizer."""

    # Lasagne's names of an update's settings, and torch's
    SETTINGS = {'learning_rate': 'lr', 'momentum': 'momentum', 'rho': 'alpha',
                'epsilon': 'eps'}

    def __init__(self, name, optimizer, defaults, **fixed):
        self.__name__ = self.name = name
        self.optimizer, self.defaults, self.fixed = optimizer, defaults, fixed

    def __call__(self, *args, **kwargs):
        raise Unsupported(f'calling lasagne.updates.{self.name}() (give it to NeuralNet as '
                          f'update=, with update_learning_rate= and the like)')

    def __reduce__(self):  # pickled and copied by name, as a function is
        return self.name

    def torch_settings(self, settings):
        """The optimizer's keyword arguments for `settings` (update_* without
        the prefix, numbers or shared variables)."""
        unknown = set(settings) - set(self.defaults)
        if unknown:
            raise TypeError(f'{self.name} takes no update_{sorted(unknown)[0]} (it takes '
                            f'{", ".join("update_" + name for name in self.defaults)})')
        merged = {**self.defaults, **settings}
        if merged.get('learning_rate') is None:
            raise TypeError(f'{self.name} needs update_learning_rate')
        return {self.SETTINGS[name]: _value(value) for name, value in merged.items()}


sgd = Update('sgd', torch.optim.SGD, {'learning_rate': None})
momentum = Update('momentum', torch.optim.SGD, {'learning_rate': None, 'momentum': 0.9})
nesterov_momentum = Update('nesterov_momentum', torch.optim.SGD,
                           {'learning_rate': None, 'momentum': 0.9}, nesterov=True)
adagrad = Update('adagrad', torch.optim.Adagrad, {'learning_rate': 1.0, 'epsilon': 1e-6})
rmsprop = Update('rmsprop', torch.optim.RMSprop,
                 {'learning_rate': 1.0, 'rho': 0.9, 'epsilon': 1e-6})


# --- lasagne.layers: what NeuralNet builds kfkd_engine's layers from ---

class Layer:
    """A Lasagne layer class as NeuralNet's `layers` list names it: NeuralNet
    passes it the `<name>_<param>` settings and the shape that comes in, and
    gets kfkd_engine's module and the shape that goes out."""

    def __init__(self, *args, **kwargs):
        raise Unsupported(f'creating lasagne.layers.{type(self).__name__} yourself (name its '
                          f'class in NeuralNet(layers=[(name, class), ...]) instead)')

    @classmethod
    def settings(cls, name, params):
        """`params` checked against the layer's own settings (its build's)."""
        accepted = list(inspect.signature(cls.build).parameters)[1:]
        for key in params:
            if key not in accepted:
                raise TypeError(f'{name}_{key}: {cls.__name__} takes '
                                f'{", ".join(name + "_" + a for a in accepted)}')
        return params


class InputLayer(Layer):
    @staticmethod
    def build(incoming, shape):
        return None, tuple(shape)


class DenseLayer(Layer):
    @staticmethod
    def build(incoming, num_units, nonlinearity=rectify):
        return (kfkd_engine.DenseLayer(math.prod(incoming[1:]), num_units, nonlinearity),
                (None, num_units))


class Conv2DLayer(Layer):
    @staticmethod
    def build(incoming, num_filters, filter_size, stride=(1, 1), pad=0, nonlinearity=rectify):
        size, stride = _pair(filter_size), _pair(stride)
        pad = {'valid': 0, 'full': size[0] - 1, 'same': size[0] // 2}.get(pad, pad)
        pad = _pair(pad)
        side = [(n + 2 * p - k) // s + 1 for n, p, k, s in zip(incoming[2:], pad, size, stride)]
        return (kfkd_engine.Conv2DLayer(incoming[1], num_filters, size, nonlinearity, stride, pad),
                (None, num_filters, *side))


class MaxPool2DLayer(Layer):
    @staticmethod
    def build(incoming, pool_size, stride=None, ignore_border=True):
        size = _pair(pool_size)
        stride = _pair(stride) if stride is not None else size
        rounded = math.floor if ignore_border else math.ceil
        side = [rounded((n - k) / s) + 1 for n, k, s in zip(incoming[2:], size, stride)]
        return (nn.MaxPool2d(size, stride, ceil_mode=not ignore_border),
                (None, incoming[1], *side))


class DropoutLayer(Layer):
    @staticmethod
    def build(incoming, p=0.5):
        return kfkd_engine.DropoutLayer(p), incoming


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class LayerStack(nn.Sequential):
    """The module a NeuralNet's `layers` make: kfkd_engine's layers under the
    names given there (conv1, pool1, ..., output), which is also what
    load_params_from and kfkd's pre-training match weights by."""

    def __init__(self, layers, input_shape):
        super().__init__(layers)
        self.input_shape = tuple(input_shape)


def _fast_relu(modules):
    """A rectified conv layer followed by a max-pool, as kfkd.ConvNet has it:
    the ReLU moves behind the pool (the same net, faster on a CPU)."""
    names = list(modules)
    for name, after in zip(names, names[1:]):
        conv, pool = modules[name], modules[after]
        if (isinstance(conv, kfkd_engine.Conv2DLayer) and conv.nonlinearity is rectify and
                type(pool) is nn.MaxPool2d):
            conv.nonlinearity = None
            modules[after] = kfkd_engine.MaxPool2DLayer(pool.kernel_size, pool.stride,
                                                        pool.ceil_mode)
    return modules


# --- nolearn.lasagne ---

class BatchIterator:
    """nolearn's BatchIterator: `batch_size` rows at a time, in order (or in a
    new random order each epoch with shuffle=True). A subclass changes batches
    in transform(Xb, yb), on numpy arrays; kfkd gives it copies, so that its
    changes stay in the batch."""

    def __init__(self, batch_size, shuffle=False):
        self.batch_size = batch_size
        self.shuffle = shuffle

    def __call__(self, X, y=None):
        self.X, self.y = X, y
        return self

    def __iter__(self):
        order = (np.random.permutation(len(self.X)) if self.shuffle else
                 np.arange(len(self.X)))
        for start in range(0, len(self.X), self.batch_size):
            rows = order[start:start + self.batch_size]
            yield self.transform(self.X[rows], None if self.y is None else self.y[rows])

    def transform(self, Xb, yb):
        return Xb, yb

    def __getstate__(self):  # the data it last iterated stays out of a pickle
        return {k: v for k, v in vars(self).items() if k not in ('X', 'y')}


class HostBatches(kfkd_engine.BatchIterator):
    """skorch's iterator over a nolearn BatchIterator whose transform() works
    on numpy: batches are cut and transformed on the host, then moved to the
    device. (One that does not override transform() takes kfkd's path
    instead: batches sliced on the device.)"""

    def __init__(self, dataset, batch_iterator, batch_size=None, shuffle=None):
        super().__init__(dataset, batch_iterator.batch_size)
        self.batch_iterator = batch_iterator

    def __iter__(self):
        X, y = [t.cpu().numpy() for t in self.tensors] + [None] * (2 - len(self.tensors))
        device = self.tensors[0].device
        for Xb, yb in self.batch_iterator(X, y):
            yield (torch.as_tensor(np.ascontiguousarray(Xb, np.float32), device=device),
                   None if yb is None else
                   torch.as_tensor(np.ascontiguousarray(yb, np.float32), device=device))


def _iterator(batch_iterator, prefix):
    """skorch's iterator_train or iterator_valid settings for a nolearn BatchIterator."""
    if type(batch_iterator).transform is BatchIterator.transform:
        return {prefix: kfkd_engine.BatchIterator, f'{prefix}__batch_size':
                batch_iterator.batch_size, f'{prefix}__shuffle': batch_iterator.shuffle}
    return {prefix: HostBatches, f'{prefix}__batch_iterator': batch_iterator}


class FollowShared(Callback):
    """Sets the optimizer's settings from the update_* values, shared
    variables included, at each epoch's start."""

    def __init__(self, nolearn_net):
        self.nolearn_net = nolearn_net

    def on_epoch_begin(self, net, **kwargs):
        settings = self.nolearn_net.update.torch_settings(self.nolearn_net._update_settings())
        for group in net.optimizer_.param_groups:
            group.update(settings)


class Handlers(Callback):
    """nolearn's on_epoch_finished and on_training_finished: each handler is
    called with the NeuralNet and its train_history_; StopIteration from one
    ends training."""

    def __init__(self, nolearn_net):
        self.nolearn_net = nolearn_net

    def on_epoch_end(self, net, **kwargs):
        history = self.nolearn_net.train_history_
        try:
            for handler in _handlers(self.nolearn_net.on_epoch_finished):
                handler(self.nolearn_net, history)
        except StopIteration:
            raise KeyboardInterrupt  # skorch's way to end fit() early

    def on_train_end(self, net, **kwargs):
        for handler in _handlers(self.nolearn_net.on_training_finished):
            handler(self.nolearn_net, self.nolearn_net.train_history_)


def _handlers(handlers):
    return handlers if isinstance(handlers, (list, tuple)) else [handlers]


class NeuralNet(BaseEstimator):
    """nolearn.lasagne's NeuralNet for regression, on kfkd's engine.

    `layers` names each layer and its Lasagne class; `<layer>_<param>`
    keyword arguments set each layer's settings and `update_<param>` the
    update's (numbers or theano.shared variables). fit() builds the net on
    first use (or initialize() does), then trains max_epochs epochs,
    validating on the first `eval_size` of the rows; attributes changed
    before that take effect. Training runs on kfkd_engine's KeypointNet
    (net_): the same device, precision and data path as kfkd's own nets.
    """

    # nolearn's settings beyond the tutorial's use, with what to do instead
    UNSUPPORTED = ('objective', 'objective_loss_function', 'loss', 'X_tensor_type',
                   'y_tensor_type', 'use_label_encoder', 'more_params', 'custom_score',
                   'scores_train', 'scores_valid', 'train_split', 'check_input',
                   'on_batch_finished', 'on_training_started', 'batch_iterator')

    def __init__(self, layers, update=nesterov_momentum,
                 batch_iterator_train=BatchIterator(batch_size=128),
                 batch_iterator_test=BatchIterator(batch_size=128), regression=False,
                 max_epochs=100, eval_size=0.2, on_epoch_finished=(),
                 on_training_finished=(), verbose=0, **kwargs):
        self.layers = layers
        self.update = update
        self.batch_iterator_train = batch_iterator_train
        self.batch_iterator_test = batch_iterator_test
        self.regression = regression
        self.max_epochs = max_epochs
        self.eval_size = eval_size
        self.on_epoch_finished = on_epoch_finished
        self.on_training_finished = on_training_finished
        self.verbose = verbose
        for key in kwargs:
            if key in self.UNSUPPORTED:
                raise Unsupported(f"nolearn's NeuralNet({key}=...)")
        names = [name for name, _ in self._layer_list()] + ['update']
        for key in kwargs:
            if not any(key.startswith(f'{name}_') for name in names):
                raise ValueError(f'Unused kwarg: {key}')
        vars(self).update(kwargs)
        self._kwarg_keys = list(kwargs)

    @property
    def train_history_(self):
        """A dict per epoch trained so far, with nolearn's keys (epoch,
        train_loss, valid_loss, dur, train_loss_best, valid_loss_best)."""
        net = getattr(self, 'net_', None)
        return [] if net is None else net.train_history_

    def _get_param_names(self):
        # nolearn's trick, for clone() and GridSearchCV: the keyword arguments too
        own = [p for p in inspect.signature(NeuralNet.__init__).parameters
               if p not in ('self', 'kwargs')]
        return own + self._kwarg_keys

    def _layer_list(self):
        if not isinstance(self.layers, (list, tuple)) or not all(
                isinstance(entry, (list, tuple)) and len(entry) == 2 and
                isinstance(entry[1], type) for entry in self.layers):
            raise Unsupported('NeuralNet(layers=...) other than a list of (name, layer class)')
        return self.layers

    def _get_params_for(self, name):
        prefix = f'{name}_'
        return {key[len(prefix):]: value for key, value in vars(self).items()
                if key.startswith(prefix)}

    def _update_settings(self):
        return self._get_params_for('update')

    def initialize_layers(self):
        """The module the `layers` list makes (a LayerStack)."""
        modules, shape, input_shape = OrderedDict(), None, None
        for name, kind in self._layer_list():
            if not issubclass(kind, Layer):
                raise Unsupported(f'layer {name}: {kind.__name__} (kfkd builds InputLayer, '
                                  f'DenseLayer, Conv2DLayer, MaxPool2DLayer and DropoutLayer)')
            if (kind is InputLayer) != (shape is None):
                raise ValueError(f'layer {name}: the first layer, and only it, is an InputLayer')
            module, shape = kind.build(shape, **kind.settings(name, self._get_params_for(name)))
            if module is None:
                input_shape = shape[1:]
            else:
                modules[name] = module
        if 'output' not in modules:
            raise ValueError("NeuralNet needs a layer named 'output'")
        return LayerStack(_fast_relu(modules), input_shape)

    def initialize(self):
        """Build the net (once): its module, optimizer and KeypointNet."""
        if getattr(self, 'net_', None) is not None:
            return self
        if not self.regression:
            raise Unsupported('NeuralNet(regression=False), classification,')
        if not isinstance(self.update, Update):
            raise Unsupported(f'update={getattr(self.update, "__name__", self.update)!r} (kfkd '
                              f'knows sgd, momentum, nesterov_momentum, adagrad and rmsprop)')
        settings = self.update.torch_settings(self._update_settings())
        self.net_ = KeypointNet(
            module=self.initialize_layers(),
            optimizer=self.update.optimizer,
            **{f'optimizer__{key}': value for key, value in
               {**settings, **self.update.fixed}.items() if key != 'lr'},
            lr=settings['lr'],
            max_epochs=self.max_epochs,
            **_iterator(self.batch_iterator_train, 'iterator_train'),
            **_iterator(self.batch_iterator_test, 'iterator_valid'),
            callbacks=[('follow_shared', FollowShared(self)), ('handlers', Handlers(self))],
            verbose=self.verbose,
        ).initialize()
        return self

    def fit(self, X, y):
        """Train max_epochs epochs (building the net first if need be)."""
        self.initialize()
        split = ValidSplit(round(1 / self.eval_size)) if self.eval_size else None
        self.net_.set_params(max_epochs=self.max_epochs, train_split=split,
                             verbose=self.verbose)
        self.net_.partial_fit(X, y, epochs=self.max_epochs)
        return self

    def predict(self, X):
        if getattr(self, 'net_', None) is None:
            raise AttributeError('this NeuralNet is not trained yet: call fit() first')
        return self.net_.predict(X)

    def score(self, X, y):
        """R² of the predictions (higher is better, as GridSearchCV wants)."""
        return float(r2_score(y, self.predict(X)))

    def get_all_params_values(self):
        """Each layer's weights as numpy arrays (weight, then bias), by layer name."""
        self.initialize()
        return OrderedDict(
            (name, [p.detach().cpu().numpy().copy() for p in layer.parameters()])
            for name, layer in self.net_.module_.named_children()
            if any(True for _ in layer.parameters()))

    def load_params_from(self, source):
        """Copy in the weights of every layer of `source` (a NeuralNet, one of
        kfkd's nets, or get_all_params_values()' dict) whose name and shapes
        match this net's: what pre-training needs. The rest stay."""
        self.initialize()
        if isinstance(source, NeuralNet):
            source = source.get_all_params_values()
        elif isinstance(source, KeypointNet):
            source = OrderedDict((name, [p.detach().cpu().numpy() for p in layer.parameters()])
                                 for name, layer in source.module_.named_children())
        for name, layer in self.net_.module_.named_children():
            params = list(layer.parameters())
            values = source.get(name)
            if not params or values is None or [p.shape for p in params] != [
                    tuple(np.shape(v)) for v in values]:
                continue
            with torch.no_grad():
                for param, value in zip(params, values):
                    param.copy_(torch.as_tensor(np.asarray(value), dtype=param.dtype))
            if self.verbose:
                print(f"Loaded parameters to layer '{name}' (shape "
                      f"{'x'.join(map(str, params[0].shape))}).")


# --- install_as_nolearn ---

def _module(name, attributes, package=False):
    module = types.ModuleType(name, f"kfkd's {name}, for the tutorial's code (see "
                                    f"kfkd.install_as_nolearn)")
    module.__kfkd__ = True
    if package:
        module.__path__ = []  # a package with no submodules of its own on disk

    def missing(attribute):  # `from theano import function`: say what is missing
        if attribute.startswith('__'):
            raise AttributeError(attribute)
        raise AttributeError(f'{name}.{attribute} is beyond what the tutorial uses, and '
                             f"kfkd's install_as_nolearn() does not provide it")
    vars(module).update(attributes, __getattr__=missing)
    return module


def install():
    """Make `import theano`, `lasagne` and `nolearn.lasagne` give kfkd's
    versions, in this process only. Refuses where the real packages are
    already imported; a second call does nothing."""
    for name in ('theano', 'lasagne', 'nolearn'):
        module = sys.modules.get(name)
        if module is not None and not getattr(module, '__kfkd__', False):
            raise ImportError(f'{name} is already imported (from {getattr(module, "__file__", "?")}'
                              f'): install_as_nolearn() would shadow the real package; call it '
                              f'before anything imports {name}, in a fresh Python process')
    nonlinearities = _module('lasagne.nonlinearities', {
        'rectify': rectify, 'linear': linear, 'identity': identity, 'sigmoid': sigmoid,
        'tanh': tanh})
    layers = _module('lasagne.layers', {cls.__name__: cls for cls in (
        Layer, InputLayer, DenseLayer, Conv2DLayer, MaxPool2DLayer, DropoutLayer)}, package=True)
    updates = _module('lasagne.updates', {update.name: update for update in (
        sgd, momentum, nesterov_momentum, adagrad, rmsprop)})
    nolearn_lasagne = _module('nolearn.lasagne', {'NeuralNet': NeuralNet,
                                                  'BatchIterator': BatchIterator})
    modules = {
        'theano': _module('theano', {'shared': shared, 'config': types.SimpleNamespace(
            floatX='float32', device=kfkd_engine.DEVICE)}),
        'lasagne': _module('lasagne', {'layers': layers, 'updates': updates,
                                       'nonlinearities': nonlinearities}, package=True),
        'lasagne.layers': layers, 'lasagne.updates': updates,
        'lasagne.nonlinearities': nonlinearities,
        'nolearn': _module('nolearn', {'lasagne': nolearn_lasagne}, package=True),
        'nolearn.lasagne': nolearn_lasagne,
    }
    for name, module in modules.items():
        sys.modules.setdefault(name, module)
