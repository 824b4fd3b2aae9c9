"""kfkd tune: the search the tutorial leaves to its reader (each specialist's
settings tuned), on Optuna's parts: TPE proposes settings, Hyperband prunes
trials from their epoch-by-epoch validation RMSE, and a study lives in a
SQLite file (or any database Optuna takes), so that a search resumes and
processes share it. Trials run here with Optuna's heartbeats, or side by side
on a Dask cluster; a trial whose process or worker died is failed, and its
settings tried again.

  tune                 the search; writes the trials' table and the best settings
  run_trials           a study's trials in this process, here or on a Dask worker

What it searches, and the files it writes (the trials' table, the best
settings, the pictures), are kfkd_settings'.
"""
import collections
import contextlib
import functools
import io
import math
import time
import warnings
from pathlib import Path

from skorch.callbacks import Callback

import kfkd_io
from kfkd import SPECIALIST_SETTINGS, specialist_and_data
from kfkd_beyond import training_data
from kfkd_engine import (best_epoch, build_net, dask_client, load_net, resolve_device,
                         rmse_pixels, stop_requests)
from kfkd_io import KfkdError, data_path
from kfkd_settings import (NET_SPACE, RMSE, SPECIALIST_SPACE, own_settings, search_space,
                           storage_url, trials_table, write_results)

FINISHED = ('COMPLETE', 'PRUNED')
# A trial here beats every HEARTBEAT s; one silent for LOST_AFTER s (its
# process died) is failed as the study's next trial starts. MOST_FAILURES
# failed trials in a row stop a search: something is wrong beyond the settings.
HEARTBEAT, LOST_AFTER, MOST_FAILURES = 10, 60, 5
# Optuna calls the parts kfkd uses experimental, and says so at each use
warnings.filterwarnings('ignore', message=r'\S*(DaskStorage|RetryHeartbeatStaleTrialCallback\S*)'
                        r' is experimental|Argument ``heartbeat_interval`` is an experimental')


# --- Trials ---

class ValidRMSE(Callback):
    """Each epoch's validation RMSE in pixels, as `valid_rmse` in the history:
    what the pruner is told, and what a trial scores."""

    def on_epoch_end(self, net, **kwargs):
        net.history.record('valid_rmse', rmse_pixels(net.history[-1, 'valid_loss']))


class StopWhenAsked(Callback):
    """Ends training (skorch's way: KeyboardInterrupt) at the batch after a
    Ctrl-C that kfkd_engine.stop_requests caught in `requests`."""

    def __init__(self, requests):
        self.requests = requests

    def on_batch_end(self, net, **kwargs):
        if self.requests:
            raise KeyboardInterrupt


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


def _objective(trial, target, job, requests):
    """Optuna's objective: the best validation RMSE (px) of a net trained with
    the settings the sampler proposes. A failure leaves a note of why."""
    import optuna
    import torch
    from optuna_integration import SkorchPruningCallback
    quiet = contextlib.redirect_stdout(io.StringIO())  # a net's prints would bury the lines
    with contextlib.suppress(ImportError, ValueError):  # on a Dask worker: which one
        from distributed import get_worker
        trial.set_user_attr('worker', get_worker().address)
        quiet = contextlib.nullcontext()  # into its log: a redirect is not thread-safe
    settings = {param.name: param.suggest(trial) for param in job.space}
    torch.manual_seed(job.seed + (target or 0))  # every trial alike: they differ by settings
    net = None
    try:
        with quiet:
            net, X, y = _trial_net(target, settings, job)
            net.callbacks_ += [('valid_rmse', ValidRMSE()), ('stop', StopWhenAsked(requests)),
                               ('prune', SkorchPruningCallback(trial, 'valid_rmse'))]
            net.partial_fit(X, y)
        if requests:  # skorch ends training quietly at a KeyboardInterrupt
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        trial.set_user_attr('note', 'interrupted')
        raise
    except Exception as e:  # settings that do not work: the search goes on
        if not isinstance(e, optuna.TrialPruned):
            trial.set_user_attr('note', f'{type(e).__name__}: {e}')
        raise
    finally:
        trial.set_user_attr('epochs', 0 if net is None else len(net.history))
    best = best_epoch(net.history, 'valid_rmse')
    if net.diverged_ or best is None:
        trial.set_user_attr('note', net.diverged_ or 'no epoch was validated')
        return math.nan  # Optuna fails a trial whose value is NaN
    return net.history[best, 'valid_rmse']


