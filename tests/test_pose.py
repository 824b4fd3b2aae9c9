"""kfkd_pose: head pose from keypoints, on faces whose pose is known."""
import math

import numpy as np
import pytest

import kfkd_io

cv2 = pytest.importorskip('cv2')
import kfkd_pose  # noqa: E402  (needs cv2)

PHOTO = (640, 480)  # (width, height) of the photos the faces are placed in
SPECIALIST = ['left_eye_center_x', 'left_eye_center_y', 'right_eye_center_x',
              'right_eye_center_y', 'nose_tip_x', 'nose_tip_y',
              'mouth_center_bottom_lip_x', 'mouth_center_bottom_lip_y']


def placed(scale, centre):
    """MEAN_FACE scaled about its frame's centre and moved there: x, y, x, y, ..."""
    return ((kfkd_io.MEAN_FACE - 48) * scale + centre).ravel()


def rendered(yaw, pitch, roll, distance=400):
    """The keypoints of kfkd_pose's 3-D face turned to a pose, `distance`
    frame pixels straight ahead of the camera head_pose assumes for PHOTO."""
    rvec = cv2.Rodrigues(kfkd_pose.rotation(yaw, pitch, roll))[0]
    points, _ = cv2.projectPoints(kfkd_pose.FACE_3D, rvec, np.array([0.0, 0.0, distance]),
                                  kfkd_pose.camera(PHOTO), None)
    return points.ravel()


def keypoint(points, name):
    """The (x, y) of keypoint `name` in `points` (Kaggle's 30 columns)."""
    return points[kfkd_io.COLUMNS.index(f'{name}_x'):][:2]


@pytest.mark.parametrize('scale, centre, image_size', [
    (1, (48, 48), (96, 96)), (1, (320, 240), PHOTO), (2.5, (300, 260), PHOTO),
    (1.5, (430, 170), PHOTO), (0.8, (150, 350), PHOTO)])
def test_the_mean_face_anywhere_looks_into_the_camera(scale, centre, image_size):
    pose = kfkd_pose.head_pose(placed(scale, centre), image_size=image_size)
    assert pose == pytest.approx((0, 0, 0), abs=2)


@pytest.mark.parametrize('angle', [15, 30, 45, -30])
def test_a_face_turned_in_the_image_has_that_roll(angle):
    """Turned as cv2.warpAffine turns the image with getRotationMatrix2D:
    counterclockwise for a positive angle, the subject's left eye up."""
    turn = cv2.getRotationMatrix2D((310, 250), angle, 1)
    points = placed(2, (320, 240)).reshape(-1, 2) @ turn[:, :2].T + turn[:, 2]
    yaw, pitch, roll = kfkd_pose.head_pose(points.ravel(), image_size=PHOTO)
    assert roll == pytest.approx(angle, abs=1)
    assert (yaw, pitch) == pytest.approx((0, 0), abs=2)


@pytest.mark.parametrize('pose', [(20, 0, 0), (-30, 0, 0), (0, 20, 0), (0, -30, 0),
                                  (30, -20, 0), (-20, 30, 15)])
def test_a_rendered_face_gives_its_pose_back(pose):
    points = rendered(*pose)
    assert kfkd_pose.head_pose(points, image_size=PHOTO) == pytest.approx(pose, abs=2)


def test_the_signs_are_what_the_face_does():
    """A head that turns to its own left shows its nose on the image's right
    of its eyes; one that looks up shows its nose nearer its eyes."""
    def nose_from_eyes(points):
        return keypoint(points, 'nose_tip') - (keypoint(points, 'left_eye_center') +
                                               keypoint(points, 'right_eye_center')) / 2
    frontal = nose_from_eyes(rendered(0, 0, 0))
    assert nose_from_eyes(rendered(20, 0, 0))[0] > frontal[0] + 5
    assert nose_from_eyes(rendered(0, 20, 0))[1] < frontal[1] - 5


