"""The `kfkd` command: argparse and the functions its commands run.

  fit, demo, predict, download, plot    what `kfkd fit`, `kfkd demo`, ... do
                                        (`kfkd tune` is kfkd_tune.tune)
  main                                  the entry point of `kfkd` and `python kfkd.py`

It stands apart from kfkd.py, which holds the tutorial's code, because a
command line is not deep learning: options, checks of them, checkpoints and
resuming, one-line errors and exit codes. It imports kfkd, kfkd_beyond,
kfkd_engine, kfkd_io, kfkd_settings, kfkd_tune and (for `kfkd predict`) kfkd_photo and
kfkd_video; none of them imports it.
"""
import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from sklearn.base import clone

import kfkd_detect
import kfkd_io
import kfkd_settings
import kfkd_tune
from kfkd import (SPECIALIST_SETTINGS, fit_specialists, load2d, net7, plot_flip,
                  plot_learning_curves, plot_samples, submit)
from kfkd_beyond import (PRETRAINED, keypoint_errors, overall_rmse, plot_errors, predictions,
                         pretrained, pretrained_file, score, training_data, validation_data)
from kfkd_engine import (NETS, Checkpoint, __version__, best_epoch, build_net, load_net,
                         read_model, resolve_device, resume_state, rmse_pixels, save_net)
from kfkd_io import COLUMNS, KfkdError, SettingError, data_path, read

COMPETITION = 'facial-keypoints-detection'


def fit(name=None, data_dir=None, out=None, max_epochs=None, device='auto', seed=42,
        precision=None, lr=None, resume=False, time_budget=None, groups=None, mirror_axis=None,
        settings=None, overwrite=False):
    """Train net `name` on training.csv and save it to `out`; what `kfkd fit` runs.

    Returns the trained net. A file already at `out` is refused before any
    training, unless `overwrite` (or `resume`) says what to do with it. Ctrl-C
    or SIGTERM stops cleanly with a usable checkpoint in `out`, which
    resume=True continues. `time_budget` (seconds) ends training in time,
    with the best weights; `groups` validates on held-out groups (see load);
    `mirror_axis` (a number, or 'measured') replaces the net's. `settings` is
    a settings file from `kfkd tune`: the net it names (net9 by default), with
    what the search found.
    """
    device = resolve_device(device)
    found = {}
    if settings:
        tuned, found = kfkd_settings.read_settings(settings)
        if name not in (None, tuned):
            raise KfkdError(f'{settings}: settings for {tuned}, not {name}')
        name = tuned
    name = name or 'net9'
    out = Path(out or f'{name}.safetensors')
    if resume:
        changed = [option for option, value in (('lr', lr), ('mirror-axis', mirror_axis),
                                                ('settings', settings)) if value is not None]
        if changed:
            raise KfkdError(f'--{changed[0]} cannot change a resumed run')
        net = load_net(out, device)
        if not net.resume_:
            raise KfkdError(f'{out}: nothing to resume: the run finished ({len(net.history)} '
                            f'epochs); start a new one with --overwrite in place of --resume')
        name = net.name_
    else:
        refuse_to_replace(out, overwrite, ', --resume to continue its interrupted run')
        torch.manual_seed(seed)
        net = build_net(name, found, device=device)
        if found:
            print(f'{name} with the settings of {settings}: ' +
                  ', '.join(f'{key}={value}' for key, value in found.items()))
    if max_epochs is not None:
        if max_epochs < 1:
            raise KfkdError(f'--max-epochs must be at least 1, not {max_epochs}')
        net.set_params(max_epochs=max_epochs)
    if lr is not None:
        if not lr > 0:
            raise KfkdError(f'--lr must be positive, not {lr}')
        net.set_params(lr=lr)
    if precision:
        net.set_params(precision=precision)
    if mirror_axis is not None:
        net.set_params(mirror_axis=mirror_axis)
    if time_budget is not None:
        if not time_budget > 0:
            raise KfkdError(f'--time-budget must be positive, not {time_budget}')
        net.set_params(time_budget=time_budget)
    net.set_params(callbacks=list(net.callbacks or []) + [('checkpoint', Checkpoint(out, name))])
    if net.initialized_:
        net.initialize_callbacks()  # set_params leaves those of an initialized net alone
    else:
        net.initialize()
    if resume:
        resume_state(net, out)
        groups = groups or net.groups_  # the same validation split
        remaining = net.max_epochs - len(net.history)
        if remaining < 1:
            raise KfkdError(f'{out}: already {len(net.history)} epochs of {net.max_epochs}; '
                            f'raise --max-epochs to train on')
        print(f'Resuming {name} at epoch {len(net.history) + 1} of {net.max_epochs}')
    X, y = training_data(net, data_dir, groups)
    started = time.monotonic()
    if resume:
        net.partial_fit(X, y, epochs=remaining)
    else:
        net.partial_fit(X, y)
    if dict(net.callbacks_)['checkpoint'].interrupted_:
        print(f'Interrupted after epoch {len(net.history)}: {out} holds the best weights so '
              f'far. Continue with: kfkd fit --resume --out {out}', file=sys.stderr)
        raise KeyboardInterrupt
    save_net(net, out, name)
    if net.diverged_:
        raise KfkdError(f'{name}: {net.diverged_} (--lr). {out} holds them.')
    best = best_epoch(net.history)
    print(f'{name}: {len(net.history)} epochs in {time.monotonic() - started:.1f} s; ' +
          (f'best valid RMSE {rmse_pixels(net.history[best, "valid_loss"]):.3f} px '
           f'(epoch {best + 1}); ' if best is not None else '') + f'saved {out}')
    if net.train_split and best is not None:
        errors = keypoint_errors(net, *validation_data(net, X, y))
        test_time = ' and '.join(kind for kind, used in (('flips', net.test_flip),
                                                        ('shifts', net.test_shifts)) if used)
        if test_time:
            print(f'{name}: valid RMSE with test-time {test_time} {overall_rmse(errors):.3f} px')
        print(f'{name}: valid RMSE per keypoint (kfkd plot errors {out} draws them)\n' +
              errors.to_string(float_format='{:.3f}'.format))
    return net


