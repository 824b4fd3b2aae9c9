"""Seconds per epoch: kfkd against a plain PyTorch loop, side by side in one run.

    python bench/epochs.py [--nets net1,net2,net7,net9,net10] [--device auto] [--precision auto]

Each net trains on 2140 random faces, the size of Kaggle's complete rows: 1712
training and 428 validation rows, each net in its own batches (the table's
`batch` column: the tutorial's 128, kfkd's nets their own).
The plain loop is what one would write by hand with the best settings: the
same module, data on the device, slices of a random permutation, channels-last
and bf16 autocast where they pay, the loss summed on the device. Runs alternate
(kfkd, plain, kfkd, ...) so that both see the same machine; the table gives
medians and the ratio. kfkd's own nets (net8-net10: augmentation, a masked
loss) have no plain twin; with net9 and net10 both timed, the table ends with
net10's epoch in net9's (its four members in one pass: at most 3). On a GPU,
where kfkd records its training step as a CUDA graph, kfkd's eager step
(capture=False) is timed in the same turns too (the `eager` column).
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.base import clone

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kfkd  # noqa: E402  (after the path, so the repo's kfkd runs without installing)
import kfkd_engine  # noqa: E402

TARGETS = {'net1': 0.05, 'net2': 1.6, 'net7': 3.5}  # seconds per epoch on the 2-core CPU


def plain_epochs(name, X, y, epochs, device, dtype):
    """A hand-written training loop for the same module, as fast as we know how."""
    net = kfkd_engine.registered_net(name)
    batch = net.batch_size
    module = net.module(**net.get_params_for('module')).to(device)
    conv = len(module.input_shape) == 3
    if conv:
        module = module.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    flip = net.iterator_train is kfkd.FlipBatchIterator
    swap = list(range(30))
    for a, b in kfkd.FLIP_INDICES:
        swap[a], swap[b] = b, a
    X = torch.as_tensor(X.reshape((-1,) + module.input_shape), device=device)
    y = torch.as_tensor(y, device=device)
    train_X, train_y, valid_X, valid_y = X[428:], y[428:], X[:428], y[:428]
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype is not None)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        module.train()
        order = torch.randperm(len(train_X), device=device)
        total = torch.zeros((), device=device)
        for i in range(0, len(order), batch):
            rows = order[i:i + batch]
            Xb, yb = train_X[rows], train_y[rows]
            if flip:
                half = torch.randperm(len(rows), device=device)[:len(rows) // 2]
                Xb[half] = Xb[half].flip(-1)
                flipped = yb[half][:, swap]
                flipped[:, 0::2] *= -1
                yb[half] = flipped
            with autocast:
                loss = torch.nn.functional.mse_loss(module(Xb).float(), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(rows)
        module.eval()
        valid = torch.zeros((), device=device)
        with torch.no_grad(), autocast:
            for i in range(0, len(valid_X), batch):
                Xb, yb = valid_X[i:i + batch], valid_y[i:i + batch]
                valid += torch.nn.functional.mse_loss(module(Xb).float(), yb) * len(yb)
        (total / len(train_X)).item(), (valid / len(valid_X)).item()  # one sync per epoch
        times.append(time.perf_counter() - start)
    return times


def cpu_name():
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kfkd_epochs(name, X, y, epochs, device, precision, capture='auto'):
    net = clone(kfkd_engine.registered_net(name)).set_params(
        max_epochs=epochs, verbose=0, device=device, precision=precision, lr=0.01, capture=capture,
        mirror_axis=kfkd_engine.MIRROR_AXIS)  # on random faces a measured one means nothing
    if net.callbacks:  # schedules and early stopping off: on random data they would
        net.set_params(callbacks=[])  # change lr, or stop; per batch they cost nothing
    net.fit(X if net.module is kfkd.MLP else X.reshape(-1, 1, 96, 96), y)
    return list(net.history[:, 'dur'])


def timing_setup(parser):
    """Parse the options every timing takes and print what runs where: (args,
    device, autocast dtype or None, machine, X, y of 2140 random faces)."""
    parser.add_argument('--device', default='auto')
    parser.add_argument('--precision', default='auto', choices=('auto', 'fp32', 'bf16'))
    parser.add_argument('--epochs', type=int, default=3, help='timed epochs per run')
    parser.add_argument('--rounds', type=int, default=2, help='runs of each, alternating')
    args = parser.parse_args()
    device = kfkd_engine.resolve_device(args.device)
    dtype = kfkd_engine.KeypointNet(kfkd.MLP, device=device,
                                    precision=args.precision).autocast_dtype
    rng = np.random.default_rng(0)
    X = rng.random((2140, 9216), dtype=np.float32)
    y = rng.uniform(-1, 1, (2140, 30)).astype(np.float32)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # torch's one-time import cost
    machine = (torch.cuda.get_device_name(device) if device.startswith('cuda') else
               f'{cpu_name()}, {torch.get_num_threads()} threads')
    print(f'# {machine}; torch {torch.__version__}; precision '
          f'{"bf16" if dtype else "fp32"}; 1712 + 428 rows\n')
    return args, device, dtype, machine, X, y


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--nets', default='net1,net2,net7')
    parser.add_argument('--json', metavar='FILE', help='also write the results as JSON')
    args, device, dtype, machine, X, y = timing_setup(parser)
    graphs = device.startswith('cuda')  # kfkd's step is recorded there: time its eager one too
    print(f'{"net":6s} {"batch":>5s} {"kfkd s/epoch":>13s} ' +
          (f'{"eager s/epoch":>14s} ' if graphs else '') +
          f'{"plain s/epoch":>14s} {"ratio":>6s} {"CPU target":>11s}')
    results = []
    for name in args.nets.split(','):
        ours, eager, plain = [], [], []
        twin = kfkd_engine.registered_net(name).criterion is torch.nn.MSELoss  # the tutorial's
        for _ in range(args.rounds):  # the first epoch of each run warms up, untimed
            ours += kfkd_epochs(name, X, y, args.epochs + 1, device, args.precision)[1:]
            if graphs:
                eager += kfkd_epochs(name, X, y, args.epochs + 1, device, args.precision,
                                     capture=False)[1:]
            if twin:
                plain += plain_epochs(name, X, y, args.epochs + 1, device, dtype)[1:]
        row = dict(net=name, batch=kfkd_engine.registered_net(name).batch_size,
                   kfkd=statistics.median(ours), eager=statistics.median(eager) if graphs else None,
                   plain=statistics.median(plain) if twin else None, target=TARGETS.get(name))
        row['ratio'] = row['kfkd'] / row['plain'] if twin else None
        results.append(row)
        print(f'{name:6s} {row["batch"]:5d} {row["kfkd"]:13.4f} ' +
              (f'{row["eager"]:14.4f} ' if graphs else '') +
              (f'{row["plain"]:14.4f} {row["ratio"]:6.2f} ' if twin else f'{"":14s} {"":6s} ') +
              f'{row["target"] or "":>11}', flush=True)
    seconds = {row['net']: row['kfkd'] for row in results}
    if {'net9', 'net10'} <= set(seconds):
        print(f'\nnet10 / net9, seconds per epoch: {seconds["net10"] / seconds["net9"]:.2f} '
              f'(four members in one pass; the aim: at most 3)')
    report = dict(machine=machine, torch=torch.__version__, device=device,
                  precision='bf16' if dtype else 'fp32', results=results)
    print('\n' + json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == '__main__':
    main()
