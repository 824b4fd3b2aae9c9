"""kfkd tune: the search the tutorial leaves to its reader.

The tutorial ends by asking for each specialist's settings to be tuned (more
dropout where one overfits, less where it does not). `kfkd tune` searches the
settings of a net, or of each specialist, scored on validation faces
(held-out people with --groups). Optuna proposes settings (TPE) and stops poor
trials early from their epoch-by-epoch validation RMSE (Hyperband). A study
lives in a SQLite file (or any database Optuna takes), so that a search
resumes and several processes can share it; `optuna-dashboard sqlite:///FILE`
shows it in a browser. Trials run here one after another, or side by side on
a Dask cluster, where Optuna's DaskStorage keeps the study on the scheduler.

  Param, parse_param     a setting to search: NAME=LOW:HIGH[:log] or NAME=A,B,C
  NET_SPACE, SPECIALIST_SPACE
                         what is searched when no --param names settings
  tune                   the search; writes the trials' table and the best settings
  run_trial              one trial: a net trained for its time budget
  trials_table           the trials of the studies in a study file, as a table
  read_settings          a settings file, as `kfkd fit --settings` and
                         `kfkd fit_specialists --settings` take it
  plot_tune              RMSE against trial, and against each setting
"""
import collections
import contextlib
import functools
import io
import json
import math
import os
import signal
import socket
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from skorch.callbacks import Callback

import kfkd_io
from kfkd import SPECIALIST_SETTINGS, blank_figure, load2d, net7, specialist
from kfkd_beyond import training_data
from kfkd_engine import (GroupSplit, build_net, current_setting, dask_client, load_net,
                         registered_net, resolve_device, rmse_pixels, unknown_settings)
from kfkd_io import KfkdError, data_path

# The defaults of `kfkd tune` where no --param names what to search. kfkd's
# own nets: the learning rate, weight decay, width and augmentation.
NET_SPACE = ('lr=0.001:0.01:log', 'optimizer__weight_decay=0.00001:0.001:log',
             'module__width=12,16,24', 'iterator_train__rotate=0:25',
             'iterator_train__scale=0:0.2', 'iterator_train__shift=0:12')
# The specialists (net7): the tutorial's dropout per specialist and its
# learning rate, where the schedule starts.
SPECIALIST_SPACE = ('module__dropout2_p=0:0.5', 'module__dropout3_p=0:0.6',
                    'module__dropout4_p=0:0.7', 'callbacks__AdjustVariable_1__start=0.01:0.1:log')

FINISHED = ('COMPLETE', 'PRUNED')
# Optuna's DaskStorage is what its authors made for this; it says it is new each time
warnings.filterwarnings('ignore', message='DaskStorage is experimental')


