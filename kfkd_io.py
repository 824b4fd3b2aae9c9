"""File formats for kfkd: the data folder, Kaggle's CSV files and the checks
of what is in them, the parse cache, model files.

Kept out of kfkd.py because none of it is deep learning: it is the plumbing
that turns Kaggle's CSV into arrays in bulk, refuses broken files
with one clear line, and stores trained nets without pickle. It imports no
other kfkd module, so any module can take what they all share from here:
the keypoints' names, KfkdError, warn, OpenCV's import.
"""
import contextlib
import hashlib
import io
import json
import math
import os
import re
import struct
import sys
import tempfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

__version__ = '0.1.0'  # kfkd's: the package's, and written into every model file

IMAGE_SIZE = 96
# The files kfkd ships besides its code: its pretrained model and YuNet's face
# detector, with their terms (docs/model-card.md).
MODELS = Path(__file__).resolve().parent / 'kfkd_models'
PIXELS = IMAGE_SIZE * IMAGE_SIZE
# Kaggle's 30 target columns, in Kaggle's order; "left" is the subject's left.
COLUMNS = [f'{name}_{axis}' for name in (
    'left_eye_center', 'right_eye_center',
    'left_eye_inner_corner', 'left_eye_outer_corner',
    'right_eye_inner_corner', 'right_eye_outer_corner',
    'left_eyebrow_inner_end', 'left_eyebrow_outer_end',
    'right_eyebrow_inner_end', 'right_eyebrow_outer_end',
    'nose_tip', 'mouth_left_corner', 'mouth_right_corner',
    'mouth_center_top_lip', 'mouth_center_bottom_lip') for axis in 'xy']
# The mean keypoints of Kaggle's training labels, in pixels (subject's left is
# the image's right).
MEAN_FACE = np.array([
    [66.4, 37.7], [30.3, 38.0], [59.2, 37.9], [73.3, 37.7], [36.7, 38.0], [22.4, 38.0],
    [56.1, 29.3], [79.5, 29.7], [39.3, 29.5], [15.9, 30.4], [48.4, 62.7],
    [63.3, 76.0], [32.9, 76.2], [48.0, 72.9], [48.6, 79.0]], np.float32)


class KfkdError(Exception):
    """A problem the user can fix: the message names the file and what is wrong."""


class SettingError(KfkdError):
    """A setting that cannot work: `setting` named as the Python API names it
    (device, lr, dask, ...), its `value`, and the `problem`. The command line
    says it with the option that set it."""

    def __init__(self, setting, value, problem):
        super().__init__(f'{setting}={value!r}: {problem}')
        self.setting, self.value, self.problem = setting, value, problem


def warn(message):
    print(f'kfkd: warning: {message}', file=sys.stderr)


def opencv():
    """cv2, imported where it is needed: OpenCV is an optional dependency
    (kfkd[photo]), which training does without."""
    try:
        import cv2
    except ImportError:
        raise KfkdError("kfkd predict needs OpenCV: pip install 'kfkd[photo]'") from None
    return cv2


# --- writing files without leaving half of one behind ---

