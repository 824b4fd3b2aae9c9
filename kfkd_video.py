"""Keypoints on videos and from a camera: `kfkd predict CLIP.mp4`, `kfkd predict --camera 0`.

Frame by frame, as kfkd_photo does it for a photo, but steadier and faster:

  - Tracking: the face detector (kfkd_detect) looks on the whole frame every
    `detect_every` frames, and on every frame while no face is followed; in
    between, each face's square (the one Kaggle's faces are cut from) follows
    its keypoints of the frame before. On every frame it also looks for each
    face followed around where it was: a face not there has gone, and its
    track ends. A face keeps its id while it is followed.
  - Smoothing: each face's keypoints go through a One Euro filter (Casiez,
    Roussel and Vogel, CHI 2012) on the video's own timestamps, with its speed
    measured in pixels of the 96-pixel face, so that it holds still faces still
    and follows moving ones, whatever their size on screen.
  - One pass over the video in bounded memory: a frame is read, predicted,
    drawn and written before the next, and the rows go to disk as they come.

It writes NAME-keypoints.mp4 (the input's frames, rate and size, rotation
applied, with the faces drawn), NAME-keypoints.csv and NAME-keypoints.jsonl (a
row per face per frame: frame, time_ms, face, box, found, the 30 keypoints,
their confidences, the head's pose; a frame without a face is a row with
found 'none' and no keypoints). Ctrl-C or a damaged file stops it with every
file complete for the frames so far. It imports kfkd_engine, kfkd_io,
kfkd_detect, kfkd_photo and kfkd_pose.
"""
import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import kfkd_detect
from kfkd_detect import Frame, same_face
from kfkd_engine import progress_bar, stop_requests
from kfkd_io import (COLUMNS, IMAGE_SIZE, MEAN_FACE, KfkdError, atomic_path, atomic_write,
                     opencv)
from kfkd_photo import FaceNet, confidence_columns, crop, draw_faces, face_record
from kfkd_pose import POSE, head_poses

DETECT_EVERY = 10  # frames between detections: see bench/video.py and docs/benchmarks.md
# Frames are searched for new faces on a copy of at most this many pixels a
# side (a face followed is checked at its own scale): faces of about a tenth
# of the frame's height and up are found.
DETECT_SIDE = 320
# A face is lost when its keypoints stop looking like a face: their distance
# from the mean face fitted to them, in pixels of the 96-pixel face.
LOST_AT = 9.0

# The first bytes of video containers OpenCV's FFmpeg reads, for telling a
# video from a photo by what it holds rather than by its name.
VIDEO_SIGNATURES = [(4, b'ftyp'), (0, b'\x1aE\xdf\xa3'), (8, b'AVI '), (0, b'FLV'),
                    (0, b'\x00\x00\x01\xba'), (0, b'\x00\x00\x01\xb3'), (0, b'OggS')]


def is_video(path):
    """Whether the file at `path` holds a video (MP4/MOV, Matroska/WebM, AVI,
    FLV, MPEG, Ogg), by its first bytes."""
    with open(path, 'rb') as f:
        head = f.read(16)
    return any(head[at:at + len(magic)] == magic for at, magic in VIDEO_SIGNATURES)


class OneEuroFilter:
    """The One Euro filter over a face's keypoints: a low-pass filter whose
    cutoff rises with speed, so that slow jitter is smoothed away and fast
    motion gets through with little lag.

    `min_cutoff` (Hz) sets the smoothing of a still face, `beta` how quickly
    the cutoff rises with speed, measured in pixels of the 96-pixel face per
    second, `speed_cutoff` (Hz) the smoothing of that speed. The defaults are
    measured (bench/video.py; docs/benchmarks.md): a still face's keypoints
    steadier, a face panning at a pixel a frame followed less than a frame behind.
    """

    def __init__(self, min_cutoff=0.5, beta=0.3, speed_cutoff=1.0):
        self.min_cutoff, self.beta, self.speed_cutoff = min_cutoff, beta, speed_cutoff
        self.last = self.speed = self.time = None

    @staticmethod
    def _alpha(cutoff, seconds):
        return 1 / (1 + 1 / (2 * math.pi * cutoff * seconds))

    def __call__(self, points, seconds, face_size):
        """`points` (pixels) filtered, at `seconds` (the frame's time), for a
        face `face_size` pixels a side."""
        if self.last is None or seconds <= self.time:
            self.last, self.speed, self.time = points, np.zeros_like(points), seconds
            return points
        step = seconds - self.time
        speed = (points - self.last) / step * (IMAGE_SIZE / face_size)
        self.speed += self._alpha(self.speed_cutoff, step) * (speed - self.speed)
        cutoff = self.min_cutoff + self.beta * np.abs(self.speed)
        self.last = self.last + self._alpha(cutoff, step) * (points - self.last)
        self.time = seconds
        return self.last


