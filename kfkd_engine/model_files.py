"""Model files and the nets they name: the registry of nets, writing a net
(or specialists) as safetensors and JSON, reading one back into a net,
checkpoints that a stopped run resumes from, and the keypoints that what a
file holds (a net, specialists, or several of them) predicts.

A file holds a net's name, settings, fitted state and weights, never code.
NETS names the module that defines each net a file can name (kfkd.py for the
tutorial's, kfkd_beyond.py for kfkd's own); reading a file imports that
module by name when it needs the net, as pickle imports a class's module.
That is the only way the engine reaches above itself.
"""
import contextlib
import importlib
import inspect
import signal
import time
from collections import OrderedDict

import numpy as np
import pandas as pd
import skorch
import torch
from sklearn.base import clone
from skorch.callbacks import Callback

import kfkd_io
from kfkd_engine.estimator import KeypointNet, copy_weights
from kfkd_engine.geometry import MIRROR_AXIS, to_pixels
from kfkd_engine.interrupts import stop_requests
from kfkd_io import KfkdError, __version__


# --- The weights a file keeps, and pre-training from them ---

def kept_weights(net):
    """The weights a net ends training with: the best epoch's where a callback
    keeps those (EarlyStopping's best_weights_), else the current ones."""
    for _, callback in net.callbacks_:
        if getattr(callback, 'best_weights_', None) is not None:
            return callback.best_weights_
    return net.module_.state_dict()


def copy_matching_weights(net, state):
    """Copy into `net` every weight of `state` whose name and shape match:
    supervised pre-training. Returns the names of the layers copied."""
    own = net.module_.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    net.module_.load_state_dict(matching, strict=False)
    return list(dict.fromkeys(k.rsplit('.', 1)[0] for k in own if k in matching))


# --- The registry ---

# The nets a model file can name, and the module that defines each.
NETS = {**{f'net{i}': 'kfkd' for i in range(1, 8)},
        **{f'net{i}': 'kfkd_beyond' for i in range(8, 11)}}


def registered_net(name):
    """The net that NETS names `name` (its module imported on first use)."""
    if name not in NETS:
        raise KfkdError(f'unknown net {name!r}; choose one of {", ".join(NETS)}')
    return getattr(importlib.import_module(NETS[name]), name)


def registered_name(net):
    """The name in NETS of the net that `net` is a variant of, so that a model
    file naming it rebuilds `net` from its settings: of those with the same
    module, criterion, iterators and callbacks (by class), the one whose
    settings differ from its own in the fewest places."""
    def kind(net):
        params = net.get_params(deep=False)
        callbacks = [type(c) for c in params['callbacks'] or [] if not isinstance(c, tuple)]
        return [params[key] for key in ('module', 'criterion', 'iterator_train',
                                        'iterator_valid')] + [callbacks]

    def differences(name):
        theirs, own = _settings(registered_net(name)), _settings(net)
        return sum(theirs.get(key) != own.get(key) for key in theirs.keys() | own.keys())
    same_kind = [name for name in NETS if kind(registered_net(name)) == kind(net)]
    if not same_kind:
        raise KfkdError(f'{type(net).__name__} of {net.module.__name__}: not a variant of any '
                        f'of kfkd\'s nets ({", ".join(NETS)}), so no model file can name it')
    return min(same_kind, key=differences)