def run_trials(study, target, job, trials=1, timeout=None, requests=(), stop=None):
    """`trials` trials of `study` (of job.name, or of specialist `target`) by
    Optuna's optimize, here or on a Dask worker, each saying how it went; no
    trial starts after `timeout` s, after MOST_FAILURES failed in a row, once
    `requests` (stop_requests) holds a Ctrl-C or the Dask Event `stop` is set."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures: in the table
    say = print
    with contextlib.suppress(ImportError):  # Dask's print: on the client's screen too
        from distributed import print as say

    def after(study, trial):
        say(_line(study, trial.number))
        if requests:
            raise KeyboardInterrupt
        if _failing(study) or stop is not None and stop.is_set():
            study.stop()
    study.optimize(functools.partial(_objective, target=target, job=job, requests=requests),
                   n_trials=trials, timeout=timeout, catch=(Exception,), callbacks=[after])


def _failing(study):
    """Whether the last MOST_FAILURES trials of `study` to end failed."""
    ended = [t.state.name for t in study.get_trials(deepcopy=False)
             if t.state.name in (*FINISHED, 'FAIL')]
    return ended[-MOST_FAILURES:] == ['FAIL'] * MOST_FAILURES


def _line(study, number):
    """How a trial went, in a line."""
    row = trials_table([study]).iloc[number]
    params = study.get_trials(deepcopy=False)[number].params
    result = {'COMPLETE': f'{row[RMSE]:.3f} px', 'FAIL': f'failed: {row["note"]}',
              'PRUNED': f'pruned at epoch {row["epochs"]:.0f} ({row[RMSE]:.3f} px)'}
    settings = ', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}'
                         for k, v in params.items())
    return (f'{study.study_name} trial {number}: {result.get(row["state"], row["state"])}; '
            f'{row["epochs"]:.0f} epochs, {row["seconds"]:.0f} s; {settings}')


# --- The search ---

def _storage(study, client):
    """The database of `study`: through the Dask scheduler of `client`, or
    here, with heartbeats (Optuna fails and retries a trial that stopped)."""
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
    kfkd's sampler, seeded with `seed`, and pruner."""
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


