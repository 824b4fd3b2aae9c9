"""Training batches: sliced from tensors already on the device (BatchIterator),
and the training step on them recorded once as a CUDA graph and replayed
(CapturedStep).

On a GPU a small net's batch is mostly eager PyTorch launching kernels one by
one from Python (docs/benchmarks.md). A CapturedStep records the whole step --
the batch gathered by its row numbers, the training iterator's transform,
forward, loss, backward and the optimizer's update -- once for each batch size
(torch.cuda.graph; the last, smaller batch gets its own) and replays it: per
batch, one copy of row numbers and one replay, nothing read back (KeypointNet
sums the losses on the device). The optimizer settings that schedules change
(lr, and SGD's momentum) are device tensors the graph reads, written from the
optimizer's param_groups before a step where they changed, so callbacks and
checkpoints see plain numbers as before. On a CPU the same step runs as it is,
without a graph: that is how the tests check it against skorch's eager step.
"""
import math
import warnings

import torch
from skorch.callbacks import Callback

from kfkd_engine.geometry import MIRROR_AXIS


class BatchIterator:
    """Mini-batches sliced from tensors that already live on the device.

    nolearn's name, skorch's `iterator_train` slot. Each epoch slices the
    data set held on the device, in a new random order if `shuffle`: no
    DataLoader workers, no per-sample collate, no host-to-device copy per
    batch. Subclasses change batches in `transform(Xb, yb)`; those that mirror
    faces mirror them about `mirror_axis`, which KeypointNet sets to its own.
    """
    mirror_axis = MIRROR_AXIS

    def __init__(self, dataset, batch_size=128, shuffle=False):
        if isinstance(dataset, torch.utils.data.Subset):
            index = torch.as_tensor(dataset.indices, device=dataset.dataset.tensors[0].device)
            self.tensors = [t[index] for t in dataset.dataset.tensors]
        elif isinstance(dataset, torch.utils.data.TensorDataset):
            self.tensors = list(dataset.tensors)
        else:
            raise TypeError(f'BatchIterator takes the TensorDataset that KeypointNet.'
                            f'get_dataset makes, not {type(dataset).__name__}')
        self.batch_size = batch_size
        self.shuffle = shuffle

    def __len__(self):
        return math.ceil(len(self.tensors[0]) / self.batch_size)

    def __iter__(self):
        for rows in self.batch_rows():
            yield self.batch(rows)

    def batch_rows(self):
        """Each batch's row numbers (a tensor on the device): slices of a new
        random order each epoch if `shuffle`, else of the rows in order."""
        X = self.tensors[0]
        order = (torch.randperm if self.shuffle else torch.arange)(len(X), device=X.device)
        return order.split(self.batch_size)

    def batch(self, rows):
        """The batch of the rows numbered `rows`, transformed."""
        X, y = self.tensors[0], self.tensors[1] if len(self.tensors) > 1 else None
        return self.transform(X[rows], None if y is None else y[rows])

    def transform(self, Xb, yb):
        return Xb, yb


# Steps run before recording, then undone: they make cuBLAS/cuDNN's workspaces,
# autograd's buffers and the optimizer's state, which a graph cannot allocate.
WARMUP_STEPS = 3
OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def capture_blocker(net, iterator):
    """Why `net`'s training step, with its training `iterator`, cannot run as
    a CapturedStep (a sentence), or None where it can."""
    optimizer = net.optimizer_
    if type(optimizer) not in OPTIMIZERS:
        return (f'its optimizer {type(optimizer).__name__} is not one of '
                f'{", ".join(o.__name__ for o in OPTIMIZERS)}')
    if any(group.get(key) for group in optimizer.param_groups
           for key in ('maximize', 'differentiable', 'dampening')):
        return 'its optimizer maximizes, is differentiable or dampens its momentum'
    if not isinstance(iterator, BatchIterator) or type(iterator).__iter__ is not \
            BatchIterator.__iter__:  # one that makes its own batches (nolearn's, on the host)
        return f'its training iterator {type(iterator).__name__} makes its own batches'
    for _, callback in net.callbacks_:
        if type(callback).on_grad_computed is not Callback.on_grad_computed:
            return f'its callback {type(callback).__name__} looks at the gradients'
    return None


