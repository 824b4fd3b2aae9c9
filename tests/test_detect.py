"""Face detection: frames that map faces to Kaggle's 96x96 and back, YuNet and the Haar cascade."""
import types

import numpy as np
import pytest

import kfkd_io
from conftest import centroid, needs_haar, opencv

cv2 = opencv()
import kfkd_detect  # noqa: E402
import kfkd_photo  # noqa: E402
from kfkd_detect import Frame  # noqa: E402


@pytest.fixture(scope='module')
def grace_hopper():
    """A real photo with a clear licence: Grace Hopper's US Navy portrait
    (public domain), which matplotlib ships as sample data."""
    from matplotlib import cbook
    return cv2.imread(cbook.get_sample_data('grace_hopper.jpg', asfileobj=False))


def turned(image, angle):
    """`image` turned `angle` degrees counterclockwise about its middle, edges repeated."""
    middle = (image.shape[1] / 2 - 0.5, image.shape[0] / 2 - 0.5)
    return cv2.warpAffine(image, cv2.getRotationMatrix2D(middle, angle, 1),
                          image.shape[1::-1], borderMode=cv2.BORDER_REPLICATE)


@pytest.mark.parametrize('frame', [Frame(338, 222, 250), Frame(300, 240, 180, 30.0),
                                   Frame(320, 250, 400, -45.0)])
def test_a_frames_crop_and_its_map_back_agree(frame):
    """A dot at a point of the photo lies, in the 96x96 crop, where the frame
    maps it (to a tenth of a photo pixel), upright or turned, big or small."""
    photo = np.zeros((500, 640), np.float32)
    centres_x, centres_y = np.arange(640) + 0.5, np.arange(500) + 0.5
    for point in [(300.3, 180.8), (280.0, 290.5), (380.6, 230.2)]:
        photo[:] = np.exp(-((centres_x[None] - point[0]) ** 2 +
                            (centres_y[:, None] - point[1]) ** 2) / (2 * 6.0 ** 2))
        in_crop = centroid(kfkd_photo.crop(photo, frame))
        assert frame.to_face(point) == pytest.approx(in_crop, abs=0.1 * 96 / frame.size + 0.05)
        assert frame.to_image(in_crop) == pytest.approx(point, abs=0.1 + frame.size / 960)


def test_a_big_square_barely_in_the_image_is_cut_without_shrinking_nothing():
    """A square of 1000 pixels of which 8 columns lie in the image (fewer than
    the 10 a shrunk pixel would average): what is there is cut, the rest is
    black (a face leaving a video's frame)."""
    image = np.full((400, 400), 200, np.uint8)
    face = kfkd_detect.cut(image, Frame(-492, 200, 1000), 96)
    assert face.shape == (96, 96) and face[40:60, -1].min() == 200 and face[:, :90].max() == 0


def test_a_frame_is_fitted_to_points_it_placed():
    frame = Frame(210.5, 170.25, 144.0, -23.0)
    image_points = frame.to_image(kfkd_io.MEAN_FACE.reshape(-1)).reshape(-1, 2)
    image_points[3] = np.nan  # a keypoint missing is left out
    fitted, distance = Frame.fitted(kfkd_io.MEAN_FACE, image_points)
    assert (fitted.x, fitted.y, fitted.size, fitted.angle) == pytest.approx(
        (210.5, 170.25, 144.0, -23.0)) and distance < 1e-9
    x, y, width, height = frame.box()  # the upright box around the turned square
    assert width == height == pytest.approx(144.0 * (np.cos(np.radians(23)) +
                                                     np.sin(np.radians(23))))


@pytest.mark.parametrize('angle', [0, 20, -35, 45])
def test_yunet_finds_a_turned_face_and_says_how_far_it_is_turned(grace_hopper, angle):
    """Her portrait turned counterclockwise: one face, its frame turned as far
    the other way (the frame's angle counts clockwise), within 5 degrees of the
    upright portrait's."""
    upright, = kfkd_detect.detector()(grace_hopper)
    found = kfkd_detect.detector()(turned(grace_hopper, angle))
    assert len(found) == 1 and found[0].score > 0.8
    assert found[0].frame.angle == pytest.approx(upright.frame.angle - angle, abs=5)
    assert found[0].frame.size == pytest.approx(upright.frame.size, rel=0.1)


def test_a_face_followed_is_present_until_it_goes(grace_hopper):
    face, = kfkd_detect.detector()(grace_hopper)
    detector = kfkd_detect.detector()
    again = detector.present(grace_hopper, face.frame)
    assert again is not None and kfkd_detect.same_face(again.frame, face.frame)
    wall = np.full_like(grace_hopper, 128)
    assert detector.present(wall, face.frame) is None
    moved = cv2.warpAffine(grace_hopper, np.float32([[1, 0, 0], [0, 1, 260]]),
                           grace_hopper.shape[1::-1], borderMode=cv2.BORDER_REPLICATE)
    assert detector.present(moved, face.frame) is None  # not where it was


def test_the_haar_cascade_frames_an_upright_face_as_yunet_does(grace_hopper):
    needs_haar()
    haar, = kfkd_detect.detector('haar')(grace_hopper)
    yunet, = kfkd_detect.detector('yunet')(grace_hopper)
    assert kfkd_detect.same_face(haar.frame, yunet.frame)
    assert haar.frame.size == pytest.approx(yunet.frame.size, rel=0.15)


def test_a_damaged_detector_file_and_an_unknown_detector_are_refused(tmp_path):
    damaged = tmp_path / 'yunet.onnx'
    damaged.write_bytes(kfkd_detect.YUNET_FILE.read_bytes()[:5000])
    with pytest.raises(kfkd_io.KfkdError, match='yunet.onnx: not a YuNet face detector OpenCV '
                                                'can read'):
        kfkd_detect.YuNet(damaged)
    with pytest.raises(kfkd_io.KfkdError, match='the face detector is not there; reinstall'):
        kfkd_detect.YuNet(tmp_path / 'gone.onnx')
    with pytest.raises(kfkd_io.KfkdError, match='--detector dlib: one of yunet, haar'):
        kfkd_detect.detector('dlib')


def test_an_opencv_without_face_cascades_is_told_to_the_user(monkeypatch):
    """OpenCV 5 moved the Haar cascades out: --detector haar says what to do."""
    monkeypatch.setattr(kfkd_detect, 'opencv',
                        lambda: types.SimpleNamespace(__version__='5.0.0'))
    kfkd_detect._face_cascade.cache_clear()
    with pytest.raises(kfkd_io.KfkdError, match=r"OpenCV 5.0.0 lacks: pip install "
                                                r"'opencv-python-headless<5', or use the "
                                                r"default detector \(yunet\)"):
        kfkd_detect.detector('haar')
    kfkd_detect._face_cascade.cache_clear()
