"""kfkd tune: the search's grammar, its trials here and on a real local Dask
cluster, its faults (a killed worker, Ctrl-C, bad options), and the settings
file that fit and fit_specialists take."""
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

import kfkd
import kfkd_cli
import kfkd_engine
import kfkd_tune
from kfkd_io import KfkdError

optuna = pytest.importorskip('optuna')

ROOT = Path(__file__).resolve().parents[1]


def succeeds(*args):
    assert kfkd_cli.main([str(a) for a in args]) == 0


@pytest.fixture()
def people(demo_dir, tmp_path):
    """A groups file for the demo faces: ten faces a person."""
    path = tmp_path / 'people.csv'
    rows = len(pd.read_csv(demo_dir / 'training.csv', usecols=[0]))
    pd.DataFrame({'row': range(rows), 'person': [r // 10 for r in range(rows)]}).to_csv(
        path, index=False)
    return path


def finished_trials(study_file, name='net1'):
    study = optuna.load_study(study_name=name, storage=kfkd_tune.storage_url(study_file))
    return [t for t in study.get_trials() if t.state.name in kfkd_tune.FINISHED]


def training_trials(study_file):
    """(number, owner) of each running trial that has started training, read
    from the study file while a search writes it, read-only (Optuna would
    create the tables if they were not there yet, racing the search)."""
    try:
        with contextlib.closing(sqlite3.connect(f'file:{study_file}?mode=ro', uri=True)) as db:
            return [(number, json.loads(owner)) for number, owner in db.execute(
                "SELECT number, value_json FROM trials JOIN trial_user_attributes USING "
                "(trial_id) WHERE state = 'RUNNING' AND key = 'owner'")]
    except sqlite3.Error:  # not there yet, or its tables not yet
        return []


@pytest.mark.parametrize('text, param', [
    ('module__width=8:32', kfkd_tune.Param('module__width', 8, 32, False, None)),
    ('lr=0.001:0.1:log', kfkd_tune.Param('lr', 0.001, 0.1, True, None)),
    ('batch_size=32,64, 128', kfkd_tune.Param('batch_size', None, None, False, (32, 64, 128))),
    ('test_flip=true,false', kfkd_tune.Param('test_flip', None, None, False, (True, False))),
])
def test_param_grammar(text, param):
    assert kfkd_tune.parse_param(text) == param
    assert kfkd_tune.parse_param(str(param)) == param


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
        kfkd_tune.parse_param(text)


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


def test_a_search_here_then_fit_with_what_it_found(demo_dir, people, tmp_path, monkeypatch,
                                                   capsys):
    monkeypatch.chdir(tmp_path)
    succeeds('tune', '--net', 'net1', '--data', demo_dir, '--groups', people, '--param',
         'lr=0.001:0.1:log', '--param', 'module__hidden_units=50,100', '--trials', '4',
         '--trial-budget', '1', '--device', 'cpu')
    table = pd.read_csv('tune-net1.csv')
    assert list(table.columns[:6]) == ['study', 'trial', 'state', 'valid RMSE (px)', 'epochs',
                                       'seconds']
    assert set(table['state']) <= {'COMPLETE', 'PRUNED'} and len(table) == 4
    # the net's own settings first: the yardstick
    assert table.loc[0, 'note'] == 'defaults'
    assert (table.loc[0, 'lr'], table.loc[0, 'module__hidden_units']) == (0.01, 100)
    found = json.loads(Path('tune-net1.json').read_text())
    best = table[table['state'] == 'COMPLETE'].sort_values('valid RMSE (px)').iloc[0]
    assert found['net'] == 'net1' and found['trial'] == best['trial']
    assert found['settings'] == {'lr': pytest.approx(best['lr']),
                                 'module__hidden_units': int(best['module__hidden_units'])}
    assert 'kfkd fit --settings tune-net1.json' in capsys.readouterr().out

    succeeds('fit', '--settings', 'tune-net1.json', '--data', demo_dir, '--max-epochs', '2',
         '--device', 'cpu', '--out', 'tuned.safetensors')
    net = kfkd_engine.load_net('tuned.safetensors')
    assert net.lr == pytest.approx(found['settings']['lr'])
    assert net.module__hidden_units == found['settings']['module__hidden_units']
    assert 'net1 with the settings of tune-net1.json' in capsys.readouterr().out

    assert kfkd_tune.trials_table('tune-net1.db').attrs['log'] == ['lr']  # plot_tune's axes
    for study in ('tune-net1.db', 'tune-net1.csv'):
        succeeds('plot', 'tune', study, '--out', 'tune.png')
        assert Path('tune.png').stat().st_size > 10_000


def test_resume_goes_on_with_what_the_study_holds(demo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    succeeds('tune', '--net', 'net1', '--data', demo_dir, '--param', 'lr=0.001:0.1:log',
         '--trials', '2', '--trial-budget', '1', '--device', 'cpu', '--seed', '3')
    succeeds('tune', '--study', 'tune-net1.db', '--resume', '--trials', '3', '--device', 'cpu')
    assert len(finished_trials('tune-net1.db')) == 3
    assert 'lr=0.001:0.1:log; trials of 1 s' in capsys.readouterr().out
    for args, message in [(['--seed', '4'], '--seed cannot change a resumed search'),
                          (['--param', 'lr=0.01:0.1'], '--param cannot change a resumed'),
                          ([], 'tune-net9.db: no such study file to resume; name yours')]:
        study = [] if not args else ['--study', 'tune-net1.db']
        assert kfkd_cli.main(['tune', '--resume', *study, *args]) == 1
        assert message in capsys.readouterr().err


def test_a_new_search_will_not_overwrite_a_study(demo_dir, tmp_path, capsys):
    args = ['tune', '--net', 'net1', '--data', str(demo_dir), '--param', 'lr=0.001:0.1',
            '--trials', '1', '--trial-budget', '1', '--device', 'cpu', '--study',
            str(tmp_path / 's.db'), '--out', str(tmp_path / 's.json')]
    succeeds(*args)
    assert kfkd_cli.main(args) == 1
    assert "already holds a study 'net1': --resume goes on" in capsys.readouterr().err


def test_ctrl_c_keeps_the_finished_trials_and_resume_goes_on(demo_dir, tmp_path):
    args = [sys.executable, '-m', 'kfkd_cli', 'tune', '--net', 'net1', '--data', str(demo_dir),
            '--param', 'lr=0.001:0.1:log', '--trials', '3', '--trial-budget', '3', '--device',
            'cpu']
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    search = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    while not [number for number, _ in training_trials(tmp_path / 'tune-net1.db') if number]:
        assert search.poll() is None, search.communicate()
        time.sleep(0.2)
    search.send_signal(signal.SIGINT)  # while the second trial trains
    out, err = search.communicate(timeout=60)
    assert search.returncode == 130, err
    assert 'go on with the same command and --resume' in out
    table = pd.read_csv(tmp_path / 'tune-net1.csv')
    assert list(table['state']) == ['COMPLETE', 'FAIL'] and table.loc[1, 'note'] == 'interrupted'
    subprocess.run(args + ['--resume'], cwd=tmp_path, env=env, check=True, capture_output=True)
    assert len(finished_trials(tmp_path / 'tune-net1.db')) == 3


def test_on_dask_a_killed_worker_fails_its_trial_and_the_search_goes_on(demo_dir, tmp_path):
    pytest.importorskip('distributed')
    from dask.distributed import Client, LocalCluster
    study = tmp_path / 's.db'
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster, \
            Client(cluster) as client:
        search = threading.Thread(target=kfkd_tune.tune, kwargs=dict(
            name='net1', params=['lr=0.001:0.1:log'], data_dir=demo_dir, study=study,
            out=tmp_path / 's.json', trials=4, trial_budget=3, dask=cluster.scheduler_address,
            device='cpu'))
        search.start()
        running = []
        while not running:
            time.sleep(0.3)
            running = training_trials(study)
        victim, owner = running[0]
        try:
            client.run(os._exit, 1, workers=[owner])
        except OSError:  # the worker is gone before it can answer
            pass
        search.join(timeout=120)
        assert not search.is_alive()
    table = pd.read_csv(tmp_path / 's.csv')
    assert table.loc[victim, 'state'] == 'FAIL'
    assert table.loc[victim, 'note'].endswith('its worker died')
    retry = table[table['note'].str.contains(f'retry of trial {victim}', na=False)]
    assert len(retry) == 1 and retry.iloc[0]['lr'] == pytest.approx(table.loc[victim, 'lr'])
    assert (table['state'].isin(kfkd_tune.FINISHED)).sum() == 4


def test_specialists_searched_one_study_each_then_fit_with_their_settings(demo_dir, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    succeeds('tune', '--specialists', '--data', demo_dir, '--param', 'module__dropout3_p=0:0.6',
         '--trials', '1', '--trial-budget', '0.5', '--device', 'cpu')
    found = json.loads(Path('tune-specialists.json').read_text())['specialists']
    assert [tuple(entry['columns']) for entry in found] == \
        [s['columns'] for s in kfkd.SPECIALIST_SETTINGS]
    nose = found[1]  # the tutorial's own dropout for the nose stays where not searched
    assert nose['kwargs'] == {'module__dropout2_p': 0.3, 'module__dropout3_p': 0.4}
    succeeds('fit_specialists', '--settings', 'tune-specialists.json', '--data', demo_dir,
         '--max-epochs', '1', '--device', 'cpu')
    specialists = kfkd.load_specialists('specialists.safetensors')
    for entry in found:
        net = specialists[tuple(entry['columns'])]
        assert net.module__dropout3_p == pytest.approx(entry['kwargs']['module__dropout3_p'])


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
        kfkd_tune.read_settings(path, specialists)


def test_without_optuna_it_says_what_to_install(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'optuna', None)
    with pytest.raises(KfkdError, match=r"kfkd tune needs Optuna: pip install 'kfkd\[tune\]'"):
        kfkd_tune.tune('net1', data_dir=demo_dir, study=tmp_path / 's.db')


def test_settings_that_fail_are_noted_and_five_in_a_row_stop_the_search(demo_dir, tmp_path,
                                                                          capsys):
    succeeds('tune', '--net', 'net1', '--data', demo_dir, '--param', 'lr=1e6:1e7:log',
             '--trials', '2', '--trial-budget', '1', '--device', 'cpu', '--study',
             tmp_path / 's.db', '--out', tmp_path / 's.json')
    out = capsys.readouterr().out
    assert 'Stopping: 5 trials in a row failed (their notes are in the table)' in out
    table = pd.read_csv(tmp_path / 's.csv')
    assert list(table['state']) == ['FAIL'] * 5
    assert table['note'].str.contains('loss became').all()
    assert not (tmp_path / 's.json').exists()  # nothing to recommend
