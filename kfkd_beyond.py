"""kfkd's own nets, beyond the tutorial, and what they get wrong.

The tutorial ends with six specialists: net7 learns from the 30% of rows
that have all 30 keypoints, and the specialists recover the rest with six
nets. kfkd goes on from there:

  MaskedMSELoss, AugmentIterator,
  ResNet, CosineSchedule, net8      one net from every label, each face moved,
                                    turned, scaled, mirrored and relit
  SoftArgmax, HeatmapNet, net9      net8 with a heatmap per keypoint: the
                                    default of `kfkd fit` and `kfkd predict`
  net10                             four net9s trained side by side, averaged
  pretrained                        net9 as kfkd ships it, trained on real faces
                                    (docs/model-card.md)
  training_data, validation_data    the faces a net trains and validates on
  predictions, keypoint_errors,
  overall_rmse, plot_errors, score  a net's (or several nets' mean)
                                    predictions, each keypoint's error, the
                                    worst faces, Kaggle's metric

It builds on kfkd.py (the tutorial) and its engine; neither imports it. In a
notebook:  from kfkd_beyond import net9;  net9.fit(X, y)  with X, y from
kfkd.load2d(dropna=False).
"""
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.base import clone
from skorch.callbacks import Callback
from torch import nn

from kfkd import EarlyStopping, blank_figure, load, load2d, plot_sample
from kfkd_engine import (HALF, BatchIterator, GroupSplit, KeypointNet, mirror, mirror_pairs,
                         mixture, predict_keypoints, read_model, to_net_scale, to_pixels)
from kfkd_io import COLUMNS, IMAGE_SIZE, MODELS, KfkdError


# --- net8: one net from every label ---
#
# Its loss skips missing targets, so it learns from every row. It sees each
# face moved, turned, scaled, mirrored and relit, with the keypoints moved
# exactly alike; it is a small residual conv net with batch norm; and it
# averages its predictions for a face and the face's mirror image.

class MaskedMSELoss(nn.Module):
    """Mean squared error over the targets that are there (not NaN)."""
    handles_missing = True

    def forward(self, y_pred, y_true):
        # y_pred may hold several predictions of y_true (net10's, while
        # training): then the mean of their losses.
        present = ~torch.isnan(y_true).expand_as(y_pred)
        error = torch.where(present, y_pred - torch.nan_to_num(y_true), 0)
        return (error ** 2).sum() / present.sum().clamp(min=1)


class AugmentIterator(BatchIterator):
    """Each training face moved, turned, scaled, mirrored and relit at random,
    its keypoints moved exactly alike, for the whole batch at once.

    One affine map per face, through grid_sample (bilinear, edges repeated):
    up to `rotate` degrees, `scale` (a fraction) larger or smaller, `shift`
    pixels along each axis; then half of the faces mirrored (kfkd_engine's
    mirror: about the net's mirror_axis, the columns of each pair in
    `flip_indices` trading places; by default the pairs of Kaggle's columns);
    then contrast and brightness changed by up to `contrast` and `brightness`.
    """

    def __init__(self, dataset, batch_size=128, shuffle=False, flip_indices=None,
                 rotate=15.0, scale=0.1, shift=8.0, contrast=0.3, brightness=0.15):
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle)
        self.flip_indices = mirror_pairs(COLUMNS) if flip_indices is None else flip_indices
        self.rotate, self.scale, self.shift = rotate, scale, shift
        self.contrast, self.brightness = contrast, brightness

    def transform(self, Xb, yb):
        n, device = len(Xb), Xb.device
        uniform = lambda: torch.rand(n, device=device) * 2 - 1
        angle = uniform() * math.radians(self.rotate)
        zoom = 1 + uniform() * self.scale
        mirrored = torch.rand(n, device=device) < 0.5
        # The map from output to input coordinates (-1..1, as grid_sample's):
        # p_in = A p_out + t, with A = rotation * zoom.
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        A = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        t = torch.stack([uniform(), uniform()], -1) * (self.shift / HALF)
        grid = F.affine_grid(torch.cat([A, t[:, :, None]], -1), Xb.shape, align_corners=False)
        Xb = F.grid_sample(Xb, grid, mode='bilinear', padding_mode='border',
                           align_corners=False)
        Xb = torch.where(mirrored[:, None, None, None], mirror(Xb)[0], Xb)
        mean = Xb.mean((1, 2, 3), keepdim=True)
        Xb = ((Xb - mean) * (1 + uniform()[:, None, None, None] * self.contrast) + mean +
              uniform()[:, None, None, None] * self.brightness).clamp(0, 1)
        if yb is not None:  # keypoints: p_out = A^-1 (p_in - t), then mirrored alike
            # grid_sample's coordinates count x from the image's left edge; labels whose
            # mirror axis is not 96 count it from (axis - 96) / 2 pixels further left
            # (a number, not a tensor made here: kfkd_engine.batches records this step)
            origin_x = (self.mirror_axis - IMAGE_SIZE) / IMAGE_SIZE
            points = yb.reshape(n, -1, 2) - t[:, None, :]
            points[..., 0] -= origin_x
            # A^-1 = zoom * rotation(-angle) = zoom^2 A^T; points are rows: p @ (A^-1)^T
            points = points @ (A * zoom[:, None, None] ** 2)
            points[..., 0] += origin_x
            yb = points.reshape(n, -1)
            _, flipped = mirror(y=yb, pairs=self.flip_indices, axis=self.mirror_axis)
            yb = torch.where(mirrored[:, None], flipped, yb)
        return Xb.contiguous(memory_format=torch.channels_last), yb


