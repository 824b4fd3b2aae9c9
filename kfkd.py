"""kfkd: facial keypoint detection with convolutional neural nets.

A modern reproduction of Daniel Nouri's 2014 tutorial "Using convolutional
neural nets to detect facial keypoints" (Kaggle Facial Keypoints Detection),
on PyTorch and skorch. Read it top to bottom, as the tutorial:

  load, load2d                  the data, scaled as the tutorial does
  net1                          a net with one hidden layer
  net2                          a convolutional net
  FlipBatchIterator, net3       data augmentation by flipping faces
  AdjustVariable, net4, net5    learning rate and momentum schedules
  net6, net7                    dropout, and wider dense layers
  EarlyStopping                 stop when validation stops improving
  SPECIALIST_SETTINGS,
  fit_specialists               six specialist nets, pre-trained from net7
  submit                        a Kaggle submission
  plots, CLI                    pictures and the `kfkd` command

In a notebook:  from kfkd import load, net1;  X, y = load();  net1.fit(X, y)
At the shell:   kfkd demo;  kfkd fit --net net7;  kfkd submit net7.safetensors
"""
import argparse
import contextlib
import ctypes
import datetime
import functools
import hashlib
import io
import math
import os
import signal
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import skorch
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.utils import shuffle
from skorch.callbacks import Callback, EpochTimer
from skorch.dataset import ValidSplit
from torch import nn
from tqdm.auto import tqdm

import kfkd_io
from kfkd_io import COLUMNS, IMAGE_SIZE, KfkdError

__version__ = '0.1.0'


def _keep_freed_memory():
    """Stop glibc from handing big buffers back to the OS after every step.

    PyTorch frees and re-allocates its activation buffers each batch; glibc
    returns them to the OS with munmap and page-faults them back in, which made
    conv training 2.5x slower on the CPU. Keeping freed memory for reuse fixes it.
    """
    if not sys.platform.startswith('linux'):
        return
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:  # not glibc (musl, ...): nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


_keep_freed_memory()

# The left/right pairs among the 30 columns: when a face is mirrored,
# left_eye_center_x becomes right_eye_center_x, and so on.
FLIP_INDICES = [
    (0, 2), (1, 3),
    (4, 8), (5, 9), (6, 10), (7, 11),
    (12, 16), (13, 17), (14, 18), (15, 19),
    (22, 24), (23, 25),
]
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


def warn(message):
    print(f'kfkd: warning: {message}', file=sys.stderr)


# --- Loading the data ---

def data_path(data_dir=None):
    """Where the data lives: `data_dir`, else $KFKD_DATA, else ./data."""
    return Path(data_dir or os.environ.get('KFKD_DATA') or 'data')


def read(test=False, data_dir=None):
    """training.csv's or test.csv's columns (DataFrame) and pixels (uint8, n x 9216).

    Reads the .csv or the .zip Kaggle ships, through a cache, and checks what
    the rest of kfkd relies on.
    """
    path = kfkd_io.find_csv(data_path(data_dir), 'test' if test else 'training')
    labels, pixels = kfkd_io.read_faces(path)
    if test:
        if 'ImageId' not in labels:
            raise KfkdError(f'{path}: no ImageId column')
        ids = pd.to_numeric(labels['ImageId'], errors='coerce')
        lines = labels.attrs['lines']
        if ids.isna().any():
            raise KfkdError(f'{path}: line {lines[np.flatnonzero(ids.isna())[0]]}: '
                            f'ImageId is missing or not a number')
        duplicated = ids.duplicated()
        if duplicated.any():
            first = np.flatnonzero(duplicated)[0]
            raise KfkdError(f'{path}: line {lines[first]}: ImageId {int(ids[first])} '
                            f'appears twice')
        labels['ImageId'] = ids.astype(np.int64)
        return labels, pixels
    missing = [c for c in COLUMNS if c not in labels]
    if missing:
        raise KfkdError(f'{path}: missing keypoint column(s) {", ".join(missing)}')
    keypoints = labels[COLUMNS].apply(pd.to_numeric, errors='coerce')
    text = labels[COLUMNS].notna() & keypoints.isna()
    if text.any().any():
        row, col = np.argwhere(text.to_numpy())[0]
        raise KfkdError(f'{path}: line {labels.attrs["lines"][row]}: {COLUMNS[col]} is '
                        f'{labels[COLUMNS[col]].iloc[row]!r}, not a number')
    # A keypoint off the 96x96 image is a labelling error: drop it, x and y both.
    outside = ((keypoints < 0) | (keypoints > IMAGE_SIZE)).to_numpy()
    outside = np.repeat(outside[:, 0::2] | outside[:, 1::2], 2, axis=1)
    if outside.any():
        warn(f'{path}: dropped {outside.sum() // 2} keypoint(s) outside the image '
             f'(0-96) in {outside.any(1).sum()} row(s)')
        keypoints = keypoints.mask(outside)
    labels[COLUMNS] = keypoints
    return labels, pixels


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


def read_table(path):
    """A small CSV (groups, IdLookupTable) as a DataFrame, or a clear error."""
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise KfkdError(f'{path}: cannot read it: {e}') from None


def read_groups(spec, labels, data_dir=None):
    """Each training row's group: column `spec` of training.csv, or the CSV
    file `spec` (in data_dir or as given) with a row number and a group."""
    if spec in labels:
        groups = labels[spec]
    else:
        path = Path(spec) if Path(spec).exists() else data_path(data_dir) / spec
        if not path.is_file():
            raise KfkdError(f'groups {spec!r}: neither a column of training.csv nor a file')
        table = read_table(path)
        if table.shape[1] != 2 or not pd.api.types.is_integer_dtype(table.iloc[:, 0]):
            raise KfkdError(f'{path}: expected two columns: row number, group')
        groups = table.set_index(table.columns[0]).iloc[:, 0].reindex(range(len(labels)))
    if groups.isna().any():
        raise KfkdError(f'groups {spec!r}: no group for training row '
                        f'{int(np.flatnonzero(groups.isna())[0])}')
    return groups.to_numpy()


def scale_pixels(pixels):
    return np.multiply(pixels, np.float32(1 / 255), dtype=np.float32)


# --- The layers: Lasagne's names, PyTorch's modules ---

def _glorot(layer):
    # Lasagne's defaults: Glorot-uniform weights, zero biases.
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)