@contextlib.contextmanager
def atomic_path(path, suffix='.tmp'):
    """A temporary file's path beside `path` (ending in `suffix`) to write,
    renamed over `path` when the block ends, removed if it fails.

    A crash, Ctrl-C or full disk leaves the old file (or none), never half a file.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path('.')
    if not directory.is_dir():
        raise KfkdError(f'{path}: folder {directory} does not exist')
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield Path(tmp)
        # on the disk before its name is: a crash leaves the old file or the new, not an empty one
        with open(tmp, 'rb') as written:
            os.fsync(written.fileno())
        os.chmod(tmp, new_file_mode())  # mkstemp's 0600 would hide the file from others
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path, mode='wb'):
    """A file open for writing whose content replaces `path`'s whole, or not at
    all (atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def new_file_mode():
    """The permissions a new file gets here (0666 less the umask), which
    mkstemp's files do not."""
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return 0o666 & ~umask


# --- reading training.csv / test.csv, plain or zipped ---

def csv_places(data_dir, name):
    """Where `name`.csv may lie in `data_dir`: as it is, in the .zip Kaggle
    ships it in, or in a folder of its own, as Kaggle Notebooks unpack it."""
    data_dir = Path(data_dir)
    return [data_dir / f'{name}.csv', data_dir / f'{name}.zip', data_dir / name / f'{name}.csv']


def find_csv(data_dir, name):
    """The file of `name`.csv's data in `data_dir` (see csv_places)."""
    data_dir = Path(data_dir)
    for candidate in csv_places(data_dir, name):
        if candidate.is_file():
            return candidate
    if data_dir.is_file():
        raise KfkdError(f'{data_dir} is a file, not a folder: name the folder that holds '
                        f'training.csv, test.csv and IdLookupTable.csv (--data DIR or '
                        f'$KFKD_DATA)')
    if not data_dir.is_dir():
        raise KfkdError(
            f'data folder {data_dir.resolve()} does not exist. Make demo data there with '
            f'`kfkd demo --out {data_dir}`, fetch Kaggle\'s files with `kfkd download --data '
            f'{data_dir}`, or point kfkd elsewhere with --data DIR or $KFKD_DATA.')
    raise KfkdError(
        f'no {name}.csv or {name}.zip in {data_dir.resolve()}. Make demo data with '
        f'`kfkd demo --out {data_dir}` or fetch Kaggle\'s files with `kfkd download --data {data_dir}`.')


def read_bytes(path):
    """The CSV's bytes; from a .zip, the member named like the zip (training.zip -> training.csv)."""
    path = Path(path)
    if path.suffix != '.zip':
        return path.read_bytes()
    member = path.stem + '.csv'
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if member not in names:
                raise KfkdError(f'{path}: the zip holds {", ".join(names) or "nothing"}, '
                                f'not {member}')
            return archive.read(member)
    except ZIP_ERRORS as e:
        raise zip_error(path) from e


# What zipfile raises for a file that is no zip, a truncated one, or damaged data.
ZIP_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error, OSError)


def zip_error(path):
    """What is wrong with the zip file at `path` that zipfile could not read."""
    if zipfile.is_zipfile(path):
        return KfkdError(f'{path}: a damaged zip file (its data does not unpack); '
                         f'download it again')
    head = _head(path)
    kind = binary_kind(head)
    what = ('a truncated zip file' if head.startswith(b'PK') else
            f'{kind[0]}, not a zip file' if kind else 'not a zip file')
    return KfkdError(f'{path}: {what}; download it again')


# The first bytes of the binary files people mistake for a CSV or a zip, and
# what to do about each.
SIGNATURES = [
    (b'\x1f\x8b', 'a gzip file', 'unpack it first (gunzip)'),
    (b'PK\x03\x04', 'a zip file', "name it .zip (kfkd reads Kaggle's zips) or unzip it"),
    (b'PK\x05\x06', 'an empty zip file', 'download it again'),
    (b'BZh', 'a bzip2 file', 'unpack it first (bunzip2)'),
    (b'\xfd7zXZ\x00', 'an xz file', 'unpack it first (unxz)'),
    (b"7z\xbc\xaf'\x1c", 'a 7-Zip file', 'unpack it first'),
    (b'%PDF', 'a PDF document', "use Kaggle's CSV files"),
    (b'\x89PNG', 'a PNG image', "use Kaggle's CSV files"),
    (b'\xff\xd8\xff', 'a JPEG image', "use Kaggle's CSV files"),
    (b'GIF8', 'a GIF image', "use Kaggle's CSV files"),
]


def _head(path, size=4096):
    with open(path, 'rb') as f:
        return f.read(size)


def binary_kind(head):
    """(what it is, what to do) for the first bytes of a binary file, or None for text."""
    for signature, what, todo in SIGNATURES:
        if head.startswith(signature):
            return what, todo
    if b'\x00' in head:
        return 'a binary file', "use Kaggle's CSV files, which are text"
    return None


def check_text(data, path):
    """Refuse, saying what it is, a binary file where a CSV is expected."""
    kind = binary_kind(data[:4096])
    if kind:
        raise KfkdError(f'{path}: is {kind[0]}, not a CSV file: {kind[1]}')


def shown(text):
    """Text or bytes from a file, quoted for a message: bytes that are not
    UTF-8, and characters that do not print, as \\xNN escapes."""
    if isinstance(text, bytes):
        text = text.decode('utf-8', 'backslashreplace')
    return "'" + ''.join(c if c.isprintable() else repr(c)[1:-1] for c in text) + "'"


