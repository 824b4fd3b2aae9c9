"""`kfkd predict`: faces found on photos, keypoints mapped back to the photo."""
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import kfkd_beyond
import kfkd_cli
import kfkd_engine
import kfkd_io
from conftest import FIXTURES, opencv

cv2 = opencv()
import kfkd_detect  # noqa: E402  (needs cv2)
import kfkd_photo  # noqa: E402
from kfkd_detect import Frame  # noqa: E402


@pytest.fixture(scope='module')
def grace_hopper():
    """A real photo with a clear licence: Grace Hopper's US Navy portrait
    (public domain), which matplotlib ships as sample data."""
    from matplotlib import cbook
    return cbook.get_sample_data('grace_hopper.jpg', asfileobj=False)


def test_finds_the_face_on_a_real_photo(grace_hopper):
    image, gray = kfkd_photo.read_photo(grace_hopper)
    assert image.shape == (600, 512, 3) and gray.shape == (600, 512)
    found = kfkd_detect.detector()(image)
    assert len(found) == 1
    x, y, w, h = found[0].frame.box()
    assert 140 < x < 200 and 80 < y < 140 and 180 < w < 280  # her face, not the flag


def test_predict_writes_keypoints_and_an_overlay(mean_face, grace_hopper, tmp_path):
    empty = tmp_path / 'wall.png'
    cv2.imwrite(str(empty), np.full((200, 300, 3), 128, np.uint8))
    table = kfkd_cli.predict([grace_hopper, empty], mean_face, out=tmp_path / 'out')
    out = tmp_path / 'out'
    csv = pd.read_csv(out / 'keypoints.csv')
    assert list(csv.columns) == (['photo', 'face', 'score', 'box_x', 'box_y', 'box_width',
                                  'box_height'] + kfkd_io.COLUMNS +
                                 kfkd_photo.confidence_columns(kfkd_io.COLUMNS) +
                                 ['yaw', 'pitch', 'roll'])
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
    assert records[0]['faces'][0]['confidence']['nose_tip'] == face.nose_tip_confidence
    assert records[0]['faces'][0]['pose'] == {'yaw': face.yaw, 'pitch': face.pitch,
                                              'roll': face.roll}
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


def test_a_photo_cut_short_is_a_warning_in_kfkds_words(grace_hopper, mean_face, tmp_path,
                                                       capfd):
    photo = tmp_path / 'cut.jpg'
    photo.write_bytes(open(grace_hopper, 'rb').read()[:30000])
    kfkd_cli.predict([photo], mean_face, out=tmp_path)
    err = capfd.readouterr().err
    assert 'cut.jpg: the image is damaged or cut short; predicting on what could be read' in err
    assert 'JPEG' not in err  # libjpeg's own words stay out


def test_a_big_photo_is_searched_and_drawn_small_and_cropped_sharp(grace_hopper, tmp_path):
    """Grace Hopper's portrait scaled up 8x (4096x4800, 19.7 megapixels): the
    face and the pretrained model's keypoints land 8x where they land on the
    photo itself (the face to 6 pixels of the photo: the detector sees the two
    a little differently; the keypoints to 4), and the overlay is at most 2048
    pixels a side."""
    pretrained = kfkd_beyond.pretrained()
    small = kfkd_cli.predict([grace_hopper], pretrained, out=tmp_path / 'small')
    image = cv2.imread(str(grace_hopper))
    big = tmp_path / 'big.jpg'
    cv2.imwrite(str(big), cv2.resize(image, None, fx=8, fy=8, interpolation=cv2.INTER_CUBIC))
    table = kfkd_cli.predict([big], pretrained, out=tmp_path / 'big')
    assert len(table) == 1
    x, y, width, height = table[['box_x', 'box_y', 'box_width', 'box_height']].iloc[0]
    x0, y0, width0, height0 = small[['box_x', 'box_y', 'box_width', 'box_height']].iloc[0]
    assert (x + width / 2, y + height / 2) == pytest.approx(
        (8 * (x0 + width0 / 2), 8 * (y0 + height0 / 2)), abs=8 * 6)
    assert width == pytest.approx(8 * width0, rel=0.1)
    points = table[kfkd_io.COLUMNS].iloc[0].to_numpy(float)
    assert points == pytest.approx(8 * small[kfkd_io.COLUMNS].iloc[0].to_numpy(float), abs=8 * 4)
    overlay = cv2.imread(str(tmp_path / 'big' / 'big-keypoints.png'))
    assert max(overlay.shape[:2]) <= 2048