class DenseLayer(nn.Linear):
    """Lasagne's DenseLayer: flattens its input, then affine, then ReLU.

    With nonlinearity=None it is linear, as the output layer is.
    """

    def __init__(self, in_features, num_units, nonlinearity=F.relu):
        super().__init__(in_features, num_units)
        self.nonlinearity = nonlinearity
        _glorot(self)

    def forward(self, x):
        x = super().forward(x.flatten(1))
        return x if self.nonlinearity is None else self.nonlinearity(x)


class Conv2DLayer(nn.Conv2d):
    """Lasagne's Conv2DLayer: a 'valid' convolution (no padding), then ReLU
    (nonlinearity=None: none)."""

    def __init__(self, in_channels, num_filters, filter_size, nonlinearity=F.relu):
        super().__init__(in_channels, num_filters, filter_size)
        self.nonlinearity = nonlinearity
        _glorot(self)

    def forward(self, x):
        x = super().forward(x)
        return x if self.nonlinearity is None else self.nonlinearity(x)


class MaxPool2DLayer(nn.MaxPool2d):
    """2x2 max-pooling that also applies the ReLU of the conv layer before it.

    relu(max(x)) == max(relu(x)), in value and in gradient, so rectifying
    after the pool computes the same net while touching 4x fewer values: 20%
    faster training on the CPU. ConvNet's conv layers leave their ReLU to it.
    """

    def __init__(self):
        super().__init__(2)

    def forward(self, x):
        return F.relu(super().forward(x))


class MLP(nn.Sequential):
    """net1's module: 9216 inputs, one hidden layer, 30 linear outputs."""

    def __init__(self, input_units=IMAGE_SIZE ** 2, hidden_units=100, output_units=30):
        super().__init__(OrderedDict(
            hidden=DenseLayer(input_units, hidden_units),
            output=DenseLayer(hidden_units, output_units, nonlinearity=None),
        ))
        self.input_shape = (input_units,)


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
                layers[f'dropout{i}'] = nn.Dropout(dropouts[i - 1])
            channels, side = filters, (side - size + 1) // 2
        features = channels * side * side
        for j, units in enumerate(hidden_units, len(conv_filters) + 1):
            layers[f'hidden{j}'] = DenseLayer(features, units)
            if j == len(conv_filters) + 1 and dropout4_p:
                layers['dropout4'] = nn.Dropout(dropout4_p)
            features = units
        layers['output'] = DenseLayer(features, output_units, nonlinearity=None)
        super().__init__(layers)
        self.input_shape = (1, IMAGE_SIZE, IMAGE_SIZE)


# --- The net: skorch's regressor, with what nolearn printed and a fast data path ---

class BatchIterator:
    """Mini-batches sliced from tensors that already live on the device.

    nolearn's name, skorch's `iterator_train` slot. Each epoch slices the
    data set held on the device, in a new random order if `shuffle`: no
    DataLoader workers, no per-sample collate, no host-to-device copy per
    batch. Subclasses change batches in `transform(Xb, yb)`.
    """

    def __init__(self, dataset, batch_size=128, shuffle=False):
        if isinstance(dataset, torch.utils.data.Subset):
            index = torch.as_tensor(dataset.indices, device=dataset.dataset.tensors[0].device)
            self.tensors = [t[index] for t in dataset.dataset.tensors]
        elif isinstance(dataset, torch.utils.data.TensorDataset):
            self.tensors = list(dataset.tensors)
        else:
            raise TypeError(f'BatchIterator takes the TensorDataset that KeypointNet.'
                            f'get_dataset makes, not {type(dataset).__name__}')
        self.batch_size = batch_size
        self.shuffle = shuffle

    def __len__(self):
        return math.ceil(len(self.tensors[0]) / self.batch_size)

    def __iter__(self):
        X, y = self.tensors[0], self.tensors[1] if len(self.tensors) > 1 else None
        order = torch.randperm(len(X), device=X.device) if self.shuffle else None
        for start in range(0, len(X), self.batch_size):
            rows = slice(start, start + self.batch_size)
            if order is not None:
                rows = order[rows]
            yield self.transform(X[rows], None if y is None else y[rows])

    def transform(self, Xb, yb):
        return Xb, yb


@functools.lru_cache
def native_bf16(device):
    """Whether `device` computes in bfloat16 natively (so autocast pays off)."""
    if torch.device(device).type == 'cuda':
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu  # private helpers; absent in some builds: then assume no
    return any(getattr(cpu, name, lambda: False)() for name in
               ('_is_avx512_bf16_supported', '_is_amx_tile_supported'))


class EpochLog(Callback):
    """One row per epoch, as nolearn printed them, plus the validation RMSE in
    pixels (sqrt(loss) * 48), under a progress bar with an ETA when stderr is
    a terminal. The best losses so far are marked with a *.
    """

    def on_train_begin(self, net, **kwargs):
        self.best_train = self.best_valid = np.inf
        for row in net.history:
            self._mark(row)
        self.bar = tqdm(total=net.max_epochs, initial=len(net.history), unit='epoch',
                        leave=False, dynamic_ncols=True, file=sys.stderr,
                        disable=None if net.verbose else True)
        if net.verbose:
            tqdm.write('  epoch    train loss    valid loss    train/val    valid RMSE      dur\n'
                       '-------  ------------  ------------  -----------  ------------  -------')

    def _mark(self, row):
        marks = []
        for key, best in (('train_loss', 'best_train'), ('valid_loss', 'best_valid')):
            value = row.get(key, np.nan)
            marks.append('*' if value < getattr(self, best) else ' ')
            if value < getattr(self, best):
                setattr(self, best, value)
        return marks

    def on_epoch_end(self, net, **kwargs):
        row = net.history[-1]
        self.bar.update()
        if not net.verbose:
            return
        train, valid = row['train_loss'], row.get('valid_loss', np.nan)
        train_mark, valid_mark = self._mark(row)
        tqdm.write(f'{row["epoch"]:7d}  {train:11.6f}{train_mark}  {valid:11.6f}{valid_mark}  '
                   f'{train / valid:11.5f}  {rmse_pixels(valid):9.3f} px  {row["dur"]:6.2f}s')

    def on_train_end(self, net, **kwargs):
        self.bar.close()


def rmse_pixels(loss):
    """The RMSE in pixels of a mean squared error on targets scaled by 1/48."""
    return math.sqrt(loss) * 48 if loss >= 0 else math.nan


