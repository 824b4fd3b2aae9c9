import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import kfkd
import kfkd_io
from conftest import shared


def test_load_shapes_types_ranges(demo_dir):
    X, y = kfkd.load(data_dir=demo_dir)
    complete = pd.read_csv(demo_dir / 'training.csv', usecols=kfkd_io.COLUMNS).dropna()
    assert X.shape == (len(complete), 9216) and X.dtype == np.float32
    assert y.shape == (len(complete), 30) and y.dtype == np.float32
    assert 0 <= X.min() and X.max() <= 1 and X.max() > 0.9
    assert -1 <= y.min() and y.max() <= 1
    # scaled as the tutorial scales: y = (pixels - 48) / 48
    assert np.allclose(np.sort((complete.to_numpy() - 48) / 48, axis=0),
                       np.sort(y, axis=0), atol=1e-6)


def test_load2d_and_test_data(demo_dir):
    X, y = kfkd.load2d(data_dir=demo_dir)
    assert X.shape[1:] == (1, 96, 96) and len(X) == len(y)
    Xt, yt = kfkd.load2d(test=True, data_dir=demo_dir)
    assert Xt.shape == (120, 1, 96, 96) and yt is None


def test_cols_keep_every_row_that_has_them(demo_dir):
    cols = ('nose_tip_x', 'nose_tip_y')
    X, y = kfkd.load(cols=cols, data_dir=demo_dir)
    assert y.shape == (600, 2)  # the nose tip is never missing, as in Kaggle
    assert len(kfkd.load(data_dir=demo_dir)[0]) < 300  # ~30% complete rows


def test_shuffle_is_deterministic(demo_dir, tmp_path):
    X1, y1 = kfkd.load(data_dir=demo_dir)
    X2, y2 = kfkd.load(data_dir=demo_dir)
    assert np.array_equal(y1, y2) and np.array_equal(X1, X2)
    file_order = ((pd.read_csv(demo_dir / 'training.csv', usecols=kfkd_io.COLUMNS).dropna()
                   .to_numpy() - 48) / 48).astype(np.float32)
    assert not np.array_equal(file_order, y1)


def test_load_prints_counts_per_column(demo_dir, capsys):
    kfkd.load(data_dir=demo_dir)
    out = capsys.readouterr().out
    assert 'left_eye_center_x' in out and 'Image' in out and '600' in out


def test_bulk_parse_matches_the_tutorials_parse(demo_dir):
    labels, pixels = kfkd_io.parse_csv((demo_dir / 'training.csv').read_bytes(), 'training.csv')
    reference = pd.read_csv(demo_dir / 'training.csv')
    expected = np.vstack([np.array(im.split(), dtype=np.uint8) for im in reference['Image']])
    assert np.array_equal(pixels, expected)
    assert np.allclose(labels.to_numpy(), reference.drop(columns='Image').to_numpy(),
                       equal_nan=True)


def test_reads_kaggle_zips_and_crlf(demo_dir, tmp_path):
    data = (demo_dir / 'training.csv').read_bytes()
    with zipfile.ZipFile(tmp_path / 'training.zip', 'w', zipfile.ZIP_DEFLATED) as z:
        z.writestr('training.csv', data.replace(b'\n', b'\r\n'))
    (tmp_path / 'test.csv').write_bytes((demo_dir / 'test.csv').read_bytes())
    X, y = kfkd.load(data_dir=tmp_path)
    X0, y0 = kfkd.load(data_dir=demo_dir)
    assert np.array_equal(X, X0) and np.array_equal(y, y0)


def test_cache_is_used_and_rebuilt_when_the_file_changes(demo_dir, tmp_path, monkeypatch):
    path = tmp_path / 'training.csv'
    path.write_bytes((demo_dir / 'training.csv').read_bytes())
    first = kfkd_io.read_faces(path)
    parses = []
    real_parse = kfkd_io.parse_csv
    monkeypatch.setattr(kfkd_io, 'parse_csv', lambda *a: parses.append(1) or real_parse(*a))
    again = kfkd_io.read_faces(path)
    assert parses == [] and np.array_equal(first[1], again[1])
    data = bytearray(path.read_bytes())
    data[data.rindex(b' 1')+1:data.rindex(b' 1')+2] = b'2'  # same size, other content
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    changed = kfkd_io.read_faces(path)
    assert parses == [1] and not np.array_equal(first[1], changed[1])


