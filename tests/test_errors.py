"""Bad input ends in one clear line on stderr, exit code 1 and no partial file.

Each case here is a row of the table in docs/errors.md.
"""
import gzip
import json
import os
import struct
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch

import kfkd
import kfkd_cli
import kfkd_engine
import kfkd_io


@pytest.fixture()
def data(demo_dir, tmp_path):
    """A small copy of the demo data to break: 40 training rows, 10 test faces."""
    folder = tmp_path / 'data'
    folder.mkdir()
    lines = (demo_dir / 'training.csv').read_bytes().split(b'\n')
    (folder / 'training.csv').write_bytes(b'\n'.join(lines[:41]) + b'\n')
    lines = (demo_dir / 'test.csv').read_bytes().split(b'\n')
    (folder / 'test.csv').write_bytes(b'\n'.join(lines[:11]) + b'\n')
    lookup = pd.read_csv(demo_dir / 'IdLookupTable.csv')
    lookup[lookup.ImageId <= 10].to_csv(folder / 'IdLookupTable.csv', index=False)
    return folder


@pytest.fixture()
def model(trained_net1, tmp_path):
    path = tmp_path / 'net1.safetensors'
    kfkd_engine.save_net(trained_net1, path, 'net1')
    return path


def fails(capsys, *args, message):
    """Run `kfkd ARGS`; it must fail with `message` in one line and no traceback."""
    code = kfkd_cli.main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert len(err.splitlines()) == 1 and 'Traceback' not in err
    assert err.startswith('kfkd: error: ')
    assert message in err, err
    return err


def fit_fails(capsys, data, message):
    out = data.parent / 'out.safetensors'
    err = fails(capsys, 'fit', '--net', 'net1', '--data', data, '--out', out, '--max-epochs',
                '1', '--device', 'cpu', message=message)
    assert not out.exists() and not list(data.parent.glob('.out.safetensors*'))
    return err


def edit_line(path, number, edit):
    lines = path.read_bytes().split(b'\n')
    lines[number - 1] = edit(lines[number - 1])
    path.write_bytes(b'\n'.join(lines))


def set_pixel(value):
    return lambda line: line[:line.rindex(b',') + 1] + value + line[line.index(b' ', line.rindex(b',')):]


TRAINING_CASES = {
    'empty file': (lambda p: p.write_bytes(b''), 'training.csv: the file is empty'),
    'header only': (lambda p: p.write_bytes(p.read_bytes().split(b'\n')[0] + b'\n'),
                    'training.csv: has a header but no rows'),
    'keypoint column missing': (
        lambda p: pd.read_csv(p).drop(columns='nose_tip_x').to_csv(p, index=False),
        'training.csv: missing keypoint column(s) nose_tip_x'),
    'Image column missing': (
        lambda p: pd.read_csv(p).drop(columns='Image').to_csv(p, index=False),
        'training.csv: no Image column'),
    'Image with 9215 values': (lambda p: edit_line(p, 3, lambda l: l[:l.rindex(b' ')]),
                               'training.csv: line 3: Image has 9215 values, expected 9216'),
    'Image with 9217 values': (lambda p: edit_line(p, 3, lambda l: l + b' 7'),
                               'training.csv: line 3: Image has 9217 values, expected 9216'),
    'non-numeric pixel': (lambda p: edit_line(p, 4, set_pixel(b'abc')),
                          "training.csv: line 4: Image holds 'abc'"),
    'negative pixel': (lambda p: edit_line(p, 4, set_pixel(b'-5')),
                       "training.csv: line 4: Image holds '-5'"),
    'pixel over 255': (lambda p: edit_line(p, 5, set_pixel(b'256')),
                       'training.csv: line 5: a pixel value is over 255'),
    'NaN Image': (lambda p: edit_line(p, 2, lambda l: l[:l.rindex(b',') + 1]),
                  'training.csv: line 2: Image is empty'),
    'non-numeric keypoint': (lambda p: edit_line(p, 6, lambda l: b'abc' + l[l.index(b','):]),
                             "training.csv: line 6: left_eye_center_x is 'abc', not a number"),
    'undecodable bytes in a keypoint': (
        lambda p: edit_line(p, 6, lambda l: b'\x89ab' + l[l.index(b','):]),
        "training.csv: line 6: left_eye_center_x is '\\x89ab', not a number"),
    'undecodable bytes in the pixels': (lambda p: edit_line(p, 4, set_pixel(b'\xff\xfe')),
                                        "training.csv: line 4: Image holds '\\xff\\xfe'"),
    'a quote never closed': (lambda p: edit_line(p, 6, lambda l: b'"' + l),
                             'training.csv: line 6: a quote (") that is never closed'),
    'a gzip file': (lambda p: p.write_bytes(gzip.compress(p.read_bytes())),
                    'training.csv: is a gzip file, not a CSV file: unpack it first (gunzip)'),
    'a zip file': (lambda p: (zip_it(p), p.with_suffix('.zip').rename(p)),
                   "training.csv: is a zip file, not a CSV file: name it .zip (kfkd reads "
                   "Kaggle's zips) or unzip it"),
}


