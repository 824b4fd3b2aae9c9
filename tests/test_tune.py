"""kfkd tune: the search's grammar, its trials here and on a real local Dask
cluster, its faults (a killed worker, a process that died, Ctrl-C, bad
options), and the settings file that fit and fit_specialists take. Faults
strike at a known point of a trial (a callback), never after a wait."""
import contextlib
import io
import json
import re
import signal
import sqlite3
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
from sklearn.base import clone
from skorch.callbacks import Callback

import kfkd
import kfkd_cli
import kfkd_engine
import kfkd_settings
import kfkd_tune
from kfkd_io import KfkdError

optuna = pytest.importorskip('optuna')

LR = ['--param', 'lr=0.001:0.02:log']  # net1 does not diverge on the tiny faces there


def succeeds(*args):
    assert kfkd_cli.main([str(a) for a in args]) == 0


@pytest.fixture(scope='module')
def tiny(demo_dir, tmp_path_factory):
    """Demo data cut to 150 training rows, and a groups file for them: ten
    faces a person."""
    folder = tmp_path_factory.mktemp('tiny')
    lines = (demo_dir / 'training.csv').read_bytes().split(b'\n')
    (folder / 'training.csv').write_bytes(b'\n'.join(lines[:151]) + b'\n')
    pd.DataFrame({'row': range(150), 'person': [r // 10 for r in range(150)]}).to_csv(
        folder / 'people.csv', index=False)
    return folder


def search(tiny, folder, *args, trials=2):
    """`kfkd tune` of net1's learning rate on the tiny faces, its study in
    `folder`; returns the exit code and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = kfkd_cli.main([str(a) for a in (
            'tune', '--net', 'net1', '--data', tiny, '--trials', trials, '--trial-budget', 0.3,
            '--device', 'cpu', '--study', folder / 'tune-net1.db', '--out',
            folder / 'tune-net1.json', *args)])
    return code, out.getvalue()


@pytest.fixture(scope='module')
def searched(tiny, tmp_path_factory):
    """A search of two settings of net1 on held-out people, four trials: its
    folder and what it printed."""
    folder = tmp_path_factory.mktemp('searched')
    code, out = search(tiny, folder, *LR, '--param', 'module__hidden_units=50,100', '--groups',
                       tiny / 'people.csv', trials=4)
    assert code == 0, out
    return folder, out


def finished_trials(study_file, name='net1'):
    study = optuna.load_study(study_name=name, storage=kfkd_settings.storage_url(study_file))
    return [t for t in study.get_trials() if t.state.name in kfkd_tune.FINISHED]


class AtFirstBatch(Callback):
    """Calls `act` once, at the end of a net's first batch."""

    def __init__(self, act):
        self.act = act

    def on_batch_end(self, net, **kwargs):
        if self.act:
            self.act, act = None, self.act
            act()


def strike_in_trials(monkeypatch, act, numbers):
    """Calls `act` at the first batch of the trials (counted from 0 in this
    process) whose number is in `numbers`."""
    real, calls = kfkd_tune._trial_net, []

    def trial_net(*args):
        net, X, y = real(*args)
        if len(calls) in numbers:
            net.callbacks_.append(('strike', AtFirstBatch(act)))
        calls.append(args)
        return net, X, y
    monkeypatch.setattr(kfkd_tune, '_trial_net', trial_net)


@pytest.mark.parametrize('text, param', [
    ('module__width=8:32', kfkd_settings.Param('module__width', 8, 32, False, None)),
    ('lr=0.001:0.1:log', kfkd_settings.Param('lr', 0.001, 0.1, True, None)),
    ('batch_size=32,64, 128', kfkd_settings.Param('batch_size', None, None, False, (32, 64, 128))),
    ('test_flip=true,false', kfkd_settings.Param('test_flip', None, None, False, (True, False))),
])
def test_param_grammar(text, param):
    assert kfkd_settings.parse_param(text) == param
    assert kfkd_settings.parse_param(str(param)) == param


@pytest.mark.parametrize('text, message', [
    ('lr', 'write NAME=LOW:HIGH'),
    ('lr=0.1:0.01', 'an empty range: 0.1 is not below 0.01'),
    ('lr=0.01:0.01', 'an empty range'),
    ('lr=0:0.1:log', 'a log range lies above 0'),
    ('lr=0.01:0.1:ln', 'write NAME=LOW:HIGH'),
    ('module__width=16', 'write NAME=LOW:HIGH'),
    ('module__width=16,', 'an empty range: give two or more choices'),
    ('lr=low:high', 'a range is of numbers'),
])
def test_bad_params(text, message):
    with pytest.raises(KfkdError, match=message):
        kfkd_settings.parse_param(text)


@pytest.mark.parametrize('args, message', [
    (['--param', 'module__depth=1:3'], '--param module__depth: net1 has no such setting'),
    (['--param', 'iterator_train__spin=1:3'], 'iterator_train__spin: net1 has no such setting'),
    (['--param', 'lr=0.1:0.01'], 'an empty range: 0.1 is not below 0.01'),
    (['--param', 'lr=0.01:0.1', '--param', 'lr=0.02:0.2'], 'a setting named twice'),
    (['--trials', '0'], '--trials must be at least 1, not 0'),
    (['--param', 'lr=0.01:0.1', '--budget', '1', '--trial-budget', '5'],
     '--budget 1 s is shorter than one trial'),
    ([], '--param: name the settings of net1 to search; without it, kfkd tune searches those'),
])
def test_bad_options_fail_before_any_trial(args, message, demo_dir, tmp_path, capsys):
    code = kfkd_cli.main(['tune', '--net', 'net1', '--data', str(demo_dir), '--study',
                          str(tmp_path / 's.db'), *args])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / 's.db').exists()


def test_an_unreachable_scheduler_fails_before_any_trial(demo_dir, tmp_path, capsys):
    dask = pytest.importorskip('dask')
    pytest.importorskip('distributed')
    with dask.config.set({'distributed.comm.timeouts.connect': '1s'}):
        code = kfkd_cli.main(['tune', '--net', 'net1', '--param', 'lr=0.01:0.1', '--data',
                              str(demo_dir), '--study', str(tmp_path / 's.db'), '--dask',
                              'tcp://127.0.0.1:1'])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert 'cannot reach a Dask scheduler there' in err
    assert not (tmp_path / 's.db').exists()


def test_a_search_here_then_fit_with_what_it_found(searched, tiny, tmp_path, capsys):
    folder, out = searched
    table = pd.read_csv(folder / 'tune-net1.csv')
    assert list(table.columns[:6]) == ['study', 'trial', 'state', 'valid RMSE (px)', 'epochs',
                                       'seconds']
    assert set(table['state']) <= {'COMPLETE', 'PRUNED'} and len(table) == 4
    # the net's own settings first: the yardstick
    assert table.loc[0, 'note'] == 'defaults'
    assert (table.loc[0, 'lr'], table.loc[0, 'module__hidden_units']) == (0.01, 100)
    found = json.loads((folder / 'tune-net1.json').read_text())
    best = table[table['state'] == 'COMPLETE'].sort_values('valid RMSE (px)').iloc[0]
    assert found['net'] == 'net1' and found['trial'] == best['trial']
    assert found['settings'] == {'lr': pytest.approx(best['lr'], rel=1e-5),  # the CSV's 6 digits
                                 'module__hidden_units': int(best['module__hidden_units'])}
    assert f'kfkd fit --settings {folder / "tune-net1.json"}' in out
    assert re.search(r'net1 trial 1: (pruned at epoch \d+ \()?[\d.]+ px\)?; \d+ epochs, \d+ s; '
                     r'lr=[\d.e-]+, module__hidden_units=(50|100)', out), out

    succeeds('fit', '--settings', folder / 'tune-net1.json', '--data', tiny, '--max-epochs', '1',
             '--device', 'cpu', '--out', tmp_path / 'tuned.safetensors')
    net = kfkd_engine.load_net(tmp_path / 'tuned.safetensors')
    assert net.lr == pytest.approx(found['settings']['lr'])
    assert net.module__hidden_units == found['settings']['module__hidden_units']
    assert 'net1 with the settings of' in capsys.readouterr().out


def test_plot_tune_draws_optunas_pictures_of_a_study(searched, tmp_path, capsys):
    folder, _ = searched
    succeeds('plot', 'tune', folder / 'tune-net1.db', '--out', tmp_path / 'tune.png')
    assert (tmp_path / 'tune.png').stat().st_size > 10_000
    assert kfkd_cli.main(['plot', 'tune', str(folder / 'tune-net1.csv')]) == 1
    assert 'a table of trials; name the study file beside it' in capsys.readouterr().err


def test_resume_will_not_change_the_search(searched, tmp_path, monkeypatch, capsys):
    folder, _ = searched
    study = ['--study', str(folder / 'tune-net1.db')]
    for args, message in [([*study, '--seed', '4'], '--seed cannot change a resumed search'),
                          ([*study, '--param', 'lr=0.01:0.1'], '--param cannot change a resumed'),
                          ([], 'tune-net9.db: no such study file to resume; name yours')]:
        monkeypatch.chdir(tmp_path)
        assert kfkd_cli.main(['tune', '--resume', *args]) == 1
        assert message in capsys.readouterr().err


def test_a_new_search_will_not_overwrite_a_study(searched, tiny):
    folder, _ = searched
    code, _ = search(tiny, folder, *LR)
    assert code == 1
    assert len(finished_trials(folder / 'tune-net1.db')) == 4


def test_pruned_trials_stop_early_and_keep_their_last_rmse(tiny, tmp_path):
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0))  # prunes all
    job = kfkd_tune.Job('net1', [kfkd_settings.parse_param('lr=0.001:0.1:log')], str(tiny), None,
                        30.0, 'cpu', 42, None, None)
    kfkd_tune.run_trials(study, None, job)
    [trial] = study.trials
    assert trial.state.name == 'PRUNED' and trial.user_attrs['epochs'] == 1
    assert trial.value == trial.intermediate_values[0] > 0
    assert 'pruned at epoch 1' in kfkd_tune._line(study, 0)