class Param(collections.namedtuple('Param', 'name low high log choices')):
    """A setting to search: a range from `low` to `high` (whole numbers when
    both are, on a log scale with `log`), or one of `choices`."""

    def suggest(self, trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def contains(self, value):
        if self.choices is not None:
            return value in self.choices
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def __str__(self):
        if self.choices is not None:
            return f'{self.name}={",".join(map(str, self.choices))}'
        return f'{self.name}={self.low}:{self.high}' + (':log' if self.log else '')


def _value(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {'true': True, 'false': False, 'none': None}.get(text.lower(), text)


def parse_param(text):
    """A Param from --param's NAME=LOW:HIGH, NAME=LOW:HIGH:log or NAME=A,B,C."""
    name, sep, spec = text.partition('=')
    usage = 'write NAME=LOW:HIGH, NAME=LOW:HIGH:log or NAME=A,B,C'
    if not (sep and name and spec):
        raise KfkdError(f'--param {text!r}: {usage}')
    if ',' in spec:
        choices = tuple(dict.fromkeys(_value(v.strip()) for v in spec.split(',') if v.strip()))
        if len(choices) < 2:
            raise KfkdError(f'--param {text}: an empty range: give two or more choices')
        return Param(name, None, None, False, choices)
    parts = spec.split(':')
    if len(parts) not in (2, 3) or parts[2:] not in ([], ['log']):
        raise KfkdError(f'--param {text!r}: {usage}')
    low, high = (_value(part) for part in parts[:2])
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise KfkdError(f'--param {text}: a range is of numbers; {usage}')
    if not low < high:
        raise KfkdError(f'--param {text}: an empty range: {low} is not below {high}')
    if parts[2:] and low <= 0:
        raise KfkdError(f'--param {text}: a log range lies above 0')
    return Param(name, low, high, bool(parts[2:]), None)


# --- One trial ---

class ReportToTrial(Callback):
    """Reports each epoch's validation RMSE (px) to an Optuna trial, and ends
    training when the study's pruner says the trial will not do better."""

    def __init__(self, trial):
        self.trial = trial
        self.pruned_ = False

    def on_epoch_end(self, net, **kwargs):
        self.trial.report(rmse_pixels(net.history[-1, 'valid_loss']), len(net.history))
        if self.trial.should_prune():
            self.pruned_ = True
            raise KeyboardInterrupt  # skorch's way to end fit() early

    def on_batch_end(self, net, **kwargs):
        if _STOP.is_set():
            raise KeyboardInterrupt


# Set by tune()'s Ctrl-C handler when trials run in this process. The handler
# only sets it: a KeyboardInterrupt raised wherever the signal lands could
# break off a write to the study. Training stops at its next batch (skorch
# ends fit() quietly on KeyboardInterrupt), and the trial asks afterwards.
_STOP = threading.Event()

Job = collections.namedtuple('Job', 'name space data_dir groups trial_budget device seed '
                                    'precision pretrain')


def _owner():
    """Who runs a trial: a Dask worker's address, or this process."""
    try:
        from distributed import get_worker
        return get_worker().address
    except (ImportError, ValueError):
        return f'pid:{socket.gethostname()}:{os.getpid()}'


def _trial_net(target, settings, job):
    """The net a trial trains, and the faces it trains on: `job.name` with
    `settings`, or the specialist SPECIALIST_SETTINGS[target] with them."""
    device = resolve_device(job.device)
    extra = {'time_budget': job.trial_budget, 'verbose': 0,
             **({'precision': job.precision} if job.precision else {})}
    if target is None:
        net = build_net(job.name, {**settings, **extra}, device).initialize()
        X, y = training_data(net, job.data_dir, job.groups)
        return net, X, y
    setting = SPECIALIST_SETTINGS[target]
    X, y, *row_groups = load2d(cols=setting['columns'], data_dir=job.data_dir,
                               groups=job.groups)
    pretrain = load_net(job.pretrain, 'cpu').module_.state_dict() if job.pretrain else None
    kwargs = {**setting.get('kwargs', {}), **settings, **extra}
    net = specialist(dict(setting, kwargs=kwargs), len(y), pretrain, device=device)
    if job.groups is not None:
        net.set_params(train_split=GroupSplit(row_groups[0]))
    return net, X, y


def run_trial(study, target, job):
    """One trial of `study`, here or on a Dask worker: settings from the
    study's sampler, a net trained with them for job.trial_budget seconds, its
    validation RMSE reported every epoch and the best told to the study (or
    the trial pruned, or failed with a note). `target` is None for job.name,
    or the index of a specialist. Returns the trial's number."""
    import optuna
    import torch
    if _STOP.is_set():
        raise KeyboardInterrupt
    trial = study.ask()
    started = time.monotonic()
    try:
        trial.set_user_attr('owner', _owner())
        settings = {param.name: param.suggest(trial) for param in job.space}
        torch.manual_seed(job.seed + (target or 0))  # every trial alike: they differ by settings
        with contextlib.redirect_stdout(io.StringIO()):
            net, X, y = _trial_net(target, settings, job)
            report = ReportToTrial(trial)
            net.callbacks_.append(('report_to_trial', report))
            net.partial_fit(X, y)
    except KeyboardInterrupt:
        _fail(study, trial, 'interrupted')
        raise
    except Exception as e:  # settings that do not work: the search goes on
        _fail(study, trial, f'{type(e).__name__}: {e}')
        return trial.number
    trial.set_user_attr('epochs', len(net.history))
    trial.set_user_attr('seconds', round(time.monotonic() - started, 1))
    if _STOP.is_set():
        _fail(study, trial, 'interrupted')
        raise KeyboardInterrupt
    valid = [row['valid_loss'] for row in net.history]
    if net.diverged_:
        _fail(study, trial, net.diverged_)
    elif report.pruned_:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, rmse_pixels(np.nanmin(valid)))
    return trial.number


def _fail(study, trial, note):
    import optuna
    trial.set_user_attr('note', note)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)


