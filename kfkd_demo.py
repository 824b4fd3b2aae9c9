"""Demo data: synthetic faces in Kaggle's layout, so kfkd runs without Kaggle.

Each face is drawn from its 15 keypoints: a head with hair, eyes with
irises between their corners, eyebrows, nostrils below the nose tip, lips
between the mouth corners. Faces vary in position, scale, rotation,
proportions, brightness, contrast and noise, and the keypoints move with
them exactly, so a net has to find the features to do well. Labels follow
Kaggle's missing pattern: about 30% of training rows are complete, the rest
keep only the four common keypoints.
"""
import numpy as np
import pandas as pd

from kfkd_io import COLUMNS, IMAGE_SIZE, MEAN_FACE, write_faces

COMMON = [0, 1, 10, 14]  # eye centres, nose tip, bottom lip: present in ~all Kaggle rows
CENTRE = np.float32(IMAGE_SIZE / 2)


def random_faces(n, rng):
    """Keypoints of `n` faces in the mean face's frame, and the pose of each."""
    k = np.repeat(MEAN_FACE[None], n, 0)
    u = lambda lo, hi, *shape: rng.uniform(lo, hi, (n,) + shape).astype(np.float32)
    eye_gap = u(-3, 3)  # wider or narrower set eyes
    for eye, sign in ((slice(0, 1), 1), (slice(2, 4), 1), (slice(1, 2), -1), (slice(4, 6), -1)):
        k[:, eye, 0] += sign * eye_gap[:, None]
    k[:, [0, 2, 3, 6, 7], :] += u(-1.5, 1.5, 1, 2)  # each eye and brow moves a little
    k[:, [1, 4, 5, 8, 9], :] += u(-1.5, 1.5, 1, 2)
    eye_width = u(-2, 2)
    k[:, [3], 0] += eye_width[:, None]
    k[:, [5], 0] -= eye_width[:, None]
    k[:, 0:2, :] += u(-1.2, 1.2, 2, 2)  # gaze: irises within the eyes
    k[:, 6:10, 1] += u(-3, 2)[:, None] + u(-1, 1, 4)  # brow height
    k[:, 10, :] += u(-3, 3, 2) * [0.6, 1]  # nose length
    k[:, 11:15, 1] += u(-4, 4)[:, None]  # mouth height
    mouth_width = u(-4, 4)
    k[:, 11, 0] += mouth_width
    k[:, 12, 0] -= mouth_width
    k[:, 13, 1] += u(-1.5, 1)
    k[:, 14, 1] += u(-1, 3)  # open or closed mouth
    k += rng.normal(0, 0.5, k.shape).astype(np.float32)
    pose = dict(angle=np.clip(rng.normal(0, 0.1, n), -0.25, 0.25).astype(np.float32),
                scale=u(0.85, 1.12), shift=np.clip(rng.normal(0, 3, (n, 2)), -8, 8).astype(np.float32))
    return k, pose


def place(points, pose):
    """Points of the mean face's frame moved to where the posed face has them."""
    c, s = np.cos(pose['angle']), np.sin(pose['angle'])
    x, y = points[..., 0] - CENTRE, points[..., 1] - CENTRE
    scale = pose['scale'][:, None]
    return np.stack([scale * (c[:, None] * x - s[:, None] * y),
                     scale * (s[:, None] * x + c[:, None] * y)], -1) + CENTRE + pose['shift'][:, None]


def _soft(squared_distance, width):
    """1 inside a shape (squared distance < 1), 0 outside, across an edge `width` wide."""
    return np.clip((1 - squared_distance) / (2 * width), 0, 1)


def _ellipse(x, y, cx, cy, rx, ry):
    return (((x - cx[:, None, None]) / rx[:, None, None]) ** 2 +
            ((y - cy[:, None, None]) / ry[:, None, None]) ** 2)


def _segment(x, y, a, b, half_width):
    """Squared distance to the segment a-b, in units of `half_width`."""
    ab = (b - a)[:, :, None, None]
    dx, dy = x - a[:, 0, None, None], y - a[:, 1, None, None]
    t = np.clip((dx * ab[:, 0] + dy * ab[:, 1]) / (ab ** 2).sum(1), 0, 1)
    return ((dx - t * ab[:, 0]) ** 2 + (dy - t * ab[:, 1]) ** 2) / half_width[:, None, None] ** 2


def _frame_coordinates(pose, rows, cols):
    """Where pixels (rows x cols, per face) lie in the mean face's frame: the pose undone."""
    c, s = np.cos(pose['angle'])[:, None, None], np.sin(pose['angle'])[:, None, None]
    scale = pose['scale'][:, None, None]
    gx = (cols[:, None, :] + 0.5 - CENTRE - pose['shift'][:, 0, None, None]) / scale
    gy = (rows[:, :, None] + 0.5 - CENTRE - pose['shift'][:, 1, None, None]) / scale
    return c * gx + s * gy + CENTRE, -s * gx + c * gy + CENTRE