@dataclass
class Face:
    """A face followed from frame to frame: `frame` is where to look for it in
    the next frame (kfkd_detect.Frame), `found` how that frame came (detected,
    or tracked from its keypoints)."""
    id: int
    frame: Frame
    found: str = 'detected'
    smooth: OneEuroFilter = field(default_factory=OneEuroFilter)
    size: float = None  # its keypoints' frame's side in the last frame, in pixels


# FFmpeg decodes with a thread per CPU it sees (in a container, maybe the host's), each
# holding frames in flight: at 8K, many threads cost gigabytes (docs/benchmarks.md).
DECODE_THREADS = 2


class Source:
    """Frames from a video file or a camera: (index, time in ms, BGR image),
    rotated as the file's metadata says."""

    def __init__(self, path=None, camera=None):
        cv2 = opencv()
        self.name = f'camera {camera}' if path is None else str(path)
        self.stem = f'camera{camera}' if path is None else Path(path).stem
        self.capture = (cv2.VideoCapture(camera) if path is None else
                        cv2.VideoCapture(str(path), cv2.CAP_ANY,
                                         [cv2.CAP_PROP_N_THREADS, DECODE_THREADS]))
        if not self.capture.isOpened():
            raise KfkdError(f'camera {camera}: cannot open it (is it there, and free?)'
                            if path is None else f'{path}: OpenCV cannot open this video '
                            f'(damaged, cut short before its index, or without frames)')
        self.capture.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)
        fps = self.capture.get(cv2.CAP_PROP_FPS)
        self.fps = fps if 0 < fps < 1000 else 30.0
        count = int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT))
        self.frames = count if path is not None and count > 0 else None

    def __iter__(self):
        cv2 = opencv()
        index = 0
        while True:
            ok, image = self.capture.read()
            if not ok:
                return
            milliseconds = self.capture.get(cv2.CAP_PROP_POS_MSEC)
            yield index, milliseconds if milliseconds > 0 or index == 0 else (
                index * 1000 / self.fps), image
            index += 1

    def close(self):
        self.capture.release()


class Outputs:
    """The annotated video and the rows, written to temporary files beside
    their places and moved there when done (or stopped): never half a file."""

    HEADER = ['frame', 'time_ms', 'face', 'box_x', 'box_y', 'box_width', 'box_height',
              'found']

    def __init__(self, out_dir, name, fps, size, columns=COLUMNS):
        cv2 = opencv()
        self.columns = columns
        self.places = {kind: out_dir / f'{name}-keypoints.{kind}' for kind in ('mp4', 'csv',
                                                                                'jsonl')}
        folder = self.places['mp4'].parent
        folder.mkdir(parents=True, exist_ok=True)
        self.files = contextlib.ExitStack()
        video = self.files.enter_context(atomic_path(self.places['mp4'], suffix='.mp4'))
        self.video = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*'mp4v'), fps, size)
        try:
            if not self.video.isOpened():
                raise KfkdError(f'{folder}: OpenCV cannot write an mp4 video there')
            self.csv = self.files.enter_context(atomic_write(self.places['csv'], 'w'))
            self.jsonl = self.files.enter_context(atomic_write(self.places['jsonl'], 'w'))
        except BaseException:
            self.discard()
            raise
        self.csv.write(','.join(self.HEADER + list(columns) + confidence_columns(columns) +
                                list(POSE)) + '\n')

    def write(self, index, milliseconds, image, faces, poses):
        """The frame `image`, and a row per face (id, box around its frame,
        found, keypoints, their confidences, its pose), or one saying there
        was none: a frame without a face has no keypoints."""
        self.video.write(image)
        for (face, frame, found, row, sure), pose in zip(faces, poses):
            values = [index, round(milliseconds, 1), face, *np.round(frame.box(), 1), found,
                      *np.round(row, 2), *np.round(sure, 3), *np.round(pose, 1)]
            self._rows(values, {'frame': index, 'time_ms': round(milliseconds, 1),
                                'face': face, 'box': [round(v, 1) for v in frame.box()],
                                'found': found, **face_record(self.columns, row, sure, pose)})
        if not faces:
            empty = len(self.columns) + len(self.columns) // 2 + len(POSE)
            self._rows([index, round(milliseconds, 1), '', *[math.nan] * 4, 'none',
                        *[math.nan] * empty],
                       {'frame': index, 'time_ms': round(milliseconds, 1), 'face': None,
                        'box': None, 'found': 'none', 'keypoints': None, 'confidence': None,
                        'pose': None})

    def _rows(self, values, record):
        self.csv.write(','.join('' if isinstance(v, float) and math.isnan(v) else str(v)
                                for v in values) + '\n')
        self.jsonl.write(json.dumps(record) + '\n')

    def finish(self):
        """Every file moved to its place, complete."""
        self.video.release()
        self.files.close()
        return self.places

    def discard(self):
        """Every file removed, none moved: the files' blocks left as an error
        leaves them."""
        self.video.release()
        self.files.__exit__(KfkdError, KfkdError('discarded'), None)


