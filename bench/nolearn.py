"""Seconds per epoch: the tutorial's own net definitions (kfkd.install_as_nolearn)
against kfkd's nets, side by side in one run.

    python bench/nolearn.py [--device auto] [--precision auto] [--epochs 3] [--rounds 2]

net2: the tutorial's NeuralNet definition of net2 against kfkd.net2 (the same
layers: the ratio is what the compatibility layer costs). net3: the same with
the tutorial's FlipBatchIterator, whose transform() flips batches with numpy
on the host, against kfkd.net3, which flips them on the device. Each trains on
2140 random faces (1712 train, 428 validate), batches of 128; runs alternate
and the table gives medians.
"""
import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kfkd  # noqa: E402  (after the path, so the repo's kfkd runs without installing)
from epochs import kfkd_epochs, timing_setup  # noqa: E402

kfkd.install_as_nolearn()
from lasagne import layers  # noqa: E402
from nolearn.lasagne import BatchIterator, NeuralNet  # noqa: E402


class FlipBatchIterator(BatchIterator):
    """The tutorial's: half of each batch mirrored with numpy, targets swapped."""
    flip_indices = kfkd.FLIP_INDICES

    def transform(self, Xb, yb):
        Xb, yb = super().transform(Xb, yb)
        bs = Xb.shape[0]
        indices = np.random.choice(bs, bs // 2, replace=False)
        Xb[indices] = Xb[indices, :, :, ::-1]
        if yb is not None:
            yb[indices, ::2] = yb[indices, ::2] * -1
            for a, b in self.flip_indices:
                yb[indices, a], yb[indices, b] = yb[indices, b], yb[indices, a]
        return Xb, yb


def tutorial_net(name, epochs):
    """The tutorial's net2 (net3: with FlipBatchIterator), as its definition reads."""
    extra = {'batch_iterator_train': FlipBatchIterator(batch_size=128)} if name == 'net3' else {}
    return NeuralNet(
        layers=[('input', layers.InputLayer), ('conv1', layers.Conv2DLayer),
                ('pool1', layers.MaxPool2DLayer), ('conv2', layers.Conv2DLayer),
                ('pool2', layers.MaxPool2DLayer), ('conv3', layers.Conv2DLayer),
                ('pool3', layers.MaxPool2DLayer), ('hidden4', layers.DenseLayer),
                ('hidden5', layers.DenseLayer), ('output', layers.DenseLayer)],
        input_shape=(None, 1, 96, 96),
        conv1_num_filters=32, conv1_filter_size=(3, 3), pool1_pool_size=(2, 2),
        conv2_num_filters=64, conv2_filter_size=(2, 2), pool2_pool_size=(2, 2),
        conv3_num_filters=128, conv3_filter_size=(2, 2), pool3_pool_size=(2, 2),
        hidden4_num_units=500, hidden5_num_units=500,
        output_num_units=30, output_nonlinearity=None,
        update_learning_rate=0.01, update_momentum=0.9,
        regression=True, max_epochs=epochs, verbose=0, **extra)


def tutorial_epochs(name, X, y, epochs, device, precision):
    net = tutorial_net(name, epochs).initialize()
    net.net_.set_params(device=device, precision=precision).initialize()
    net.fit(X.reshape(-1, 1, 96, 96), y)
    return [row['dur'] for row in net.train_history_]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args, device, _, _, X, y = timing_setup(parser)
    print(f'{"net":6s} {"tutorial s/epoch":>17s} {"kfkd s/epoch":>13s} {"ratio":>6s}')
    for name in ('net2', 'net3'):
        theirs, ours = [], []
        for _ in range(args.rounds):  # the first epoch of each run warms up, untimed
            theirs += tutorial_epochs(name, X, y, args.epochs + 1, device, args.precision)[1:]
            ours += kfkd_epochs(name, X, y, args.epochs + 1, device, args.precision)[1:]
        theirs, ours = statistics.median(theirs), statistics.median(ours)
        print(f'{name:6s} {theirs:17.4f} {ours:13.4f} {theirs / ours:6.2f}', flush=True)


if __name__ == '__main__':
    main()
