"""kfkd's models as ONNX files, and predictions with onnxruntime or OpenCV's DNN
module instead of PyTorch.

  Keypoints     a net, or the six specialists, as one module: faces in, keypoints in
                pixels and each keypoint's confidence out, test-time flips included
                (not shifts: nine times the work, where a video's frames need speed)
  export        a model file to an ONNX file (what `kfkd export` runs)
  OnnxModel     an ONNX file kfkd wrote, predicting as its net did, run by onnxruntime
                or OpenCV (`kfkd predict --backend onnxruntime` or `opencv`)

An exported file takes faces shaped (n, 1, 96, 96), pixels scaled to 0-1 as
load2d() scales them, any n; it gives 'keypoints', (n, columns) in pixels, its
columns (Kaggle's 30 in Kaggle's order, for a net or for all six specialists,
which go into one file) named in its metadata, and 'confidence', (n, columns // 2)
in 0..1, a keypoint's for each pair of columns. It needs `pip install 'kfkd[onnx]'`
(onnx, onnxruntime, and onnxscript for PyTorch's exporter). It imports
kfkd_engine and kfkd_io only.

A keypoint's confidence is exp(-(spread / scale)^2), its spread being how far,
in pixels of the 96x96 face, the keypoint's predictions scatter (the RMS
distance from their mean point, kfkd_engine.keypoint_spread), and `scale` the
spread at which the confidence falls to 1/e. Squared, because even a face's
keypoints have some spread (a heatmap net's heatmaps stay wide): the map stays
near 1 for those and falls fast past them.

  - a heatmap net's (net9, net10): the spread of its heatmap's softmax, pooled
    with the mirror image's heatmap, mirrored back, where the net makes
    test-time flips, and with net10's members (kfkd_engine.mixture): a flat
    heatmap, or predictions that disagree, make it wide. Scale HEATMAP_SPREAD.
  - a regression net's (net1-net8, the specialists): half the distance between
    its prediction for the face and that for the face's mirror image, mirrored
    back. Scale FLIP_SPREAD.
"""
import contextlib
import importlib
import inspect
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from kfkd_engine import (__version__, keypoint_spread, mirror, mirror_pairs, mixture,
                         read_model, to_pixels)
from kfkd_io import COLUMNS, IMAGE_SIZE, KfkdError, atomic_write, read_model_file

INPUT = 'faces'
OUTPUTS = ('keypoints', 'confidence')
# What runs an exported file: runtime -> (the module it needs, how to install that)
RUNTIMES = {'onnxruntime': ('onnxruntime', "pip install 'kfkd[onnx]'"),
            'opencv': ('cv2', "pip install 'kfkd[photo]'")}

# The spreads (pixels) at which confidence falls to 1/e, chosen so that the median
# keypoint of held-out people's faces gets about 0.9, with crops without a face well
# below (docs/photo-video.md#each-keypoints-confidence). FLIP_SPREAD is for a net that
# learned from mirrored faces (net8): one that did not (net1, net2, net4) disagrees with the
# mirror image on faces too, and its confidence runs low everywhere.
HEATMAP_SPREAD = 32.0
FLIP_SPREAD = 1.5


def _module(name, install):
    """The module `name`, or KfkdError saying what to install."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise KfkdError(f'{name} is missing: {install}') from None


def _onnx_module(name):
    return _module(name, "pip install 'kfkd[onnx]'")


def confidence(spread, scale):
    """A keypoint's confidence in 0..1 from its spread (pixels, a tensor)."""
    return torch.exp(-(spread / scale).square())


