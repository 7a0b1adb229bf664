"""Offline datasets and seeded splits with fixed roles."""

from purifier.data.datasets import LOADERS, Dataset, load_dataset, synthetic_tabular
from purifier.data.splits import ROLES, Splits, SplitSizes, make_splits

__all__ = ["LOADERS", "ROLES", "Dataset", "SplitSizes", "Splits", "load_dataset", "make_splits",
           "synthetic_tabular"]