def csv_problem(error, path, line_of=lambda line: line):
    """pandas' error reading the CSV at `path`, in kfkd's words. `line_of`
    maps a line of what pandas read to the file's line."""
    message = str(error)
    fields = re.search(r'Expected (\d+) fields in line (\d+), saw (\d+)', message)
    if fields:
        expected, line, saw = map(int, fields.groups())
        return KfkdError(f'{path}: line {line_of(line)}: {saw} fields where the header has '
                         f'{expected}; check its commas and quotes')
    quote = re.search(r'EOF inside string starting at row (\d+)', message)
    if quote:
        return KfkdError(f'{path}: line {line_of(int(quote.group(1)) + 1)}: a quote (") '
                         f'that is never closed')
    if isinstance(error, pd.errors.EmptyDataError):
        return KfkdError(f'{path}: the file is empty')
    return KfkdError(f'{path}: not a well-formed CSV file; check its commas and quotes')


def _line_number(line_starts, position):
    return int(np.searchsorted(line_starts, position, side='right'))  # header is line 1


def _parse_rows(buf, starts, ends, out):
    """Parse the rows whose Image fields are buf[starts[i]:ends[i]] into `out`.

    Returns None, or what is wrong as (row in this block, message).
    """
    lo, hi = starts[0], ends[-1]
    seg = np.empty(hi - lo + 1, np.uint8)  # a trailing blank ends the last value
    seg[:-1] = np.frombuffer(buf, np.uint8, hi - lo, lo)
    seg[-1] = ord(' ')
    for end, start in zip(ends[:-1] - lo, starts[1:] - lo):
        seg[end:start] = ord(' ')  # what lies between one row's Image and the next
    digit = seg - ord('0')  # non-digits wrap around to 10..255
    is_digit = digit < 10
    if np.count_nonzero(is_digit) + np.count_nonzero(seg == ord(' ')) != len(seg):
        at = int(np.flatnonzero(~is_digit & (seg != ord(' ')))[0])
        token = bytes(seg[at:at + 8]).split(b' ')[0]
        return (int(np.searchsorted(starts - lo, at, side='right')) - 1,
                f'Image holds {shown(token)}; pixels must be whole numbers 0-255')
    # Each value's number, built at its last digit from shifted views (values
    # have at most three digits), then picked out with one gather.
    digit *= is_digit
    number = digit.astype(np.uint16)
    number[1:] += 10 * digit[:-1]
    number[2:] += 100 * (digit[:-2] * is_digit[1:-1]).astype(np.uint16)
    pair = is_digit[1:] & is_digit[:-1]
    if np.any(pair[2:] & pair[:-2]):
        number[:] = 1000  # a value of four digits or more: found below
    last = np.flatnonzero(np.greater(is_digit[:-1], is_digit[1:]))
    counts = np.diff(np.searchsorted(last, np.append(starts - lo, hi - lo)))
    wrong = np.flatnonzero(counts != PIXELS)
    if len(wrong):
        count = counts[wrong[0]]
        return int(wrong[0]), ('Image is empty' if count == 0 else
                               f'Image has {count} values, expected {PIXELS} (96x96)')
    values = number[last]
    too_big = np.flatnonzero(values > 255)
    if len(too_big):
        return int(too_big[0]) // PIXELS, 'a pixel value is over 255'
    out[:] = values.reshape(out.shape)


def parse_images(buf, starts, ends, path, line_of_row):
    """Parse the space-separated pixels of every row, 128 rows at a time.

    Reading the digits as bytes with numpy, on every core, is many times
    faster than the tutorial's np.fromstring per row and takes little more
    memory than the file itself (docs/benchmarks.md, bench/load.py).
    """
    pixels = np.empty((len(starts), PIXELS), np.uint8)
    blocks = [slice(first, first + 128) for first in range(0, len(starts), 128)]
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        problems = pool.map(lambda b: _parse_rows(buf, starts[b], ends[b], pixels[b]), blocks)
        for block, problem in zip(blocks, problems):
            if problem:
                row, message = problem
                raise KfkdError(f'{path}: line {line_of_row(block.start + row)}: {message}')
    return pixels


