"""The engine under kfkd.py: what nolearn.lasagne and Lasagne were to the tutorial.

The tutorial's script imported its machinery (NeuralNet, BatchIterator,
the layers, the printing of layers and epochs) and held only its own nets.
This module is that machinery for kfkd.py, on PyTorch and skorch:

  DEVICE, resolve_device, native_bf16,    where and in which precision to train,
  tune_allocator                          and glibc's allocator for training
  DenseLayer, Conv2DLayer, MaxPool2DLayer,
  DropoutLayer                            Lasagne's layers as PyTorch modules
  to_pixels, to_net_scale                 keypoints between pixels and the nets' -1..1
  mirror_pairs, keypoint_sides, mirror,
  flip_averaged                           mirrored faces: images and targets, one home;
                                          test-time flips
  moved, whole_pixels, shift_averaged     test-time shifts
  measure_mirror_axis, MirrorAxis         the mirror axis a data set's labels follow
  BatchIterator                           batches sliced from data on the device
  EpochLog, KeypointNet, progress_bar     skorch's regressor, printing as nolearn did
  copy_matching_weights, GroupSplit       pre-training; validation on held-out groups
  current_setting, unknown_settings       a net's parameters, by set_params' names
  NETS, save_net, read_model, load_net,   model files: safetensors and JSON, no pickle;
  resume_state, Checkpoint                checkpoints and resuming
  fit_in_jobs, dask_backend, dask_client  several nets trained at once, or on Dask
  predict_keypoints                       keypoints in pixels from a net or specialists,
                                          or the mean of several models'

It stands alone so that kfkd.py reads as the tutorial, and so that kfkd_photo
and the command line can use it without importing the tutorial's nets. It
imports no kfkd module but kfkd_io; NETS says which module defines each net a
model file can name, imported when a file needs it.
"""
import collections
import contextlib
import ctypes
import functools
import hashlib
import importlib
import inspect
import io
import json
import math
import os
import signal
import sys
import time
import warnings
from collections import OrderedDict

import numpy as np
import pandas as pd
import skorch
import torch
import torch.nn.functional as F
from sklearn.base import clone
from skorch.callbacks import Callback, EpochTimer
from skorch.dataset import ValidSplit
from torch import nn
from tqdm import TqdmWarning
with warnings.catch_warnings():  # Jupyter without ipywidgets: plain text, without a warning
    warnings.simplefilter('ignore', TqdmWarning)
    from tqdm.auto import tqdm

import kfkd_io
from kfkd_io import COLUMNS, IMAGE_SIZE, KfkdError

__version__ = '0.1.0'


# --- Where to train, and in which precision ---

@functools.cache
def tune_allocator():
    """Stop glibc from handing big buffers back to the OS after every step.

    PyTorch frees and re-allocates its activation buffers each batch; glibc
    returns them to the OS with munmap and page-faults them back in, which made
    conv training 2.5x slower on the CPU. Keeping freed memory for reuse fixes it.
    It holds for the whole process, so it is done once, when a net first starts
    training (KeypointNet.on_train_begin), not when kfkd is imported.
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


DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


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


@functools.lru_cache
def native_bf16(device):
    """Whether `device` computes in bfloat16 natively (so autocast pays off)."""
    if torch.device(device).type == 'cuda':
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu  # private helpers; absent in some builds: then assume no
    return any(getattr(cpu, name, lambda: False)() for name in
               ('_is_avx512_bf16_supported', '_is_amx_tile_supported'))


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
    """Lasagne's Conv2DLayer: a convolution, 'valid' (no padding) unless
    `pad` says otherwise, then ReLU (nonlinearity=None: none)."""

    def __init__(self, in_channels, num_filters, filter_size, nonlinearity=F.relu, stride=1,
                 pad=0):
        super().__init__(in_channels, num_filters, filter_size, stride, pad)
        self.nonlinearity = nonlinearity
        _glorot(self)

    def forward(self, x):
        x = super().forward(x)
        return x if self.nonlinearity is None else self.nonlinearity(x)


class DropoutLayer(nn.Dropout):
    """Lasagne's DropoutLayer: zeroes each input with probability `p` while
    training (scaling the rest by 1 / (1 - p)); passes inputs through otherwise."""


class MaxPool2DLayer(nn.MaxPool2d):
    """Max-pooling (2x2 unless `pool_size`) that also applies the ReLU of the
    conv layer before it.

    relu(max(x)) == max(relu(x)), in value and in gradient, so rectifying
    after the pool computes the same net while touching 4x fewer values: 20%
    faster training on the CPU. ConvNet's conv layers leave their ReLU to it.
    """

    def __init__(self, pool_size=2, stride=None, ceil_mode=False):
        super().__init__(pool_size, stride, ceil_mode=ceil_mode)

    def forward(self, x):
        return F.relu(super().forward(x))


# --- Keypoints: pixels and the nets' scale; mirrored faces ---

HALF = IMAGE_SIZE / 2  # the nets' targets are keypoints scaled to -1..1 across the face


def to_net_scale(pixels):
    """Keypoint coordinates in pixels (0-96) as the nets' targets: -1..1."""
    return (pixels - HALF) / HALF


