"""Training data: raw video datasets and precomputed latents through a grain pipeline (see :mod:`.pipeline`).

* :mod:`.batch`     :class:`TrainBatch`, the typed batch the train step takes
* :mod:`.sources`   scan and validate a dataset directory (skips are logged and counted)
* :mod:`.pipeline`  deterministic step-indexed batch plan, per-host slicing, grain reading, :class:`Loader`
* :mod:`.encode`    raw clips -> :class:`TrainBatch` (VAE, text stage, Whisper, editing inputs); precompute
* :mod:`.synthetic` ``python -m hcjax.data.synthetic --out DIR``: a small moving-subject dataset
"""

from .batch import TrainBatch
from .pipeline import BatchPlan, Loader, collate
from .sources import Clip, ScanReport, read_index, scan_precomputed, scan_raw, window_frames

__all__ = ["BatchPlan", "Clip", "Loader", "ScanReport", "TrainBatch", "collate", "read_index", "scan_precomputed",
           "scan_raw", "window_frames"]
