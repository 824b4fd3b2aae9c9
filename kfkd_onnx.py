"""kfkd's models as ONNX files, and predictions with onnxruntime instead of PyTorch.

  Keypoints     a net, or the six specialists, as one module: faces in, keypoints in
                pixels out, test-time flips included (not shifts: nine times the
                work, where a video's frames need speed)
  export        a model file to an ONNX file (what `kfkd export` runs)
  OnnxModel     an ONNX file kfkd wrote, predicting as its net did (`kfkd predict
                --backend onnxruntime`)

An exported file takes faces shaped (n, 1, 96, 96), pixels scaled to 0-1 as
load2d() scales them, any n; it gives (n, columns) keypoints in pixels, its
columns (Kaggle's 30 in Kaggle's order, for a net or for all six specialists,
which go into one file) named in its metadata. It needs `pip install 'kfkd[onnx]'`
(onnx, onnxruntime, and onnxscript for PyTorch's exporter). It imports
kfkd_engine and kfkd_io only.
"""
import contextlib
import io
import json
import logging
import warnings

import numpy as np
import pandas as pd
import torch
from torch import nn

from kfkd_engine import __version__, flip_averaged, mirror_pairs, read_model, to_pixels
from kfkd_io import COLUMNS, IMAGE_SIZE, KfkdError, atomic_write

INPUT = 'faces'
OUTPUT = 'keypoints'


def _onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise KfkdError("ONNX export and onnxruntime need: pip install 'kfkd[onnx]'") from None
    return onnx, onnxruntime


class Keypoints(nn.Module):
    """A net, or specialists (columns -> net), as one module from faces
    (n, 1, 96, 96) to keypoints in pixels: each net's predictions (with its
    test-time flips where it makes them, not its shifts), side by side, in Kaggle's column
    order where they cover all 30."""

    def __init__(self, model):
        super().__init__()
        nets = list(model.values()) if isinstance(model, dict) else [model]
        self.nets = nn.ModuleList(net.module_ for net in nets)
        self.shapes = [tuple(net.module_.input_shape) for net in nets]
        self.flips = [(mirror_pairs(net.target_columns()), net.mirror_axis_) if net.test_flip
                      else None for net in nets]
        columns = [column for net in nets for column in net.target_columns()]
        self.columns = COLUMNS if sorted(columns) == sorted(COLUMNS) else columns
        self.order = [columns.index(column) for column in self.columns]

    def forward(self, faces):
        parts = []
        for module, shape, flip in zip(self.nets, self.shapes, self.flips):
            def predict(x, module=module, shape=shape):
                return module(x.reshape((-1,) + shape))
            parts.append(flip_averaged(predict, faces, *flip) if flip else predict(faces))
        return to_pixels(torch.cat(parts, 1)[:, self.order])


def export(model, out, device='cpu'):
    """Write `model` (a model file, a net or specialists) to the ONNX file `out`,
    for any number of faces; check onnxruntime's predictions against PyTorch's
    (in float32) on a few faces. Returns the largest difference, in pixels."""
    onnx, onnxruntime = _onnx()
    if not isinstance(model, (nn.Module, dict)) and not hasattr(model, 'module_'):
        model = read_model(model, device)
    nets = model.values() if isinstance(model, dict) else [model]
    for net in nets:
        if getattr(net, 'mirror_axis_', None) is None:
            raise KfkdError('the net has not been trained yet (its mirror axis is still to '
                            'be measured): train it, then export it')
    module = Keypoints(model).to(device).eval()
    faces = torch.rand(3, 1, IMAGE_SIZE, IMAGE_SIZE, device=device)
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            module, (faces,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim('faces')},), verbose=False)
    proto = program.model_proto
    names = sorted({net.name_ for net in nets if hasattr(net, 'name_')})
    onnx.helper.set_model_props(proto, {'kfkd': __version__, 'nets': ', '.join(names),
                                        'columns': json.dumps(list(module.columns))})
    data = proto.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=['CPUExecutionProvider'])
    check = np.random.default_rng(0).random((5, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    with torch.no_grad():
        expected = module(torch.as_tensor(check, device=device)).cpu().numpy()
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
    """An ONNX file that kfkd's export wrote, run by onnxruntime: it predicts
    keypoints in pixels as the net it came from did (predict_keypoints)."""

    def __init__(self, path):
        _, onnxruntime = _onnx()
        options = onnxruntime.SessionOptions()
        try:
            self.session = onnxruntime.InferenceSession(str(path), options,
                                                        providers=['CPUExecutionProvider'])
        except Exception as e:  # onnxruntime's own error types
            raise KfkdError(f'{path}: not an ONNX model onnxruntime can run') from e
        meta = self.session.get_modelmeta().custom_metadata_map
        if 'columns' not in meta or [i.name for i in self.session.get_inputs()] != [INPUT]:
            raise KfkdError(f'{path}: an ONNX file, but not one that kfkd export wrote')
        self.columns = json.loads(meta['columns'])
        self.name = meta.get('nets', '')

    def predict_keypoints(self, X):
        """Keypoints in pixels (DataFrame, a column per target) for faces X,
        scaled as load2d() scales them: what kfkd_engine.predict_keypoints
        gives for a net, which hands an OnnxModel's faces to it."""
        faces = np.ascontiguousarray(X, dtype=np.float32).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
        return pd.DataFrame(self.session.run(None, {INPUT: faces})[0], columns=self.columns)