def test_keypoints_outside_the_image_are_dropped_with_a_warning(data, capsys):
    edit_line(data / 'training.csv', 2, lambda l: b'120.5' + l[l.index(b','):])
    kfkd_io.read(data_dir=data)
    err = capsys.readouterr().err
    assert 'dropped 1 keypoint(s) outside the image (0-96) in 1 row(s)' in err
    labels, _ = kfkd_io.read(data_dir=data)
    assert labels[['left_eye_center_x', 'left_eye_center_y']].iloc[0].isna().all()


def zip_it(path, member=None, data=None):
    with zipfile.ZipFile(path.with_suffix('.zip'), 'w') as z:
        z.writestr(member or path.name, path.read_bytes() if data is None else data)
    path.unlink()


def damage(path, at=2000):
    blob = bytearray(path.read_bytes())
    blob[at:at + 10] = bytes(b ^ 0xFF for b in blob[at:at + 10])
    path.write_bytes(bytes(blob))


ZIP_CASES = {
    'truncated zip': (lambda p: (zip_it(p), p.with_suffix('.zip').write_bytes(
        p.with_suffix('.zip').read_bytes()[:5000])),
        'training.zip: a truncated zip file; download it again'),
    'not a zip': (lambda p: (p.rename(p.with_suffix('.zip'))),
                  'training.zip: not a zip file; download it again'),
    'a gzip file named .zip': (
        lambda p: (p.with_suffix('.zip').write_bytes(gzip.compress(p.read_bytes())), p.unlink()),
        'training.zip: a gzip file, not a zip file; download it again'),
    'damaged data in the zip': (lambda p: (zip_it(p), damage(p.with_suffix('.zip'))),
                                'training.zip: a damaged zip file (its data does not unpack)'),
    'zip without the CSV': (lambda p: zip_it(p, 'train.csv'),
                            'training.zip: the zip holds train.csv, not training.csv'),
}


TRAINING_FILE_CASES = {**TRAINING_CASES, **ZIP_CASES}


@pytest.mark.parametrize('case', TRAINING_FILE_CASES)
def test_bad_training_csv_or_zip(case, data, capsys):
    breaks, message = TRAINING_FILE_CASES[case]
    breaks(data / 'training.csv')
    assert fit_fails(capsys, data, message).isprintable()


def submit_fails(capsys, model, data, message):
    out = data.parent / 'submission.csv'
    err = fails(capsys, 'submit', model, '--data', data, '--out', out, '--device', 'cpu',
                message=message)
    assert not out.exists()
    return err


def replace_csv(path, change):
    frame = pd.read_csv(path)
    change(frame)
    frame.to_csv(path, index=False)


TEST_CASES = {
    'duplicate ImageId': ('test.csv', lambda f: f.loc.__setitem__((3, 'ImageId'), 2),
                          'test.csv: line 5: ImageId 2 appears twice'),
    'missing ImageId': ('test.csv', lambda f: f.loc.__setitem__((4, 'ImageId'), np.nan),
                        'test.csv: line 6: ImageId is missing or not a number'),
    'lookup asks for an unknown image': (
        'IdLookupTable.csv', lambda f: f.loc.__setitem__((0, 'ImageId'), 999),
        'IdLookupTable.csv: RowId 1 asks for ImageId 999, which is not in test.csv'),
    'lookup asks for an unknown feature': (
        'IdLookupTable.csv', lambda f: f.loc.__setitem__((0, 'FeatureName'), 'left_ear_x'),
        "IdLookupTable.csv: FeatureName 'left_ear_x' is not a keypoint column"),
    'lookup lacks a column': ('IdLookupTable.csv', lambda f: f.pop('FeatureName'),
                              'IdLookupTable.csv: missing column(s) FeatureName'),
}