# `groups` below: several nets computed as one, each on its own block of channels
# (grouped convolutions; batch norm and the rest work channel by channel).

def _conv_bn(in_channels, out_channels, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False,
                                   groups=groups),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    def __init__(self, channels, groups=1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False, groups=groups),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False, groups=groups),
            nn.BatchNorm2d(channels))

    def forward(self, x):
        return F.relu(x + self.body(x))


def _stages(width, groups=1):
    """Four stages, each halving the resolution (96 -> 48 -> 24 -> 12 -> 6) and
    doubling the channels (from `width`), then a residual block. The first
    conv sees the one input channel whole, as each group's own would."""
    stages, channels = OrderedDict(), 1
    for i, out in enumerate((width, 2 * width, 4 * width, 8 * width), 1):
        out *= groups
        stages[f'stage{i}'] = nn.Sequential(
            _conv_bn(channels, out, stride=2, groups=1 if i == 1 else groups),
            ResidualBlock(out, groups))
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
    the map's cells: integral regression. With `groups`, each group of
    channels makes its own heatmaps: (faces, groups, output_units).

    With `variance`, also each output's variance under that softmax (the
    same layout, in the -1..1 scale squared): how sharp the heatmap is.
    """

    def __init__(self, channels, side, output_units=30, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(channels, groups * output_units // 2, 1, groups=groups)
        self.groups, self.out_features = groups, output_units
        centres = to_net_scale((torch.arange(side) + 0.5) * (IMAGE_SIZE / side))
        self.register_buffer('grid_x', centres.repeat(side), persistent=False)
        self.register_buffer('grid_y', centres.repeat_interleave(side), persistent=False)

    def forward(self, x, variance=False):
        maps = self.conv(x).flatten(2).float().softmax(-1)  # (faces, heatmaps, cells)
        points = self._by_group(torch.stack([maps @ self.grid_x, maps @ self.grid_y], -1))
        if not variance:
            return points
        squares = torch.stack([maps @ self.grid_x.square(), maps @ self.grid_y.square()], -1)
        # E[x^2] - E[x]^2 rounds a little below 0 for the sharpest maps
        return points, (self._by_group(squares) - points.square()).clamp(min=0)

    def _by_group(self, per_heatmap):
        return per_heatmap.unflatten(1, (self.groups, -1)).flatten(2)


class HeatmapNet(nn.Module):
    """net9's module: net8's four stages, then back up from 6x6 to 24x24 (as a
    feature pyramid does: each coarser map, upsampled, is added to the stage
    before it) and a heatmap per keypoint there (SoftArgmax).

    Where net8 flattens its 6x6 map into a linear layer, each keypoint here is
    found where the features show it, on a map four pixels to a cell.

    With `members` > 1 (net10's), it is that many such nets, each from its own
    random start, computed as one (grouped convolutions: the same maths, in
    one pass): while training it returns every member's prediction, (members,
    faces, outputs), and MaskedMSELoss takes the mean of their losses, so each
    member learns from its own; otherwise the mean of their predictions.

    forward(x, variance=True) gives each output's variance too (in the -1..1
    scale, squared; kfkd_onnx turns it into a confidence): that of its
    heatmap's softmax, or with members, of the members' heatmaps pooled,
    which grows where they disagree (kfkd_engine.mixture); with the mean
    points, in training as well.
    """

    def __init__(self, width=16, output_units=30, members=1):
        super().__init__()
        for name, stage in _stages(width, members).items():
            self.add_module(name, stage)
        channels = [c * width * members for c in (8, 4, 2)]
        self.lateral4 = nn.Conv2d(channels[0], channels[1], 1, groups=members)
        self.merge3 = _conv_bn(channels[1], channels[1], groups=members)
        self.lateral3 = nn.Conv2d(channels[1], channels[2], 1, groups=members)
        self.merge2 = _conv_bn(channels[2], channels[2], groups=members)
        self.output = SoftArgmax(channels[2], IMAGE_SIZE // 4, output_units, members)
        self.members = members
        self.input_shape = (1, IMAGE_SIZE, IMAGE_SIZE)

    def forward(self, x, variance=False):
        s2 = self.stage2(self.stage1(x))
        s3 = self.stage3(s2)
        s4 = self.stage4(s3)
        x = self.merge3(F.interpolate(self.lateral4(s4), scale_factor=2) + s3)
        x = self.merge2(F.interpolate(self.lateral3(x), scale_factor=2) + s2)
        if variance:
            points, variances = self.output(x, variance=True)
            return mixture(points.unbind(1), variances.unbind(1))
        points = self.output(x)
        if self.members == 1:
            return points[:, 0]
        return points.transpose(0, 1) if self.training else points.mean(1)

    def upgraded_weights(self, weights):
        """Weights from a model file of an earlier kfkd, as this module names
        them: net10's members were separate modules (member1.stage1..., ...),
        whose weights, one after the other, are the groups' channels here."""
        members = sorted({int(key.split('.')[0][len('member'):]) for key in weights
                          if key.startswith('member')})
        if not members:
            return weights
        parts = {key.split('.', 1)[1]: [weights[key.replace('member1.', f'member{m}.', 1)]
                                        for m in members]
                 for key in weights if key.startswith('member1.')}
        # a count (batch norm's batches seen) is the same in every member: keep one
        return {name: p[0] if p[0].ndim == 0 else torch.cat(p) for name, p in parts.items()}


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
    # The whole update in one kernel: a faster step on a CPU (docs/benchmarks.md, net9's
    # epoch on a CPU), and on a GPU one that reads its lr on the device (the captured step)
    optimizer__fused=True,
    lr=3e-3,
    batch_size=64,
    iterator_train=AugmentIterator,
    callbacks=[CosineSchedule(), EarlyStopping(patience=None)],
    max_epochs=300,
    test_flip=True,
    # Predictions averaged over the face moved 6 px each way as well (nine
    # views, each with its mirror image): closer on held-out people, for nine
    # times the prediction time (docs/results.md, test-time shifts).
    test_shifts=6,
    mirror_axis='measured',
)

