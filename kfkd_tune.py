"""kfkd tune: the search the tutorial leaves to its reader.

The tutorial ends by asking for each specialist's settings to be tuned (more
dropout where one overfits, less where it does not). `kfkd tune` searches the
settings of a net, or of each specialist, scored on validation faces
(held-out people with --groups), on Optuna's parts: TPE proposes settings,
Hyperband prunes poor trials from their epoch-by-epoch validation RMSE
(optuna-integration's SkorchPruningCallback), and a study lives in a SQLite
file (or any database Optuna takes), so that a search resumes and several
processes can share it (`optuna-dashboard sqlite:///FILE` shows it). Trials
run here one after another, with Optuna's heartbeats, or side by side on a
Dask cluster, where Optuna's DaskStorage keeps the study on the scheduler; a
trial whose process or worker died is failed, and its settings tried again.

  Param, parse_param     a setting to search: NAME=LOW:HIGH[:log] or NAME=A,B,C
  NET_SPACE, SPECIALIST_SPACE
                         what is searched when no --param names settings
  tune                   the search; writes the trials' table and the best settings
  run_trial              one trial: a net trained for its time budget
  read_settings          a settings file, as `kfkd fit --settings` and
                         `kfkd fit_specialists --settings` take it
  plot_tune              Optuna's pictures of a search: RMSE against trial and setting
"""
import collections
import contextlib
import functools
import io
import json
import math
import signal
import threading
import time
import warnings
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pandas as pd
from skorch.callbacks import Callback

import kfkd_io
from kfkd import SPECIALIST_SETTINGS, blank_figure, net7, specialist_and_data
from kfkd_beyond import training_data
from kfkd_engine import (build_net, current_setting, dask_client, load_net, registered_net,
                         resolve_device, rmse_pixels, unknown_settings)
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
# A trial here beats every HEARTBEAT s; one silent for LOST_AFTER s (its
# process died) is failed as the study's next trial starts.
HEARTBEAT, LOST_AFTER = 10, 60
RMSE = 'valid RMSE (px)'
# Optuna calls the parts kfkd uses experimental, and says so at each use
warnings.filterwarnings('ignore', message=r'\S*(DaskStorage|RetryHeartbeatStaleTrialCallback\S*|'
                        r'plot_optimization_history|plot_slice) is experimental|'
                        r'Argument ``heartbeat_interval`` is an experimental')