def parse_csv(data, path):
    """(DataFrame of every column but Image, uint8 pixels of shape (n, 9216))."""
    if not re.search(rb'\S', data):
        raise KfkdError(f'{path}: the file is empty')
    check_text(data, path)
    header_end = data.find(b'\n')
    if header_end < 0:
        header_end = len(data)
    header = [name.strip().strip('"') for name in
              data[:header_end].decode('utf-8', 'backslashreplace').strip().split(',')]
    if 'Image' not in header:
        shown = ', '.join(header[:3]) + (', ...' if len(header) > 3 else '')
        raise KfkdError(f'{path}: no Image column (its {len(header)} columns: {shown})')
    image_col = header.index('Image')

    # Row boundaries and the Image field's place in each row, found with
    # bytes.find, which runs at memory speed: a few calls per row.
    starts, ends, label_lines, line_numbers = [], [], [], []
    line_start, line_number, size = header_end + 1, 1, len(data)
    while line_start < size:
        line_number += 1
        line_end = data.find(b'\n', line_start)
        if line_end < 0:
            line_end = size
        if line_end - line_start > 1 or data[line_start:line_end].strip():
            field_start = line_start
            for _ in range(image_col):
                comma = data.find(b',', field_start, line_end)
                if comma < 0:
                    raise KfkdError(f'{path}: line {line_number}: fewer fields than the '
                                    f'header\'s {len(header)}')
                field_start = comma + 1
            field_end = data.find(b',', field_start, line_end)
            if field_end < 0:  # Image is the last field, as in Kaggle's files
                field_end = line_end
                label_line = data[line_start:max(field_start - 1, line_start)]
            else:
                label_line = data[line_start:field_start] + data[field_end + 1:line_end]
            image_end = field_end
            while image_end > field_start and data[image_end - 1] in b'\r"':
                image_end -= 1
            starts.append(field_start + (data[field_start:field_start + 1] == b'"'))
            ends.append(image_end)
            label_lines.append(label_line.rstrip(b'\r'))
            line_numbers.append(line_number)
        line_start = line_end + 1
    if not starts:
        raise KfkdError(f'{path}: has a header but no rows')

    pixels = parse_images(data, np.array(starts), np.array(ends), path,
                          lambda row: line_numbers[row])
    label_names = header[:image_col] + header[image_col + 1:]
    text = ','.join(label_names).encode() + b'\n' + b'\n'.join(label_lines)
    try:
        labels = pd.read_csv(io.BytesIO(text), skip_blank_lines=False,
                             encoding_errors='backslashreplace')
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise csv_problem(e, path, lambda line: line_numbers[line - 2]) from e
    if len(labels) != len(starts):
        raise KfkdError(f'{path}: rows and Image fields do not pair up; is a field quoted?')
    labels.attrs['lines'] = np.array(line_numbers)
    return labels, pixels


# --- the parse cache: a second load of the same file reads arrays, not text ---

CACHE_VERSION = 1  # raise when the parse changes, so old caches are rebuilt
# The megabytes the parse cache may hold unless $KFKD_CACHE_MB says otherwise;
# a data set's entry takes 9216 bytes a face (Kaggle's training.csv: 7049).
CACHE_MB = 512
# only kfkd's own entries are ever evicted: parsed data sets, and mirror axes measured
# (kfkd_engine.measure_mirror_axis)
CACHE_ENTRY = re.compile(r'[0-9a-f]{16}\.npz|mirror-axis-[0-9a-f]{32}\.json')


def cache_dir():
    return Path(os.environ.get('KFKD_CACHE') or
                Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'kfkd')


def cache_file(path):
    """The parse cache's entry for the data file at `path`."""
    return cache_dir() / (hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:16] +
                          '.npz')


def cache_limit():
    """The bytes the parse cache may hold: $KFKD_CACHE_MB megabytes (0: no
    cache), or CACHE_MB."""
    text = os.environ.get('KFKD_CACHE_MB') or str(CACHE_MB)
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = math.nan
    if not megabytes >= 0:
        raise KfkdError(f'KFKD_CACHE_MB={text}: give the megabytes the parse cache may hold, '
                        f'such as {CACHE_MB} (0: no cache)')
    return int(megabytes * 1e6)


def cache_read(entry, load):
    """load(entry) of the cache's file `entry`, which counts as used now; None
    where the cache is off (cache_limit() 0), the file is not there, or
    load finds it damaged or stale (returns None, or raises)."""
    if not cache_limit() or not entry.is_file():
        return None
    try:
        found = load(entry)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        return None  # rebuilt by whoever asked
    if found is not None:
        with contextlib.suppress(OSError):
            os.utime(entry)  # used now: the last to be evicted
    return found