def specialists(pretrain=None, data_dir=None, out='specialists.safetensors', max_epochs=None,
                epochs_scale=1.0, jobs=1, device='auto', seed=42, resume=False, dask=None,
                groups=None, precision=None, mirror_axis=None, settings=None, overwrite=False):
    """What `kfkd fit_specialists` runs: its options checked (a file already
    at `out` is refused unless `overwrite` or `resume`), then
    kfkd.fit_specialists; `settings`, a settings file from `kfkd tune
    --specialists`, gives each specialist the kwargs the search found."""
    if jobs < 1:
        raise KfkdError(f'--jobs must be at least 1, not {jobs}')
    if max_epochs is not None and max_epochs < 1:
        raise KfkdError(f'--max-epochs must be at least 1, not {max_epochs}')
    if not epochs_scale > 0:
        raise KfkdError(f'--epochs-scale must be positive, not {epochs_scale}')
    if resume and not Path(out).exists():
        raise KfkdError(f'{out}: no such specialists file to resume')
    if not resume:
        refuse_to_replace(out, overwrite, ', --resume to train the specialists it lacks')
    net = None if mirror_axis is None else clone(net7).set_params(mirror_axis=mirror_axis)
    specialist_settings = (kfkd_settings.read_settings(settings, specialists=True) if settings
                           else SPECIALIST_SETTINGS)
    return fit_specialists(pretrain, data_dir, out, max_epochs, epochs_scale, jobs, device, seed,
                           resume, dask, net, groups, precision, specialist_settings)


def refuse_to_replace(path, overwrite, otherwise=''):
    """A KfkdError, before any work is done, where `path` is a file the user
    has and `overwrite` does not say to replace it, or one kfkd ships."""
    if Path(path).resolve().parent == kfkd_io.MODELS:
        raise KfkdError(f'{path}: one of the files kfkd ships (its pretrained model and face '
                        f'detector), which kfkd never replaces; write to another --out')
    if Path(path).exists() and not overwrite:
        raise KfkdError(f'{path}: already there; pass --overwrite to replace it{otherwise}, '
                        f'or --out to write another file')


