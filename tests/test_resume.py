"""Interrupted training loses nothing: signals, checkpoints, --resume, divergence."""
import signal

import numpy as np
import pytest
from sklearn.base import clone

import kfkd
import kfkd_cli
import kfkd_engine


@pytest.fixture()
def small_net4(monkeypatch):
    """net4 (its learning rate and momentum schedules) with small layers."""
    monkeypatch.setattr(kfkd, 'net4', clone(kfkd.net4).set_params(
        module__conv_filters=(4, 8, 8), module__hidden_units=(32, 32)))


def interrupted_fit(tiny, out, max_epochs, after_epoch, signals, monkeypatch, capsys):
    """Run `kfkd fit --net net4`, whose process receives `signals` SIGTERMs at
    the end of epoch `after_epoch`, before its checkpoint callback runs; it
    must exit as interrupted (130). Returns its stderr."""
    class Signalled(kfkd_engine.Checkpoint):
        def on_epoch_end(self, net, **kwargs):
            if len(net.history) == after_epoch:
                for _ in range(signals):
                    signal.raise_signal(signal.SIGTERM)  # handled before it returns
            super().on_epoch_end(net, **kwargs)
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(kfkd_cli, 'Checkpoint', Signalled)
        code = kfkd_cli.main(['fit', '--net', 'net4', '--data', str(tiny), '--out', str(out),
                              '--max-epochs', str(max_epochs), '--device', 'cpu'])
    err = capsys.readouterr().err
    assert code == 130, err
    return err


def test_sigterm_then_resume_ends_where_an_uninterrupted_run_does(tiny, small_net4, tmp_path,
                                                                  monkeypatch, capsys):
    whole = kfkd_cli.fit('net4', tiny, tmp_path / 'whole.safetensors', max_epochs=8, device='cpu')

    out = tmp_path / 'cut.safetensors'
    err = interrupted_fit(tiny, out, max_epochs=8, after_epoch=3, signals=1,
                          monkeypatch=monkeypatch, capsys=capsys)
    assert 'Continue with: kfkd fit --resume' in err
    stopped = kfkd_engine.load_net(out, 'cpu')
    assert len(stopped.history) == 3 and stopped.resume_

    resumed = kfkd_cli.fit(data_dir=tiny, out=out, device='cpu', resume=True)
    assert len(resumed.history) == len(whole.history) == 8
    for key in ('lr', 'momentum', 'epoch'):
        assert resumed.history[:, key] == pytest.approx(whole.history[:, key])
    for key in ('train_loss', 'valid_loss'):
        assert resumed.history[:, key] == pytest.approx(whole.history[:, key], rel=1e-3)
    assert not kfkd_engine.load_net(out, 'cpu').resume_  # finished: nothing left to resume


def test_checkpoint_holds_the_best_weights_and_the_run_state(tiny, tmp_path):
    out = tmp_path / 'net7.safetensors'
    net = kfkd_engine.build_net('net7', {'max_epochs': 3, 'verbose': 0,
                                         'module__hidden_units': (10, 10)}, device='cpu')
    net.set_params(callbacks=net.callbacks + [kfkd_engine.Checkpoint(out, 'net7', every=0)])
    X, y = kfkd.load2d(data_dir=tiny)
    net.fit(X, y)
    saved = kfkd_engine.load_net(out, 'cpu')
    assert len(saved.history) == 3 and saved.resume_
    best = int(np.argmin(net.history[:, 'valid_loss']))
    stopping = [cb for _, cb in net.callbacks_ if isinstance(cb, kfkd.EarlyStopping)][0]
    assert stopping.best_valid_epoch_ == best + 1
    for name, value in saved.module_.state_dict().items():
        assert np.array_equal(value.numpy(), stopping.best_weights_[name].numpy())


def test_a_diverging_loss_stops_with_the_last_good_weights(tiny, tmp_path, capsys):
    out = tmp_path / 'net1.safetensors'
    code = kfkd_cli.main(['fit', '--net', 'net1', '--data', str(tiny), '--out', str(out),
                          '--lr', '1e6', '--max-epochs', '20', '--device', 'cpu'])
    err = capsys.readouterr().err
    assert code == 1
    assert 'in epoch' in err and 'lower learning rate' in err and len(err.splitlines()) == 1
    net = kfkd_engine.load_net(out, 'cpu')
    assert len(net.history) < 20
    X, _ = kfkd.load(data_dir=tiny)
    assert np.isfinite(net.predict(X)).all()


def test_a_second_signal_stops_at_once_leaving_the_last_checkpoint(tiny, small_net4, tmp_path,
                                                                   monkeypatch, capsys):
    out = tmp_path / 'net4.safetensors'
    # epoch 1 is checkpointed (the first always is); the second signal stops epoch 2's
    err = interrupted_fit(tiny, out, max_epochs=8, after_epoch=2, signals=2,
                          monkeypatch=monkeypatch, capsys=capsys)
    assert 'kfkd: interrupted' in err
    stopped = kfkd_engine.load_net(out, 'cpu')
    assert len(stopped.history) == 1 and stopped.resume_
