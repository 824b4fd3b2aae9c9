"""How kfkd's modules stand to each other, and model files from before they did."""
import ast
import re
import shutil
from pathlib import Path

import numpy as np

import kfkd
import kfkd_cli

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / 'fixtures'
MODULES = sorted(p.stem for p in ROOT.glob('kfkd*.py'))


def is_script_block(node):
    """`if __name__ == '__main__':`, which runs the file as a script (`python
    kfkd.py CMD`): kfkd_cli then imports kfkd as a module of its own."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and
            getattr(node.test.left, 'id', None) == '__name__')


def project_imports(module):
    """The kfkd modules that `module` imports, anywhere in its code but the
    part that runs it as a script."""
    tree = ast.parse((ROOT / f'{module}.py').read_text())
    tree.body = [node for node in tree.body if not is_script_block(node)]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names & set(MODULES) - {module}


def test_the_modules_import_each_other_without_a_cycle():
    graph = {module: project_imports(module) for module in MODULES}
    assert set(MODULES) >= {'kfkd', 'kfkd_cli', 'kfkd_engine', 'kfkd_io', 'kfkd_photo'}

    def visit(module, path):
        assert module not in path, f'import cycle: {" -> ".join(path + [module])}'
        for imported in graph[module]:
            visit(imported, path + [module])
    for module in MODULES:
        visit(module, [])
    assert graph['kfkd_io'] == set()
    assert graph['kfkd_engine'] == {'kfkd_io'}
    assert 'kfkd' not in graph['kfkd_photo'] | graph['kfkd_nolearn']


def test_the_package_ships_every_module():
    pyproject = (ROOT / 'pyproject.toml').read_text()
    listed = re.search(r'py-modules = \[(.*)\]', pyproject).group(1)
    assert sorted(re.findall(r'"(\w+)"', listed)) == MODULES


def test_the_tutorials_names_are_importable_from_kfkd():
    for name in ('load', 'load2d', 'net1', 'net2', 'net3', 'net4', 'net5', 'net6', 'net7',
                 'net8', 'net9', 'FlipBatchIterator', 'AdjustVariable', 'EarlyStopping',
                 'SPECIALIST_SETTINGS', 'fit_specialists', 'submit', 'plot_learning_curves',
                 'plot_samples', 'plot_flip', 'KeypointNet', 'BatchIterator', 'DenseLayer',
                 'Conv2DLayer', 'MaxPool2DLayer', 'save_net', 'read_model', 'load_net',
                 'predict_keypoints', 'NETS', 'COLUMNS', 'FLIP_INDICES', '__version__'):
        assert hasattr(kfkd, name), name
    assert list(kfkd.NETS) == [f'net{i}' for i in range(1, 11)]


def test_model_files_from_before_the_move_predict_as_they_did():
    """tests/fixtures/*-tiny.safetensors and their predictions were written by
    kfkd 0.1.0 at commit 1abe7c6, when the engine and the command line were
    still in kfkd.py (tiny nets: net1 with 1 hidden unit, net8 of width 2, six
    specialists of a small net7), in fp32."""
    before = np.load(FIXTURES / 'predictions-before-move.npz')
    i = np.arange(9216, dtype=np.float32)
    face = ((np.sin(i / 97) * np.cos(i / 13) + 1) / 2).astype(np.float32)[None]
    net1 = kfkd.load_net(FIXTURES / 'net1-tiny.safetensors', 'cpu')
    net8 = kfkd.load_net(FIXTURES / 'net8-tiny.safetensors', 'cpu')
    specialists = kfkd.load_specialists(FIXTURES / 'specialists-tiny.safetensors', 'cpu')
    assert (net1.name_, net8.name_, len(specialists)) == ('net1', 'net8', 6)
    assert net8.test_flip and net8.precision == 'fp32'
    np.testing.assert_allclose(net1.predict(face), before['net1'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net8.predict(face.reshape(-1, 1, 96, 96)), before['net8'],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kfkd.predict_keypoints(specialists, face).to_numpy(),
                               before['specialists'], rtol=1e-5, atol=1e-4)


def test_a_checkpoint_from_before_the_move_resumes(demo_dir, tmp_path, capsys):
    checkpoint = tmp_path / 'net1.safetensors'
    shutil.copy(FIXTURES / 'net1-tiny.safetensors', checkpoint)
    net = kfkd_cli.fit(data_dir=demo_dir, out=checkpoint, device='cpu', resume=True)
    assert 'Resuming net1 at epoch 3 of 4' in capsys.readouterr().out
    assert len(net.history) == 4
    assert net.module_.hidden.out_features == 1