class Keypoints(nn.Module):
    """A net, or specialists (columns -> net), as one module from faces
    (n, 1, 96, 96) to keypoints in pixels (n, columns) and each keypoint's
    confidence in 0..1 (n, columns // 2): each net's predictions (with its
    test-time flips where it makes them, not its shifts), side by side, in
    Kaggle's column order where they cover all 30. A regression net without
    test-time flips predicts the face's keypoints alone, but its confidence
    comes from its mirror image all the same."""

    def __init__(self, model):
        super().__init__()
        nets = list(model.values()) if isinstance(model, dict) else [model]
        self.nets = nn.ModuleList(_OneNet(net) for net in nets)
        columns = [column for net in nets for column in net.target_columns()]
        self.columns = COLUMNS if sorted(columns) == sorted(COLUMNS) else columns
        # The columns put in order by a permutation matrix, for ONNX's MatMul: indexing
        # becomes a GatherND, which OpenCV 4 does not read, and index_select a Gather,
        # which OpenCV 4.14 fails to run on a Linear layer's output.
        order = [columns.index(column) for column in self.columns]
        self.register_buffer('reorder', torch.eye(len(columns))[:, order], persistent=False)
        scales = torch.tensor([one.spread_scale for one, net in zip(self.nets, nets)
                               for _ in net.target_columns()])
        self.register_buffer('spread_scale', scales[order][0::2], persistent=False)

    def forward(self, faces):
        points, spread = self.points_and_spread(faces)
        return points, confidence(spread, self.spread_scale)

    def points_and_spread(self, faces):
        """Keypoints in pixels (n, columns) and each keypoint's spread in pixels
        (n, columns // 2), which forward turns into its confidence."""
        points, variances = zip(*(net(faces) for net in self.nets))
        points = torch.cat(points, 1) @ self.reorder
        return to_pixels(points), keypoint_spread(torch.cat(variances, 1) @ self.reorder)


class _OneNet(nn.Module):
    """One net of a Keypoints: its keypoints (the nets' -1..1) and each
    column's variance (see the module's docstring), in operations that both
    onnxruntime and OpenCV 4's DNN module read."""

    def __init__(self, net):
        super().__init__()
        if getattr(net, 'mirror_axis_', None) is None:
            raise KfkdError('the net has not been trained yet (its mirror axis is still to '
                            'be measured): train it first')
        self.module = net.module_
        self.shape = tuple(net.module_.input_shape)
        self.heatmaps = 'variance' in inspect.signature(self.module.forward).parameters
        self.spread_scale = HEATMAP_SPREAD if self.heatmaps else FLIP_SPREAD
        self.test_flip = net.test_flip
        # Reversed by a Gather: OpenCV 4 gets the shape of flip()'s Slice (step -1) wrong.
        self.register_buffer('mirrored_pixels', torch.arange(IMAGE_SIZE - 1, -1, -1),
                             persistent=False)
        # mirror()'s map of the targets, as a matrix and an offset for ONNX's MatMul: its
        # indexing becomes GatherND and ScatterND, which OpenCV 4 does not read
        pairs, axis = mirror_pairs(net.target_columns()), net.mirror_axis_
        matrix, offset = _affine(lambda y: mirror(y=y, pairs=pairs, axis=axis)[1],
                                 len(net.target_columns()))
        self.register_buffer('unmirror_matrix', matrix, persistent=False)
        self.register_buffer('unmirror_offset', offset, persistent=False)

    def forward(self, faces):
        points, variance = self._view(faces)
        if self.heatmaps and not self.test_flip:
            return points, variance
        mirrored, mirrored_variance = self._view(faces.index_select(-1, self.mirrored_pixels))
        views = [points, mirrored @ self.unmirror_matrix + self.unmirror_offset]
        if variance is not None:  # a variance's columns trade places without changing sign
            variance = [variance, mirrored_variance @ self.unmirror_matrix.abs()]
        mean, variance = mixture(views, variance)
        return (mean if self.test_flip else points), variance

    def _view(self, faces):
        """The net's keypoints for `faces`, and their variance (None for a regression net)."""
        x = faces.reshape((-1,) + self.shape)
        return self.module(x, variance=True) if self.heatmaps else (self.module(x), None)


def _affine(function, width):
    """An affine map of rows of `width` as (matrix, offset), float32, such that
    function(y) == y @ matrix + offset: from its values at 0 and at each unit
    row, in float64, so that a matrix of ones and zeros comes out exact."""
    offset = function(torch.zeros(1, width, dtype=torch.float64))
    matrix = function(torch.eye(width, dtype=torch.float64)) - offset
    return matrix.float(), offset[0].float()


