"""`kfkd predict` on videos: tracking, smoothing, the files it writes, and bad input."""
import json
import signal
import tracemalloc

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
from conftest import opencv

cv2 = opencv()
import kfkd_detect  # noqa: E402  (needs cv2)
import kfkd_photo  # noqa: E402
import kfkd_video  # noqa: E402
from kfkd_detect import Frame  # noqa: E402

SIZE = (320, 240)


def clip(path, frames=12, motion='still', fps=25.0, size=SIZE):
    kfkd_demo.write_portrait_clip(path, frames, motion, fps, size)
    return path


def frames_of(path):
    """(frame count read, frames per second, width, height) of a video file."""
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    return (count, capture.get(cv2.CAP_PROP_FPS), int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))


def test_the_one_euro_filter_steadies_a_still_face_and_follows_a_moving_one():
    """Keypoints with 0.5 px of noise, a face 150 px a side at 30 frames a
    second: still, their spread falls by more than half; panning at 4 px a
    frame, the filtered ones are less than a frame behind."""
    rng = np.random.default_rng(0)
    seconds = np.arange(120) / 30
    still = 100 + rng.normal(0, 0.5, (120, 30))
    moving = still + 4 * np.arange(120)[:, None]
    for points, check in ((still, 'jitter'), (moving, 'lag')):
        smooth = kfkd_video.OneEuroFilter()
        out = np.array([smooth(p, t, 150.0) for p, t in zip(points, seconds)])[20:]
        if check == 'jitter':
            assert out.std(0).mean() < 0.5 * points[20:].std(0).mean()
        else:
            assert 0 < (points[20:] - out).mean() / 4 < 1  # in frames


def the_face(image):
    """The frame YuNet finds the clip's face in, on one of its frames."""
    detection, = kfkd_detect.detector(max_side=kfkd_video.DETECT_SIDE)(image)
    return detection.frame


def blank(size=SIZE):
    return np.full((size[1], size[0], 3), 128, np.uint8)


def write_clip(path, images, fps=25.0):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'mp4v'), fps,
                             images[0].shape[1::-1])
    for image in images:
        writer.write(image)
    writer.release()
    return path


@pytest.fixture(scope='module')
def steady_face():
    """net1 that predicts the mean face for any face: a face it follows
    stays where it is found, frame after frame."""
    net = clone(kfkd.net1).set_params(verbose=0, device='cpu').initialize()
    with torch.no_grad():
        net.module_.output.weight.zero_()
        net.module_.output.bias.copy_(torch.as_tensor(
            kfkd_engine.to_net_scale(kfkd_io.MEAN_FACE.reshape(-1))))
    return net


def test_a_video_gives_every_frame_its_rows_and_its_annotated_copy(steady_face, tmp_path):
    video = clip(tmp_path / 'sit.mp4', frames=12)
    places = kfkd_video.predict_video(steady_face, tmp_path / 'out', video)
    assert frames_of(places['mp4']) == (12, 25.0, *SIZE)
    rows = pd.read_csv(places['csv'])
    assert list(rows.columns) == (['frame', 'time_ms', 'face', 'box_x', 'box_y', 'box_width',
                                   'box_height', 'found'] + kfkd_io.COLUMNS +
                                  kfkd_photo.confidence_columns(kfkd_io.COLUMNS) +
                                  ['yaw', 'pitch', 'roll'])
    assert rows.filter(like='_confidence').stack().between(0, 1).all()
    assert rows.roll.abs().max() < 10  # an upright face
    assert rows.frame.tolist() == list(range(12)) and rows.face.tolist() == [1] * 12
    assert rows.time_ms.tolist() == pytest.approx([i * 40 for i in range(12)])
    assert rows.found.tolist() == ['detected'] + ['tracked'] * 11
    records = [json.loads(line) for line in places['jsonl'].read_text().splitlines()]
    assert [r['frame'] for r in records] == list(range(12))
    assert records[3]['pose']['roll'] == pytest.approx(rows.roll[3], abs=0.1)
    assert records[3]['confidence']['nose_tip'] == pytest.approx(rows.nose_tip_confidence[3],
                                                                 abs=0.001)
    assert records[3]['keypoints']['nose_tip'] == pytest.approx(
        rows.loc[3, ['nose_tip_x', 'nose_tip_y']].tolist(), abs=0.01)
    assert records[3]['box'] == pytest.approx(
        rows.loc[3, ['box_x', 'box_y', 'box_width', 'box_height']].tolist(), abs=0.1)


