"""Beyond the tutorial: net8's masked loss, augmentation, test-time flips,
time budget and validation on held-out groups."""
import re
import types

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from skorch.callbacks import Callback

import kfkd
import kfkd_beyond
import kfkd_cli
import kfkd_engine
import kfkd_io
from conftest import centroid, spots


def test_masked_loss_skips_missing_targets():
    y_pred = torch.tensor([[0.5, 0.2, 0.1], [0.3, -0.4, 0.0]], requires_grad=True)
    y_true = torch.tensor([[0.0, np.nan, 0.1], [np.nan, -0.2, np.nan]])
    loss = kfkd_beyond.MaskedMSELoss()(y_pred, y_true)
    assert loss.item() == pytest.approx((0.5 ** 2 + 0 + 0.2 ** 2) / 3)
    loss.backward()
    assert torch.equal(y_pred.grad == 0, torch.isnan(y_true) | (y_pred == y_true).detach())


@pytest.mark.parametrize('label_offset, axis', [(0.0, 96.0), (0.75, 97.5)])
def test_augmentation_moves_keypoints_exactly_with_the_image(label_offset, axis):
    """One keypoint (the subject's left eye centre), all others missing: after
    augmentation its spot sits where the targets say, and on mirrored faces the
    target has moved to the right eye's columns. Labels 0.75 px right of the
    left-edge count mirror about 97.5, and are 0.75 px right of their spot."""
    n, eye = 64, np.array([60.0, 40.0])
    X = torch.as_tensor(np.repeat(spots([eye])[None, None], n, 0))
    y = torch.full((n, 30), float('nan'))
    y[:, 0:2] = torch.as_tensor(kfkd_engine.to_net_scale(eye + [label_offset, 0]))
    dataset = torch.utils.data.TensorDataset(X, y)
    augment = kfkd_beyond.AugmentIterator(dataset, batch_size=n, contrast=0, brightness=0)
    augment.mirror_axis = axis  # as the net sets it
    torch.manual_seed(0)
    Xb, yb = next(iter(augment))
    mirrored = 0
    for i in range(n):
        present = torch.nonzero(~torch.isnan(yb[i])).flatten().tolist()
        assert present in ([0, 1], [2, 3])  # left eye, or right eye if mirrored
        mirrored += present == [2, 3]
        x, y_ = kfkd_engine.to_pixels(yb[i, present].numpy())
        if 4 < x < 92 and 4 < y_ < 92:  # not pushed off the image
            assert centroid(Xb[i, 0].numpy()) == pytest.approx((x - label_offset, y_), abs=0.2)
        if present == [2, 3]:
            assert x < 48  # mirrored: the eye is on the image's left now
    assert 16 < mirrored < 48
    assert not torch.equal(Xb, X)  # the faces did move


def test_augmentation_without_movement_keeps_image_and_targets():
    X = torch.rand(8, 1, 96, 96)
    y = torch.rand(8, 30) * 2 - 1
    still = kfkd_beyond.AugmentIterator(torch.utils.data.TensorDataset(X, y), batch_size=8,
                                        rotate=0, scale=0, shift=0, contrast=0, brightness=0)
    torch.manual_seed(1)
    Xb, yb = next(iter(still))
    mirrored = ~torch.isclose(Xb, X, atol=1e-5).flatten(1).all(1)
    assert torch.allclose(Xb[~mirrored], X[~mirrored], atol=1e-5)
    assert torch.allclose(yb[~mirrored], y[~mirrored], atol=1e-5)
    assert torch.allclose(Xb[mirrored], X[mirrored].flip(-1), atol=1e-5)
    _, flipped = kfkd_engine.mirror(y=y[mirrored], pairs=kfkd.FLIP_INDICES)
    assert torch.allclose(yb[mirrored], flipped, atol=1e-5)


def small_net8(**params):
    return clone(kfkd_beyond.net8).set_params(module__width=4, verbose=0, device='cpu', **params)