def _settings(net):
    """The net's JSON-able parameters: what, with its name, rebuilds it (not
    where and how it ran: device, verbose, capture)."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str))
    return {key: value for key, value in net.get_params(deep=False).items()
            if key not in ('device', 'verbose', 'capture') and plain(value)}


def build_net(name, settings=None, device=None):
    """A fresh net by name, with `settings` (from _settings) applied."""
    net = clone(registered_net(name))
    if settings:
        net.set_params(**settings)
    if device:
        net.set_params(device=device)
    return net


def model_entry(net, weights, name=None):
    """What a model file holds of a net: (JSON-able entry, weights). Its
    name is `name`, else the one it was read as (name_), else the registered
    net it is a variant of."""
    name = name or getattr(net, 'name_', None) or registered_name(net)
    return {'name': name, 'columns': list(net.target_columns()), 'settings': _settings(net),
            'mirror_axis_': net.mirror_axis_,
            'history': net.history.to_list() if net.history else []}, weights


def save_net(net, path, name, resume=False):
    """Write `net` to `path`: its weights (the best epoch's under
    EarlyStopping), name, settings, target columns, mirror axis, training
    history and the groups it validated on (see GroupSplit), if any.

    With `resume`, also what continuing the run needs: the current weights,
    the optimizer's state and the random number generators' states.
    """
    meta, weights = model_entry(net, kept_weights(net), name)
    tensors = {f'weights/{k}': v for k, v in weights.items()}
    meta = {'kind': 'net', 'kfkd': __version__, 'groups': getattr(net, 'groups_', None),
            'models': [meta]}
    if resume:
        optimizer = net.optimizer_.state_dict()
        meta['resume'] = {'param_groups': optimizer['param_groups'],
                          'state_keys': {str(i): sorted(k for k, v in s.items() if v is not None)
                                         for i, s in optimizer['state'].items()}}
        tensors.update({f'resume/weights/{k}': v for k, v in net.module_.state_dict().items()})
        tensors.update({f'resume/optimizer/{i}/{key}': torch.as_tensor(value)
                        for i, s in optimizer['state'].items() for key, value in s.items()
                        if value is not None})
        tensors['resume/rng/cpu'] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors['resume/rng/cuda'] = torch.cuda.get_rng_state()
    kfkd_io.write_model_file(path, meta, tensors)


def restore_net(entry, weights, path, device):
    """The net that model_entry described, rebuilt by name (`path` for errors)."""
    name = entry['name']
    net = build_net(name, device=device)
    # files from before the mirror axis was a setting were trained with the tutorial's;
    # those from before test-time shifts predict as they did; the entry names the columns
    settings = {'mirror_axis': MIRROR_AXIS, 'test_shifts': 0, **entry['settings'],
                'columns': tuple(entry['columns'])}
    unknown = unknown_settings(net, settings)
    if unknown:
        raise KfkdError(f'{path}: {unknown[0]} is not a setting of net {name} in this kfkd; '
                        f'train it again with this kfkd, or use the kfkd that wrote it')
    try:
        net.set_params(**settings).initialize()
    except (TypeError, ValueError, RuntimeError) as e:
        raise KfkdError(f'{path}: its settings do not fit net {name} as this kfkd defines it; '
                        f'train it again with this kfkd') from e
    if hasattr(net.module_, 'upgraded_weights'):  # the module may have been laid out otherwise
        weights = net.module_.upgraded_weights(weights)
    mismatch = _weights_mismatch(net.module_.state_dict(), weights)
    if mismatch:
        raise KfkdError(f'{path}: its weights do not fit net {name}: {mismatch}; '
                        f'use an intact copy or train again')
    net.module_.load_state_dict(weights)
    # what fit had found, restored as unpickling would: the measured axis (files from
    # before it was a fitted attribute kept it as the setting), the net's name
    if entry.get('mirror_axis_') is not None:
        net.mirror_axis_ = float(entry['mirror_axis_'])
    net.history = skorch.history.History(entry['history'])
    net.name_ = name
    return net


def current_setting(net, key):
    """The value `net` trains with for the parameter `key`, named as
    set_params names it ('lr', 'module__width', 'iterator_train__rotate',
    'callbacks__NAME__ATTR'): set on the net, else the default of whatever
    takes it. KeyError where the net has no such parameter."""
    params = net.get_params()
    if key in params:
        return params[key]
    prefix, _, rest = key.partition('__')
    if prefix == 'callbacks':
        name, _, attr = rest.partition('__')
        return dict(clone(net).initialize_callbacks().callbacks_)[name].get_params()[attr]
    if rest and prefix in ('module', 'criterion', 'optimizer', 'iterator_train',
                           'iterator_valid'):
        parameter = inspect.signature(params[prefix]).parameters[rest]
        return None if parameter.default is parameter.empty else parameter.default
    raise KeyError(key)


def unknown_settings(net, settings):
    """The keys of `settings` that `net` has no parameter for."""
    unknown = []
    for key in settings:
        try:
            current_setting(net, key)
        except KeyError:
            unknown.append(key)
    return unknown


def _weights_mismatch(expected, weights):
    """What keeps `weights` from loading where `expected` (a state dict) is, in words."""
    def shape(tensor):
        return 'x'.join(map(str, tensor.shape)) or 'a scalar'
    for key, tensor in expected.items():
        if key not in weights:
            return f'it lacks {key}'
        if weights[key].shape != tensor.shape:
            return f'{key} is {shape(weights[key])}, where the net has {shape(tensor)}'
    extra = sorted(set(weights) - set(expected))
    return f'it has {extra[0]}, which the net does not' if extra else None


def read_model(path, device=None):
    """A net, or the specialists (OrderedDict of column tuple -> net), from `path`.

    Each net has `name_` and `columns_` set to what it was trained as; a
    single net also `groups_`, the groups it validated on (or None), and
    `resume_`, what resume_state needs (or None: the run finished).
    """
    meta, tensors = kfkd_io.read_model_file(path)
    nets = []
    try:
        for i, entry in enumerate(meta['models']):
            prefix = 'weights/' if meta['kind'] == 'net' else f'{i}/weights/'
            weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            nets.append(restore_net(entry, weights, path, device))
    except (KeyError, TypeError, AttributeError):
        raise KfkdError(f'{path}: a kfkd model file with missing or malformed fields') from None
    if meta['kind'] == 'net':
        net = nets[0]
        net.resume_ = (meta['resume'], tensors) if meta.get('resume') else None
        # files from before 'groups' was kept for every net had it in their resume part
        net.groups_ = meta.get('groups', (meta.get('resume') or {}).get('groups'))
        return net
    return OrderedDict((net.columns_, net) for net in nets)


def load_net(path, device=None):
    model = read_model(path, device)
    if not isinstance(model, KeypointNet):
        raise KfkdError(f'{path}: holds specialists, not a single net')
    return model


def resume_state(net, path):
    """Put `net` (from load_net) back where its interrupted run stopped."""
    if not net.resume_:
        raise KfkdError(f'{path}: nothing to resume: the run finished '
                        f'({len(net.history)} epochs)')
    resume, tensors = net.resume_
    best = copy_weights(net.module_)
    net.module_.load_state_dict({k[len('resume/weights/'):]: v for k, v in tensors.items()
                                 if k.startswith('resume/weights/')})
    state = {int(i): {key: tensors[f'resume/optimizer/{i}/{key}'].to(net.device)
                      for key in keys} for i, keys in resume['state_keys'].items()}
    net.optimizer_.load_state_dict({'state': state, 'param_groups': resume['param_groups']})
    torch.set_rng_state(tensors['resume/rng/cpu'])
    if 'resume/rng/cuda' in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors['resume/rng/cuda'])
    for _, callback in net.callbacks_:
        if hasattr(callback, 'best_weights_'):  # EarlyStopping's: the best so far
            callback.best_weights_ = best
    return net


def save_specialists(specialists, path):
    """Write specialists (columns -> net) to one file, as save_net does a net."""
    meta = {'kind': 'specialists', 'kfkd': __version__, 'models': []}
    tensors = {}
    for i, net in enumerate(specialists.values()):
        entry, weights = model_entry(net, kept_weights(net))
        meta['models'].append(entry)
        tensors.update({f'{i}/weights/{k}': v for k, v in weights.items()})
    kfkd_io.write_model_file(path, meta, tensors)


class Checkpoint(Callback):
    """Saves the run as it goes, so that nothing is lost.

    After the first epoch, then every `every` seconds, and when Ctrl-C
    (SIGINT) or SIGTERM asks training to stop, it writes `path` (atomically)
    with the weights the net would keep and what resume_state needs to go
    on. The first signal stops training after the current epoch; a second
    one stops at once, leaving the last checkpoint. `interrupted_` tells
    whether a signal ended the run.
    """

    def __init__(self, path, name, every=60):
        self.path = path
        self.name = name
        self.every = every

    def initialize(self):
        self.signals_ = contextlib.ExitStack()
        return self

    def on_train_begin(self, net, **kwargs):
        net.target_columns()  # a net whose outputs have no names fails now, not at a save
        self.last_save_ = -np.inf
        self.stop_requests_ = self.signals_.enter_context(stop_requests(
            f'\nStopping after this epoch and saving {self.path} '
            f'(press Ctrl-C again to stop at once).', (signal.SIGINT, signal.SIGTERM)))

    @property
    def interrupted_(self):
        """Whether a signal ended the run."""
        return bool(self.stop_requests_)

    def on_epoch_end(self, net, **kwargs):
        if self.stop_requests_ or time.monotonic() - self.last_save_ > self.every:
            save_net(net, self.path, self.name, resume=True)
            self.last_save_ = time.monotonic()
        if self.stop_requests_:
            raise KeyboardInterrupt

    def on_train_end(self, net, **kwargs):
        self.signals_.close()


def predict_keypoints(model, X):
    """Keypoints in pixels (DataFrame, one column per target) predicted by a
    net or by specialists, for X scaled as load2d() scales it; a model of
    another kind (kfkd_onnx.OnnxModel) predicts them itself. A list of models
    predicts the mean of their predictions: nets trained apart make different
    mistakes, and their mean is closer than any of them."""
    if isinstance(model, list):
        predictions = [predict_keypoints(one, X) for one in model]
        columns = predictions[0].columns
        if any(set(p.columns) != set(columns) for p in predictions):
            raise KfkdError('the models predict different keypoints, so their predictions '
                            'cannot be averaged')
        return sum(p[columns] for p in predictions) / len(predictions)
    if hasattr(model, 'predict_keypoints'):
        return model.predict_keypoints(X)
    nets = model.values() if isinstance(model, dict) else [model]
    parts = []
    for net in nets:
        shaped = X.reshape((-1,) + tuple(net.module_.input_shape))
        parts.append(pd.DataFrame(to_pixels(net.predict(shaped)),
                                  columns=net.target_columns()))
    return pd.concat(parts, axis=1)