# net9, the default of `kfkd fit`: net8 with the heatmap head, closer than
# net8 on held-out people at equal epochs for a little more time per epoch.
# Batches of 32: twice the steps for about the same time per epoch on a CPU,
# and closer in 15 minutes than batches of 64 (docs/results.md).
net9 = clone(net8).set_params(module=HeatmapNet, batch_size=32)


# net10: four net9s trained side by side and averaged, in one net. Each alone
# would reach about the same RMSE; the mean of their predictions is closer than
# any. (On a CPU, net9s trained apart and averaged are closer for the same
# time: docs/results.md.) Batches of 64, as measured.
net10 = clone(net9).set_params(module__members=4, batch_size=64)


# --- The net kfkd ships ---

PRETRAINED = MODELS / 'net9.safetensors'


def pretrained_file():
    """The path of kfkd's pretrained net9, or a KfkdError where this install lacks it."""
    if not PRETRAINED.is_file():
        raise KfkdError(f'{PRETRAINED}: kfkd\'s pretrained model is not in this install '
                        f'(its model card is docs/model-card.md); reinstall kfkd, or name a '
                        f'model of yours with --model')
    return PRETRAINED


def pretrained(device='cpu'):
    """net9 trained on the faces of 278 people (docs/model-card.md: research
    use only), ready to predict: kfkd_engine.predict_keypoints(pretrained(), X),
    or `kfkd predict` without --model."""
    return read_model(pretrained_file(), device)


# --- What a net gets wrong ---

