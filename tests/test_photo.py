"""`kfkd predict`: faces found on photos, keypoints mapped back to the photo."""
import json
import struct
import types
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import kfkd_cli
import kfkd_engine
import kfkd_io
from conftest import centroid, opencv_4

cv2 = opencv_4()
import kfkd_photo  # noqa: E402  (needs cv2)


@pytest.fixture(scope='module')
def grace_hopper():
    """A real photo with a clear licence: Grace Hopper's US Navy portrait
    (public domain), which matplotlib ships as sample data."""
    from matplotlib import cbook
    return cbook.get_sample_data('grace_hopper.jpg', asfileobj=False)


def test_crop_and_to_photo_are_inverse_maps():
    """A dot at a point of the photo lies, in the 96x96 crop, where to_photo
    maps back to that point (to a tenth of a photo pixel)."""
    photo = np.zeros((500, 640), np.float32)
    box = (213, 97, 250, 250)
    for point in [(300.3, 180.8), (250.0, 300.5), (410.6, 120.2)]:
        centres_x, centres_y = np.arange(640) + 0.5, np.arange(500) + 0.5
        photo[:] = np.exp(-((centres_x[None] - point[0]) ** 2 +
                            (centres_y[:, None] - point[1]) ** 2) / (2 * 6.0 ** 2))
        in_crop = centroid(kfkd_photo.crop(photo, box))
        assert kfkd_photo.to_photo(in_crop, box) == pytest.approx(point, abs=0.1)


def test_finds_the_face_on_a_real_photo(grace_hopper):
    image, gray = kfkd_photo.read_photo(grace_hopper)
    assert image.shape == (600, 512, 3) and gray.shape == (600, 512)
    boxes = kfkd_photo.detect_faces(gray)
    assert len(boxes) == 1
    x, y, w, h = boxes[0]
    assert 150 < x < 200 and 80 < y < 140 and 180 < w < 260  # her face, not the flag


def test_predict_writes_keypoints_and_an_overlay(mean_face, grace_hopper, tmp_path):
    empty = tmp_path / 'wall.png'
    cv2.imwrite(str(empty), np.full((200, 300, 3), 128, np.uint8))
    table = kfkd_cli.predict([grace_hopper, empty], mean_face, out=tmp_path / 'out')
    out = tmp_path / 'out'
    csv = pd.read_csv(out / 'keypoints.csv')
    assert list(csv.columns[:6]) == ['photo', 'face', 'box_x', 'box_y', 'box_width', 'box_height']
    assert len(csv) == len(table) == 1  # one face on the portrait, none on the wall
    face = csv.iloc[0]
    xs, ys = face[kfkd_io.COLUMNS[0::2]].astype(float), face[kfkd_io.COLUMNS[1::2]].astype(float)
    assert xs.between(face.box_x, face.box_x + face.box_width).all()
    assert ys.between(face.box_y, face.box_y + face.box_height * 1.1).all()
    # the subject's left eye is on the image's right, the mouth below the eyes
    assert face.left_eye_center_x > face.right_eye_center_x
    assert face.mouth_center_bottom_lip_y > face.left_eye_center_y
    records = json.loads((out / 'keypoints.json').read_text())
    assert [len(r['faces']) for r in records] == [1, 0]
    assert records[0]['faces'][0]['keypoints']['nose_tip'] == [
        round(face.nose_tip_x, 2), round(face.nose_tip_y, 2)]
    for name in ('grace_hopper-keypoints.png', 'wall-keypoints.png'):
        assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_predict_from_the_command_line(trained_net1, grace_hopper, tmp_path):
    model = tmp_path / 'net1.safetensors'
    kfkd_engine.save_net(trained_net1, model, 'net1')
    assert kfkd_cli.main(['predict', str(grace_hopper), '--model', str(model),
                          '--out', str(tmp_path), '--device', 'cpu']) == 0
    assert (tmp_path / 'grace_hopper-keypoints.png').is_file()


