"""kfkd export: every kind of model as ONNX, predicting as PyTorch does."""
import numpy as np
import pytest

import kfkd
import kfkd_cli
import kfkd_engine
import kfkd_io
from conftest import FIXTURES

pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')
import kfkd_onnx  # noqa: E402  (needs onnxruntime)


@pytest.fixture(scope='module')
def faces(demo_dir):
    X, _ = kfkd.load2d(test=True, data_dir=demo_dir)
    return X[:7]


@pytest.mark.parametrize('name', ['net1-tiny', 'net10-tiny', 'specialists-tiny'])
def test_onnxruntime_predicts_what_pytorch_does(name, faces, tmp_path):
    """Model files of every kind (net1 takes rows of pixels, net10 is members
    with test-time flips, specialists are six nets in one file), any number of
    faces: onnxruntime's keypoints are PyTorch's (float32) within 0.01 px."""
    model = kfkd_engine.read_model(FIXTURES / f'{name}.safetensors', 'cpu')
    for net in model.values() if isinstance(model, dict) else [model]:
        net.set_params(test_shifts=0)  # ONNX files make the flips, not the shifts
    out = tmp_path / f'{name}.onnx'
    assert kfkd_onnx.export(model, out) < 0.01
    onnx_model = kfkd_onnx.OnnxModel(out)
    for n in (1, 7):
        expected = kfkd_engine.predict_keypoints(model, faces[:n])
        got = kfkd_engine.predict_keypoints(onnx_model, faces[:n])
        assert list(got.columns) == kfkd_io.COLUMNS if name == 'specialists-tiny' else list(
            expected.columns)
        assert np.abs(got[expected.columns].to_numpy() - expected.to_numpy()).max() < 0.01


def test_a_nets_own_mirror_axis_goes_into_its_flips(faces, tmp_path):
    net = kfkd_engine.load_net(FIXTURES / 'net9-tiny.safetensors', 'cpu')
    net.set_params(mirror_axis=97.5, test_shifts=0)  # as a measured axis would have it
    out = tmp_path / 'net9.onnx'
    kfkd_onnx.export(net, out)
    got = kfkd_onnx.OnnxModel(out).predict_keypoints(faces).to_numpy()
    assert np.abs(got - kfkd_engine.to_pixels(net.predict(faces))).max() < 0.01
    assert np.abs(got - kfkd_engine.to_pixels(net.set_params(mirror_axis=96.0).predict(
        faces))).max() > 0.5  # the axis matters: 1.5 px of it goes into the mean


def test_export_and_predict_from_the_command_line(trained_net1, tmp_path, capsys):
    model = tmp_path / 'net1.safetensors'
    kfkd_engine.save_net(trained_net1, model, 'net1')
    assert kfkd_cli.main(['export', str(model), '--out', str(tmp_path / 'net1.onnx'),
                          '--device', 'cpu']) == 0
    assert 'onnxruntime predicts as PyTorch does to within' in capsys.readouterr().out
    assert kfkd_cli.main(['predict', 'face.png', '--model', str(model), '--backend',
                          'onnxruntime']) == 1
    assert 'runs ONNX files; make one with `kfkd export' in capsys.readouterr().err
    assert kfkd_cli.main(['predict', 'face.png', '--model', str(tmp_path / 'net1.onnx')]) == 1
    assert 'an ONNX file; predict with it with --backend onnxruntime' in capsys.readouterr().err
    (tmp_path / 'other.onnx').write_bytes(b'not onnx')
    with pytest.raises(kfkd_io.KfkdError, match='not an ONNX model onnxruntime can run'):
        kfkd_onnx.OnnxModel(tmp_path / 'other.onnx')