def _timed(timings, stage, function, *args):
    """function(*args), its seconds added to timings[stage] (what bench/video.py
    reports for each stage)."""
    started = time.perf_counter()
    result = function(*args)
    timings[stage] = timings.get(stage, 0) + time.perf_counter() - started
    return result


class Tracker:
    """Faces found in a video's frames and followed from frame to frame: the
    detector looks on the whole frame every `detect_every` frames (and on
    every frame while no face is followed), and for each face followed, on
    every frame, around where it was: a face it does not find there has gone."""

    def __init__(self, net, detector, detect_every=DETECT_EVERY, smooth=True, timings=None):
        self.net, self.detector = net, detector
        self.detect_every, self.smooth = detect_every, smooth
        self.mean_face = MEAN_FACE.reshape(-1)[[COLUMNS.index(c) for c in net.columns]]
        self.faces, self.next_id, self.since_detection = [], 1, None
        self.timings = timings if timings is not None else {}

    def __call__(self, image, gray, seconds):
        """This frame's faces: a (face id, frame, how it was found, keypoints
        in pixels, their confidences) for each."""
        if (not self.faces or self.since_detection is None or
                self.since_detection + 1 >= self.detect_every):
            self._detect(image)
        else:
            self.since_detection += 1
            self.faces = [face for face in self.faces if self._present(image, face)]
        if not self.faces:
            return []
        points, confidence = self._keypoints(gray, [face.frame for face in self.faces])
        shown, kept = [], []
        for face, row, sure in zip(self.faces, points, confidence):
            if self.smooth:
                row = _timed(self.timings, 'smooth', face.smooth, row, seconds,
                             face.size or face.frame.size)
            frame, distance = _timed(self.timings, 'track', Frame.fitted,
                                     self.mean_face.reshape(-1, 2), row.reshape(-1, 2))
            if self._lost(face, frame, distance, gray.shape):
                continue  # the detector looks for it again in the next frame
            shown.append((face.id, face.frame, face.found, row, sure))
            face.frame, face.found, face.size = frame, 'tracked', frame.size
            kept.append(face)
        if len(kept) < len(self.faces):
            self.since_detection = None
        self.faces = kept
        return shown

    @staticmethod
    def _lost(face, frame, distance, shape):
        """Whether keypoints that fit `frame` that far from a face no longer follow one."""
        x, y, width, height = frame.box()
        inside = x + width > 0 and y + height > 0 and x < shape[1] and y < shape[0]
        jump = face.size and not 0.7 < frame.size / face.size < 1.4
        return distance > LOST_AT or frame.size < 16 or not inside or jump

    def _keypoints(self, gray, frames):
        faces = _timed(self.timings, 'crop', lambda: np.stack([crop(gray, f) for f in frames]))
        points, confidence = _timed(self.timings, 'net', self.net, faces)
        return np.stack([frame.to_image(row) for row, frame in zip(points, frames)]), confidence

    def _present(self, image, face):
        """Whether the detector still finds `face` around where it was."""
        return _timed(self.timings, 'detect', self.detector.present, image,
                      face.frame) is not None

    def _detect(self, image):
        """Find the faces. A detection of a face already followed is that face:
        it keeps its id, and its frame where the keypoints and the detector
        agree (the keypoints frame a face better), else takes the detector's.
        A face followed that the detection missed is looked for around where
        it was, and dropped where it is not there; new faces join."""
        self.since_detection = 0
        seen = []
        for detection in _timed(self.timings, 'detect', self.detector, image):
            box = detection.frame.box()
            face = max((f for f in self.faces if f not in seen),
                       key=lambda f: _overlap(f.frame.box(), box), default=None)
            if face is None or not (_overlap(face.frame.box(), box) > 0.3 or
                                    same_face(face.frame, detection.frame)):
                face = Face(self.next_id, detection.frame)
                self.next_id += 1
                self.faces.append(face)
            elif _overlap(face.frame.box(), box) < 0.5:
                face.frame, face.found, face.size = detection.frame, 'detected', None
            seen.append(face)
        self.faces = [face for face in self.faces if face in seen or self._present(image, face)]


