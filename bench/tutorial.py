"""The whole tutorial, timed: net1 to net7, then the specialists pre-trained from net7.

    python bench/tutorial.py --data DIR [--device auto] [--epochs-scale 1] [--jobs 1]
                             [--groups COLUMN|FILE] [--out bench-tutorial]

Each net trains for its max_epochs (net7 may stop early), the specialists
for int(4e6 / rows) epochs each, as `kfkd fit_specialists --pretrain
net7.safetensors` does; --epochs-scale shortens all of them alike, for a
machine where the whole run would take too long (a 2-core CPU: days). Prints
a table of wall times and best validation RMSE, then JSON; each step's own
output goes to a log in --out. The target: all of it within 30 minutes on one
H100 (the tutorial: the specialists alone took "half a day" on a 2014 GPU).
"""
import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kfkd  # noqa: E402  (after the path, so the repo's kfkd runs without installing)
import kfkd_cli  # noqa: E402
import kfkd_engine  # noqa: E402

TUTORIAL = ('net1', 'net2', 'net3', 'net4', 'net5', 'net6', 'net7')


def best_valid_mse(net):
    return float(np.nanmin([row.get('valid_loss', np.nan) for row in net.history]))


def logged(path, call):
    """call(), its printed output going to the file `path`; and its wall time."""
    with open(path, 'w') as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        started = time.perf_counter()
        result = call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return result, time.perf_counter() - started


def step_row(step, epochs, seconds, valid_mse):
    """One step's figures, printed as a row of the table as it finishes."""
    row = dict(step=step, epochs=epochs, seconds=seconds,
               valid_px=kfkd_engine.rmse_pixels(valid_mse))
    print(f'{step:12s} {epochs:7d} {seconds:9.1f} {seconds / epochs:8.3f} '
          f'{row["valid_px"]:9.3f}', flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', metavar='DIR',
                        help='training data (default: $KFKD_DATA or ./data)')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--epochs-scale', type=float, default=1.0, metavar='F')
    parser.add_argument('--jobs', type=int, default=1, help='specialists trained at once')
    parser.add_argument('--groups', metavar='COLUMN|FILE', help='validate on held-out groups')
    parser.add_argument('--out', default='bench-tutorial', metavar='DIR',
                        help='where the models and logs go (default: bench-tutorial)')
    parser.add_argument('--json', metavar='FILE', help='also write the results as JSON')
    args = parser.parse_args()
    device = kfkd_engine.resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = torch.cuda.get_device_name(device) if device.startswith('cuda') else 'CPU'
    print(f'# {machine}, torch {torch.__version__}, epochs x {args.epochs_scale:g}; '
          f'logs in {out}\n')
    print(f'{"step":12s} {"epochs":>7s} {"seconds":>9s} {"s/epoch":>8s} {"valid px":>9s}')
    rows, total = [], 0.0
    for name in TUTORIAL:
        epochs = max(1, round(kfkd_engine.registered_net(name).max_epochs * args.epochs_scale))
        net, seconds = logged(out / f'{name}.log', lambda: kfkd_cli.fit(
            name, args.data, out / f'{name}.safetensors', max_epochs=epochs, device=device,
            groups=args.groups, overwrite=True))  # --out is the benchmark's own folder
        rows.append(step_row(name, len(net.history), seconds, best_valid_mse(net)))
        total += seconds
    specialists, seconds = logged(out / 'specialists.log', lambda: kfkd.fit_specialists(
        out / 'net7.safetensors', args.data, out / 'specialists.safetensors',
        epochs_scale=args.epochs_scale, jobs=args.jobs, device=device, groups=args.groups))
    total += seconds
    # Over all 30 targets: each specialist's mean squared error weighted by its columns.
    mse = sum(best_valid_mse(net) * len(cols) for cols, net in specialists.items()) / 30
    epochs = sum(len(net.history) for net in specialists.values())
    rows.append(step_row('specialists', epochs, seconds, mse))
    print(f'\nall of it: {total:.0f} s ({total / 60:.1f} min)')
    report = dict(machine=machine, torch=torch.__version__, device=device,
                  epochs_scale=args.epochs_scale, total_seconds=total, steps=rows)
    print('\n' + json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == '__main__':
    main()
