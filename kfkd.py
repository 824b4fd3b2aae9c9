"""kfkd: facial keypoint detection with convolutional neural nets.

A modern reproduction of Daniel Nouri's 2014 tutorial "Using convolutional
neural nets to detect facial keypoints" (Kaggle Facial Keypoints Detection),
on PyTorch and skorch. This file holds the tutorial's code, in its order, and
nothing else; read it top to bottom beside the tutorial:

  load, load2d                  the data, scaled as the tutorial does
  MLP, net1                     a net with one hidden layer
  ConvNet, net2                 a convolutional net
  FlipBatchIterator, net3       data augmentation by flipping faces
  AdjustVariable, net4, net5    learning rate and momentum schedules
  net6, net7                    dropout, and wider dense layers
  EarlyStopping                 stop when validation stops improving
  SPECIALIST_SETTINGS,
  fit_specialists               six specialist nets, pre-trained from net7
  submit                        a Kaggle submission
  plot_learning_curves, ...     the pictures
  install_as_nolearn            the tutorial's own code, run as written

Its engine, as nolearn.lasagne was the tutorial's, is kfkd_engine (the
layers, KeypointNet, mirroring, model files, training in parallel jobs); file
formats are kfkd_io; kfkd's own nets (net8, net9, net10) are kfkd_beyond; the
`kfkd` command is kfkd_cli.

In a notebook:  from kfkd import load, net1;  X, y = load();  net1.fit(X, y)
At the shell:   kfkd demo;  kfkd fit --net net7;  kfkd submit net7.safetensors
"""
if __name__ == '__main__':  # `python kfkd.py CMD` is `kfkd CMD`, which imports this file once
    import runpy
    runpy.run_module('kfkd_cli', run_name='__main__')

import datetime
import functools
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.base import clone
from sklearn.utils import shuffle
from skorch.callbacks import Callback
from torch import nn

import kfkd_io
from kfkd_engine import (
    MIRROR_AXIS, BatchIterator, Conv2DLayer, DenseLayer, DropoutLayer, GroupSplit, KeypointNet,
    MaxPool2DLayer, best_epoch, copy_matching_weights, copy_weights, fit_in_jobs, keypoint_sides,
    load_net, mirror, mirror_pairs, predict_keypoints, read_model, registered_name,
    resolve_device, rmse_pixels, save_specialists, scale_pixels, to_net_scale, to_pixels,
    unknown_settings)
from kfkd_io import COLUMNS, IMAGE_SIZE, KfkdError, data_path, read, read_groups, read_table, shown


# --- Loading the data ---

def load(test=False, cols=None, data_dir=None, dropna=True, groups=None):
    """Loads training.csv, or test.csv if `test` is True, as the tutorial did.

    Returns X, pixels scaled to [0, 1] (float32, n x 9216), and y, the
    keypoints scaled to [-1, 1] (float32), shuffled with random_state 42; y is
    None for test data. Pass `cols` to keep only those target columns. Rows
    with a missing target are dropped, unless dropna=False: then missing
    targets are NaN in y, for a net whose loss skips them.

    With `groups` (a column of training.csv, or a CSV file of row,group as
    Kaggle-style data may come with), also returns each row's group, shuffled
    alike: to validate on whole held-out groups, such as people.
    """
    labels, pixels = read(test, data_dir)
    df = labels[['ImageId'] if test else list(cols or COLUMNS)]
    print(pd.concat([df.count(), pd.Series({'Image': len(pixels)})]))  # values per column
    keep = df.notna().all(axis=1) if dropna else df.notna().any(axis=1)
    keep = keep.to_numpy()
    X = scale_pixels(pixels[keep])
    if test:
        return X, None
    y = to_net_scale(df.to_numpy()[keep]).astype(np.float32)
    if groups is None:
        return tuple(shuffle(X, y, random_state=42))
    return tuple(shuffle(X, y, read_groups(groups, labels, data_dir)[keep], random_state=42))