class KeypointNet(skorch.NeuralNetRegressor):
    """skorch's NeuralNetRegressor with the tutorial's defaults and printouts.

    - The data moves to the device once; batches are slices of it
      (BatchIterator), and losses are summed on the device and read once per
      epoch: a GPU never waits on the host between batches.
    - Validation is the first 20% of the (shuffled) rows, as in nolearn.
    - `precision='auto'` trains in bfloat16 autocast where the hardware has
      native bfloat16 (recent GPUs and CPUs), else in float32; 'fp32' and
      'bf16' force either. Conv nets use the channels-last memory layout,
      which is what fast CPU and GPU convolution kernels want.
    - Prints the layer table and one row per epoch; a NaN or infinite loss
      stops training with the last good weights restored.
    """

    def __init__(self, module, *args, precision='auto', time_budget=None, test_flip=False,
                 **kwargs):
        kwargs.setdefault('batch_size', 128)
        kwargs.setdefault('iterator_train', BatchIterator)
        kwargs.setdefault('iterator_valid', BatchIterator)
        kwargs.setdefault('iterator_train__shuffle', True)
        kwargs.setdefault('train_split', ValidSplit(5))
        kwargs.setdefault('device', DEVICE)
        super().__init__(module, *args, **kwargs)
        self.precision = precision
        self.time_budget = time_budget
        self.test_flip = test_flip

    def progress(self):
        """How far training is, 0 to 1: by epochs of max_epochs, or by
        seconds of time_budget where that is further along."""
        epochs = max(len(self.history) - 1, 0) / max(self.max_epochs - 1, 1)
        if not self.time_budget:
            return min(epochs, 1.0)
        elapsed = getattr(self, 'seconds_before_epoch_', 0)
        if getattr(self, 'epoch_started_', None) is not None:
            elapsed += time.monotonic() - self.epoch_started_
        return min(max(epochs, elapsed / self.time_budget), 1.0)

    def on_epoch_begin(self, net, **kwargs):
        """Stops, before it starts, an epoch that would end past the time budget."""
        # Summed once an epoch: progress() runs every batch.
        self.seconds_before_epoch_ = sum(row.get('dur', 0) for row in self.history)
        if self.time_budget and len(self.history):
            if self.seconds_before_epoch_ + self.history[-1].get('dur', 0) > self.time_budget:
                print(f'Stopping: another epoch would pass the time budget of '
                      f'{self.time_budget:g} s.')
                raise KeyboardInterrupt  # skorch's way to end fit() early
        super().on_epoch_begin(net, **kwargs)
        self.epoch_started_ = time.monotonic()

    def predict(self, X):
        """Predictions; with test_flip, the mean of the face's and its mirror
        image's (mirrored back), which cancels some of a net's left/right bias."""
        y = super().predict(X)
        if not self.test_flip:
            return y
        mirrored = super().predict(np.ascontiguousarray(np.asarray(X)[..., ::-1]))
        flip_indices = self.get_params().get('iterator_train__flip_indices', FLIP_INDICES)
        return (y + flip_targets(mirrored, flip_indices)) / 2

    @property
    def _default_callbacks(self):
        return [('epoch_timer', EpochTimer()), ('print_log', EpochLog())]

    @property
    def autocast_dtype(self):
        if self.precision not in ('auto', 'fp32', 'bf16'):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', not {self.precision!r}")
        bf16 = self.precision == 'bf16' or (self.precision == 'auto' and native_bf16(self.device))
        return torch.bfloat16 if bf16 else None

    def initialize_module(self):
        super().initialize_module()
        if len(self.module_.input_shape) == 3:
            self.module_ = self.module_.to(memory_format=torch.channels_last)
        return self

    def get_dataset(self, X, y=None):
        if skorch.utils.is_dataset(X):
            return X
        tensors = [torch.as_tensor(X, dtype=torch.float32, device=self.device)]
        if y is not None:
            tensors.append(torch.as_tensor(y, dtype=torch.float32, device=self.device))
        return torch.utils.data.TensorDataset(*tensors)

    def infer(self, x, **fit_params):
        dtype = self.autocast_dtype
        with torch.autocast(torch.device(self.device).type, torch.bfloat16,
                            enabled=dtype is not None):
            return super().infer(x, **fit_params).float()

    def run_single_epoch(self, iterator, training, prefix, step_fn, **fit_params):
        """skorch's loop, but the loss is summed on the device and recorded once
        per epoch: a .item() per batch would make a GPU wait every batch."""
        if iterator is None:
            return
        if training:  # the weights to go back to should this epoch's loss blow up
            self.last_good_weights_ = _copy_weights(self.module_)
        total, count = torch.zeros((), device=self.device), 0
        for batch in iterator:
            self.notify('on_batch_begin', batch=batch, training=training)
            step = step_fn(batch, **fit_params)
            total += step['loss'].detach() * len(batch[0])
            count += len(batch[0])
            self.notify('on_batch_end', batch=batch, training=training, **step)
        loss = (total / count).item()
        self.history.record(prefix + '_loss', loss)
        if not math.isfinite(loss):
            self.module_.load_state_dict(self.last_good_weights_)
            epoch = len(self.history)
            self.diverged_ = (f'the {prefix} loss became {loss} in epoch {epoch}; kept the '
                              f'weights from before it. Try a lower learning rate (--lr)')
            print(f'Stopping: {self.diverged_}.')
            raise KeyboardInterrupt  # skorch's way to end fit() early

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        self.diverged_ = None
        if self.verbose and not len(self.history):
            print(self.layer_table())

    def layer_table(self):
        """The layers with their output shapes, as nolearn printed them."""
        rows, hooks = [], []
        shape = tuple(self.module_.input_shape)
        rows.append(('input', 'InputLayer', (None,) + shape, math.prod(shape), 0))
        for name, layer in self.module_.named_children():
            def record(layer, inputs, output, name=name):
                rows.append((name, type(layer).__name__, (None,) + tuple(output.shape[1:]),
                             output[0].numel(), sum(p.numel() for p in layer.parameters())))
            hooks.append(layer.register_forward_hook(record))
        was_training = self.module_.training
        try:
            self.module_.eval()
            with torch.no_grad():
                self.module_(torch.zeros((1,) + shape, device=self.device))
        finally:
            self.module_.train(was_training)
            for hook in hooks:
                hook.remove()
        total = sum(row[4] for row in rows)
        lines = [f'# Neural network with {total:,} learnable parameters', '']
        lines += [f'  {name:10s} {kind:12s} {str(shape):20s} produces {outputs:7d} outputs'
                  f'{f"  ({params:,} parameters)" if params else ""}'
                  for name, kind, shape, outputs, params in rows]
        return '\n'.join(lines) + '\n'