def render(k, pose, rng):
    """Gray 96x96 images (uint8) of faces with keypoints `k` (mean-face frame) in `pose`.

    Head and hair are drawn over the whole image; eyes, nose and mouth only in
    a window around each, which makes drawing several times faster.
    """
    n = len(k)
    u = lambda lo, hi: rng.uniform(lo, hi, n).astype(np.float32)
    ones = np.ones(n, np.float32)
    everything = np.broadcast_to(np.arange(IMAGE_SIZE), (n, IMAGE_SIZE))
    x, y = _frame_coordinates(pose, everything, everything)
    image = u(0.1, 0.9)[:, None, None] + u(-0.004, 0.004)[:, None, None] * (x + y - IMAGE_SIZE)
    eyes_y = (k[:, 0, 1] + k[:, 1, 1]) / 2

    def paint(alpha, shade, where=(slice(None),)):
        part = image[where]
        part += alpha * (shade[:, None, None] - part)
        image[where] = part

    paint(_soft(_ellipse(x, y, (k[:, 0, 0] + k[:, 1, 0]) / 2, eyes_y + 12,
                         u(34, 40), u(44, 50)), 0.05), u(0.45, 0.8))  # head
    hairline = eyes_y[:, None, None] - u(14, 22)[:, None, None] + 0.012 * (x - CENTRE) ** 2
    paint(_soft(_ellipse(x, y, CENTRE * ones, eyes_y + 5, 42 * ones, 50 * ones), 0.05)
          * np.clip(hairline - y, 0, 1), u(0.05, 0.35))  # hair

    placed = place(k, pose)
    faces = np.arange(n)[:, None, None]
    for centre, inner, outer, brow_in, brow_out in ((0, 2, 3, 6, 7), (1, 4, 5, 8, 9)):
        where, x, y = _window(pose, (placed[:, centre] + placed[:, brow_in] +
                                     placed[:, brow_out]) / 3, 40, faces)
        mid = (k[:, inner] + k[:, outer]) / 2
        half = np.abs(k[:, outer, 0] - k[:, inner, 0]) / 2
        paint(_soft(_ellipse(x, y, mid[:, 0], mid[:, 1], half, half * u(0.3, 0.42)), 0.15),
              u(0.75, 0.95), where)  # eye white
        iris = u(2.6, 3.4)
        paint(_soft(_ellipse(x, y, k[:, centre, 0], k[:, centre, 1], iris, iris), 0.25),
              u(0.05, 0.3), where)
        paint(_soft(_segment(x, y, k[:, brow_in], k[:, brow_out], u(1.3, 2.2)), 0.4),
              u(0.05, 0.3), where)
    where, x, y = _window(pose, placed[:, 10], 24, faces)
    for side in (-1, 1):  # nostrils beside and above the nose tip
        paint(_soft(_ellipse(x, y, k[:, 10, 0] + side * u(3.5, 5), k[:, 10, 1] - 1,
                             2.0 * ones, 1.3 * ones), 0.4), u(0.1, 0.3), where)
    paint(_soft(_ellipse(x, y, k[:, 10, 0], k[:, 10, 1] - 3, 2.5 * ones, 3.5 * ones), 0.6),
          u(0.8, 1.0), where)  # highlight on the nose
    where, x, y = _window(pose, (placed[:, 11] + placed[:, 12]) / 2, 48, faces)
    mouth = (k[:, 11] + k[:, 12]) / 2
    paint(_soft(_ellipse(x, y, mouth[:, 0], (k[:, 13, 1] + k[:, 14, 1]) / 2,
                         np.abs(k[:, 11, 0] - k[:, 12, 0]) / 2,
                         np.maximum((k[:, 14, 1] - k[:, 13, 1]) / 2, 1.5)), 0.12),
          u(0.15, 0.45), where)  # lips
    paint(_soft(_segment(x, y, k[:, 12], k[:, 11], 0.8 * ones), 0.5), u(0.0, 0.15), where)

    contrast, gamma = u(0.6, 1.3), u(0.7, 1.4)
    image = np.clip(image, 0, 1) ** gamma[:, None, None]
    image = (image - 0.5) * contrast[:, None, None] + 0.5 + u(-0.15, 0.15)[:, None, None]
    image += rng.standard_normal(image.shape, np.float32) * u(0.005, 0.04)[:, None, None]
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _window(pose, centre, size, faces):
    """A size x size square of pixels around each face's `centre` (in pixels):
    its index into the images, and its pixels' mean-face-frame coordinates."""
    first = np.clip(np.round(centre - size / 2), 0, IMAGE_SIZE - size).astype(np.int64)
    cols = first[:, 0, None] + np.arange(size)
    rows = first[:, 1, None] + np.arange(size)
    return (faces, rows[:, :, None], cols[:, None, :]), *_frame_coordinates(pose, rows, cols)