def load2d(test=False, cols=None, data_dir=None, dropna=True, groups=None):
    """load(), with X shaped as images: (n, 1, 96, 96)."""
    X, *rest = load(test=test, cols=cols, data_dir=data_dir, dropna=dropna, groups=groups)
    return (X.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE), *rest)


# --- net1: one hidden layer ---

class MLP(nn.Sequential):
    """net1's module: 9216 inputs, one hidden layer, 30 linear outputs."""

    def __init__(self, input_units=IMAGE_SIZE ** 2, hidden_units=100, output_units=30):
        super().__init__(OrderedDict(
            hidden=DenseLayer(input_units, hidden_units),
            output=DenseLayer(hidden_units, output_units, nonlinearity=None),
        ))
        self.input_shape = (input_units,)


net1 = KeypointNet(
    module=MLP,
    module__hidden_units=100,
    module__output_units=30,
    optimizer=torch.optim.SGD,
    optimizer__nesterov=True,
    optimizer__momentum=0.9,
    lr=0.01,
    max_epochs=400,
)


# --- net2: convolutions ---

class ConvNet(nn.Sequential):
    """net2-net7's module: conv + 2x2 max-pool blocks, then dense layers.

    Layers are named as in the tutorial (conv1, pool1, dropout1, ...,
    hidden4, dropout4, hidden5, output), which is also what pre-training
    matches weights by. dropout1-3 follow the pools, dropout4 the first
    dense layer; a dropout of 0 leaves its layer out.
    """

    def __init__(self, conv_filters=(32, 64, 128), filter_sizes=(3, 2, 2),
                 hidden_units=(500, 500), dropout1_p=0.0, dropout2_p=0.0, dropout3_p=0.0,
                 dropout4_p=0.0, output_units=30):
        layers = OrderedDict()
        channels, side = 1, IMAGE_SIZE
        dropouts = (dropout1_p, dropout2_p, dropout3_p)
        for i, (filters, size) in enumerate(zip(conv_filters, filter_sizes), 1):
            layers[f'conv{i}'] = Conv2DLayer(channels, filters, size, nonlinearity=None)
            layers[f'pool{i}'] = MaxPool2DLayer()
            if i <= len(dropouts) and dropouts[i - 1]:
                layers[f'dropout{i}'] = DropoutLayer(dropouts[i - 1])
            channels, side = filters, (side - size + 1) // 2
        features = channels * side * side
        for j, units in enumerate(hidden_units, len(conv_filters) + 1):
            layers[f'hidden{j}'] = DenseLayer(features, units)
            if j == len(conv_filters) + 1 and dropout4_p:
                layers['dropout4'] = DropoutLayer(dropout4_p)
            features = units
        layers['output'] = DenseLayer(features, output_units, nonlinearity=None)
        super().__init__(layers)
        self.input_shape = (1, IMAGE_SIZE, IMAGE_SIZE)


net2 = KeypointNet(
    module=ConvNet,
    module__conv_filters=(32, 64, 128),
    module__filter_sizes=(3, 2, 2),
    module__hidden_units=(500, 500),
    module__output_units=30,
    optimizer=torch.optim.SGD,
    optimizer__nesterov=True,
    optimizer__momentum=0.9,
    lr=0.01,
    max_epochs=1000,
)


# --- Data augmentation: mirrored faces ---

# The left/right pairs among the 30 columns: when a face is mirrored,
# left_eye_center_x becomes right_eye_center_x, and so on.
FLIP_INDICES = [
    (0, 2), (1, 3),
    (4, 8), (5, 9), (6, 10), (7, 11),
    (12, 16), (13, 17), (14, 18), (15, 19),
    (22, 24), (23, 25),
]


