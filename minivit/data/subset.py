"""A stratified fraction of a labelled dataset, for label-efficiency experiments."""

import numpy as np

from minivit.data.datasets import ArrayDataset
from minivit.errors import MinivitError


def stratified_fraction(dataset, fraction, seed=0):
    """The same fraction of every class (rounded, at least one image of each class present),
    chosen by `seed`; fraction 1 returns the dataset itself."""
    if not 0 < fraction <= 1:  # also refuses NaN
        raise MinivitError(f"--train-fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return dataset
    rng = np.random.default_rng([seed, 16])
    chosen = []
    for label in np.unique(dataset.labels):
        members = np.flatnonzero(dataset.labels == label)
        count = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, count, replace=False))
    index = np.sort(np.concatenate(chosen))
    return ArrayDataset(dataset.images[index], dataset.labels[index], dataset.num_classes,
                        dataset.class_names, dataset.mean, dataset.std,
                        f"{dataset.name} ({fraction:g} of the labels)")
