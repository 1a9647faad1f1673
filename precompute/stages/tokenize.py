"""Stage: persist a corpus's token stream (tokenized during validation) as an .npy file."""

from __future__ import annotations

import numpy as np

from precompute.runner import Run, save_npy


def stage_tokenize(run: Run, name: str, ids: np.ndarray) -> dict:
    save_npy(run.path(name), ids)
    return {}