def _copy_weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- net1: one hidden layer ---

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

class FlipBatchIterator(BatchIterator):
    """Mirrors a random half of each training batch.

    Mirroring a face moves every keypoint to 96 - x, i.e. negates the scaled
    x targets, and turns left into right: the columns in `flip_indices` swap
    places. All on the device, for the whole batch at once.
    """

    def __init__(self, dataset, batch_size=128, shuffle=False, flip_indices=FLIP_INDICES):
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle)
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


def flip_targets(y, flip_indices):
    """Keypoints of mirrored faces: x negated, left and right swapped."""
    y = swap_left_right(y, flip_indices)
    y[:, 0::2] = -y[:, 0::2]
    return y


def swap_left_right(y, flip_indices):
    """The columns of y with each pair in `flip_indices` swapped (a copy)."""
    order = list(range(y.shape[1]))
    for a, b in flip_indices:
        order[a], order[b] = b, a
    return y[:, order]


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
    restores the best weights.
    """

    def __init__(self, patience=100):
        self.patience = patience

    def initialize(self):
        self.best_valid, self.best_valid_epoch, self.best_weights = np.inf, 0, None
        return self

    def on_train_begin(self, net, **kwargs):
        if len(net.history):  # a resumed run: its best so far is in the history
            losses = np.array([row.get('valid_loss', np.nan) for row in net.history])
            best = int(np.nanargmin(losses))
            self.best_valid, self.best_valid_epoch = losses[best], best + 1

    def on_epoch_end(self, net, **kwargs):
        current_valid = net.history[-1, 'valid_loss']
        current_epoch = net.history[-1, 'epoch']
        if current_valid < self.best_valid:
            self.best_valid = current_valid
            self.best_valid_epoch = current_epoch
            self.best_weights = _copy_weights(net.module_)
        elif self.patience is not None and self.best_valid_epoch + self.patience < current_epoch:
            print('Early stopping.')
            print(f'Best valid loss was {self.best_valid:.6f} at epoch {self.best_valid_epoch}.')
            raise KeyboardInterrupt  # skorch's way to end fit() early

    def on_train_end(self, net, **kwargs):
        if self.best_weights is not None:
            net.module_.load_state_dict(self.best_weights)


net7 = clone(net6).set_params(
    module__hidden_units=(1000, 1000),
    callbacks=_schedules() + [EarlyStopping(patience=200)],
    max_epochs=3000,
)


def kept_weights(net):
    """The weights a net ends training with: the best epoch's under EarlyStopping."""
    for _, callback in net.callbacks_:
        if isinstance(callback, EarlyStopping) and callback.best_weights is not None:
            return callback.best_weights
    return net.module_.state_dict()


# --- Model files ---

def _settings(net):
    """The net's JSON-able parameters: what, with its name, rebuilds it."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str))
    return {key: value for key, value in net.get_params(deep=False).items()
            if key not in ('device', 'verbose') and plain(value)}


def build_net(name, settings=None, device=None):
    """A fresh net by name, with `settings` (from _settings) applied."""
    if name not in NETS:
        raise KfkdError(f'unknown net {name!r}; choose one of {", ".join(NETS)}')
    net = clone(NETS[name])
    if settings:
        net.set_params(**settings)
    if device:
        net.set_params(device=device)
    return net


def _entry(name, net, columns, weights):
    return {'name': name, 'columns': list(columns), 'settings': _settings(net),
            'history': net.history.to_list() if net.history else []}, weights


def save_net(net, path, name, columns=COLUMNS, resume=False):
    """Write `net` to `path`: its weights (the best epoch's under
    EarlyStopping), name, settings, target columns and training history.

    With `resume`, also what continuing the run needs: the current weights,
    the optimizer's state and the random number generators' states.
    """
    meta, weights = _entry(name, net, columns, kept_weights(net))
    tensors = {f'weights/{k}': v for k, v in weights.items()}
    meta = {'kind': 'net', 'kfkd': __version__, 'models': [meta]}
    if resume:
        optimizer = net.optimizer_.state_dict()
        meta['resume'] = {'groups': getattr(net, 'groups_', None),
                          'param_groups': optimizer['param_groups'],
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


def _restore(entry, weights, path, device):
    name = entry['name']
    try:
        net = build_net(name, entry['settings'], device).initialize()
        net.module_.load_state_dict(weights)
    except (TypeError, ValueError, RuntimeError) as e:
        raise KfkdError(f'{path}: its settings or weights do not fit net {name} '
                        f'({str(e).splitlines()[0]})') from None
    net.history = skorch.history.History(entry['history'])
    net.name_, net.columns_ = name, tuple(entry['columns'])
    if len(net.columns_) != net.module_.output.out_features:
        raise KfkdError(f'{path}: lists {len(net.columns_)} columns for a net with '
                        f'{net.module_.output.out_features} outputs')
    return net


def read_model(path, device=None):
    """A net, or the specialists (OrderedDict of column tuple -> net), from `path`.

    Each net has `name_` and `columns_` set to what it was trained as.
    """
    meta, tensors = kfkd_io.read_model_file(path)
    nets = []
    try:
        for i, entry in enumerate(meta['models']):
            prefix = 'weights/' if meta['kind'] == 'net' else f'{i}/weights/'
            weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            nets.append(_restore(entry, weights, path, device))
    except (KeyError, TypeError, AttributeError):
        raise KfkdError(f'{path}: a kfkd model file with missing or malformed fields') from None
    if meta['kind'] == 'net':
        net = nets[0]
        net.resume_ = meta.get('resume') and (meta['resume'], tensors)
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
                        f'({len(net.history)} epochs). Start a new one without --resume')
    resume, tensors = net.resume_
    best = _copy_weights(net.module_)
    net.module_.load_state_dict({k[len('resume/weights/'):]: v for k, v in tensors.items()
                                 if k.startswith('resume/weights/')})
    state = {int(i): {key: tensors[f'resume/optimizer/{i}/{key}'].to(net.device)
                      for key in keys} for i, keys in resume['state_keys'].items()}
    net.optimizer_.load_state_dict({'state': state, 'param_groups': resume['param_groups']})
    torch.set_rng_state(tensors['resume/rng/cpu'])
    if 'resume/rng/cuda' in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors['resume/rng/cuda'])
    for _, callback in net.callbacks_:
        if isinstance(callback, EarlyStopping):
            callback.best_weights = best
    return net


class Checkpoint(Callback):
    """Saves the run as it goes, so that nothing is lost.

    After the first epoch, then every `every` seconds, and when Ctrl-C
    (SIGINT) or SIGTERM asks training to stop, it writes `path` (atomically)
    with the weights the net would keep and what `kfkd fit --resume` needs to
    go on. The first signal stops training after the current epoch; a second
    one stops at once, leaving the last checkpoint. `interrupted` tells
    whether a signal ended the run.
    """

    def __init__(self, path, name, columns=COLUMNS, every=60):
        self.path = path
        self.name = name
        self.columns = columns
        self.every = every

    def on_train_begin(self, net, **kwargs):
        self.last_save, self.stop_requested, self.interrupted = -np.inf, False, False
        self.handlers = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.handlers[sig] = signal.signal(sig, self._request_stop)
        except ValueError:  # not in the main thread: no signals to catch
            pass

    def _request_stop(self, signum, frame):
        if self.stop_requested:
            self.interrupted = True
            raise KeyboardInterrupt
        self.stop_requested = True
        print(f'\nStopping after this epoch and saving {self.path} '
              f'(press Ctrl-C again to stop at once).', file=sys.stderr)

    def on_epoch_end(self, net, **kwargs):
        if self.stop_requested or time.monotonic() - self.last_save > self.every:
            save_net(net, self.path, self.name, self.columns, resume=True)
            self.last_save = time.monotonic()
        if self.stop_requested:
            self.interrupted = True
            raise KeyboardInterrupt

    def on_train_end(self, net, **kwargs):
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)


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


def copy_matching_weights(net, state):
    """Copy into `net` every weight of `state` whose name and shape match:
    supervised pre-training. Returns the names of the layers copied."""
    own = net.module_.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    net.module_.load_state_dict(matching, strict=False)
    return list(dict.fromkeys(k.rsplit('.', 1)[0] for k in own if k in matching))


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
    entry, weights = _entry('net7', net, cols, kept_weights(net))
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
    one's, as in fit().

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
    with _dask_backend(dask), tqdm(total=len(SPECIALIST_SETTINGS), initial=len(done),
                                   unit='specialist', file=sys.stderr, disable=None) as bar:
        if parallel:
            results = joblib.Parallel(n_jobs=jobs, return_as='generator_unordered')(tasks)
        else:
            results = (_fit_specialist(i, *args, None, verbose=1) for i in todo)
        for index, entry, weights, rows, seconds, pretrained in results:
            net = _restore(entry, weights, out, device)
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


@contextlib.contextmanager
def _dask_backend(address):
    """joblib's dask backend on the cluster at `address` ('local': start one here)."""
    if not address:
        yield
        return
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise KfkdError("--dask needs Dask: pip install 'kfkd[dask]'") from None
    import joblib
    cluster = LocalCluster(processes=True, threads_per_worker=1) if address == 'local' else None
    try:
        with Client(cluster or address) as client, joblib.parallel_backend('dask'):
            print(f'Training on the Dask cluster at {client.scheduler.address}')
            yield
    except OSError as e:
        raise KfkdError(f'--dask {address}: cannot reach the scheduler ({e})') from None
    finally:
        if cluster:
            cluster.close()


