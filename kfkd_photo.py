"""Keypoints on any photo: `kfkd predict PHOTO...`.

Kept out of kfkd.py because it is not the tutorial, and because it needs
OpenCV: a detector finds the faces (kfkd_detect: YuNet, or the Haar
cascade), each face is cut out, turned upright and scaled the way Kaggle's
faces are framed, the net predicts its keypoints and how sure it is of each,
and they are mapped back to the photo's pixels, with the head's pose
(kfkd_pose). It needs a trained model (kfkd ships one: kfkd_beyond.pretrained),
not the tutorial's nets: it imports kfkd_engine, kfkd_io, kfkd_onnx,
kfkd_detect and kfkd_pose, never kfkd.

Photos of any size up to MAX_MEGAPIXELS are read in bounded memory (about
6 bytes a pixel): the size is read from the file's header before the photo
is decoded, faces are searched for on a smaller copy, a big face is shrunk
by averaging blocks of pixels before it is scaled
to 96x96, and the overlay is written at most WORK_SIDE pixels a side.
"""
import collections
import glob
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import kfkd_detect
from kfkd_detect import cut, shrunk
from kfkd_engine import (autocast, keypoint_sides, scale_pixels, shift_averaged, to_net_scale,
                         to_pixels)
from kfkd_io import COLUMNS, IMAGE_SIZE, KfkdError, atomic_write, opencv, warn
from kfkd_onnx import Keypoints
from kfkd_pose import POSE, draw_pose, head_poses

# Decoding's peak memory grows with the pixels (docs/benchmarks.md has it
# measured); 200 megapixels is the most a phone camera takes today.
MAX_MEGAPIXELS = 200

# The overlay's colours (OpenCV's BGR) by keypoint_sides: the subject's left
# keypoints blue, right ones orange, those on the middle line green.
SIDE_COLOURS = {'left': (230, 120, 30), 'right': (20, 140, 250), 'middle': (60, 200, 60)}

WORK_SIDE = 2048  # pixels a side of the overlay, at most
# Keypoints less sure than this are drawn as rings, not dots.
SURE = 0.5
PHOTO_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
VIDEO_SUFFIXES = ('.mp4', '.mov', '.m4v', '.avi', '.mkv', '.webm')  # in folders (kfkd_video)


def find_photos(names):
    """The photo (and video) files that `names` stand for: files as they are, a
    folder's photos and videos, or the files a pattern such as photos/*.jpg matches."""
    photos = []
    for name in map(str, names):
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.suffix.lower() in PHOTO_SUFFIXES + VIDEO_SUFFIXES)
            if not found:
                raise KfkdError(f'{name}: a folder with no photos or videos in it '
                                f'({", ".join(PHOTO_SUFFIXES + VIDEO_SUFFIXES)})')
        elif not path.exists() and glob.has_magic(name):
            found = sorted(Path(p) for p in glob.glob(name) if Path(p).is_file())
            if not found:
                raise KfkdError(f'{name}: matches no file')
        elif path.is_file():
            found = [path]
        else:
            raise KfkdError(f'{name}: no such photo')
        photos += found
    if not photos:
        raise KfkdError('no photos given: name photo or video files, folders or patterns '
                        '(or a camera: --camera N)')
    return photos


def output_names(paths):
    """Each input's name in the output folder, before '-keypoints...': its
    stem where no other input has it; where several do, its folder below the
    one they share, as a subfolder (2024/face, 2025/face), with the whole
    name where they share the folder too (face.jpg, face.png). So inputs
    never overwrite each other's outputs."""
    paths = [Path(os.path.abspath(path)) for path in paths]
    twins = collections.defaultdict(list)
    for path in paths:
        twins[path.stem].append(path)

    def name(path):
        others = twins[path.stem]
        if len(others) == 1:
            return Path(path.stem)
        shared = Path(os.path.commonpath([other.parent for other in others]))
        in_one_folder = sum(other.parent == path.parent for other in others) > 1
        return path.parent.relative_to(shared) / (path.name if in_one_folder else path.stem)
    return [name(path) for path in paths]


def photo_size(path):
    """(width, height) read from the file's header, without decoding the
    photo; None where Pillow does not know the format."""
    from PIL import Image, UnidentifiedImageError
    bomb_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # else no size to check
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit


def read_photo(path):
    """(colour BGR image, gray image) of a jpg/png/... file of at most
    MAX_MEGAPIXELS, refused from its header when it is larger."""
    cv2 = opencv()
    size = photo_size(path)
    if size and size[0] * size[1] > MAX_MEGAPIXELS * 1e6:
        raise KfkdError(f'{path}: {size[0]}x{size[1]} pixels ({size[0] * size[1] / 1e6:.0f} '
                        f'megapixels) is more than kfkd predict reads ({MAX_MEGAPIXELS} '
                        f'megapixels); scale it down first')
    try:
        image, complained = _decode(path)
    except cv2.error as e:  # OpenCV's own size limit, or a decoder's failure
        raise KfkdError(f'{path}: OpenCV cannot read this image (too large, or damaged); '
                        f'scale it down, or save it again as JPEG or PNG') from e
    if image is None:
        raise KfkdError(f'{path}: cannot read it as an image')
    if complained:
        warn(f'{path}: the image is damaged or cut short; predicting on what could be read')
    return image, cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def _decode(path):
    """(cv2.imread's colour image, whether its decoder complained): libjpeg
    and libpng print their complaints to stderr themselves, so they are
    caught there and told in kfkd's words instead."""
    cv2 = opencv()
    sys.stderr.flush()
    stderr = os.dup(2)
    with tempfile.TemporaryFile() as complaints:
        os.dup2(complaints.fileno(), 2)
        try:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)
        return image, complaints.tell() > 0


def work_factor(image):
    """How many times smaller a copy of `image` must be to fit in WORK_SIDE
    pixels a side: the overlay's."""
    return max(1, math.ceil(max(image.shape[:2]) / WORK_SIDE))


def crop(gray, frame):
    """The face in `frame` (kfkd_detect.Frame), turned upright and scaled to
    96x96 as Kaggle's faces are framed (uint8; kfkd_detect.cut)."""
    return cut(gray, frame, IMAGE_SIZE, 'replicate')


class FaceNet:
    """A model as a function from 96x96 faces (uint8) to their keypoints, in
    pixels of the 96x96, and each keypoint's confidence (0-1; kfkd_onnx.Keypoints
    says how it is measured): the net's module with its test-time flips, in
    inference mode, or an exported ONNX file. With `shifts`, a net's keypoints
    are averaged over its test-time shifts too, as its predict() does (where
    all its nets make the same): nine times the work, which a photo takes and
    a video's frames do not."""

    def __init__(self, model, shifts=False):
        self.onnx = hasattr(model, 'predict_keypoints')
        nets = [] if self.onnx else list(model.values()) if isinstance(model, dict) else [model]
        # the nets' shifts, where they all make the same (specialists: each as its own)
        self.shifts = (nets[0].test_shifts if shifts and nets and
                       len({net.test_shifts for net in nets}) == 1 else 0)
        if self.onnx:
            self.model, self.columns = model, model.columns
        else:
            net = next(iter(model.values())) if isinstance(model, dict) else model
            self.model = Keypoints(model).eval()
            self.columns, self.device = self.model.columns, net.device
            self.dtype = net.autocast_dtype

    def _run(self, X):
        if self.onnx:
            return self.model.predict_with_confidence(X)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            return [part.float().cpu().numpy()
                    for part in self.model(torch.as_tensor(X, device=self.device))]

    def __call__(self, faces):
        X = scale_pixels(faces).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
        points, confidence = self._run(X)
        if self.shifts:
            points = to_pixels(shift_averaged(lambda X: to_net_scale(self._run(X)[0]), X,
                                              self.shifts))
        return points.astype(float), confidence.astype(float)