def cache_write(entry, save):
    """save(f) into the cache's file `entry` (atomically), then the least
    recently used entries beyond the bound evicted; nothing where the cache is
    off or cannot be written (a cache is no place for an error)."""
    limit = cache_limit()
    if not limit:
        return
    with contextlib.suppress(OSError, KfkdError):
        entry.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(entry) as f:
            save(f)
        evict_oldest(limit)


def evict_oldest(limit):
    """Delete the parse cache's least recently used entries, all from the
    first that takes it past `limit` bytes. Another process may be reading or
    deleting the same entries: what is already gone is no loss."""
    entries = []
    for entry in cache_dir().iterdir():
        if CACHE_ENTRY.fullmatch(entry.name):
            with contextlib.suppress(OSError):
                stat = entry.stat()
                entries.append((stat.st_mtime_ns, stat.st_size, entry))
    held = 0
    for _, size, entry in sorted(entries, reverse=True):  # most recently used first
        held += size
        if held > limit:
            with contextlib.suppress(OSError):
                entry.unlink()


def fingerprint(path):
    """Size, mtime and a hash of sampled blocks of the file's content.

    Hashing all of Kaggle's training.csv would cost more than reading the cache; 64
    blocks spread over the whole file plus its head and tail catch edits that
    keep both size and mtime.
    """
    stat = path.stat()
    h = hashlib.blake2b(digest_size=16)
    block = 1 << 16
    with open(path, 'rb') as f:
        for offset in np.linspace(0, max(stat.st_size - block, 0), 66).astype(np.int64):
            f.seek(int(offset))
            h.update(f.read(block))
    return f'{stat.st_size}-{stat.st_mtime_ns}-{h.hexdigest()}'


def read_faces(path, use_cache=True):
    """(labels DataFrame, uint8 pixels (n, 9216)) of a Kaggle-layout CSV or zip.

    The parse is cached in cache_dir(), which holds at most cache_limit()
    bytes: writing an entry evicts the least recently used beyond it.
    """
    path = Path(path)
    cache = cache_file(path)
    key = f'{CACHE_VERSION}-{fingerprint(path)}'

    def load(entry):
        with np.load(entry, allow_pickle=False) as npz:
            if str(npz['key']) != key:
                return None
            labels = pd.DataFrame({name: npz[f'col_{i}'] for i, name in
                                   enumerate(npz['columns'])})
            labels.attrs['lines'] = npz['lines']
            return labels, npz['pixels']
    found = cache_read(cache, load) if use_cache else None
    if found:
        return found
    labels, pixels = parse_csv(read_bytes(path), path)
    if use_cache:
        columns = {f'col_{i}': labels[name].to_numpy() if
                   pd.api.types.is_numeric_dtype(labels[name]) else
                   labels[name].astype(str).to_numpy(str)
                   for i, name in enumerate(labels.columns)}
        cache_write(cache, lambda f: np.savez(f, key=key, pixels=pixels,
                                              lines=labels.attrs['lines'],
                                              columns=np.array(labels.columns, str), **columns))
    return labels, pixels


# --- the data folder, and what kfkd relies on in its files ---

# Where Kaggle Notebooks attach the competition's files (read-only).
KAGGLE_INPUT = Path('/kaggle/input/facial-keypoints-detection')


def data_path(data_dir=None):
    """Where the data lives: `data_dir`, else $KFKD_DATA, else ./data, or,
    where ./data holds no training data, the competition's files that Kaggle
    Notebooks attach (KAGGLE_INPUT)."""
    if data_dir or os.environ.get('KFKD_DATA'):
        return Path(data_dir or os.environ['KFKD_DATA'])
    local = Path('data')
    if not has_training_data(local) and has_training_data(KAGGLE_INPUT):
        return KAGGLE_INPUT
    return local


def has_training_data(data_dir):
    return any(place.is_file() for place in csv_places(data_dir, 'training'))


