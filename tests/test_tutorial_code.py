"""The tutorial's code blocks, in its order, as a reader types them, run on kfkd.

Daniel Nouri's tutorial "Using convolutional neural nets to detect facial
keypoints" (2014) is written for Python 2, Theano, Lasagne and nolearn. With
kfkd.install_as_nolearn() first, its blocks run as written, except where
Python 3 or today's numpy, pandas and matplotlib force a change; each such
line is marked `# today:` (docs/tutorial-code.md lists them). Where a block
says `# ...` for "as the net before", the lines it stands for are filled in
(NET2_LAYERS, NET6, and lines marked `# as before`). The data is the demo set
cut to 150 training rows (conftest's tiny), placed where the tutorial's FTRAIN
and FTEST point (under a temporary $HOME), and every net trains for one epoch
instead of its max_epochs, and keeps no optimizer state or gradients after it
(twenty nets of up to 16 million weights fit in the suite's memory): the code
is what is tested, not the training.

The blocks share one namespace, as they share the reader's kfkd.py, so the
tests run in the tutorial's order.
"""
import gc
import pickle
import shutil
import sys
import textwrap
import types

import pytest

import kfkd
import kfkd_nolearn


@pytest.fixture(scope='module')
def tutorial(tiny, tmp_path_factory):
    """The namespace the blocks run in, with the data where FTRAIN points."""
    home = tmp_path_factory.mktemp('home')
    data = home / 'data' / 'kaggle-facial-keypoint-detection'
    data.mkdir(parents=True)
    for name in ('training.csv', 'test.csv', 'IdLookupTable.csv'):
        shutil.copy(tiny / name, data)
    patch = pytest.MonkeyPatch()
    patch.setenv('HOME', str(home))
    patch.setenv('MPLBACKEND', 'Agg')
    patch.chdir(home)
    fit = kfkd_nolearn.NeuralNet.fit

    def one_epoch(self, X, y):
        self.max_epochs = 1
        fit(self, X, y)
        # no net trains on: its momentum and gradients are just memory
        self.net_.optimizer_.state.clear()
        self.net_.module_.zero_grad(set_to_none=True)
        return self

    patch.setattr(kfkd_nolearn.NeuralNet, 'fit', one_epoch)
    kfkd.install_as_nolearn()
    script = types.ModuleType('kfkd_tutorial')  # the reader's kfkd.py: pickle finds its classes
    patch.setitem(sys.modules, script.__name__, script)
    yield vars(script)
    patch.undo()


def run(namespace, code):
    exec(compile(textwrap.dedent(code), 'tutorial', 'exec'), namespace)
    gc.collect()  # what a block no longer needs (six specialists, say), freed before the next
    return namespace


def test_the_data(tutorial, capsys):
    run(tutorial, '''
        # file kfkd.py
        import os

        import numpy as np
        from pandas.io.parsers import read_csv
        from sklearn.utils import shuffle


        FTRAIN = '~/data/kaggle-facial-keypoint-detection/training.csv'
        FTEST = '~/data/kaggle-facial-keypoint-detection/test.csv'


        def load(test=False, cols=None):
            """Loads data from FTEST if *test* is True, otherwise from FTRAIN.
            Pass a list of *cols* if you're only interested in a subset of the
            target columns.
            """
            fname = FTEST if test else FTRAIN
            df = read_csv(os.path.expanduser(fname))  # load pandas dataframe

            # The Image column has pixel values separated by space; convert
            # the values to numpy arrays:
            df['Image'] = df['Image'].apply(lambda im: np.fromstring(im, sep=' '))

            if cols:  # get a subset of columns
                df = df[list(cols) + ['Image']]

            print(df.count())  # prints the number of values for each column
            df = df.dropna()  # drop all rows that have missing values in them

            X = np.vstack(df['Image'].values) / 255.  # scale pixel values to [0, 1]
            X = X.astype(np.float32)

            if not test:  # only FTRAIN has any target columns
                y = df[df.columns[:-1]].values
                y = (y - 48) / 48  # scale target coordinates to [-1, 1]
                X, y = shuffle(X, y, random_state=42)  # shuffle train data
                y = y.astype(np.float32)
            else:
                y = None

            return X, y


        X, y = load()
        print("X.shape == {}; X.min == {:.3f}; X.max == {:.3f}".format(
            X.shape, X.min(), X.max()))
        print("y.shape == {}; y.min == {:.3f}; y.max == {:.3f}".format(
            y.shape, y.min(), y.max()))
        ''')
    out = capsys.readouterr().out
    assert 'left_eye_center_x' in out and 'X.min == 0.000' in out
    assert tutorial['X'].shape[1] == 9216 and tutorial['y'].shape[1] == 30


