"""The mirror axis of a data set, measured from its faces and labels."""
import pytest
from sklearn.base import clone

import kfkd
import kfkd_cli
import kfkd_engine
import kfkd_io
from conftest import shared


@pytest.fixture(scope='module')
def demo_faces(demo_dir):
    return kfkd.load2d(data_dir=demo_dir, dropna=False)


def test_demo_faces_mirror_about_96_as_they_are_drawn(demo_faces):
    """The demo faces are drawn with x counted from the image's left edge
    (pixel i spans i..i+1), whose mirror axis is 96."""
    measured = kfkd_engine.measure_mirror_axis(*demo_faces, use_cache=False)
    assert measured.axis == pytest.approx(96, abs=0.15) and measured.uncertainty < 0.3
    assert measured.faces == 600 and len(measured.per_pair) == 9  # 6 pairs, 3 middle points
    assert str(measured) == (f'x -> {measured.axis:.2f} - x (+- {measured.uncertainty:.2f}, '
                             f'from 600 faces)')


@pytest.mark.parametrize('shift', [0.5, -0.5, 1.0])
def test_labels_moved_by_half_a_pixel_move_the_axis_by_one(demo_faces, shift):
    X, y = demo_faces
    moved = y.copy()
    moved[:, 0::2] += shift / kfkd_engine.HALF
    before = kfkd_engine.measure_mirror_axis(X, y, use_cache=False).axis
    after = kfkd_engine.measure_mirror_axis(X, moved, use_cache=False).axis
    assert after - before == pytest.approx(2 * shift, abs=1e-3)


def test_a_specialists_columns_measure_alone(demo_faces):
    """The nose's columns alone: one middle keypoint, still the axis."""
    X, y = demo_faces
    nose = [kfkd_io.COLUMNS.index('nose_tip_x'), kfkd_io.COLUMNS.index('nose_tip_y')]
    measured = kfkd_engine.measure_mirror_axis(X, y[:, nose], ['nose_tip_x', 'nose_tip_y'],
                                               use_cache=False)
    assert measured.axis == pytest.approx(96, abs=0.2) and list(measured.per_pair) == ['nose_tip']


def test_the_measurement_is_cached_by_the_datas_bytes(demo_faces, monkeypatch, tmp_path):
    monkeypatch.setenv('KFKD_CACHE', str(tmp_path))
    first = kfkd_engine.measure_mirror_axis(*demo_faces)
    assert len(list(tmp_path.glob('mirror-axis-*.json'))) == 1
    monkeypatch.setattr(kfkd_engine.geometry, '_measure_mirror_axis', lambda *args: 1 / 0)
    assert kfkd_engine.measure_mirror_axis(*demo_faces) == first  # read back, not measured
    X, y = demo_faces
    with pytest.raises(ZeroDivisionError):  # other data: measured anew
        kfkd_engine.measure_mirror_axis(X[1:], y[1:])


def test_the_tutorials_nets_keep_96_unless_asked(demo_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(kfkd, 'net3', clone(kfkd.net3).set_params(  # small layers: quick
        module__conv_filters=(4, 8, 8), module__hidden_units=(32, 32)))
    out = tmp_path / 'net3.safetensors'
    kfkd_cli.main(['fit', '--net', 'net3', '--data', str(demo_dir), '--out', str(out),
                   '--max-epochs', '1', '--device', 'cpu'])
    assert kfkd_engine.load_net(out, 'cpu').mirror_axis_ == 96
    kfkd_cli.main(['fit', '--net', 'net3', '--data', str(demo_dir), '--out', str(out),
                   '--max-epochs', '1', '--device', 'cpu', '--mirror-axis', 'measured',
                   '--overwrite'])
    assert 'Mirror axis, measured on the training faces: x -> 9' in capsys.readouterr().out
    assert kfkd_engine.load_net(out, 'cpu').mirror_axis_ == pytest.approx(96, abs=0.3)
    assert kfkd_cli.main(['fit', '--resume', '--out', str(out), '--mirror-axis', '97']) == 1
    assert '--mirror-axis cannot change a resumed run' in capsys.readouterr().err


def test_kaggle_layout_real_faces_mirror_about_97_and_a_half():
    """Measured on ../shared's real faces: their labels' axis is not the tutorial's."""
    data = shared('faces')
    X, y = kfkd.load2d(data_dir=data, dropna=False)
    measured = kfkd_engine.measure_mirror_axis(X, y, use_cache=False)
    assert 97.2 < measured.axis < 98.2