def read(test=False, data_dir=None):
    """training.csv's or test.csv's columns (DataFrame) and pixels (uint8, n x 9216).

    Reads the .csv or the .zip Kaggle ships, through a cache, and checks what
    the rest of kfkd relies on.
    """
    path = find_csv(data_path(data_dir), 'test' if test else 'training')
    labels, pixels = read_faces(path)
    if test:
        if 'ImageId' not in labels:
            raise KfkdError(f'{path}: no ImageId column')
        ids = pd.to_numeric(labels['ImageId'], errors='coerce')
        lines = labels.attrs['lines']
        if ids.isna().any():
            raise KfkdError(f'{path}: line {lines[np.flatnonzero(ids.isna())[0]]}: '
                            f'ImageId is missing or not a number')
        duplicated = ids.duplicated()
        if duplicated.any():
            first = np.flatnonzero(duplicated)[0]
            raise KfkdError(f'{path}: line {lines[first]}: ImageId {int(ids[first])} '
                            f'appears twice')
        labels['ImageId'] = ids.astype(np.int64)
        return labels, pixels
    missing = [c for c in COLUMNS if c not in labels]
    if missing:
        raise KfkdError(f'{path}: missing keypoint column(s) {", ".join(missing)}')
    keypoints = labels[COLUMNS].apply(pd.to_numeric, errors='coerce')
    text = labels[COLUMNS].notna() & keypoints.isna()
    if text.any().any():
        row, col = np.argwhere(text.to_numpy())[0]
        raise KfkdError(f'{path}: line {labels.attrs["lines"][row]}: {COLUMNS[col]} is '
                        f'{shown(str(labels[COLUMNS[col]].iloc[row]))}, not a number')
    # A keypoint off the 96x96 image is a labelling error: drop it, x and y both.
    outside = ((keypoints < 0) | (keypoints > IMAGE_SIZE)).to_numpy()
    outside = np.repeat(outside[:, 0::2] | outside[:, 1::2], 2, axis=1)
    if outside.any():
        warn(f'{path}: dropped {outside.sum() // 2} keypoint(s) outside the image '
             f'(0-96) in {outside.any(1).sum()} row(s)')
        keypoints = keypoints.mask(outside)
    labels[COLUMNS] = keypoints
    return labels, pixels


def unpack_competition(archive, data_dir):
    """Place the competition zip's files in `data_dir`: training.zip and
    test.zip stay zipped (load reads them as they are), the CSVs come out."""
    wanted = ('training.zip', 'test.zip', 'IdLookupTable.csv', 'SampleSubmission.csv')
    try:
        with zipfile.ZipFile(archive) as z:
            names = {Path(n).name: n for n in z.namelist()}
            missing = [w for w in wanted if w not in names and w[:-4] + '.csv' not in names]
            if missing:
                raise KfkdError(f'{archive}: lacks {", ".join(missing)}')
            members = [names.get(want) or names[want[:-4] + '.csv'] for want in wanted]
            contents = {Path(member).name: z.read(member) for member in members}
    except ZIP_ERRORS as e:
        raise zip_error(archive) from e
    for name, data in contents.items():
        with atomic_write(data_dir / name) as f:
            f.write(data)
    print(f'Kaggle files are in {data_dir}: ' + ', '.join(sorted(p.name for p in data_dir.iterdir()
                                                           if not p.name.startswith('.'))))


def read_table(path):
    """A small CSV (groups, IdLookupTable) as a DataFrame, or a clear error;
    one with a header and no rows is an error too."""
    check_text(_head(path), path)
    try:
        table = pd.read_csv(path, encoding_errors='backslashreplace')
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise csv_problem(e, path) from e
    if table.empty:
        raise KfkdError(f'{path}: has a header but no rows')
    return table


def read_groups(spec, labels, data_dir=None):
    """Each training row's group: column `spec` of training.csv, or the CSV
    file `spec` (in data_dir or as given) with a row number and a group."""
    if spec in labels:
        groups = labels[spec]
    else:
        path = Path(spec) if Path(spec).exists() else data_path(data_dir) / spec
        if not path.is_file():
            raise KfkdError(f'groups {spec!r}: neither a column of training.csv nor a file')
        table = read_table(path)
        if table.shape[1] != 2 or not pd.api.types.is_integer_dtype(table.iloc[:, 0]):
            raise KfkdError(f'{path}: expected two columns: row number, group')
        groups = table.set_index(table.columns[0]).iloc[:, 0].reindex(range(len(labels)))
    if groups.isna().any():
        raise KfkdError(f'groups {spec!r}: no group for training row '
                        f'{int(np.flatnonzero(groups.isna())[0])}')
    return groups.to_numpy()