def test_first_model_a_single_hidden_layer(tutorial, capsys):
    run(tutorial, '''
        # add to kfkd.py
        from lasagne import layers
        from lasagne.updates import nesterov_momentum
        from nolearn.lasagne import NeuralNet

        net1 = NeuralNet(
            layers=[  # three layers: one hidden layer
                ('input', layers.InputLayer),
                ('hidden', layers.DenseLayer),
                ('output', layers.DenseLayer),
                ],
            # layer parameters:
            input_shape=(None, 9216),  # 96x96 input pixels per batch
            hidden_num_units=100,  # number of units in hidden layer
            output_nonlinearity=None,  # output layer uses identity function
            output_num_units=30,  # 30 target values

            # optimization method:
            update=nesterov_momentum,
            update_learning_rate=0.01,
            update_momentum=0.9,

            regression=True,  # flag to indicate we're dealing with regression problem
            max_epochs=400,  # we want to train this many epochs
            verbose=1,
            )

        X, y = load()
        net1.fit(X, y)
        ''')
    out = capsys.readouterr().out
    assert 'DenseLayer' in out and 'train loss' in out
    run(tutorial, '''
        import numpy as np
        rmse = np.sqrt(0.003255) * 48
        ''')
    assert tutorial['rmse'] == pytest.approx(2.7385, abs=1e-4)


def test_testing_it_out(tutorial):
    run(tutorial, '''
        from matplotlib import pyplot  # as the tutorial's script imports it

        train_loss = np.array([i["train_loss"] for i in net1.train_history_])
        valid_loss = np.array([i["valid_loss"] for i in net1.train_history_])
        pyplot.plot(train_loss, linewidth=3, label="train")
        pyplot.plot(valid_loss, linewidth=3, label="valid")
        pyplot.grid()
        pyplot.legend()
        pyplot.xlabel("epoch")
        pyplot.ylabel("loss")
        pyplot.ylim(1e-3, 1e-2)
        pyplot.yscale("log")
        pyplot.show()
        ''')
    run(tutorial, '''
        def plot_sample(x, y, axis):
            img = x.reshape(96, 96)
            axis.imshow(img, cmap='gray')
            axis.scatter(y[0::2] * 48 + 48, y[1::2] * 48 + 48, marker='x', s=10)

        X, _ = load(test=True)
        y_pred = net1.predict(X)

        fig = pyplot.figure(figsize=(6, 6))
        fig.subplots_adjust(
            left=0, right=1, bottom=0, top=1, hspace=0.05, wspace=0.05)

        for i in range(16):
            ax = fig.add_subplot(4, 4, i + 1, xticks=[], yticks=[])
            plot_sample(X[i], y_pred[i], ax)

        pyplot.show()
        ''')
    assert tutorial['y_pred'].shape[1] == 30 and len(tutorial['fig'].axes) == 16


def inside_a_block(lines):
    """Lines of a NeuralNet definition, indented as the blocks below have them."""
    return textwrap.indent(textwrap.dedent(lines), ' ' * 12)


NET2_LAYERS = inside_a_block('''
    layers=[
        ('input', layers.InputLayer),
        ('conv1', layers.Conv2DLayer),
        ('pool1', layers.MaxPool2DLayer),
        ('conv2', layers.Conv2DLayer),
        ('pool2', layers.MaxPool2DLayer),
        ('conv3', layers.Conv2DLayer),
        ('pool3', layers.MaxPool2DLayer),
        ('hidden4', layers.DenseLayer),
        ('hidden5', layers.DenseLayer),
        ('output', layers.DenseLayer),
        ],
    input_shape=(None, 1, 96, 96),
    conv1_num_filters=32, conv1_filter_size=(3, 3), pool1_pool_size=(2, 2),
    conv2_num_filters=64, conv2_filter_size=(2, 2), pool2_pool_size=(2, 2),
    conv3_num_filters=128, conv3_filter_size=(2, 2), pool3_pool_size=(2, 2),
    hidden4_num_units=500, hidden5_num_units=500,
    output_num_units=30, output_nonlinearity=None,
''')


