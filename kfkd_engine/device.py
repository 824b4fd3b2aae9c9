"""Where to train, and in which precision: the device, bfloat16, and glibc's allocator."""
import ctypes
import functools
import sys

import torch

from kfkd_io import SettingError


@functools.cache
def tune_allocator():
    """Stop glibc from handing big buffers back to the OS after every step.

    PyTorch frees and re-allocates its activation buffers each batch; glibc
    returns them to the OS with munmap and page-faults them back in, which slows
    conv training on the CPU severalfold (docs/benchmarks.md). Keeping freed
    memory for reuse fixes it.
    It holds for the whole process, so it is done once, when a net first starts
    training (KeypointNet.on_train_begin), not when kfkd is imported.
    """
    if not sys.platform.startswith('linux'):
        return
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:  # not glibc (musl, ...): nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


def resolve_device(name):
    """'auto' (a GPU if there is one), 'cpu', 'cuda' or 'cuda:N', checked."""
    if name == 'auto':
        return DEVICE
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SettingError('device', name, 'not a device; use auto, cpu or cuda') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SettingError('device', name, f'no CUDA GPU is available to this PyTorch '
                           f'({torch.__version__}); use cpu, or auto to take a GPU only when '
                           f'there is one')
    if device.type not in ('cpu', 'cuda'):
        raise SettingError('device', name, 'kfkd runs on cpu or cuda')
    return name


@functools.lru_cache
def native_bf16(device):
    """Whether `device` computes in bfloat16 natively (so autocast pays off)."""
    if torch.device(device).type == 'cuda':
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu  # private helpers; absent in some builds: then assume no
    return any(getattr(cpu, name, lambda: False)() for name in
               ('_is_avx512_bf16_supported', '_is_amx_tile_supported'))


def autocast_dtype(precision, device):
    """torch.bfloat16 where `precision` ('auto', 'fp32' or 'bf16') means
    bfloat16 autocast on `device` ('auto': where it computes bf16 natively),
    else None (float32)."""
    if precision not in ('auto', 'fp32', 'bf16'):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', not {precision!r}")
    bf16 = precision == 'bf16' or (precision == 'auto' and native_bf16(device))
    return torch.bfloat16 if bf16 else None


def autocast(device, dtype):
    """bfloat16 autocast on `device` where `dtype` (from autocast_dtype) asks for it."""
    return torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype is not None)