def demo(out='data/demo', device='auto', seed=42, n_train=7049, n_test=1783, max_epochs=None):
    """The main job on demo data: make synthetic faces (as many as Kaggle has),
    train, submit, and score the submission against the true keypoints."""
    import kfkd_demo
    out = Path(out)
    if (out / 'training.csv').exists() and not (out / 'solution.csv').exists():
        raise KfkdError(f'{out} holds data that `kfkd demo` did not make; choose another --out')
    started = time.monotonic()
    if not (out / 'solution.csv').exists():
        print(f'Making demo faces in {out} ...')
        kfkd_demo.write_demo_data(out, n_train, n_test)
    net = fit('net1', data_dir=out, out=out / 'net1.safetensors', device=device, seed=seed,
              max_epochs=max_epochs, overwrite=True)  # the folder is the demo's own
    submission = submit(net, data_dir=out, out=out / 'submission.csv')
    train = read(data_dir=out)[0][COLUMNS]
    lookup = pd.read_csv(out / 'IdLookupTable.csv')
    mean = pd.DataFrame({'RowId': lookup['RowId'],
                         'Location': train.mean()[lookup['FeatureName']].to_numpy()})
    ours, baseline = score(submission, out / 'solution.csv'), score(mean, out / 'solution.csv')
    print(f'\nTest RMSE of {submission}: {ours:.2f} px; predicting the training mean: '
          f'{baseline:.2f} px. ({time.monotonic() - started:.0f} s in all)')
    return ours, baseline


def predict(photos, model=None, out='.', device='auto', backend='pytorch', camera=None,
            smooth=True, detect_every=None, detector='yunet', draw_poses=False):
    """Keypoints of the faces on photos and videos, or from camera number
    `camera`; what `kfkd predict` runs (see kfkd_photo and kfkd_video). With
    backend 'onnxruntime' or 'opencv', `model` is an ONNX file from `kfkd
    export`; without a model, kfkd's pretrained one (kfkd_beyond.pretrained)."""
    import kfkd_photo
    import kfkd_video
    if detect_every is not None and detect_every < 1:
        raise KfkdError(f'--detect-every must be at least 1, not {detect_every}')
    if model is None:
        if backend != 'pytorch':
            raise KfkdError(f'--backend {backend} runs an ONNX file: name one with --model '
                            f'(`kfkd export` writes the pretrained model as one)')
        model = pretrained(resolve_device(device))
        print(f"Predicting with kfkd's pretrained {PRETRAINED.stem} (docs/model-card.md: "
              f'research use only); --model FILE predicts with yours')
    if isinstance(model, (str, Path)):
        model = read_any_model(model, device, backend)
    find = kfkd_detect.detector(detector)  # refused here, before any file is read
    files = kfkd_photo.find_photos(photos) if photos or camera is None else []
    videos = [path for path in files if kfkd_video.is_video(path)]
    for path in files:
        if path.suffix.lower() in kfkd_photo.VIDEO_SUFFIXES and path not in videos:
            raise KfkdError(f'{path}: not a video: its content is none of the video formats '
                            f'kfkd reads (MP4/MOV, Matroska/WebM, AVI, FLV, MPEG, Ogg)')
    options = dict(smooth=smooth, detect_every=detect_every or kfkd_video.DETECT_EVERY,
                   detector=detector, draw_poses=draw_poses)
    names = dict(zip(files, kfkd_photo.output_names(files)))  # same-named inputs kept apart
    for video in videos:
        kfkd_video.predict_video(model, out, video, name=names[video], **options)
    if camera is not None:
        kfkd_video.predict_video(model, out, camera=camera, **options)
    photos = [path for path in files if path not in videos]
    return kfkd_photo.predict_photos(model, photos, out, [names[photo] for photo in photos],
                                     find, draw_poses) if photos else None


