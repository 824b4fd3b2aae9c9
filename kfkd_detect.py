"""Faces found on images, each as the square Kaggle's 96x96 faces are cut from.

Two detectors, both OpenCV's:

  yunet  the default: YuNet (Shiqi Yu et al., MIT licence; kfkd ships its
         ONNX file, kfkd_models/face_detection_yunet_2023mar.onnx), a small
         net that gives five points with each face (eyes, nose tip, mouth
         corners). kfkd frames the face from those points, so a face turned
         in the image is framed turned: its crop comes out upright. YuNet
         looks on the image as it is and turned by TURNS, for faces turned
         further than it finds on its own.
  haar   OpenCV 4's frontal-face Haar cascade (OpenCV 5 no longer has it),
         upright faces only, framed from its box: what kfkd used before YuNet.

A face comes as a Frame. It imports kfkd_io only.
"""
import cmath
import functools
import math
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kfkd_io import IMAGE_SIZE, MODELS, KfkdError, opencv

YUNET_FILE = MODELS / 'face_detection_yunet_2023mar.onnx'

# Where YuNet's five points lie in Kaggle's 96x96 frame (x, y; the subject's
# right eye, left eye, nose tip, right and left mouth corners), seen as a
# Detector looks again at a face it found: the medians over real faces framed
# like Kaggle's, measured by bench/framing.py.
YUNET_POINTS = np.array([[32.7, 38.0], [63.1, 37.9], [48.2, 55.3], [35.4, 69.4], [61.2, 69.5]])

# Where Kaggle's 96x96 frame lies around the Haar cascade's face box, in box
# widths (left, top, side): medians measured as YUNET_POINTS are.
HAAR_FRAME = (-0.048, -0.033, 1.113)

# The turns (degrees) of the image YuNet also looks on, for faces turned
# further than it finds on its own (docs/photo-video.md#turned-faces).
TURNS = (0, 30, -30)
# Detections are kept from this score up (YuNet's, 0 to 1).
MIN_SCORE = 0.7
# Checking a followed face (present): the square looked in, in the face's
# frames, and its side in pixels for the detector.
WINDOW, WINDOW_PIXELS = 1.8, 160


@dataclass(frozen=True)
class Frame:
    """The square of an image that maps onto Kaggle's 96x96 face: its middle
    (x, y) and side in the image's pixels, and the face's turn in degrees
    (positive: clockwise as seen, the image's y pointing down)."""
    x: float
    y: float
    size: float
    angle: float = 0.0

    def _scale_turn(self):
        """The map from the face's 96x96 to the image as one complex number:
        image point = middle + m * (face point - 48)."""
        return self.size / IMAGE_SIZE * cmath.exp(1j * math.radians(self.angle))

    def to_image(self, points, pixels=IMAGE_SIZE):
        """Points (x, y, x, y, ...) in the pixels of a pixels x pixels picture
        of this square (by default the face's 96x96), in the image's."""
        points = np.asarray(points, dtype=float) * (IMAGE_SIZE / pixels)
        z = points[0::2] + 1j * points[1::2]
        z = complex(self.x, self.y) + self._scale_turn() * (z - IMAGE_SIZE / 2 * (1 + 1j))
        result = np.empty_like(points)
        result[0::2], result[1::2] = z.real, z.imag
        return result

    def to_face(self, points):
        """Points (x, y, ...) in the image's pixels, in the face's 96x96."""
        points = np.asarray(points, dtype=float)
        z = (points[0::2] + 1j * points[1::2] - complex(self.x, self.y)) / self._scale_turn()
        result = np.empty_like(points)
        result[0::2], result[1::2] = z.real + IMAGE_SIZE / 2, z.imag + IMAGE_SIZE / 2
        return result

    def matrix(self, pixels=IMAGE_SIZE):
        """The 2x3 map (for cv2.warpAffine) from the image's pixels to a
        pixels x pixels picture of this square, where a pixel i spans i..i+1
        (as keypoints count) while OpenCV puts it at i."""
        inverse = pixels / IMAGE_SIZE / self._scale_turn()
        a, b = inverse.real, inverse.imag
        # (u + iv) = inverse * (p - middle) + pixels/2, then the half pixel on each side
        shift = (pixels / 2 * (1 + 1j) - inverse * complex(self.x, self.y) +
                 (inverse - 1) * 0.5 * (1 + 1j))
        return np.array([[a, -b, shift.real], [b, a, shift.imag]])

    def in_smaller(self, factor, left=0, top=0):
        """The same square in the image cut from (left, top) and made `factor`
        times smaller (a pixel there spans `factor` pixels here)."""
        return Frame((self.x - left) / factor, (self.y - top) / factor, self.size / factor,
                     self.angle)

    def corners(self):
        """The square's four corners in the image, (4, 2), clockwise from its top left."""
        return self.to_image([0, 0, IMAGE_SIZE, 0, IMAGE_SIZE, IMAGE_SIZE,
                              0, IMAGE_SIZE]).reshape(4, 2)

    def box(self):
        """(x, y, width, height) of the upright box around the square."""
        corners = self.corners()
        (x0, y0), (x1, y1) = corners.min(0), corners.max(0)
        return x0, y0, x1 - x0, y1 - y0

    @classmethod
    def fitted(cls, face_points, image_points):
        """The square in which `image_points` sit as `face_points` sit in the
        96x96 (both (n, 2), NaN rows left out): a least-squares fit of a turn,
        a scale and a move. Returns it, and the points' distance from the fit
        (RMS, in pixels of the 96x96)."""
        face_points, image_points = np.asarray(face_points), np.asarray(image_points)
        found = ~np.isnan(image_points).any(1)
        q = face_points[found] @ (1, 1j)
        p = image_points[found] @ (1, 1j)
        q0, p0 = q - q.mean(), p - p.mean()
        m = (p0 * q0.conjugate()).sum() / (abs(q0) ** 2).sum()
        distance = np.sqrt((abs(p0 - m * q0) ** 2).mean()) / abs(m)
        middle = p.mean() + m * (IMAGE_SIZE / 2 * (1 + 1j) - q.mean())
        return cls(middle.real, middle.imag, IMAGE_SIZE * abs(m),
                   math.degrees(cmath.phase(m))), distance


