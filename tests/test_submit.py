import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone

import kfkd
import kfkd_cli
import kfkd_demo
import kfkd_engine
import kfkd_io
from conftest import shared
from kfkd_io import KfkdError


def test_submission_for_kaggles_lookup_table(trained_net1, tmp_path):
    lookup = pd.read_csv(shared('kaggle', 'IdLookupTable.csv'))
    assert len(lookup) == 27124
    keypoints, images = kfkd_demo.make_faces(1783, seed=5)
    kfkd_io.write_faces(tmp_path / 'test.csv',
                        pd.DataFrame({'ImageId': np.arange(1, 1784)}), images)
    lookup.to_csv(tmp_path / 'IdLookupTable.csv', index=False)
    out = kfkd.submit(trained_net1, data_dir=tmp_path, out=tmp_path / 'submission.csv')
    submission = pd.read_csv(out)
    sample = pd.read_csv(shared('kaggle', 'SampleSubmission.csv'))
    assert list(submission.columns) == ['RowId', 'Location']
    assert submission['RowId'].tolist() == lookup['RowId'].tolist() == sample['RowId'].tolist()
    assert submission['Location'].notna().all()
    assert submission['Location'].between(0, 96).all()


def test_submission_values_are_the_nets_predictions(trained_net1, demo_dir, tmp_path):
    out = kfkd.submit(trained_net1, data_dir=demo_dir, out=tmp_path / 's.csv')
    submission = pd.read_csv(out)
    lookup = pd.read_csv(demo_dir / 'IdLookupTable.csv')
    X, _ = kfkd.load(test=True, data_dir=demo_dir)
    predicted = np.clip(trained_net1.predict(X) * 48 + 48, 0, 96)
    col = [kfkd_io.COLUMNS.index(f) for f in lookup['FeatureName']]
    assert np.allclose(submission['Location'], predicted[lookup['ImageId'] - 1, col], atol=1e-4)


def test_model_file_round_trip_predicts_the_same(trained_net1, demo_dir, tmp_path):
    path = tmp_path / 'net1.safetensors'
    kfkd_engine.save_net(trained_net1, path, 'net1')
    again = kfkd_engine.read_model(path, device='cpu')
    X, _ = kfkd.load(test=True, data_dir=demo_dir)
    assert np.array_equal(again.predict(X), trained_net1.predict(X))
    assert again.name_ == 'net1' and again.columns_ == tuple(kfkd_io.COLUMNS)
    assert len(again.history) == len(trained_net1.history) == 5
    assert again.max_epochs == 5 and again.lr == trained_net1.lr


def test_a_submission_of_several_models_is_the_mean_of_their_predictions(
        trained_net1, demo_dir, tmp_path):
    other = clone(trained_net1).set_params(max_epochs=2)
    torch.manual_seed(7)
    X, y = kfkd.load(data_dir=demo_dir)
    other.fit(X, y)
    files = [tmp_path / 'a.safetensors', tmp_path / 'b.safetensors']
    for net, path in zip((trained_net1, other), files):
        kfkd_engine.save_net(net, path, 'net1')
    out = tmp_path / 's.csv'
    assert kfkd_cli.main(['submit', *map(str, files), '--data', str(demo_dir), '--out',
                          str(out), '--device', 'cpu']) == 0
    lookup = pd.read_csv(demo_dir / 'IdLookupTable.csv')
    X_test, _ = kfkd.load(test=True, data_dir=demo_dir)
    mean = (trained_net1.predict(X_test) + other.predict(X_test)) / 2
    assert not np.allclose(trained_net1.predict(X_test), mean, atol=1e-3)
    col = [kfkd_io.COLUMNS.index(f) for f in lookup['FeatureName']]
    assert np.allclose(pd.read_csv(out)['Location'],
                       np.clip(mean * 48 + 48, 0, 96)[lookup['ImageId'] - 1, col], atol=1e-4)


def test_models_that_predict_different_keypoints_are_not_averaged(trained_net1, demo_dir):
    eyes = clone(trained_net1).set_params(columns=kfkd_io.COLUMNS[:4],
                                          module__output_units=4).initialize()
    X, _ = kfkd.load(test=True, data_dir=demo_dir)
    with pytest.raises(KfkdError, match='the models predict different keypoints'):
        kfkd_engine.predict_keypoints([trained_net1, eyes], X)