def make_faces(n, seed=0):
    """(keypoints in pixels (n, 30), uint8 images (n, 96, 96)) of `n` synthetic faces."""
    rng = np.random.default_rng(seed)
    keypoints, images = [], []
    for first in range(0, n, 256):  # in blocks, to keep memory flat
        k, pose = random_faces(min(256, n - first), rng)
        images.append(render(k, pose, rng))
        keypoints.append(place(k, pose).reshape(len(k), 30))
    if not n:
        return np.empty((0, 30), np.float32), np.empty((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    return np.concatenate(keypoints), np.concatenate(images)


def kaggle_missing(n, rng):
    """A mask of kept labels (n, 30) with Kaggle's pattern: ~30% complete rows."""
    keep = np.zeros((n, 15), bool)
    keep[rng.random(n) < 0.304] = True
    keep[:, COMMON] = True
    keep[:, COMMON] &= rng.random((n, 4)) > [0.0015, 0.002, 0, 0.005]  # as rare as in Kaggle's
    return np.repeat(keep, 2, axis=1)


def write_demo_data(out_dir, n_train=7049, n_test=1783, seed=0):
    """Write training.csv, test.csv, IdLookupTable.csv and, for scoring a
    submission, solution.csv (RowId,Location) into `out_dir`."""
    from pathlib import Path
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keypoints, images = make_faces(n_train + n_test, seed)
    train = pd.DataFrame(np.where(kaggle_missing(n_train, rng), keypoints[:n_train], np.nan)
                         .round(4), columns=COLUMNS)
    write_faces(out_dir / 'training.csv', train, images[:n_train])
    test_ids = np.arange(1, n_test + 1)
    write_faces(out_dir / 'test.csv', pd.DataFrame({'ImageId': test_ids}), images[n_train:])
    # Like Kaggle's table: some images ask for all 30 values, most for the common 8.
    asked = kaggle_missing(n_test, rng)
    image_id = np.repeat(test_ids[:, None], 30, 1)[asked]
    feature = np.array(COLUMNS)[np.nonzero(asked)[1]]
    lookup = pd.DataFrame({'RowId': np.arange(1, len(image_id) + 1), 'ImageId': image_id,
                           'FeatureName': feature, 'Location': np.nan})
    lookup.to_csv(out_dir / 'IdLookupTable.csv', index=False)
    solution = keypoints[n_train:][asked]
    pd.DataFrame({'RowId': lookup.RowId, 'Location': solution.round(4)}).to_csv(
        out_dir / 'solution.csv', index=False)
    return out_dir


# --- A demo clip: a real face moved along known paths ---

# Grace Hopper's US Navy portrait (public domain), as matplotlib ships it: the
# middle of her face, and its size, in that image's pixels.
PORTRAIT_FACE = (266.0, 216.0, 222.0)
MOTIONS = ('still', 'pan', 'zoom', 'turn')


def portrait_pose(motion, t, size=(640, 480)):
    """Where the face is at `t` (0 to 1 over the clip): (x, y, face size in
    pixels, angle in degrees), along path `motion` of MOTIONS: still in the
    middle, a steady pan across, a zoom from far to near, a turn of 30 degrees."""
    x, y, face, angle = size[0] / 2, size[1] / 2, 0.35 * size[1], 0.0
    if motion == 'pan':
        x += (t - 0.5) * 0.5 * size[0]
    elif motion == 'zoom':
        face *= 0.7 + 0.6 * t
    elif motion == 'turn':
        angle = 30 * (t - 0.5)
    elif motion != 'still':
        raise ValueError(f'motion {motion!r}: one of {", ".join(MOTIONS)}')
    return x, y, face, angle


def portrait_clip(frames=60, motion='still', size=(640, 480), noise=3.0, seed=0):
    """The frames (BGR uint8 images, `size`) of a clip of Grace Hopper's
    portrait moved along `motion` (see portrait_pose), each with Gaussian
    noise of `noise` grey levels: one at a time, with its pose."""
    import cv2
    from matplotlib import cbook
    portrait = cv2.imread(cbook.get_sample_data('grace_hopper.jpg', asfileobj=False))
    rng = np.random.default_rng(seed)
    cx, cy, face = PORTRAIT_FACE
    for i in range(frames):
        x, y, size_now, angle = pose = portrait_pose(motion, i / max(frames - 1, 1), size)
        matrix = cv2.getRotationMatrix2D((cx, cy), angle, size_now / face)
        matrix[:, 2] += (x - cx, y - cy)
        image = cv2.warpAffine(portrait, matrix, size, flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
        image += rng.normal(0, noise, image.shape).astype(np.float32)
        yield np.clip(image + 0.5, 0, 255).astype(np.uint8), pose


def write_portrait_clip(path, frames=60, motion='still', fps=30.0, size=(640, 480), noise=3.0):
    """portrait_clip written as an mp4 video (mp4v) at `path`; returns the poses."""
    import cv2
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'mp4v'), fps, size)
    poses = []
    for image, pose in portrait_clip(frames, motion, size, noise):
        writer.write(image)
        poses.append(pose)
    writer.release()
    return poses