def face_rows(net, gray, frames):
    """Each face's keypoints in the photo's pixels and their confidences
    (arrays, a row per face, in net.columns' order), which `net` (a FaceNet)
    predicts for the faces in `frames`."""
    if not frames:
        return np.empty((0, len(net.columns))), np.empty((0, len(net.columns) // 2))
    points, confidence = net(np.stack([crop(gray, frame) for frame in frames]))
    return np.stack([frame.to_image(row) for row, frame in zip(points, frames)]), confidence


def confidence_columns(columns):
    """The names of the confidences of `columns`' keypoints: NAME_confidence."""
    return [f'{x[:-2]}_confidence' for x in list(columns)[0::2]]


def draw(image, frames, points, confidence, columns=COLUMNS, poses=None):
    """The photo, at most WORK_SIDE pixels a side, with each face drawn as
    draw_faces draws it."""
    factor = work_factor(image)
    image = shrunk(image, factor).copy()
    draw_faces(image, [frame.in_smaller(factor) for frame in frames],
               np.asarray(points) / factor, confidence, columns, poses)
    return image


def draw_faces(image, frames, points, confidence, columns=COLUMNS, poses=None):
    """Each face's frame (the square its keypoints were predicted in) and
    keypoints (a row of `points` per face, x, y, x, y, ... in `columns`'
    order) drawn on `image` itself: the subject's left keypoints blue, right
    ones orange, the others green, as dots where their confidence is at least
    SURE, rings where it is lower; with `poses` (a yaw, pitch, roll per face),
    the head's axes."""
    cv2 = opencv()
    thickness = max(1, round(max(image.shape[:2]) / 400))
    sides = keypoint_sides(columns)
    for i, (frame, row, sure) in enumerate(zip(frames, points, confidence)):
        cv2.polylines(image, [np.round(frame.corners()).astype(np.int32)], True,
                      (80, 200, 80), thickness, cv2.LINE_AA)
        radius = max(2, round(frame.size / 70))
        for side, px, py, c in zip(sides, row[0::2], row[1::2], sure):
            if np.isfinite(px) and np.isfinite(py):
                cv2.circle(image, (round(px), round(py)), radius, SIDE_COLOURS[side],
                           -1 if not c < SURE else thickness, cv2.LINE_AA)
        if poses is not None:
            draw_pose(image, row, poses[i], columns)


def keypoints_record(columns, values):
    """A face's keypoints as the JSON files give them: {name: [x, y]} in
    pixels, to 0.01, from the values of `columns` (x and y of each, in turn)."""
    return {x[:-2]: [round(float(a), 2), round(float(b), 2)]
            for x, a, b in zip(list(columns)[0::2], values[0::2], values[1::2])}


def face_record(columns, points, confidence, pose):
    """A face's keypoints, their confidences and its pose, as the JSON files
    give them (null where unknown: JSON has no NaN)."""
    def rounded(value, digits):
        return round(float(value), digits) if np.isfinite(value) else None
    return {'keypoints': keypoints_record(columns, points),
            'confidence': {x[:-2]: rounded(c, 3) for x, c in zip(list(columns)[0::2],
                                                                confidence)},
            'pose': {angle: rounded(v, 1) for angle, v in zip(POSE, pose)}}


def face_table(columns, frames, points, confidence, poses):
    """The rows of faces: box (the upright box around each face's frame),
    keypoints, their confidences and the head's pose, rounded as written."""
    table = pd.DataFrame([frame.box() for frame in frames],
                         columns=['box_x', 'box_y', 'box_width', 'box_height']).round(1)
    return pd.concat([table, pd.DataFrame(np.round(points, 2), columns=columns),
                      pd.DataFrame(np.round(confidence, 3), columns=confidence_columns(columns)),
                      pd.DataFrame(np.round(poses, 1), columns=list(POSE))], axis=1)


def predict_photos(model, photos, out_dir, names=None, detector='yunet', draw_poses=False):
    """Predict keypoints on each photo; write keypoints.csv, keypoints.json and
    one NAME-keypoints.png overlay per photo into `out_dir`, NAME as
    output_names gives it (or as `names` does, one per photo). Faces are
    found by `detector` (kfkd_detect's name, or a Detector). Returns the
    table, whose column photo names each row's photo as given."""
    cv2 = opencv()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net = FaceNet(model, shifts=True)
    find = kfkd_detect.detector(detector) if isinstance(detector, str) else detector
    tables, records = [], []
    for photo, name in zip(map(Path, photos), names or output_names(photos)):
        image, gray = read_photo(photo)
        found = find(image)
        frames = [detection.frame for detection in found]
        points, confidence = face_rows(net, gray, frames)
        poses = head_poses(points, net.columns, image.shape[1::-1])
        overlay = out_dir / f'{name}-keypoints.png'
        overlay.parent.mkdir(parents=True, exist_ok=True)
        ok, png = cv2.imencode('.png', draw(image, frames, points, confidence, net.columns,
                                            poses if draw_poses else None))
        with atomic_write(overlay) as f:
            f.write(png.tobytes())
        print(f'{photo}: {len(frames)} face(s) -> {overlay}' if frames else
              f'{photo}: no face found -> {overlay}')
        table = face_table(net.columns, frames, points, confidence, poses)
        table.insert(0, 'score', [round(d.score, 3) for d in found])
        table.insert(0, 'face', range(1, len(frames) + 1))
        table.insert(0, 'photo', str(photo))
        tables.append(table)
        records.append({'photo': str(photo), 'faces': [
            {'box': [round(v, 1) for v in frame.box()], 'score': round(d.score, 3),
             **face_record(net.columns, row, sure, pose)}
            for d, frame, row, sure, pose in zip(found, frames, points, confidence, poses)]})
    result = pd.concat(tables, ignore_index=True)
    with atomic_write(out_dir / 'keypoints.csv', 'w') as f:
        result.to_csv(f, index=False)
    with atomic_write(out_dir / 'keypoints.json', 'w') as f:
        json.dump(records, f, indent=1)
    print(f'Wrote {out_dir / "keypoints.csv"} and {out_dir / "keypoints.json"}')
    return result