def test_the_cache_evicts_the_least_recently_used_beyond_its_bound(tmp_path, monkeypatch):
    monkeypatch.setenv('KFKD_CACHE', str(tmp_path / 'cache'))
    pixels = np.zeros((20, 9216), np.uint8)
    files = {name: tmp_path / f'{name}.csv' for name in 'abcd'}
    for name, path in files.items():
        kfkd_io.write_faces(path, pd.DataFrame({'x': range(20)}), pixels)
    kfkd_io.read_faces(files['a'])
    entry = kfkd_io.cache_file(files['a']).stat().st_size
    monkeypatch.setenv('KFKD_CACHE_MB', str(2.5 * entry / 1e6))  # room for two entries
    kfkd_io.read_faces(files['b'])
    for age, name in enumerate('ab'):  # a used long ago, b less long ago
        os.utime(kfkd_io.cache_file(files[name]), ns=(age, age))
    kfkd_io.read_faces(files['a'])  # from the cache: a is now the most recently used
    kfkd_io.read_faces(files['c'])
    cached = {name for name, path in files.items() if kfkd_io.cache_file(path).is_file()}
    assert cached == {'a', 'c'}
    (tmp_path / 'cache' / 'notes.npz').write_bytes(bytes(3 * entry))  # not kfkd's: kept
    axis = tmp_path / 'cache' / f'mirror-axis-{"0" * 32}.json'  # a measured axis: kfkd's
    axis.write_text('{}')
    os.utime(axis, ns=(0, 0))
    kfkd_io.read_faces(files['d'])
    assert (tmp_path / 'cache' / 'notes.npz').is_file() and not axis.exists()


def test_a_cache_bound_of_0_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv('KFKD_CACHE', str(tmp_path / 'cache'))
    path = tmp_path / 'a.csv'
    kfkd_io.write_faces(path, pd.DataFrame({'x': range(5)}), np.zeros((5, 9216), np.uint8))
    monkeypatch.setenv('KFKD_CACHE_MB', '0')
    kfkd_io.read_faces(path)
    assert not kfkd_io.cache_file(path).exists()


def test_write_faces_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 9216), dtype=np.uint8)
    pixels[0, :3] = [0, 255, 7]
    labels = pd.DataFrame({'a': [1.5, np.nan, 3, 4, 5], 'b': range(5)})
    kfkd_io.write_faces(tmp_path / 'x.csv', labels, pixels)
    read_labels, read_pixels = kfkd_io.read_faces(tmp_path / 'x.csv', use_cache=False)
    assert np.array_equal(read_pixels, pixels)
    assert read_labels.equals(labels.astype({'b': 'int64'}))


def test_kaggle_labels_give_the_tutorials_numbers(tmp_path, capsys):
    labels = pd.read_csv(shared('kaggle', 'training-labels.csv'))
    kfkd_io.write_faces(tmp_path / 'training.csv', labels,
                        np.zeros((len(labels), 9216), np.uint8))
    X, y = kfkd.load(data_dir=tmp_path)
    assert X.shape == (2140, 9216)
    assert round(float(y.min()), 3) == -0.920 and round(float(y.max()), 3) == 0.996
    counts = capsys.readouterr().out
    assert 'left_eye_center_x            7039' in counts
    assert 'Image                        7049' in counts


@pytest.mark.parametrize('layout', ['zips', 'unpacked'])
def test_kaggle_notebooks_attached_data_is_found(layout, demo_dir, tmp_path, monkeypatch):
    """Where ./data holds no training data and $KFKD_DATA is unset, the files
    Kaggle Notebooks attach: as Kaggle ships them, or unpacked into folders."""
    attached = tmp_path / 'kaggle' / 'input' / 'facial-keypoints-detection'
    for name in ('training', 'test'):
        csv = (demo_dir / f'{name}.csv').read_bytes()
        if layout == 'zips':
            attached.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(attached / f'{name}.zip', 'w') as z:
                z.writestr(f'{name}.csv', csv)
        else:
            (attached / name).mkdir(parents=True)
            (attached / name / f'{name}.csv').write_bytes(csv)
    (attached / 'IdLookupTable.csv').write_bytes((demo_dir / 'IdLookupTable.csv').read_bytes())
    monkeypatch.setattr(kfkd_io, 'KAGGLE_INPUT', attached)
    monkeypatch.delenv('KFKD_DATA', raising=False)
    monkeypatch.chdir(tmp_path)
    assert kfkd_io.data_path() == attached
    X, y = kfkd.load()
    assert X.shape[1] == 9216 and len(X) == len(y)
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / 'training.csv').write_bytes((demo_dir / 'training.csv').read_bytes())
    assert kfkd_io.data_path() == Path('data')  # ./data first, where it has data