def _search(studies, targets, job, client, slots, trials, end, open_study):
    """Each study's trials, one study after another, until it has `trials`
    finished ones or its share of the time left to `end` is spent: here, or shared
    out among the `slots` worker threads of the Dask cluster of `client` (as
    Optuna runs on Dask), each with a study object of its own, seeded apart
    so that they do not all draw the same settings. Trials that failed, or
    whose worker died (failed here, and tried again), leave a further round."""
    stop = None
    if client:
        from distributed import Event
        stop = Event(client=client)  # set at a Ctrl-C: the workers stop after their trial
    with contextlib.nullcontext([]) if client else stop_requests() as requests:
        for i, (study, target) in enumerate(zip(studies, targets)):
            share = time.monotonic() + (end - time.monotonic()) / (len(studies) - i)
            while True:
                if client:
                    _fail_lost_trials([study], client)
                timeout = share - time.monotonic() - job.trial_budget  # no trial ends past it
                so_far = study.get_trials(deepcopy=False)
                left = trials - sum(trial.state.name in FINISHED for trial in so_far)
                if timeout < 0 or left <= 0:
                    break
                seed = job.seed + 1000 * i + len(so_far)
                runs = [(open_study(study.study_name, seed + k), target, job,
                         left // slots + (k < left % slots), timeout)
                        for k in range(min(slots, left))]
                if client:
                    _on_dask(client, runs, stop)
                else:
                    run_trials(*runs[0], requests)
                if _failing(study):
                    print(f'Stopping: {MOST_FAILURES} trials in a row failed (their notes are '
                          f'in the table)')
                    return


def _on_dask(client, runs, stop):
    """run_trials(*run) for each of `runs` on the Dask cluster of `client`."""
    futures = [client.submit(run_trials, *run, stop=stop, pure=False) for run in runs]
    try:
        for future in futures:
            try:
                future.result()
            except Exception as e:
                if type(e).__name__ != 'KilledWorker':
                    raise KfkdError(f'trials failed on the cluster: {type(e).__name__}: {e} '
                                    f'(is kfkd installed on every worker?)') from e
                print(f'{runs[0][0].study_name}: a trial killed its workers three times ({e}); '
                      f'going on')
    except KeyboardInterrupt:
        stop.set()
        raise


def tune(*, name=None, specialists=False, params=(), data_dir=None, groups=None, study=None,
         out=None, trials=None, budget=None, trial_budget=None, dask=None, device='auto',
         seed=None, resume=False, pretrain=None, precision=None):
    """Search the settings of net `name` (default net9), or of each specialist,
    `params` (--param strings; default NET_SPACE, or SPECIALIST_SPACE), and
    write every trial as a table beside `study` (a file, default tune-NAME.db,
    or a database URL) and the best as `out`; what `kfkd tune` runs. Returns
    the table. `trials` finished trials per study (default 20, unless `budget`
    seconds in all bound them), each trained for `trial_budget` s (default
    60). With `resume`, the search goes on with what its study holds (net,
    settings searched, seed, trial budget, data, groups). `dask` runs trials
    on a Dask cluster (a scheduler's address, or 'local')."""
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
    started = time.monotonic()
    with dask_client(dask) if dask else contextlib.nullcontext() as client:
        storage = _storage(study, client)
        if resume:  # the setup the study holds, checked against the options given
            stored = optuna.get_all_study_summaries(storage)
            if not stored:
                raise KfkdError(f'{study}: holds no search to resume')
            setup = stored[0].user_attrs
            changed = [key for key, value in given.items()
                       if value is not None and value is not False and value != setup[key]]
            if changed:
                raise KfkdError(f'--{changed[0].replace("_", "-")} cannot change a resumed '
                                f'search (it searched {setup[changed[0]]})')
            space = _checked(setup, budget)
        trials = trials or (20 if budget is None else 10 ** 6)
        targets = list(range(len(SPECIALIST_SETTINGS))) if setup['specialists'] else [None]
        names = [setup['net'] if target is None else
                 f'specialist-{SPECIALIST_SETTINGS[target]["columns"][0]}' for target in targets]
        open_study = functools.partial(_study, storage, storage_url(study),
                                       startup_trials=max(4, min(10, trials // 3)))
        studies = [open_study(name, setup['seed'], create=not resume) for name in names]
        if not resume:
            _remember_setup(studies, targets, setup, space)
        job = Job(setup['net'], space, setup['data'], setup['groups'], setup['trial_budget'],
                  device, setup['seed'], precision,
                  str(Path(pretrain).resolve()) if pretrain else None)
        slots = max(1, sum(client.nthreads().values())) if client else 1
        print(f'Searching {len(space)} settings of {label} ({len(studies)} '
              f'{"studies" if len(studies) > 1 else "study"} in {study}): ' +
              ', '.join(map(str, space)) + f'; trials of {setup["trial_budget"]:g} s, ' +
              (f'on the Dask cluster at {client.scheduler.address} ({slots} at once)'
               if client else 'one after another here'))
        try:
            _search(studies, targets, job, client, slots, trials,
                    started + (math.inf if budget is None else budget), open_study)
        except KeyboardInterrupt:
            print(f'Interrupted: the finished trials are kept in {study}; go on with '
                  f'the same command and --resume')
            raise
        finally:
            table = trials_table(studies)
            if len(table):
                write_results(table, studies, setup, out, str(study))
    print(f'{len(table)} trials in {study}, {time.monotonic() - started:.0f} s this run')
    return table


def _checked(setup, budget):
    """The search space of a setup (search_space), its budgets checked and its
    data read (and cached) once: a bad option fails before any trial."""
    space = search_space(setup)
    if not setup['trial_budget'] > 0:
        raise KfkdError(f'--trial-budget must be positive, not {setup["trial_budget"]:g}')
    shares = len(SPECIALIST_SETTINGS) if setup['specialists'] else 1
    if budget is not None and budget < shares * setup['trial_budget']:
        raise KfkdError(f'--budget {budget:g} s is shorter than one trial' +
                        (f' for each of the {shares} specialists' if shares > 1 else '') +
                        f' (--trial-budget {setup["trial_budget"]:g})')
    kfkd_io.read(data_dir=setup['data'])
    return space


def _remember_setup(studies, targets, setup, space):
    """Keep the setup in each study, and queue the net's own settings as its
    first trial, where the space holds them: the yardstick."""
    for study, target in zip(studies, targets):
        for key, value in setup.items():
            study.set_user_attr(key, value)
        own = own_settings(setup, target, space)
        if own is not None:
            study.enqueue_trial(own, user_attrs={'defaults': True})
