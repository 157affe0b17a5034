"""Error types the library raises for bad input. Tools catch :class:`DetectionError` and print its
message (which names the offending file) instead of a traceback."""


class DetectionError(Exception):
    """Base class of every error caused by the user's input or environment."""


class DatasetError(DetectionError):
    """A dataset file (image, annotation, split list) is missing, corrupt or malformed."""


class CacheError(DetectionError):
    """A cache on disk was made with other settings or another version, or is damaged."""


class ModelError(DetectionError):
    """A weights or model file does not fit what it is loaded into."""


class StorageError(DetectionError, OSError):
    """An output file or folder cannot be written: disk full, file size limit, read-only folder, a
    regular file where a folder should be. Also an OSError, for callers that catch those."""


def ignore_interrupts_in_worker() -> None:
    """Worker-process initializer: ignore SIGINT.

    Ctrl-C sends SIGINT to the whole process group; a worker that took it would die printing its
    own traceback. The parent alone handles it (it stops the pool; finished work is kept).
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