def read_any_model(path, device='auto', backend='pytorch'):
    """A model file (PyTorch), or an exported ONNX file (onnxruntime, opencv), to predict with."""
    if not Path(path).exists():
        raise KfkdError(f'{path}: no such model file. Train one with `kfkd fit`, or name '
                        f'one with --model (`kfkd demo` leaves data/demo/net1.safetensors)')
    onnx_file = Path(path).suffix.lower() == '.onnx'
    if backend != 'pytorch':
        if not onnx_file:
            raise KfkdError(f'{path}: --backend {backend} runs ONNX files; make one with '
                            f'`kfkd export {path}`')
        import kfkd_onnx
        return kfkd_onnx.OnnxModel(path, runtime=backend)
    if onnx_file:
        raise KfkdError(f'{path}: an ONNX file; predict with it with --backend onnxruntime '
                        f'(or opencv)')
    return read_model(path, resolve_device(device))


def export(model=None, out=None, device='auto', overwrite=False):
    """Write a model file (by default kfkd's pretrained one) as ONNX (see
    kfkd_onnx), but not over a file already at `out` unless `overwrite`; what
    `kfkd export` runs."""
    import kfkd_onnx
    out = Path(out or Path(model or PRETRAINED).with_suffix('.onnx').name)
    refuse_to_replace(out, overwrite)
    model = model or pretrained_file()
    difference = kfkd_onnx.export(model, out, resolve_device(device))
    print(f'Wrote {out}: faces (n, 1, 96, 96) in, keypoints in pixels and their confidences '
          f'out; onnxruntime predicts as PyTorch does to within {difference:.2g} px')
    return out


def download(data_dir=None):
    """Fetch the competition's files from Kaggle into `data_dir` (needs `kaggle`)."""
    import tempfile
    data_dir = data_path(data_dir)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from kaggle.api.kaggle_api_extended import KaggleApi  # prints when unconfigured
    except ImportError:
        raise KfkdError("downloading needs Kaggle's package: pip install 'kfkd[kaggle]'") from None
    api = KaggleApi()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            api.authenticate()
    except (SystemExit, Exception):
        raise KfkdError('no Kaggle credentials: create an API token on '
                        'https://www.kaggle.com/settings and save it as ~/.kaggle/kaggle.json '
                        '(or set KAGGLE_USERNAME and KAGGLE_KEY)') from None
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        print(f'Downloading {COMPETITION} into {data_dir} ...')
        try:
            api.competition_download_files(COMPETITION, path=tmp, quiet=False)
        except Exception as e:
            status = getattr(getattr(e, 'response', None), 'status_code', None)
            if status in (401, 403):
                raise KfkdError(f'Kaggle refused the download ({status}): accept the '
                                f"competition's rules first at https://www.kaggle.com/c/"
                                f'{COMPETITION}/rules') from None
            raise KfkdError(f'the download from Kaggle failed ({type(e).__name__}' +
                            (f', HTTP {status}' if status else '') + '): check the network '
                            f'and try again, or fetch the files by hand from https://'
                            f'www.kaggle.com/c/{COMPETITION}/data into {data_dir}') from e
        kfkd_io.unpack_competition(Path(tmp) / f'{COMPETITION}.zip', data_dir)


def _save_figure(fig, out):
    with kfkd_io.atomic_write(out) as f:
        fig.savefig(f, format='png', dpi=100, bbox_inches='tight')
    print(f'Wrote {out}')


