"""What a search (`kfkd tune`, run by kfkd_tune on Optuna) tries, and what it
leaves: the settings it searches, its study's database, the table of its
trials, the best settings as the file `kfkd fit --settings` reads, and its
pictures. Apart from the search, so that reading them needs no search.

  NET_SPACE, SPECIALIST_SPACE   what `kfkd tune` searches where no --param says
  Param, parse_param            a setting to search: NAME=LOW:HIGH[:log] or NAME=A,B,C
  search_space                  the Params of a search, checked against its net
  own_settings                  the net's own settings: a search's first trial
  storage_url                   a study file as Optuna's database URL
  trials_table, write_results   the trials (trials_dataframe) as a table; the table
                                and the best settings written
  found_settings, read_settings the settings file, from a search's best trials
  plot_tune                     Optuna's pictures of a search
"""
import collections
import contextlib
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import kfkd_io
from kfkd import SPECIALIST_SETTINGS, blank_figure, net7
from kfkd_engine import current_setting, registered_net, unknown_settings
from kfkd_io import KfkdError

RMSE = 'valid RMSE (px)'  # a trial's score: its best epoch's, on the validation faces
# Optuna calls its matplotlib pictures experimental, and says so at each use
warnings.filterwarnings('ignore',
                        message=r'(plot_optimization_history|plot_slice) is experimental')

# The defaults of `kfkd tune` where no --param names what to search. kfkd's
# own nets: the learning rate, weight decay, width and augmentation.
NET_SPACE = ('lr=0.001:0.01:log', 'optimizer__weight_decay=0.00001:0.001:log',
             'module__width=12,16,24', 'iterator_train__rotate=0:25',
             'iterator_train__scale=0:0.2', 'iterator_train__shift=0:12')
# The specialists (net7): the tutorial's dropout per specialist and its
# learning rate, where the schedule starts.
SPECIALIST_SPACE = ('module__dropout2_p=0:0.5', 'module__dropout3_p=0:0.6',
                    'module__dropout4_p=0:0.7', 'callbacks__AdjustVariable_1__start=0.01:0.1:log')


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


def search_space(setup):
    """The Params of a search's setup (its net, or the specialists, and the
    --param strings), each checked against the net: a bad one fails before
    any trial."""
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
    return space


def own_settings(setup, target, space):
    """The settings of `space` that the net itself has (the specialist
    SPECIALIST_SETTINGS[target]'s, where `target` is not None), or None where
    the space does not hold them: what a search tries first, the yardstick."""
    net = net7 if setup['specialists'] else registered_net(setup['net'])
    kwargs = SPECIALIST_SETTINGS[target].get('kwargs', {}) if target is not None else {}
    own = {param.name: kwargs.get(param.name, current_setting(net, param.name))
           for param in space}
    return own if all(param.contains(own[param.name]) for param in space) else None


def found_settings(setup, bests):
    """The settings file's content: the best trial's settings (Optuna's
    FrozenTrial, or None where none finished) of the net, or of each
    specialist, of a search's setup; None where there is no best at all."""
    if setup['specialists']:
        entries = [{'columns': list(setting['columns']),
                    'kwargs': {**setting.get('kwargs', {}), **(best.params if best else {})},
                    **({'valid_rmse': round(best.value, 4), 'trial': best.number} if best
                       else {})}
                   for setting, best in zip(SPECIALIST_SETTINGS, bests)]
        return {'specialists': entries} if any(bests) else None
    best = bests[0]
    return best and {'net': setup['net'], 'settings': best.params,
                     'valid_rmse': round(best.value, 4), 'trial': best.number,
                     'trial_budget': setup['trial_budget']}


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


def storage_url(study):
    """A study file as Optuna's database URL (absolute, so that a scheduler
    elsewhere opens the same path), or a database URL as it is."""
    text = str(study)
    return text if '://' in text else f'sqlite:///{Path(text).resolve()}'


def trial_note(trial):
    """A row of trials_dataframe's note: the defaults, a retry, why it failed
    (a trial without a note failed as its heartbeat stopped)."""
    retry_of, note = trial.get('system_attrs_failed_trial'), trial.get('user_attrs_note')
    return '; '.join(filter(None, (
        'defaults' if pd.notna(trial.get('user_attrs_defaults')) else '',
        f'retry of trial {retry_of:.0f}' if pd.notna(retry_of) else '',
        note if isinstance(note, str) else 'its process ended' if trial['state'] == 'FAIL'
        else '')))


def trials_table(studies):
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
                'note': trials.apply(trial_note, axis=1)}))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def best_trial(study):
    """The study's best complete trial, or None."""
    with contextlib.suppress(ValueError):  # none complete
        return study.best_trial


def write_results(table, studies, setup, out, study):
    """The table, printed and as a CSV file beside the study; the best
    settings as `out`, for `kfkd fit --settings` or `fit_specialists`."""
    found = found_settings(setup, [best_trial(one) for one in studies])
    trials_file = Path('tune-trials.csv' if '://' in study else Path(study).with_suffix('.csv'))
    with kfkd_io.atomic_write(trials_file, 'w') as f:
        table.to_csv(f, index=False, float_format='%.6g')
    print(table.to_string(index=False, float_format=lambda v: f'{v:.4g}', na_rep=''))
    print(f'The trials: {trials_file} (kfkd plot tune {study})')
    if found:
        command = 'fit_specialists' if setup['specialists'] else 'fit'
        out = Path(out or f'tune-{"specialists" if setup["specialists"] else setup["net"]}.json')
        with kfkd_io.atomic_write(out, 'w') as f:
            json.dump(found, f, indent=1)
        print(f'Best settings: {out} (kfkd {command} --settings {out})')


def plot_tune(study):
    """Optuna's pictures of the search in a study file (or database URL), one
    above another: validation RMSE against trial for every study, then against
    each setting for each study. Optuna draws complete trials only."""
    import matplotlib
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots
    if '://' not in str(study) and not Path(study).is_file():
        raise KfkdError(f'{study}: no such study file')
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    studies = [optuna.load_study(study_name=name, storage=storage_url(study))
               for name in optuna.get_all_study_names(storage_url(study))]
    studies = [one for one in studies if best_trial(one)]
    if not studies:
        raise KfkdError('no finished trials to draw')
    with matplotlib.rc_context():  # Optuna's plots set pyplot's style
        figures = [optuna_plots.plot_optimization_history(studies, target_name=RMSE).figure]
        for one in studies:
            figures.append(np.ravel(optuna_plots.plot_slice(one, target_name=RMSE))[0].figure)
            figures[-1].suptitle(f'{one.study_name}: {RMSE} against each setting')
        pictures = []
        for fig in figures:
            fig.canvas.draw()
            pictures.append(np.asarray(fig.canvas.buffer_rgba()))
            plt.close(fig)
    width = max(picture.shape[1] for picture in pictures)
    picture = np.vstack([np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255)
                         for p in pictures])
    fig = blank_figure(figsize=(width / 100, len(picture) / 100))
    fig.add_axes((0, 0, 1, 1)).imshow(picture)
    fig.axes[0].set_axis_off()
    return fig