class FlipBatchIterator(BatchIterator):
    """Mirrors a random half of each training batch.

    Mirroring a face moves every keypoint to 96 - x, i.e. negates the scaled
    x targets, and turns left into right: the columns in `flip_indices` swap
    places (kfkd_engine's mirror; 96 is the tutorial's mirror_axis, a net's
    own where it has another). All on the device, for the whole batch at once.
    """
    flip_indices = FLIP_INDICES

    def __init__(self, dataset, batch_size=128, shuffle=False, flip_indices=None):
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle)
        if flip_indices is not None:  # a specialist's own pairs
            self.flip_indices = flip_indices

    def transform(self, Xb, yb):
        Xb, yb = super().transform(Xb, yb)
        bs = len(Xb)
        flip = torch.randperm(bs, device=Xb.device)[:bs // 2]
        Xb, yb = Xb.clone(), None if yb is None else yb.clone()
        Xb[flip], flipped = mirror(Xb[flip], None if yb is None else yb[flip],
                                   self.flip_indices, self.mirror_axis)
        if yb is not None:
            yb[flip] = flipped
        return Xb, yb


net3 = clone(net2).set_params(iterator_train=FlipBatchIterator, max_epochs=3000)


# --- Changing learning rate and momentum over time ---

class AdjustVariable(Callback):
    """Moves an optimizer setting linearly from `start` to `stop` over the
    net's max_epochs: `start` in the first epoch, `stop` in the last (or over
    its time budget, if that runs out first).

    `name` is the tutorial's 'update_learning_rate' or 'update_momentum', or
    today's 'lr' or 'momentum'. The value used each epoch goes into the history.
    """
    aliases = {'update_learning_rate': 'lr', 'update_momentum': 'momentum'}

    def __init__(self, name, start=0.03, stop=0.001):
        self.name = name
        self.start = start
        self.stop = stop

    def on_epoch_begin(self, net, **kwargs):
        key = self.aliases.get(self.name, self.name)
        value = self.start + (self.stop - self.start) * net.progress()
        for group in net.optimizer_.param_groups:
            group[key] = value
        net.history.record(key, value)


def _schedules():
    return [AdjustVariable('update_learning_rate', start=0.03, stop=0.0001),
            AdjustVariable('update_momentum', start=0.9, stop=0.999)]


net4 = clone(net2).set_params(lr=0.03, callbacks=_schedules(), max_epochs=1000)
net5 = clone(net4).set_params(iterator_train=FlipBatchIterator, max_epochs=2000)


# --- Dropout ---

net6 = clone(net5).set_params(
    module__dropout1_p=0.1,
    module__dropout2_p=0.2,
    module__dropout3_p=0.3,
    module__dropout4_p=0.5,
    max_epochs=3000,
)


# --- Early stopping ---

class EarlyStopping(Callback):
    """Stops when the best validation loss is more than `patience` epochs old.

    The net then holds the best epoch's weights, also when training ends at
    max_epochs or is interrupted. patience=None never stops early but still
    restores the best weights. What it has seen so far is in best_valid_,
    best_valid_epoch_ and best_weights_ (a trailing _, as sklearn and skorch
    mark state, so that a trained net clones).
    """

    def __init__(self, patience=100):
        self.patience = patience

    def initialize(self):
        self.best_valid_, self.best_valid_epoch_, self.best_weights_ = np.inf, 0, None
        return self

    def on_train_begin(self, net, **kwargs):
        if len(net.history):  # a resumed run: its best so far is in the history
            best = best_epoch(net.history)
            if best is not None:
                self.best_valid_ = net.history[best, 'valid_loss']
                self.best_valid_epoch_ = best + 1

    def on_epoch_end(self, net, **kwargs):
        current_valid = net.history[-1, 'valid_loss']
        current_epoch = net.history[-1, 'epoch']
        if current_valid < self.best_valid_:
            self.best_valid_ = current_valid
            self.best_valid_epoch_ = current_epoch
            self.best_weights_ = copy_weights(net.module_)
        elif self.patience is not None and self.best_valid_epoch_ + self.patience < current_epoch:
            print('Early stopping.')
            print(f'Best valid loss was {self.best_valid_:.6f} at epoch {self.best_valid_epoch_}.')
            raise KeyboardInterrupt  # skorch's way to end fit() early

    def on_train_end(self, net, **kwargs):
        if self.best_weights_ is not None:
            net.module_.load_state_dict(self.best_weights_)


net7 = clone(net6).set_params(
    module__hidden_units=(1000, 1000),
    callbacks=_schedules() + [EarlyStopping(patience=200)],
    max_epochs=3000,
)


# --- Specialists ---

# Six groups of targets, each with its own net. Each specialist trains on every
# row that has its columns, not only on the 30% of rows that have all 30.
SPECIALIST_SETTINGS = [
    dict(
        columns=(
            'left_eye_center_x', 'left_eye_center_y',
            'right_eye_center_x', 'right_eye_center_y',
        ),
        flip_indices=((0, 2), (1, 3)),
    ),
    dict(
        columns=(
            'nose_tip_x', 'nose_tip_y',
        ),
        flip_indices=(),
        kwargs=dict(module__dropout2_p=0.3, module__dropout3_p=0.4),  # as the tutorial did
    ),
    dict(
        columns=(
            'mouth_left_corner_x', 'mouth_left_corner_y',
            'mouth_right_corner_x', 'mouth_right_corner_y',
            'mouth_center_top_lip_x', 'mouth_center_top_lip_y',
        ),
        flip_indices=((0, 2), (1, 3)),
    ),
    dict(
        columns=(
            'mouth_center_bottom_lip_x',
            'mouth_center_bottom_lip_y',
        ),
        flip_indices=(),
    ),
    dict(
        columns=(
            'left_eye_inner_corner_x', 'left_eye_inner_corner_y',
            'right_eye_inner_corner_x', 'right_eye_inner_corner_y',
            'left_eye_outer_corner_x', 'left_eye_outer_corner_y',
            'right_eye_outer_corner_x', 'right_eye_outer_corner_y',
        ),
        flip_indices=((0, 2), (1, 3), (4, 6), (5, 7)),
    ),
    dict(
        columns=(
            'left_eyebrow_inner_end_x', 'left_eyebrow_inner_end_y',
            'right_eyebrow_inner_end_x', 'right_eyebrow_inner_end_y',
            'left_eyebrow_outer_end_x', 'left_eyebrow_outer_end_y',
            'right_eyebrow_outer_end_x', 'right_eyebrow_outer_end_y',
        ),
        flip_indices=((0, 2), (1, 3), (4, 6), (5, 7)),
    ),
]


def specialist(setting, rows, pretrain=None, max_epochs=None, epochs_scale=1.0, device=None,
               net=None):
    """A clone of `net` (default net7) set up for one setting of
    SPECIALIST_SETTINGS and initialized: its columns as outputs, its flip
    pairs, max_epochs = int(4e6 / rows) as in the tutorial (or `max_epochs`),
    its kwargs, and with `pretrain` (a state dict) every weight that fits
    copied in (the names of the layers copied: pretrained_)."""
    net = clone(net7 if net is None else net).set_params(
        columns=tuple(setting['columns']),
        module__output_units=len(setting['columns']),
        iterator_train__flip_indices=setting['flip_indices'],
        max_epochs=max_epochs or max(1, int(4e6 / rows * epochs_scale)),
        **setting.get('kwargs', {}))
    if device:
        net.set_params(device=device)
    net.initialize()
    net.rows_ = rows
    net.pretrained_ = copy_matching_weights(net, pretrain) if pretrain is not None else []
    return net


def specialist_and_data(setting, pretrain=None, data_dir=None, groups=None, max_epochs=None,
                        epochs_scale=1.0, device=None, net=None):
    """A specialist for `setting` (see specialist) and the rows it trains on:
    (net, X, y), X and y of the rows that have the setting's columns.
    `groups` validates on held-out groups, as `kfkd fit --groups` does."""
    X, y, *row_groups = load2d(cols=setting['columns'], data_dir=data_dir, groups=groups)
    model = specialist(setting, len(y), pretrain, max_epochs, epochs_scale, device, net)
    if groups is not None:
        model.set_params(train_split=GroupSplit(row_groups[0], source=groups))
    return model, X, y


def fit_specialist(setting, device=None, verbose=True, pretrain=None, data_dir=None,
                   groups=None, max_epochs=None, epochs_scale=1.0, net=None):
    """One turn of the tutorial's loop: load the rows that have the setting's
    columns, make its specialist and train it."""
    cols = setting['columns']
    model, X, y = specialist_and_data(setting, pretrain, data_dir, groups, max_epochs,
                                      epochs_scale, device, net)
    model.set_params(verbose=verbose)
    print(f'Training model for columns {cols} for {model.max_epochs} epochs' +
          (f' (pre-trained: {", ".join(model.pretrained_)})' if pretrain is not None else ''))
    return model.partial_fit(X, y)


def fit_specialists(pretrain=None, data_dir=None, out='specialists.safetensors',
                    max_epochs=None, epochs_scale=1.0, jobs=1, device='auto', seed=42,
                    resume=False, dask=None, net=None, groups=None, precision=None,
                    specialist_settings=SPECIALIST_SETTINGS):
    """Train the six specialists of SPECIALIST_SETTINGS (or of
    `specialist_settings`, such as `kfkd tune` finds) and save them in one file.

    `pretrain` is a model file from `kfkd fit` (normally net6 or net7): each
    specialist starts from its weights where names and shapes match. `net`
    replaces net7 as the net each specialist is a clone of. The file is
    rewritten as each specialist finishes, and `resume` trains only those that
    are not in it yet. `jobs` trains that many at once, and `dask` (a
    scheduler's address, or 'local') on a Dask cluster (see fit_in_jobs).
    `groups` validates each on held-out groups, and `precision` sets each
    one's, as `kfkd fit` does.

    Returns an OrderedDict of columns -> net, in their order.
    """
    device = resolve_device(device)
    net = clone(net7 if net is None else net)
    name = registered_name(net)  # a net no model file can name fails here, before training
    for setting in specialist_settings:
        unknown = unknown_settings(net, setting.get('kwargs', {}))
        if unknown:
            raise KfkdError(f'SPECIALIST_SETTINGS set {unknown[0]} for the specialist of '
                            f'{setting["columns"][0]}..., which {name} does not have: '
                            f'specialists are made from net7 or a net like it')
    if precision:
        net.set_params(precision=precision)
    state = load_net(pretrain, 'cpu').module_.state_dict() if pretrain else None
    specialists = load_specialists(out, 'cpu', complete=False) if resume else OrderedDict()
    todo = [(seed + i, setting) for i, setting in enumerate(specialist_settings)
            if tuple(setting['columns']) not in specialists]
    read(data_dir=data_dir)  # parse (and cache) the CSV once, not once per job
    fit_one = functools.partial(fit_specialist, pretrain=state, data_dir=data_dir, groups=groups,
                                max_epochs=max_epochs, epochs_scale=epochs_scale, net=net)
    started = time.monotonic()
    for model in fit_in_jobs(fit_one, todo, jobs, dask, device):
        specialists[model.columns_] = model
        save_specialists(specialists, out)
    print(f'{len(todo)} specialists in {time.monotonic() - started:.0f} s; saved {out}')
    specialists = OrderedDict((tuple(s['columns']), specialists[tuple(s['columns'])])
                              for s in specialist_settings)
    save_specialists(specialists, out)
    return specialists


def load_specialists(path, device=None, complete=True):
    """The specialists (OrderedDict of columns -> net) in the file at `path`;
    all six of SPECIALIST_SETTINGS unless not `complete`."""
    model = read_model(path, device)
    if not isinstance(model, dict):
        raise KfkdError(f'{path}: holds a single net, not specialists')
    if complete and len(model) < len(SPECIALIST_SETTINGS):
        raise KfkdError(f'{path}: holds {len(model)} of {len(SPECIALIST_SETTINGS)} '
                        f'specialists; finish them with kfkd fit_specialists --resume')
    return model


# --- The submission ---

def submit(model, data_dir=None, out=None):
    """Write a Kaggle submission: RowId,Location for every row of IdLookupTable.csv.

    `model` is a net or specialists (from read_model), a list of them (the
    mean of their predictions) or a model file. The predictions, rescaled to
    pixels, are clipped to the image (0-96).
    """
    if isinstance(model, (str, Path)):
        model = read_model(model)
    labels, pixels = read(test=True, data_dir=data_dir)
    lookup_path = data_path(data_dir) / 'IdLookupTable.csv'
    if not lookup_path.is_file():
        raise KfkdError(f'no IdLookupTable.csv in {data_path(data_dir).resolve()}')
    lookup = read_table(lookup_path)
    missing = {'RowId', 'ImageId', 'FeatureName'} - set(lookup.columns)
    if missing:
        raise KfkdError(f'{lookup_path}: missing column(s) {", ".join(sorted(missing))}')
    predicted = predict_keypoints(model, scale_pixels(pixels)).clip(0, IMAGE_SIZE)
    row_of_image = pd.Series(np.arange(len(labels)), index=labels['ImageId'])
    unknown_images = ~lookup['ImageId'].isin(row_of_image.index)
    if unknown_images.any():
        first = lookup[unknown_images].iloc[0]
        raise KfkdError(f'{lookup_path}: RowId {first.RowId} asks for ImageId {first.ImageId}, '
                        f'which is not in test.csv')
    unknown_features = ~lookup['FeatureName'].isin(predicted.columns)
    if unknown_features.any():
        name = lookup['FeatureName'][unknown_features].iloc[0]
        what = ('not a keypoint column' if name not in COLUMNS else
                'a keypoint this model does not predict')
        raise KfkdError(f'{lookup_path}: FeatureName {shown(str(name))} is {what}')
    rows = row_of_image[lookup['ImageId']].to_numpy()
    cols = predicted.columns.get_indexer(lookup['FeatureName'])
    submission = pd.DataFrame({'RowId': lookup['RowId'],
                               'Location': predicted.to_numpy()[rows, cols]})
    out = Path(out or f'submission-{datetime.datetime.now().isoformat().replace(":", "-")}.csv')
    with kfkd_io.atomic_write(out, 'w') as f:
        submission.to_csv(f, index=False)
    print(f'Wrote {out}')
    return out


# --- Pictures ---

def blank_figure(**kwargs):
    """A matplotlib Figure, without pyplot's global state (Jupyter shows it)."""
    from matplotlib.figure import Figure
    return Figure(**kwargs)


def _history_rmse(net, key):
    return np.array([rmse_pixels(row.get(key, np.nan)) for row in net.history])


def _rebin(values, length=100):
    """`values` resampled to `length` points, so runs of any length line up."""
    return values[np.linspace(0, len(values) - 1, length).astype(int)] if len(values) else values


def plot_learning_curves(*models, labels=None):
    """Train (dashed) and validation (solid) RMSE in pixels per epoch, log scale.

    `models` are nets, specialists (OrderedDicts) or model files. Specialists
    are drawn as the tutorial drew them: each run rescaled to the same length,
    with the mean validation RMSE weighted by each specialist's number of targets.
    """
    from matplotlib import ticker
    fig = blank_figure(figsize=(10, 6))
    ax = fig.add_subplot(1, 1, 1)
    colours = iter(f'C{i}' for i in range(100))
    for i, model in enumerate(models):
        if isinstance(model, (str, Path)):
            label = str(model)
            model = read_model(model)
        else:
            label = getattr(model, 'name_', f'model {i + 1}')
        if labels:
            label = labels[i]
        if isinstance(model, dict):
            valid_curves, weights = [], []
            for cols, net in model.items():
                colour = next(colours)
                valid = _rebin(_history_rmse(net, 'valid_loss'))
                ax.plot(valid, colour, lw=2, label=f'{cols[0]} ({len(cols)})')
                ax.plot(_rebin(_history_rmse(net, 'train_loss')), colour, ls='--', lw=2, alpha=0.6)
                valid_curves.append(valid)
                weights.append(len(cols))
            mean = np.average(np.vstack(valid_curves), axis=0, weights=weights)
            ax.plot(mean, 'r', lw=4, alpha=0.8, label=f'{label}: weighted mean')
            ax.set_xlabel('training progress (each run rescaled to 100 steps)')
        else:
            colour = next(colours)
            epochs = np.arange(1, len(model.history) + 1)
            ax.plot(epochs, _history_rmse(model, 'valid_loss'), colour, lw=2, label=f'{label} valid')
            ax.plot(epochs, _history_rmse(model, 'train_loss'), colour, ls='--', lw=2,
                    alpha=0.6, label=f'{label} train')
            ax.set_xlabel('epoch')
    ax.set_yscale('log')
    # plain numbers (2, 3, 4, 6, 10) where a log axis would write 6x10^0
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 3, 4, 6)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f'{value:g}'))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_ylabel('RMSE (pixels)')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
    return fig