def test_second_model_convolutions(tutorial):
    run(tutorial, '''
        def load2d(test=False, cols=None):
            X, y = load(test=test)
            X = X.reshape(-1, 1, 96, 96)
            return X, y
        ''')
    run(tutorial, '''
        net2 = NeuralNet(''' + NET2_LAYERS + '''
            update_learning_rate=0.01,
            update_momentum=0.9,

            regression=True,
            max_epochs=1000,
            verbose=1,
            )

        X, y = load2d()  # load 2-d data
        net2.fit(X, y)

        # Training for 1000 epochs will take a while.  We'll pickle the
        # trained model so that we can load it back later:
        import pickle  # today: Python 3 has no cPickle
        with open('net2.pickle', 'wb') as f:
            pickle.dump(net2, f, -1)
        ''')
    assert sum(p.numel() for p in tutorial['net2'].net_.module_.parameters()) == 8_051_502
    run(tutorial, '''
        sample1 = load(test=True)[0][6:7]
        sample2 = load2d(test=True)[0][6:7]
        y_pred1 = net1.predict(sample1)[0]
        y_pred2 = net2.predict(sample2)[0]

        fig = pyplot.figure(figsize=(6, 3))
        ax = fig.add_subplot(1, 2, 1, xticks=[], yticks=[])
        plot_sample(sample1[0], y_pred1, ax)
        ax = fig.add_subplot(1, 2, 2, xticks=[], yticks=[])
        plot_sample(sample1[0], y_pred2, ax)
        pyplot.show()
        ''')


def test_data_augmentation(tutorial, capsys):
    run(tutorial, '''
        X, y = load2d()
        X_flipped = X[:, :, :, ::-1]  # simple slice to flip all images

        # plot two images:
        fig = pyplot.figure(figsize=(6, 3))
        ax = fig.add_subplot(1, 2, 1, xticks=[], yticks=[])
        plot_sample(X[1], y[1], ax)
        ax = fig.add_subplot(1, 2, 2, xticks=[], yticks=[])
        plot_sample(X_flipped[1], y[1], ax)
        pyplot.show()
        ''')
    run(tutorial, '''
        flip_indices = [
            (0, 2), (1, 3),
            (4, 8), (5, 9), (6, 10), (7, 11),
            (12, 16), (13, 17), (14, 18), (15, 19),
            (22, 24), (23, 25),
            ]

        # Let's see if we got it right:
        df = read_csv(os.path.expanduser(FTRAIN))
        for i, j in flip_indices:
            print("# {} -> {}".format(df.columns[i], df.columns[j]))
        ''')
    assert '# mouth_left_corner_y -> mouth_right_corner_y' in capsys.readouterr().out
    run(tutorial, '''
        from nolearn.lasagne import BatchIterator

        class FlipBatchIterator(BatchIterator):
            flip_indices = [
                (0, 2), (1, 3),
                (4, 8), (5, 9), (6, 10), (7, 11),
                (12, 16), (13, 17), (14, 18), (15, 19),
                (22, 24), (23, 25),
                ]

            def transform(self, Xb, yb):
                Xb, yb = super(FlipBatchIterator, self).transform(Xb, yb)

                # Flip half of the images in this batch at random:
                bs = Xb.shape[0]
                indices = np.random.choice(bs, bs // 2, replace=False)  # today: // in Python 3
                Xb[indices] = Xb[indices, :, :, ::-1]

                if yb is not None:
                    # Horizontal flip of all x coordinates:
                    yb[indices, ::2] = yb[indices, ::2] * -1

                    # Swap places, e.g. left_eye_center_x -> right_eye_center_x
                    for a, b in self.flip_indices:
                        yb[indices, a], yb[indices, b] = (
                            yb[indices, b], yb[indices, a])

                return Xb, yb
        ''')
    run(tutorial, '''
        net3 = NeuralNet(''' + NET2_LAYERS + '''
            update_learning_rate=0.01,  # as before
            update_momentum=0.9,  # as before
            regression=True,
            batch_iterator_train=FlipBatchIterator(batch_size=128),
            max_epochs=3000,
            verbose=1,
            )

        net3.fit(X, y)

        import pickle  # today: Python 3 has no cPickle
        with open('net3.pickle', 'wb') as f:
            pickle.dump(net3, f, -1)
        ''')
    assert len(tutorial['net3'].train_history_) == 1