def test_predict_explains_what_is_missing(trained_net1, tmp_path, capsys):
    assert kfkd_cli.main(['predict', str(tmp_path / 'me.jpg'), '--model',
                          str(tmp_path / 'none.safetensors')]) == 1
    assert 'none.safetensors: no such model file' in capsys.readouterr().err
    with pytest.raises(kfkd_io.KfkdError, match='me.jpg: no such photo'):
        kfkd_cli.predict([tmp_path / 'me.jpg'], trained_net1, out=tmp_path)
    not_an_image = tmp_path / 'notes.jpg'
    not_an_image.write_text('hello')
    with pytest.raises(kfkd_io.KfkdError, match='notes.jpg: cannot read it as an image'):
        kfkd_cli.predict([not_an_image], trained_net1, out=tmp_path)


def png_claiming(path, width, height):
    """A small PNG whose header says width x height: the size kfkd reads
    before decoding (it is refused before OpenCV decodes anything)."""
    ok, png = cv2.imencode('.png', np.zeros((8, 8), np.uint8))
    png = png.tobytes()
    ihdr = b'IHDR' + struct.pack('>II', width, height) + png[24:29]
    path.write_bytes(png[:12] + ihdr + struct.pack('>I', zlib.crc32(ihdr)) + png[33:])
    return path


@pytest.mark.parametrize('width, height, megapixels', [(20000, 20000, 400),
                                                       (40000, 40000, 1600)])
def test_a_photo_over_the_limit_is_refused_from_its_header(width, height, megapixels,
                                                           trained_net1, tmp_path):
    photo = png_claiming(tmp_path / 'huge.png', width, height)
    too_big = (rf'huge.png: {width}x{height} pixels \({megapixels} megapixels\) is more than '
               rf'kfkd predict reads \(200 megapixels\); scale it down')
    with pytest.raises(kfkd_io.KfkdError, match=too_big):
        kfkd_cli.predict([photo], trained_net1, out=tmp_path)


def test_opencvs_own_errors_in_kfkds_words(trained_net1, tmp_path, capsys):
    """A Radiance HDR header of 40000x40000: Pillow does not know the format,
    and OpenCV refuses the size with an assertion of its own."""
    photo = tmp_path / 'sky.hdr'
    photo.write_bytes(b'#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 40000 +X 40000\n' + bytes(64))
    assert kfkd_cli.main(['predict', str(photo), '--model', 'any', '--out', str(tmp_path)]) == 1
    with pytest.raises(kfkd_io.KfkdError, match='sky.hdr: OpenCV cannot read this image '
                                                r'\(too large, or damaged\)') as error:
        kfkd_cli.predict([photo], trained_net1, out=tmp_path)
    assert 'Assertion' not in str(error.value) and 'loadsave' not in str(error.value)


def test_an_opencv_without_face_cascades_is_told_to_the_user(monkeypatch):
    """OpenCV 5 moved the Haar cascades out: kfkd says which OpenCV to install."""
    monkeypatch.setattr(kfkd_photo, '_cv2', lambda: types.SimpleNamespace(__version__='5.0.0'))
    kfkd_photo._face_cascade.cache_clear()
    with pytest.raises(kfkd_io.KfkdError, match=r"OpenCV 5.0.0 lacks: pip install "
                                                r"'opencv-python-headless<5'"):
        kfkd_photo.detect_faces(np.zeros((120, 160), np.uint8))
    kfkd_photo._face_cascade.cache_clear()


def test_a_photo_cut_short_is_a_warning_in_kfkds_words(grace_hopper, mean_face, tmp_path,
                                                       capfd):
    photo = tmp_path / 'cut.jpg'
    photo.write_bytes(open(grace_hopper, 'rb').read()[:30000])
    kfkd_cli.predict([photo], mean_face, out=tmp_path)
    err = capfd.readouterr().err
    assert 'cut.jpg: the image is damaged or cut short; predicting on what could be read' in err
    assert 'JPEG' not in err  # libjpeg's own words stay out


