"""kfkd: facial keypoint detection with convolutional neural nets.

A modern reproduction of Daniel Nouri's 2014 tutorial "Using convolutional
neural nets to detect facial keypoints" (Kaggle Facial Keypoints Detection),
on PyTorch and skorch. This file holds the tutorial's code, in its order;
read it top to bottom beside the tutorial:

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
  net8, net9, net10             the epilogue: one net from every label; with heatmaps;
                                four of those averaged

Its engine, as nolearn.lasagne was the tutorial's, is kfkd_engine (the
layers, KeypointNet, model files); file formats are kfkd_io; the `kfkd`
command is kfkd_cli.

In a notebook:  from kfkd import load, net1;  X, y = load();  net1.fit(X, y)
At the shell:   kfkd demo;  kfkd fit --net net7;  kfkd submit net7.safetensors
"""
import contextlib
import datetime
import io
import math
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.utils import shuffle
from skorch.callbacks import Callback
from torch import nn

import kfkd_io
from kfkd_engine import (
    NETS, BatchIterator, Conv2DLayer, DenseLayer, DropoutLayer, GroupSplit, KeypointNet,
    MaxPool2DLayer, copy_matching_weights, copy_weights, dask_backend, flip_targets,
    kept_weights, load_net, model_entry, predict_keypoints, progress_bar, read_model,
    resolve_device, restore_net, rmse_pixels, save_specialists, scale_pixels, swap_left_right,
    tqdm)
from kfkd_engine import (  # noqa: F401  (importable from kfkd, as before the engine moved out)
    DEVICE, Checkpoint, EpochLog, __version__, build_net, native_bf16, resume_state, save_net)
