import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone

import kfkd
import kfkd_beyond
import kfkd_cli
import kfkd_engine
import kfkd_io


def small_net7():
    """net7 made small, so that training six of them takes seconds."""
    return clone(kfkd.net7).set_params(module__conv_filters=(4, 8, 8),
                                       module__hidden_units=(32, 32))


def fit(tiny, out, **kwargs):
    return kfkd.fit_specialists(data_dir=tiny, out=out, max_epochs=2, device='cpu',
                                net=small_net7(), **kwargs)


@pytest.fixture(scope='module')
def specialists(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp('specialists') / 'specialists.safetensors'
    return fit(tiny, out), out


def test_settings_cover_all_columns_once():
    columns = [c for s in kfkd.SPECIALIST_SETTINGS for c in s['columns']]
    assert sorted(columns) == sorted(kfkd_io.COLUMNS) and len(columns) == 30


def test_each_groups_flip_pairs_map_left_to_right():
    for setting in kfkd.SPECIALIST_SETTINGS:
        cols = setting['columns']
        paired = {i for pair in setting['flip_indices'] for i in pair}
        for a, b in setting['flip_indices']:
            assert cols[a].replace('left', 'right') == cols[b]
        for i, name in enumerate(cols):  # unpaired columns are neither left nor right
            assert i in paired or ('left' not in name and 'right' not in name)


def test_pretraining_copies_exactly_the_matching_layers():
    torch.manual_seed(0)
    source = kfkd_engine.build_net('net7', device='cpu').initialize().module_.state_dict()
    torch.manual_seed(1)
    net = kfkd.specialist(kfkd.SPECIALIST_SETTINGS[0], rows=1000, pretrain=source, device='cpu')
    assert net.pretrained_ == ['conv1', 'conv2', 'conv3', 'hidden4', 'hidden5']
    for name, value in net.module_.state_dict().items():
        if name.startswith('output'):  # fresh: 4 outputs, not net7's 30
            assert value.shape[0] == 4 and value.shape != source[name].shape
        else:
            assert torch.equal(value, source[name])
    assert net.max_epochs == 4000  # int(4e6 / rows), the tutorial's rule


def test_specialists_file_gives_a_full_submission(specialists, tiny, tmp_path):
    trained, path = specialists
    assert list(trained) == [tuple(s['columns']) for s in kfkd.SPECIALIST_SETTINGS]
    rows = {len(net.history) for net in trained.values()}
    assert rows == {2}
    nose = trained[('nose_tip_x', 'nose_tip_y')]
    assert nose.module__dropout2_p == 0.3 and nose.module_.output.out_features == 2
    out = kfkd.submit(path, data_dir=tiny, out=tmp_path / 'submission.csv')
    submission = pd.read_csv(out)
    lookup = pd.read_csv(tiny / 'IdLookupTable.csv')
    assert submission['RowId'].tolist() == lookup['RowId'].tolist()
    assert submission['Location'].notna().all() and submission['Location'].between(0, 96).all()
    # each column comes from its specialist
    X, _ = kfkd.load2d(test=True, data_dir=tiny)
    first = lookup[lookup.FeatureName == 'nose_tip_y'].iloc[0]
    expected = nose.predict(X[first.ImageId - 1:first.ImageId])[0, 1] * 48 + 48
    assert submission.set_index('RowId').Location[first.RowId] == pytest.approx(
        np.clip(expected, 0, 96), abs=1e-4)


def weights_of(trained):
    return {cols: net.module_.state_dict() for cols, net in trained.items()}


def assert_same_models(a, b):
    for cols in a:
        for name, value in a[cols].items():
            assert torch.allclose(value, b[cols][name], atol=1e-4), (cols, name)


@pytest.mark.slow
def test_two_jobs_give_the_same_models_as_one(specialists, tiny, tmp_path):
    parallel = fit(tiny, tmp_path / 's.safetensors', jobs=2)
    assert_same_models(weights_of(specialists[0]), weights_of(parallel))


@pytest.mark.slow
def test_dask_cluster_gives_the_same_models(specialists, tiny, tmp_path):
    pytest.importorskip('distributed')
    on_dask = fit(tiny, tmp_path / 's.safetensors', dask='local')
    assert_same_models(weights_of(specialists[0]), weights_of(on_dask))


def test_resume_trains_only_the_missing_specialists(specialists, tiny, tmp_path, capsys):
    trained, _ = specialists
    partial = tmp_path / 'partial.safetensors'
    kfkd_engine.save_specialists(dict(list(trained.items())[:2]), partial)
    assert 'holds 2 of 6 specialists' in kfkd_error(lambda: kfkd.load_specialists(partial))
    capsys.readouterr()
    again = fit(tiny, partial, resume=True)
    assert '4 specialists in' in capsys.readouterr().out
    assert_same_models(weights_of(trained), weights_of(again))


def test_the_command_line_resumes_the_file_it_would_not_replace(specialists, tiny, tmp_path,
                                                                capsys):
    trained, _ = specialists
    partial = tmp_path / 'partial.safetensors'
    kfkd_engine.save_specialists(dict(list(trained.items())[:5]), partial)
    options = ['fit_specialists', '--data', str(tiny), '--out', str(partial), '--max-epochs', '1',
               '--device', 'cpu']
    assert kfkd_cli.main(options) == 1
    assert 'partial.safetensors: already there' in capsys.readouterr().err
    assert len(kfkd.load_specialists(partial, complete=False)) == 5
    assert kfkd_cli.main(options + ['--resume']) == 0
    assert '1 specialists in' in capsys.readouterr().out
    assert len(kfkd.load_specialists(partial)) == 6


def kfkd_error(call):
    with pytest.raises(kfkd_io.KfkdError) as error:
        call()
    return str(error.value)


def test_pretraining_from_a_file_reports_the_layers_copied(tiny, tmp_path, capsys):
    source = tmp_path / 'net7.safetensors'
    net = small_net7().set_params(max_epochs=1, verbose=0, device='cpu')
    X, y = kfkd.load2d(data_dir=tiny)
    kfkd_engine.save_net(net.fit(X, y), source, 'net7')
    capsys.readouterr()
    fit(tiny, tmp_path / 's.safetensors', pretrain=source, jobs=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if 'cols):' in line]
    assert len(lines) == 6
    assert all(line.endswith('pre-trained conv1, conv2, conv3, hidden4, hidden5')
               for line in lines)


def test_wrong_kind_of_model_file(specialists, trained_net1, tmp_path):
    _, path = specialists
    assert 'holds specialists, not a single net' in kfkd_error(
        lambda: kfkd_cli.fit(out=path, resume=True, device='cpu'))
    assert 'holds specialists, not a single net' in kfkd_error(
        lambda: kfkd.fit_specialists(pretrain=path, out=tmp_path / 'x.safetensors'))
    single = tmp_path / 'net1.safetensors'
    kfkd_engine.save_net(trained_net1, single, 'net1')
    assert 'holds a single net, not specialists' in kfkd_error(
        lambda: kfkd.fit_specialists(out=single, resume=True))


def test_a_specialist_keeps_the_name_of_the_net_it_is_a_clone_of(tiny, tmp_path):
    net6 = clone(kfkd.net6).set_params(module__conv_filters=(4, 8, 8),
                                       module__hidden_units=(32, 32))
    out = tmp_path / 's.safetensors'
    trained = kfkd.fit_specialists(data_dir=tiny, out=out, max_epochs=1, device='cpu', net=net6)
    loaded = kfkd.load_specialists(out, 'cpu')
    X, _ = kfkd.load2d(test=True, data_dir=tiny)
    for cols, specialist in trained.items():
        assert specialist.name_ == loaded[cols].name_ == 'net6'
        assert loaded[cols].module_.output.out_features == len(cols)
        assert np.allclose(loaded[cols].predict(X[:4]), specialist.predict(X[:4]), atol=1e-6)


def test_specialists_of_nets_they_do_not_fit_are_refused_before_any_training(tiny, tmp_path):
    class Other(torch.nn.Linear):
        pass
    other = kfkd_engine.KeypointNet(Other, module__in_features=9216, module__out_features=30)
    for net, message in ((kfkd_beyond.net9, 'set module__dropout2_p for the specialist of '
                                            'nose_tip_x..., which net9 does not have'),
                         (other, "not a variant of any of kfkd's nets")):
        assert message in kfkd_error(
            lambda: kfkd.fit_specialists(data_dir=tiny, out=tmp_path / 's', net=net))
        assert not (tmp_path / 's').exists()