# --- The search ---

def storage_url(study):
    """A study file as Optuna's database URL (absolute, so that a scheduler
    elsewhere opens the same path), or a database URL as it is."""
    text = str(study)
    return text if '://' in text else f'sqlite:///{Path(text).resolve()}'


def _study(storage, name, seed, startup_trials, create=False):
    """The study `name` in `storage` (created, or loaded), with kfkd's
    sampler, seeded with `seed`, and pruner. Each trial gets a study object
    of its own, seeded apart, so that trials on several workers at once do
    not all draw the same settings."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    options = dict(study_name=name, storage=storage,
                   sampler=optuna.samplers.TPESampler(n_startup_trials=startup_trials, seed=seed,
                                                      multivariate=True, constant_liar=True),
                   pruner=optuna.pruners.HyperbandPruner(min_resource=2, reduction_factor=3))
    try:
        return optuna.create_study(**options) if create else optuna.load_study(**options)
    except KeyError:
        raise KfkdError(f'no study {name!r} to resume in {storage}') from None
    except optuna.exceptions.DuplicatedStudyError:
        raise KfkdError(f'{storage} already holds a study {name!r}: --resume goes on '
                        f'with it, or choose another --study') from None


def _in_this_process(trial):
    return trial.user_attrs.get('owner', '').startswith('pid:')


def _orphaned(trial, workers):
    """Whether a running trial's worker or process is gone."""
    owner = trial.user_attrs.get('owner')
    if owner is None:  # asked a moment ago
        return False
    if _in_this_process(trial):
        host, pid = owner[len('pid:'):].rsplit(':', 1)
        if host != socket.gethostname():
            return False
        try:
            os.kill(int(pid), 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return owner not in workers


def fail_orphans(study, workers):
    """Fail the running trials whose worker (a Dask worker not among
    `workers`) or process has gone, and queue each one's settings once more."""
    import optuna
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not _orphaned(frozen, workers):
            continue
        note = 'its process ended' if _in_this_process(frozen) else 'its worker died'
        _fail(study, optuna.trial.Trial(study, frozen._trial_id), note)
        if 'retry_of' not in frozen.user_attrs:
            study.enqueue_trial(frozen.params, user_attrs={
                'retry_of': frozen.number, 'defaults': frozen.user_attrs.get('defaults', False)})
        print(f'{study.study_name} trial {frozen.number}: {note}; failed' +
              ('' if 'retry_of' in frozen.user_attrs else ', its settings queued again'))


def _fail_own_trials(studies, note):
    """Fail the running trials of this process: Ctrl-C came between asking
    for one and training it."""
    import optuna
    for study in studies:
        for frozen in study.get_trials(deepcopy=False,
                                       states=(optuna.trial.TrialState.RUNNING,)):
            if frozen.user_attrs.get('owner') == _owner():
                _fail(study, optuna.trial.Trial(study, frozen._trial_id), note)


class _Here:
    """Trials one after another in this process, as a Dask client would run them."""
    slots, workers = 1, frozenset()

    def submit(self, fn, *args):
        from concurrent.futures import Future
        future = Future()
        future.set_result(fn(*args))
        return future

    def wait(self, futures, timeout):
        return set(futures)


class _OnDask:
    """Trials as tasks on a Dask cluster, as many at once as it has threads."""

    def __init__(self, client):
        self.client = client

    @property
    def slots(self):
        return max(1, sum(self.client.nthreads().values()))

    @property
    def workers(self):
        return set(self.client.scheduler_info(n_workers=-1)['workers'])

    def submit(self, fn, *args):
        return self.client.submit(fn, *args, pure=False)

    def wait(self, futures, timeout):
        from distributed import wait
        try:
            return wait(list(futures), timeout=timeout, return_when='FIRST_COMPLETED').done
        except TimeoutError:
            return set()


def _line(study, number):
    trial = study.get_trials(deepcopy=False)[number]
    row = _trial_row(study.study_name, trial)
    settings = ', '.join(f'{k}={_short(v)}' for k, v in trial.params.items())
    result = {'COMPLETE': f'{row["valid RMSE (px)"]:.3f} px',
              'PRUNED': f'pruned at epoch {row["epochs"]} ({row["valid RMSE (px)"]:.3f} px)',
              'FAIL': f'failed: {row["note"]}'}.get(row['state'], row['state'])
    return f'{study.study_name} trial {number}: {result}; {row["epochs"]} epochs, ' \
           f'{row["seconds"]:.0f} s; {settings}'


def _short(value):
    return f'{value:.3g}' if isinstance(value, float) else str(value)


def _search(studies, targets, job, pool, trials, deadline, open_study, most_failures=5):
    """Keep the pool busy with trials until each study has `trials` finished
    ones or the time runs out; say how each went. Stops after `most_failures`
    failed trials in a row: then something is wrong beyond the settings."""
    import optuna
    finished = lambda study: len(study.get_trials(
        deepcopy=False, states=tuple(optuna.trial.TrialState[s] for s in FINISHED)))
    running, failures = {}, 0
    while True:
        workers = pool.workers
        for study in studies:
            fail_orphans(study, workers)
        in_flight = collections.Counter(running.values())
        started = [finished(study) + in_flight[i] for i, study in enumerate(studies)]
        time_left = deadline - time.monotonic()
        if not running and (min(started) >= trials or time_left < job.trial_budget):
            return
        while min(started) < trials and len(running) < pool.slots and \
                time_left >= job.trial_budget:
            i = started.index(min(started))  # the study furthest behind
            seed = job.seed + 1000 * i + len(studies[i].get_trials(deepcopy=False)) + in_flight[i]
            running[pool.submit(run_trial, open_study(studies[i].study_name, seed), targets[i],
                                job)] = i
            in_flight[i] += 1
            started[i] += 1
        for future in pool.wait(running, timeout=2):
            i = running.pop(future)
            try:
                number = future.result()
            except Exception as e:
                if type(e).__name__ != 'KilledWorker':
                    raise KfkdError(f'a trial failed on the cluster: {type(e).__name__}: {e} '
                                    f'(is kfkd installed on every worker?)') from e
                print(f'{studies[i].study_name}: a trial killed its workers three times '
                      f'({e}); going on')
                failures += 1
                continue
            print(_line(studies[i], number))
            failed = studies[i].get_trials(deepcopy=False)[number].state.name == 'FAIL'
            failures = failures + 1 if failed else 0
        if failures >= most_failures:
            print(f'Stopping: {failures} trials in a row failed (their notes are in the table)')
            return


def tune(name=None, specialists=False, params=(), data_dir=None, groups=None, study=None,
         out=None, trials=None, budget=None, trial_budget=None, dask=None, device='auto',
         seed=None, resume=False, pretrain=None, precision=None):
    """Search the settings of net `name` (default net9), or of each specialist,
    and write the best as `out` (a settings file) and every trial as a table
    beside the study; what `kfkd tune` runs. Returns the table.

    `params` are --param strings (default NET_SPACE, or SPECIALIST_SPACE);
    `trials` finished trials per study (default 20, unless `budget`), each
    trained for `trial_budget` seconds (default 60); `budget` seconds in all.
    `study` is the study file (default tune-NAME.db; a database URL works
    too). With `resume`, the search goes on with what its study holds: its
    net, settings searched, seed, trial budget, data and groups. `dask` runs the trials on a
    Dask cluster (a scheduler's address, or 'local').
    """
    try:
        import optuna
    except ImportError:
        raise KfkdError("kfkd tune needs Optuna: pip install 'kfkd[tune]'") from None
    if specialists and name not in (None, 'net7'):
        raise KfkdError('--specialists searches the specialists of net7; leave out --net')
    label = 'specialists' if specialists else name or 'net9'
    groups_file = Path(groups) if groups and Path(groups).exists() else None
    given = dict(net='net7' if specialists else name, specialists=specialists,
                 param=list(params or ()) or None, seed=seed, trial_budget=trial_budget,
                 data=str(data_path(data_dir).resolve()) if data_dir else None,
                 groups=str(groups_file.resolve()) if groups_file else groups)
    if trials is not None and trials < 1:
        raise KfkdError(f'--trials must be at least 1, not {trials}')
    if pretrain and not Path(pretrain).exists():
        raise KfkdError(f'{pretrain}: no such model file to pre-train the specialists from')
    named, study = study, study or f'tune-{label}.db'
    if resume and '://' not in str(study) and not Path(study).is_file():
        raise KfkdError(f'{study}: no such study file to resume' +
                        ('' if named else '; name yours with --study'))
    if not resume:
        setup = dict(given, net=given['net'] or 'net9',
                     param=given['param'] or list(SPECIALIST_SPACE if specialists else NET_SPACE),
                     seed=42 if seed is None else seed,
                     trial_budget=60.0 if trial_budget is None else float(trial_budget),
                     data=str(data_path(data_dir).resolve()))
        space = _checked(setup, budget)
        kfkd_io.read(data_dir=setup['data'])  # parse (and cache) the CSV once; fail early
    started = time.monotonic()
    with dask_client(dask) if dask else contextlib.nullcontext() as client:
        storage = storage_url(study)
        if client:
            from optuna_integration import DaskStorage
            storage = DaskStorage(storage, client=client)
        if resume:
            setup = _stored_setup(storage, study, given)
            space = _checked(setup, budget)
            kfkd_io.read(data_dir=setup['data'])
        trials = trials or (20 if budget is None else 10 ** 6)
        targets = list(range(len(SPECIALIST_SETTINGS))) if setup['specialists'] else [None]
        names = [f'specialist-{SPECIALIST_SETTINGS[t]["columns"][0]}' for t in targets] \
            if setup['specialists'] else [setup['net']]
        open_study = functools.partial(_study, storage,
                                       startup_trials=max(4, min(10, trials // 3)))
        studies = [open_study(name, setup['seed'], create=not resume) for name in names]
        if not resume:
            _remember_setup(studies, targets, setup, space)
        job = Job(setup['net'], space, setup['data'], setup['groups'], setup['trial_budget'],
                  device, setup['seed'], precision,
                  str(Path(pretrain).resolve()) if pretrain else None)
        pool = _OnDask(client) if client else _Here()
        print(f'Searching {len(space)} settings of {label} ({len(studies)} '
              f'{"studies" if len(studies) > 1 else "study"} in {study}): ' +
              ', '.join(map(str, space)) + f'; trials of {setup["trial_budget"]:g} s, ' +
              (f'on the Dask cluster at {client.scheduler.address} ({pool.slots} at once)'
               if client else 'one after another here'))
        deadline = started + (budget if budget is not None else math.inf)
        try:
            with _ctrl_c_stops_trials(not client):
                _search(studies, targets, job, pool, trials, deadline, open_study)
        except KeyboardInterrupt:
            if not client:
                _fail_own_trials(studies, 'interrupted')
            print(f'Interrupted: the finished trials are kept in {study}; go on with '
                  f'the same command and --resume')
            raise
        finally:
            table = _table(studies)
            if len(table):
                searched = 'specialists' if setup['specialists'] else setup['net']
                _write_results(table, studies, setup, Path(out or f'tune-{searched}.json'),
                               str(study))
    print(f'{len(table)} trials in {study}, {time.monotonic() - started:.0f} s this run')
    return table


def _checked(setup, budget):
    """The Params of a search's setup, each checked against its net."""
    space = [parse_param(text) for text in setup['param']]
    base = net7 if setup['specialists'] else registered_net(setup['net'])
    unknown = unknown_settings(base, [param.name for param in space])
    if unknown and setup['param'] == list(NET_SPACE):
        raise KfkdError(f'--param: name the settings of {setup["net"]} to search; without '
                        f'it, kfkd tune searches those of net8-net10')
    if unknown:
        raise KfkdError(f'--param {unknown[0]}: {setup["net"]} has no such setting (name it '
                        f'as set_params does: lr, module__width, iterator_train__rotate, ...)')
    if len({param.name for param in space}) < len(space):
        raise KfkdError('--param: a setting named twice')
    if not setup['trial_budget'] > 0:
        raise KfkdError(f'--trial-budget must be positive, not {setup["trial_budget"]:g}')
    if budget is not None and budget < setup['trial_budget']:
        raise KfkdError(f'--budget {budget:g} s is shorter than one trial '
                        f'(--trial-budget {setup["trial_budget"]:g})')
    return space


@contextlib.contextmanager
def _ctrl_c_stops_trials(here):
    """While trials run in this process, Ctrl-C stops the one training at its next
    batch (a second Ctrl-C: at once)."""
    if not here:
        yield
        return

    def stop(signum, frame):
        if _STOP.is_set():  # a second Ctrl-C: at once
            raise KeyboardInterrupt
        _STOP.set()
    _STOP.clear()
    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _remember_setup(studies, targets, setup, space):
    """Keep the setup in each study, and queue the net's own settings as its
    first trial, where the space holds them: the yardstick."""
    for study, target in zip(studies, targets):
        for key, value in setup.items():
            study.set_user_attr(key, value)
        net = net7 if setup['specialists'] else registered_net(setup['net'])
        kwargs = SPECIALIST_SETTINGS[target].get('kwargs', {}) if target is not None else {}
        own = {param.name: kwargs.get(param.name, current_setting(net, param.name))
               for param in space}
        if all(param.contains(own[param.name]) for param in space):
            study.enqueue_trial(own, user_attrs={'defaults': True})


def _stored_setup(storage, study, given):
    """The setup a study file holds, checked against the options given."""
    import optuna
    summaries = optuna.get_all_study_summaries(storage)
    if not summaries:
        raise KfkdError(f'{study}: holds no search to resume')
    setup = summaries[0].user_attrs
    changed = [key for key, value in given.items()
               if value is not None and value is not False and value != setup[key]]
    if changed:
        raise KfkdError(f'--{changed[0].replace("_", "-")} cannot change a resumed search '
                        f'(it searched {setup[changed[0]]})')
    return setup


# --- Results ---

def _trial_row(study_name, trial):
    values = list(trial.intermediate_values.values())
    value = trial.value if trial.value is not None else (values[-1] if values else np.nan)
    return {'study': study_name, 'trial': trial.number, 'state': trial.state.name,
            'valid RMSE (px)': value,
            'epochs': trial.user_attrs.get('epochs', len(values)),
            'seconds': trial.user_attrs.get('seconds', np.nan),
            **trial.params,
            'note': '; '.join(filter(None, (
                'defaults' if trial.user_attrs.get('defaults') else '',
                f'retry of trial {trial.user_attrs["retry_of"]}' if 'retry_of' in trial.user_attrs
                else '', trial.user_attrs.get('note', ''))))}


def _table(studies):
    return pd.DataFrame([_trial_row(study.study_name, trial) for study in studies
                         for trial in study.get_trials(deepcopy=False)])


def trials_table(study):
    """Every trial of the studies in a study file (or database URL)."""
    import optuna
    if '://' not in str(study) and not Path(study).is_file():
        raise KfkdError(f'{study}: no such study file')
    storage = storage_url(study)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    studies = [optuna.load_study(study_name=name, storage=storage)
               for name in optuna.get_all_study_names(storage)]
    table = _table(studies)
    # which settings were searched on a log scale, for plot_tune's axes
    table.attrs['log'] = sorted({name for study in studies for trial in study.trials
                                 for name, distribution in trial.distributions.items()
                                 if getattr(distribution, 'log', False)})
    return table


def _best(table, study_name):
    done = table[(table['study'] == study_name) & (table['state'] == 'COMPLETE')]
    return None if done.empty else done.loc[done['valid RMSE (px)'].idxmin()]


def _write_results(table, studies, setup, out, study):
    specialists = setup['specialists']
    space = [parse_param(text).name for text in setup['param']]
    settings_of = lambda best: {name: _plain(best[name]) for name in space}
    if specialists:
        entries = []
        for one, setting in zip(studies, SPECIALIST_SETTINGS):
            best = _best(table, one.study_name)
            entry = {'columns': list(setting['columns']),
                     'kwargs': {**setting.get('kwargs', {}),
                                **(settings_of(best) if best is not None else {})}}
            if best is not None:
                entry.update(valid_rmse=round(float(best['valid RMSE (px)']), 4),
                             trial=int(best['trial']))
            entries.append(entry)
        found = {'specialists': entries} if any('trial' in e for e in entries) else None
    else:
        best = _best(table, studies[0].study_name)
        found = None if best is None else {
            'net': setup['net'], 'settings': settings_of(best),
            'valid_rmse': round(float(best['valid RMSE (px)']), 4), 'trial': int(best['trial']),
            'trial_budget': setup['trial_budget']}
    trials_file = (Path(study).with_suffix('.csv') if '://' not in study else
                   Path('tune-trials.csv'))
    with kfkd_io.atomic_write(trials_file, 'w') as f:
        table.to_csv(f, index=False, float_format='%.6g')
    print(table.to_string(index=False, float_format=lambda v: f'{v:.4g}', na_rep=''))
    print(f'The trials: {trials_file} (kfkd plot tune {trials_file})')
    if found:
        with kfkd_io.atomic_write(out, 'w') as f:
            json.dump(found, f, indent=1)
        print(f'Best settings: {out} (kfkd {"fit_specialists" if specialists else "fit"} '
              f'--settings {out})')


def _plain(value):
    """A pandas cell as JSON: a whole float that stood for an int, an int."""
    value = value.item() if hasattr(value, 'item') else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


def read_settings(path, specialists=False):
    """The settings that `kfkd tune` found, from its settings file: for a net,
    (net name, {parameter: value}); for specialists, SPECIALIST_SETTINGS with
    each specialist's kwargs replaced by the file's."""
    try:
        found = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise KfkdError(f'{path}: no such settings file') from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KfkdError(f'{path}: not a settings file from kfkd tune (not JSON)') from None
    if specialists:
        if 'specialists' not in found:
            raise KfkdError(f'{path}: settings for a net, not specialists; use kfkd fit '
                            f'--settings')
        kwargs = {tuple(entry['columns']): entry['kwargs'] for entry in found['specialists']}
        missing = [s['columns'][0] for s in SPECIALIST_SETTINGS
                   if tuple(s['columns']) not in kwargs]
        if missing:
            raise KfkdError(f'{path}: no settings for the specialist of {missing[0]}')
        return [dict(s, kwargs=kwargs[tuple(s['columns'])]) for s in SPECIALIST_SETTINGS]
    if 'settings' not in found:
        raise KfkdError(f'{path}: settings for specialists; use kfkd fit_specialists '
                        f'--settings')
    return found['net'], found['settings']


def plot_tune(table):
    """Validation RMSE against trial (pruned trials at their last epoch, the
    best so far as a line), and against each setting searched: on a log axis
    where the study searched it on a log scale (table.attrs['log'], which
    trials_table sets; a table read from CSV has linear axes)."""
    log_scale = table.attrs.get('log', ())
    table = table[table['state'].isin(FINISHED)]
    if table.empty:
        raise KfkdError('no finished trials to draw')
    settings = [c for c in table.columns if c not in
                ('study', 'trial', 'state', 'valid RMSE (px)', 'epochs', 'seconds', 'note')]
    columns = 1 + len(settings)
    fig = blank_figure(figsize=(4 * min(columns, 4), 3.2 * math.ceil(columns / 4)))
    panels = [fig.add_subplot(math.ceil(columns / 4), min(columns, 4), i + 1)
              for i in range(columns)]
    for study_name, rows in table.groupby('study', sort=False):
        colour = f'C{list(table["study"].unique()).index(study_name)}'
        done, pruned = rows[rows['state'] == 'COMPLETE'], rows[rows['state'] == 'PRUNED']
        rmse = 'valid RMSE (px)'
        panels[0].plot(done['trial'], done[rmse], 'o', color=colour, label=study_name)
        panels[0].plot(pruned['trial'], pruned[rmse], 'x', color=colour, alpha=0.6)
        best = done.sort_values('trial')[rmse].cummin()
        panels[0].step(done.sort_values('trial')['trial'], best, where='post', color=colour)
        for ax, name in zip(panels[1:], settings):
            ax.plot(done[name], done[rmse], 'o', color=colour)
            ax.plot(pruned[name], pruned[rmse], 'x', color=colour, alpha=0.6)
    panels[0].set_xlabel('trial (o finished, x pruned; line: best so far)')
    if table['study'].nunique() > 1:
        panels[0].legend(fontsize=7)
    for ax, name in zip(panels[1:], settings):
        if name in log_scale:
            ax.set_xscale('log')
        ax.set_xlabel(name.replace('__', ' '))
    for ax in panels:
        ax.set_ylabel('valid RMSE (px)')
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