from kfkd_io import (COLUMNS, IMAGE_SIZE, KfkdError, data_path, read, read_groups, read_table,
                     shown)


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
    y = ((df.to_numpy()[keep] - 48) / 48).astype(np.float32)
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
    places. All on the device, for the whole batch at once.
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
        Xb = Xb.clone()
        Xb[flip] = Xb[flip].flip(-1)
        if yb is not None:
            yb = yb.clone()
            yb[flip] = flip_targets(yb[flip], self.flip_indices)
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
            losses = np.array([row.get('valid_loss', np.nan) for row in net.history])
            best = int(np.nanargmin(losses))
            self.best_valid_, self.best_valid_epoch_ = losses[best], best + 1

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
    copied in."""
    net = clone(net7 if net is None else net).set_params(
        module__output_units=len(setting['columns']),
        iterator_train__flip_indices=setting['flip_indices'],
        max_epochs=max_epochs or max(1, int(4e6 / rows * epochs_scale)),
        **setting.get('kwargs', {}))
    if device:
        net.set_params(device=device)
    net.initialize()
    net.name_, net.columns_ = 'net7', tuple(setting['columns'])
    net.pretrained_ = copy_matching_weights(net, pretrain) if pretrain is not None else []
    return net


def _fit_specialist(index, pretrain, data_dir, max_epochs, epochs_scale, device, seed, net,
                    groups, threads, verbose):
    """Train specialist number `index`; what each parallel job runs."""
    if threads:
        torch.set_num_threads(threads)
    if torch.device(device).type == 'cuda' and torch.cuda.device_count() > 1:
        device = f'cuda:{index % torch.cuda.device_count()}'  # one GPU per job
    setting = SPECIALIST_SETTINGS[index]
    cols = setting['columns']
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
        X, y, *row_groups = load2d(cols=cols, data_dir=data_dir, groups=groups)
    torch.manual_seed(seed + index)
    net = specialist(setting, len(y), pretrain, max_epochs, epochs_scale, device, net)
    net.set_params(verbose=verbose)
    if groups is not None:
        net.set_params(train_split=GroupSplit(row_groups[0]))
    if verbose:
        print(f'Training model for columns {cols} for {net.max_epochs} epochs' +
              (f' (pre-trained: {", ".join(net.pretrained_)})' if pretrain is not None else ''))
    started = time.monotonic()
    net.partial_fit(X, y)
    if net.diverged_:
        raise KfkdError(f'the specialist for {cols[0]}...: {net.diverged_}')
    # What the file holds, not the whole net: less to send back from a job.
    entry, weights = model_entry('net7', net, cols, kept_weights(net))
    weights = {k: v.cpu() for k, v in weights.items()}
    return index, entry, weights, len(y), time.monotonic() - started, net.pretrained_


def fit_specialists(pretrain=None, data_dir=None, out='specialists.safetensors',
                    max_epochs=None, epochs_scale=1.0, jobs=1, device='auto', seed=42,
                    resume=False, dask=None, net=None, groups=None, precision=None):
    """Train the six specialists of SPECIALIST_SETTINGS and save them in one file.

    `pretrain` is a model file from `kfkd fit` (normally net6 or net7): each
    specialist starts from its weights where names and shapes match. `jobs`
    trains that many specialists at once, in separate processes (threads
    shared out so the cores are not oversubscribed; with several GPUs, one GPU
    per job); with `dask` (a scheduler address, or 'local') the jobs run on a
    Dask cluster instead. The file is rewritten as each specialist finishes,
    and `resume` trains only those that are not in it yet. `net` replaces
    net7 as the net each specialist is a clone of (its name stays net7).
    `groups` validates each on held-out groups, and `precision` sets each
    one's, as `kfkd fit` does.

    Returns an OrderedDict of columns -> net, in SPECIALIST_SETTINGS' order.
    """
    import joblib
    device = resolve_device(device)
    if precision:
        net = clone(net7 if net is None else net).set_params(precision=precision)
    out = Path(out)
    state = load_net(pretrain, 'cpu').module_.state_dict() if pretrain else None
    done = OrderedDict()
    if resume:
        if not out.exists():
            raise KfkdError(f'{out}: no such specialists file to resume')
        done = load_specialists(out, 'cpu', complete=False)
    todo = [i for i, s in enumerate(SPECIALIST_SETTINGS) if tuple(s['columns']) not in done]
    if jobs < 1:
        raise KfkdError(f'--jobs must be at least 1, not {jobs}')
    if max_epochs is not None and max_epochs < 1:
        raise KfkdError(f'--max-epochs must be at least 1, not {max_epochs}')
    if not epochs_scale > 0:
        raise KfkdError(f'--epochs-scale must be positive, not {epochs_scale}')
    read(data_dir=data_dir)  # parse (and cache) the CSV once, not once per job
    args = (state, data_dir, max_epochs, epochs_scale, device, seed, net, groups)
    parallel = jobs > 1 or dask
    threads = max(1, (os.cpu_count() or 1) // jobs) if parallel and not dask else None
    tasks = (joblib.delayed(_fit_specialist)(i, *args, threads, verbose=0) for i in todo)
    started = time.monotonic()
    with dask_backend(dask), progress_bar(total=len(SPECIALIST_SETTINGS), initial=len(done),
                                          unit='specialist') as bar:
        if parallel:
            results = joblib.Parallel(n_jobs=jobs, return_as='generator_unordered')(tasks)
        else:
            results = (_fit_specialist(i, *args, None, verbose=1) for i in todo)
        for index, entry, weights, rows, seconds, pretrained in results:
            net = restore_net(entry, weights, out, device)
            done[net.columns_] = net
            bar.update()
            tqdm.write(_specialist_line(net, rows, seconds, pretrained))
            save_specialists(done, out)
    print(f'{len(todo)} specialists in {time.monotonic() - started:.0f} s; saved {out}')
    ordered = OrderedDict((tuple(s['columns']), done[tuple(s['columns'])])
                          for s in SPECIALIST_SETTINGS)
    save_specialists(ordered, out)
    return ordered


def _specialist_line(net, rows, seconds, pretrained):
    valid = [row.get('valid_loss', np.nan) for row in net.history]
    best = int(np.nanargmin(valid))
    return (f'{net.columns_[0]} ({len(net.columns_)} cols): {rows} rows, {len(net.history)} of '
            f'{net.max_epochs} epochs, best valid RMSE {rmse_pixels(valid[best]):.3f} px '
            f'(epoch {best + 1}), {seconds:.0f} s' +
            (f'; pre-trained {", ".join(pretrained)}' if pretrained else ''))


def load_specialists(path, device=None, complete=True):
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

    `model` is a net or specialists (from read_model) or a model file. The
    predictions, rescaled to pixels, are clipped to the image (0-96).
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


def score(submission, solution):
    """RMSE in pixels between two RowId,Location files (or DataFrames), Kaggle's metric."""
    frames = [pd.read_csv(f) if isinstance(f, (str, Path)) else f for f in (submission, solution)]
    both = frames[0].merge(frames[1], on='RowId', suffixes=('', '_true'), validate='1:1')
    if len(both) != len(frames[1]):
        raise KfkdError(f'the submission has {len(both)} of the {len(frames[1])} rows to score')
    return float(np.sqrt(np.mean((both['Location'] - both['Location_true']) ** 2)))