def shrunk(image, factor):
    """`image` made `factor` (a whole number) times smaller, each pixel the
    mean of a block: a pixel i of the result spans pixels factor*i to
    factor*(i+1) of `image` exactly (a last partial block is dropped)."""
    if factor == 1:
        return image
    cv2 = opencv()
    height, width = image.shape[0] // factor, image.shape[1] // factor
    return cv2.resize(image[:height * factor, :width * factor], (width, height),
                      interpolation=cv2.INTER_AREA)


def cut(image, frame, pixels, border='constant'):
    """The square `frame` of `image`, turned upright, as a pixels x pixels
    image (edges beyond the image black, or with border 'replicate' the edge
    pixels repeated). A square of twice `pixels` or more is first shrunk by
    averaging blocks of pixels: scaling it straight down would sample a few
    of its pixels and miss the rest."""
    cv2 = opencv()
    factor = max(1, int(frame.size // pixels))
    x, y, width, height = frame.box()
    x0, y0 = max(0, math.floor(x)), max(0, math.floor(y))
    x1 = min(image.shape[1], math.ceil(x + width))
    y1 = min(image.shape[0], math.ceil(y + height))
    if factor > 1 and min(x1 - x0, y1 - y0) >= factor:  # its part of the image, shrunk
        image = shrunk(image[y0:y1, x0:x1], factor)
        frame = frame.in_smaller(factor, x0, y0)
    return cv2.warpAffine(image, frame.matrix(pixels), (pixels, pixels), flags=cv2.INTER_LINEAR,
                          borderMode={'constant': cv2.BORDER_CONSTANT,
                                      'replicate': cv2.BORDER_REPLICATE}[border])


Detection = namedtuple('Detection', 'frame score')


def same_face(a, b):
    """Whether frames `a` and `b` are of one face: their middles close for their size."""
    return math.hypot(a.x - b.x, a.y - b.y) < 0.5 * max(a.size, b.size)


def merged(detections):
    """`detections` without repeats: where several are of one face, the best scored."""
    kept = []
    for detection in sorted(detections, key=lambda d: -d.score):
        if not any(same_face(detection.frame, other.frame) for other in kept):
            kept.append(detection)
    return kept


class Detector:
    """Finds faces on BGR images: detector(image) -> [Detection], on a copy of
    at most `max_side` pixels a side, faces from `min_size` pixels of that
    copy up, each image also turned by `turns` (degrees). With `refine`, each
    face found is looked at again, turned upright and at one scale (as
    `present` looks), and framed from that: alike whatever its size or turn."""
    refine = True

    def __init__(self, max_side=1280, min_size=24, turns=(0,)):
        self.max_side, self.min_size, self.turns = max_side, min_size, turns

    def __call__(self, image):
        cv2 = opencv()
        factor = max(1.0, max(image.shape[:2]) / self.max_side)
        small = image if factor == 1 else cv2.resize(
            image, (round(image.shape[1] / factor), round(image.shape[0] / factor)),
            interpolation=cv2.INTER_AREA)
        found = []
        for turn in self.turns:
            # turned counterclockwise by `turn`, a face turned clockwise by as much is upright
            turning = cv2.getRotationMatrix2D((small.shape[1] / 2 - 0.5, small.shape[0] / 2 - 0.5),
                                              turn, 1)
            turned = small if turn == 0 else cv2.warpAffine(
                small, turning, small.shape[1::-1], flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REPLICATE)
            back = cv2.invertAffineTransform(turning)
            for frame, score in self.faces(turned):
                x, y = back @ (frame.x - 0.5, frame.y - 0.5, 1) + 0.5
                found.append(Detection(Frame(x, y, frame.size, frame.angle + turn), score))
        found = merged(found)
        if self.refine:
            found = [self.present(small, detection.frame) or detection for detection in found]
        return [Detection(frame.in_smaller(1 / factor), score) for frame, score in found]

    def faces(self, image):
        """The faces on `image` as it is: (Frame, score) each."""
        raise NotImplementedError

    def present(self, image, frame):
        """The detection of the face followed in `frame`, looked for in a square
        WINDOW times its size around it, turned upright; None where no face
        is there (the face has gone)."""
        window = Frame(frame.x, frame.y, frame.size * WINDOW, frame.angle)
        best = None
        for found, score in self.faces(cut(image, window, WINDOW_PIXELS)):
            # back from the window's pixels to the image's
            x, y = window.to_image([found.x, found.y], WINDOW_PIXELS)
            found = Frame(x, y, found.size * window.size / WINDOW_PIXELS,
                          found.angle + window.angle)
            if same_face(found, frame) and 0.5 < found.size / frame.size < 2 and (
                    best is None or score > best.score):
                best = Detection(found, score)
        return best


class YuNet(Detector):
    """OpenCV's YuNet, from `path` (the ONNX file kfkd ships by default)."""

    def __init__(self, path=YUNET_FILE, turns=TURNS, min_score=MIN_SCORE, **options):
        super().__init__(turns=turns, **options)
        cv2 = opencv()
        if tuple(int(part) for part in cv2.__version__.split('.')[:2]) < (4, 8):
            raise KfkdError(f'OpenCV {cv2.__version__} cannot run YuNet (from 4.8 on): '
                            f"pip install -U 'kfkd[photo]', or --detector haar")
        if not Path(path).is_file():
            raise KfkdError(f'{path}: the face detector is not there; reinstall kfkd '
                            f'(pip install --force-reinstall kfkd)')
        # OpenCV 5 warns, as it reads the file, of a setting its new engine ignores
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        try:
            self.net = cv2.FaceDetectorYN.create(str(path), '', (320, 320), min_score, 0.3, 5000)
        except cv2.error:
            raise KfkdError(f'{path}: not a YuNet face detector OpenCV can read (damaged?); '
                            f'reinstall kfkd, or use --detector haar') from None
        finally:
            cv2.utils.logging.setLogLevel(level)
        self.size = (320, 320)

    def points(self, image):
        """YuNet's faces on `image` as it is: (five points (5, 2), score) each."""
        size = (image.shape[1], image.shape[0])
        if size != self.size:
            self.net.setInputSize(size)
            self.size = size
        _, faces = self.net.detect(image)
        # + 0.5: OpenCV puts a pixel i at i, keypoints count it as spanning i..i+1
        return [(face[4:14].reshape(5, 2) + 0.5, float(face[14])) for face in
                (faces if faces is not None else []) if min(face[2:4]) >= self.min_size]

    def faces(self, image):
        return [(Frame.fitted(YUNET_POINTS, points)[0], score)
                for points, score in self.points(image)]


class Haar(Detector):
    """OpenCV 4's frontal-face Haar cascade: upright faces, framed from its box
    (which steps in sizes a tenth apart: looking again at one scale would not
    frame them closer)."""
    refine = False

    def __init__(self, min_size=48, max_side=2048, **options):
        super().__init__(min_size=min_size, max_side=max_side, **options)
        self.cascade = _face_cascade()

    def faces(self, image):
        cv2 = opencv()
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
        left, top, side = HAAR_FRAME
        return [(Frame(x + (left + side / 2) * w, y + (top + side / 2) * w, side * w), 1.0)
                for x, y, w, _ in self.cascade.detectMultiScale(
                    gray, scaleFactor=1.1, minNeighbors=5,
                    minSize=(self.min_size, self.min_size))]


@functools.lru_cache(maxsize=1)
def _face_cascade():
    cv2 = opencv()
    if not hasattr(cv2, 'CascadeClassifier'):  # OpenCV 5 moved its Haar cascades out
        raise KfkdError(f"--detector haar needs OpenCV 4's face cascade, which OpenCV "
                        f"{cv2.__version__} lacks: pip install 'opencv-python-headless<5', "
                        f"or use the default detector (yunet)")
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + 'haarcascade_frontalface_default.xml')
    if cascade.empty():
        raise KfkdError('OpenCV has no haarcascade_frontalface_default.xml; '
                        'install opencv-python-headless 4.x, or use the default detector (yunet)')
    return cascade


DETECTORS = {'yunet': YuNet, 'haar': Haar}


def detector(name='yunet', **options):
    """A Detector by name (DETECTORS), with its options."""
    if name not in DETECTORS:
        raise KfkdError(f'--detector {name}: one of {", ".join(DETECTORS)}')
    return DETECTORS[name](**options)
