"""How kfkd's modules stand to each other, and model files from before they did."""
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kfkd
import kfkd_beyond
import kfkd_cli
import kfkd_engine
from conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in ROOT.glob('kfkd*.py'))
# the engine's rooms, each importing only those before it (and kfkd_io)
ENGINE = ['device', 'interrupts', 'layers', 'geometry', 'batches', 'estimator', 'model_files',
          'jobs']


def source(module):
    """The path of a kfkd module: kfkd_engine's rooms as 'kfkd_engine.NAME'."""
    if module == 'kfkd_engine':
        return ROOT / 'kfkd_engine' / '__init__.py'
    return ROOT / (module.replace('.', '/') + '.py')


def project_imports(module):
    """The kfkd modules that `module` imports, anywhere in its code."""
    names = set()
    for node in ast.walk(ast.parse(source(module).read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    known = set(MODULES) | {'kfkd_engine'} | {f'kfkd_engine.{room}' for room in ENGINE}
    return names & known - {module}


def defined_names(path):
    """The names a Python file defines at its top level (not those it imports)."""
    names = set()
    for node in ast.parse(Path(path).read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(n.id for target in node.targets for n in ast.walk(target)
                         if isinstance(n, ast.Name))
    return names


def test_the_modules_import_each_other_without_a_cycle():
    rooms = [f'kfkd_engine.{room}' for room in ENGINE]
    graph = {module: project_imports(module) for module in MODULES + ['kfkd_engine'] + rooms}

    def visit(module, path):
        assert module not in path, f'import cycle: {" -> ".join(path + [module])}'
        for imported in graph[module]:
            visit(imported, path + [module])
    for module in graph:
        visit(module, [])
    assert graph['kfkd_io'] == set()
    assert graph['kfkd_engine'] == set(rooms) | {'kfkd_io'}
    for i, room in enumerate(rooms):
        assert graph[room] <= set(rooms[:i]) | {'kfkd_io'}, room
    assert graph['kfkd'] == {'kfkd_engine', 'kfkd_io', 'kfkd_nolearn'}
    assert graph['kfkd_beyond'] == {'kfkd', 'kfkd_engine', 'kfkd_io'}
    assert not {'kfkd', 'kfkd_beyond'} & (graph['kfkd_photo'] | graph['kfkd_nolearn'])
    assert graph['kfkd_pose'] == graph['kfkd_detect'] == {'kfkd_io'}


def test_the_package_ships_every_module():
    pyproject = (ROOT / 'pyproject.toml').read_text()
    listed = re.search(r'py-modules = \[(.*?)\]', pyproject, re.S).group(1)
    assert sorted(re.findall(r'"(\w+)"', listed)) == MODULES
    assert re.search(r'packages = \["kfkd_engine", "kfkd_models"\]', pyproject)
    shipped = re.search(r'kfkd_models = \[(.*?)\]', pyproject).group(1)
    patterns = re.findall(r'"\*(\.\w+)"', shipped)
    assert sorted(p.name for p in (ROOT / 'kfkd_models').iterdir()) == sorted(
        p.name for p in (ROOT / 'kfkd_models').iterdir() if p.suffix in patterns)
    assert sorted(p.stem for p in (ROOT / 'kfkd_engine').glob('*.py')) == sorted(
        ENGINE + ['__init__'])


def test_the_engines_rooms_and_the_search_are_short():
    for path in (ROOT / 'kfkd_engine').glob('*.py'):
        assert len(path.read_text().splitlines()) <= 450, path.name
    assert len((ROOT / 'kfkd_tune.py').read_text().splitlines()) <= 400


def test_kfkd_py_is_the_tutorial_only():
    assert len((ROOT / 'kfkd.py').read_text().splitlines()) <= 650
    nets = {name for name in defined_names(ROOT / 'kfkd.py') if re.fullmatch(r'net\d+', name)}
    assert nets == {f'net{i}' for i in range(1, 8)}
    assert not defined_names(ROOT / 'kfkd.py') & defined_names(ROOT / 'kfkd_beyond.py')


def test_every_net_a_model_file_can_name_is_where_the_registry_says():
    assert list(kfkd_engine.NETS) == [f'net{i}' for i in range(1, 11)]
    for name, module in kfkd_engine.NETS.items():
        net = kfkd_engine.registered_net(name)
        assert isinstance(net, kfkd_engine.KeypointNet)
        assert net is vars(sys.modules[module])[name]
        assert kfkd_engine.registered_name(net) == name
    assert kfkd.net7.max_epochs == 3000 and kfkd_beyond.net9.module is kfkd_beyond.HeatmapNet


def test_tests_take_each_name_from_the_module_that_defines_it():
    """`kfkd.X` in a test means X is defined in kfkd.py, not merely imported there."""
    defined = {module: defined_names(ROOT / f'{module}.py') for module in MODULES}
    for test in sorted((ROOT / 'tests').glob('*.py')):
        tree = ast.parse(test.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and
                    node.value.id in defined and not node.attr.startswith('__')):
                assert node.attr in defined[node.value.id], (
                    f'{test.name}:{node.lineno}: {node.value.id}.{node.attr} is not defined '
                    f'in {node.value.id}.py')


def test_a_fresh_process_reads_every_kind_of_model_file_and_runs_kfkd_py_once():
    """In a process that imports only the engine, each model file's net comes
    from the module NETS names, and glibc's allocator is left as it was; then
    `python kfkd.py --version` is `kfkd --version`, and makes no second copy
    of kfkd.py's classes (kfkd was imported for net1 before it ran)."""
    code = '''
import runpy, sys
import kfkd_engine
made = []
sys.setprofile(lambda frame, event, arg: event == 'call' and frame.f_code.co_name == 'MLP'
               and made.append(frame.f_code.co_filename))
assert kfkd_engine.tune_allocator.cache_info().currsize == 0
assert not {'kfkd', 'kfkd_beyond'} & set(sys.modules)
for path in sys.argv[1:]:
    print(type(kfkd_engine.read_model(path, 'cpu')).__name__)
sys.argv = ['kfkd.py', '--version']
try:
    runpy.run_path('kfkd.py', run_name='__main__')
except SystemExit as e:
    print(e.code, len(made))
'''
    files = [FIXTURES / name for name in ('net1-tiny.safetensors', 'net10-tiny.safetensors',
                                          'specialists-tiny.safetensors')]
    out = subprocess.run([sys.executable, '-c', code, *map(str, files)], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout.splitlines()
    assert out[:3] == ['KeypointNet', 'KeypointNet', 'OrderedDict']
    assert out[3].startswith('kfkd ') and out[4] == '0 1'


def test_model_files_from_before_the_moves_predict_as_they_did():
    """tests/fixtures/*-tiny.safetensors and their predictions: net1 (a
    checkpoint with 1 hidden unit), net8 of width 2 and six specialists of a
    small net7 were written by kfkd 0.1.0 at commit 1abe7c6, when the engine
    and the command line were still in kfkd.py; net9 of width 2 and net10 of
    two such members at 5d529b5, when net8-net10 were still in kfkd.py; a
    net9 of width 2 with its measured mirror axis (a setting then, not yet
    the fitted mirror_axis_) and test-time shifts at 4e0c47a. All in fp32."""
    before_move = np.load(FIXTURES / 'predictions-before-move.npz')
    before_21 = np.load(FIXTURES / 'predictions-before-21.npz')
    i = np.arange(9216, dtype=np.float32)
    face = ((np.sin(i / 97) * np.cos(i / 13) + 1) / 2).astype(np.float32)[None]
    net1 = kfkd_engine.load_net(FIXTURES / 'net1-tiny.safetensors', 'cpu')
    specialists = kfkd.load_specialists(FIXTURES / 'specialists-tiny.safetensors', 'cpu')
    assert (net1.name_, len(specialists)) == ('net1', 6)
    np.testing.assert_allclose(net1.predict(face), before_move['net1'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kfkd_engine.predict_keypoints(specialists, face).to_numpy(),
                               before_move['specialists'], rtol=1e-5, atol=1e-4)
    for name, before in (('net8', before_move), ('net9', before_21), ('net10', before_21)):
        net = kfkd_engine.load_net(FIXTURES / f'{name}-tiny.safetensors', 'cpu')
        assert net.name_ == name and net.precision == 'fp32'
        np.testing.assert_allclose(net.predict(face.reshape(-1, 1, 96, 96)), before[name],
                                   rtol=1e-5, atol=1e-6)
    net9 = kfkd_engine.load_net(FIXTURES / 'net9-measured-tiny.safetensors', 'cpu')
    assert net9.mirror_axis_ == net9.mirror_axis == pytest.approx(96.0008, abs=1e-4)
    np.testing.assert_allclose(net9.predict(face.reshape(-1, 1, 96, 96)),
                               np.load(FIXTURES / 'predictions-before-32.npz')['net9'],
                               rtol=1e-5, atol=1e-6)


def test_a_checkpoint_from_before_the_move_resumes(demo_dir, tmp_path, capsys):
    checkpoint = tmp_path / 'net1.safetensors'
    shutil.copy(FIXTURES / 'net1-tiny.safetensors', checkpoint)
    net = kfkd_cli.fit(data_dir=demo_dir, out=checkpoint, device='cpu', resume=True)
    assert 'Resuming net1 at epoch 3 of 4' in capsys.readouterr().out
    assert len(net.history) == 4
    assert net.module_.hidden.out_features == 1