def test_ctrl_c_a_process_that_died_and_resume(tiny, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the second trial fails it and keeps the first; a trial whose
    process died (its heartbeat stopped long ago) is failed by the next run,
    which tries its settings once more; --resume goes on to --trials."""
    strike_in_trials(monkeypatch, lambda: signal.raise_signal(signal.SIGINT), numbers=[1])
    code, out = search(tiny, tmp_path, *LR)
    assert code == 130 and 'go on with the same command and --resume' in out
    table = pd.read_csv(tmp_path / 'tune-net1.csv')
    assert list(table['state']) == ['COMPLETE', 'FAIL'] and table.loc[1, 'note'] == 'interrupted'

    storage = optuna.storages.RDBStorage(kfkd_settings.storage_url(tmp_path / 'tune-net1.db'))
    study = optuna.load_study(study_name='net1', storage=storage)
    study.enqueue_trial({'lr': 0.003})
    died = study.ask()
    lr = died.suggest_float('lr', 0.001, 0.02, log=True)
    storage.record_heartbeat(died._trial_id)
    with contextlib.closing(sqlite3.connect(tmp_path / 'tune-net1.db')) as db, db:
        db.execute("UPDATE trial_heartbeats SET heartbeat = '2000-01-01 00:00:00'")

    code, out = search(tiny, tmp_path, '--resume')
    assert code == 0, out
    assert 'net1 trial 2: its process ended; failed, its settings queued again' in out
    table = pd.read_csv(tmp_path / 'tune-net1.csv')
    assert list(table['state'][:3]) == ['COMPLETE', 'FAIL', 'FAIL']
    assert table.loc[2, 'note'] == 'its process ended'
    assert table.loc[3, 'note'] == 'retry of trial 2' and table.loc[3, 'lr'] == pytest.approx(lr)
    assert len(finished_trials(tmp_path / 'tune-net1.db')) == 2


def test_on_dask_trials_run_side_by_side(tiny, tmp_path):
    pytest.importorskip('distributed')
    from dask.distributed import LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False) as cluster:
        code, out = search(tiny, tmp_path, *LR, '--dask', cluster.scheduler_address, trials=3)
    assert code == 0, out
    assert f'on the Dask cluster at {cluster.scheduler_address} (2 at once)' in out
    table = pd.read_csv(tmp_path / 'tune-net1.csv')
    assert list(table['state'].isin(kfkd_tune.FINISHED)) == [True] * 3


def test_on_dask_a_trial_whose_worker_died_is_failed_and_retried_once(capsys):
    """As the search sees a worker die: gone from the scheduler's workers."""
    study = optuna.create_study(study_name='net1')
    client = types.SimpleNamespace(
        scheduler_info=lambda n_workers: {'workers': {'tcp://alive': {}}})
    trials = [study.ask() for _ in range(3)]
    for trial, worker in zip(trials, ('tcp://gone', 'tcp://alive', None)):
        trial.suggest_float('lr', 0.001, 0.1, log=True)
        if worker:
            trial.set_user_attr('worker', worker)
    kfkd_tune._fail_lost_trials([study], client)
    assert [t.state.name for t in study.trials] == ['FAIL', 'RUNNING', 'RUNNING', 'WAITING']
    assert 'net1 trial 0: its worker died; failed, its settings queued again' in \
        capsys.readouterr().out
    retry = study.ask()
    retry.set_user_attr('worker', 'tcp://gone')
    kfkd_tune._fail_lost_trials([study], client)  # lost again: not retried twice
    assert [t.state.name for t in study.trials] == ['FAIL', 'RUNNING', 'RUNNING', 'FAIL']
    table = kfkd_settings.trials_table([study])
    assert list(table['note']) == ['its worker died', '', '', 'retry of trial 0; its worker died']
    assert table.loc[3, 'lr'] == table.loc[0, 'lr']


def test_specialists_searched_one_study_each_then_fit_with_their_settings(tiny, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kfkd, 'net7', clone(kfkd.net7).set_params(
        module__conv_filters=(4, 8, 8), module__hidden_units=(32, 32)))  # seconds, not minutes
    succeeds('tune', '--specialists', '--data', tiny, '--param', 'module__dropout3_p=0:0.6',
             '--trials', '1', '--trial-budget', '0.3', '--device', 'cpu')
    found = json.loads(Path('tune-specialists.json').read_text())['specialists']
    assert [tuple(entry['columns']) for entry in found] == \
        [s['columns'] for s in kfkd.SPECIALIST_SETTINGS]
    nose = found[1]  # the tutorial's own dropout for the nose stays where not searched
    assert nose['kwargs'] == {'module__dropout2_p': 0.3, 'module__dropout3_p': 0.4}
    fitted = []
    monkeypatch.setattr(kfkd_cli, 'fit_specialists', lambda *args: fitted.append(args[-1]))
    succeeds('fit_specialists', '--settings', 'tune-specialists.json', '--data', tiny)
    assert [setting['kwargs'] for setting in fitted[0]] == [entry['kwargs'] for entry in found]


@pytest.mark.parametrize('content, specialists, message', [
    ('{"net": "net1", "settings": {}}', True, 'settings for a net, not specialists'),
    ('{"specialists": []}', False, 'settings for specialists; use kfkd fit_specialists'),
    ('{"specialists": []}', True, 'no settings for the specialist of left_eye_center_x'),
    ('lr=0.01', False, 'not a settings file from kfkd tune (not JSON)'),
])
def test_bad_settings_files(content, specialists, message, tmp_path):
    path = tmp_path / 'settings.json'
    path.write_text(content)
    with pytest.raises(KfkdError, match=re.escape(message)):
        kfkd_settings.read_settings(path, specialists)


def test_without_optuna_it_says_what_to_install(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'optuna', None)
    with pytest.raises(KfkdError, match=r"kfkd tune needs Optuna: pip install 'kfkd\[tune\]'"):
        kfkd_tune.tune(name='net1', data_dir=demo_dir, study=tmp_path / 's.db')


def test_settings_that_fail_are_noted_and_five_in_a_row_stop_the_search(tiny, tmp_path):
    code, out = search(tiny, tmp_path, '--param', 'lr=1e6:1e7:log', '--trial-budget', 5)
    assert code == 0, out
    assert 'Stopping: 5 trials in a row failed (their notes are in the table)' in out
    table = pd.read_csv(tmp_path / 'tune-net1.csv')
    assert list(table['state']) == ['FAIL'] * 5
    assert table['note'].str.contains('loss became').all()
    assert not (tmp_path / 'tune-net1.json').exists()  # nothing to recommend
