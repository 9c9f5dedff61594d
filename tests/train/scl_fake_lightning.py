"""Stand-ins for the classes PyTorch Lightning 1.x pickles into a checkpoint (a callback class as a dict key, objects
in its state). Importing this module, or rebuilding one of its objects, appends a line to the file named by
$SCL_FAKE_LIGHTNING_LOG: the SCL importer's restricted unpickler must do neither."""
import os


def _record(what: str) -> None:
    path = os.environ.get("SCL_FAKE_LIGHTNING_LOG")
    if path:
        with open(path, "a") as f:
            f.write(what + "\n")


_record("import")


class ModelCheckpoint:
    """Pickled as a class object: the key of Lightning 1.x's `callbacks` dict."""

    def __init__(self, monitor: str = "val/the_metric"):
        self.monitor = monitor

    def __setstate__(self, state):   # called by any ordinary unpickler that rebuilds an instance
        _record("setstate")
        self.__dict__.update(state)


class Hook:
    """An instance pickled by __reduce__ (REDUCE opcode): an ordinary unpickler calls `rebuild_hook`."""

    def __reduce__(self):
        return (rebuild_hook, ("payload",))


def rebuild_hook(arg):
    _record(f"reduce {arg}")
    return Hook()
