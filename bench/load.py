"""Loading a Kaggle-sized training.csv: parse time, peak memory, cached reload.

    python bench/load.py [--rows 7049] [--tutorial]

Writes a training.csv of demo faces with Kaggle's 7049 rows (about 230 MB),
then times, each in a fresh process so that peak memory is its own:
kfkd's bulk parse, a second load from the parse cache, the cache being
rebuilt after the file changes, and load() as the tutorial calls it. With
--tutorial it also times the tutorial's way (pandas, then np.fromstring per
row) for comparison.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, resource, sys, time
sys.path.insert(0, {root!r})
start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import numpy as np, pandas as pd, kfkd, kfkd_io
imported_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
path, how = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if how == 'parse':
    kfkd_io.read_faces(path, use_cache=False)
elif how == 'cached':
    kfkd_io.read_faces(path)
elif how == 'load':
    import contextlib, io, os
    with contextlib.redirect_stdout(io.StringIO()):
        kfkd.load(data_dir=os.path.dirname(path))
elif how == 'tutorial':
    df = pd.read_csv(path)
    df['Image'] = df['Image'].apply(lambda im: np.fromstring(im, sep=' '))
    np.vstack(df['Image'].values)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(seconds=seconds, peak_gb=peak / 1e6, added_gb=(peak - imported_rss) / 1e6)))
'''


def measure(path, how, cache):
    env = dict(os.environ, KFKD_CACHE=str(cache))
    out = subprocess.run([sys.executable, '-c', CHILD.format(root=str(ROOT)), str(path), how],
                         capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rows', type=int, default=7049)
    parser.add_argument('--tutorial', action='store_true', help="also time the tutorial's way")
    parser.add_argument('--json', metavar='FILE', help='also write the results as JSON')
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import pandas as pd
    import kfkd_demo
    import kfkd_io

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path, cache = tmp / 'training.csv', tmp / 'cache'
        t = time.perf_counter()
        keypoints, images = kfkd_demo.make_faces(args.rows, seed=0)
        kfkd_io.write_faces(path, pd.DataFrame(keypoints, columns=kfkd_io.COLUMNS), images)
        print(f'# {args.rows} rows, {path.stat().st_size / 1e6:.0f} MB, written in '
              f'{time.perf_counter() - t:.1f} s; each step in a fresh process\n')
        steps = [('bulk parse (no cache)', 'parse', 1.5, 0.8)]
        if args.tutorial:
            steps.append(("tutorial's parse (np.fromstring per row)", 'tutorial', None, None))
        steps += [('first load, builds the cache', 'cached', None, None),
                  ('second load, from the cache', 'cached', 0.2, None),
                  ('load() from the cache (scaled, dropna, shuffled)', 'load', None, None)]
        rows = []
        print(f'{"step":50s} {"seconds":>8s} {"peak GB":>8s} {"added GB":>9s}  target')
        for name, how, seconds_target, memory_target in steps:
            result = dict(step=name, **measure(path, how, cache))
            rows.append(result)
            target = ' '.join(t for t in (seconds_target and f'<= {seconds_target} s',
                                          memory_target and f'<= {memory_target} GB') if t)
            print(f'{name:50s} {result["seconds"]:8.2f} {result["peak_gb"]:8.2f} '
                  f'{result["added_gb"]:9.2f}  {target}', flush=True)
        before = measure(path, 'cached', cache)['seconds']
        data = bytearray(path.read_bytes())
        last_one = data.rindex(b' 1 ') + 1  # a pixel of value 1 in the last row's image
        data[last_one:last_one + 1] = b'2'  # same size, new content
        stat = path.stat()
        path.write_bytes(bytes(data))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime
        after = measure(path, 'cached', cache)['seconds']
        rebuilt = after > 3 * before
        print(f'\nafter one byte changed (same size and mtime): {after:.2f} s, cache '
              f'{"rebuilt" if rebuilt else "NOT rebuilt"}')
        report = dict(rows=args.rows, steps=rows, cache_rebuilt_on_change=rebuilt)
        print('\n' + json.dumps(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == '__main__':
    main()