def test_changing_learning_rate_and_momentum_over_time(tutorial):
    run(tutorial, '''
        import theano

        def float32(k):
            return np.float32(k)  # today: numpy 2 has no np.cast['float32']

        class AdjustVariable(object):
            def __init__(self, name, start=0.03, stop=0.001):
                self.name = name
                self.start, self.stop = start, stop
                self.ls = None

            def __call__(self, nn, train_history):
                if self.ls is None:
                    self.ls = np.linspace(self.start, self.stop, nn.max_epochs)

                epoch = train_history[-1]['epoch']
                new_value = float32(self.ls[epoch - 1])
                getattr(nn, self.name).set_value(new_value)
        ''')
    run(tutorial, '''
        net4 = NeuralNet(''' + NET2_LAYERS + '''
            update_learning_rate=theano.shared(float32(0.03)),
            update_momentum=theano.shared(float32(0.9)),
            regression=True,
            # batch_iterator_train=FlipBatchIterator(batch_size=128),
            on_epoch_finished=[
                AdjustVariable('update_learning_rate', start=0.03, stop=0.0001),
                AdjustVariable('update_momentum', start=0.9, stop=0.999),
                ],
            max_epochs=3000,
            verbose=1,
            )

        X, y = load2d()
        net4.fit(X, y)

        with open('net4.pickle', 'wb') as f:
            pickle.dump(net4, f, -1)
        ''')
    net4 = tutorial['net4']
    assert net4.update_learning_rate.get_value() == pytest.approx(0.03)  # 1 epoch: the start
    run(tutorial, '''
        net5 = NeuralNet(''' + NET2_LAYERS + '''
            update_learning_rate=theano.shared(float32(0.03)),
            update_momentum=theano.shared(float32(0.9)),
            regression=True,
            batch_iterator_train=FlipBatchIterator(batch_size=128),
            on_epoch_finished=[
                AdjustVariable('update_learning_rate', start=0.03, stop=0.0001),
                AdjustVariable('update_momentum', start=0.9, stop=0.999),
                ],
            max_epochs=3000,
            verbose=1,
            )
        net5.fit(X, y)
        ''')


NET6 = inside_a_block('''
    layers=[
        ('input', layers.InputLayer),
        ('conv1', layers.Conv2DLayer),
        ('pool1', layers.MaxPool2DLayer),
        ('dropout1', layers.DropoutLayer),  # !
        ('conv2', layers.Conv2DLayer),
        ('pool2', layers.MaxPool2DLayer),
        ('dropout2', layers.DropoutLayer),  # !
        ('conv3', layers.Conv2DLayer),
        ('pool3', layers.MaxPool2DLayer),
        ('dropout3', layers.DropoutLayer),  # !
        ('hidden4', layers.DenseLayer),
        ('dropout4', layers.DropoutLayer),  # !
        ('hidden5', layers.DenseLayer),
        ('output', layers.DenseLayer),
        ],
    input_shape=(None, 1, 96, 96),
    conv1_num_filters=32, conv1_filter_size=(3, 3), pool1_pool_size=(2, 2),
    dropout1_p=0.1,  # !
    conv2_num_filters=64, conv2_filter_size=(2, 2), pool2_pool_size=(2, 2),
    dropout2_p=0.2,  # !
    conv3_num_filters=128, conv3_filter_size=(2, 2), pool3_pool_size=(2, 2),
    dropout3_p=0.3,  # !
    hidden4_num_units={hidden},
    dropout4_p=0.5,  # !
    hidden5_num_units={hidden},
    output_num_units=30, output_nonlinearity=None,

    update_learning_rate=theano.shared(float32(0.03)),
    update_momentum=theano.shared(float32(0.9)),

    regression=True,
    batch_iterator_train=FlipBatchIterator(batch_size=128),
''')


