"""The export half of ``experiments/zoo.py`` (filled in below)."""


def ship_all(size, jobs, args, log):
    return []