def to_pixels(y):
    """The nets' targets (-1..1) as keypoint coordinates in pixels (0-96)."""
    return y * HALF + HALF


# Where a mirrored face's keypoints go: x -> MIRROR_AXIS - x, in pixels. The
# tutorial's 96 fits labels that count x from the image's left edge (pixel i
# spans i..i+1); data labelled otherwise has its own axis (KeypointNet's
# mirror_axis).
MIRROR_AXIS = 96.0


def mirror_pairs(columns):
    """The (left, right) pairs of target columns that trade places when a face
    is mirrored, from their names: left_eye_center_x <-> right_eye_center_x."""
    index = {name: i for i, name in enumerate(columns)}
    return [(i, index[name.replace('left', 'right')]) for i, name in enumerate(columns)
            if 'left' in name and name.replace('left', 'right') in index]


def keypoint_sides(columns):
    """Each keypoint's side of the face, from the name of its x column: 'left'
    (the subject's left: the image's right), 'right' or 'middle'."""
    return ['left' if 'left' in name else 'right' if 'right' in name else 'middle'
            for name in list(columns)[0::2]]


def mirror(X=None, y=None, pairs=(), axis=MIRROR_AXIS):
    """Faces X and their targets y mirrored left to right: (X, y), either may be None.

    Images, shaped (..., 96, 96), have their columns reversed. Each target x
    goes to `axis` - x (in pixels) and the columns of each pair in `pairs`
    trade places. Tensors or arrays; the inputs are not changed.
    """
    if X is not None:
        if tuple(X.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f'mirror needs faces shaped (..., {IMAGE_SIZE}, {IMAGE_SIZE}), '
                             f'not {tuple(X.shape)}: reversing flat rows of pixels would turn '
                             f'the faces upside down too (reshape them as load2d does)')
        X = X.flip(-1) if torch.is_tensor(X) else np.ascontiguousarray(X[..., ::-1])
    if y is not None:
        order = list(range(y.shape[1]))
        for a, b in pairs:
            order[a], order[b] = b, a
        y = y[:, order]
        y[:, 0::2] = (axis - IMAGE_SIZE) / HALF - y[:, 0::2]
    return X, y


def flip_averaged(predict, X, pairs, axis):
    """Test-time flips: the mean of predict(X) and the predictions for the
    mirrored faces, mirrored back (`pairs` and `axis` as mirror takes them).
    Arrays or tensors, as `predict` takes them."""
    y = predict(X)
    mirrored, _ = mirror(X)
    _, back = mirror(y=predict(mirrored), pairs=pairs, axis=axis)
    return (y + back) / 2