def test_a_big_face_is_averaged_down_not_sampled():
    """Stripes one pixel wide average to near-gray (blocks of 11 pixels hold
    5 or 6 white ones); sampling them would give black and white."""
    stripes = np.zeros((1200, 1200), np.uint8)
    stripes[:, ::2] = 255
    face = kfkd_photo.crop(stripes, Frame(600, 600, 1000))
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


def test_the_pretrained_model_predicts_in_an_empty_folder(grace_hopper, tmp_path, monkeypatch,
                                                          capsys):
    """`kfkd predict photo.jpg` with no --model: kfkd's own net9. Its keypoints
    on her face lie where YuNet puts her eyes and nose tip (within 5% of her
    face's size; YuNet's mouth corners are other points than Kaggle's), and
    where it puts them when the Haar cascade frames her face instead (within
    3%: they follow the face, not the frame); it is sure of them, and her head
    is upright and faces us."""
    monkeypatch.chdir(tmp_path)
    assert kfkd_cli.main(['predict', grace_hopper, '--device', 'cpu']) == 0
    assert "Predicting with kfkd's pretrained net9" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / 'keypoints.csv')
    face, = table.itertuples()
    (points, _), = kfkd_detect.detector().points(cv2.imread(grace_hopper))
    for (x, y), name in zip(points, ['right_eye_center', 'left_eye_center', 'nose_tip']):
        found = np.array([getattr(face, f'{name}_x'), getattr(face, f'{name}_y')])
        assert np.hypot(*(found - (x, y))) < 0.05 * face.box_width, name
    assert table.filter(like='_confidence').min(axis=1)[0] > 0.5
    assert abs(face.yaw) < 15 and abs(face.pitch) < 15 and abs(face.roll) < 10
    if hasattr(cv2, 'CascadeClassifier'):
        assert kfkd_cli.main(['predict', grace_hopper, '--detector', 'haar', '--out', 'haar',
                              '--device', 'cpu']) == 0
        haar = pd.read_csv(tmp_path / 'haar' / 'keypoints.csv')
        assert np.abs(haar[kfkd_io.COLUMNS].to_numpy() - table[kfkd_io.COLUMNS].to_numpy()).max(
        ) < 0.03 * face.box_width


def test_the_pretrained_model_and_its_terms_are_in_the_package():
    net = kfkd_beyond.pretrained()
    assert net.name_ == 'net9' and list(net.columns_) == kfkd_io.COLUMNS
    assert kfkd_beyond.PRETRAINED.stat().st_size <= 3 * 2 ** 20
    meta, _ = kfkd_io.read_model_file(kfkd_beyond.PRETRAINED)
    assert 'research use only' in meta['licence'] and 'model-card.md' in meta['licence']
    assert (kfkd_io.MODELS / 'LICENSE-net9.txt').read_text().count('research use only')


def test_a_missing_pretrained_model_is_said_and_kfkds_own_files_are_never_replaced(
        trained_net1, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kfkd_beyond, 'PRETRAINED', tmp_path / 'kfkd_models' / 'net9.safetensors')
    assert kfkd_cli.main(['predict', 'face.jpg']) == 1
    assert ("kfkd's pretrained model is not in this install (its model card is "
            "docs/model-card.md); reinstall kfkd, or name a model of yours with --model"
            in capsys.readouterr().err)
    for command in (['fit', '--out', str(kfkd_io.MODELS / 'net9.safetensors'), '--overwrite'],
                    ['export', '--out', str(kfkd_io.MODELS / 'net9.onnx')]):
        assert kfkd_cli.main(command) == 1
        assert 'one of the files kfkd ships' in capsys.readouterr().err


def test_specialists_predict_a_photo_with_confidences_and_a_pose(grace_hopper, tmp_path):
    """Six nets in one file: each keypoint from its specialist, in Kaggle's
    order, with a confidence from its mirror image (they are regression nets).
    These barely trained ones put every keypoint in one place, where no head
    pose fits: NaN in the table, null in the JSON (which has no NaN)."""
    specialists = kfkd_engine.read_model(FIXTURES / 'specialists-tiny.safetensors', 'cpu')
    table = kfkd_cli.predict([grace_hopper], specialists, out=tmp_path)
    assert len(table) == 1 and table[kfkd_io.COLUMNS].notna().all(axis=None)
    assert table.filter(like='_confidence').stack().between(0, 1).all()
    assert table[['yaw', 'pitch', 'roll']].isna().all(axis=None)
    face, = json.loads((tmp_path / 'keypoints.json').read_text(), parse_constant=pytest.fail)[
        0]['faces']
    assert face['pose'] == {'yaw': None, 'pitch': None, 'roll': None}
