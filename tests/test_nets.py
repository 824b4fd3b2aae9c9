import re

import numpy as np
import pytest
import torch
from sklearn.base import clone
from skorch.callbacks import Callback

import kfkd
import kfkd_engine
import kfkd_io
from conftest import spots


def quiet(net, **params):
    return clone(net).set_params(verbose=0, device='cpu', **params)


def test_net1_fits_predicts_and_clones(demo_dir):
    X, y = kfkd.load(data_dir=demo_dir)
    net = quiet(kfkd.net1, max_epochs=3).fit(X, y)
    assert net.predict(X).shape == y.shape
    assert len(net.history) == 3
    assert clone(net).get_params()['module__hidden_units'] == 100


def test_validation_is_the_first_fifth_of_the_rows():
    dataset = kfkd.net1.get_dataset(np.zeros((2140, 9216), np.float32),
                                    np.zeros((2140, 30), np.float32))
    train, valid = kfkd.net1.train_split(dataset)
    assert len(train) == 1712 and list(valid.indices) == list(range(428))


def test_net2_layer_table_has_the_tutorials_shapes():
    net = quiet(kfkd.net2).initialize()
    table = net.layer_table()
    for shape, outputs in [('(None, 32, 94, 94)', 282752), ('(None, 32, 47, 47)', 70688),
                           ('(None, 64, 46, 46)', 135424), ('(None, 64, 23, 23)', 33856),
                           ('(None, 128, 22, 22)', 61952), ('(None, 128, 11, 11)', 15488),
                           ('(None, 500)', 500), ('(None, 30)', 30)]:
        assert re.search(re.escape(shape) + rf'\s+produces\s+{outputs} outputs', table), shape
    assert '8,051,502 learnable parameters' in table


def test_net1_layer_table():
    table = quiet(kfkd.net1).initialize().layer_table()
    assert re.search(r'DenseLayer\s+\(None, 100\)\s+produces\s+100 outputs', table)


def test_layer_table_columns_line_up_for_every_layer_name():
    table = quiet(kfkd.net7).initialize().layer_table()
    rows = [line for line in table.splitlines() if 'produces' in line]
    assert any('MaxPool2DLayer' in row for row in rows)
    assert len({row.index('produces') for row in rows}) == 1
    assert len({row.index('(None') for row in rows}) == 1


def test_learning_curves_label_the_log_axis_with_plain_numbers(trained_net1):
    fig = kfkd.plot_learning_curves(trained_net1)
    fig.canvas.draw()
    labels = [label.get_text() for label in fig.axes[0].get_yticklabels()]
    assert labels and all(re.fullmatch(r'\d+(\.\d+)?', label) for label in labels), labels


def test_net7_parameter_count():
    net = quiet(kfkd.net7).initialize()
    assert sum(p.numel() for p in net.module_.parameters()) == 16_561_502
    names = [name for name, _ in net.module_.named_children()]
    assert names == ['conv1', 'pool1', 'dropout1', 'conv2', 'pool2', 'dropout2', 'conv3',
                     'pool3', 'dropout3', 'hidden4', 'dropout4', 'hidden5', 'output']


def flip_iterator(X, y, flip_indices=kfkd.FLIP_INDICES):
    dataset = torch.utils.data.TensorDataset(torch.as_tensor(X), torch.as_tensor(y))
    return kfkd.FlipBatchIterator(dataset, batch_size=len(X), flip_indices=flip_indices)


def spot_at(image, x, y, sigma=0.7):
    """(x, y) of the spot around (x, y), and which keypoint's it is (its brightness - 1)."""
    rows, cols = slice(int(y) - 3, int(y) + 4), slice(int(x) - 3, int(x) + 4)
    window = image[rows, cols]
    ys, xs = np.mgrid[rows, cols] + 0.5
    mass = window.sum()
    brightness = mass / (2 * np.pi * sigma ** 2)
    return (xs * window).sum() / mass, (ys * window).sum() / mass, brightness - 1


