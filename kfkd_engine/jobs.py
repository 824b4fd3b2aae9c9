"""Several nets at once: in processes here (joblib), one per GPU, or on a Dask cluster."""
import contextlib
import io
import os
import time

import torch

from kfkd_engine.estimator import best_epoch, progress_bar, rmse_pixels
from kfkd_engine.model_files import kept_weights, model_entry, restore_net
from kfkd_io import KfkdError, SettingError


def fit_in_jobs(fit_one, tasks, jobs=1, dask=None, device='cpu'):
    """Train a net for each (seed, task) of `tasks`: fit_one(task, device,
    verbose) returns it trained. Yields each as it finishes, rebuilt here from what its
    model file would hold, under a progress bar, with a line on how it went.

    With `jobs` > 1 that many train at once, in separate processes (joblib):
    the cores are shared out so that they are not oversubscribed, each takes a
    GPU of its own where there are several, and each trains quietly. With
    `dask` (a scheduler's address, or 'local' for a cluster started here) the
    jobs run on a Dask cluster instead. Each task's torch seed is its own, so
    one job or many give the same nets.
    """
    import joblib
    parallel = jobs > 1 or dask
    threads = max(1, (os.cpu_count() or 1) // jobs) if parallel and not dask else None
    with dask_backend(dask), progress_bar(total=len(tasks), unit='net') as bar:
        if parallel:
            results = joblib.Parallel(n_jobs=jobs, return_as='generator_unordered')(
                joblib.delayed(_job)(fit_one, i, seed, task, device, threads, verbose=False)
                for i, (seed, task) in enumerate(tasks))
        else:
            results = (_job(fit_one, i, seed, task, device, threads, verbose=True)
                       for i, (seed, task) in enumerate(tasks))
        for entry, weights, seconds, notes in results:
            net = restore_net(entry, weights, f'the job training {entry["name"]}', device)
            vars(net).update(notes)
            bar.update()
            bar.write(_job_line(net, seconds))
            yield net


def _job(fit_one, index, seed, task, device, threads, verbose):
    """Train one net (in a job's process, or here); returns what its model
    file would hold, which is less to send back than the whole net."""
    if threads:
        torch.set_num_threads(threads)
    if torch.device(device).type == 'cuda' and torch.cuda.device_count() > 1:
        device = f'cuda:{index % torch.cuda.device_count()}'
    torch.manual_seed(seed)
    started = time.monotonic()
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
        net = fit_one(task, device, verbose)
    entry, weights = model_entry(net, kept_weights(net))
    if net.diverged_:
        raise KfkdError(f'{entry["name"]} for {", ".join(net.columns_)}: {net.diverged_}')
    notes = {key: getattr(net, key) for key in ('rows_', 'pretrained_') if hasattr(net, key)}
    return entry, {k: v.cpu() for k, v in weights.items()}, time.monotonic() - started, notes


def _job_line(net, seconds):
    best = best_epoch(net.history)
    valid = 'no valid RMSE' if best is None else (f'best valid RMSE '
        f'{rmse_pixels(net.history[best, "valid_loss"]):.3f} px (epoch {best + 1})')
    rows = f'{net.rows_} rows, ' if hasattr(net, 'rows_') else ''
    pretrained = getattr(net, 'pretrained_', None)
    return (f'{net.columns_[0]} ({len(net.columns_)} cols): {rows}{len(net.history)} of '
            f'{net.max_epochs} epochs, {valid}, {seconds:.0f} s' +
            (f'; pre-trained {", ".join(pretrained)}' if pretrained else ''))


@contextlib.contextmanager
def dask_client(address):
    """A client of the Dask cluster at `address` ('local': one started here,
    a worker process per core)."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise SettingError('dask', address, "Dask is not installed: pip install 'kfkd[dask]'"
                           ) from None
    cluster = LocalCluster(processes=True, threads_per_worker=1) if address == 'local' else None
    try:
        try:
            client = Client(cluster or address)
        except OSError as e:
            raise SettingError('dask', address, 'cannot reach a Dask scheduler there; start '
                               'one (`dask scheduler`) or check the address') from e
        with client:
            yield client
    finally:
        if cluster:
            cluster.close()


@contextlib.contextmanager
def dask_backend(address):
    """joblib's dask backend on the cluster at `address` (see dask_client)."""
    if not address:
        yield
        return
    import joblib
    with dask_client(address) as client, joblib.parallel_backend('dask'):
        print(f'Training on the Dask cluster at {client.scheduler.address}')
        yield