def test_dropout(tutorial, capsys):
    run(tutorial, '''
        net6 = NeuralNet(''' + NET6.format(hidden=500) + '''
            on_epoch_finished=[
                AdjustVariable('update_learning_rate', start=0.03, stop=0.0001),
                AdjustVariable('update_momentum', start=0.9, stop=0.999),
                ],
            max_epochs=3000,
            verbose=1,
            )
        ''')
    run(tutorial, '''
        import sys
        sys.setrecursionlimit(10000)

        X, y = load2d()
        net6.fit(X, y)

        import pickle  # today: Python 3 has no cPickle
        with open('net6.pickle', 'wb') as f:
            pickle.dump(net6, f, -1)
        ''')
    run(tutorial, '''
        from sklearn.metrics import mean_squared_error
        print(mean_squared_error(net6.predict(X), y))  # today: print() in Python 3
        ''')
    printed = float(capsys.readouterr().out.strip().splitlines()[-1])
    predicted, y = tutorial['net6'].predict(tutorial['X']), tutorial['y']
    assert printed == pytest.approx(((predicted - y) ** 2).mean(), rel=1e-5)
    run(tutorial, '''
        net7 = NeuralNet(''' + NET6.format(hidden=1000) + '''
            on_epoch_finished=[
                AdjustVariable('update_learning_rate', start=0.03, stop=0.0001),
                AdjustVariable('update_momentum', start=0.9, stop=0.999),
                ],
            max_epochs=3000,
            verbose=1,
            )
        net12 = NeuralNet(''' + NET6.format(hidden=1000) + '''
            on_epoch_finished=[
                AdjustVariable('update_learning_rate', start=0.03, stop=0.0001),
                AdjustVariable('update_momentum', start=0.9, stop=0.999),
                ],
            max_epochs=10000,
            verbose=1,
            )
        ''')
    assert tutorial['net7'].initialize().net_.module_.hidden4.out_features == 1000


def test_training_specialists(tutorial, capsys):
    run(tutorial, '''
        class EarlyStopping(object):
            def __init__(self, patience=100):
                self.patience = patience
                self.best_valid = np.inf
                self.best_valid_epoch = 0
                self.best_weights = None

            def __call__(self, nn, train_history):
                current_valid = train_history[-1]['valid_loss']
                current_epoch = train_history[-1]['epoch']
                if current_valid < self.best_valid:
                    self.best_valid = current_valid
                    self.best_valid_epoch = current_epoch
                    self.best_weights = nn.get_all_params_values()
                elif self.best_valid_epoch + self.patience < current_epoch:
                    print("Early stopping.")
                    print("Best valid loss was {:.6f} at epoch {}.".format(
                        self.best_valid, self.best_valid_epoch))
                    nn.load_params_from(self.best_weights)
                    raise StopIteration()
        ''')
    run(tutorial, '''
        stopping = EarlyStopping(patience=1)  # as net8 below calls it, epoch after epoch
        stopping(net6, [{'epoch': 1, 'valid_loss': 0.01}])
        best = net6.get_all_params_values()
        net6.load_params_from({'conv1': [w * 0 for w in best['conv1']]})
        ''')
    with pytest.raises(StopIteration):
        run(tutorial, "stopping(net6, [{'epoch': 3, 'valid_loss': 0.02}])")
    assert 'Best valid loss was 0.010000 at epoch 1.' in capsys.readouterr().out
    assert (tutorial['net6'].get_all_params_values()['conv1'][0] ==
            tutorial['best']['conv1'][0]).all()  # the best weights are back
    run(tutorial, '''
        net8 = NeuralNet(''' + NET6.format(hidden=1000) + '''
            on_epoch_finished=[
                AdjustVariable('update_learning_rate', start=0.03, stop=0.0001),
                AdjustVariable('update_momentum', start=0.9, stop=0.999),
                EarlyStopping(patience=200),
                ],
            max_epochs=3000,
            verbose=1,
            )
        ''')
    run(tutorial, '''
        SPECIALIST_SETTINGS = [
            dict(
                columns=(
                    'left_eye_center_x', 'left_eye_center_y',
                    'right_eye_center_x', 'right_eye_center_y',
                    ),
                flip_indices=((0, 2), (1, 3)),
                ),

            dict(
                columns=(
                    'nose_tip_x', 'nose_tip_y',
                    ),
                flip_indices=(),
                ),

            dict(
                columns=(
                    'mouth_left_corner_x', 'mouth_left_corner_y',
                    'mouth_right_corner_x', 'mouth_right_corner_y',
                    'mouth_center_top_lip_x', 'mouth_center_top_lip_y',
                    ),
                flip_indices=((0, 2), (1, 3)),
                ),

            dict(
                columns=(
                    'mouth_center_bottom_lip_x',
                    'mouth_center_bottom_lip_y',
                    ),
                flip_indices=(),
                ),

            dict(
                columns=(
                    'left_eye_inner_corner_x', 'left_eye_inner_corner_y',
                    'right_eye_inner_corner_x', 'right_eye_inner_corner_y',
                    'left_eye_outer_corner_x', 'left_eye_outer_corner_y',
                    'right_eye_outer_corner_x', 'right_eye_outer_corner_y',
                    ),
                flip_indices=((0, 2), (1, 3), (4, 6), (5, 7)),
                ),

            dict(
                columns=(
                    'left_eyebrow_inner_end_x', 'left_eyebrow_inner_end_y',
                    'right_eyebrow_inner_end_x', 'right_eyebrow_inner_end_y',
                    'left_eyebrow_outer_end_x', 'left_eyebrow_outer_end_y',
                    'right_eyebrow_outer_end_x', 'right_eyebrow_outer_end_y',
                    ),
                flip_indices=((0, 2), (1, 3), (4, 6), (5, 7)),
                ),
            ]
        ''')
    run(tutorial, '''
        net = net6  # the net the specialists copy (the tutorial's script calls it net)

        from collections import OrderedDict
        from sklearn.base import clone


        def fit_specialists():
            specialists = OrderedDict()

            for setting in SPECIALIST_SETTINGS:
                cols = setting['columns']
                X, y = load2d(cols=cols)

                model = clone(net)
                model.output_num_units = y.shape[1]
                model.batch_iterator_train.flip_indices = setting['flip_indices']
                # set number of epochs relative to number of training examples:
                model.max_epochs = int(1e7 / y.shape[0])
                if 'kwargs' in setting:
                    # an option 'kwargs' in the settings list may be used to
                    # set any other parameter of the net:
                    vars(model).update(setting['kwargs'])

                print("Training model for columns {} for {} epochs".format(
                    cols, model.max_epochs))
                model.fit(X, y)
                specialists[cols] = model

            with open('net-specialists.pickle', 'wb') as f:
                # we persist a dictionary with all models:
                pickle.dump(specialists, f, -1)

        fit_specialists()
        ''')
    assert capsys.readouterr().out.count('Training model for columns') == 6
    with open('net-specialists.pickle', 'rb') as f:
        assert len(pickle.load(f)) == 6


