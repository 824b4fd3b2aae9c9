"""Head pose from a face's keypoints: yaw, pitch and roll in degrees.

A generic 3-D face is placed in front of a guessed camera so that its
keypoints fall where the face's do (OpenCV's solvePnP); its rotation, seen
along the line from the camera to the face, is the head's pose. Only
numpy, OpenCV and kfkd_io: no net, no torch.
"""
import math

import numpy as np

from kfkd_io import COLUMNS, IMAGE_SIZE, MEAN_FACE, KfkdError, opencv

KEYPOINTS = [column[:-2] for column in COLUMNS[0::2]]
POSE = ('yaw', 'pitch', 'roll')

# Each keypoint's depth in MEAN_FACE's 96-pixel frame, from the eye centres
# toward the back of the head. The depths of MediaPipe's canonical face model
# (mediapipe/modules/face_geometry/data/canonical_face_model.obj, an average
# face in cm) at the vertices named (two: their middle), scaled by MEAN_FACE's
# distance between the eyes over the model's.
DEPTHS = {
    'left_eye_center': 0.0,  # 386, 374: the upper and lower lid's middles
    'right_eye_center': 0.0,  # 159, 145
    'left_eye_inner_corner': 0.4,  # 362
    'left_eye_outer_corner': 3.7,  # 263
    'right_eye_inner_corner': 0.4,  # 133
    'right_eye_outer_corner': 3.7,  # 33
    'left_eyebrow_inner_end': -7.9,  # 336, 285: the brow's upper and lower edge
    'left_eyebrow_outer_end': 4.1,  # 300, 276
    'right_eyebrow_inner_end': -7.9,  # 107, 55
    'right_eyebrow_outer_end': 4.1,  # 70, 46
    'nose_tip': -20.7,  # 1
    'mouth_left_corner': -2.6,  # 291
    'mouth_right_corner': -2.6,  # 61
    'mouth_center_top_lip': -12.2,  # 0: the upper lip's upper edge
    'mouth_center_bottom_lip': -9.7,  # 17: the lower lip's lower edge
}
# The generic face in OpenCV's camera axes: x to the image's right (the
# subject's left), y down, z away from the camera; seen from afar, it looks
# into the camera as MEAN_FACE does. Its origin is the keypoints' middle.
FACE_3D = np.c_[MEAN_FACE, [DEPTHS[name] for name in KEYPOINTS]].astype(float)
FACE_3D -= FACE_3D.mean(0)

# draw_pose's axes: FACE_3D's directions to the subject's left, up and where
# the face looks, in red, green and blue (BGR), half a face long (frame pixels)
DRAWN_AXES = np.diag([1.0, -1.0, -1.0])
AXIS_COLOURS = [(0, 0, 255), (0, 255, 0), (255, 0, 0)]
AXIS_LENGTH = 40
NO_POSE = (math.nan,) * 3


def camera(image_size):
    """The pinhole camera assumed for an image of `image_size` (width,
    height): focal length the image's width (a common guess where the lens
    is unknown: a field of view of about 53 degrees), centred on the image
    as keypoints count pixels (pixel i spans i..i+1)."""
    width, height = image_size
    return np.array([[width, 0, width / 2], [0, width, height / 2], [0, 0, 1]], float)


def _keypoint_rows(columns):
    """The rows of FACE_3D for `columns`: x and y of Kaggle's keypoints, in turn."""
    columns = list(columns)
    names = [column[:-2] for column in columns[0::2]]
    if (columns != [f'{name}_{axis}' for name in names for axis in 'xy']
            or not set(names) <= set(KEYPOINTS)):
        raise KfkdError(f'head pose needs x and y columns of Kaggle\'s keypoints, in turn '
                        f'({COLUMNS[0]}, {COLUMNS[1]}, ...), not {columns}')
    return [KEYPOINTS.index(name) for name in names]


def _present(points, columns):
    """The keypoints of `points` (x, y, ... in `columns`' order) that are not
    NaN, (n, 2), and their points of FACE_3D, (n, 3)."""
    points = np.asarray(points, float).reshape(-1, 2)
    face = FACE_3D[_keypoint_rows(columns)]
    if len(points) != len(face):
        raise ValueError(f'{points.size} values for {len(face) * 2} columns')
    present = np.isfinite(points).all(1)
    return points[present], face[present]