class Param(collections.namedtuple('Param', 'name low high log choices')):
    """A setting to search: a range from `low` to `high` (whole numbers when
    both are, on a log scale with `log`), or one of `choices`."""

    def suggest(self, trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        whole = isinstance(self.low, int) and isinstance(self.high, int)
        suggest = trial.suggest_int if whole else trial.suggest_float
        return suggest(self.name, self.low, self.high, log=self.log)

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
        with contextlib.suppress(ValueError):
            return kind(text)
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

# Set by stop_trials_on_ctrl_c's handler, which does no more: a
# KeyboardInterrupt raised wherever the signal lands could break off a write
# to the study. Training stops at its next batch, and the trial then fails.
_STOP = threading.Event()


@contextlib.contextmanager
def stop_trials_on_ctrl_c():
    """While trials run in this process, Ctrl-C stops the one training at its
    next batch (a second Ctrl-C: at once)."""
    def stop(signum, frame):
        if _STOP.is_set():
            raise KeyboardInterrupt
        _STOP.set()
    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _STOP.clear()


class StopOnCtrlC(Callback):
    """Ends training (skorch's way: KeyboardInterrupt) at the batch after a
    Ctrl-C that stop_trials_on_ctrl_c caught."""

    def on_batch_end(self, net, **kwargs):
        if _STOP.is_set():
            raise KeyboardInterrupt


class ValidRMSE(Callback):
    """Each epoch's validation RMSE in pixels, as `valid_rmse` in the history:
    what the pruner is told, and what a trial scores."""

    def on_epoch_end(self, net, **kwargs):
        net.history.record('valid_rmse', rmse_pixels(net.history[-1, 'valid_loss']))


Job = collections.namedtuple('Job', 'name space data_dir groups trial_budget device seed '
                                    'precision pretrain')


def _trial_net(target, settings, job):
    """The net a trial trains, and its faces: (net, X, y) of `job.name` with
    `settings`, or of the specialist SPECIALIST_SETTINGS[target] with them."""
    device, extra = resolve_device(job.device), {'time_budget': job.trial_budget, 'verbose': 0}
    extra.update({'precision': job.precision} if job.precision else {})
    if target is None:
        net = build_net(job.name, {**settings, **extra}, device).initialize()
        return (net, *training_data(net, job.data_dir, job.groups))
    setting = SPECIALIST_SETTINGS[target]
    pretrain = load_net(job.pretrain, 'cpu').module_.state_dict() if job.pretrain else None
    kwargs = {**setting.get('kwargs', {}), **settings, **extra}
    return specialist_and_data(dict(setting, kwargs=kwargs), pretrain, job.data_dir, job.groups,
                               device=device)


def _objective(trial, target, job):
    """Optuna's objective: the best validation RMSE (px) of a net trained with
    the settings the sampler proposes. A failure leaves a note of why."""
    import optuna
    import torch
    from optuna_integration import SkorchPruningCallback
    with contextlib.suppress(ImportError, ValueError):  # on a Dask worker: which one
        from distributed import get_worker
        trial.set_user_attr('worker', get_worker().address)
    settings = {param.name: param.suggest(trial) for param in job.space}
    torch.manual_seed(job.seed + (target or 0))  # every trial alike: they differ by settings
    net = None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            net, X, y = _trial_net(target, settings, job)
            net.callbacks_ += [('valid_rmse', ValidRMSE()), ('stop_on_ctrl_c', StopOnCtrlC()),
                               ('prune', SkorchPruningCallback(trial, 'valid_rmse'))]
            net.partial_fit(X, y)
        if _STOP.is_set():
            raise KeyboardInterrupt
    except optuna.TrialPruned:
        raise
    except KeyboardInterrupt:
        trial.set_user_attr('note', 'interrupted')
        raise
    except Exception as e:  # settings that do not work: the search goes on
        trial.set_user_attr('note', f'{type(e).__name__}: {e}')
        raise
    finally:
        trial.set_user_attr('epochs', 0 if net is None else len(net.history))
    if net.diverged_:
        trial.set_user_attr('note', net.diverged_)
        return math.nan  # Optuna fails a trial whose value is NaN
    return min(row['valid_rmse'] for row in net.history if 'valid_rmse' in row)


def run_trial(study, target, job):
    """One trial of `study` by Optuna's optimize, here or on a Dask worker: a
    net trained with the sampler's settings for job.trial_budget seconds.
    `target` is None for job.name, or the index of a specialist. Returns the
    trial's number."""
    import optuna
    if _STOP.is_set():
        raise KeyboardInterrupt
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures: in the table
    numbers = []
    study.optimize(functools.partial(_objective, target=target, job=job), n_trials=1,
                   catch=(Exception,), callbacks=[lambda _, trial: numbers.append(trial.number)])
    return numbers[0]


# --- The search ---

def storage_url(study):
    """A study file as Optuna's database URL (absolute, so that a scheduler
    elsewhere opens the same path), or a database URL as it is."""
    text = str(study)
    return text if '://' in text else f'sqlite:///{Path(text).resolve()}'


def _storage(study, client):
    """The database of `study`: through the Dask scheduler of `client`, or
    here, where trials beat (Optuna fails and retries a trial that stopped)."""
    import optuna
    if client:
        from optuna_integration import DaskStorage
        return DaskStorage(storage_url(study), client=client)
    return optuna.storages.RDBStorage(storage_url(study), heartbeat_interval=HEARTBEAT,
                                      grace_period=LOST_AFTER,
                                      heartbeat_stale_trial_callback=_retry_lost)


def _retry_lost(study, trial, note='its process ended'):
    """Queue once more the settings of a trial whose process or worker died
    (Optuna's retry; a retry is not retried)."""
    import optuna
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    trial.user_attrs.pop('worker', None)  # not the retry's: it sets its own as it starts
    retry(study, trial)
    print(f'{study.study_name} trial {trial.number}: {note}; failed' +
          ('' if retry.retry_history(trial) else ', its settings queued again'))


def _fail_lost_trials(studies, client):
    """Fail the running trials whose Dask worker has gone, and retry them."""
    import optuna
    workers = set(client.scheduler_info(n_workers=-1)['workers'])
    for study in studies:
        for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            worker = trial.user_attrs.get('worker')  # None: not started yet
            if worker is not None and worker not in workers:
                optuna.trial.Trial(study, trial._trial_id).set_user_attr('note', 'its worker died')
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
                _retry_lost(study, trial, 'its worker died')


def _study(storage, where, name, seed, startup_trials, create=False):
    """The study `name` in `storage` (at `where`; created, or loaded), with
    kfkd's sampler, seeded with `seed`, and pruner. Each trial gets a study
    object of its own, seeded apart, so that trials on several workers at
    once do not all draw the same settings."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    options = dict(study_name=name, storage=storage,
                   sampler=optuna.samplers.TPESampler(n_startup_trials=startup_trials, seed=seed,
                                                      multivariate=True, constant_liar=True),
                   pruner=optuna.pruners.HyperbandPruner(min_resource=2, reduction_factor=3))
    try:
        return optuna.create_study(**options) if create else optuna.load_study(**options)
    except KeyError:
        raise KfkdError(f'no study {name!r} to resume in {where}') from None
    except optuna.exceptions.DuplicatedStudyError:
        raise KfkdError(f'{where} already holds a study {name!r}: --resume goes on with it, or '
                        f'choose another --study') from None


def _line(study, number):
    """How a trial went, in a line."""
    row, params = _table([study]).iloc[number], study.get_trials(deepcopy=False)[number].params
    result = {'COMPLETE': f'{row[RMSE]:.3f} px', 'FAIL': f'failed: {row["note"]}',
              'PRUNED': f'pruned at epoch {row["epochs"]:.0f} ({row[RMSE]:.3f} px)'}
    settings = ', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}'
                         for k, v in params.items())
    return (f'{study.study_name} trial {number}: {result.get(row["state"], row["state"])}; '
            f'{row["epochs"]:.0f} epochs, {row["seconds"]:.0f} s; {settings}')


def _search(studies, targets, job, client, trials, deadline, open_study, most_failures=5):
    """Keep the Dask cluster of `client` (or this process) busy with trials
    until each study has `trials` finished ones or the time runs out; say how
    each went. Stops after `most_failures` failed trials in a row: then
    something is wrong beyond the settings."""
    import optuna
    finished = lambda study: len(study.get_trials(
        deepcopy=False, states=tuple(optuna.trial.TrialState[s] for s in FINISHED)))
    running, failures = {}, 0
    while True:
        if client:
            _fail_lost_trials(studies, client)
        in_flight = collections.Counter(running.values())
        started = [finished(study) + in_flight[i] for i, study in enumerate(studies)]
        time_left = deadline - time.monotonic()
        if not running and (min(started) >= trials or time_left < job.trial_budget):
            return
        while min(started) < trials and len(running) < _slots(client) and \
                time_left >= job.trial_budget:
            i = started.index(min(started))  # the study furthest behind
            seed = job.seed + 1000 * i + len(studies[i].get_trials(deepcopy=False)) + in_flight[i]
            trial = (open_study(studies[i].study_name, seed), targets[i], job)
            running[client.submit(run_trial, *trial, pure=False) if client else _run(*trial)] = i
            in_flight[i] += 1
            started[i] += 1
        for future in _done(running, client):
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


def _slots(client):
    """How many trials run at once: one here, a thread each on a Dask cluster."""
    return max(1, sum(client.nthreads().values())) if client else 1


def _run(*trial):
    """A trial run here, as a finished future."""
    future = Future()
    future.set_result(run_trial(*trial))
    return future


def _done(futures, client):
    """The futures done, or (on a Dask cluster) done within 2 s."""
    if not client:
        return list(futures)
    from distributed import wait
    try:
        return wait(list(futures), timeout=2, return_when='FIRST_COMPLETED').done
    except TimeoutError:
        return set()


def tune(*, name=None, specialists=False, params=(), data_dir=None, groups=None, study=None,
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
        storage = _storage(study, client)
        if resume:
            setup = _stored_setup(storage, study, given)
            space = _checked(setup, budget)
            kfkd_io.read(data_dir=setup['data'])
        trials = trials or (20 if budget is None else 10 ** 6)
        targets = list(range(len(SPECIALIST_SETTINGS))) if setup['specialists'] else [None]
        names = [f'specialist-{SPECIALIST_SETTINGS[t]["columns"][0]}' for t in targets] \
            if setup['specialists'] else [setup['net']]
        open_study = functools.partial(_study, storage, storage_url(study),
                                       startup_trials=max(4, min(10, trials // 3)))
        studies = [open_study(name, setup['seed'], create=not resume) for name in names]
        if not resume:
            _remember_setup(studies, targets, setup, space)
        job = Job(setup['net'], space, setup['data'], setup['groups'], setup['trial_budget'],
                  device, setup['seed'], precision,
                  str(Path(pretrain).resolve()) if pretrain else None)
        print(f'Searching {len(space)} settings of {label} ({len(studies)} '
              f'{"studies" if len(studies) > 1 else "study"} in {study}): ' +
              ', '.join(map(str, space)) + f'; trials of {setup["trial_budget"]:g} s, ' +
              (f'on the Dask cluster at {client.scheduler.address} ({_slots(client)} at once)'
               if client else 'one after another here'))
        deadline = started + (budget if budget is not None else math.inf)
        try:
            with contextlib.nullcontext() if client else stop_trials_on_ctrl_c():
                _search(studies, targets, job, client, trials, deadline, open_study)
        except KeyboardInterrupt:
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

def _note(trial):
    """A row of trials_dataframe's note: the defaults, a retry, why it failed
    (a trial without a note failed as its heartbeat stopped)."""
    retry_of, note = trial.get('system_attrs_failed_trial'), trial.get('user_attrs_note')
    return '; '.join(filter(None, (
        'defaults' if pd.notna(trial.get('user_attrs_defaults')) else '',
        f'retry of trial {retry_of:.0f}' if pd.notna(retry_of) else '',
        note if isinstance(note, str) else 'its process ended' if trial['state'] == 'FAIL'
        else '')))


def _table(studies):
    """The trials of `studies`, from Optuna's trials_dataframe: the columns of
    the CSV file."""
    tables = []
    for study in studies:
        trials = study.trials_dataframe(attrs=('number', 'state', 'value', 'duration', 'params',
                                               'user_attrs', 'system_attrs'))
        if len(trials):
            tables.append(pd.DataFrame({
                'study': study.study_name, 'trial': trials['number'], 'state': trials['state'],
                RMSE: trials['value'].astype(float),
                'epochs': trials.get('user_attrs_epochs', np.nan),
                'seconds': pd.to_timedelta(trials['duration']).dt.total_seconds(),
                **{column[len('params_'):]: trials[column] for column in trials
                   if column.startswith('params_')},
                'note': trials.apply(_note, axis=1)}))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def _studies(study):
    """The studies in a study file (or database URL)."""
    import optuna
    if '://' not in str(study) and not Path(study).is_file():
        raise KfkdError(f'{study}: no such study file')
    storage = storage_url(study)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return [optuna.load_study(study_name=name, storage=storage)
            for name in optuna.get_all_study_names(storage)]


def _best(study):
    """The study's best finished trial, or None."""
    try:
        return study.best_trial
    except ValueError:  # none finished
        return None


def _write_results(table, studies, setup, out, study):
    specialists, bests = setup['specialists'], [_best(one) for one in studies]
    if specialists:
        entries = [{'columns': list(setting['columns']),
                    'kwargs': {**setting.get('kwargs', {}), **(best.params if best else {})},
                    **({'valid_rmse': round(best.value, 4), 'trial': best.number} if best
                       else {})}
                   for setting, best in zip(SPECIALIST_SETTINGS, bests)]
        found = {'specialists': entries} if any(bests) else None
    else:
        best = bests[0]
        found = best and {'net': setup['net'], 'settings': best.params,
                          'valid_rmse': round(best.value, 4), 'trial': best.number,
                          'trial_budget': setup['trial_budget']}
    trials_file = (Path(study).with_suffix('.csv') if '://' not in study else
                   Path('tune-trials.csv'))
    with kfkd_io.atomic_write(trials_file, 'w') as f:
        table.to_csv(f, index=False, float_format='%.6g')
    print(table.to_string(index=False, float_format=lambda v: f'{v:.4g}', na_rep=''))
    print(f'The trials: {trials_file} (kfkd plot tune {study})')
    if found:
        with kfkd_io.atomic_write(out, 'w') as f:
            json.dump(found, f, indent=1)
        print(f'Best settings: {out} (kfkd {"fit_specialists" if specialists else "fit"} '
              f'--settings {out})')


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


def plot_tune(study):
    """Optuna's pictures of the search in a study file (or database URL), one
    above another: validation RMSE against trial, the best so far as a line,
    for every study; then against each setting, for each study (on a log axis
    where it was searched on a log scale). Optuna draws complete trials only."""
    import matplotlib
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots
    studies = [one for one in _studies(study) if _best(one)]
    if not studies:
        raise KfkdError('no finished trials to draw')
    with matplotlib.rc_context():  # Optuna's plots set pyplot's style
        axes = [optuna_plots.plot_optimization_history(studies, target_name=RMSE)]
        for one in studies:
            axes.append(np.ravel(optuna_plots.plot_slice(one, target_name=RMSE))[0])
            axes[-1].figure.suptitle(f'{one.study_name}: {RMSE} against each setting')
        pictures = []
        for ax in axes:
            ax.figure.canvas.draw()
            pictures.append(np.asarray(ax.figure.canvas.buffer_rgba()))
            plt.close(ax.figure)
    width = max(picture.shape[1] for picture in pictures)
    picture = np.vstack([np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255)
                         for p in pictures])
    fig = blank_figure(figsize=(width / 100, len(picture) / 100))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(picture)
    ax.set_axis_off()
    return fig