def plot(kind, files=(), data_dir=None, out=None, device='auto', groups=None):
    """`kfkd plot`: learning curves of model files, predictions of a model on
    test faces, a net's errors on its validation faces (those of `groups`,
    by default the ones it was trained with), the flip illustration, or a
    search's trials (`kfkd tune`); written as a PNG."""
    if kind == 'curves':
        if not files:
            raise KfkdError('plot curves: name one or more model files')
        fig = plot_learning_curves(*files)
    elif kind == 'samples':
        if len(files) != 1:
            raise KfkdError('plot samples: name one model file')
        X, _ = load2d(test=True, data_dir=data_dir)
        fig = plot_samples(read_model(files[0], resolve_device(device)), X)
    elif kind == 'errors':
        if not files:
            raise KfkdError('plot errors: name one or more model files')
        nets = [load_net(path, resolve_device(device)) for path in files]
        if len({str(net.groups_) for net in nets}) > 1:
            raise KfkdError('plot errors: these nets validated on different groups; name nets '
                            'trained with the same --groups to average their predictions')
        X, y = validation_data(nets[0], *training_data(nets[0], data_dir,
                                                        groups or nets[0].groups_))
        net = nets if len(nets) > 1 else nets[0]
        predicted = predictions(net, X)
        print('Validation RMSE' + (' of the mean of their predictions' if len(nets) > 1 else '')
              + f': {overall_rmse(keypoint_errors(net, X, y, predicted)):.3f} px '
              f'({len(y)} faces)')
        fig = plot_errors(net, X, y, predicted=predicted)
    elif kind == 'flip':
        X, y = load2d(data_dir=data_dir)
        fig = plot_flip(X[0], y[0])
    elif kind == 'tune':
        if len(files) != 1:
            raise KfkdError('plot tune: name one study file (or database URL)')
        if str(files[0]).endswith('.csv'):
            raise KfkdError(f'plot tune {files[0]}: a table of trials; name the study file '
                            f'beside it ({Path(files[0]).with_suffix(".db")})')
        fig = kfkd_settings.plot_tune(files[0])
    else:
        raise KfkdError(f'plot: unknown picture {kind!r}; choose curves, samples, errors, '
                        f'flip or tune')
    _save_figure(fig, Path(out or f'{kind}.png'))


def mirror_axis(text):
    """--mirror-axis: 'measured', or a number of pixels near the image's width."""
    if text == 'measured':
        return text
    try:
        axis = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'measured' or a number such as "
                                         f"96") from None
    if not 90 <= axis <= 102:
        raise argparse.ArgumentTypeError(f'{text}: a mirror axis lies within a few pixels of '
                                         f'the 96-pixel image\'s width (90-102)')
    return axis


