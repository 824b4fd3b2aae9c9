"""Keypoints on any photo: `kfkd predict PHOTO...`.

Kept out of kfkd.py because it is not the tutorial, and because it needs
OpenCV: its Haar cascade finds the faces (the frontal-face cascade ships
inside opencv-python-headless 4.x), each face is cut out and scaled the way
Kaggle's faces are framed, the net predicts its keypoints, and they are
mapped back to the photo's pixels. It needs a trained model, not the
tutorial's nets: it imports kfkd_engine and kfkd_io, never kfkd.

Photos of any size up to MAX_MEGAPIXELS are read in bounded memory (about
6 bytes a pixel): the size is read from the file's header before the photo
is decoded, faces are searched for on a copy of at most WORK_SIDE pixels a
side, a big face is shrunk by averaging blocks of pixels before it is scaled
to 96x96, and the overlay is written at most WORK_SIDE pixels a side.
"""
import collections
import functools
import glob
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from kfkd_engine import keypoint_sides, predict_keypoints, scale_pixels
from kfkd_io import COLUMNS, IMAGE_SIZE, KfkdError, atomic_write, warn

# Where Kaggle's 96x96 frame lies around the Haar cascade's face box, in box
# widths: the medians over 1475 real faces framed like Kaggle's, each scaled
# up 4x onto a canvas of its own edge pixels and found by detect_faces (the
# middle half of the faces lie within +-0.04 box widths, about +-3 of the 96
# pixels, of these).
FRAME_LEFT, FRAME_TOP, FRAME_SIZE = -0.056, -0.040, 1.116

# Decoding's peak memory grows with the pixels (docs/benchmarks.md has it
# measured); 200 megapixels is the most a phone camera takes today.
MAX_MEGAPIXELS = 200

# The overlay's colours (OpenCV's BGR) by keypoint_sides: the subject's left
# keypoints blue, right ones orange, those on the middle line green.
SIDE_COLOURS = {'left': (230, 120, 30), 'right': (20, 140, 250), 'middle': (60, 200, 60)}

WORK_SIDE = 2048  # pixels a side of the copy faces are searched on, and of the overlay
PHOTO_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
VIDEO_SUFFIXES = ('.mp4', '.mov', '.m4v', '.avi', '.mkv', '.webm')  # in folders (kfkd_video)


def _cv2():
    try:
        import cv2
    except ImportError:
        raise KfkdError("kfkd predict needs OpenCV 4: pip install 'opencv-python-headless<5'") \
            from None
    return cv2


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
    cv2 = _cv2()
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
    cv2 = _cv2()
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


def shrunk(image, factor):
    """`image` made `factor` (a whole number) times smaller, each pixel the
    mean of a block: a pixel i of the result spans pixels factor*i to
    factor*(i+1) of `image` exactly (a last partial block is dropped)."""
    if factor == 1:
        return image
    cv2 = _cv2()
    height, width = image.shape[0] // factor, image.shape[1] // factor
    return cv2.resize(image[:height * factor, :width * factor], (width, height),
                      interpolation=cv2.INTER_AREA)


def work_factor(image):
    """How many times smaller a copy of `image` must be to fit in WORK_SIDE
    pixels a side: the copy faces are searched on, and the overlay."""
    return max(1, math.ceil(max(image.shape[:2]) / WORK_SIDE))


@functools.lru_cache(maxsize=1)
def _face_cascade():
    """OpenCV's frontal-face cascade, read once for all photos."""
    cv2 = _cv2()
    if not hasattr(cv2, 'CascadeClassifier'):  # OpenCV 5 moved its Haar cascades out
        raise KfkdError(f"kfkd predict finds faces with OpenCV 4's face cascade, which OpenCV "
                        f"{cv2.__version__} lacks: pip install 'opencv-python-headless<5'")
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + 'haarcascade_frontalface_default.xml')
    if cascade.empty():
        raise KfkdError('OpenCV has no haarcascade_frontalface_default.xml; '
                        'install opencv-python-headless 4.x')
    return cascade


def detect_faces(gray, min_size=48):
    """Face boxes (x, y, width, height) found by OpenCV's frontal-face cascade,
    on a copy of at most WORK_SIDE pixels a side (faces from min_size pixels
    of that copy up)."""
    factor = work_factor(gray)
    boxes = _face_cascade().detectMultiScale(shrunk(gray, factor), scaleFactor=1.1,
                                             minNeighbors=5, minSize=(min_size, min_size))
    return [tuple(int(v) * factor for v in box) for box in boxes]


def frame(box):
    """The square (left, top, size) in the photo that maps to Kaggle's 96x96."""
    x, y, w, _ = box
    return x + FRAME_LEFT * w, y + FRAME_TOP * w, FRAME_SIZE * w