@pytest.mark.parametrize('case', TEST_CASES)
def test_bad_test_data(case, data, model, capsys):
    name, change, message = TEST_CASES[case]
    replace_csv(data / name, change)
    submit_fails(capsys, model, data, message)


def header_only(path):
    path.write_bytes(path.read_bytes().split(b'\n')[0] + b'\n')


TEST_FILE_CASES = {
    'test.csv without rows': ('test.csv', header_only, 'test.csv: has a header but no rows'),
    'IdLookupTable without rows': ('IdLookupTable.csv', header_only,
                                   'IdLookupTable.csv: has a header but no rows'),
    'an empty IdLookupTable': ('IdLookupTable.csv', lambda p: p.write_bytes(b''),
                               'IdLookupTable.csv: the file is empty'),
    'IdLookupTable: a row with a field too many': (
        'IdLookupTable.csv', lambda p: edit_line(p, 3, lambda l: l + b',7'),
        'IdLookupTable.csv: line 3: 5 fields where the header has 4'),
    'a binary IdLookupTable': ('IdLookupTable.csv', lambda p: p.write_bytes(bytes(range(256))),
                               "IdLookupTable.csv: is a binary file, not a CSV file: use "
                               "Kaggle's CSV files, which are text"),
    'a PNG named test.csv': ('test.csv', lambda p: p.write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(99)),
                             "test.csv: is a PNG image, not a CSV file: use Kaggle's CSV files"),
}


@pytest.mark.parametrize('case', TEST_FILE_CASES)
def test_bad_test_files(case, data, model, capsys):
    name, breaks, message = TEST_FILE_CASES[case]
    breaks(data / name)
    err = submit_fails(capsys, model, data, message)
    assert err.isprintable()  # no raw bytes of the file in the message


def rewrite_meta(path, change):
    """Change a model file's metadata, with a valid checksum: a well-formed file."""
    meta, tensors = kfkd_io.read_model_file(path)
    change(meta)
    meta.pop('format'), meta.pop('version', None)
    kfkd_io.write_model_file(path, meta, tensors)
    if 'version' in change.__doc__:
        blob = path.read_bytes()
        size = struct.unpack('<Q', blob[:8])[0]
        header = json.loads(blob[8:8 + size])
        inner = json.loads(header['__metadata__']['kfkd'])
        inner['version'] = 99
        text = json.dumps(inner, separators=(',', ':'))
        data = blob[8 + size:]
        header['__metadata__'] = {'kfkd': text, 'sha256': kfkd_io._checksum(text, data)}
        head = json.dumps(header).encode()
        head += b' ' * (-len(head) % 8)
        path.write_bytes(struct.pack('<Q', len(head)) + head + data)


def other_version(meta):
    """version"""


def fewer_columns(meta):
    """columns"""
    meta['models'][0]['columns'][-2:] = ['left_ear_x', 'left_ear_y']


def other_net(meta):
    """name"""
    meta['models'][0]['name'] = 'net2'


def fewer_hidden_units(meta):
    """settings"""
    meta['models'][0]['settings']['module__hidden_units'] = 50


def unknown_setting(meta):
    """settings"""
    meta['models'][0]['settings']['module__depth'] = 3


def break_tensor_header(path):
    """A tensor's dtype changed in the safetensors header: the kfkd checksum
    (over kfkd's metadata and the tensor bytes) still matches."""
    blob = path.read_bytes()
    size = struct.unpack('<Q', blob[:8])[0]
    header = json.loads(blob[8:8 + size])
    header['weights/hidden.weight']['dtype'] = 'F16'
    head = json.dumps(header).encode()
    head += b' ' * (-len(head) % 8)
    path.write_bytes(struct.pack('<Q', len(head)) + head + blob[8 + size:])


def flip_bytes(path):
    blob = bytearray(path.read_bytes())
    blob[-1000:-990] = bytes(b ^ 0xFF for b in blob[-1000:-990])
    path.write_bytes(bytes(blob))


