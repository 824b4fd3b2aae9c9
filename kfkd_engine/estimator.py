"""The estimator: skorch's regressor with the tutorial's defaults, nolearn's
printouts and a fast data path; its batches, its epoch log, the weights it
keeps, and validation on held-out groups."""
import copy
import functools
import hashlib
import math
import sys
import time
import warnings

import numpy as np
import skorch
import torch
from skorch.callbacks import Callback, EpochTimer
from skorch.dataset import ValidSplit
from tqdm import TqdmWarning
with warnings.catch_warnings():  # Jupyter without ipywidgets: plain text, without a warning
    warnings.simplefilter('ignore', TqdmWarning)
    from tqdm.auto import tqdm

from kfkd_engine.batches import BatchIterator, captured_step
from kfkd_engine.device import DEVICE, autocast, autocast_dtype, tune_allocator
from kfkd_engine.geometry import (HALF, MIRROR_AXIS, flip_averaged, measure_mirror_axis,
                                  mirror_pairs, shift_averaged, whole_pixels)
from kfkd_io import COLUMNS

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

    def initialize(self):
        self.bar_ = None
        return self

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
        if self.bar_ is not None:  # None: training failed before it began
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


def best_epoch(history, key='valid_loss'):
    """The index in `history` (skorch's, or a list of its rows) of the epoch
    with the lowest `key`, or None where no epoch has one (all NaN, or none)."""
    losses = np.array([row.get(key, np.nan) for row in history], dtype=float)
    return None if np.isnan(losses).all() else int(np.nanargmin(losses))


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
      the rows it trains on (measure_mirror_axis) when fit starts. The axis
      in use is the fitted attribute `mirror_axis_`.
    - `columns`: the names of its targets (default: Kaggle's 30), as
      `columns_` once initialized.
    - `test_shifts`: predictions averaged over the faces moved that many
      whole pixels along x and y (shift_averaged; 0: none), for nets that
      learned on moved faces.
    - `capture`: 'auto' (the default) records the training step as a CUDA
      graph on a GPU and replays it for every batch (kfkd_engine.batches),
      where the net's optimizer, iterator and callbacks allow; True always
      runs that step (on a CPU without a graph, the same maths: what the
      tests check), and says why where it cannot; False keeps skorch's eager
      step. Batch callbacks still run, with the batch's row numbers as
      `batch`.
    - `train_history_`: the history as nolearn kept it, for the tutorial's plots.
    """

    def __init__(self, module, *args, precision='auto', time_budget=None, test_flip=False,
                 test_shifts=0, mirror_axis=MIRROR_AXIS, columns=None, capture='auto',
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
        self.test_shifts = test_shifts
        self.mirror_axis = mirror_axis
        self.columns = columns
        self.capture = capture

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
                if self.verbose:
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
            if self.mirror_axis_ is None:
                raise ValueError("test_flip needs the mirror axis, which mirror_axis='measured' "
                                 "measures when the net is trained: train it first")
            predict = functools.partial(flip_averaged, predict,
                                        pairs=mirror_pairs(self.target_columns()),
                                        axis=self.mirror_axis_)
        return shift_averaged(predict, X, self.test_shifts) if self.test_shifts else predict(X)

    def initialize(self):
        super().initialize()
        self._initialize_targets()
        return self

    def _initialize_targets(self):
        """The fitted attributes that follow from the settings: `columns_`
        (None for a net of other than 30 outputs whose columns are not set),
        and `mirror_axis_` where it is a number (None until fit measures it)."""
        outputs = getattr(getattr(self.module_, 'output', None), 'out_features', None)
        if self.columns and len(self.columns) != outputs:
            raise ValueError(f'the net has {outputs} outputs, and {len(self.columns)} columns '
                             f'to name them: set columns to its {outputs} target columns')
        if self.columns:
            self.columns_ = tuple(self.columns)
        else:
            self.columns_ = tuple(COLUMNS) if outputs == len(COLUMNS) else None
        self.mirror_axis_ = None if self.mirror_axis == 'measured' else float(self.mirror_axis)

    def target_columns(self):
        """columns_, where the net's targets have names."""
        if self.columns_ is None:
            raise ValueError('the net\'s outputs have no columns naming them: set columns to '
                             'its target columns')
        return self.columns_

    def set_params(self, **kwargs):
        """skorch's; on an initialized net, a new mirror axis, columns or
        module are what it uses from then on, as a new learning rate is its
        optimizer's."""
        if kwargs.get('mirror_axis', 'measured') != 'measured':
            float(kwargs['mirror_axis'])  # a ValueError now, not when it is used
        super().set_params(**kwargs)
        if self.initialized_ and any(key in ('mirror_axis', 'columns') or
                                     key.startswith('module__') for key in kwargs):
            self._initialize_targets()
        return self

    def initialize_callbacks(self):
        """skorch's, on copies of the callback objects in `callbacks`, so that
        fit leaves that setting as it was (scikit-learn's rule): what they
        learn while training is in callbacks_, not in the objects given. (One
        set as callbacks__NAME, skorch's way to replace a default callback,
        is used as it is.)"""
        given = self.callbacks
        self.callbacks = _copies(given)
        try:
            return super().initialize_callbacks()
        finally:
            self.callbacks = given

    def partial_fit(self, X, y=None, classes=None, **fit_params):
        """skorch's, and on an error as well as at the end the callbacks let go
        of what they hold while training (signal handlers, progress bars)."""
        try:
            return super().partial_fit(X, y, classes, **fit_params)
        except BaseException:
            self.notify('on_train_end', X=X, y=y)
            raise

    def get_iterator(self, dataset, training=False):
        iterator = super().get_iterator(dataset, training)
        if isinstance(iterator, BatchIterator):  # its mirrored faces go where the net's do
            iterator.mirror_axis = self.mirror_axis_
        return iterator

    @property
    def train_history_(self):
        return nolearn_history(self.history)

    @property
    def _default_callbacks(self):
        return [('epoch_timer', EpochTimer()), ('print_log', EpochLog())]

    @property
    def autocast_dtype(self):
        return autocast_dtype(self.precision, self.device)

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
        with autocast(self.device, self.autocast_dtype):
            return super().infer(x, **fit_params).float()

    def run_single_epoch(self, iterator, training, prefix, step_fn, **fit_params):
        """skorch's loop, but the loss is summed on the device and recorded once
        per epoch: a .item() per batch would make a GPU wait every batch; and
        training batches go through the captured step where `capture` asks."""
        if iterator is None:
            return
        if training:  # the weights to go back to should this epoch's loss blow up
            self.last_good_weights_ = copy_weights(self.module_)
        captured = captured_step(self, iterator) if training else None
        batches, rows = ((iterator.batch_rows(), len) if captured else
                         (iterator, lambda batch: len(batch[0])))
        total, count = torch.zeros((), device=self.device), 0
        for batch in batches:
            self.notify('on_batch_begin', batch=batch, training=training)
            step = (captured or step_fn)(batch, **fit_params)
            total += step['loss'].detach() * rows(batch)
            count += rows(batch)
            self.notify('on_batch_end', batch=batch, training=training, **step)
        loss = (total / count).item()
        self.history.record(prefix + '_loss', loss)
        if not math.isfinite(loss):
            self.module_.load_state_dict(self.last_good_weights_)
            epoch = len(self.history)
            self.diverged_ = (f'the {prefix} loss became {loss} in epoch {epoch}; kept the '
                              f'weights from before it: try a lower learning rate')
            if self.verbose:
                print(f'Stopping: {self.diverged_}.')
            raise KeyboardInterrupt  # skorch's way to end fit() early

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        whole_pixels(self.test_shifts)  # now, not when training is over
        tune_allocator()
        self.diverged_ = None
        if self.verbose and not len(self.history):
            print(self.layer_table())
        if self.mirror_axis_ is None:
            self.mirror_axis_ = self.measured_mirror_axis(X, y).axis
        self.groups_ = getattr(self.train_split, 'source', None)

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
        self.captured_step_ = None  # its graphs hold the training batches' memory
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


def _copies(callbacks):
    """Copies of callback objects, in the lists and (name, callback) pairs
    that hold them; classes, names and None as they are."""
    if isinstance(callbacks, (list, tuple)):
        return type(callbacks)(_copies(item) for item in callbacks)
    return copy.copy(callbacks) if isinstance(callbacks, Callback) else callbacks


# --- Weights ---

def copy_weights(module):
    """A copy of the module's weights, safe from further training."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- Validation on held-out groups ---

class GroupSplit:
    """skorch's train_split that validates on about a `fraction` of the
    groups (e.g. people), whole: with several near-identical frames per
    person, holding out rows instead would flatter the validation score.

    Whether a group is held out depends on its name and `random_state` alone,
    not on which rows are loaded: net7 (complete rows), net8 (every row) and
    each specialist validate on the same people. `source` says where the
    groups came from (a column or a file, as load's `groups`), for a net
    to keep as `groups_` and a resumed run or `kfkd plot errors` to split
    the same way.
    """

    def __init__(self, groups, fraction=0.2, random_state=42, source=None):
        self.groups = groups
        self.fraction = fraction
        self.random_state = random_state
        self.source = source

    def __call__(self, dataset, y=None):
        draw = {g: int.from_bytes(hashlib.blake2b(f'{self.random_state}/{g}'.encode(),
                                                  digest_size=8).digest(), 'little') / 2 ** 64
                for g in np.unique(self.groups)}
        held_out = np.array([draw[g] < self.fraction for g in self.groups])
        return (torch.utils.data.Subset(dataset, np.flatnonzero(~held_out)),
                torch.utils.data.Subset(dataset, np.flatnonzero(held_out)))