def test_a_face_off_centre_that_looks_into_the_camera_reads_frontal():
    """Its facing direction (-z) turned toward the camera: yaw about y, then pitch about x."""
    position = np.array([180.0, -120.0, 500.0])
    toward = (cv2.Rodrigues(np.array([0.0, math.atan2(position[0], position[2]), 0.0]))[0] @
              cv2.Rodrigues(np.array([-math.atan2(position[1], math.hypot(position[0],
                                                                          position[2])),
                                      0.0, 0.0]))[0])
    points, _ = cv2.projectPoints(kfkd_pose.FACE_3D, cv2.Rodrigues(toward)[0], position,
                                  kfkd_pose.camera(PHOTO), None)
    assert kfkd_pose.head_pose(points.ravel(), image_size=PHOTO) == pytest.approx((0, 0, 0),
                                                                                    abs=1)


def test_missing_keypoints_and_a_specialists_columns():
    pose = (25, -15, 10)
    points = rendered(*pose)
    holes = points.copy()
    holes[[0, 1, 8, 9, 20, 21]] = np.nan  # an eye centre, an eye corner, the nose tip
    assert kfkd_pose.head_pose(holes, image_size=PHOTO) == pytest.approx(pose, abs=2)
    four = np.concatenate([keypoint(points, column[:-2]) for column in SPECIALIST[0::2]])
    assert kfkd_pose.head_pose(four, SPECIALIST, PHOTO) == pytest.approx(pose, abs=2)
    assert np.isnan(kfkd_pose.head_pose(np.full(8, 100.0), SPECIALIST, PHOTO)).all()
    four[4:6] = np.nan
    assert np.isnan(kfkd_pose.head_pose(four, SPECIALIST, PHOTO)).all()
    poses = kfkd_pose.head_poses([points, np.full(30, np.nan), holes], image_size=PHOTO)
    assert poses.shape == (3, 3) and np.isnan(poses[1]).all()
    np.testing.assert_allclose(poses[[0, 2]], [pose, pose], atol=2)


def test_columns_that_are_not_keypoint_pairs_are_a_kfkd_error():
    with pytest.raises(kfkd_io.KfkdError, match='x and y columns of Kaggle'):
        kfkd_pose.head_pose([1, 2, 3, 4], ['nose_tip_x', 'chin_y'])
    with pytest.raises(kfkd_io.KfkdError, match='x and y columns of Kaggle'):
        kfkd_pose.head_pose([1, 2], ['nose_tip_y', 'nose_tip_x'])


def drawn_axes(pose, distance=400):
    """draw_pose's axes for a rendered face on a black PHOTO: each drawn
    pixel's (x, y) from the nose tip, by its colour's name."""
    points = rendered(*pose, distance)
    image = np.zeros((PHOTO[1], PHOTO[0], 3), np.uint8)
    kfkd_pose.draw_pose(image, points, pose)
    ys, xs = np.mgrid[:PHOTO[1], :PHOTO[0]]
    from_nose = np.dstack([xs, ys]) + 0.5 - keypoint(points, 'nose_tip')
    bright = image > 200
    return {name: from_nose[bright[..., channel] & ~bright[..., others].any(-1)]
            for name, channel, others in (('red', 2, [0, 1]), ('green', 1, [0, 2]),
                                          ('blue', 0, [1, 2]))}


def test_draw_pose_draws_the_three_axes_from_the_nose():
    """A face turned to its left and looking down: its left (red) runs to
    the image's right, up (green) above the nose, where it looks (blue) to
    the right and down. The axes grow with the face."""
    axes = drawn_axes((25, -20, 0))
    assert all(len(pixels) > 20 for pixels in axes.values())
    assert axes['red'].mean(0) == pytest.approx((30, 0), abs=10)
    assert axes['green'].mean(0)[1] < -20
    assert (axes['blue'].mean(0) > 10).all()
    reach = max(np.abs(pixels).max() for pixels in axes.values())
    closer = max(np.abs(pixels).max() for pixels in drawn_axes((25, -20, 0), 200).values())
    assert closer / reach == pytest.approx(2, rel=0.15)


def test_draw_pose_draws_nothing_for_a_nan_pose():
    image = np.zeros((PHOTO[1], PHOTO[0], 3), np.uint8)
    kfkd_pose.draw_pose(image, rendered(0, 0, 0), (math.nan,) * 3)
    assert not image.any()