# --- Pictures ---

def _figure(**kwargs):
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
    fig = _figure(figsize=(10, 6))
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
            y = y * 48 + 48
        axis.scatter(y[0::2], y[1::2], **{'marker': 'x', 's': 20, 'c': 'r', **scatter})
    axis.set_axis_off()


def plot_samples(model, X, rows=4, cols=4):
    """A grid of faces with the keypoints `model` predicts for them."""
    X = X[:rows * cols]
    predicted = predict_keypoints(model, X).to_numpy()
    fig = _figure(figsize=(2 * cols, 2 * rows))
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1, hspace=0.05, wspace=0.05)
    for i in range(len(X)):
        plot_sample(X[i], predicted[i], fig.add_subplot(rows, cols, i + 1))
    return fig


def plot_flip(x, y, flip_indices=FLIP_INDICES):
    """A face and its mirror image, each with its targets: the subject's left
    keypoints in blue, right ones in orange, the rest in green."""
    x = torch.as_tensor(x, dtype=torch.float32).reshape(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    y = torch.as_tensor(y, dtype=torch.float32).reshape(1, -1)
    left = {a for pair in flip_indices for a in pair[:1]}
    right = {b for pair in flip_indices for b in pair[1:]}
    colours = ['tab:blue' if 2 * k in left else 'tab:orange' if 2 * k in right else 'tab:green'
               for k in range(y.shape[1] // 2)]
    fig = _figure(figsize=(8, 4.4))
    for i, (title, xi, yi) in enumerate((('original', x, y),
                                         ('flipped', x.flip(-1), flip_targets(y, flip_indices)))):
        axis = fig.add_subplot(1, 2, i + 1)
        plot_sample(xi.numpy(), yi[0].numpy(), axis, c=colours, marker='o', s=25)
        axis.set_title(title)
    fig.suptitle("blue: subject's left keypoints, orange: right")
    return fig


def keypoint_errors(net, X, y):
    """Each keypoint's RMSE in pixels (over its x and y) of net.predict(X)
    against y (scaled as load() scales it), on the rows that have it: a
    DataFrame of 'RMSE (px)' and 'rows', one row per keypoint, in Kaggle's order."""
    return _keypoint_errors(net.predict(X), y, getattr(net, 'columns_', COLUMNS))


def _keypoint_errors(predicted, y, columns):
    squared = ((predicted - y) * 48) ** 2
    per_point = squared[:, 0::2] + squared[:, 1::2]  # NaN where a row lacks the keypoint
    rows = (~np.isnan(per_point)).sum(axis=0)
    with np.errstate(invalid='ignore', divide='ignore'):
        rmse = np.sqrt(np.nansum(per_point, axis=0) / (2 * rows))
    return pd.DataFrame({'RMSE (px)': rmse, 'rows': rows},
                        index=pd.Index([c[:-2] for c in list(columns)[0::2]], name='keypoint'))


def overall_rmse(errors):
    """The RMSE over all keypoints, from a keypoint_errors() table."""
    return float(np.sqrt((errors['RMSE (px)'] ** 2 * errors['rows']).sum() /
                         errors['rows'].sum()))


def plot_errors(net, X, y, worst=6):
    """What a net gets wrong on validation faces X, y (scaled as load2d()
    scales them): the RMSE of each keypoint as bars, then the `worst` faces
    with their true keypoints (green) and the predicted ones (red)."""
    predicted = net.predict(X)  # once: with test-time flips it is two passes
    errors = _keypoint_errors(predicted, y, getattr(net, 'columns_', COLUMNS))
    fig = _figure(figsize=(2 * worst, 7.5))
    grid = fig.add_gridspec(2, worst, height_ratios=(1.3, 1))
    ax = fig.add_subplot(grid[0, :])
    ax.bar(errors.index, errors['RMSE (px)'], color='tab:blue')
    ax.set_xticks(range(len(errors)), errors.index, rotation=40, ha='right')
    ax.set_ylabel('RMSE (pixels)')
    ax.set_title(f'validation RMSE per keypoint ({len(y)} faces; all keypoints: '
                 f'{overall_rmse(errors):.3f} px)')
    ax.grid(True, axis='y', alpha=0.3)
    predicted, truth = predicted * 48 + 48, y * 48 + 48
    with np.errstate(invalid='ignore'):
        per_face = np.sqrt(np.nanmean((predicted - truth) ** 2, axis=1))
    for i, row in enumerate(np.argsort(-np.nan_to_num(per_face, nan=-1))[:worst]):
        axis = fig.add_subplot(grid[1, i])
        plot_sample(X[row], truth[row], axis, c='tab:green', marker='o', s=14)
        axis.scatter(predicted[row, 0::2], predicted[row, 1::2], c='r', marker='x', s=20)
        axis.set_title(f'{per_face[row]:.1f} px', fontsize=10)
    fig.text(0.5, 0.02, 'the worst-predicted faces: true keypoints green, predicted red',
             ha='center')
    return fig


# --- Beyond the tutorial: one net from every label ---
#
# net7 learns from the 30% of rows that have all 30 keypoints; the
# specialists recover the rest with six nets. net8 uses every row in one net:
# its loss skips missing targets. It sees each face moved, turned, scaled,
# mirrored and relit, with the keypoints moved exactly alike; it is a small
# residual conv net with batch norm; and it averages its predictions for a
# face and the face's mirror image.

class MaskedMSELoss(nn.Module):
    """Mean squared error over the targets that are there (not NaN)."""
    handles_missing = True

    def forward(self, y_pred, y_true):
        # y_pred may hold several predictions of y_true (Ensemble's, while
        # training): then the mean of their losses.
        present = ~torch.isnan(y_true).expand_as(y_pred)
        error = torch.where(present, y_pred - torch.nan_to_num(y_true), 0)
        return (error ** 2).sum() / present.sum().clamp(min=1)


class AugmentIterator(FlipBatchIterator):
    """Each training face moved, turned, scaled, mirrored and relit at random,
    its keypoints moved exactly alike, for the whole batch at once.

    One affine map per face, through grid_sample (bilinear, edges repeated):
    up to `rotate` degrees, `scale` (a fraction) larger or smaller, `shift`
    pixels along each axis, mirrored half of the time (left and right
    keypoints swap places, as in FlipBatchIterator); then contrast and
    brightness change by up to `contrast` and `brightness`.
    """

    def __init__(self, dataset, batch_size=128, shuffle=False, flip_indices=None,
                 rotate=15.0, scale=0.1, shift=8.0, contrast=0.3, brightness=0.15):
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle,
                         flip_indices=flip_indices)
        self.rotate, self.scale, self.shift = rotate, scale, shift
        self.contrast, self.brightness = contrast, brightness

    def transform(self, Xb, yb):
        n, device = len(Xb), Xb.device
        uniform = lambda: torch.rand(n, device=device) * 2 - 1
        angle = uniform() * math.radians(self.rotate)
        zoom = 1 + uniform() * self.scale
        mirror = torch.rand(n, device=device) < 0.5
        # The map from output to input coordinates (-1..1, as grid_sample's):
        # p_in = A p_out + t, with A = rotation * zoom * (x negated if mirrored).
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        sign = torch.where(mirror, -1.0, 1.0)
        A = torch.stack([torch.stack([cos * sign, -sin], -1),
                         torch.stack([sin * sign, cos], -1)], -2)
        t = torch.stack([uniform(), uniform()], -1) * (self.shift / (IMAGE_SIZE / 2))
        grid = F.affine_grid(torch.cat([A, t[:, :, None]], -1), Xb.shape, align_corners=False)
        Xb = F.grid_sample(Xb, grid, mode='bilinear', padding_mode='border',
                           align_corners=False)
        mean = Xb.mean((1, 2, 3), keepdim=True)
        Xb = ((Xb - mean) * (1 + uniform()[:, None, None, None] * self.contrast) + mean +
              uniform()[:, None, None, None] * self.brightness).clamp(0, 1)
        if yb is not None:  # keypoints: p_out = A^-1 (p_in - t); mirrored: left <-> right
            points = yb.reshape(n, -1, 2) - t[:, None, :]
            # inv_ex: inv would make a GPU wait to check for singular matrices
            yb = (points @ torch.linalg.inv_ex(A).inverse.transpose(1, 2)).reshape(n, -1)
            yb = torch.where(mirror[:, None], swap_left_right(yb, self.flip_indices), yb)
        return Xb.contiguous(memory_format=torch.channels_last), yb


def _conv_bn(in_channels, out_channels, stride=1):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return F.relu(x + self.body(x))


def _stages(width):
    """Four stages, each halving the resolution (96 -> 48 -> 24 -> 12 -> 6) and
    doubling the channels (from `width`), then a residual block."""
    stages, channels = OrderedDict(), 1
    for i, out in enumerate((width, 2 * width, 4 * width, 8 * width), 1):
        stages[f'stage{i}'] = nn.Sequential(_conv_bn(channels, out, stride=2), ResidualBlock(out))
        channels = out
    return stages


class ResNet(nn.Sequential):
    """net8's module: a residual conv net sized for 96x96 faces and a CPU.

    Each stage halves the resolution (96 -> 48 -> 24 -> 12 -> 6) and doubles
    the channels, then one residual block; batch norm after every conv. The
    6x6 feature map is flattened into a linear output: unlike global pooling
    that keeps where on the face each feature is.
    """

    def __init__(self, width=16, output_units=30, dropout_p=0.2):
        layers = _stages(width)
        layers['dropout'] = nn.Dropout(dropout_p)
        layers['output'] = nn.Linear(8 * width * 6 * 6, output_units)
        super().__init__(layers)
        self.input_shape = (1, IMAGE_SIZE, IMAGE_SIZE)
        nn.init.zeros_(self.output.weight)  # start from the mean face
        nn.init.zeros_(self.output.bias)

    def forward(self, x):
        for name, layer in self.named_children():
            x = layer(x.flatten(1) if name == 'output' else x)
        return x


class SoftArgmax(nn.Module):
    """One heatmap per keypoint (a 1x1 convolution of the features), each
    turned into its keypoint: the mean position under the heatmap's softmax,
    in load()'s -1..1 coordinates of the face. Differentiable, and finer than
    the map's cells: integral regression."""

    def __init__(self, channels, side, output_units=30):
        super().__init__()
        self.conv = nn.Conv2d(channels, output_units // 2, 1)
        self.out_features = output_units
        centres = ((torch.arange(side) + 0.5) * (IMAGE_SIZE / side) - 48) / 48
        self.register_buffer('grid_x', centres.repeat(side), persistent=False)
        self.register_buffer('grid_y', centres.repeat_interleave(side), persistent=False)

    def forward(self, x):
        maps = self.conv(x).flatten(2).float().softmax(-1)  # (faces, keypoints, cells)
        return torch.stack([maps @ self.grid_x, maps @ self.grid_y], -1).flatten(1)


class HeatmapNet(nn.Module):
    """net9's module: net8's four stages, then back up from 6x6 to 24x24 (as a
    feature pyramid does: each coarser map, upsampled, is added to the stage
    before it) and a heatmap per keypoint there (SoftArgmax).

    Where net8 flattens its 6x6 map into a linear layer, each keypoint here is
    found where the features show it, on a map four pixels to a cell.
    """

    def __init__(self, width=16, output_units=30):
        super().__init__()
        for name, stage in _stages(width).items():
            self.add_module(name, stage)
        self.lateral4 = nn.Conv2d(8 * width, 4 * width, 1)
        self.merge3 = _conv_bn(4 * width, 4 * width)
        self.lateral3 = nn.Conv2d(4 * width, 2 * width, 1)
        self.merge2 = _conv_bn(2 * width, 2 * width)
        self.output = SoftArgmax(2 * width, IMAGE_SIZE // 4, output_units)
        self.input_shape = (1, IMAGE_SIZE, IMAGE_SIZE)

    def forward(self, x):
        s2 = self.stage2(self.stage1(x))
        s3 = self.stage3(s2)
        s4 = self.stage4(s3)
        x = self.merge3(F.interpolate(self.lateral4(s4), scale_factor=2) + s3)
        x = self.merge2(F.interpolate(self.lateral3(x), scale_factor=2) + s2)
        return self.output(x)


class CosineSchedule(Callback):
    """The learning rate warms up linearly over the first `warmup` of
    training, then falls along a cosine to 0 at its end (max_epochs, or the
    time budget): set before each batch from the net's progress()."""

    def __init__(self, warmup=0.05):
        self.warmup = warmup

    def on_batch_begin(self, net, training=False, **kwargs):
        if not training:
            return
        progress = net.progress()
        scale = (progress / self.warmup if progress < self.warmup else
                 0.5 * (1 + math.cos(math.pi * (progress - self.warmup) / (1 - self.warmup))))
        for group in net.optimizer_.param_groups:
            group['lr'] = net.lr * max(scale, 0.01)


net8 = KeypointNet(
    module=ResNet,
    module__width=16,
    criterion=MaskedMSELoss,
    optimizer=torch.optim.AdamW,
    optimizer__weight_decay=1e-4,
    lr=3e-3,
    batch_size=64,
    iterator_train=AugmentIterator,
    callbacks=[CosineSchedule(), EarlyStopping(patience=None)],
    max_epochs=300,
    test_flip=True,
)

# net9, the default of `kfkd fit`: net8 with the heatmap head. At net8's
# epochs it is 16% closer on real faces of held-out people (1.38 against
# 1.64 px at 73 epochs), for 19-27% more time per epoch (README).
net9 = clone(net8).set_params(module=HeatmapNet)


class Ensemble(nn.Module):
    """net10's module: `members` HeatmapNets, each from its own random start,
    trained side by side on the same batches: while training it returns every
    member's prediction (MaskedMSELoss takes the mean of their losses),
    otherwise their mean."""

    def __init__(self, members=4, width=16, output_units=30):
        super().__init__()
        for i in range(1, members + 1):
            self.add_module(f'member{i}', HeatmapNet(width, output_units))
        self.input_shape = self.member1.input_shape

    @property
    def output(self):  # the members' output layer, which model files check
        return self.member1.output

    def forward(self, x):
        predictions = torch.stack([member(x) for member in self.children()])
        return predictions if self.training else predictions.mean(0)


# net10, kfkd's best: four net9s averaged. Each alone would reach about the
# same RMSE; the mean of their predictions is closer than any. Without
# test-time flips: on real faces a mirror image's keypoints lie 0.5-1 px
# left of the face's own, which the members' mean no longer hides (README).
net10 = clone(net9).set_params(module=Ensemble, test_flip=False)


# --- The tutorial's own code ---

def install_as_nolearn():
    """Let the tutorial's own code run as it is written: afterwards `import
    theano`, `from lasagne import layers`, `from lasagne.updates import
    nesterov_momentum` and `from nolearn.lasagne import NeuralNet,
    BatchIterator` give kfkd's versions of them, in this process only; their
    nets train on kfkd's engine (see kfkd_nolearn)."""
    import kfkd_nolearn
    kfkd_nolearn.install()


# Model files name the net they hold; read_model rebuilds it from here.
NETS.update((name, globals()[name]) for name in
            ('net1', 'net2', 'net3', 'net4', 'net5', 'net6', 'net7', 'net8', 'net9', 'net10'))


if __name__ == '__main__':  # `python kfkd.py CMD`, as `kfkd CMD`
    import kfkd_cli
    sys.exit(kfkd_cli.main())