def plot_sample(x, y, axis, **scatter):
    """A face (scaled as load2d scales it) and its keypoints (scaled or in pixels)."""
    axis.imshow(np.asarray(x).reshape(IMAGE_SIZE, IMAGE_SIZE), cmap='gray',
                extent=(0, IMAGE_SIZE, IMAGE_SIZE, 0))
    if y is not None:
        y = np.asarray(y, dtype=float)
        if np.nanmax(np.abs(y)) <= 1.5:
            y = to_pixels(y)
        axis.scatter(y[0::2], y[1::2], **{'marker': 'x', 's': 20, 'c': 'r', **scatter})
    axis.set_axis_off()


def plot_samples(model, X, rows=4, cols=4):
    """A grid of faces with the keypoints `model` predicts for them."""
    X = X[:rows * cols]
    predicted = predict_keypoints(model, X).to_numpy()
    fig = blank_figure(figsize=(2 * cols, 2 * rows))
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1, hspace=0.05, wspace=0.05)
    for i in range(len(X)):
        plot_sample(X[i], predicted[i], fig.add_subplot(rows, cols, i + 1))
    return fig


def plot_flip(x, y, columns=COLUMNS, mirror_axis=MIRROR_AXIS):
    """A face and its mirror image, each with its targets (`columns`): the
    subject's left keypoints in blue, right ones in orange, the rest in green."""
    x = np.asarray(x, dtype=np.float32).reshape(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    y = np.asarray(y, dtype=np.float32).reshape(1, -1)
    colours = [{'left': 'tab:blue', 'right': 'tab:orange'}.get(side, 'tab:green')
               for side in keypoint_sides(columns)]
    fig = blank_figure(figsize=(8, 4.4))
    for i, (title, xi, yi) in enumerate((('original', x, y),
                                         ('flipped', *mirror(x, y, mirror_pairs(columns),
                                                             mirror_axis)))):
        axis = fig.add_subplot(1, 2, i + 1)
        plot_sample(xi, yi[0], axis, c=colours, marker='o', s=25)
        axis.set_title(title)
    fig.suptitle("blue: subject's left keypoints, orange: right")
    return fig


# --- The tutorial's own code ---

def install_as_nolearn():
    """Let the tutorial's own code run as it is written: afterwards `import
    theano`, `from lasagne import layers`, `from lasagne.updates import
    nesterov_momentum` and `from nolearn.lasagne import NeuralNet,
    BatchIterator` give kfkd's versions of them, in this process only; their
    nets train on kfkd's engine (see kfkd_nolearn)."""
    import kfkd_nolearn
    kfkd_nolearn.install()