def save_specialists(specialists, path):
    """Write specialists (columns -> net) to one file, as save_net does a net."""
    meta = {'kind': 'specialists', 'kfkd': __version__, 'models': []}
    tensors = {}
    for i, net in enumerate(specialists.values()):
        entry, weights = _entry(net.name_, net, net.columns_, kept_weights(net))
        meta['models'].append(entry)
        tensors.update({f'{i}/weights/{k}': v for k, v in weights.items()})
    kfkd_io.write_model_file(path, meta, tensors)


def load_specialists(path, device=None, complete=True):
    model = read_model(path, device)
    if not isinstance(model, dict):
        raise KfkdError(f'{path}: holds a single net, not specialists')
    if complete and len(model) < len(SPECIALIST_SETTINGS):
        raise KfkdError(f'{path}: holds {len(model)} of {len(SPECIALIST_SETTINGS)} '
                        f'specialists; finish them with kfkd fit_specialists --resume')
    return model


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
        present = ~torch.isnan(y_true)
        error = torch.where(present, y_pred - torch.nan_to_num(y_true), 0)
        return (error ** 2).sum() / present.sum().clamp(min=1)


class AugmentIterator(BatchIterator):
    """Each training face moved, turned, scaled, mirrored and relit at random,
    its keypoints moved exactly alike, for the whole batch at once.

    One affine map per face, through grid_sample (bilinear, edges repeated):
    up to `rotate` degrees, `scale` (a fraction) larger or smaller, `shift`
    pixels along each axis, mirrored half of the time (left and right
    keypoints swap places, as in FlipBatchIterator); then contrast and
    brightness change by up to `contrast` and `brightness`.
    """

    def __init__(self, dataset, batch_size=128, shuffle=False, flip_indices=FLIP_INDICES,
                 rotate=15.0, scale=0.1, shift=8.0, contrast=0.3, brightness=0.15):
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle)
        self.flip_indices = flip_indices
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


class ResNet(nn.Sequential):
    """net8's module: a residual conv net sized for 96x96 faces and a CPU.

    Each stage halves the resolution (96 -> 48 -> 24 -> 12 -> 6) and doubles
    the channels, then one residual block; batch norm after every conv. The
    6x6 feature map is flattened into a linear output: unlike global pooling
    that keeps where on the face each feature is.
    """

    def __init__(self, width=16, output_units=30, dropout_p=0.2):
        layers = OrderedDict()
        channels = 1
        for i, out in enumerate((width, 2 * width, 4 * width, 8 * width), 1):
            layers[f'stage{i}'] = nn.Sequential(_conv_bn(channels, out, stride=2),
                                                ResidualBlock(out))
            channels = out
        layers['dropout'] = nn.Dropout(dropout_p)
        layers['output'] = nn.Linear(channels * 6 * 6, output_units)
        super().__init__(layers)
        self.input_shape = (1, IMAGE_SIZE, IMAGE_SIZE)
        nn.init.zeros_(self.output.weight)  # start from the mean face
        nn.init.zeros_(self.output.bias)

    def forward(self, x):
        for name, layer in self.named_children():
            x = layer(x.flatten(1) if name == 'output' else x)
        return x


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

