"""Confidence: whether each keypoint's confidence (kfkd_onnx.Keypoints) tells
good keypoints from bad ones, and faces from crops without one.

    python bench/confidence.py --data DIR --groups FILE MODEL [MODEL ...]

For each model file (of all 30 keypoints), on the faces of the people that
validation holds out (GroupSplit, as `kfkd fit --groups FILE` splits them):
each labelled keypoint's spread and error (pixels); the median spread, over
all keypoints and of each; the median confidence; Spearman's rank
correlation between spread and error over all keypoints, within each
keypoint (the median of the 15), and between each face's mean spread and
mean error; the median error of the most and of the least confident quarter
of the keypoints. Then the median spread and confidence on crops without a
face: uniform noise, plain grey, blurred noise (a background without
detail), the same faces moved 48 pixels, half out of the crop (the edge
pixels repeated), and the parts of Grace Hopper's portrait (matplotlib's
sample photo) clear of her face. Last, the scale that would put the median
confidence of the faces' keypoints at 0.9.
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import cbook
from scipy.optimize import brentq
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kfkd  # noqa: E402  (after the path, so the repo's kfkd runs without installing)
import kfkd_detect  # noqa: E402
import kfkd_engine  # noqa: E402
import kfkd_io  # noqa: E402
import kfkd_onnx  # noqa: E402
import kfkd_photo  # noqa: E402
from epochs import cpu_name  # noqa: E402

FACE_CONFIDENCE = 0.9  # where the suggested scale puts the faces' median
WINDOW, STRIDE = 128, 32  # the portrait's crops without a face, in its pixels


def held_out_faces(data_dir, groups):
    """The faces (n, 1, 96, 96) and keypoints (pixels, NaN where missing) of
    the people that GroupSplit holds out."""
    X, y, people = kfkd.load2d(data_dir=data_dir, dropna=False, groups=groups)
    _, held_out = kfkd_engine.GroupSplit(people)(torch.utils.data.TensorDataset(
        torch.as_tensor(y)))
    rows = np.asarray(held_out.indices)
    return X[rows], kfkd_engine.to_pixels(y[rows])


def portrait_without_her_face():
    """Windows of Grace Hopper's portrait clear of the upright box around the
    square the face detector frames her face with, shrunk to 96x96 as the nets
    take them."""
    cv2 = kfkd_io.opencv()
    image, gray = kfkd_photo.read_photo(cbook.get_sample_data('grace_hopper.jpg',
                                                              asfileobj=False))
    face, = kfkd_detect.detector()(image)
    x, y, width, height = face.frame.box()
    crops = [cv2.resize(gray[top:top + WINDOW, left:left + WINDOW], (96, 96),
                        interpolation=cv2.INTER_AREA)
             for top in range(0, gray.shape[0] - WINDOW + 1, STRIDE)
             for left in range(0, gray.shape[1] - WINDOW + 1, STRIDE)
             if left + WINDOW <= x or left >= x + width or top + WINDOW <= y or
             top >= y + height]
    return kfkd_engine.scale_pixels(np.stack(crops))[:, None]


def crops_without_a_face(faces, rng):
    """Name -> crops (n, 1, 96, 96): as many as `faces` of each made-up kind."""
    coarse = torch.as_tensor(rng.random((len(faces), 1, 12, 12), dtype=np.float32))
    return {'noise': rng.random(faces.shape, dtype=np.float32),
            'grey': np.full(faces.shape, 0.5, np.float32),
            'blurred noise': F.interpolate(coarse, size=faces.shape[-2:], mode='bilinear',
                                           align_corners=False).numpy(),
            'face half out': kfkd_engine.moved(faces, 48, 0),
            'portrait, no face': portrait_without_her_face()}


def predict(module, X):
    """Keypoints (pixels) and each keypoint's spread (pixels) for faces X."""
    with torch.no_grad():
        parts = [module.points_and_spread(torch.as_tensor(np.ascontiguousarray(batch)))
                 for batch in np.array_split(X, math.ceil(len(X) / 256))]
    return (torch.cat(part).numpy() for part in zip(*parts))


def report(path, faces, truth, crops):
    module = kfkd_onnx.Keypoints(kfkd_engine.read_model(path, 'cpu')).eval()
    if list(module.columns) != kfkd_io.COLUMNS:
        raise SystemExit(f'{path}: a model of all 30 keypoints, please')
    scale = float(module.spread_scale[0])
    median_confidence = lambda spread: float(np.median(kfkd_onnx.confidence(
        torch.as_tensor(spread), scale)))
    points, spread = predict(module, faces)
    error = np.hypot(points[:, 0::2] - truth[:, 0::2], points[:, 1::2] - truth[:, 1::2])
    labelled = ~np.isnan(error)
    within = np.median([spearmanr(spread[labelled[:, k], k], error[labelled[:, k], k]).statistic
                        for k in range(error.shape[1])])
    per_face = spearmanr(spread.mean(1), np.nanmean(error, 1)).statistic
    spread_all, error_all = spread[labelled], error[labelled]
    quarters = np.quantile(spread_all, [0.25, 0.75])
    print(f'\n{path} (scale {scale:g} px): {len(faces)} held-out faces, {len(error_all)} '
          f'labelled keypoints, median error {np.median(error_all):.2f} px')
    print(f'  faces: median spread {np.median(spread_all):.2f} px, median confidence '
          f'{median_confidence(spread_all):.3f}')
    names = [column[:-2] for column in kfkd_io.COLUMNS[0::2]]
    print('  median spread by keypoint: ' + ', '.join(
        f'{name} {np.median(spread[labelled[:, k], k]):.1f}' for k, name in enumerate(names)))
    print(f'  Spearman rho(spread, error): {spearmanr(spread_all, error_all).statistic:.3f} '
          f'over all keypoints, {within:.3f} within a keypoint (median), {per_face:.3f} '
          f'face by face (means)')
    print(f'  median error of the most confident quarter '
          f'{np.median(error_all[spread_all <= quarters[0]]):.2f} px, of the least confident '
          f'{np.median(error_all[spread_all >= quarters[1]]):.2f} px')
    for name, X in crops.items():
        _, crop_spread = predict(module, X)
        print(f'  {name:18s} ({len(X):4d}) median spread {np.median(crop_spread):6.2f} px, '
              f'median confidence {median_confidence(crop_spread):.3f}')
    # confidence is a function of spread / scale: find the ratio that gives FACE_CONFIDENCE
    ratio = brentq(lambda r: float(kfkd_onnx.confidence(torch.tensor(r), 1.0)) -
                   FACE_CONFIDENCE, 0, 100)
    print(f'  the scale for a median confidence of {FACE_CONFIDENCE} on faces: '
          f'{np.median(spread_all) / ratio:.1f} px')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('models', nargs='+', metavar='MODEL')
    parser.add_argument('--data', required=True)
    parser.add_argument('--groups', required=True)
    args = parser.parse_args()
    faces, truth = held_out_faces(args.data, args.groups)
    crops = crops_without_a_face(faces, np.random.default_rng(0))
    print(f'# {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}')
    for path in args.models:
        report(path, faces, truth, crops)


if __name__ == '__main__':
    main()