def test_a_face_is_found_every_few_frames_and_followed_by_its_keypoints(steady_face, tmp_path,
                                                                     monkeypatch):
    """A face panning across: the detector looks on the whole frame every 5
    frames, and around the face on the others; the frame a frame is cropped
    with is the one the keypoints of the frame before fit; the face keeps its id."""
    frames, every = 12, 5
    video = clip(tmp_path / 'pan.mp4', frames=frames, motion='pan')
    images = [image for image, _ in kfkd_demo.portrait_clip(frames, 'pan', SIZE)]
    first, poses = the_face(images[0]), [kfkd_demo.portrait_pose('pan', i / (frames - 1), SIZE)
                                         for i in range(frames)]
    squares = [Frame(first.x + x - poses[0][0], first.y + y - poses[0][1], first.size,
                     first.angle) for x, y, _, _ in poses]  # the face's frame in each frame
    truth = [square.to_image(kfkd_io.MEAN_FACE.reshape(-1)) for square in squares]
    crops, looked = [], []

    def keypoints(self, gray, frames):  # as a net that finds the face wherever it is cropped
        crops.append(frames)
        return np.stack([truth[len(crops) - 1]] * len(frames)), np.ones((len(frames), 15))
    monkeypatch.setattr(kfkd_video.Tracker, '_keypoints', keypoints)

    class Counted(kfkd_detect.YuNet):
        looking = False

        def __call__(self, image):  # (it looks again at each face it finds: not counted)
            looked.append('frame')
            self.looking = True
            found = super().__call__(image)
            self.looking = False
            return found

        def present(self, image, frame):
            looked.extend([] if self.looking else ['around'])
            return super().present(image, frame)
    rows = pd.read_csv(kfkd_video.predict_video(
        steady_face, tmp_path, video, smooth=False, detect_every=every,
        detector=Counted(max_side=kfkd_video.DETECT_SIDE))['csv'])
    assert looked == (['frame'] + ['around'] * 4) * 2 + ['frame', 'around']
    assert rows.face.tolist() == [1] * frames
    assert rows.found.tolist() == ['detected'] + ['tracked'] * (frames - 1)
    for i in range(1, frames):
        got = crops[i][0]
        assert (got.x, got.y, got.size, got.angle) == pytest.approx(
            (squares[i - 1].x, squares[i - 1].y, squares[i - 1].size, squares[i - 1].angle))
    assert rows[kfkd_io.COLUMNS].to_numpy() == pytest.approx(np.array(truth), abs=0.01)


def test_a_face_whose_keypoints_drift_is_found_again_and_keeps_its_id(steady_face, tmp_path,
                                                                     monkeypatch):
    """A net that puts the keypoints a little small each time (as one trained on
    other faces may): the face's frame shrinks from frame to frame, and each
    detection puts it back, without a second face on the same one."""
    video = clip(tmp_path / 'sit.mp4', frames=12)

    def keypoints(self, gray, frames):  # the mean face in the middle 85% of the frame
        return np.stack([Frame(f.x, f.y, f.size * 0.85, f.angle).to_image(
            kfkd_io.MEAN_FACE.reshape(-1)) for f in frames]), np.ones((len(frames), 15))
    monkeypatch.setattr(kfkd_video.Tracker, '_keypoints', keypoints)
    rows = pd.read_csv(kfkd_video.predict_video(steady_face, tmp_path, video, smooth=False,
                                                detect_every=4)['csv'])
    assert rows.frame.tolist() == list(range(12)) and set(rows.face) == {1}
    assert rows.found.tolist() == (['detected'] + ['tracked'] * 3) * 3
    widths = rows.box_width.to_numpy()
    assert (widths[1:4] < widths[0]).all() and widths[4] > widths[3]  # shrank, put back


def test_a_frame_without_a_face_is_a_row_that_says_so(steady_face, tmp_path):
    video = write_clip(tmp_path / 'wall.mp4', [blank()] * 3)
    rows = pd.read_csv(kfkd_video.predict_video(steady_face, tmp_path, video)['csv'])
    assert rows.found.tolist() == ['none'] * 3 and rows.face.isna().all()
    assert rows[kfkd_io.COLUMNS].isna().all().all()
    header, *lines = (tmp_path / 'wall-keypoints.csv').read_text().splitlines()
    assert {line.count(',') for line in lines} == {header.count(',')}  # whole rows
    records = [json.loads(line) for line in (tmp_path / 'wall-keypoints.jsonl').open()]
    assert records[0]['keypoints'] is records[0]['confidence'] is records[0]['pose'] is None