NETS = OrderedDict((name, globals()[name]) for name in
                   ('net1', 'net2', 'net3', 'net4', 'net5', 'net6', 'net7', 'net8'))


# --- Predictions and the submission ---

def predict_keypoints(model, X):
    """Keypoints in pixels (DataFrame, one column per target) predicted by a
    net or by specialists, for X scaled as load2d() scales it."""
    nets = model.values() if isinstance(model, dict) else [model]
    parts = []
    for net in nets:
        shaped = X.reshape((-1,) + tuple(net.module_.input_shape))
        parts.append(pd.DataFrame(net.predict(shaped) * 48 + 48,
                                  columns=getattr(net, 'columns_', COLUMNS)))
    return pd.concat(parts, axis=1)


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
        raise KfkdError(f'{lookup_path}: FeatureName {name!r} is {what}')
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


# --- The command line ---

COMPETITION = 'facial-keypoints-detection'


def resolve_device(name):
    """'auto' (a GPU if there is one), 'cpu', 'cuda' or 'cuda:N', checked."""
    if name == 'auto':
        return DEVICE
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KfkdError(f"--device {name}: not a device; use auto, cpu or cuda") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise KfkdError(f'--device {name}: no CUDA GPU is available to this PyTorch '
                        f'({torch.__version__}); use --device cpu, or auto to take a GPU '
                        f'only when there is one')
    if device.type not in ('cpu', 'cuda'):
        raise KfkdError(f'--device {name}: kfkd runs on cpu or cuda')
    return name


def training_data(net, data_dir, groups=None):
    """The training data the way `net` takes it: flat for net1, images
    otherwise; every row if its loss skips missing targets, else complete rows.
    With `groups`, validation holds out about 20% of the groups (GroupSplit)."""
    every_row = getattr(net.criterion, 'handles_missing', False)
    loader = load if len(net.module_.input_shape) == 1 else load2d
    X, y, *rest = loader(data_dir=data_dir, dropna=not every_row, groups=groups)
    if groups is not None:
        net.set_params(train_split=GroupSplit(rest[0]))
    return X, y


class GroupSplit:
    """skorch's train_split that validates on about a `fraction` of the
    groups (e.g. people), whole: with several near-identical frames per
    person, holding out rows instead would flatter the validation score.

    Whether a group is held out depends on its name and `random_state` alone,
    not on which rows are loaded: net7 (complete rows), net8 (every row) and
    each specialist validate on the same people.
    """

    def __init__(self, groups, fraction=0.2, random_state=42):
        self.groups = groups
        self.fraction = fraction
        self.random_state = random_state

    def __call__(self, dataset, y=None):
        draw = {g: int.from_bytes(hashlib.blake2b(f'{self.random_state}/{g}'.encode(),
                                                  digest_size=8).digest(), 'little') / 2 ** 64
                for g in np.unique(self.groups)}
        held_out = np.array([draw[g] < self.fraction for g in self.groups])
        return (torch.utils.data.Subset(dataset, np.flatnonzero(~held_out)),
                torch.utils.data.Subset(dataset, np.flatnonzero(held_out)))


def fit(name='net8', data_dir=None, out=None, max_epochs=None, device='auto', seed=42,
        precision=None, lr=None, resume=False, time_budget=None, groups=None):
    """Train net `name` on training.csv and save it to `out`; what `kfkd fit` runs.

    Returns the trained net. Ctrl-C or SIGTERM stops cleanly with a usable
    checkpoint in `out`, which resume=True continues. `time_budget` (seconds)
    ends training in time, with the best weights; `groups` validates on
    held-out groups (see load).
    """
    device = resolve_device(device)
    out = Path(out or f'{name}.safetensors')
    if resume:
        if lr is not None:
            raise KfkdError('--lr cannot change a resumed run')
        net = load_net(out, device)
        name = net.name_
    else:
        torch.manual_seed(seed)
        net = build_net(name, device=device)
    if max_epochs is not None:
        if max_epochs < 1:
            raise KfkdError(f'--max-epochs must be at least 1, not {max_epochs}')
        net.set_params(max_epochs=max_epochs)
    if lr is not None:
        if not lr > 0:
            raise KfkdError(f'--lr must be positive, not {lr}')
        net.set_params(lr=lr)
    if precision:
        net.set_params(precision=precision)
    if time_budget is not None:
        if not time_budget > 0:
            raise KfkdError(f'--time-budget must be positive, not {time_budget}')
        net.set_params(time_budget=time_budget)
    checkpoint = Checkpoint(out, name)
    net.set_params(callbacks=list(net.callbacks or []) + [('checkpoint', checkpoint)])
    if net.initialized_:
        net.initialize_callbacks()  # set_params leaves those of an initialized net alone
    else:
        net.initialize()
    if resume:
        resume_state(net, out)
        groups = groups or net.resume_[0].get('groups')  # the same validation split
        remaining = net.max_epochs - len(net.history)
        if remaining < 1:
            raise KfkdError(f'{out}: already {len(net.history)} epochs of {net.max_epochs}; '
                            f'raise --max-epochs to train on')
        print(f'Resuming {name} at epoch {len(net.history) + 1} of {net.max_epochs}')
    X, y = training_data(net, data_dir, groups)
    net.groups_ = groups
    started = time.monotonic()
    if resume:
        net.partial_fit(X, y, epochs=remaining)
    else:
        net.partial_fit(X, y)
    if checkpoint.interrupted:
        print(f'Interrupted after epoch {len(net.history)}: {out} holds the best weights so '
              f'far. Continue with: kfkd fit --resume --out {out}', file=sys.stderr)
        raise KeyboardInterrupt
    net.name_, net.columns_ = name, tuple(COLUMNS)
    save_net(net, out, name)
    if net.diverged_:
        raise KfkdError(f'{name}: {net.diverged_}. {out} holds them.')
    valid = [row.get('valid_loss', np.nan) for row in net.history]
    best = int(np.nanargmin(valid)) if not np.isnan(valid).all() else None
    print(f'{name}: {len(net.history)} epochs in {time.monotonic() - started:.1f} s; ' +
          (f'best valid RMSE {rmse_pixels(valid[best]):.3f} px (epoch {best + 1}); '
           if best is not None else '') + f'saved {out}')
    if net.test_flip and net.train_split and best is not None:
        print(f'{name}: valid RMSE with test-time flips {validation_rmse(net, X, y):.3f} px')
    return net


