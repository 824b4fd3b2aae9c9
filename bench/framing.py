"""Where each face detector's output lies in Kaggle's 96x96 frame: kfkd_detect's constants.

    python bench/framing.py [--data ../shared/data/faces] [--faces 1500]

Each training face, framed as Kaggle's are, is scaled up 4x onto a canvas of
its own edge pixels (a face in a photo). The Haar cascade runs on that, with
kfkd_detect's settings; YuNet on the square around the face that a Detector
looks at again to frame a face it found (WINDOW times the face, WINDOW_PIXELS
a side), as kfkd_detect's present() cuts it out. Printed: how many each found,
and the medians (with the middle half's spread) of YuNet's five points in the
96x96's pixels (YUNET_POINTS) and of the Haar cascade's box in box widths
(HAAR_FRAME).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kfkd_detect  # noqa: E402
import kfkd_io  # noqa: E402
from epochs import cpu_name  # noqa: E402

SCALE, CANVAS = 4, 800


def on_canvas(face):
    """A 96x96 face scaled SCALE times, in the middle of a CANVAS-pixel square
    of its edge pixels (BGR), and where the face's left/top edge lies on it."""
    cv2 = kfkd_io.opencv()
    big = cv2.resize(face, None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_CUBIC)
    margin = (CANVAS - big.shape[0]) // 2
    canvas = cv2.copyMakeBorder(big, margin, margin, margin, margin, cv2.BORDER_REPLICATE)
    return cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR), margin


def quartiles(values):
    low, middle, high = np.percentile(values, [25, 50, 75], axis=0)
    return middle, (high - low) / 2


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', default=str(Path(__file__).resolve().parents[2] / 'shared' /
                                              'data' / 'faces'))
    parser.add_argument('--faces', type=int, default=1500)
    args = parser.parse_args()
    faces = kfkd_io.read(data_dir=args.data)[1][:args.faces]
    yunet, haar = kfkd_detect.YuNet(turns=(0,)), kfkd_detect.Haar()
    points, boxes = [], []
    for face in faces:
        canvas, margin = on_canvas(face.reshape(96, 96))
        face_frame = kfkd_detect.Frame(CANVAS / 2, CANVAS / 2, 96 * SCALE)
        window = kfkd_detect.Frame(CANVAS / 2, CANVAS / 2, 96 * SCALE * kfkd_detect.WINDOW)
        found = yunet.points(kfkd_detect.cut(canvas, window, kfkd_detect.WINDOW_PIXELS))
        if len(found) == 1:
            in_canvas = window.to_image(found[0][0].reshape(-1), kfkd_detect.WINDOW_PIXELS)
            points.append(face_frame.to_face(in_canvas).reshape(5, 2))
        found = haar.cascade.detectMultiScale(canvas[..., 0], scaleFactor=1.1, minNeighbors=5,
                                              minSize=(48, 48))
        if len(found) == 1:
            x, y, w, _ = found[0]
            boxes.append([-(x - margin) / w, -(y - margin) / w, 96 * SCALE / w])
    print(f'# {cpu_name()}; {len(faces)} faces of {args.data}, scaled {SCALE}x on a '
          f'{CANVAS}-pixel canvas of their edge pixels\n')
    middle, spread = quartiles(np.array(points))
    print(f'YuNet found one face on {len(points)} ({len(points) / len(faces):.1%}); its points '
          f'in the 96x96 (median, +- half the middle half):')
    for name, (x, y), (sx, sy) in zip(('right eye', 'left eye', 'nose tip', 'right mouth corner',
                                       'left mouth corner'), middle, spread):
        print(f'  {name:20s} ({x:5.1f}, {y:5.1f})  +-({sx:.1f}, {sy:.1f})')
    print('  YUNET_POINTS = np.array([' + ', '.join(f'[{x:.1f}, {y:.1f}]' for x, y in middle) +
          '])')
    middle, spread = quartiles(np.array(boxes))
    print(f'\nHaar cascade found one face on {len(boxes)} ({len(boxes) / len(faces):.1%}); the '
          f'frame around its box, in box widths: left {middle[0]:.3f}, top {middle[1]:.3f}, '
          f'side {middle[2]:.3f} (+-{spread[0]:.3f}, {spread[1]:.3f}, {spread[2]:.3f})')


if __name__ == '__main__':
    main()
