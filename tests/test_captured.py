"""The captured training step (kfkd_engine.batches.CapturedStep): on a CPU it runs without
a graph, so these tests check its maths against skorch's eager step, and that
nothing in it reads back to the host or sends host data (what a CUDA graph
cannot hold)."""
import pytest
import torch
from sklearn.base import clone
from torch.utils._python_dispatch import TorchDispatchMode

import kfkd
import kfkd_beyond
from kfkd_engine import BatchIterator, CapturedStep, batches
from kfkd_engine.model_files import _settings

# The tutorial's kind (SGD with Nesterov momentum, lr and momentum moved each
# epoch, flips) and kfkd's (AdamW, the cosine schedule each batch, augmentation,
# a masked loss), small, in batches that leave a smaller last one.
NETS = {
    'net5': lambda: clone(kfkd.net5).set_params(module__conv_filters=(2, 4, 4),
                                               module__hidden_units=(16, 16)),
    'net9': lambda: clone(kfkd_beyond.net9).set_params(module__width=4, mirror_axis=96),
}


def trained(name, capture, X, y, epochs=2):
    torch.manual_seed(0)
    net = NETS[name]().set_params(capture=capture, max_epochs=epochs, batch_size=16,
                                  device='cpu', precision='fp32', verbose=0)
    return net.fit(X, y)


@pytest.fixture(scope='module')
def faces(tiny):
    return kfkd.load2d(data_dir=tiny)  # 39 complete rows: 31 to train on, 8 to validate


@pytest.mark.parametrize('name', NETS)
def test_the_captured_step_trains_as_the_eager_one(name, faces, monkeypatch):
    eager = trained(name, False, *faces)
    batches = []
    step = CapturedStep.__call__
    monkeypatch.setattr(CapturedStep, '__call__',
                        lambda self, rows: batches.append(len(rows)) or step(self, rows))
    captured = trained(name, True, *faces)
    assert batches == [16, 15] * 2  # every training batch of the 31, the smaller last one too
    assert captured.captured_step_ is None  # let go after fit
    for key in ('train_loss', 'valid_loss'):
        assert captured.history[:, key] == pytest.approx(eager.history[:, key], rel=1e-4)
    for (key, a), b in zip(eager.module_.state_dict().items(),
                           captured.module_.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6), key
    assert captured.optimizer_.param_groups[0]['lr'] == eager.optimizer_.param_groups[0]['lr']
    assert 'capture' not in _settings(captured)  # how it ran, not what it is


class HostTraffic(TorchDispatchMode):
    """Records the operations that on a GPU read a value back to the host
    (.item(), a Python bool of a tensor) or send host data to the device."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('name', NETS)
def test_a_step_neither_reads_back_nor_sends_host_data(name, faces):
    net = trained(name, True, *faces, epochs=1)
    X, y = (torch.as_tensor(a) for a in faces)
    iterator = net.get_iterator(torch.utils.data.TensorDataset(X, y), training=True)
    step = CapturedStep(net, iterator)
    rows = next(iter(iterator.batch_rows()))
    # torch's AdamW reads its step count back unless capturable (on a GPU); SGD's update is kfkd's
    if name == 'net9':
        net.optimizer_.step = lambda: None
    with HostTraffic() as traffic:
        step(rows)
    assert traffic.seen == []


@pytest.mark.parametrize('name, epochs', [('net9', 1), ('net5', 0)])
def test_what_the_warm_up_changes_is_undone(name, epochs, faces):
    """Before recording, a GPU runs a few steps (_record); _restore puts the
    weights and the optimizer's state back, state made by the warm-up zeroed
    (a fresh optimizer's)."""
    if epochs:
        net = trained(name, True, *faces, epochs=epochs)
    else:
        net = NETS[name]().set_params(device='cpu', precision='fp32', verbose=0).initialize()
    weights = {key: value.clone() for key, value in net.module_.state_dict().items()}
    state = {param: {key: value.clone() for key, value in s.items() if torch.is_tensor(value)}
             for param, s in net.optimizer_.state.items()}
    X, y = (torch.as_tensor(a) for a in faces)
    iterator = net.get_iterator(torch.utils.data.TensorDataset(X, y), training=True)
    step, rows = CapturedStep(net, iterator), next(iter(iterator.batch_rows()))
    saved = batches._snapshot(net)
    for _ in range(batches.WARMUP_STEPS):
        step(rows)
    batches._restore(net, saved)
    for key, value in net.module_.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert net.optimizer_.state  # the warm-up made the state a fresh optimizer lacks
    for param, s in net.optimizer_.state.items():
        for key, value in s.items():
            if torch.is_tensor(value):
                expected = state[param][key] if param in state else torch.zeros_like(value)
                assert torch.equal(value, expected), key


class SGDOfMyOwn(torch.optim.SGD):
    """An optimizer kfkd does not know: its step may read values back."""


class BatchesOfMyOwn(BatchIterator):
    """Batches made in __iter__ (as nolearn's iterator makes them, on the host)."""

    def __iter__(self):
        yield from super().__iter__()


def test_capture_says_what_it_cannot_capture(faces):
    net = NETS['net5']().set_params(optimizer=SGDOfMyOwn, max_epochs=1, batch_size=16,
                                    device='cpu', verbose=0)
    with pytest.raises(ValueError, match='SGDOfMyOwn is not one of SGD, Adam, AdamW.*capture='):
        clone(net).set_params(capture=True).fit(*faces)
    assert len(clone(net).set_params(capture='auto').fit(*faces).history) == 1  # eager
    with pytest.raises(ValueError, match='BatchesOfMyOwn makes its own batches'):
        clone(net).set_params(optimizer=torch.optim.SGD, iterator_train=BatchesOfMyOwn,
                              capture=True).fit(*faces)
    with pytest.raises(ValueError, match="capture must be 'auto', True or False"):
        clone(net).set_params(capture='yes').fit(*faces)