@pytest.mark.parametrize('axis', [96.0, 97.5])
def test_test_time_flips_make_predictions_mirror_exact(demo_dir, axis):
    X, _ = kfkd.load2d(test=True, data_dir=demo_dir)
    net = small_net8(mirror_axis=axis).initialize()
    with torch.no_grad():  # a non-zero output layer, so predictions differ by face
        net.module_.output.weight.normal_(0, 0.01)
    mirrored = np.ascontiguousarray(X[:16, ..., ::-1])
    pairs = kfkd_engine.mirror_pairs(kfkd_io.COLUMNS)
    assert np.allclose(net.predict(mirrored),
                       kfkd_engine.mirror(y=net.predict(X[:16]), pairs=pairs, axis=axis)[1],
                       atol=1e-5)
    one_way = net.set_params(test_flip=False).predict(X[:16])
    assert not np.allclose(net.predict(mirrored),
                           kfkd_engine.mirror(y=one_way, pairs=pairs, axis=axis)[1], atol=1e-5)


def test_moved_faces_keep_their_pixels_and_repeat_the_edges():
    face = np.arange(96 * 96, dtype=np.float32).reshape(1, 96, 96)
    right_down = kfkd_engine.moved(face, 3, 2)
    assert np.array_equal(right_down[0, 2:, 3:], face[0, :-2, :-3])
    assert np.array_equal(right_down[0, :2, 3:], np.repeat(face[0, :1, :-3], 2, axis=0))
    assert np.array_equal(kfkd_engine.moved(face, -3, -2)[0, :-2, :-3], face[0, 2:, 3:])
    with pytest.raises(ValueError, match='shaped'):
        kfkd_engine.moved(face.reshape(1, -1), 1, 0)


def test_test_time_shifts_move_each_views_keypoints_back():
    """A predictor that finds a spot wherever it is gives the same keypoint in
    all nine views, moved back: the shifts' mean is where the spot is."""
    point = np.array([40.3, 51.7])
    faces = spots(point)[None, None]

    def find_spot(X):
        return kfkd_engine.to_net_scale(np.array([centroid(face[0]) for face in X]))
    averaged = kfkd_engine.shift_averaged(find_spot, faces, 6)
    assert np.allclose(kfkd_engine.to_pixels(averaged), [point], atol=0.01)
    views = [find_spot(kfkd_engine.moved(faces, dx, 0)) for dx in (-6, 6)]
    assert not np.allclose(views[0], views[1], atol=0.01)  # the views do differ
    with pytest.raises(ValueError, match='whole pixels'):
        kfkd_engine.shift_averaged(find_spot, faces, 2.5)


def test_a_nets_test_time_shifts_are_the_mean_of_nine_views(demo_dir):
    X, _ = kfkd.load2d(test=True, data_dir=demo_dir)
    torch.manual_seed(0)
    net = small_net8(test_flip=False, test_shifts=0, mirror_axis=96.0).initialize()
    with torch.no_grad():  # predictions that differ by face, and by view
        net.module_.output.weight.normal_(0, 1)
    views = []
    for dy in (-4, 0, 4):
        for dx in (-4, 0, 4):
            y = net.predict(kfkd_engine.moved(X[:8], dx, dy))
            views.append(y - np.tile([dx, dy], 15) / kfkd_engine.HALF)
    shifted = net.set_params(test_shifts=4).predict(X[:8])
    assert np.allclose(shifted, np.mean(views, 0), atol=1e-5)
    assert np.abs(shifted - views[4]).mean() > 1e-3  # the views do differ
    with pytest.raises(ValueError, match='whole pixels'):  # before training, not after
        small_net8(test_shifts=2.5, max_epochs=1000).fit(X[:8], np.zeros((8, 30), np.float32))