def export(model, out, device='cpu'):
    """Write `model` (a model file, a net or specialists) to the ONNX file `out`,
    for any number of faces; check onnxruntime's predictions against PyTorch's
    (in float32) on a few faces. Returns the largest difference of the
    keypoints, in pixels. A model file's terms (its 'licence', as kfkd's
    pretrained net9 has) go into the ONNX file's metadata with its weights."""
    onnx, onnxruntime = _onnx_module('onnx'), _onnx_module('onnxruntime')
    terms = {}
    if not isinstance(model, (nn.Module, dict)) and not hasattr(model, 'module_'):
        terms = {key: value for key, value in read_model_file(model)[0].items()
                 if key == 'licence'}
        model = read_model(model, device)
    nets = model.values() if isinstance(model, dict) else [model]
    module = Keypoints(model).to(device).eval()
    faces = torch.rand(3, 1, IMAGE_SIZE, IMAGE_SIZE, device=device)
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            module, (faces,), dynamo=True, input_names=[INPUT], output_names=list(OUTPUTS),
            dynamic_shapes=({0: torch.export.Dim('faces')},), verbose=False)
    proto = program.model_proto
    names = sorted({net.name_ for net in nets if hasattr(net, 'name_')})
    onnx.helper.set_model_props(proto, {'kfkd': __version__, 'nets': ', '.join(names),
                                        'columns': json.dumps(list(module.columns)), **terms})
    data = proto.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=['CPUExecutionProvider'])
    check = np.random.default_rng(0).random((5, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    with torch.no_grad():
        expected = module(torch.as_tensor(check, device=device))[0].cpu().numpy()
    difference = float(np.abs(session.run(None, {INPUT: check})[0] - expected).max())
    with atomic_write(out) as f:
        f.write(data)
    return difference


@contextlib.contextmanager
def _quiet():
    """PyTorch's exporter without its progress lines, warnings and log records."""
    logger = logging.getLogger('torch.onnx')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter('ignore')
            yield
    finally:
        logger.setLevel(level)


class OnnxModel:
    """An ONNX file that kfkd's export wrote, run by `runtime`, onnxruntime or
    OpenCV's DNN module ('opencv'): it predicts keypoints in pixels as the net
    it came from did (predict_keypoints), and each keypoint's confidence
    (predict_with_confidence)."""

    def __init__(self, path, runtime='onnxruntime'):
        if runtime not in RUNTIMES:
            raise KfkdError(f'{runtime}: not a runtime kfkd runs ONNX files with; use one '
                            f'of {", ".join(RUNTIMES)}')
        onnx, library = _onnx_module('onnx'), _module(*RUNTIMES[runtime])
        data = Path(path).read_bytes()
        try:
            proto = onnx.load_from_string(data)
            self._run = _RUNNERS[runtime](library, data)
        except Exception as e:  # the parser's and the runtime's own error types
            raise KfkdError(f'{path}: not an ONNX model {runtime} can run; export the model '
                            f'again with `kfkd export`') from e
        meta = {prop.key: prop.value for prop in proto.metadata_props}
        self.outputs = [output.name for output in proto.graph.output]
        if ('columns' not in meta or [i.name for i in proto.graph.input] != [INPUT] or
                self.outputs[0] != OUTPUTS[0]):
            raise KfkdError(f'{path}: an ONNX file, but not one that kfkd export wrote')
        self.columns = json.loads(meta['columns'])
        self.name = meta.get('nets', '')

    def predict_with_confidence(self, X):
        """Keypoints in pixels (n, columns) and each keypoint's confidence in
        0..1 (n, columns // 2; NaN from a file exported before kfkd exported
        confidence), arrays, for faces X scaled as load2d() scales them."""
        faces = np.ascontiguousarray(X, dtype=np.float32).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
        keypoints, *confidence = self._run(faces, self.outputs)
        if not confidence:
            confidence = [np.full((len(faces), len(self.columns) // 2), np.nan, np.float32)]
        return keypoints, confidence[0]

    def predict_keypoints(self, X):
        """Keypoints in pixels (DataFrame, a column per target) for faces X,
        scaled as load2d() scales them: what kfkd_engine.predict_keypoints
        gives for a net, which hands an OnnxModel's faces to it."""
        return pd.DataFrame(self.predict_with_confidence(X)[0], columns=self.columns)


def _onnxruntime(onnxruntime, data):
    """A function (faces, output names) -> outputs, by onnxruntime."""
    session = onnxruntime.InferenceSession(data, providers=['CPUExecutionProvider'])
    return lambda faces, outputs: session.run(outputs, {INPUT: faces})


def _opencv(cv2, data):
    """A function (faces, output names) -> outputs, by OpenCV's DNN module,
    one face at a time: OpenCV 4 works out its layers' shapes for one face,
    and for some layers (Squeeze, a mean over an axis of one) gets them wrong
    when more come at once."""
    net = cv2.dnn.readNetFromONNX(np.frombuffer(data, np.uint8))

    def run(faces, outputs):
        per_face = []
        for face in faces:
            net.setInput(face[None])
            per_face.append(net.forward(outputs))
        return [np.concatenate(output) for output in zip(*per_face)]
    return run


_RUNNERS = {'onnxruntime': _onnxruntime, 'opencv': _opencv}