def captured_step(net, iterator):
    """The CapturedStep that trains `net` on `iterator`'s batches where its
    `capture` asks for one (made in a fit's first epoch, kept as the net's
    captured_step_ until training ends), else None."""
    if net.capture not in ('auto', True, False):
        raise ValueError(f"capture must be 'auto', True or False, not {net.capture!r}")
    if not net.capture or (net.capture == 'auto' and torch.device(net.device).type != 'cuda'):
        return None
    made = getattr(net, 'captured_step_', None)
    if made is not None and made.iterator is iterator:
        return made
    blocker = capture_blocker(net, iterator)
    if blocker and net.capture is True:
        raise ValueError(f"capture=True, but this net's training step cannot be captured: "
                         f"{blocker}. Set capture='auto' (or False) to train it eagerly")
    net.captured_step_ = None if blocker else CapturedStep(net, iterator)
    return net.captured_step_


class CapturedStep:
    """`net`'s training step on the batches of `iterator` (a BatchIterator),
    as a CUDA graph on a GPU, as it is elsewhere. Calling it with a batch's
    row numbers trains on that batch and returns skorch's step dict (loss and
    y_pred, on the device: a graph's own, overwritten by its next replay)."""

    def __init__(self, net, iterator):
        self.net, self.iterator = net, iterator
        self.device = torch.device(net.device)
        self.graphed = self.device.type == 'cuda'
        self.sgd = isinstance(net.optimizer_, torch.optim.SGD)
        # (group, key, device tensor): what the step reads of the optimizer's settings
        keys = ('lr', 'momentum') if self.sgd else ('lr',) if self.graphed else ()
        self.settings = [(group, key, torch.tensor(float(group[key]), device=self.device))
                         for group in net.optimizer_.param_groups for key in keys]
        self.written = [None] * len(self.settings)
        self.graphs = {}  # batch size -> (graph, its row numbers, its step dict)
        self.recorded_with = None  # the optimizer's other settings, which graphs keep

    def __call__(self, rows, **fit_params):
        self._write_settings()
        if not self.graphed:
            return self._step(rows, **fit_params)
        fixed = self._fixed_settings()
        if fixed != self.recorded_with:  # e.g. a schedule of weight decay
            self.graphs, self.recorded_with = {}, fixed
        if len(rows) not in self.graphs:
            try:
                self.graphs[len(rows)] = self._record(rows, **fit_params)
            except RuntimeError as error:  # an operation a graph cannot hold
                if self.net.capture is True:
                    raise
                warnings.warn(f'kfkd could not record the training step as a CUDA graph, '
                              f'so it trains without one ({error}); capture=False skips '
                              f'the attempt')
                self.graphed = False
                return self._step(rows, **fit_params)
        graph, static_rows, step = self.graphs[len(rows)]
        static_rows.copy_(rows)
        self.net.module_.train()  # as the eager step leaves it, for callbacks to see
        with torch.cuda.device(self.device):
            graph.replay()
        return step

    def _fixed_settings(self):
        read = {key for _, key, _ in self.settings} | {'params', 'capturable'}
        return [{key: value for key, value in group.items() if key not in read}
                for group in self.net.optimizer_.param_groups]

    def _write_settings(self):
        for i, (group, key, tensor) in enumerate(self.settings):
            if group[key] != self.written[i]:
                tensor.fill_(group[key])
                self.written[i] = group[key]

    def _step(self, rows, **fit_params):
        net = self.net
        net.optimizer_.zero_grad(set_to_none=False)  # the gradients keep their memory
        step = net.train_step_single(self.iterator.batch(rows), **fit_params)
        if self.sgd:
            self._sgd_update()
        else:
            net.optimizer_.step()
        return {key: value.detach() for key, value in step.items()}

    @torch.no_grad()
    def _sgd_update(self):
        """torch.optim.SGD's update (weight decay, momentum, Nesterov's), with lr
        and momentum read from device tensors: torch's reads lr back to the host
        and takes momentum as a number, which a graph would keep as recorded."""
        settings = iter(tensor for _, _, tensor in self.settings)
        for group in self.net.optimizer_.param_groups:
            lr, momentum = next(settings), next(settings)
            for param in group['params']:
                if param.grad is None:
                    continue
                grad = param.grad
                if group['weight_decay']:
                    grad = grad.add(param, alpha=group['weight_decay'])
                state = self.net.optimizer_.state[param]
                if state.get('momentum_buffer') is None:  # zeros: SGD's first step, as torch's
                    state['momentum_buffer'] = torch.zeros_like(param)
                buffer = state['momentum_buffer']
                buffer.mul_(momentum).add_(grad)
                grad = grad + buffer * momentum if group['nesterov'] else buffer
                param.sub_(grad * lr)

    def _record(self, rows, **fit_params):
        """The step for batches of len(rows), recorded as a CUDA graph after
        WARMUP_STEPS on `rows` whose effects are then undone. Whatever fails,
        the net is left as it was, with plain numbers in its param_groups."""
        optimizer = self.net.optimizer_
        capturable = [group.get('capturable') for group in optimizer.param_groups]
        saved = None
        try:
            if not self.sgd:  # torch's Adam reads a tensor lr on the device when capturable
                for group, _, tensor in self.settings:
                    group['capturable'], group['lr'] = True, tensor
                for state in optimizer.state.values():
                    if 'step' in state:
                        state['step'] = state['step'].to(self.device, torch.float32)
            saved = _snapshot(self.net)
            with torch.cuda.device(self.device), warnings.catch_warnings():
                # torch warns of capturable steps run outside a graph: the warm-up's
                warnings.filterwarnings('ignore', 'This instance was constructed with capturable')
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_STEPS):
                        self._step(rows, **fit_params)
                torch.cuda.current_stream(self.device).wait_stream(side)
                _restore(self.net, saved)
                static_rows = rows.clone()
                graph = torch.cuda.CUDAGraph()
                # its own stream on this GPU: torch's default one lives on the current GPU
                with torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device)):
                    step = self._step(static_rows, **fit_params)
            saved = None
        finally:
            if saved is not None:  # the warm-up's steps undone
                _restore(self.net, saved)
            for (group, key, _), value in zip(self.settings, self.written):
                group[key] = value  # plain numbers again, for schedules and checkpoints
            if not self.sgd:  # what a replay does was fixed when it was recorded
                for group, flag in zip(optimizer.param_groups, capturable):
                    group['capturable'] = flag
        return graph, static_rows, step


def _snapshot(net):
    """Copies of the module's weights and buffers and the optimizer's state,
    for _restore: what the warm-up steps change."""
    return ({key: tensor.clone() for key, tensor in net.module_.state_dict().items()},
            {param: {key: value.clone() for key, value in state.items() if torch.is_tensor(value)}
             for param, state in net.optimizer_.state.items()})


def _restore(net, saved):
    """Put back what _snapshot copied, into the same tensors (a graph keeps
    their addresses); optimizer state that the warm-up made is zeroed, as it
    was before its first step."""
    weights, states = saved
    for key, tensor in net.module_.state_dict().items():
        tensor.copy_(weights[key])
    for param, state in net.optimizer_.state.items():
        for key, value in state.items():
            if not torch.is_tensor(value):
                continue
            before = states.get(param, {}).get(key)
            if before is None:
                value.zero_()
            else:
                value.copy_(before)
