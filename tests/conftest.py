import os
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'data'


@pytest.fixture(scope='session', autouse=True)
def _private_cache(tmp_path_factory):
    """Keep the parse cache of the tests out of the user's ~/.cache."""
    os.environ['KFKD_CACHE'] = str(tmp_path_factory.mktemp('cache'))


@pytest.fixture(scope='session')
def demo_dir(tmp_path_factory):
    """A small demo data set: 600 training faces, 120 test faces."""
    import kfkd_demo
    return kfkd_demo.write_demo_data(tmp_path_factory.mktemp('demo'), n_train=600, n_test=120)


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


def centroid(image):
    """(x, y) of the brightness-weighted centre of an image's bright parts,
    in keypoints' pixel convention: pixel i spans i..i+1."""
    weights = np.clip(image - 0.05, 0, None)
    centres = np.arange(image.shape[0]) + 0.5, np.arange(image.shape[1]) + 0.5
    return weights.sum(0) @ centres[1] / weights.sum(), weights.sum(1) @ centres[0] / weights.sum()
