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



class DistributedError(DetectionError):
    """A multi-process run (``torchrun``) lost a rank, timed out waiting for one, or cannot start."""