def moved(X, dx, dy):
    """Faces X, shaped (..., 96, 96), moved dx whole pixels right and dy down,
    the edge pixels repeated into the space they leave (an array)."""
    if tuple(X.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f'moving faces needs them shaped (..., {IMAGE_SIZE}, {IMAGE_SIZE}), '
                         f'not {tuple(X.shape)}')
    padded = np.pad(X, [(0, 0)] * (X.ndim - 2) + [(max(dy, 0), max(-dy, 0)),
                                                  (max(dx, 0), max(-dx, 0))], mode='edge')
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]


def whole_pixels(pixels):
    """Test-time shifts as an int: whole pixels, 0 or more, or ValueError."""
    if pixels != int(pixels) or pixels < 0:
        raise ValueError(f'test-time shifts are whole pixels, 0 or more, not {pixels!r}')
    return int(pixels)


def shift_averaged(predict, X, pixels):
    """Test-time shifts: the mean of predict() for nine views of the faces X,
    moved by -pixels, 0 and +pixels along x and along y, each view's
    keypoints moved back. A net that learned on moved faces errs a little
    differently in each view, and the mean is closer than any of them."""
    pixels, views = whole_pixels(pixels), []
    for dy in (-pixels, 0, pixels):
        for dx in (-pixels, 0, pixels):
            y = np.array(predict(moved(X, dx, dy)), dtype=np.float32)
            y[:, 0::2] -= dx / HALF
            y[:, 1::2] -= dy / HALF
            views.append(y)
    return np.mean(views, axis=0)


# --- The mirror axis of a data set, measured ---

class MirrorAxis(collections.namedtuple('MirrorAxis', 'axis uncertainty faces per_pair')):
    """x -> axis - x maps a face's keypoints (pixels) onto its mirror image's,
    give or take `uncertainty`; measured on `faces` faces, and for each
    left/right pair (or middle keypoint) on its own: `per_pair`."""

    def __str__(self):
        return f'x -> {self.axis:.2f} - x (+- {self.uncertainty:.2f}, from {self.faces} faces)'


AXIS_METHOD = 1  # part of the cache key: raise when measure_mirror_axis changes


