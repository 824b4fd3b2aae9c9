import gc
import os
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'data'
FIXTURES = Path(__file__).resolve().parent / 'fixtures'


@pytest.fixture(scope='session', autouse=True)
def _private_cache(tmp_path_factory):
    """Keep the parse cache of the tests out of the user's ~/.cache."""
    os.environ['KFKD_CACHE'] = str(tmp_path_factory.mktemp('cache'))


@pytest.fixture(scope='module', autouse=True)
def _free_the_modules_nets():
    """Nets hold reference cycles (callbacks that know their net), which only
    Python's cyclic collector frees, and it counts objects, not bytes: collect
    after each test module, so that its nets' memory goes before the next."""
    yield
    gc.collect()


@pytest.fixture(scope='session')
def demo_dir(tmp_path_factory):
    """A small demo data set: 600 training faces, 120 test faces."""
    import kfkd_demo
    return kfkd_demo.write_demo_data(tmp_path_factory.mktemp('demo'), n_train=600, n_test=120)


@pytest.fixture(scope='session')
def tiny(demo_dir, tmp_path_factory):
    """The demo data cut to 150 training rows (about 45 complete ones), all
    120 test faces: for tests that train big nets, or many."""
    folder = tmp_path_factory.mktemp('tiny')
    lines = (demo_dir / 'training.csv').read_bytes().split(b'\n')
    (folder / 'training.csv').write_bytes(b'\n'.join(lines[:151]) + b'\n')
    for name in ('test.csv', 'IdLookupTable.csv'):
        (folder / name).write_bytes((demo_dir / name).read_bytes())
    return folder


@pytest.fixture(scope='session')
def trained_net1(demo_dir):
    """net1 after a few epochs on the demo data (quiet)."""
    import kfkd
    from sklearn.base import clone
    net = clone(kfkd.net1).set_params(max_epochs=5, verbose=0, device='cpu')
    X, y = kfkd.load(data_dir=demo_dir)
    return net.fit(X, y)


def shared(*parts):
    """A path under ../shared/data, or skip the test where it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f'{path} is not here')
    return path


def opencv():
    """cv2, or the calling test module skipped: without OpenCV, or with one
    older than YuNet, which kfkd predict finds faces with."""
    cv2 = pytest.importorskip('cv2')
    if not hasattr(cv2, 'FaceDetectorYN'):
        pytest.skip(f'kfkd predict needs OpenCV 4.8 or later; this is {cv2.__version__}',
                    allow_module_level=True)
    return cv2


def needs_haar():
    """Skip the calling test where OpenCV has no Haar cascades (OpenCV 5)."""
    import cv2
    if not hasattr(cv2, 'CascadeClassifier'):
        pytest.skip(f'--detector haar needs OpenCV 4; this is {cv2.__version__}')


def spots(points, sigma=1.5, brightness=None):
    """A black 96x96 image with a Gaussian spot at each (x, y) point, in
    keypoints' pixel convention (pixel i spans i..i+1): spot k as bright as
    brightness[k] (default 1)."""
    centres = np.arange(96) + 0.5
    image = np.zeros((96, 96), np.float32)
    for k, (x, y) in enumerate(np.reshape(points, (-1, 2))):
        squared_distance = (centres[None, :] - x) ** 2 + (centres[:, None] - y) ** 2
        image += (1 if brightness is None else brightness[k]) * np.exp(
            -squared_distance / (2 * sigma ** 2))
    return image


def centroid(image):
    """(x, y) of the brightness-weighted centre of an image's bright parts,
    in keypoints' pixel convention: pixel i spans i..i+1."""
    weights = np.clip(image - 0.05, 0, None)
    centres = np.arange(image.shape[0]) + 0.5, np.arange(image.shape[1]) + 0.5
    return weights.sum(0) @ centres[1] / weights.sum(), weights.sum(1) @ centres[0] / weights.sum()


@pytest.fixture(scope='session')
def mean_face(demo_dir):
    """net1 that predicts the demo data's mean keypoints for any face: where
    they land on a photo depends on predict's framing alone, not on how well
    a short training went (5 epochs of net1 on 600 faces may put the eyes
    either way round)."""
    import kfkd
    import torch
    from sklearn.base import clone
    _, y = kfkd.load(data_dir=demo_dir)
    net = clone(kfkd.net1).set_params(verbose=0, device='cpu').initialize()
    with torch.no_grad():
        net.module_.output.weight.zero_()
        net.module_.output.bias.copy_(torch.as_tensor(y.mean(0)))
    return net