# --- writing training.csv / test.csv ---

def format_images(pixels):
    """The Image field of each row of uint8 `pixels`, as bytes.

    Formats all values at once through a table of the 256 decimal strings,
    many times faster than str() per value.
    """
    pixels = np.asarray(pixels, np.uint8).reshape(-1, PIXELS)
    width = np.array([len(str(v)) for v in range(256)], np.uint8)
    table = np.array([list(str(v).encode().ljust(3)) for v in range(256)], np.uint8)
    flat = pixels.ravel()
    lengths = width[flat] + 1  # each value and the space after it
    starts = np.cumsum(lengths, dtype=np.int64) - lengths
    out = np.full(int(starts[-1] + lengths[-1]), ord(' '), np.uint8)
    for k in range(3):
        has = width[flat] > k
        out[starts[has] + k] = table[flat[has], k]
    row_ends = starts[PIXELS - 1::PIXELS] + lengths[PIXELS - 1::PIXELS] - 1
    data = out.tobytes()
    return [data[a:b] for a, b in zip(np.append(0, row_ends[:-1] + 1), row_ends)]


def write_faces(path, labels, pixels):
    """Write a Kaggle-layout CSV: the `labels` columns, then Image."""
    lines = labels.to_csv(index=False, lineterminator='\n').encode().splitlines()
    with atomic_write(path) as f:
        f.write(lines[0] + b',Image\n')
        for first in range(0, len(pixels), 512):
            images = format_images(pixels[first:first + 512])
            f.write(b''.join(line + b',' + image + b'\n' for line, image in
                             zip(lines[1 + first:], images)))


# --- model files: safetensors for the weights, JSON for everything else ---

MODEL_FORMAT = 'kfkd-model'
MODEL_VERSION = 1


def _checksum(meta_text, data):
    return hashlib.sha256(meta_text.encode() + data).hexdigest()


def write_model_file(path, meta, tensors):
    """Write `tensors` and the JSON-able `meta` as one safetensors file.

    Loading it runs no code from the file (no pickle), and a sha256 over the
    metadata and the tensor bytes catches a damaged or edited file.
    """
    from safetensors.torch import save
    meta = dict(meta, format=MODEL_FORMAT, version=MODEL_VERSION)
    meta_text = json.dumps(meta, separators=(',', ':'))
    # safetensors refuses tensors that share memory: give each its own copy
    tensors = {k: v.detach().to('cpu', copy=True).contiguous() for k, v in tensors.items()}
    blob = save(tensors, metadata={'kfkd': meta_text, 'sha256': ''})
    data = blob[8 + struct.unpack('<Q', blob[:8])[0]:]
    blob = save(tensors, metadata={'kfkd': meta_text, 'sha256': _checksum(meta_text, data)})
    with atomic_write(path) as f:
        f.write(blob)


def read_model_file(path):
    """(meta, tensors) of a file written by write_model_file, checked before use."""
    from safetensors.torch import load
    path = Path(path)
    if not path.is_file():
        raise KfkdError(f'{path}: no such model file')
    blob = path.read_bytes()
    not_ours = f'{path}: not a kfkd model file'
    if len(blob) < 8:
        raise KfkdError(not_ours)
    header_size = struct.unpack('<Q', blob[:8])[0]
    if header_size > len(blob) - 8:
        raise KfkdError(not_ours)
    try:
        header = json.loads(blob[8:8 + header_size])
        meta_text = header['__metadata__']['kfkd']
        checksum = header['__metadata__']['sha256']
        meta = json.loads(meta_text)
    except (ValueError, KeyError, TypeError):
        raise KfkdError(not_ours) from None
    if not isinstance(meta, dict) or meta.get('format') != MODEL_FORMAT:
        raise KfkdError(not_ours)
    if meta.get('version') != MODEL_VERSION:
        raise KfkdError(f'{path}: written in kfkd model format {meta.get("version")}; this '
                        f'kfkd reads format {MODEL_VERSION}: use a matching kfkd version')
    if _checksum(meta_text, blob[8 + header_size:]) != checksum:
        raise KfkdError(f'{path}: damaged or modified (checksum mismatch); '
                        f'use an intact copy or train again')
    try:
        tensors = load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise KfkdError(f'{path}: damaged: its weights cannot be read although its checksum '
                        f'matches; use an intact copy or train again') from e
    return meta, tensors