@pytest.mark.parametrize('label_offset, axis', [(0.0, 96.0), (0.75, 97.5)])
def test_mirror_puts_each_target_on_its_partners_spot(label_offset, axis):
    """Mirrored, each target lies on the spot of its left/right partner
    (right pairs) and exactly where the spot is (right axis): labels that
    count x from the image's left edge mirror about 96, labels 0.75 px to the
    right of that about 97.5. Tensors and arrays alike."""
    keypoints = kfkd_io.MEAN_FACE.reshape(-1).astype(np.float64) + 0.3
    labels = keypoints.copy()
    labels[0::2] += label_offset
    names = [column[:-2] for column in kfkd_io.COLUMNS[0::2]]
    swapped = [name.replace('left', 'LEFT').replace('right', 'left').replace('LEFT', 'right')
               for name in names]
    image = spots(keypoints, 0.7, np.arange(1, 16))[None, None]
    y = kfkd_engine.to_net_scale(labels)[None].astype(np.float32)
    for X_in, y_in in ((image, y), (torch.as_tensor(image), torch.as_tensor(y))):
        X_out, y_out = kfkd_engine.mirror(X_in, y_in, kfkd.FLIP_INDICES, axis)
        X_out, y_out = np.asarray(X_out)[0, 0], kfkd_engine.to_pixels(np.asarray(y_out)[0])
        for k in range(15):
            x, y_, which = spot_at(X_out, y_out[2 * k] - label_offset, y_out[2 * k + 1])
            assert (x + label_offset, y_) == pytest.approx((y_out[2 * k], y_out[2 * k + 1]),
                                                           abs=0.02)
            assert which == pytest.approx(names.index(swapped[k]), abs=0.05)
    assert np.array_equal(image, spots(keypoints, 0.7, np.arange(1, 16))[None, None])  # unchanged


def test_mirroring_flat_rows_is_an_error():
    with pytest.raises(ValueError, match='flat rows'):
        kfkd_engine.mirror(np.zeros((2, 9216), np.float32))


def test_the_tutorials_pairs_are_the_pairs_the_names_make():
    assert kfkd_engine.mirror_pairs(kfkd_io.COLUMNS) == [tuple(p) for p in kfkd.FLIP_INDICES]
    for setting in kfkd.SPECIALIST_SETTINGS:
        assert (kfkd_engine.mirror_pairs(setting['columns']) ==
                [tuple(p) for p in setting['flip_indices']])


def dots(keypoints):
    """A black image with a bright dot on the pixel under each keypoint (in pixels)."""
    image = np.zeros((96, 96), np.float32)
    for x, y in keypoints.reshape(-1, 2):
        image[int(y), int(x)] = 1
    return image


def test_flipped_dots_sit_at_the_flipped_keypoints():
    rng = np.random.default_rng(0)
    keypoints = rng.integers(5, 90, (8, 30)) + 0.5  # pixel centres
    X = np.stack([dots(k) for k in keypoints])[:, None]
    y = ((keypoints - 48) / 48).astype(np.float32)
    Xb, yb = next(iter(flip_iterator(X, y)))
    flipped = [i for i in range(8) if not torch.equal(Xb[i], torch.as_tensor(X[i]))]
    assert len(flipped) == 4  # half the batch
    for i in range(8):
        pixels = yb[i].numpy() * 48 + 48
        assert np.array_equal(dots(pixels), Xb[i, 0].numpy())  # dots follow keypoints
    i = flipped[0]
    pixels = yb[i].numpy() * 48 + 48
    # the subject's left eye of the flipped face is where the right eye was, mirrored
    assert pixels[0] == 96 - keypoints[i, 2] and pixels[1] == keypoints[i, 3]


def test_flip_pairs_map_left_to_right_names():
    for a, b in kfkd.FLIP_INDICES:
        assert kfkd_io.COLUMNS[a].replace('left', 'right') == kfkd_io.COLUMNS[b]