@pytest.mark.parametrize('leaving', ['cut', 'pan'])
def test_a_face_that_leaves_has_no_keypoints_and_is_found_again_when_it_comes_back(
        leaving, steady_face, tmp_path, monkeypatch):
    """The face for 6 frames, then gone for 6 (a cut to a wall, or the face
    moved out of the picture), then back: with the detector on the whole frame
    only every 10 frames, its track ends at the first frame without it, no
    keypoints are written or drawn while it is away, and it is found (as a
    new face) in the first frame it is back."""
    images = [image for image, _ in kfkd_demo.portrait_clip(6, 'still', SIZE)]
    away = ([blank()] * 6 if leaving == 'cut' else
            [cv2.warpAffine(images[-1], np.float32([[1, 0, 0], [0, 1, 200 + 20 * i]]), SIZE,
                            borderMode=cv2.BORDER_REPLICATE) for i in range(6)])
    video = write_clip(tmp_path / 'away.mp4', images + away + images)
    drawn, write = [], kfkd_video.Outputs.write  # a frame's faces, drawn as written
    monkeypatch.setattr(kfkd_video.Outputs, 'write', lambda self, index, ms, image, faces,
                        poses: drawn.append(len(faces)) or write(self, index, ms, image, faces,
                                                                 poses))
    places = kfkd_video.predict_video(steady_face, tmp_path, video, detect_every=10)
    rows = pd.read_csv(places['csv'])
    assert rows.found.tolist() == (['detected'] + ['tracked'] * 5 + ['none'] * 6 +
                                   ['detected'] + ['tracked'] * 5)
    assert rows.face.tolist()[:6] == [1] * 6 and rows.face.tolist()[12:] == [2] * 6
    assert rows[kfkd_io.COLUMNS][6:12].isna().all().all()
    assert drawn == [1] * 6 + [0] * 6 + [1] * 6


def test_videos_are_told_by_their_content_and_the_command_line_runs_them(steady_face, tmp_path,
                                                                         capsys):
    model = tmp_path / 'net1.safetensors'
    kfkd_engine.save_net(steady_face, model, 'net1')
    video = clip(tmp_path / 'holiday.mp4', frames=4).rename(tmp_path / 'holiday.bin')
    assert kfkd_video.is_video(video)
    assert kfkd_cli.main(['predict', str(video), '--model', str(model), '--out',
                          str(tmp_path / 'out'), '--no-smooth', '--device', 'cpu']) == 0
    assert len(pd.read_csv(tmp_path / 'out' / 'holiday-keypoints.csv')) == 4
    (tmp_path / 'notes.mp4').write_text('not a video')
    assert kfkd_cli.main(['predict', str(tmp_path / 'notes.mp4'), '--model', str(model)]) == 1
    assert 'notes.mp4: not a video' in capsys.readouterr().err


def test_same_named_videos_from_two_folders_each_get_their_files(steady_face, tmp_path):
    videos = [tmp_path / 'monday' / 'clip.mp4', tmp_path / 'tuesday' / 'clip.mp4']
    for frames, video in enumerate(videos, start=2):
        video.parent.mkdir()
        clip(video, frames=frames)
    kfkd_cli.predict(videos, steady_face, out=tmp_path / 'out', smooth=False)
    for frames, day in enumerate(('monday', 'tuesday'), start=2):
        assert frames_of(tmp_path / 'out' / day / 'clip-keypoints.mp4')[0] == frames
        assert len(pd.read_csv(tmp_path / 'out' / day / 'clip-keypoints.csv')) == frames


