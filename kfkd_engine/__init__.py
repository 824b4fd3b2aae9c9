"""The engine under kfkd.py: what nolearn.lasagne and Lasagne were to the tutorial.

The tutorial's script imported its machinery (NeuralNet, BatchIterator, the
layers, the printing of layers and epochs) and held only its own nets. This
package is that machinery for kfkd.py, on PyTorch and skorch, a room a job:

  device       where and in which precision to train (DEVICE, resolve_device,
               autocast_dtype, autocast), and glibc's allocator (tune_allocator)
  interrupts   Ctrl-C that stops at the next safe point (stop_requests)
  layers       Lasagne's layers as PyTorch modules (DenseLayer, Conv2DLayer, ...)
  geometry     keypoints between pixels and the nets' -1..1, mirrored and moved
               faces, test-time flips and shifts, predictions' spread, the
               mirror axis measured
  batches      training batches sliced on the device (BatchIterator), and the
               training step recorded as a CUDA graph and replayed (CapturedStep)
  estimator    KeypointNet (skorch's regressor, printing as nolearn did), its
               EpochLog, the weights it keeps, GroupSplit
  model_files  the weights a file keeps and pre-training from them, the registry
               of nets (NETS), model files, checkpoints, resuming,
               predict_keypoints (of a net, specialists, or several)
  jobs         several nets at once: processes, GPUs, a Dask cluster

Each imports only those above it in this list, and kfkd_io (file formats).
Reading a model file imports the module that NETS names for its net (kfkd,
kfkd_beyond), by name, as pickle imports a class's module.

The names below are the engine's public ones, for `import kfkd_engine`.
"""
from kfkd_engine.device import (DEVICE, autocast, autocast_dtype, native_bf16, resolve_device,
                                tune_allocator)
from kfkd_engine.interrupts import stop_requests
from kfkd_engine.layers import Conv2DLayer, DenseLayer, DropoutLayer, MaxPool2DLayer
from kfkd_engine.geometry import (HALF, MIRROR_AXIS, MirrorAxis, flip_averaged, keypoint_sides,
                                  keypoint_spread, measure_mirror_axis, mirror, mirror_pairs,
                                  mixture, moved, scale_pixels, shift_averaged, to_net_scale,
                                  to_pixels, whole_pixels)
from kfkd_engine.batches import BatchIterator, CapturedStep
from kfkd_engine.estimator import (EpochLog, GroupSplit, KeypointNet, best_epoch, copy_weights,
                                   nolearn_history, progress_bar, rmse_pixels)
from kfkd_engine.model_files import (NETS, Checkpoint, build_net, copy_matching_weights,
                                     current_setting, kept_weights, load_net, model_entry,
                                     predict_keypoints, read_model, registered_name,
                                     registered_net, restore_net, resume_state, save_net,
                                     save_specialists, unknown_settings)
from kfkd_engine.jobs import dask_backend, dask_client, fit_in_jobs
from kfkd_io import __version__