def rotation(yaw, pitch, roll):
    """The rotation (3x3) that turns FACE_3D from looking into the camera to
    a pose in degrees, as head_pose gives it: pitch first, roll last."""
    cv2 = opencv()
    turn = [cv2.Rodrigues(np.radians(-degrees) * axis)[0]
            for degrees, axis in zip((pitch, yaw, roll), np.eye(3))]
    return turn[2] @ turn[1] @ turn[0]


def _line_of_sight(position):
    """The rotation that turns FACE_3D at `position` (camera coordinates) to
    look into the camera, as an upright head does: by a yaw and a pitch."""
    x, y, z = position
    yaw, pitch = math.atan2(-x, z), math.atan2(y, math.hypot(x, z))
    return rotation(math.degrees(yaw), math.degrees(pitch), 0)


def head_pose(points, columns=COLUMNS, image_size=(IMAGE_SIZE, IMAGE_SIZE)):
    """(yaw, pitch, roll) in degrees of one face whose keypoints `points`
    (x, y, x, y, ... in the pixels of an image of `image_size`, (width,
    height)) are in `columns`' order; missing keypoints (NaN) are left out,
    and the pose is NaN where fewer than 4 are left, or all in one place.

    yaw > 0: the head turns to the subject's own left (the image's right);
    pitch > 0: the subject looks up; roll > 0: the head tilts toward the
    subject's right shoulder, as the image turns counterclockwise (a face
    turned by cv2.getRotationMatrix2D(centre, angle, 1) has roll = angle).
    They compose pitch first, roll last (`rotation`), and are seen along the
    line from the camera to the face: a face that looks into the camera is
    (0, 0, 0) anywhere in the image, and the guessed focal length (`camera`)
    matters little.
    """
    cv2 = opencv()
    points, face = _present(points, columns)
    if len(points) < 4:
        return NO_POSE
    try:
        _, rvec, position = cv2.solvePnP(face, points, camera(image_size), None,
                                         flags=cv2.SOLVEPNP_SQPNP)
    except cv2.error:  # SQPnP refuses keypoints all in one place
        return NO_POSE
    seen = _line_of_sight(position.ravel()).T @ cv2.Rodrigues(rvec)[0]
    about_x, about_y, about_z = cv2.RQDecomp3x3(seen)[0]
    return -about_y, -about_x, -about_z


def head_poses(rows, columns=COLUMNS, image_size=(IMAGE_SIZE, IMAGE_SIZE)):
    """head_pose of each row of `rows` (the faces of a photo, or a face in a
    video's frames): an array of (yaw, pitch, roll), one row per face."""
    return np.array([head_pose(row, columns, image_size)
                     for row in np.asarray(rows, float)]).reshape(-1, 3)


def draw_pose(image, points, pose, columns=COLUMNS):
    """The head's axes for `pose` (yaw, pitch, roll), drawn on `image` itself
    (BGR) from the nose tip (else the keypoints' middle), as long as half the
    face: red to the subject's left, green up, blue where the face looks.
    `points` are the face's keypoints in the image's pixels, in `columns`'
    order; nothing is drawn for a NaN pose or fewer than 2 keypoints."""
    cv2 = opencv()
    points, face = _present(points, columns)
    if len(points) < 2 or not np.isfinite(pose).all():
        return
    is_nose = (face == FACE_3D[KEYPOINTS.index('nose_tip')]).all(1)
    start = points[is_nose][0] if is_nose.any() else points.mean(0)
    pixels_per_unit = points.std(0).sum() / face[:, :2].std(0).sum()
    lens = camera((image.shape[1], image.shape[0]))
    # the start, in camera coordinates, at the depth where the face has its size
    position = lens[0, 0] / pixels_per_unit * np.linalg.solve(lens, [*start, 1.0])
    directions = _line_of_sight(position) @ rotation(*pose) @ DRAWN_AXES
    ends = position + AXIS_LENGTH * directions.T
    projected, _ = cv2.projectPoints(np.vstack([position, ends]), np.zeros(3), np.zeros(3),
                                     lens, None)
    start, *ends = projected.reshape(-1, 2)
    for end, colour in zip(ends, AXIS_COLOURS):
        cv2.line(image, tuple(map(round, start)), tuple(map(round, end)), colour,
                 max(1, round(pixels_per_unit)), cv2.LINE_AA)