def test_a_big_photo_is_searched_and_drawn_small_and_cropped_sharp(mean_face, grace_hopper,
                                                                    tmp_path):
    """Grace Hopper's portrait scaled up 8x (4096x4800, 19.7 megapixels): the
    face and keypoints land 8x where they land on the photo itself, and the
    overlay is at most 2048 pixels a side."""
    small = kfkd_cli.predict([grace_hopper], mean_face, out=tmp_path / 'small')
    image = cv2.imread(str(grace_hopper))
    big = tmp_path / 'big.jpg'
    cv2.imwrite(str(big), cv2.resize(image, None, fx=8, fy=8, interpolation=cv2.INTER_CUBIC))
    table = kfkd_cli.predict([big], mean_face, out=tmp_path / 'big')
    assert len(table) == 1
    box = table[['box_x', 'box_y', 'box_width', 'box_height']].iloc[0].to_numpy(float)
    small_box = small[['box_x', 'box_y', 'box_width', 'box_height']].iloc[0].to_numpy(float)
    assert box == pytest.approx(8 * small_box, rel=0.1, abs=40)
    points = table[kfkd_io.COLUMNS].iloc[0].to_numpy(float)
    assert points == pytest.approx(8 * small[kfkd_io.COLUMNS].iloc[0].to_numpy(float), abs=40)
    overlay = cv2.imread(str(tmp_path / 'big' / 'big-keypoints.png'))
    assert max(overlay.shape[:2]) <= 2048


def test_a_big_face_is_averaged_down_not_sampled():
    """Stripes one pixel wide average to near-gray (blocks of 11 pixels hold
    5 or 6 white ones); sampling them would give black and white."""
    stripes = np.zeros((1200, 1200), np.uint8)
    stripes[:, ::2] = 255
    face = kfkd_photo.crop(stripes, (100, 100, 1000, 1000))
    assert face.std() < 10 and abs(face.mean() - 127.5) < 5


def test_photo_folders_and_patterns(mean_face, grace_hopper, tmp_path):
    folder = tmp_path / 'photos'
    folder.mkdir()
    for name in ('a.jpg', 'b.JPG'):
        (folder / name).write_bytes(open(grace_hopper, 'rb').read())
    (folder / 'notes.txt').write_text('not a photo')
    assert kfkd_photo.find_photos([folder]) == [folder / 'a.jpg', folder / 'b.JPG']
    assert kfkd_photo.find_photos([folder / '*.jpg']) == [folder / 'a.jpg']
    table = kfkd_cli.predict([folder], mean_face, out=tmp_path / 'out')
    assert list(table.photo) == [str(folder / 'a.jpg'), str(folder / 'b.JPG')]


def test_same_named_photos_from_two_folders_each_get_their_overlay(mean_face, grace_hopper,
                                                                   tmp_path):
    photos = [tmp_path / '2024' / 'face.jpg', tmp_path / '2025' / 'face.jpg',
              tmp_path / '2025' / 'face.png', tmp_path / '2025' / 'other.jpg']
    for photo in photos:
        photo.parent.mkdir(exist_ok=True)
        photo.write_bytes(open(grace_hopper, 'rb').read())
    table = kfkd_cli.predict([tmp_path / '2024', tmp_path / '2025'], mean_face,
                             out=tmp_path / 'out')
    assert list(table.photo) == [str(photo) for photo in photos]
    overlays = sorted(str(path.relative_to(tmp_path / 'out'))
                      for path in (tmp_path / 'out').rglob('*.png'))
    assert overlays == ['2024/face-keypoints.png', '2025/face.jpg-keypoints.png',
                        '2025/face.png-keypoints.png', 'other-keypoints.png']


def test_output_names_keep_apart_only_what_would_collide():
    assert kfkd_photo.output_names(['a/x.jpg', 'b/y.jpg']) == [Path('x'), Path('y')]
    assert kfkd_photo.output_names(['a/x.jpg', 'a/b/x.jpg', 'c/x.mp4']) == [
        Path('a/x'), Path('a/b/x'), Path('c/x')]


@pytest.mark.parametrize('names, message', [
    (['empty'], r'empty: a folder with no photos or videos in it \(.jpg'),
    (['*.png'], r'\*.png: matches no file'),
    ([], 'no photos given')])
def test_photo_lists_that_come_to_nothing(names, message, trained_net1, tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(kfkd_io.KfkdError, match=message):
        kfkd_cli.predict([tmp_path / name for name in names], trained_net1, out=tmp_path)
