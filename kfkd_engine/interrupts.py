"""Ctrl-C that stops at the next safe point: training after its epoch, a
search after its trial's batch, a video after its frame."""
import contextlib
import signal
import sys


@contextlib.contextmanager
def stop_requests(message=None, signals=(signal.SIGINT,)):
    """A list that the first of `signals` fills (printing `message` to stderr)
    instead of interrupting, for a loop to look at when it can stop cleanly;
    a second signal raises KeyboardInterrupt at once. Outside the main thread,
    where no signal can be caught, the list stays empty."""
    requests, previous = [], {}

    def request(signum, frame):
        if requests:
            raise KeyboardInterrupt
        requests.append(signum)
        if message:
            print(message, file=sys.stderr)
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, request)
    except ValueError:  # not the main thread
        pass
    try:
        yield requests
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