def validation_rmse(net, X, y):
    """RMSE in pixels of net.predict() (test-time flips included, if the net
    has them) on the validation rows of X, over the targets that are there."""
    _, valid = net.train_split(torch.utils.data.TensorDataset(torch.as_tensor(y)))
    rows = np.asarray(valid.indices)
    return math.sqrt(np.nanmean((net.predict(X[rows]) - y[rows]) ** 2)) * 48


def demo(out='data/demo', device='auto', seed=42, n_train=7049, n_test=1783, max_epochs=None):
    """The main job on demo data: make synthetic faces (as many as Kaggle has),
    train, submit, and score the submission against the true keypoints."""
    import kfkd_demo
    out = Path(out)
    if (out / 'training.csv').exists() and not (out / 'solution.csv').exists():
        raise KfkdError(f'{out} holds data that `kfkd demo` did not make; choose another --out')
    started = time.monotonic()
    if not (out / 'solution.csv').exists():
        print(f'Making demo faces in {out} ...')
        kfkd_demo.write_demo_data(out, n_train, n_test)
    net = fit('net1', data_dir=out, out=out / 'net1.safetensors', device=device, seed=seed,
              max_epochs=max_epochs)
    submission = submit(net, data_dir=out, out=out / 'submission.csv')
    train = read(data_dir=out)[0][COLUMNS]
    lookup = pd.read_csv(out / 'IdLookupTable.csv')
    mean = pd.DataFrame({'RowId': lookup['RowId'],
                         'Location': train.mean()[lookup['FeatureName']].to_numpy()})
    ours, baseline = score(submission, out / 'solution.csv'), score(mean, out / 'solution.csv')
    print(f'\nTest RMSE of {submission}: {ours:.2f} px; predicting the training mean: '
          f'{baseline:.2f} px. ({time.monotonic() - started:.0f} s in all)')
    return ours, baseline


def predict(photos, model='net8.safetensors', out='.', device='auto'):
    """Keypoints of the faces on photos; what `kfkd predict` runs (see kfkd_photo)."""
    import kfkd_photo
    if isinstance(model, (str, Path)):
        if not Path(model).exists():
            raise KfkdError(f'{model}: no such model file. Train one with `kfkd fit`, or name '
                            f'one with --model (`kfkd demo` leaves data/demo/net1.safetensors)')
        model = read_model(model, resolve_device(device))
    missing = [p for p in photos if not Path(p).is_file()]
    if missing:
        raise KfkdError(f'{missing[0]}: no such photo')
    return kfkd_photo.predict_photos(model, photos, out)


def download(data_dir=None):
    """Fetch the competition's files from Kaggle into `data_dir` (needs `kaggle`)."""
    import tempfile
    data_dir = data_path(data_dir)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from kaggle.api.kaggle_api_extended import KaggleApi  # prints when unconfigured
    except ImportError:
        raise KfkdError("downloading needs Kaggle's package: pip install 'kfkd[kaggle]'") from None
    api = KaggleApi()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            api.authenticate()
    except (SystemExit, Exception):
        raise KfkdError('no Kaggle credentials: create an API token on '
                        'https://www.kaggle.com/settings and save it as ~/.kaggle/kaggle.json '
                        '(or set KAGGLE_USERNAME and KAGGLE_KEY)') from None
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        print(f'Downloading {COMPETITION} into {data_dir} ...')
        try:
            api.competition_download_files(COMPETITION, path=tmp, quiet=False)
        except Exception as e:
            status = getattr(getattr(e, 'response', None), 'status_code', None)
            if status in (401, 403):
                raise KfkdError(f'Kaggle refused the download ({status}): accept the '
                                f"competition's rules first at https://www.kaggle.com/c/"
                                f'{COMPETITION}/rules') from None
            raise KfkdError(f'download failed: {e}') from None
        unpack_competition(Path(tmp) / f'{COMPETITION}.zip', data_dir)


def unpack_competition(archive, data_dir):
    """Place the competition zip's files in `data_dir`: training.zip and
    test.zip stay zipped (load reads them as they are), the CSVs come out."""
    import zipfile
    wanted = ('training.zip', 'test.zip', 'IdLookupTable.csv', 'SampleSubmission.csv')
    try:
        with zipfile.ZipFile(archive) as z:
            names = {Path(n).name: n for n in z.namelist()}
            missing = [w for w in wanted if w not in names and w[:-4] + '.csv' not in names]
            if missing:
                raise KfkdError(f'{archive}: lacks {", ".join(missing)}')
            for want in wanted:
                member = names.get(want) or names[want[:-4] + '.csv']
                with kfkd_io.atomic_write(data_dir / Path(member).name) as f:
                    f.write(z.read(member))
    except zipfile.BadZipFile as e:
        raise KfkdError(f'{archive}: not a readable zip file ({e})') from None
    print(f'Kaggle files are in {data_dir}: ' + ', '.join(sorted(p.name for p in data_dir.iterdir()
                                                           if not p.name.startswith('.'))))


def _save_figure(fig, out):
    with kfkd_io.atomic_write(out) as f:
        fig.savefig(f, format='png', dpi=100, bbox_inches='tight')
    print(f'Wrote {out}')


def plot(kind, files=(), data_dir=None, out=None, device='auto'):
    """`kfkd plot`: learning curves of model files, predictions of a model on
    test faces, or the flip illustration; written as a PNG."""
    if kind == 'curves':
        if not files:
            raise KfkdError('plot curves: name one or more model files')
        fig = plot_learning_curves(*files)
    elif kind == 'samples':
        if len(files) != 1:
            raise KfkdError('plot samples: name one model file')
        X, _ = load2d(test=True, data_dir=data_dir)
        fig = plot_samples(read_model(files[0], resolve_device(device)), X)
    elif kind == 'flip':
        X, y = load2d(data_dir=data_dir)
        fig = plot_flip(X[0], y[0])
    else:
        raise KfkdError(f'plot: unknown picture {kind!r}; choose curves, samples or flip')
    _save_figure(fig, Path(out or f'{kind}.png'))