def training_data(net, data_dir, groups=None):
    """The training data the way `net` takes it: flat for net1, images
    otherwise; every row if its loss skips missing targets, else complete rows.
    With `groups`, validation holds out about 20% of the groups (GroupSplit)."""
    every_row = getattr(net.criterion, 'handles_missing', False)
    loader = load if len(net.module_.input_shape) == 1 else load2d
    X, y, *rest = loader(data_dir=data_dir, dropna=not every_row, groups=groups)
    if groups is not None:
        net.set_params(train_split=GroupSplit(rest[0], source=groups))
    return X, y


def validation_data(net, X, y):
    """The rows of X and y that `net` validates on (its train_split's)."""
    _, valid = net.train_split(torch.utils.data.TensorDataset(torch.as_tensor(y)))
    rows = np.asarray(valid.indices)
    return X[rows], y[rows]


def keypoint_errors(net, X, y, predicted=None):
    """Each keypoint's RMSE in pixels (over its x and y) of net.predict(X)
    against y (scaled as load() scales it), on the rows that have it: a
    DataFrame of 'RMSE (px)' and 'rows', one row per keypoint, in Kaggle's
    order. `net` may be a list of nets: the mean of their predictions.
    `predicted`: predictions(net, X), if already made."""
    if predicted is None:
        predicted = predictions(net, X)
    squared = ((predicted - y) * HALF) ** 2
    per_point = squared[:, 0::2] + squared[:, 1::2]  # NaN where a row lacks the keypoint
    rows = (~np.isnan(per_point)).sum(axis=0)
    with np.errstate(invalid='ignore', divide='ignore'):
        rmse = np.sqrt(np.nansum(per_point, axis=0) / (2 * rows))
    columns = (net[0] if isinstance(net, list) else net).target_columns()
    return pd.DataFrame({'RMSE (px)': rmse, 'rows': rows},
                        index=pd.Index([c[:-2] for c in list(columns)[0::2]], name='keypoint'))


def predictions(net, X):
    """net.predict(X), or for a list of nets the mean of theirs (predict_keypoints').
    With test-time flips and shifts that is 18 passes over X a net: make them once."""
    if not isinstance(net, list):
        return net.predict(X)
    return to_net_scale(predict_keypoints(net, X).to_numpy(np.float32))


def overall_rmse(errors):
    """The RMSE over all keypoints, from a keypoint_errors() table."""
    return float(np.sqrt((errors['RMSE (px)'] ** 2 * errors['rows']).sum() /
                         errors['rows'].sum()))


def plot_errors(net, X, y, worst=6, predicted=None):
    """What a net (or a list of nets: the mean of their predictions) gets
    wrong on validation faces X, y (scaled as load2d() scales them): the RMSE
    of each keypoint as bars, then the `worst` faces with their true
    keypoints (green) and the predicted ones (red). `predicted`:
    predictions(net, X), if already made."""
    if predicted is None:
        predicted = predictions(net, X)
    errors = keypoint_errors(net, X, y, predicted)
    fig = blank_figure(figsize=(2 * worst, 7.5))
    grid = fig.add_gridspec(2, worst, height_ratios=(1.3, 1), hspace=0.75)
    ax = fig.add_subplot(grid[0, :])
    ax.bar(errors.index, errors['RMSE (px)'], color='tab:blue')
    ax.set_xticks(range(len(errors)), errors.index, rotation=40, ha='right')
    ax.set_ylabel('RMSE (pixels)')
    ax.set_title(('the mean of their predictions: ' if isinstance(net, list) else '') +
                 f'validation RMSE per keypoint ({len(y)} faces; all keypoints: '
                 f'{overall_rmse(errors):.3f} px)')
    ax.grid(True, axis='y', alpha=0.3)
    predicted, truth = to_pixels(predicted), to_pixels(y)
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


def score(submission, solution):
    """RMSE in pixels between two RowId,Location files (or DataFrames), Kaggle's metric."""
    frames = [pd.read_csv(f) if isinstance(f, (str, Path)) else f for f in (submission, solution)]
    both = frames[0].merge(frames[1], on='RowId', suffixes=('', '_true'), validate='1:1')
    if len(both) != len(frames[1]):
        raise KfkdError(f'the submission has {len(both)} of the {len(frames[1])} rows to score')
    return float(np.sqrt(np.mean((both['Location'] - both['Location_true']) ** 2)))
