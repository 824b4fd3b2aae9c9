"""bf16 autocast against fp32 on real faces: the same training, both ways.

    python bench/precision.py --data DIR [--net net4] [--epochs 40] [--groups FILE]

Trains the net twice from the same seed, once in fp32 and once in bf16
autocast, on the training data in DIR (Kaggle's, or any in its layout), and
prints each epoch's validation RMSE side by side, the best of each, and the
seconds per epoch: whether bf16 is as accurate as fp32 and how much faster.
"""
import argparse
import contextlib
import io
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kfkd_beyond  # noqa: E402  (after the path, so the repo's kfkd runs without installing)
import kfkd_engine  # noqa: E402
import kfkd_io  # noqa: E402


def train(name, precision, X, y, epochs, device, seed, groups):
    torch.manual_seed(seed)
    net = kfkd_engine.build_net(name, {'max_epochs': epochs, 'verbose': 0,
                                       'precision': precision}, device)
    if groups is not None:
        net.set_params(train_split=kfkd_engine.GroupSplit(groups))
    net.fit(X, y)
    return ([kfkd_engine.rmse_pixels(loss) for loss in net.history[:, 'valid_loss']],
            list(net.history[:, 'dur']))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', metavar='DIR',
                        help='training data (default: $KFKD_DATA or ./data)')
    parser.add_argument('--net', default='net4', choices=list(kfkd_engine.NETS))
    parser.add_argument('--epochs', type=int, default=40)
    parser.add_argument('--groups', metavar='COLUMN|FILE', help='validate on held-out groups')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--seed', type=int, default=42)
    parser.add_argument('--json', metavar='FILE', help='also write the results as JSON')
    args = parser.parse_args()
    device = kfkd_engine.resolve_device(args.device)
    net = kfkd_engine.build_net(args.net, device=device).initialize()
    with contextlib.redirect_stdout(io.StringIO()):
        X, y = kfkd_beyond.training_data(net, args.data, args.groups)
    groups = net.train_split.groups if args.groups else None
    print(f'# {args.net}, {len(X)} rows of {args.data or kfkd_io.data_path()}, {args.epochs} '
          f'epochs, {device}, torch {torch.__version__}; native bf16: '
          f'{kfkd_engine.native_bf16(device)}\n')
    runs = {precision: train(args.net, precision, X, y, args.epochs, device, args.seed, groups)
            for precision in ('fp32', 'bf16')}
    print(f'{"epoch":>5s} {"fp32 valid px":>14s} {"bf16 valid px":>14s}')
    for epoch in sorted({0, 1, 4, 9} | set(range(19, args.epochs, 20)) | {args.epochs - 1}):
        if epoch < args.epochs:
            print(f'{epoch + 1:5d} {runs["fp32"][0][epoch]:14.4f} {runs["bf16"][0][epoch]:14.4f}')
    report = {precision: dict(best_valid_px=float(np.nanmin(rmse)),
                              seconds_per_epoch=statistics.median(durations[1:] or durations))
              for precision, (rmse, durations) in runs.items()}
    best, seconds = ([report[p][key] for p in ('fp32', 'bf16')]
                     for key in ('best_valid_px', 'seconds_per_epoch'))
    print(f'\nbest valid RMSE: fp32 {best[0]:.4f} px, bf16 {best[1]:.4f} px '
          f'({best[1] / best[0] - 1:+.2%})')
    print(f'seconds per epoch: fp32 {seconds[0]:.3f}, bf16 {seconds[1]:.3f} '
          f'({seconds[0] / seconds[1]:.2f}x faster)')
    report = dict(net=args.net, epochs=args.epochs, rows=len(X), device=device,
                  torch=torch.__version__, **report)
    print('\n' + json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == '__main__':
    main()