def measure_mirror_axis(X, y, columns=COLUMNS, use_cache=True):
    """Where mirroring should put the keypoints of faces X (n, 1, 96, 96) with
    targets y (the nets' scale; NaN where missing): the MirrorAxis of this data.

    Labels count x from the image's left edge (pixel i spans i..i+1: axis 96,
    the tutorial's), from the first pixel's centre (95), from 1 (97), or from
    wherever cropping and resizing put them. The labels tell: each keypoint's
    mean image patch (sampled every 0.05 px across, around its labels) is, in a
    mirror, its left/right partner's patch (a middle keypoint's own), shifted
    by axis - 96. That shift, found where the mirrored patches match best over
    all pairs, is the measurement; the spread of the pairs' own shifts gives its
    uncertainty. Labels moved half a pixel move the axis by one. It takes
    seconds and is cached (in kfkd's cache folder, keyed by the data's bytes).
    """
    X = np.ascontiguousarray(X, dtype=np.float32).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    y = np.ascontiguousarray(y, dtype=np.float32)
    key = hashlib.blake2b(f'{AXIS_METHOD}/{",".join(columns)}'.encode(), digest_size=16)
    key.update(X.data)
    key.update(y.data)
    cache = kfkd_io.cache_dir() / f'mirror-axis-{key.hexdigest()}.json'
    if use_cache and cache.is_file():
        with contextlib.suppress(OSError, ValueError, TypeError):
            return MirrorAxis(**json.loads(cache.read_text()))
    measured = _measure_mirror_axis(X, to_pixels(y), columns)
    if use_cache:
        with contextlib.suppress(OSError, KfkdError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            with kfkd_io.atomic_write(cache, 'w') as f:
                json.dump(measured._asdict(), f)
    return measured


def _measure_mirror_axis(X, points, columns, half_window=3, step=0.05, most=6.0):
    names = [name[:-2] for name in list(columns)[0::2]]
    pairs = [(a // 2, b // 2) for a, b in mirror_pairs(columns) if a % 2 == 0]
    pairs += [(k, k) for k, side in enumerate(keypoint_sides(columns)) if side == 'middle']
    window = round(half_window / step)  # samples each side of the middle of a comparison
    reach = round(most / 2 / step) + window  # samples each side of a label, across
    dx = torch.arange(-reach, reach + 1) * step
    dy = torch.arange(-half_window, half_window + 1, dtype=torch.float32)
    sums = torch.zeros(len(names), len(dy), len(dx))
    counts = torch.zeros(len(names))
    faces = torch.as_tensor(X)
    faces = ((faces - faces.mean((1, 2), keepdim=True)) /
             faces.std((1, 2), keepdim=True).clamp(min=1e-6))[:, None]
    labels = torch.as_tensor(points, dtype=torch.float32).reshape(len(X), -1, 2)
    for rows in torch.split(torch.arange(len(X)), 256):
        p = labels[rows]
        present = ~p.isnan().any(-1)
        p = p.nan_to_num(HALF)
        # grid_sample's -1..1 spans the image from edge to edge, as x from the left edge does
        gx = ((p[..., 0, None, None] + dx) / HALF - 1).expand(-1, -1, len(dy), -1)
        gy = ((p[..., 1, None, None] + dy[:, None]) / HALF - 1).expand(-1, -1, -1, len(dx))
        grid = torch.stack([gx, gy], -1).flatten(1, 2)
        patches = F.grid_sample(faces[rows], grid, align_corners=False, padding_mode='border')
        patches = patches.reshape(len(rows), len(names), len(dy), len(dx))
        sums += (patches * present[..., None, None]).sum(0)
        counts += present.sum(0)
    pairs = [(a, b) for a, b in pairs if counts[a] and counts[b]]
    if not pairs:
        raise KfkdError('measuring the mirror axis needs a keypoint on the middle line, or a '
                        'left and a right one, in the labels')
    means = sums / counts.clamp(min=1)[:, None, None]
    # Partner b's patch against a's mirrored, for a shift of 2 * half samples (the axis at
    # 96 + that shift): each compared around the point halfway between them, so that
    # labels moved by d move the best shift by exactly 2 d.
    halves = torch.arange(-round(most / 2 / step), round(most / 2 / step) + 1)
    middle = torch.arange(-window, window + 1)
    mismatch = torch.stack([torch.stack([
        ((means[b][:, reach - half + middle] - means[a].flip(-1)[:, reach + half + middle]) ** 2
         ).mean() for half in halves]) for a, b in pairs])

    def best(curve):
        i = int(torch.clamp(torch.argmin(curve), 1, len(curve) - 2))
        below, at, above = curve[i - 1:i + 2].tolist()
        bend = below - 2 * at + above
        vertex = 0.5 * (below - above) / bend if bend > 0 else 0
        return IMAGE_SIZE + 2 * step * (int(halves[i]) + vertex)
    per_pair = {names[a] if a == b else f'{names[a]}/{names[b]}': best(curve)
                for (a, b), curve in zip(pairs, mismatch)}
    spread = float(np.std(list(per_pair.values()), ddof=1)) if len(pairs) > 1 else float('nan')
    return MirrorAxis(best(mismatch.sum(0)), spread / math.sqrt(len(pairs)), len(X), per_pair)


# --- The net: skorch's regressor, with what nolearn printed and a fast data path ---

class BatchIterator:
    """Mini-batches sliced from tensors that already live on the device.

    nolearn's name, skorch's `iterator_train` slot. Each epoch slices the
    data set held on the device, in a new random order if `shuffle`: no
    DataLoader workers, no per-sample collate, no host-to-device copy per
    batch. Subclasses change batches in `transform(Xb, yb)`; those that mirror
    faces mirror them about `mirror_axis`, which KeypointNet sets to its own.
    """
    mirror_axis = MIRROR_AXIS

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


def progress_bar(shown=True, **kwargs):
    """tqdm's bar on stderr, shown on a terminal (not in a log file), or as
    Jupyter's widget where tqdm.auto found one."""
    in_jupyter = tqdm.__module__ == 'tqdm.notebook'
    return tqdm(file=sys.stderr, disable=not shown or (False if in_jupyter else None), **kwargs)


class EpochLog(Callback):
    """One row per epoch, as nolearn printed them, plus the validation RMSE in
    pixels (sqrt(loss) * HALF), under a progress bar with an ETA when stderr is
    a terminal. The best losses so far are marked with a *.
    """

    def on_train_begin(self, net, **kwargs):
        self.best_train_ = self.best_valid_ = np.inf
        for row in net.history:
            self._mark(row)
        self.bar_ = progress_bar(bool(net.verbose), total=net.max_epochs,
                                initial=len(net.history), unit='epoch', leave=False,
                                dynamic_ncols=True)
        if net.verbose:
            tqdm.write('  epoch    train loss    valid loss    train/val    valid RMSE      dur\n'
                       '-------  ------------  ------------  -----------  ------------  -------')

    def _mark(self, row):
        marks = []
        for key, best in (('train_loss', 'best_train_'), ('valid_loss', 'best_valid_')):
            value = row.get(key, np.nan)
            marks.append('*' if value < getattr(self, best) else ' ')
            if value < getattr(self, best):
                setattr(self, best, value)
        return marks

    def on_epoch_end(self, net, **kwargs):
        row = net.history[-1]
        self.bar_.update()
        if not net.verbose:
            return
        train, valid = row['train_loss'], row.get('valid_loss', np.nan)
        train_mark, valid_mark = self._mark(row)
        tqdm.write(f'{row["epoch"]:7d}  {train:11.6f}{train_mark}  {valid:11.6f}{valid_mark}  '
                   f'{train / valid:11.5f}  {rmse_pixels(valid):9.3f} px  {row["dur"]:6.2f}s')

    def on_train_end(self, net, **kwargs):
        self.bar_.close()


def nolearn_history(history):
    """skorch's history as nolearn's train_history_: a dict per epoch with its
    epoch, train_loss, valid_loss, dur, and whether each loss was the best yet."""
    rows, best = [], {'train_loss': np.inf, 'valid_loss': np.inf}
    for epoch, row in enumerate(history, 1):
        info = {'epoch': epoch, 'train_loss': row['train_loss'],
                'valid_loss': row.get('valid_loss', np.nan), 'dur': row['dur']}
        for key in best:
            info[f'{key}_best'] = info[key] <= best[key]
            best[key] = min(best[key], info[key])
        rows.append(info)
    return rows


def rmse_pixels(loss):
    """The RMSE in pixels of a mean squared error on the nets' scale (to_net_scale)."""
    return math.sqrt(loss) * HALF if loss >= 0 else math.nan


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
    - `mirror_axis`: where mirrored faces' keypoints go, x -> mirror_axis - x
      in pixels, for every mirroring of its faces (the training iterator's and
      test_flip's); the tutorial's 96 by default. 'measured': measured from
      the rows it trains on (measure_mirror_axis) when fit starts, and kept.
    - `test_shifts`: predictions averaged over the faces moved that many
      whole pixels along x and y (shift_averaged; 0: none), for nets that
      learned on moved faces.
    - `train_history_`: the history as nolearn kept it, for the tutorial's plots.
    """

    def __init__(self, module, *args, precision='auto', time_budget=None, test_flip=False,
                 test_shifts=0, mirror_axis=MIRROR_AXIS, **kwargs):
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
        self.test_shifts = test_shifts
        self.mirror_axis = mirror_axis

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
        image's (mirrored back), which cancels some of a net's left/right bias;
        with test_shifts, that for nine views of the face (shift_averaged)."""
        if not (self.test_flip or self.test_shifts):
            return super().predict(X)
        X, predict = np.asarray(X), super().predict
        if self.test_flip:
            if self.mirror_axis == 'measured':
                raise ValueError("test_flip needs the mirror axis, which mirror_axis='measured' "
                                 "measures when the net is trained: train it first")
            predict = functools.partial(flip_averaged, predict,
                                        pairs=mirror_pairs(self.target_columns()),
                                        axis=self.mirror_axis)
        return shift_averaged(predict, X, self.test_shifts) if self.test_shifts else predict(X)

    def target_columns(self):
        """The names of the net's targets: `columns_` where training set them
        (a specialist's), else Kaggle's 30 columns."""
        columns = getattr(self, 'columns_', None) or COLUMNS
        outputs = self.module_.output.out_features
        if len(columns) != outputs:
            raise ValueError(f'the net has {outputs} outputs but no columns_ naming them '
                             f'(it has {len(columns)}): set columns_ to its target columns')
        return columns

    def get_iterator(self, dataset, training=False):
        iterator = super().get_iterator(dataset, training)
        if isinstance(iterator, BatchIterator):  # its mirrored faces go where the net's do
            iterator.mirror_axis = self.mirror_axis
        return iterator

    @property
    def train_history_(self):
        return nolearn_history(self.history)

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
            self.last_good_weights_ = copy_weights(self.module_)
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
        whole_pixels(self.test_shifts)  # now, not when training is over
        tune_allocator()
        self.diverged_ = None
        if self.verbose and not len(self.history):
            print(self.layer_table())
        if self.mirror_axis == 'measured':
            self.mirror_axis = self.measured_mirror_axis(X, y).axis

    def measured_mirror_axis(self, X, y):
        """The MirrorAxis of the rows of X, y the net trains on (not those it
        validates on), printed."""
        if skorch.utils.is_dataset(X) or y is None:
            raise ValueError("mirror_axis='measured' needs the faces and their targets as "
                             "arrays (X, y), to measure the axis on")
        rows = np.arange(len(y))
        if self.train_split:
            rows, _ = self.train_split(torch.utils.data.TensorDataset(torch.as_tensor(rows)))
            rows = np.asarray(rows.indices)
        axis = measure_mirror_axis(np.asarray(X)[rows], np.asarray(y)[rows],
                                   self.target_columns())
        if self.verbose:
            print(f'Mirror axis, measured on the training faces: {axis}')
        return axis

    def on_train_end(self, net, X=None, y=None, **kwargs):
        # Needed only while training, and each as big as the weights
        self.last_good_weights_ = None
        self.module_.zero_grad(set_to_none=True)

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
        widths = [max(len(str(row[i])) for row in rows) for i in range(3)]
        lines = [f'# Neural network with {total:,} learnable parameters', '']
        lines += [f'  {name:{widths[0]}s}  {kind:{widths[1]}s}  {str(shape):{widths[2]}s}  '
                  f'produces {outputs:7d} outputs'
                  f'{f"  ({params:,} parameters)" if params else ""}'
                  for name, kind, shape, outputs, params in rows]
        return '\n'.join(lines) + '\n'


# --- Weights: the best to keep, and pre-training ---

def copy_weights(module):
    """A copy of the module's weights, safe from further training."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


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


# --- Validation on held-out groups ---

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


# --- Model files ---

# The nets a model file can name, and the module that defines each: the
# tutorial's in kfkd.py, kfkd's own in kfkd_beyond.py. A file holds a net's
# name, settings and weights, never code; reading one imports the module that
# defines its net, so a file reads whatever was imported before.
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
    """The net's JSON-able parameters: what, with its name, rebuilds it."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str))
    return {key: value for key, value in net.get_params(deep=False).items()
            if key not in ('device', 'verbose') and plain(value)}


def build_net(name, settings=None, device=None):
    """A fresh net by name, with `settings` (from _settings) applied."""
    net = clone(registered_net(name))
    if settings:
        net.set_params(**settings)
    if device:
        net.set_params(device=device)
    return net


def model_entry(name, net, columns, weights):
    """What a model file holds of a net: (JSON-able entry, weights)."""
    return {'name': name, 'columns': list(columns), 'settings': _settings(net),
            'history': net.history.to_list() if net.history else []}, weights


def save_net(net, path, name, columns=COLUMNS, resume=False):
    """Write `net` to `path`: its weights (the best epoch's under
    EarlyStopping), name, settings, target columns, training history and the
    groups it validated on (see GroupSplit), if any.

    With `resume`, also what continuing the run needs: the current weights,
    the optimizer's state and the random number generators' states.
    """
    meta, weights = model_entry(name, net, columns, kept_weights(net))
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
    # those from before test-time shifts predict as they did
    entry['settings'].setdefault('mirror_axis', MIRROR_AXIS)
    entry['settings'].setdefault('test_shifts', 0)
    unknown = unknown_settings(net, entry['settings'])
    if unknown:
        raise KfkdError(f'{path}: {unknown[0]} is not a setting of net {name} in this kfkd; '
                        f'train it again with this kfkd, or use the kfkd that wrote it')
    try:
        net.set_params(**entry['settings']).initialize()
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
    net.history = skorch.history.History(entry['history'])
    net.name_, net.columns_ = name, tuple(entry['columns'])
    if len(net.columns_) != net.module_.output.out_features:
        raise KfkdError(f'{path}: lists {len(net.columns_)} columns for a net with '
                        f'{net.module_.output.out_features} outputs')
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
    single net also `groups_`, the --groups it validated on (or None).
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
        net.resume_ = meta.get('resume') and (meta['resume'], tensors)
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
                        f'({len(net.history)} epochs). Start a new one without --resume')
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
        entry, weights = model_entry(net.name_, net, net.columns_, kept_weights(net))
        meta['models'].append(entry)
        tensors.update({f'{i}/weights/{k}': v for k, v in weights.items()})
    kfkd_io.write_model_file(path, meta, tensors)


class Checkpoint(Callback):
    """Saves the run as it goes, so that nothing is lost.

    After the first epoch, then every `every` seconds, and when Ctrl-C
    (SIGINT) or SIGTERM asks training to stop, it writes `path` (atomically)
    with the weights the net would keep and what `kfkd fit --resume` needs to
    go on. The first signal stops training after the current epoch; a second
    one stops at once, leaving the last checkpoint. `interrupted_` tells
    whether a signal ended the run.
    """

    def __init__(self, path, name, columns=COLUMNS, every=60):
        self.path = path
        self.name = name
        self.columns = columns
        self.every = every

    def on_train_begin(self, net, **kwargs):
        self.last_save_, self.stop_requested_, self.interrupted_ = -np.inf, False, False
        self.handlers_ = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.handlers_[sig] = signal.signal(sig, self._request_stop)
        except ValueError:  # not in the main thread: no signals to catch
            pass

    def _request_stop(self, signum, frame):
        if self.stop_requested_:
            self.interrupted_ = True
            raise KeyboardInterrupt
        self.stop_requested_ = True
        print(f'\nStopping after this epoch and saving {self.path} '
              f'(press Ctrl-C again to stop at once).', file=sys.stderr)

    def on_epoch_end(self, net, **kwargs):
        if self.stop_requested_ or time.monotonic() - self.last_save_ > self.every:
            save_net(net, self.path, self.name, self.columns, resume=True)
            self.last_save_ = time.monotonic()
        if self.stop_requested_:
            self.interrupted_ = True
            raise KeyboardInterrupt

    def on_train_end(self, net, **kwargs):
        for sig, handler in self.handlers_.items():
            signal.signal(sig, handler)


# --- Several nets at once: processes, GPUs, a Dask cluster ---

def fit_in_jobs(fit_one, tasks, jobs=1, dask=None, device='cpu'):
    """Train a net for each (seed, task) of `tasks`: fit_one(task, device,
    verbose) returns it trained. Yields each as it finishes, rebuilt here from what its
    model file would hold, under a progress bar, with a line on how it went.

    With `jobs` > 1 that many train at once, in separate processes (joblib):
    the cores are shared out so that they are not oversubscribed, each takes a
    GPU of its own where there are several, and each trains quietly. With
    `dask` (a scheduler's address, or 'local' for a cluster started here) the
    jobs run on a Dask cluster instead. Each task's torch seed is its own, so
    one job or many give the same nets.
    """
    import joblib
    parallel = jobs > 1 or dask
    threads = max(1, (os.cpu_count() or 1) // jobs) if parallel and not dask else None
    with dask_backend(dask), progress_bar(total=len(tasks), unit='net') as bar:
        if parallel:
            results = joblib.Parallel(n_jobs=jobs, return_as='generator_unordered')(
                joblib.delayed(_job)(fit_one, i, seed, task, device, threads, verbose=False)
                for i, (seed, task) in enumerate(tasks))
        else:
            results = (_job(fit_one, i, seed, task, device, threads, verbose=True)
                       for i, (seed, task) in enumerate(tasks))
        for entry, weights, seconds, notes in results:
            net = restore_net(entry, weights, f'the job training {entry["name"]}', device)
            vars(net).update(notes)
            bar.update()
            tqdm.write(_job_line(net, seconds))
            yield net


def _job(fit_one, index, seed, task, device, threads, verbose):
    """Train one net (in a job's process, or here); returns what its model
    file would hold, which is less to send back than the whole net."""
    if threads:
        torch.set_num_threads(threads)
    if torch.device(device).type == 'cuda' and torch.cuda.device_count() > 1:
        device = f'cuda:{index % torch.cuda.device_count()}'
    torch.manual_seed(seed)
    started = time.monotonic()
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
        net = fit_one(task, device, verbose)
    if net.diverged_:
        raise KfkdError(f'{net.name_} for {", ".join(net.columns_)}: {net.diverged_}')
    entry, weights = model_entry(net.name_, net, net.columns_, kept_weights(net))
    notes = {key: getattr(net, key) for key in ('rows_', 'pretrained_') if hasattr(net, key)}
    return entry, {k: v.cpu() for k, v in weights.items()}, time.monotonic() - started, notes


def _job_line(net, seconds):
    valid = [row.get('valid_loss', np.nan) for row in net.history]
    best = int(np.nanargmin(valid))
    rows = f'{net.rows_} rows, ' if hasattr(net, 'rows_') else ''
    pretrained = getattr(net, 'pretrained_', None)
    return (f'{net.columns_[0]} ({len(net.columns_)} cols): {rows}{len(net.history)} of '
            f'{net.max_epochs} epochs, best valid RMSE {rmse_pixels(valid[best]):.3f} px '
            f'(epoch {best + 1}), {seconds:.0f} s' +
            (f'; pre-trained {", ".join(pretrained)}' if pretrained else ''))



@contextlib.contextmanager
def dask_client(address):
    """A client of the Dask cluster at `address` ('local': one started here,
    a worker process per core)."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise KfkdError("--dask needs Dask: pip install 'kfkd[dask]'") from None
    cluster = LocalCluster(processes=True, threads_per_worker=1) if address == 'local' else None
    try:
        try:
            client = Client(cluster or address)
        except OSError as e:
            raise KfkdError(f'--dask {address}: cannot reach a Dask scheduler there; start one '
                            f'(`dask scheduler`) or check the address') from e
        with client:
            yield client
    finally:
        if cluster:
            cluster.close()


@contextlib.contextmanager
def dask_backend(address):
    """joblib's dask backend on the cluster at `address` (see dask_client)."""
    if not address:
        yield
        return
    import joblib
    with dask_client(address) as client, joblib.parallel_backend('dask'):
        print(f'Training on the Dask cluster at {client.scheduler.address}')
        yield


# --- Predictions ---

def scale_pixels(pixels):
    """Pixels of 0-255 as the nets take them: float32 in [0, 1]."""
    return np.multiply(pixels, np.float32(1 / 255), dtype=np.float32)


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
                                  columns=getattr(net, 'columns_', COLUMNS)))
    return pd.concat(parts, axis=1)
