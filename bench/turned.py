"""Faces turned in the image: how many each detector finds, and how close the keypoints come.

    python bench/turned.py [--data ../shared/data/faces] [--model FILE] [--faces 150]

Labelled faces of the people the model held out (its --groups), each scaled
to 288 pixels on a 480x480 canvas of its own edge pixels (a face in a photo)
and turned about the middle by 0, 15, 30 and 45 degrees (every other face the
other way), then through `kfkd predict`'s steps: the detector, the crop (turned
upright where the detector says how far the face is turned), the net with its
test-time flips and shifts, the keypoints mapped back. Printed for each
detector and turn: the faces found, the RMSE of their keypoints in pixels of
the face's own 96x96, and how far the head pose's roll (kfkd_pose) is from
the face's upright roll turned by as much as the photo (the median, in degrees).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kfkd_beyond  # noqa: E402
import kfkd_detect  # noqa: E402
import kfkd_engine  # noqa: E402
import kfkd_io  # noqa: E402
import kfkd_photo  # noqa: E402
import kfkd_pose  # noqa: E402
from epochs import cpu_name  # noqa: E402

CANVAS, FACE, TURNS = 480, 288, (0, 15, 30, 45)


def held_out_faces(net, data, count):
    """`count` complete faces (uint8, 96x96) of the people `net` validated on,
    and their keypoints in pixels."""
    if not net.groups_:
        sys.exit(f'{net.name_}: trained without --groups, so no people were held out from it')
    X, y = kfkd_beyond.training_data(net, data, groups=net.groups_)
    X, y = kfkd_beyond.validation_data(net, X, y)
    complete = ~np.isnan(y).any(1)
    faces = np.round(X[complete][:count] * 255).astype(np.uint8).reshape(-1, 96, 96)
    return faces, kfkd_engine.to_pixels(y[complete][:count])


def turned_photo(face, points, turn):
    """The face on a canvas, turned `turn` degrees counterclockwise, as a BGR
    photo, and its keypoints there."""
    cv2 = kfkd_io.opencv()
    scale, margin = FACE / 96, (CANVAS - FACE) // 2
    big = cv2.resize(face, (FACE, FACE), interpolation=cv2.INTER_CUBIC)
    canvas = cv2.copyMakeBorder(big, margin, margin, margin, margin, cv2.BORDER_REPLICATE)
    turning = cv2.getRotationMatrix2D((CANVAS / 2 - 0.5, CANVAS / 2 - 0.5), turn, 1)
    photo = cv2.warpAffine(canvas, turning, (CANVAS, CANVAS), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
    xy = points.reshape(-1, 2) * scale + margin - 0.5  # OpenCV's pixel i is at i
    xy = xy @ turning[:, :2].T + turning[:, 2] + 0.5
    return cv2.cvtColor(photo, cv2.COLOR_GRAY2BGR), xy.reshape(-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', default=str(Path(__file__).resolve().parents[2] / 'shared' /
                                              'data' / 'faces'))
    parser.add_argument('--model', help="model file (default: kfkd's pretrained net9)")
    parser.add_argument('--faces', type=int, default=150)
    parser.add_argument('--detectors', default='yunet,haar')
    args = parser.parse_args()
    model = (kfkd_engine.read_model(args.model, 'cpu') if args.model
             else kfkd_beyond.pretrained())
    faces, points = held_out_faces(model, args.data, args.faces)
    net = kfkd_photo.FaceNet(model, shifts=True)
    print(f'# {cpu_name()}; {model.name_} ({args.model or "pretrained"}); {len(faces)} faces '
          f'of held-out people, {FACE} px on a {CANVAS}x{CANVAS} canvas\n')
    print(f'{"detector":9s} ' + ' '.join(f'{f"{turn} deg":>23s}' for turn in TURNS))
    for name in args.detectors.split(','):
        find = kfkd_detect.detector(name)
        cells, upright_roll = [], {}
        for turn in TURNS:
            errors, roll_errors = [], []
            for i, (face, truth) in enumerate(zip(faces, points)):
                signed = turn if i % 2 else -turn
                photo, truth = turned_photo(face, truth, signed)
                where = kfkd_detect.Frame(CANVAS / 2, CANVAS / 2, FACE)
                frames = [d.frame for d in find(photo) if kfkd_detect.same_face(d.frame, where)]
                if frames:
                    predicted, _ = kfkd_photo.face_rows(net, photo[..., 0], frames[:1])
                    errors.append((predicted[0] - truth) / (FACE / 96))
                    _, _, roll = kfkd_pose.head_pose(predicted[0], net.columns, (CANVAS, CANVAS))
                    if turn == 0:
                        upright_roll[i] = roll
                    elif i in upright_roll:
                        roll_errors.append(abs(roll - upright_roll[i] - signed))
            rmse = np.sqrt(np.mean(np.square(errors))) if errors else np.nan
            roll = f'{np.median(roll_errors):4.1f} deg' if roll_errors else '     -'
            cells.append(f'{len(errors):3d} {rmse:5.2f} px {roll}')
        print(f'{name:9s} ' + ' '.join(f'{cell:>23s}' for cell in cells), flush=True)
    print(f'\n(each turn: faces found of the {len(faces)}, the RMSE of their keypoints, the '
          f'median error of the roll)')


if __name__ == '__main__':
    main()
