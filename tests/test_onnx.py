"""kfkd export: every kind of model as ONNX, predicting as PyTorch does in
onnxruntime and in OpenCV's DNN module, each keypoint with its confidence."""
import importlib.util

import numpy as np
import pytest
import torch

import kfkd
import kfkd_beyond
import kfkd_cli
import kfkd_engine
import kfkd_io
from conftest import FIXTURES

pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')
import onnx  # noqa: E402
import kfkd_onnx  # noqa: E402  (needs onnxruntime)
import kfkd_photo  # noqa: E402

RUNTIMES = ['onnxruntime'] + (['opencv'] if importlib.util.find_spec('cv2') else [])


@pytest.fixture(scope='module')
def faces(demo_dir):
    X, _ = kfkd.load2d(test=True, data_dir=demo_dir)
    return X[:7]


def read_fixture(name):
    """A fixture's model, without test-time shifts (ONNX files make the flips, not the shifts)."""
    model = kfkd_engine.read_model(FIXTURES / f'{name}.safetensors', 'cpu')
    for net in model.values() if isinstance(model, dict) else [model]:
        net.set_params(test_shifts=0)
    return model


def pytorch_confidence(model, faces):
    with torch.no_grad():
        return kfkd_onnx.Keypoints(model).eval()(torch.as_tensor(faces))[1].numpy()


@pytest.fixture(scope='module')
def net1_onnx(tmp_path_factory):
    out = tmp_path_factory.mktemp('onnx') / 'net1.onnx'
    kfkd_onnx.export(read_fixture('net1-tiny'), out)
    return out


@pytest.mark.parametrize('name', ['net1-tiny', 'net10-tiny', 'specialists-tiny'])
def test_both_runtimes_predict_what_pytorch_does(name, faces, tmp_path):
    """Model files of every kind (net1 takes rows of pixels, net10 is members
    with test-time flips, specialists are six nets in one file), any number of
    faces: onnxruntime's and OpenCV's keypoints are PyTorch's (float32) within
    0.01 px, and so is their confidence, one in 0..1 for each keypoint."""
    model = read_fixture(name)
    out = tmp_path / f'{name}.onnx'
    assert kfkd_onnx.export(model, out) < 0.01
    confidence = pytorch_confidence(model, faces)
    assert confidence.shape == (len(faces), 15) and ((0 < confidence) & (confidence <= 1)).all()
    for runtime in RUNTIMES:
        onnx_model = kfkd_onnx.OnnxModel(out, runtime)
        for n in (1, 7):
            expected = kfkd_engine.predict_keypoints(model, faces[:n])
            got = kfkd_engine.predict_keypoints(onnx_model, faces[:n])
            assert list(got.columns) == kfkd_io.COLUMNS if name == 'specialists-tiny' else list(
                expected.columns)
            assert np.abs(got[expected.columns].to_numpy() - expected.to_numpy()).max() < 0.01
        _, got = onnx_model.predict_with_confidence(faces)
        assert np.abs(got - confidence).max() < 1e-4


def test_a_nets_own_mirror_axis_goes_into_its_flips(faces, tmp_path):
    net = kfkd_engine.load_net(FIXTURES / 'net9-tiny.safetensors', 'cpu')
    net.set_params(mirror_axis=97.5, test_shifts=0)  # as a measured axis would have it
    out = tmp_path / 'net9.onnx'
    kfkd_onnx.export(net, out)
    confidence = pytorch_confidence(net, faces)
    for runtime in RUNTIMES:
        got, got_confidence = kfkd_onnx.OnnxModel(out, runtime).predict_with_confidence(faces)
        assert np.abs(got - kfkd_engine.to_pixels(net.predict(faces))).max() < 0.01
        assert np.abs(got_confidence - confidence).max() < 1e-4
    assert np.abs(got - kfkd_engine.to_pixels(net.set_params(mirror_axis=96.0).predict(
        faces))).max() > 0.5  # the axis matters: 1.5 px of it goes into the mean


def test_a_sharp_heatmap_gives_a_confident_keypoint_and_a_flat_one_does_not():
    """A heatmap's spread, the RMS distance of its softmax's mass from its
    mean point: next to none with the mass in one cell; with none anywhere in
    particular, that of the 24x24 grid of 4-pixel cells about its centre."""
    head = kfkd_beyond.SoftArgmax(channels=1, side=24, output_units=2)
    with torch.no_grad():
        head.conv.weight.fill_(1)
        head.conv.bias.zero_()
    sharp, flat = torch.zeros(2, 1, 1, 24, 24)
    sharp[0, 0, 5, 17] = 50
    with torch.no_grad():
        spreads = torch.cat([kfkd_engine.keypoint_spread(head(features, variance=True)[1][:, 0])
                             for features in (sharp, flat)])[:, 0]
    assert spreads.tolist() == pytest.approx([0, 4 * np.sqrt(2 * (24 ** 2 - 1) / 12)], abs=0.01)
    confidence = kfkd_onnx.confidence(spreads, kfkd_onnx.HEATMAP_SPREAD)
    assert confidence[0] == pytest.approx(1, abs=1e-3) and confidence[1] < 0.5


