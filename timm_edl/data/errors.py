"""The dataset errors; every message is meant for the end user."""


class DatasetError(Exception):
    """Base class of every dataset error; its message is meant for the end user."""


class UnknownDatasetError(DatasetError, ValueError):
    """The dataset name is not in ``DATASETS``."""


class InvalidSplitError(DatasetError, ValueError):
    """The split is neither ``train`` nor ``test`` (nor a synonym)."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The data is not on disk; the message says where it looked and how to get it."""


class CorruptDatasetError(DatasetError, ValueError):
    """The data is on disk but unreadable (truncated archive, bad pickle, ...)."""