def _parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--debug', action='store_true', help='show tracebacks of errors')
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument('--data', metavar='DIR', help='folder with training.csv/test.csv '
                      '(or Kaggle\'s .zip files) and IdLookupTable.csv; default $KFKD_DATA '
                      'or ./data')
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument('--device', default='auto', help='auto (a GPU if there is one), '
                        'cpu, cuda or cuda:N (default: auto)')
    training = argparse.ArgumentParser(add_help=False)
    training.add_argument('--precision', choices=('auto', 'fp32', 'bf16'),
                          help='bf16 autocast or fp32 (default auto: bf16 where the hardware '
                               'has it)')

    parser = argparse.ArgumentParser(
        prog='kfkd', parents=[common],
        description='Facial keypoint detection, after Daniel Nouri\'s tutorial. '
                    'Start with `kfkd demo`.')
    parser.add_argument('--version', action='version', version=f'kfkd {__version__}')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)

    groups_help = ('validate on about 20%% of the groups (e.g. people), held out whole: '
                   'a column of training.csv, or a CSV file of row,group (in --data or as '
                   'given)')

    def command(name, help, parents=()):
        return commands.add_parser(name, aliases=[name.replace('_', '-')] if '_' in name else [],
                                   help=help, description=help, parents=[common, *parents])

    p = command('fit', 'train a net on training.csv and save it', (data, device, training))
    p.add_argument('--net', default='net8', choices=list(NETS),
                   help="net1-net7: the tutorial's nets; net8 (default): one net from every "
                        'label, with augmentation (see README)')
    p.add_argument('--out', metavar='FILE', help='model file to write (default: NET.safetensors)')
    p.add_argument('--max-epochs', type=int, metavar='N', help="override the net's max_epochs")
    p.add_argument('--lr', type=float, help="override the net's (first) learning rate")
    p.add_argument('--seed', type=int, default=42, help='random seed (default: 42)')
    p.add_argument('--time-budget', type=float, metavar='SECONDS',
                   help='stop training in time, keeping the best weights')
    p.add_argument('--groups', metavar='COLUMN|FILE', help=groups_help)
    p.add_argument('--resume', action='store_true',
                   help='continue the interrupted run saved in --out')
    p.set_defaults(run=lambda a: fit(a.net, a.data, a.out, a.max_epochs, a.device, a.seed,
                                     a.precision, a.lr, a.resume, a.time_budget, a.groups))

    p = command('fit_specialists', 'train the six specialists of SPECIALIST_SETTINGS, '
                'optionally pre-trained from a net, and save them in one file',
                (data, device, training))
    p.add_argument('--pretrain', metavar='MODEL',
                   help='model file from kfkd fit (net6/net7) to start each specialist from')
    p.add_argument('--out', metavar='FILE', default='specialists.safetensors',
                   help='specialists file to write (default: specialists.safetensors)')
    p.add_argument('--max-epochs', type=int, metavar='N',
                   help='train each specialist for N epochs instead of int(4e6 / rows)')
    p.add_argument('--epochs-scale', type=float, default=1.0, metavar='F',
                   help='scale the int(4e6 / rows) rule by F (default: 1)')
    p.add_argument('--jobs', type=int, default=1, metavar='N',
                   help='train N specialists at once, in separate processes (default: 1)')
    p.add_argument('--dask', metavar='ADDRESS',
                   help="run the jobs on a Dask cluster: a scheduler address, or 'local'")
    p.add_argument('--seed', type=int, default=42, help='random seed (default: 42)')
    p.add_argument('--groups', metavar='COLUMN|FILE', help=groups_help)
    p.add_argument('--resume', action='store_true',
                   help='train only the specialists that --out does not hold yet')
    p.set_defaults(run=lambda a: fit_specialists(a.pretrain, a.data, a.out, a.max_epochs,
                                                 a.epochs_scale, a.jobs, a.device, a.seed,
                                                 a.resume, a.dask, groups=a.groups,
                                                 precision=a.precision))

    p = command('submit', "predict test.csv and write Kaggle's RowId,Location submission",
                (data, device))
    p.add_argument('model', metavar='MODEL', help='a model or specialists file')
    p.add_argument('--out', metavar='FILE',
                   help='submission to write (default: submission-TIMESTAMP.csv)')
    p.set_defaults(run=lambda a: submit(read_model(a.model, resolve_device(a.device)),
                                        a.data, a.out))

    p = command('predict', 'find the faces on photos (jpg, png, any size) and predict their '
                'keypoints: writes keypoints.csv, keypoints.json and an overlay PNG per photo',
                (device,))
    p.add_argument('photos', nargs='+', metavar='PHOTO')
    p.add_argument('--model', metavar='FILE', default='net8.safetensors',
                   help='model or specialists file (default: net8.safetensors)')
    p.add_argument('--out', metavar='DIR', default='.', help='where to write (default: .)')
    p.set_defaults(run=lambda a: predict(a.photos, a.model, a.out, a.device))

    p = command('demo', 'make synthetic demo faces, train on them, submit and score: '
                'the whole job in a few minutes', (device,))
    p.add_argument('--out', metavar='DIR', default='data/demo',
                   help='folder for the demo data and results (default: data/demo)')
    p.set_defaults(run=lambda a: demo(a.out, a.device))

    p = command('download', "fetch the competition's files from Kaggle (pip install "
                "'kfkd[kaggle]' and a Kaggle API token needed)", (data,))
    p.set_defaults(run=lambda a: download(a.data))

    p = command('plot', 'draw a picture as PNG: learning curves of model files, '
                'a model\'s predictions on test faces, or the flip illustration', (data, device))
    p.add_argument('kind', choices=('curves', 'samples', 'flip'))
    p.add_argument('files', nargs='*', metavar='FILE', help='model files')
    p.add_argument('--out', metavar='PNG', help='picture to write (default: KIND.png)')
    p.set_defaults(run=lambda a: plot(a.kind, a.files, a.data, a.out, a.device))

    p = command('plot_learning_curves', 'learning curves of model or specialists files, '
                'as PNG (the tutorial\'s command)')
    p.add_argument('files', nargs='+', metavar='FILE')
    p.add_argument('--out', metavar='PNG', default='learning_curves.png')
    p.set_defaults(run=lambda a: _save_figure(plot_learning_curves(*a.files), Path(a.out)))
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        args.run(args)
        return 0
    except KfkdError as e:
        if args.debug:
            raise
        print(f'kfkd: error: {e}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print('kfkd: interrupted', file=sys.stderr)
        return 130
    except Exception as e:  # a bug, or a failure outside kfkd: say so in one line
        if args.debug:
            raise
        print(f'kfkd: error: {type(e).__name__}: {e} (run with --debug for details)',
              file=sys.stderr)
        return 1


if __name__ == '__main__':
    import kfkd  # run as the importable module, so parallel jobs can find its functions
    sys.exit(kfkd.main())