def test_predictions_that_disagree_widen_the_spread():
    """Two predictions of a keypoint pooled as one mixture: the variance of
    each column is that of the points about their mean plus the predictions'
    own, on average (the law of total variance)."""
    points = [torch.tensor([[0.1, 0.2]]), torch.tensor([[0.3, 0.2]])]
    variances = [torch.tensor([[0.01, 0.02]]), torch.tensor([[0.03, 0.02]])]
    mean, variance = kfkd_engine.mixture(points, variances)
    assert mean.tolist() == [pytest.approx([0.2, 0.2])]
    assert variance.tolist() == [pytest.approx([0.01 + 0.02, 0 + 0.02])]


def test_a_regression_nets_confidence_is_how_far_its_mirror_image_disagrees(faces):
    """Without test-time flips, a regression net's keypoints are its plain
    predictions, and their spread half the distance to those of the mirror
    image, mirrored back (kfkd_engine.mirror)."""
    net = read_fixture('net1-tiny')
    plain = net.predict(faces.reshape(len(faces), -1))
    mirrored, _ = kfkd_engine.mirror(faces)
    _, back = kfkd_engine.mirror(y=net.predict(mirrored.reshape(len(faces), -1)),
                                 pairs=kfkd_engine.mirror_pairs(net.target_columns()),
                                 axis=net.mirror_axis_)
    apart = kfkd_engine.to_pixels(plain) - kfkd_engine.to_pixels(back)
    spread = np.hypot(apart[:, 0::2], apart[:, 1::2]) / 2
    with torch.no_grad():
        points, confidence = kfkd_onnx.Keypoints(net).eval()(torch.as_tensor(faces))
    assert np.abs(points.numpy() - kfkd_engine.to_pixels(plain)).max() < 1e-4
    expected = kfkd_onnx.confidence(torch.as_tensor(spread), kfkd_onnx.FLIP_SPREAD)
    assert np.abs(confidence.numpy() - expected.numpy()).max() < 1e-5


def test_a_file_exported_before_confidence_still_predicts(net1_onnx, faces, tmp_path):
    proto = onnx.load(net1_onnx)
    old = onnx.utils.Extractor(proto).extract_model([kfkd_onnx.INPUT], ['keypoints'])
    old.metadata_props.extend(proto.metadata_props)
    onnx.save(old, tmp_path / 'old.onnx')
    expected = kfkd_onnx.OnnxModel(net1_onnx).predict_keypoints(faces)
    for runtime in RUNTIMES:
        model = kfkd_onnx.OnnxModel(tmp_path / 'old.onnx', runtime)
        assert model.predict_keypoints(faces).equals(expected)
        points, confidence = model.predict_with_confidence(faces)
        assert points.shape == (7, 30) and confidence.shape == (7, 15)
        assert np.isnan(confidence).all()


def test_a_damaged_file_or_one_from_elsewhere_is_refused_in_a_line(net1_onnx, tmp_path):
    (tmp_path / 'damaged.onnx').write_bytes(net1_onnx.read_bytes()[:5000])
    proto = onnx.load(net1_onnx)
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / 'other.onnx')
    for runtime in RUNTIMES:
        with pytest.raises(kfkd_io.KfkdError, match=f'not an ONNX model {runtime} can run; '
                                                    f'export the model again'):
            kfkd_onnx.OnnxModel(tmp_path / 'damaged.onnx', runtime)
        with pytest.raises(kfkd_io.KfkdError, match='not one that kfkd export wrote'):
            kfkd_onnx.OnnxModel(tmp_path / 'other.onnx', runtime)
    with pytest.raises(kfkd_io.KfkdError, match='use one of onnxruntime, opencv'):
        kfkd_onnx.OnnxModel(net1_onnx, 'tensorrt')


def test_facenet_gives_keypoints_and_confidence_alike_from_pytorch_and_onnx(net1_onnx, faces):
    pixels = (faces * 255).round().astype(np.uint8)
    points, confidence = kfkd_photo.FaceNet(read_fixture('net1-tiny'))(pixels)
    assert points.shape == (7, 30) and confidence.shape == (7, 15)
    for runtime in RUNTIMES:
        got = kfkd_photo.FaceNet(kfkd_onnx.OnnxModel(net1_onnx, runtime))(pixels)
        assert np.abs(got[0] - points).max() < 0.01 and np.abs(got[1] - confidence).max() < 1e-4


def test_export_and_predict_from_the_command_line(trained_net1, tmp_path, capsys):
    model = tmp_path / 'net1.safetensors'
    kfkd_engine.save_net(trained_net1, model, 'net1')
    assert kfkd_cli.main(['export', str(model), '--out', str(tmp_path / 'net1.onnx'),
                          '--device', 'cpu']) == 0
    assert 'onnxruntime predicts as PyTorch does to within' in capsys.readouterr().out
    for backend in ('onnxruntime', 'opencv'):
        assert kfkd_cli.main(['predict', 'face.png', '--model', str(model), '--backend',
                              backend]) == 1
        assert (f'--backend {backend} runs ONNX files; make one with `kfkd export' in
                capsys.readouterr().err)
    assert kfkd_cli.main(['predict', 'face.png', '--model', str(tmp_path / 'net1.onnx')]) == 1
    assert 'an ONNX file; predict with it with --backend onnxruntime' in capsys.readouterr().err


def test_the_pretrained_models_terms_go_into_its_onnx_file(tmp_path):
    out = tmp_path / 'net9.onnx'
    assert kfkd_cli.main(['export', '--out', str(out), '--device', 'cpu']) == 0
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert props['licence'].startswith('research use only')
    assert props['licence'] == kfkd_io.read_model_file(kfkd_beyond.PRETRAINED)[0]['licence']
