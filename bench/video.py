"""Video: frames per second, each stage's time, steadiness and lag, memory over a long clip.

    python bench/video.py [--model FILE] [--detector yunet] [--frames 300] [--minutes 0]

On clips made from Grace Hopper's portrait (kfkd_demo.portrait_clip: 640x480,
one face, moved along known paths, with noise), it runs kfkd_video as
`kfkd predict CLIP` does and prints, for PyTorch, and for onnxruntime and
OpenCV's DNN module (the model exported as `kfkd export` does), the milliseconds per frame of each
stage (decode, detect, crop, net, track, smooth, pose, draw, encode) and the
frames per second end to end: with the detector on the whole frame every
DETECT_EVERY frames (the default; on the others it checks each face around
where it was) and on every frame. Then, with and without smoothing, the jitter of
the keypoints of a still face (the spread of each over the frames, in
pixels) and their lag behind a face panning steadily (in frames). With
--minutes M, memory (resident, MB) at the start, middle and end of an M-minute
clip.
"""
import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kfkd_beyond  # noqa: E402
import kfkd_demo  # noqa: E402
import kfkd_detect  # noqa: E402  (after the path, so the repo's kfkd runs without installing)
import kfkd_engine  # noqa: E402
import kfkd_io  # noqa: E402
import kfkd_onnx  # noqa: E402
import kfkd_video  # noqa: E402
from epochs import cpu_name  # noqa: E402

STAGES = ('decode', 'detect', 'crop', 'net', 'track', 'smooth', 'pose', 'draw', 'encode')


def run(model, clip, out, **options):
    """(seconds per frame of each stage, frames per second end to end, keypoints)."""
    timings = {}
    started = time.perf_counter()
    places = kfkd_video.predict_video(model, out, clip, timings=timings, **options)
    seconds = time.perf_counter() - started
    rows = pd.read_csv(places['csv'])
    return timings, len(rows) / seconds, rows


def keypoints(rows, warm=10):
    """The keypoints of the clip's face (its most frequent id), by frame, after
    the first `warm` frames (for the filter to settle)."""
    face = rows[rows.face == rows.face.mode()[0]].set_index('frame')
    return face.loc[face.index >= warm, kfkd_io.COLUMNS]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', help="model file (default: kfkd's pretrained net9)")
    parser.add_argument('--detector', default='yunet', choices=list(kfkd_detect.DETECTORS))
    parser.add_argument('--frames', type=int, default=300)
    parser.add_argument('--minutes', type=float, default=0, help='also a clip this long, '
                        'for memory (at 30 frames per second)')
    args = parser.parse_args()
    net = kfkd_engine.load_net(args.model, 'cpu') if args.model else kfkd_beyond.pretrained()
    work = Path(tempfile.mkdtemp(prefix='kfkd-video-bench-'))
    onnx_file = work / 'model.onnx'
    kfkd_onnx.export(net, onnx_file)
    backends = {'pytorch': net, 'onnxruntime': kfkd_onnx.OnnxModel(onnx_file),
                'opencv': kfkd_onnx.OnnxModel(onnx_file, runtime='opencv')}
    clips = {}
    for motion in ('still', 'pan'):
        clips[motion] = work / f'{motion}.mp4'
        kfkd_demo.write_portrait_clip(clips[motion], args.frames, motion)
    print(f'# {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; '
          f'{net.name_} ({args.model or "pretrained"}), {args.detector}, '
          f'precision {"bf16" if net.autocast_dtype else "fp32"}; '
          f'{args.frames} frames of 640x480, one face\n')
    print(f'{"backend":12s} {"detector":>14s} ' + ' '.join(f'{s:>7s}' for s in STAGES) +
          f' {"fps":>6s}')
    for name, model in backends.items():
        for every in (kfkd_video.DETECT_EVERY, 1):
            timings, fps, _ = run(model, clips['pan'], work / 'out', detect_every=every,
                                 detector=args.detector)
            per_frame = [timings.get(stage, 0) / args.frames * 1000 for stage in STAGES]
            print(f'{name:12s} {f"every {every} frames" if every > 1 else "every frame":>14s} ' +
                  ' '.join(f'{ms:7.2f}' for ms in per_frame) + f' {fps:6.1f}', flush=True)
    print('\n(milliseconds per frame; fps: frames per second end to end)\n')

    raw, smooth = (keypoints(run(net, clips['still'], work / 'out', smooth=s,
                                 detector=args.detector)[2]) for s in (False, True))
    jitter_raw, jitter_smooth = raw.std().mean(), smooth.std().mean()
    print(f'still face, spread of each keypoint over the frames: {jitter_raw:.3f} px raw, '
          f'{jitter_smooth:.3f} px smoothed ({1 - jitter_smooth / jitter_raw:.0%} lower)')
    poses = [kfkd_demo.portrait_pose('pan', i / (args.frames - 1)) for i in range(args.frames)]
    speed = poses[1][0] - poses[0][0]  # pixels per frame
    raw, smooth = (keypoints(run(net, clips['pan'], work / 'out', smooth=s,
                                 detector=args.detector)[2]) for s in (False, True))
    both = raw.index.intersection(smooth.index)
    lag = np.nanmean((raw.loc[both] - smooth.loc[both]).to_numpy()[:, 0::2]) / speed
    print(f'face panning at {speed:.2f} px a frame: smoothed keypoints {lag:.2f} frames behind '
          f'the raw ones')

    if args.minutes:
        long_clip = work / 'long.mp4'
        frames = int(args.minutes * 60 * 30)
        kfkd_demo.write_portrait_clip(long_clip, frames, 'turn')
        memory = []

        class Sample(dict):  # the timings dict, sampled for memory every so often
            def __setitem__(self, key, value):
                if key == 'decode' and len(memory) < frames:
                    memory.append(_resident_mb())
                super().__setitem__(key, value)
        kfkd_video.predict_video(net, work / 'out', long_clip, timings=Sample(),
                                 detector=args.detector)
        marks = [memory[0], memory[len(memory) // 2], memory[-1]]
        print(f'\n{args.minutes:g}-minute clip ({frames} frames): resident memory '
              f'{marks[0]:.0f} MB at the start, {marks[1]:.0f} MB halfway, {marks[2]:.0f} MB at '
              f'the end (peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)')


def _resident_mb():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2 ** 20


if __name__ == '__main__':
    main()