def _parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--debug', action='store_true', help='show tracebacks of errors')
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument('--data', metavar='DIR', help='folder with training.csv/test.csv '
                      '(or Kaggle\'s .zip files) and IdLookupTable.csv; default $KFKD_DATA '
                      'or ./data')
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument('--device', default='auto', help='auto (a GPU if there is one), '
                        'cpu, cuda or cuda:N (default: auto)')
    training = argparse.ArgumentParser(add_help=False)
    training.add_argument('--precision', choices=('auto', 'fp32', 'bf16'),
                          help='bf16 autocast or fp32 (default auto: bf16 where the hardware '
                               'has it)')
    training.add_argument('--mirror-axis', type=mirror_axis, metavar='measured|PIXELS',
                          help='mirrored faces\' keypoints go to x -> PIXELS - x; measured: '
                               'measured from the training faces (the default of net8-net10; '
                               "net1-net7 and the specialists keep the tutorial's 96)")

    parser = argparse.ArgumentParser(
        prog='kfkd', parents=[common],
        description='Facial keypoint detection, after Daniel Nouri\'s tutorial. '
                    'Start with `kfkd demo`.')
    parser.add_argument('--version', action='version', version=f'kfkd {__version__}')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)

    groups_help = ('validate on about 20%% of the groups (e.g. people), held out whole: '
                   'a column of training.csv, or a CSV file of row,group (in --data or as '
                   'given)')

    def command(name, help, parents=()):
        return commands.add_parser(name, aliases=[name.replace('_', '-')] if '_' in name else [],
                                   help=help, description=help, parents=[common, *parents])

    p = command('fit', 'train a net on training.csv and save it', (data, device, training))
    p.add_argument('--net', choices=list(NETS),
                   help="net1-net7: the tutorial's nets; net8: one net from every label, with "
                        'augmentation; net9 (default): net8 with a heatmap head; net10: four '
                        "net9s averaged in one net, several times net9's time per epoch on a "
                        'CPU, little more on a GPU (docs/benchmarks.md)')
    p.add_argument('--settings', metavar='FILE',
                   help='train with the settings `kfkd tune` found (its JSON file), for the '
                        'net it names')
    p.add_argument('--out', metavar='FILE', help='model file to write (default: NET.safetensors)')
    p.add_argument('--overwrite', action='store_true',
                   help='replace the model file --out names; without it, kfkd fit refuses '
                        'to start where that file exists')
    p.add_argument('--max-epochs', type=int, metavar='N', help="override the net's max_epochs")
    p.add_argument('--lr', type=float, help="override the net's (first) learning rate")
    p.add_argument('--seed', type=int, default=42, help='random seed (default: 42)')
    p.add_argument('--time-budget', type=float, metavar='SECONDS',
                   help='stop training in time, keeping the best weights')
    p.add_argument('--groups', metavar='COLUMN|FILE', help=groups_help)
    p.add_argument('--resume', action='store_true',
                   help='continue the interrupted run saved in --out')
    p.set_defaults(run=lambda a: fit(a.net, a.data, a.out, a.max_epochs, a.device, a.seed,
                                     a.precision, a.lr, a.resume, a.time_budget, a.groups,
                                     a.mirror_axis, a.settings, a.overwrite))

    p = command('fit_specialists', 'train the six specialists of SPECIALIST_SETTINGS, '
                'optionally pre-trained from a net, and save them in one file',
                (data, device, training))
    p.add_argument('--pretrain', metavar='MODEL',
                   help='model file from kfkd fit (net6/net7) to start each specialist from')
    p.add_argument('--out', metavar='FILE', default='specialists.safetensors',
                   help='specialists file to write (default: specialists.safetensors)')
    p.add_argument('--overwrite', action='store_true',
                   help='replace the file --out names; without it (or --resume), '
                        'fit_specialists refuses to start where that file exists')
    p.add_argument('--max-epochs', type=int, metavar='N',
                   help='train each specialist for N epochs instead of int(4e6 / rows)')
    p.add_argument('--epochs-scale', type=float, default=1.0, metavar='F',
                   help='scale the int(4e6 / rows) rule by F (default: 1)')
    p.add_argument('--jobs', type=int, default=1, metavar='N',
                   help='train N specialists at once, in separate processes (default: 1)')
    p.add_argument('--dask', metavar='ADDRESS',
                   help="run the jobs on a Dask cluster: a scheduler address, or 'local'")
    p.add_argument('--seed', type=int, default=42, help='random seed (default: 42)')
    p.add_argument('--groups', metavar='COLUMN|FILE', help=groups_help)
    p.add_argument('--resume', action='store_true',
                   help='train only the specialists that --out does not hold yet')
    p.add_argument('--settings', metavar='FILE',
                   help="each specialist's settings as `kfkd tune --specialists` found them "
                        "(its JSON file), in place of SPECIALIST_SETTINGS' kwargs")
    p.set_defaults(run=lambda a: specialists(a.pretrain, a.data, a.out, a.max_epochs,
                                             a.epochs_scale, a.jobs, a.device, a.seed, a.resume,
                                             a.dask, a.groups, a.precision, a.mirror_axis,
                                             a.settings, a.overwrite))

    p = command('tune', "search a net's settings, or each specialist's, for the lowest "
                'validation RMSE: Optuna proposes them and stops poor trials early; the '
                'trials run here one after another or on a Dask cluster; the study is kept '
                "in a SQLite file (pip install 'kfkd[tune]')", (data, device))
    p.add_argument('--net', choices=list(NETS), help='the net to search (default: net9)')
    p.add_argument('--specialists', action='store_true',
                   help="search each of net7's six specialists' settings instead, a study each")
    p.add_argument('--param', action='append', metavar='NAME=RANGE',
                   help='a setting to search, named as set_params names it: NAME=LOW:HIGH, '
                        'NAME=LOW:HIGH:log or NAME=A,B,C (repeat for more). Default: '
                        f'{" ".join(kfkd_settings.NET_SPACE)}; with --specialists '
                        f'{" ".join(kfkd_settings.SPECIALIST_SPACE)}')
    p.add_argument('--groups', metavar='COLUMN|FILE', help=groups_help)
    p.add_argument('--trials', type=int, metavar='N',
                   help='finished trials per study (default: 20, or as many as --budget allows)')
    p.add_argument('--budget', type=float, metavar='SECONDS',
                   help='stop starting trials when one would end past this many seconds')
    p.add_argument('--trial-budget', type=float, metavar='SECONDS',
                   help='train each trial for this long (default: 60)')
    p.add_argument('--study', metavar='FILE|URL',
                   help='SQLite file of the search (default: tune-NET.db), or a database URL; '
                        'on a Dask cluster its scheduler opens it')
    p.add_argument('--out', metavar='FILE',
                   help='best settings, for fit --settings (default: tune-NET.json)')
    p.add_argument('--dask', metavar='ADDRESS',
                   help="run the trials on a Dask cluster: a scheduler address, or 'local'")
    p.add_argument('--pretrain', metavar='MODEL',
                   help='--specialists: model file (net7) to start each specialist from')
    p.add_argument('--precision', choices=('auto', 'fp32', 'bf16'),
                   help='bf16 autocast or fp32 (default auto: bf16 where the hardware has it)')
    p.add_argument('--seed', type=int, help='random seed of the sampler and every trial '
                   '(default: 42)')
    p.add_argument('--resume', action='store_true',
                   help='go on with the search in --study, to --trials finished trials')
    p.set_defaults(run=lambda a: kfkd_tune.tune(
        name=a.net, specialists=a.specialists, params=a.param, data_dir=a.data, groups=a.groups,
        study=a.study, out=a.out, trials=a.trials, budget=a.budget, trial_budget=a.trial_budget,
        dask=a.dask, device=a.device, seed=a.seed, resume=a.resume, pretrain=a.pretrain,
        precision=a.precision))

    p = command('submit', "predict test.csv and write Kaggle's RowId,Location submission",
                (data, device))
    p.add_argument('models', nargs='+', metavar='MODEL',
                   help='a model or specialists file; several: the mean of their predictions '
                        '(nets trained with different --seed make different mistakes)')
    p.add_argument('--out', metavar='FILE',
                   help='submission to write (default: submission-TIMESTAMP.csv)')
    p.set_defaults(run=lambda a: submit(
        [read_model(path, resolve_device(a.device)) for path in a.models], a.data, a.out))

    p = command('predict', 'find the faces on photos (jpg, png, any size) and videos, or '
                'from a camera, and predict their keypoints, how sure of each, and the '
                "head's pose: for photos keypoints.csv, "
                'keypoints.json and an overlay PNG per photo; for a video (or camera) '
                'NAME-keypoints.mp4, NAME-keypoints.csv and NAME-keypoints.jsonl, a row per '
                'face per frame (inputs of the same name from different folders go into '
                'subfolders, never over each other)', (device,))
    p.add_argument('photos', nargs='*', metavar='PHOTO|VIDEO',
                   help='a photo or video, a folder of them, or a pattern such as '
                        '"photos/*.jpg" (videos are told by their content)')
    p.add_argument('--camera', type=int, metavar='N',
                   help='also keypoints from camera number N, until Ctrl-C')
    p.add_argument('--no-smooth', dest='smooth', action='store_false',
                   help="video: each frame's keypoints as they are, not smoothed over time")
    p.add_argument('--detect-every', type=int, metavar='N',
                   help='video: look for faces on the whole frame every N frames (and on '
                        'every frame while none is followed); in between, follow them by '
                        'their keypoints, checking each on every frame (default: 10)')
    p.add_argument('--model', metavar='FILE',
                   help="model or specialists file (default: kfkd's pretrained net9, "
                        'docs/model-card.md)')
    p.add_argument('--detector', choices=list(kfkd_detect.DETECTORS), default='yunet',
                   help="yunet (default: OpenCV's YuNet, shipped with kfkd; finds turned "
                        "faces), or haar (OpenCV 4's frontal-face cascade)")
    p.add_argument('--draw-pose', dest='draw_poses', action='store_true',
                   help="draw each head's axes (yaw, pitch and roll are in the rows anyway)")
    p.add_argument('--out', metavar='DIR', default='.', help='where to write (default: .)')
    p.add_argument('--backend', choices=('pytorch', 'onnxruntime', 'opencv'), default='pytorch',
                   help="pytorch (default), or onnxruntime or opencv (OpenCV's DNN module) with "
                        "a --model from `kfkd export` (pip install 'kfkd[onnx]')")
    p.set_defaults(run=lambda a: predict(a.photos, a.model, a.out, a.device, a.backend,
                                         a.camera, a.smooth, a.detect_every, a.detector,
                                         a.draw_poses))

    p = command('export', 'write a model file as ONNX, for onnxruntime, OpenCV and other '
                'runtimes: faces (n, 1, 96, 96) in, keypoints in pixels and their '
                'confidences out (specialists: one file)',
                (device,))
    p.add_argument('model', metavar='MODEL', nargs='?',
                   help="a model or specialists file (default: kfkd's pretrained net9)")
    p.add_argument('--out', metavar='FILE', help='ONNX file to write (default: MODEL.onnx)')
    p.add_argument('--overwrite', action='store_true',
                   help='replace the file --out names; without it, export refuses where it exists')
    p.set_defaults(run=lambda a: export(a.model, a.out, a.device, a.overwrite))

    p = command('demo', 'make synthetic demo faces, train on them, submit and score: '
                'the whole job in a few minutes', (device,))
    p.add_argument('--out', metavar='DIR', default='data/demo',
                   help='folder for the demo data and results (default: data/demo)')
    p.set_defaults(run=lambda a: demo(a.out, a.device))

    p = command('download', "fetch the competition's files from Kaggle (pip install "
                "'kfkd[kaggle]' and a Kaggle API token needed)", (data,))
    p.set_defaults(run=lambda a: download(a.data))

    p = command('plot', 'draw a picture as PNG: learning curves of model files, '
                'a model\'s predictions on test faces, a net\'s errors per keypoint and its '
                'worst validation faces, the flip illustration, or the trials of a search '
                '(kfkd tune)', (data, device))
    p.add_argument('kind', choices=('curves', 'samples', 'errors', 'flip', 'tune'))
    p.add_argument('files', nargs='*', metavar='FILE',
                   help="model files (errors: several nets, the mean of their predictions); "
                        'tune: a study file (or database URL)')
    p.add_argument('--out', metavar='PNG', help='picture to write (default: KIND.png)')
    p.add_argument('--groups', metavar='COLUMN|FILE',
                   help='errors: validate on these held-out groups (default: those the net '
                        'was trained with)')
    p.set_defaults(run=lambda a: plot(a.kind, a.files, a.data, a.out, a.device, a.groups))

    p = command('plot_learning_curves', 'learning curves of model or specialists files, '
                'as PNG (the tutorial\'s command)')
    p.add_argument('files', nargs='+', metavar='FILE')
    p.add_argument('--out', metavar='PNG', default='learning_curves.png')
    p.set_defaults(run=lambda a: _save_figure(plot_learning_curves(*a.files), Path(a.out)))
    return parser


def in_options(error):
    """An engine's error as the command line says it: a setting by its option."""
    if isinstance(error, SettingError):
        return f'--{error.setting.replace("_", "-")} {error.value}: {error.problem}'
    return str(error)


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        args.run(args)
        return 0
    except KfkdError as e:
        if args.debug:
            raise
        print(f'kfkd: error: {in_options(e)}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print('kfkd: interrupted', file=sys.stderr)
        return 130
    except (MemoryError, torch.OutOfMemoryError) as e:
        if args.debug:
            raise
        where = ' on the GPU' if isinstance(e, torch.OutOfMemoryError) else ''
        print(f'kfkd: error: out of memory{where}: close other programs that hold memory'
              f'{", or train on the CPU (--device cpu)" if where else ""}, and try again',
              file=sys.stderr)
        return 1
    except Exception as e:  # a bug, or a failure outside kfkd: say so in one line
        if args.debug:
            raise
        print(f'kfkd: error: {type(e).__name__}: {e} (run with --debug for details)',
              file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())