def test_supervised_pre_training(tutorial, capsys):
    run(tutorial, '''
        def fit_specialists(fname_pretrain=None):
            if fname_pretrain:  # !
                with open(fname_pretrain, 'rb') as f:  # !
                    net_pretrain = pickle.load(f)  # !
            else:  # !
                net_pretrain = None  # !

            specialists = OrderedDict()

            for setting in SPECIALIST_SETTINGS:
                cols = setting['columns']
                X, y = load2d(cols=cols)

                model = clone(net)
                model.output_num_units = y.shape[1]
                model.batch_iterator_train.flip_indices = setting['flip_indices']
                model.max_epochs = int(4e6 / y.shape[0])
                if 'kwargs' in setting:
                    # an option 'kwargs' in the settings list may be used to
                    # set any other parameter of the net:
                    vars(model).update(setting['kwargs'])

                if net_pretrain is not None:  # !
                    # if a pretrain model was given, use it to initialize the
                    # weights of our new specialist model:
                    model.load_params_from(net_pretrain)  # !

                print("Training model for columns {} for {} epochs".format(
                    cols, model.max_epochs))
                model.fit(X, y)
                specialists[cols] = model

            with open('net-specialists.pickle', 'wb') as f:
                # this time we're persisting a dictionary with all models:
                pickle.dump(specialists, f, -1)
        ''')
    run(tutorial, '''
        SPECIALIST_SETTINGS[1] = dict(
            columns=(
                'nose_tip_x', 'nose_tip_y',
                ),
            flip_indices=(),
            kwargs=dict(dropout2_p=0.3, dropout3_p=0.4),  # !
            )

        fit_specialists('net6.pickle')
        ''')
    assert capsys.readouterr().out.count('Training model for columns') == 6
    with open('net-specialists.pickle', 'rb') as f:
        nose = pickle.load(f)[('nose_tip_x', 'nose_tip_y')].net_.module_
    assert nose.dropout2.p == 0.3 and nose.output.out_features == 30  # load2d ignores cols