@pytest.fixture()
def grouped(demo_dir, tmp_path):
    """The demo data's first 240 training rows with a groups file: each of 40
    'people' has 6 consecutive rows."""
    lines = (demo_dir / 'training.csv').read_bytes().split(b'\n')
    (tmp_path / 'training.csv').write_bytes(b'\n'.join(lines[:241]) + b'\n')
    for name in ('test.csv', 'IdLookupTable.csv'):
        (tmp_path / name).symlink_to(demo_dir / name)
    pd.DataFrame({'row': range(240), 'person': np.arange(240) // 6}).to_csv(
        tmp_path / 'groups.csv', index=False)
    return tmp_path


def test_net8_trains_on_every_row_and_validates_on_held_out_groups(grouped, monkeypatch):
    monkeypatch.setattr(kfkd_beyond, 'net8', small_net8(max_epochs=2))
    net = kfkd_cli.fit('net8', grouped, grouped / 'net8.safetensors', device='cpu',
                       groups='groups.csv')
    X, y, groups = kfkd.load2d(data_dir=grouped, dropna=False, groups='groups.csv')
    assert len(X) == 240 and np.isnan(y).any()  # rows with missing targets are in
    assert np.isfinite(net.history[:, 'valid_loss']).all()
    train, valid = net.train_split(torch.utils.data.TensorDataset(torch.as_tensor(y)))
    assert not set(groups[train.indices]) & set(groups[valid.indices])
    assert 4 <= len(set(groups[valid.indices])) <= 12  # about 20% of the 40 people
    # the same people are held out when only complete rows are loaded (net1-net7)
    _, y_complete, complete_groups = kfkd.load(data_dir=grouped, groups='groups.csv')
    _, valid_complete = kfkd_engine.GroupSplit(complete_groups)(
        torch.utils.data.TensorDataset(torch.as_tensor(y_complete)))
    assert set(complete_groups[valid_complete.indices]) <= set(groups[valid.indices])
    assert set(complete_groups) - set(complete_groups[valid_complete.indices]) <= set(
        groups[train.indices])
    saved = kfkd_engine.load_net(grouped / 'net8.safetensors', 'cpu')
    assert saved.test_flip and np.array_equal(saved.predict(X[:4]), net.predict(X[:4]))


def test_a_resumed_run_validates_on_the_same_groups(grouped):
    out = grouped / 'net1.safetensors'
    net = kfkd_cli.fit('net1', grouped, out, max_epochs=1, device='cpu', groups='groups.csv')
    kfkd_engine.save_net(net, out, 'net1', resume=True)  # as a checkpoint mid-run would
    resumed = kfkd_cli.fit(data_dir=grouped, out=out, max_epochs=2, device='cpu', resume=True)
    assert isinstance(resumed.train_split, kfkd_engine.GroupSplit) and len(resumed.history) == 2


def test_groups_that_do_not_fit(grouped):
    with pytest.raises(kfkd_io.KfkdError, match='neither a column of training.csv nor a file'):
        kfkd.load(data_dir=grouped, groups='people.csv')
    pd.DataFrame({'row': range(10), 'person': 0}).to_csv(grouped / 'few.csv', index=False)
    with pytest.raises(kfkd_io.KfkdError, match='no group for training row 10'):
        kfkd.load(data_dir=grouped, groups='few.csv')


class Record(Callback):
    """Records what `what(net)` is at the end of each batch or epoch."""

    def __init__(self, what, when='on_epoch_end'):
        self.what, self.values = what, []
        setattr(self, when, lambda net, **kwargs: self.values.append(what(net)))


class Clock(Callback):
    """A clock that training batches move on, in place of the wall clock: each
    batch of epoch k (0-based) takes batch_seconds[k % len(batch_seconds)]
    seconds. It reads as time.monotonic for the engine, and records each
    epoch's 'dur' in place of skorch's EpochTimer."""

    def __init__(self, batch_seconds):
        self.batch_seconds = batch_seconds

    def initialize(self):
        self.now_ = 0.0
        return self

    def monotonic(self):
        return self.now_

    def on_epoch_begin(self, net, **kwargs):
        self.epoch_started_ = self.now_

    def on_batch_end(self, net, training, **kwargs):
        if training:
            self.now_ += self.batch_seconds[(len(net.history) - 1) % len(self.batch_seconds)]

    def on_epoch_end(self, net, **kwargs):
        net.history.record('dur', self.now_ - self.epoch_started_)


def test_time_budget_stops_in_time_and_the_schedule_fits_it(demo_dir, capsys, monkeypatch):
    """Epochs of one batch that take 0.1 and 0.3 s in turn, a budget of 2.1 s:
    after epoch 9 (1.7 s so far) the last epoch's length predicts 1.8 s, so
    epoch 10 runs; after it (2.0 s) the prediction is 2.3 s, and it stops."""
    X, y = kfkd.load(data_dir=demo_dir)
    clock = Clock(batch_seconds=[0.1, 0.3])
    monkeypatch.setattr(kfkd_engine.estimator, 'time',
                        types.SimpleNamespace(monotonic=clock.monotonic))
    progress = Record(lambda net: net.progress())
    net = clone(kfkd.net1).set_params(time_budget=2.1, max_epochs=100_000, device='cpu',
                                      batch_size=len(X), callbacks=[progress],
                                      callbacks__epoch_timer=clock)
    net.fit(X, y)
    durations = net.history[:, 'dur']
    assert durations == pytest.approx([0.1, 0.3] * 5)
    # each epoch started only where the one before it, run again, would end within the budget
    assert all(sum(durations[:k]) + durations[k - 1] <= 2.1 for k in range(1, len(durations)))
    assert sum(durations) + durations[-1] > 2.1
    assert 'another epoch would pass the time budget of 2.1 s' in capsys.readouterr().out
    # schedules run over the budget: from its start to its end
    assert progress.values == pytest.approx(np.cumsum(durations) / 2.1)
    assert progress.values[0] < 0.5 and progress.values[-1] > 0.9


def test_cosine_schedule_warms_up_then_falls_to_the_end(demo_dir):
    X, y = kfkd.load2d(data_dir=demo_dir, dropna=False)
    lr = Record(lambda net: net.optimizer_.param_groups[0]['lr'], 'on_batch_end')
    net = small_net8(max_epochs=20, callbacks=[kfkd_beyond.CosineSchedule(warmup=0.1), lr])
    net.fit(X[:64], y[:64])
    lrs = lr.values
    assert lrs[0] == pytest.approx(net.lr * 0.01)  # warm-up starts low
    assert max(lrs) == pytest.approx(net.lr, rel=0.05)
    assert lrs[-1] == pytest.approx(net.lr * 0.01)  # and ends low
    assert np.argmax(lrs) < len(lrs) / 4


def test_keypoint_errors_per_keypoint_over_the_rows_that_have_it():
    class Zeros:
        def target_columns(self):
            return kfkd_io.COLUMNS

        def predict(self, X):
            return np.zeros((len(X), 30), np.float32)

    y = np.zeros((2, 30), np.float32)
    y[0, 0] = 3 / 48  # row 0: the left eye's x 3 pixels off
    y[1, 0:2] = np.nan  # row 1 has no left eye
    errors = kfkd_beyond.keypoint_errors(Zeros(), np.zeros((2, 9216), np.float32), y)
    assert list(errors.index) == [c[:-2] for c in kfkd_io.COLUMNS[0::2]]
    assert errors.loc['left_eye_center'].tolist() == pytest.approx([np.sqrt(9 / 2), 1])
    assert (errors['RMSE (px)'].iloc[1:] == 0).all() and (errors['rows'].iloc[1:] == 2).all()
    assert kfkd_beyond.overall_rmse(errors) == pytest.approx(np.sqrt(9 / 58))


def test_fit_prints_each_keypoints_error_and_plot_errors_draws_them(grouped, monkeypatch,
                                                                   capsys):
    monkeypatch.setattr(kfkd_beyond, 'net8', small_net8(max_epochs=1))
    out = grouped / 'net8.safetensors'
    kfkd_cli.fit('net8', grouped, out, device='cpu', groups='groups.csv')
    printed = capsys.readouterr().out
    assert 'valid RMSE per keypoint' in printed
    assert re.search(r'mouth_center_bottom_lip\s+\d+\.\d{3}\s+\d+', printed)
    assert kfkd_engine.load_net(out, 'cpu').groups_ == 'groups.csv'  # plot errors' default
    png = grouped / 'errors.png'
    kfkd_cli.plot('errors', [out], data_dir=grouped, out=png, device='cpu')
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_plot_errors_of_several_nets_scores_the_mean_of_their_predictions(grouped, monkeypatch,
                                                                          capsys):
    monkeypatch.setattr(kfkd_beyond, 'net8', small_net8(max_epochs=1, test_shifts=0))
    files = [grouped / f'net8-{seed}.safetensors' for seed in (1, 2)]
    for seed, out in zip((1, 2), files):
        kfkd_cli.fit('net8', grouped, out, device='cpu', groups='groups.csv', seed=seed)
    capsys.readouterr()
    passes = []  # with test-time flips a pass is two: each net predicts once
    predict = kfkd_engine.KeypointNet.predict
    with monkeypatch.context() as patch:
        patch.setattr(kfkd_engine.KeypointNet, 'predict',
                      lambda net, X: passes.append(net) or predict(net, X))
        kfkd_cli.plot('errors', files, data_dir=grouped, out=grouped / 'errors.png',
                      device='cpu')
    assert len(passes) == 2
    printed = capsys.readouterr().out
    nets = [kfkd_engine.load_net(out, 'cpu') for out in files]
    X, y = kfkd_beyond.validation_data(
        nets[0], *kfkd_beyond.training_data(nets[0], grouped, 'groups.csv'))
    mean = (nets[0].predict(X) + nets[1].predict(X)) / 2
    rmse = np.sqrt(np.nanmean(((mean - y) * 48) ** 2))
    assert f'of the mean of their predictions: {rmse:.3f} px ({len(y)} faces)' in printed
    assert not np.allclose(nets[0].predict(X), mean, atol=1e-3)
    # nets that validated on other people (here on rows drawn at random) are not averaged
    nets[1].groups_ = None
    kfkd_engine.save_net(nets[1], grouped / 'other.safetensors', 'net8')
    with pytest.raises(kfkd_io.KfkdError, match='validated on different groups'):
        kfkd_cli.plot('errors', [files[0], grouped / 'other.safetensors'], data_dir=grouped,
                      device='cpu')


def test_soft_argmax_finds_a_heatmaps_peak():
    head = kfkd_beyond.SoftArgmax(channels=1, side=24, output_units=2)
    with torch.no_grad():
        head.conv.weight.fill_(1)
        head.conv.bias.zero_()
    features = torch.zeros(1, 1, 24, 24)
    features[0, 0, 5, 17] = 50  # the cell of row 5, column 17: pixels 68-72 across, 20-24 down
    x, y = head(features)[0, 0].tolist()
    assert (x * 48 + 48, y * 48 + 48) == pytest.approx((70, 22), abs=1e-3)


def test_net9_trains_with_the_measured_mirror_axis_saves_and_predicts_the_same(
        grouped, monkeypatch, capsys):
    monkeypatch.setattr(kfkd_beyond, 'net9', clone(kfkd_beyond.net9).set_params(
        module__width=4, device='cpu', max_epochs=1))
    out = grouped / 'net9.safetensors'
    net = kfkd_cli.fit(data_dir=grouped, out=out, device='cpu', groups='groups.csv')
    assert isinstance(net.module_, kfkd_beyond.HeatmapNet)
    X, y, groups = kfkd.load2d(data_dir=grouped, dropna=False, groups='groups.csv')
    train, _ = net.train_split(torch.utils.data.TensorDataset(torch.as_tensor(y)))
    measured = kfkd_engine.measure_mirror_axis(X[train.indices], y[train.indices])
    assert f'Mirror axis, measured on the training faces: {measured}' in capsys.readouterr().out
    saved = kfkd_engine.load_net(out, 'cpu')
    assert saved.name_ == 'net9'
    assert saved.mirror_axis_ == net.mirror_axis_ == measured.axis  # kept in the model file
    assert saved.mirror_axis == net.mirror_axis == 'measured'  # fit changes no setting
    assert np.array_equal(saved.predict(X[:4]), net.predict(X[:4]))
    assert np.abs(net.predict(X[:4])).max() < 1  # keypoints inside the face
    fresh = clone(kfkd_beyond.net9).set_params(module__width=4, device='cpu').initialize()
    with pytest.raises(ValueError, match='train it first'):
        fresh.predict(X[:4])  # test-time flips need the axis it has not measured yet


def test_net10s_members_are_separate_nets_computed_as_one():
    """HeatmapNet(members=3) is three HeatmapNets in one pass: given three
    separate nets' weights (as earlier kfkd's net10 files held them), it makes
    each one's predictions while training, gives each its own loss's gradient,
    and predicts their mean otherwise."""
    torch.manual_seed(0)
    alone = [kfkd_beyond.HeatmapNet(width=4) for _ in range(3)]
    together = kfkd_beyond.HeatmapNet(width=4, members=3)
    together.load_state_dict(together.upgraded_weights(
        {f'member{i}.{key}': value for i, net in enumerate(alone, 1)
         for key, value in net.state_dict().items()}))
    x, y = torch.rand(2, 1, 96, 96), torch.rand(2, 30) - 0.5
    y[0, 4:] = np.nan
    each, singles = together(x), [net(x) for net in alone]
    assert each.shape == (3, 2, 30)
    assert torch.allclose(each, torch.stack(singles), atol=1e-5)
    loss = kfkd_beyond.MaskedMSELoss()
    assert loss(each, y).item() == pytest.approx(
        np.mean([loss(prediction, y).item() for prediction in each]), rel=1e-5)
    loss(each, y).backward()  # each member's gradient is its own loss's, a third of it
    (loss(singles[1], y) / 3).backward()
    assert torch.allclose(together.output.conv.weight.grad[15:30],
                          alone[1].output.conv.weight.grad, atol=1e-6)
    for net in alone + [together]:
        net.eval()
    assert torch.allclose(together(x), torch.stack([net(x) for net in alone]).mean(0),
                          atol=1e-5)


def member_weights(state, members, member):
    """Member `member`'s weights in HeatmapNet(members=...)'s state dict `state`."""
    return {key: value if value.ndim == 0 else value.chunk(members)[member]
            for key, value in state.items()}


def test_net10_trains_saves_and_predicts_the_mean_of_its_members(grouped, monkeypatch):
    monkeypatch.setattr(kfkd_beyond, 'net10', clone(kfkd_beyond.net10).set_params(
        module__members=2, module__width=4, verbose=0, device='cpu', max_epochs=1,
        precision='fp32'))
    out = grouped / 'net10.safetensors'
    net = kfkd_cli.fit('net10', data_dir=grouped, out=out, device='cpu', groups='groups.csv')
    X, _ = kfkd.load2d(data_dir=grouped, dropna=False)
    saved = kfkd_engine.load_net(out, 'cpu')
    assert saved.module_.members == 2 and saved.name_ == 'net10'
    assert saved.mirror_axis_ == net.mirror_axis_ != 96
    assert np.array_equal(saved.predict(X[:4]), net.predict(X[:4]))
    members = []
    for member in range(2):
        alone = clone(kfkd_beyond.net9).set_params(
            module__width=4, device='cpu', precision='fp32', test_flip=saved.test_flip,
            mirror_axis=saved.mirror_axis_).initialize()
        alone.module_.load_state_dict(member_weights(saved.module_.state_dict(), 2, member))
        members.append(alone.predict(X[:4]))
    assert not np.allclose(*members)  # each from its own random start
    assert np.allclose(saved.predict(X[:4]), np.mean(members, 0), atol=1e-5)
