"""Where net9's training step spends its time on a CPU, and what makes it faster.

    python bench/cpu_step.py [--rounds 7]

The step of net9's module alone (a batch of 32, kfkd's settings: channels-last,
bf16 autocast where the CPU has it, AdamW), without augmentation or skorch:
1. split into forward, backward and the optimizer's update;
2. each 3x3 convolution's shape timed alone, forward and backward, with its
   arithmetic rate (GFLOP/s: how near the CPU's peak the convolutions run);
3. ways to make the step faster, timed in turns in one process (medians):
   as kfkd trains, AdamW's fused update, the module under torch.compile.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kfkd_beyond  # noqa: E402  (after the path, so the repo's kfkd runs without installing)
import kfkd_engine  # noqa: E402
from epochs import cpu_name  # noqa: E402

BATCH = 32


def step_function(dtype, fused=False, compiled=False):
    """One training step of a fresh net9 module, as a function of nothing."""
    torch.manual_seed(0)
    module = kfkd_beyond.HeatmapNet().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=1e-4,
                                  fused=fused or None)
    forward = torch.compile(module) if compiled else module
    X = torch.rand(BATCH, 1, 96, 96).contiguous(memory_format=torch.channels_last)
    y = torch.rand(BATCH, 30) * 2 - 1
    loss_function = kfkd_beyond.MaskedMSELoss()
    autocast = kfkd_engine.autocast('cpu', dtype)
    times = {}

    def step():
        start = time.perf_counter()
        optimizer.zero_grad()
        with autocast:
            loss = loss_function(forward(X).float(), y)
        forwarded = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        end = time.perf_counter()
        times.update(forward=forwarded - start, backward=backward - forwarded,
                     optimizer=end - backward)
    return step, times


def median_ms(function, calls):
    for _ in range(3):
        function()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def convolutions(dtype):
    """Each 3x3 convolution net9 repeats (channels, side), forward and backward."""
    print(f'\n{"conv":>12s} {"forward ms":>11s} {"GFLOP/s":>8s} {"backward ms":>12s} '
          f'{"GFLOP/s":>8s}')
    for channels, side in ((16, 48), (32, 24), (64, 12), (128, 6)):
        x = torch.randn(BATCH, channels, side, side, dtype=dtype or torch.float32)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(channels, channels, 3, 3, dtype=x.dtype, requires_grad=True)
        w = w.contiguous(memory_format=torch.channels_last)
        grad = torch.randn_like(x)
        forward = median_ms(lambda: F.conv2d(x, w, padding=1), 30)
        both = median_ms(lambda: torch.autograd.grad(F.conv2d(x, w, padding=1), (x, w), grad),
                         30)
        flops = 2 * BATCH * channels * channels * 9 * side * side / 1e6  # per ms: GFLOP/s
        print(f'{f"{channels}x{side}x{side}":>12s} {forward:11.2f} {flops / forward:8.0f} '
              f'{both - forward:12.2f} {2 * flops / (both - forward):8.0f}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=7, help='turns of each variant')
    args = parser.parse_args()
    dtype = kfkd_engine.autocast_dtype('auto', 'cpu')
    print(f'# {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; '
          f'{"bf16 autocast" if dtype else "fp32"}; net9 module, batches of {BATCH}')

    step, times = step_function(dtype)
    parts = {key: [] for key in ('forward', 'backward', 'optimizer')}
    for _ in range(40):
        step()
        for key in parts:
            parts[key].append(times[key])
    split = {key: statistics.median(values[10:]) * 1e3 for key, values in parts.items()}
    print('\nstep: ' + ', '.join(f'{key} {ms:.1f} ms' for key, ms in split.items()) +
          f' (total {sum(split.values()):.1f} ms)')

    convolutions(dtype)

    variants = {'as kfkd trains': step_function(dtype)[0],
                'fused AdamW': step_function(dtype, fused=True)[0],
                'torch.compile': step_function(dtype, compiled=True)[0]}
    samples = {name: [] for name in variants}
    for _ in range(args.rounds):  # in turns, so that each sees the same machine
        for name, function in variants.items():
            samples[name].append(median_ms(function, 10))
    base = statistics.median(samples['as kfkd trains'])
    print(f'\n{"variant":>16s} {"ms/step":>8s} {"speed-up":>9s}')
    for name, values in samples.items():
        print(f'{name:>16s} {statistics.median(values):8.1f} '
              f'{base / statistics.median(values):8.2f}x')


if __name__ == '__main__':
    main()
