"""Keypoints' geometry: pixels and the nets' scale, mirrored faces, moved
faces, test-time flips and shifts, how far several predictions of a keypoint
spread, and the mirror axis a data set's labels follow, measured from its faces."""
import collections
import hashlib
import json
import math

import numpy as np
import torch
import torch.nn.functional as F

import kfkd_io
from kfkd_io import COLUMNS, IMAGE_SIZE, KfkdError


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
        # column by column: an index list would be host data sent to a GPU on each
        # call, which a recorded training step (kfkd_engine.batches) cannot hold
        swapped = y.clone() if torch.is_tensor(y) else y.copy()
        for a, b in pairs:
            swapped[:, a], swapped[:, b] = y[:, b], y[:, a]
        y = swapped
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


def mixture(points, variances=None):
    """Several predictions of the same keypoints (a sequence of tensors, column
    by column): their mean, and the variance of their equal mixture. That is
    each prediction's own variance (`variances`: a heatmap's; None for points)
    plus how far the predictions lie from their mean: where they disagree, the
    keypoint is uncertain however sharp each one is."""
    mean = sum(points) / len(points)
    parts = [(p - mean).square() for p in points] + list(variances or [])
    return mean, sum(parts) / len(points)


def keypoint_spread(variance):
    """Each keypoint's spread in pixels, the RMS distance of its mass from its
    mean point, from the variances of its x and y columns (in the nets'
    scale, squared): (n, columns) -> (n, columns // 2)."""
    return (variance[:, 0::2] + variance[:, 1::2]).sqrt() * HALF


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
    found = kfkd_io.cache_read(cache, lambda entry: MirrorAxis(**json.loads(
        entry.read_text()))) if use_cache else None
    if found:
        return found
    measured = _measure_mirror_axis(X, to_pixels(y), columns)
    if use_cache:
        kfkd_io.cache_write(cache, lambda f: f.write(json.dumps(measured._asdict()).encode()))
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


def scale_pixels(pixels):
    """Pixels of 0-255 as the nets take them: float32 in [0, 1]."""
    return np.multiply(pixels, np.float32(1 / 255), dtype=np.float32)

