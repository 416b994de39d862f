"""HMST critic: a small transformer encoder that scores (query, response, retrieved facts).

Input layout (one sequence per row)::

    [CLS] query [SEP] response [SEP] facts
    seg 0  0     0     1        1     2

[CLS] and [SEP] are learned vectors, not vocabulary entries, so the critic works with any
tokenizer. Each part arrives right-padded with ``pad_id``; the parts are concatenated as they
are (padding stays in place), padding is masked out of attention, and learned positions
count only real tokens, so a row reads exactly like its unpadded sequence. When the total
would exceed ``max_len``, facts are cut first, then the response, then the query (each
keeps its beginning; the columns are cut, so cut parts lose their last columns).

With ``match_ngram`` = n > 0 every token also gets a learned embedding of two exact-match
flags, as DrQA's reader does (Chen et al., 2017): whether an n-gram of token ids covering it
occurs in each of the other two parts (query tokens: in the response, in the facts; response
tokens: in the query, in the facts; fact tokens: in the response, in the query). Verifying a
claim is first a matter of finding it in the evidence and then of checking that it is bound
to the asked subject; the flags make the first step an input rather than something a small
encoder must learn from a few thousand triples, and leave the second (which matched words
sit together in one fact) to attention. n = 1–2 suits subword tokenizers, 3 a char-level one.

Outputs: ``logits`` of P(correct) (``p_correct = sigmoid(logits)``) from the [CLS] state, and
``confidence`` from a separate head trained to predict whether the critic's own verdict
(p_correct > 0.5) is right. :meth:`Critic.loss` = BCE(logits, label) + ``conf_weight`` *
BCE(confidence logits, verdict correctness) (the second target is computed without gradient).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlm.core.errors import MemLMError


@dataclass
class CriticOutput:
    p_correct: torch.Tensor  # [B]
    confidence: torch.Tensor  # [B] in [0, 1]
    logits: torch.Tensor  # [B] logit of p_correct
    confidence_logits: torch.Tensor | None = None  # [B]


class Critic(nn.Module):
    """(query, response, facts) -> P(correct), confidence. See the module docstring."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        max_len: int = 512,
        dropout: float = 0.0,
        pad_id: int = 0,
        conf_weight: float = 0.5,
        match_ngram: int = 0,
    ):
        super().__init__()
        if d_model % n_heads != 0:
            raise MemLMError(f"critic d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if max_len < 4:
            raise MemLMError(f"critic max_len must be at least 4, got {max_len}")
        if match_ngram < 0:
            raise MemLMError(f"critic match_ngram must be >= 0 (0 = no exact-match flags), got {match_ngram}")
        self.vocab_size, self.d_model, self.max_len = vocab_size, d_model, max_len
        self.pad_id = pad_id
        self.conf_weight = conf_weight
        self.match_ngram = int(match_ngram)
        self.tok = nn.Embedding(vocab_size, d_model)
        self.seg = nn.Embedding(3, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        # flags (in the first other part) + 2 * (in the second other part); absent without match_ngram,
        # so checkpoints of critics without it keep their exact parameter set
        self.match = nn.Embedding(4, d_model) if self.match_ngram else None
        if self.match is not None:
            nn.init.normal_(self.match.weight, std=0.02)
        self.cls = nn.Parameter(torch.randn(d_model) * 0.02)
        self.sep = nn.Parameter(torch.randn(d_model) * 0.02)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.seg.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=4 * d_model, dropout=dropout, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 1)
        self.conf_head = nn.Linear(d_model, 1)

    def _budget(self, tq: int, tr: int, tf: int) -> tuple[int, int, int]:
        room = self.max_len - 3
        tf_k = min(tf, max(0, room - tq - tr))
        tr_k = min(tr, max(0, room - tq - tf_k))
        tq_k = min(tq, room - tr_k - tf_k)
        return tq_k, tr_k, tf_k

    def encode(self, query_ids, response_ids, fact_ids, pad_id: int | None = None) -> torch.Tensor:
        """[B, d_model] pooled ([CLS]) representation."""
        pad = self.pad_id if pad_id is None else pad_id
        b = query_ids.shape[0]
        if response_ids.shape[0] != b or fact_ids.shape[0] != b:
            raise MemLMError("critic query, response and fact batches must have the same batch size")
        tq, tr, tf = self._budget(query_ids.shape[1], response_ids.shape[1], fact_ids.shape[1])
        q, r, f = query_ids[:, :tq], response_ids[:, :tr], fact_ids[:, :tf]
        dev = q.device
        ones = torch.ones(b, 1, dtype=torch.bool, device=dev)
        valid = torch.cat([ones, q != pad, ones, r != pad, ones, f != pad], dim=1)  # [B, T]
        seg = torch.cat(
            [
                torch.zeros(1 + tq, dtype=torch.long, device=dev),
                torch.ones(1 + tr, dtype=torch.long, device=dev),
                torch.full((1 + tf,), 2, dtype=torch.long, device=dev),
            ]
        )
        special = torch.zeros(valid.shape[1], dtype=torch.long, device=dev)  # 0 token, 1 CLS, 2 SEP
        special[0] = 1
        special[1 + tq] = 2
        special[2 + tq + tr] = 2
        ids = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev), q, torch.zeros(b, 1, dtype=torch.long, device=dev), r,
                         torch.zeros(b, 1, dtype=torch.long, device=dev), f], dim=1)
        ids = torch.where(valid, ids, torch.zeros_like(ids)).clamp(0, self.vocab_size - 1)
        x = self.tok(ids)
        if self.match is not None:
            x = x + self.match(self._match_flags(q, r, f, valid, tq, tr))
        x = torch.where((special == 1).view(1, -1, 1), self.cls.to(x.dtype), x)
        x = torch.where((special == 2).view(1, -1, 1), self.sep.to(x.dtype), x)
        pos = (valid.long().cumsum(1) - 1).clamp(0, self.max_len - 1)
        x = x + self.seg(seg).unsqueeze(0) + self.pos(pos)
        h = self.encoder(x, src_key_padding_mask=~valid)
        return self.norm(h[:, 0])

    def _grams(self, ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] hash of the n-gram starting at each position, and whether it lies in real tokens."""
        n = self.match_ngram
        b, t = ids.shape
        ids = torch.cat([ids.clamp_min(0), ids.new_zeros(b, n - 1)], 1)
        ok = torch.cat([valid, valid.new_zeros(b, n - 1)], 1)
        h = torch.zeros(b, t, dtype=torch.long, device=ids.device)
        whole = torch.ones(b, t, dtype=torch.bool, device=ids.device)
        for i in range(n):  # a rolling hash mod a 31-bit prime: h * (V + 1) stays far inside int64
            h = (h * (self.vocab_size + 1) + ids[:, i:i + t] + 1) % 2147483647
            whole = whole & ok[:, i:i + t]
        return h, whole

    def _covered(self, grams, ok, other_grams, other_ok) -> torch.Tensor:
        """[B, T] bool: some n-gram covering the token occurs in the other part."""
        hit = ((grams.unsqueeze(2) == other_grams.unsqueeze(1)) & other_ok.unsqueeze(1)).any(2) & ok
        n = self.match_ngram
        if n == 1 or hit.size(1) == 0:  # a part cut to nothing (max_len) has no tokens to cover
            return hit
        # a token is covered by the grams starting at it and at the n - 1 tokens before it
        return F.max_pool1d(F.pad(hit.float().unsqueeze(1), (n - 1, 0)), n, stride=1).squeeze(1) > 0

    def _match_flags(self, q, r, f, valid, tq: int, tr: int) -> torch.Tensor:
        """[B, T] index into ``self.match``: 0 for [CLS] / [SEP] / padding, else the two flags."""
        vq, vr, vf = valid[:, 1:1 + tq], valid[:, 2 + tq:2 + tq + tr], valid[:, 3 + tq + tr:]
        (gq, oq), (gr, orr), (gf, of) = self._grams(q, vq), self._grams(r, vr), self._grams(f, vf)
        fq = self._covered(gq, oq, gr, orr).long() + 2 * self._covered(gq, oq, gf, of).long()
        fr = self._covered(gr, orr, gq, oq).long() + 2 * self._covered(gr, orr, gf, of).long()
        ff = self._covered(gf, of, gr, orr).long() + 2 * self._covered(gf, of, gq, oq).long()
        z = torch.zeros(q.size(0), 1, dtype=torch.long, device=q.device)
        return torch.cat([z, fq, z, fr, z, ff], 1)

    def forward(self, query_ids, response_ids, fact_ids, pad_id: int | None = None) -> CriticOutput:
        h = self.encode(query_ids, response_ids, fact_ids, pad_id)
        logits = self.head(h).squeeze(-1)
        conf_logits = self.conf_head(h).squeeze(-1)
        return CriticOutput(
            p_correct=torch.sigmoid(logits), confidence=torch.sigmoid(conf_logits), logits=logits,
            confidence_logits=conf_logits,
        )

    def loss(self, output: CriticOutput, labels: torch.Tensor) -> torch.Tensor:
        """BCE on P(correct) plus conf_weight * BCE of the confidence head on 'verdict was right'."""
        y = labels.to(output.logits.dtype)
        loss = F.binary_cross_entropy_with_logits(output.logits, y)
        if output.confidence_logits is not None and self.conf_weight > 0:
            with torch.no_grad():
                right = ((output.logits > 0).to(y.dtype) == y).to(y.dtype)
            loss = loss + self.conf_weight * F.binary_cross_entropy_with_logits(output.confidence_logits, right)
        return loss