MODEL_CASES = {
    'not a kfkd file': (lambda p: p.write_text('RowId,Location\n1,2\n'),
                        'net1.safetensors: not a kfkd model file'),
    'empty model file': (lambda p: p.write_bytes(b''), 'net1.safetensors: not a kfkd model file'),
    'another format version': (lambda p: rewrite_meta(p, other_version),
                               'written in kfkd model format 99; this kfkd reads format 1'),
    'tampered file': (flip_bytes, 'net1.safetensors: damaged or modified (checksum mismatch)'),
    'weights of another net': (lambda p: rewrite_meta(p, other_net),
                               'net1.safetensors: its settings do not fit net net2 as this kfkd '
                               'defines it; train it again with this kfkd'),
    'weights of another shape': (lambda p: rewrite_meta(p, fewer_hidden_units),
                                 'net1.safetensors: its weights do not fit net net1: '
                                 'hidden.weight is 100x9216, where the net has 50x9216'),
    'a setting this kfkd does not have': (lambda p: rewrite_meta(p, unknown_setting),
                                          'net1.safetensors: module__depth is not a setting of '
                                          'net net1 in this kfkd'),
    'weights safetensors cannot read': (break_tensor_header,
                                        'net1.safetensors: damaged: its weights cannot be read'),
    'columns other than asked': (lambda p: rewrite_meta(p, fewer_columns),
                                 "FeatureName 'mouth_center_bottom_lip_x' is a keypoint this "
                                 "model does not predict"),
}


@pytest.mark.parametrize('case', MODEL_CASES)
def test_bad_model_file(case, model, demo_dir, capsys):
    breaks, message = MODEL_CASES[case]
    breaks(model)
    submit_fails(capsys, model, demo_dir, message)