def test_a_damaged_video_is_written_up_to_the_damage_and_reported(steady_face, tmp_path):
    video = tmp_path / 'cut.avi'
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*'MJPG'), 25, SIZE)
    for image, _ in kfkd_demo.portrait_clip(30, 'still', SIZE):
        writer.write(image)
    writer.release()
    data = video.read_bytes()
    video.write_bytes(data[:len(data) * 2 // 3])  # cut short, as an interrupted download is
    with pytest.raises(kfkd_io.KfkdError, match=r'cut.avi: damaged or cut short: read \d+ of'):
        kfkd_video.predict_video(steady_face, tmp_path / 'out', video)
    written, *_ = frames_of(tmp_path / 'out' / 'cut-keypoints.mp4')
    rows = pd.read_csv(tmp_path / 'out' / 'cut-keypoints.csv')
    assert 0 < written == len(rows) < 30
    assert not list((tmp_path / 'out').glob('.*'))  # no temporary file left


def test_a_video_without_frames_and_a_camera_that_does_not_open(steady_face, tmp_path):
    empty = tmp_path / 'empty.mp4'
    cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*'mp4v'), 10, SIZE).release()
    with pytest.raises(kfkd_io.KfkdError, match='empty.mp4: OpenCV cannot open this video'):
        kfkd_video.predict_video(steady_face, tmp_path, empty)
    frameless = tmp_path / 'frameless.avi'  # an AVI OpenCV opens, without a frame in it
    cv2.VideoWriter(str(frameless), cv2.VideoWriter_fourcc(*'MJPG'), 10, SIZE).release()
    with pytest.raises(kfkd_io.KfkdError, match='frameless.avi: a video without a frame '
                                                'OpenCV can read'):
        kfkd_video.predict_video(steady_face, tmp_path, frameless)
    with pytest.raises(kfkd_io.KfkdError, match='camera 97: cannot open it'):
        kfkd_video.predict_video(steady_face, tmp_path, camera=97)
    assert not list(tmp_path.glob('*-keypoints.*')) and not list(tmp_path.glob('.*'))


def test_ctrl_c_leaves_a_playable_video_and_the_rows_so_far(steady_face, tmp_path, capsys,
                                                           monkeypatch):
    """Ctrl-C while frame 5 is written: that frame is written whole, and then it stops."""
    model = tmp_path / 'net1.safetensors'
    kfkd_engine.save_net(steady_face, model, 'net1')
    video = clip(tmp_path / 'long.mp4', frames=12)
    written, write = [], kfkd_video.Outputs.write

    def ctrl_c_at_frame_5(self, index, *args):
        written.append(index)
        if index == 4:
            signal.raise_signal(signal.SIGINT)  # handled before it returns
        return write(self, index, *args)
    monkeypatch.setattr(kfkd_video.Outputs, 'write', ctrl_c_at_frame_5)
    assert kfkd_cli.main(['predict', str(video), '--model', str(model), '--out',
                          str(tmp_path / 'out'), '--device', 'cpu']) == 130
    assert 'kfkd: interrupted' in capsys.readouterr().err
    assert written == [0, 1, 2, 3, 4]
    frames, *_ = frames_of(tmp_path / 'out' / 'long-keypoints.mp4')
    rows = pd.read_csv(tmp_path / 'out' / 'long-keypoints.csv')
    lines = (tmp_path / 'out' / 'long-keypoints.jsonl').read_text().splitlines()
    assert frames == len(rows) == len(lines) == 5
    assert not list((tmp_path / 'out').glob('.*'))  # no temporary file left


def test_an_8k_video_in_bounded_memory(steady_face, tmp_path, monkeypatch):
    """Three blank 7680x4320 frames, predicted a frame at a time: the arrays
    alive at once (tracemalloc counts them) are the frame being read, the one
    before it and its gray copy, where keeping every frame would be four
    frames' worth; and FFmpeg decodes with DECODE_THREADS threads, not one
    per CPU of the host (each holds frames in flight)."""
    video = tmp_path / 'big.mp4'
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*'mp4v'), 10, (7680, 4320))
    for _ in range(3):
        writer.write(np.full((4320, 7680, 3), 90, np.uint8))
    writer.release()
    threads = []

    class Source(kfkd_video.Source):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            threads.append(self.capture.get(cv2.CAP_PROP_N_THREADS))
    monkeypatch.setattr(kfkd_video, 'Source', Source)
    tracemalloc.start()
    try:
        kfkd_video.predict_video(steady_face, tmp_path, video)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert threads == [kfkd_video.DECODE_THREADS] == [2]
    frame_bytes = 7680 * 4320 * 3
    assert 2 * frame_bytes < peak < 2.5 * frame_bytes
    assert frames_of(tmp_path / 'big-keypoints.mp4') == (3, 10.0, 7680, 4320)


def test_detect_every_must_be_a_count_of_frames(capsys):
    assert kfkd_cli.main(['predict', 'clip.mp4', '--detect-every', '0']) == 1
    assert '--detect-every must be at least 1, not 0' in capsys.readouterr().err
