"""Options several datasets share, declared once (each loader's declaration reuses them).

A dataset's own options live in its file (``kind``, ``noise``, ... in
:mod:`gradlab.data.synthetic`); these are the ones whose meaning is the same wherever they apply.
"""

from gradlab.core.options import Option

TEST_FRACTION = Option("test_fraction", float, 0.2, "held-out share of a dataset without an official test split",
                       low=0, high=1, low_open=True, high_open=True)
MAX_TRAIN = Option("max_train", int, 0, "keep at most this many training examples (a seeded subset; 0 = all)", low=0)
DOWNLOAD = Option("download", bool, True, "fetch missing dataset files into the data folder")
N_SAMPLES = Option("n_samples", int, 5000, "examples generated (train + test)", low=20)
STREAM = Option("stream", bool, False, "read examples from disk batch by batch through a DataLoader instead of "
                "holding the dataset in memory")
WORKERS = Option("workers", int, 0, "DataLoader worker processes that read a streamed dataset (0: the main process)",
                 low=0, high=64)