@pytest.mark.parametrize('args, message', [
    (['--net', 'net99'], "argument --net: invalid choice: 'net99'"),
    (['--mirror-axis', 'middle'], "argument --mirror-axis: 'middle': give 'measured' or a "
                                  "number such as 96"),
    (['--mirror-axis', '120'], "argument --mirror-axis: 120: a mirror axis lies within a few "
                               "pixels of the 96-pixel image's width (90-102)"),
])
def test_usage_errors(capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        kfkd_cli.main(['fit', *args])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


OPTION_CASES = {
    'negative epochs': (['fit', '--max-epochs', '-3'], '--max-epochs must be at least 1, not -3'),
    'zero time budget': (['fit', '--time-budget', '0'], '--time-budget must be positive, not 0.0'),
    'negative learning rate': (['fit', '--lr', '-1'], '--lr must be positive, not -1.0'),
    'no jobs': (['fit_specialists', '--jobs', '0'], '--jobs must be at least 1, not 0'),
    'zero epochs scale': (['fit_specialists', '--epochs-scale', '0'],
                          '--epochs-scale must be positive, not 0.0'),
    'groups that are not there': (
        ['fit', '--groups', 'people.csv'],
        "groups 'people.csv': neither a column of training.csv nor a file"),
}


def test_dask_without_a_scheduler(data, capsys):
    dask = pytest.importorskip('dask')
    pytest.importorskip('distributed')
    with dask.config.set({'distributed.comm.timeouts.connect': '1s'}):
        fails(capsys, 'fit_specialists', '--data', data, '--max-epochs', '1', '--device', 'cpu',
              '--dask', 'tcp://127.0.0.1:1',
              message='--dask tcp://127.0.0.1:1: cannot reach a Dask scheduler there; start one')


def test_data_that_names_a_file(data, capsys):
    fails(capsys, 'fit', '--net', 'net1', '--data', data / 'training.csv', '--device', 'cpu',
          message=f'{data / "training.csv"} is a file, not a folder: name the folder that holds '
                  'training.csv')


@pytest.mark.parametrize('error, message', [
    (MemoryError(), 'out of memory: close other programs that hold memory, and try again'),
    (torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB'),
     'out of memory on the GPU: close other programs that hold memory, or train on the CPU '
     '(--device cpu), and try again')])
def test_out_of_memory_in_kfkds_words(error, message, monkeypatch, data, capsys):
    def runs_out(*args, **kwargs):
        raise error
    monkeypatch.setattr(kfkd, 'read', runs_out)
    err = fails(capsys, 'plot', 'flip', '--data', data, message=message)
    assert 'Tried to allocate' not in err


@pytest.mark.parametrize('case', OPTION_CASES)
def test_bad_option(case, data, capsys):
    (command, *options), message = OPTION_CASES[case]
    net = ['--net', 'net1'] if command == 'fit' else []
    fails(capsys, command, *net, '--data', data, *options, '--device', 'cpu', message=message)


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_cuda_without_a_gpu(data, capsys):
    fails(capsys, 'fit', '--net', 'net1', '--data', data, '--device', 'cuda',
          message='--device cuda: no CUDA GPU is available')
    assert kfkd_engine.resolve_device('auto') == 'cpu'


def test_a_cache_bound_that_is_not_a_number(data, monkeypatch, capsys):
    monkeypatch.setenv('KFKD_CACHE_MB', 'lots')
    fails(capsys, 'fit', '--net', 'net1', '--data', data, '--out', data / 'net1.safetensors',
          message='KFKD_CACHE_MB=lots: give the megabytes the parse cache may hold, such as '
                  '512 (0: no cache)')


def test_missing_data_folder_says_where_and_how(tmp_path, capsys):
    err = fails(capsys, 'fit', '--net', 'net1', '--data', tmp_path / 'nowhere',
                message=f'data folder {tmp_path / "nowhere"} does not exist')
    assert 'kfkd demo' in err and 'kfkd download' in err


def test_folder_without_training_data(tmp_path, capsys):
    err = fails(capsys, 'fit', '--net', 'net1', '--data', tmp_path,
                message=f'no training.csv or training.zip in {tmp_path}')
    assert 'kfkd demo' in err


def test_resume_without_a_checkpoint(tmp_path, capsys):
    fails(capsys, 'fit', '--resume', '--out', tmp_path / 'none.safetensors',
          message='none.safetensors: no such model file')


def test_resume_of_a_finished_run(model, demo_dir, capsys):
    fails(capsys, 'fit', '--resume', '--out', model, '--data', demo_dir,
          message='nothing to resume: the run finished (5 epochs)')


@pytest.mark.parametrize('command, also', [
    (['fit', '--net', 'net1'], '--resume to continue its interrupted run'),
    (['fit_specialists'], '--resume to train the specialists it lacks')])
def test_a_model_file_is_not_replaced_unless_asked(command, also, model, tmp_path, capsys):
    before = model.read_bytes()
    # refused before the data is read: there is none in tmp_path
    fails(capsys, *command, '--out', model, '--data', tmp_path, '--device', 'cpu',
          message=f'{model}: already there; pass --overwrite to replace it, {also}, or --out '
                  f'to write another file')
    assert model.read_bytes() == before


def test_export_does_not_replace_a_file_unless_asked(model, tmp_path, capsys):
    onnx_file = tmp_path / 'net1.onnx'
    onnx_file.write_bytes(b'mine')
    fails(capsys, 'export', model, '--out', onnx_file,
          message=f'{onnx_file}: already there; pass --overwrite to replace it, or --out to '
                  f'write another file')
    assert onnx_file.read_bytes() == b'mine'


def test_a_bug_is_one_line_too(monkeypatch, data, capsys):
    monkeypatch.setattr(kfkd, 'read', lambda *a, **k: 1 / 0)
    code = kfkd_cli.main(['plot', 'flip', '--data', str(data)])
    err = capsys.readouterr().err
    assert code == 1 and err.count('\n') == 1 and 'ZeroDivisionError' in err
    assert '--debug' in err


def test_written_files_get_the_usual_permissions(trained_net1, tmp_path):
    umask = os.umask(0o022)
    try:
        kfkd_engine.save_net(trained_net1, tmp_path / 'net1.safetensors', 'net1')
    finally:
        os.umask(umask)
    assert (tmp_path / 'net1.safetensors').stat().st_mode & 0o777 == 0o644


def test_predict_without_opencv(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'cv2', None)  # as if not installed
    photo = tmp_path / 'me.jpg'
    photo.write_bytes(b'not looked at')
    fails(capsys, 'predict', photo, '--model', model, '--out', tmp_path,
          message="kfkd predict needs OpenCV: pip install 'kfkd[photo]'")