def test_adjust_variable_runs_from_start_to_stop(demo_dir):
    X, y = kfkd.load2d(data_dir=demo_dir)
    net = quiet(kfkd.net4, max_epochs=4, module__hidden_units=(20, 20),
                module__conv_filters=(4, 4, 4))
    net.fit(X[:64], y[:64])
    lrs = net.history[:, 'lr']
    assert lrs[0] == pytest.approx(0.03) and lrs[-1] == pytest.approx(0.0001)
    assert net.history[0, 'momentum'] == pytest.approx(0.9)
    assert net.history[-1, 'momentum'] == pytest.approx(0.999)
    assert net.optimizer_.param_groups[0]['lr'] == pytest.approx(0.0001)


class WorseEachEpoch(Callback):
    """Fakes a validation loss that is best in epoch 2, then worse every epoch."""

    def on_epoch_end(self, net, **kwargs):
        epoch = len(net.history)
        net.history.record('valid_loss', abs(epoch - 2) + 1.0)
        if epoch == 2:
            self.weights_at_best = kfkd_engine.copy_weights(net.module_)


def test_early_stopping_restores_the_best_weights(demo_dir):
    X, y = kfkd.load(data_dir=demo_dir)
    net = quiet(kfkd.net1, max_epochs=20,
                callbacks=[WorseEachEpoch(), kfkd.EarlyStopping(patience=3)])
    net.fit(X, y)
    assert len(net.history) == 6  # best at 2, patience 3: stops in epoch 6
    worse = dict(net.callbacks_)['WorseEachEpoch']  # fit's copy of the callback given
    for name, value in net.module_.state_dict().items():
        assert torch.equal(value, worse.weights_at_best[name])


def test_early_stopping_restores_the_best_weights_at_max_epochs(demo_dir):
    X, y = kfkd.load(data_dir=demo_dir)
    net = quiet(kfkd.net1, max_epochs=4,
                callbacks=[WorseEachEpoch(), kfkd.EarlyStopping(patience=200)])
    net.fit(X, y)
    assert len(net.history) == 4
    worse = dict(net.callbacks_)['WorseEachEpoch']
    for name, value in net.module_.state_dict().items():
        assert torch.equal(value, worse.weights_at_best[name])


def test_a_trained_net_clones(demo_dir, tmp_path):
    """As fit_specialists clones net7 after a notebook has trained it: what
    the callbacks keep while training is not taken for their parameters."""
    X, y = kfkd.load(data_dir=demo_dir)
    callbacks = [kfkd.AdjustVariable('update_learning_rate'), kfkd.EarlyStopping(patience=3),
                 ('checkpoint', kfkd_engine.Checkpoint(tmp_path / 'net1.safetensors', 'net1'))]
    net = quiet(kfkd.net1, max_epochs=2, callbacks=callbacks).fit(X, y)
    assert len(clone(net).fit(X, y).history) == 2


def test_bf16_and_fp32_agree(demo_dir):
    X, y = kfkd.load2d(data_dir=demo_dir)
    net = quiet(kfkd.net2, precision='fp32', module__hidden_units=(50, 50)).initialize()
    fp32 = net.predict(X[:32])
    bf16 = net.set_params(precision='bf16').predict(X[:32])
    assert np.abs(fp32 - bf16).max() < 0.05 and not np.array_equal(fp32, bf16)


def test_kfkd_nets_keep_nolearns_train_history(trained_net1):
    """The tutorial's plotting code reads train_history_, as nolearn kept it."""
    train_loss = np.array([i['train_loss'] for i in trained_net1.train_history_])
    valid_loss = np.array([i['valid_loss'] for i in trained_net1.train_history_])
    assert np.array_equal(train_loss, trained_net1.history[:, 'train_loss'])
    assert np.array_equal(valid_loss, trained_net1.history[:, 'valid_loss'])
    history = trained_net1.train_history_
    assert [row['epoch'] for row in history] == [1, 2, 3, 4, 5]
    assert [row['valid_loss_best'] for row in history] == list(
        valid_loss <= np.minimum.accumulate(np.append(np.inf, valid_loss))[:-1])