def crop(gray, box):
    """The face in `box`, scaled to 96x96 as Kaggle's faces are framed (uint8).

    A face of twice 96 pixels or more is first shrunk by averaging blocks of
    pixels: scaling it straight down would sample a few of its pixels and
    miss the rest.
    """
    cv2 = _cv2()
    left, top, size = frame(box)
    factor = max(1, int(size // IMAGE_SIZE))
    if factor > 1:  # the frame's part of the photo, shrunk; coordinates follow
        x0, y0 = max(0, math.floor(left)), max(0, math.floor(top))
        x1 = min(gray.shape[1], math.ceil(left + size))
        y1 = min(gray.shape[0], math.ceil(top + size))
        gray = shrunk(gray[y0:y1, x0:x1], factor)
        left, top, size = (left - x0) / factor, (top - y0) / factor, size / factor
    scale = IMAGE_SIZE / size
    # Maps a point p of the photo to (p - (left, top)) * scale in the crop,
    # where a pixel i spans i..i+1 (as keypoints count) while OpenCV puts it at i.
    to_crop = np.array([[scale, 0, scale * (0.5 - left) - 0.5],
                        [0, scale, scale * (0.5 - top) - 0.5]])
    return cv2.warpAffine(gray, to_crop, (IMAGE_SIZE, IMAGE_SIZE), flags=cv2.INTER_AREA,
                          borderMode=cv2.BORDER_REPLICATE)


def keypoints_in_photo(model, gray, boxes):
    """Keypoints (DataFrame: one row per face, one column per target, in the
    photo's pixels) that `model` predicts for the faces in `boxes`."""
    if not boxes:
        return pd.DataFrame(columns=COLUMNS, dtype=float)
    faces = np.stack([crop(gray, box) for box in boxes]).reshape(len(boxes), -1)
    predicted = predict_keypoints(model, scale_pixels(faces)).astype(float)
    for i, box in enumerate(boxes):
        predicted.iloc[i] = to_photo(predicted.iloc[i].to_numpy(), box)
    return predicted


def to_photo(points, box):
    """Points (x, y, x, y, ...) in the pixels of crop(gray, box), in the photo's."""
    left, top, size = frame(box)
    points = np.array(points, dtype=float)
    points[0::2] = left + points[0::2] * size / IMAGE_SIZE
    points[1::2] = top + points[1::2] * size / IMAGE_SIZE
    return points


def draw(image, boxes, keypoints):
    """The photo, at most WORK_SIDE pixels a side, with each face's box and
    keypoints (a DataFrame, as keypoints_in_photo gives them)."""
    factor = work_factor(image)
    image = shrunk(image, factor).copy()
    draw_faces(image, [[v / factor for v in box] for box in boxes],
               keypoints.to_numpy(dtype=float) / factor, keypoints.columns)
    return image


def draw_faces(image, boxes, points, columns=COLUMNS):
    """Each face's box (x, y, width, height) and keypoints (a row of `points`
    per face, x, y, x, y, ... in `columns`' order) drawn on `image` itself:
    the subject's left keypoints blue, right ones orange, the others green."""
    cv2 = _cv2()
    thickness = max(1, round(max(image.shape[:2]) / 400))
    sides = keypoint_sides(columns)
    for (x, y, w, h), row in zip(boxes, points):
        cv2.rectangle(image, (round(x), round(y)), (round(x) + round(w), round(y) + round(h)),
                      (80, 200, 80), thickness)
        for side, px, py in zip(sides, row[0::2], row[1::2]):
            if np.isfinite(px) and np.isfinite(py):
                cv2.circle(image, (round(px), round(py)), max(2, round(w / 60)),
                           SIDE_COLOURS[side], -1, cv2.LINE_AA)


def keypoints_record(columns, values):
    """A face's keypoints as the JSON files give them: {name: [x, y]} in
    pixels, to 0.01, from the values of `columns` (x and y of each, in turn)."""
    return {x[:-2]: [round(float(a), 2), round(float(b), 2)]
            for x, a, b in zip(list(columns)[0::2], values[0::2], values[1::2])}


def predict_photos(model, photos, out_dir, names=None):
    """Predict keypoints on each photo; write keypoints.csv, keypoints.json and
    one NAME-keypoints.png overlay per photo into `out_dir`, NAME as
    output_names gives it (or as `names` does, one per photo). Returns the
    table, whose column photo names each row's photo as given."""
    cv2 = _cv2()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables, records = [], []
    for photo, name in zip(map(Path, photos), names or output_names(photos)):
        image, gray = read_photo(photo)
        boxes = detect_faces(gray)
        keypoints = keypoints_in_photo(model, gray, boxes)
        overlay = out_dir / f'{name}-keypoints.png'
        overlay.parent.mkdir(parents=True, exist_ok=True)
        ok, png = cv2.imencode('.png', draw(image, boxes, keypoints))
        with atomic_write(overlay) as f:
            f.write(png.tobytes())
        print(f'{photo}: {len(boxes)} face(s) -> {overlay}' if boxes else
              f'{photo}: no face found -> {overlay}')
        table = pd.DataFrame(boxes, columns=['box_x', 'box_y', 'box_width', 'box_height'])
        table.insert(0, 'face', range(1, len(boxes) + 1))
        table.insert(0, 'photo', str(photo))
        tables.append(pd.concat([table, keypoints.reset_index(drop=True).round(2)], axis=1))
        records.append({'photo': str(photo), 'faces': [
            {'box': list(box), 'keypoints': keypoints_record(points.index, points.to_numpy())}
            for box, (_, points) in zip(boxes, keypoints.iterrows())]})
    result = pd.concat(tables, ignore_index=True)
    with atomic_write(out_dir / 'keypoints.csv', 'w') as f:
        result.to_csv(f, index=False)
    with atomic_write(out_dir / 'keypoints.json', 'w') as f:
        json.dump(records, f, indent=1)
    print(f'Wrote {out_dir / "keypoints.csv"} and {out_dir / "keypoints.json"}')
    return result
