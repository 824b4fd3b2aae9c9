import sys
import zipfile

import numpy as np
import pandas as pd
import pytest

import kfkd
import kfkd_cli
import kfkd_engine
import kfkd_io


def help_text(capsys, *args):
    with pytest.raises(SystemExit) as exit:
        kfkd_cli.main([*args, '--help'])
    assert exit.value.code == 0
    return capsys.readouterr().out


def test_help_names_every_command(capsys):
    out = help_text(capsys)
    for command in ('fit', 'submit', 'demo', 'download', 'plot', 'plot_learning_curves'):
        assert command in out
    out = help_text(capsys, 'fit')
    assert '--max-epochs' in out and '--device' in out and '--resume' in out


def test_underscore_and_hyphen_spellings(capsys):
    for spelling in ('plot_learning_curves', 'plot-learning-curves'):
        assert 'learning curves' in help_text(capsys, spelling)


def test_fit_then_submit_from_the_command_line(demo_dir, tmp_path, capsys):
    """(test_modules runs `python kfkd.py` itself, in a fresh process.)"""
    model = tmp_path / 'net1.safetensors'
    code = kfkd_cli.main(['fit', '--net', 'net1', '--data', str(demo_dir), '--out', str(model),
                          '--max-epochs', '3', '--device', 'cpu'])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert 'produces     100 outputs' in out and 'valid RMSE' in out
    assert f'saved {model}' in out and model.is_file()
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit() and ' px ' in line]
    assert len(rows) == 3
    submission = tmp_path / 'sub.csv'
    assert kfkd_cli.main(['submit', str(model), '--data', str(demo_dir), '--out',
                          str(submission)]) == 0
    assert len(pd.read_csv(submission)) == len(pd.read_csv(demo_dir / 'IdLookupTable.csv'))


def test_fit_replaces_a_model_file_when_asked(demo_dir, tmp_path):
    model = tmp_path / 'net1.safetensors'
    model.write_bytes(b'an older model')
    assert kfkd_cli.main(['fit', '--net', 'net1', '--data', str(demo_dir), '--out', str(model),
                          '--max-epochs', '1', '--device', 'cpu', '--overwrite']) == 0
    assert kfkd_engine.load_net(model, 'cpu').name_ == 'net1'


def test_submit_names_its_file_with_a_timestamp(trained_net1, demo_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = kfkd.submit(trained_net1, data_dir=demo_dir)
    assert out.name.startswith('submission-20') and out.suffix == '.csv' and out.is_file()


@pytest.mark.slow  # net1 needs 300 epochs of 3000 demo faces to beat the mean
def test_demo_trains_submits_and_beats_the_mean(tmp_path, capsys):
    ours, baseline = kfkd_cli.demo(tmp_path / 'demo', device='cpu', n_train=3000, n_test=100,
                                   max_epochs=300)
    assert ours < baseline
    assert (tmp_path / 'demo' / 'submission.csv').is_file()
    assert 'predicting the training mean' in capsys.readouterr().out


def test_demo_refuses_a_folder_of_other_data(demo_dir, tmp_path):
    (tmp_path / 'training.csv').write_text('x')
    with pytest.raises(kfkd_io.KfkdError, match='did not make'):
        kfkd_cli.demo(tmp_path)


def test_download_unpacks_the_competition_zip(demo_dir, tmp_path):
    archive = tmp_path / 'facial-keypoints-detection.zip'
    with zipfile.ZipFile(archive, 'w') as z:
        for name in ('training', 'test'):
            inner = tmp_path / f'{name}.zip'
            with zipfile.ZipFile(inner, 'w', zipfile.ZIP_DEFLATED) as zi:
                zi.write(demo_dir / f'{name}.csv', f'{name}.csv')
            z.write(inner, f'{name}.zip')
        z.write(demo_dir / 'IdLookupTable.csv', 'IdLookupTable.csv')
        z.writestr('SampleSubmission.csv', 'RowId,Location\n')
    data = tmp_path / 'data'
    data.mkdir()
    kfkd_io.unpack_competition(archive, data)
    assert sorted(p.name for p in data.iterdir()) == [
        'IdLookupTable.csv', 'SampleSubmission.csv', 'test.zip', 'training.zip']
    X, y = kfkd.load2d(data_dir=data)
    assert np.array_equal(X, kfkd.load2d(data_dir=demo_dir)[0])


def test_download_explains_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'kaggle', None)  # as if not installed
    with pytest.raises(kfkd_io.KfkdError, match=r"pip install 'kfkd\[kaggle\]'"):
        kfkd_cli.download(tmp_path)


def test_plots_write_pngs(trained_net1, demo_dir, tmp_path):
    model = tmp_path / 'net1.safetensors'
    kfkd_engine.save_net(trained_net1, model, 'net1')
    for kind, files in (('curves', [model]), ('samples', [model]), ('flip', [])):
        out = tmp_path / f'{kind}.png'
        kfkd_cli.plot(kind, files, data_dir=demo_dir, out=out, device='cpu')
        assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
