"""Padding-free DPO log-probs equal the padded computation on llmlab's Transformer."""

import torch

from llmlab.losses import token_logps
from llmlab.models.build import build_model
from llmlab.stages.dpo import model_logits, packs_documents, padfree_sequence_logps


def test_padfree_equals_padded():
    torch.manual_seed(0)
    model = build_model({"arch": "transformer", "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                         "d_ff": 64, "max_seq_len": 64}, vocab_size=50).eval()
    assert packs_documents(model)
    lens = [9, 5, 12, 3]
    ids = torch.zeros(4, 12, dtype=torch.long)
    att = torch.zeros(4, 12, dtype=torch.long)
    labels = torch.full((4, 12), -100)
    for i, n in enumerate(lens):
        ids[i, :n] = torch.randint(1, 50, (n,))
        att[i, :n] = 1
        labels[i, n // 2:n] = ids[i, n // 2:n]  # the "completion" half is labelled
    with torch.no_grad():
        seq, n_tok = padfree_sequence_logps(model, ids, att, labels)
        lp, mask = token_logps(model_logits(model, ids, att), labels)
    assert torch.allclose(seq, lp.sum(-1), atol=1e-5)
    assert torch.equal(n_tok, mask.sum(-1))