def _overlap(a, b):
    """Intersection over union of two boxes (x, y, width, height)."""
    width = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    height = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def predict_video(model, out_dir, path=None, camera=None, detect_every=DETECT_EVERY,
                  smooth=True, timings=None, name=None, detector='yunet', draw_poses=False):
    """Predict keypoints on every frame of the video at `path` (or camera
    number `camera`) and write NAME-keypoints.mp4, .csv and .jsonl into
    `out_dir`, NAME being `name` (a path below `out_dir`; by default the
    video's stem, or cameraN). Returns the places written. Ctrl-C stops it with complete
    files for the frames so far (then KeyboardInterrupt goes on up); a video
    damaged or cut short is written up to the damage, then reported (KfkdError).
    Faces are found by `detector` (kfkd_detect's name, or a Detector); with
    `draw_poses`, the video shows each head's axes."""
    cv2 = opencv()
    find = (kfkd_detect.detector(detector, max_side=DETECT_SIDE)
            if isinstance(detector, str) else detector)
    source = Source(path, camera)
    timings = timings if timings is not None else {}
    net = FaceNet(model)
    tracker = Tracker(net, find, detect_every, smooth, timings)
    outputs = frames = None
    try:
        with progress_bar(total=source.frames, unit='frame', desc=source.stem) as bar, \
                stop_requests() as stop:  # the frame at hand is written whole
            reading = iter(source)
            while True:
                item = _timed(timings, 'decode', next, reading, None)
                if item is None:
                    break
                index, milliseconds, image = item
                if outputs is None:
                    outputs = Outputs(Path(out_dir), name or source.stem, source.fps,
                                      (image.shape[1], image.shape[0]), net.columns)
                gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
                faces = tracker(image, gray, milliseconds / 1000)
                _, frames, _, points, confidence = zip(*faces) if faces else [()] * 5
                poses = _timed(timings, 'pose', head_poses, np.array(points), net.columns,
                               image.shape[1::-1])
                _timed(timings, 'draw', draw_faces, image, frames, points, confidence,
                       net.columns, poses if draw_poses else None)
                _timed(timings, 'encode', outputs.write, index, milliseconds, image, faces,
                       poses)
                frames = index + 1
                bar.update()
                if stop:
                    raise KeyboardInterrupt
    except BaseException:
        if outputs is not None:
            outputs.finish()  # the frames so far, complete and playable
        source.close()
        raise
    source.close()
    if outputs is None:
        raise KfkdError(f'{source.name}: a video without a frame OpenCV can read')
    places = outputs.finish()
    print(f'{source.name}: {frames} frames, {tracker.next_id - 1} face(s) -> '
          f'{places["mp4"]}, {places["csv"].name}, {places["jsonl"].name}')
    if source.frames and frames < source.frames - 1:
        raise KfkdError(f'{source.name}: damaged or cut short: read {frames} of the '
                        f'{source.frames} frames its header announces; wrote those {frames}')
    return places
